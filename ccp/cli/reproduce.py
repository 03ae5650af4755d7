"""`ccp-reproduce scale=tiny|toy|full [key=value ...]`: Tables 1-2, the drift table and Figs. 8-10.

    ccp-reproduce scale=toy                      # = make reproduce-tables SCALE=toy
    ccp-reproduce scale=full prior.path=sd-v1-5 +exports.face.ours=/runs/face_ours/export

Prints the tables; everything is written to results_dir (`ccp.reproduce`).
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig

from ccp.config import CONF_DIR, exit_on_config_error, run_checked


@hydra.main(config_path=CONF_DIR, config_name="reproduce", version_base="1.3")
def reproduce_tables(cfg: DictConfig) -> None:
    from ccp.reproduce import reproduce, summary_text  # here: a refused command line never waits for torch
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is a local path; never wait on the network
    with exit_on_config_error("ccp-reproduce"):
        print(summary_text(reproduce(cfg)))


def main() -> None:
    """ccp-reproduce: the command line checked (`ccp.config.check_command_line`) before Hydra runs the job."""
    run_checked("ccp-reproduce", "reproduce", reproduce_tables)


if __name__ == "__main__":
    main()

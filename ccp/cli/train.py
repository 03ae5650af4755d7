"""`ccp-train`: train ours or a baseline with the one loop, from a Hydra config.

    ccp-train experiment=table1 dataset=face method=ours
    ccp-train prior=tiny prior.path=outputs/tiny-prior data=tiny data.path=imgs method=dreambooth

The run folder is <paths.log_dir>/train/<run_name>; the same command resumes it. At the end the
(EMA) weights are exported to <run dir>/export and can be sampled with GCFG (`ccp.training.run`).
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ccp.config import CONF_DIR, exit_on_config_error, run_checked


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def train(cfg: DictConfig) -> None:
    from ccp.training.run import run_training  # here: a refused command line never waits for torch
    with exit_on_config_error("ccp-train"):
        run_training(cfg, HydraConfig.get().runtime.output_dir)


def main() -> None:
    """ccp-train: the command line checked (`ccp.config.check_command_line`) before Hydra runs the job."""
    run_checked("ccp-train", "train", train)


if __name__ == "__main__":
    main()

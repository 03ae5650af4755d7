"""`ccp-sample`: sample images with Generalized Classifier-free Guidance from a Hydra config.

    ccp-sample prior.path=/path/to/sd-v1-5 [guidance=concept_control concept.path=...] [key=value ...]

Writes images/00000.png ..., grid.png and the resolved config.yaml into Hydra's output folder;
image i is image i of sampling.seed on any device and batch size (`ccp.pipelines.run`).
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ccp.config import CONF_DIR, exit_on_config_error, run_checked


@hydra.main(config_path=CONF_DIR, config_name="sample", version_base="1.3")
def sample(cfg: DictConfig) -> None:
    from ccp.pipelines.run import run_sampling  # here: a refused command line never waits for torch
    with exit_on_config_error("ccp-sample"):
        run_sampling(cfg, HydraConfig.get().runtime.output_dir)


def main() -> None:
    """ccp-sample: the command line checked (`ccp.config.check_command_line`) before Hydra runs the job."""
    run_checked("ccp-sample", "sample", sample)


if __name__ == "__main__":
    main()

"""`ccp-eval`: one metric (FID, text or spatial alignment) of one trained model at one guidance
setting, from a Hydra config (conf/eval.yaml).

    ccp-eval metric=fid export.path=outputs/train/face_ours/export fid.real_path=data/ffhq guidance.concept_weight=1.5
    ccp-eval -m metric=text export.path=... guidance.control_weight='range(1.0,7.75,0.25)'

Writes result.json into Hydra's output folder, one per point of a multirun (`ccp.evaluation.run`).
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ccp.config import CONF_DIR, exit_on_config_error, run_checked


@hydra.main(config_path=CONF_DIR, config_name="eval", version_base="1.3")
def evaluate(cfg: DictConfig) -> None:
    from ccp.evaluation.run import run_eval  # here: a refused command line never waits for torch
    hydra_cfg = HydraConfig.get()
    with exit_on_config_error("ccp-eval"):
        run_eval(cfg, hydra_cfg.runtime.output_dir, override_dirname=hydra_cfg.job.override_dirname)


def main() -> None:
    """ccp-eval: the command line checked (`ccp.config.check_command_line`) before Hydra runs the job."""
    run_checked("ccp-eval", "eval", evaluate)


if __name__ == "__main__":
    main()

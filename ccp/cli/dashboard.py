"""`ccp-dashboard [group=NAME] [dry_run=auto|true|false]`: the project's wandb report (Tables 1-2,
Figs. 8-9, evaluation points, training curves), from a Hydra config (conf/dashboard.yaml).

    ccp-dashboard                                  # offline: the report spec in outputs/dashboard/report.json
    ccp-dashboard logger.wandb.mode=online         # saved on the wandb server; prints its URL

Builds the report with `ccp.dashboard`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ccp.config import CONF_DIR, exit_on_config_error, run_checked


@hydra.main(config_path=CONF_DIR, config_name="dashboard", version_base="1.3")
def dashboard(cfg: DictConfig) -> None:
    from ccp.dashboard import write_dashboard  # here: a refused command line never waits for torch
    with exit_on_config_error("ccp-dashboard"):
        written = write_dashboard(cfg)
    print(f"report spec written to {written['spec']}" if "spec" in written else f"report saved: {written['url']}")


def main() -> None:
    """ccp-dashboard: the command line checked (`ccp.config.check_command_line`) before Hydra runs the job."""
    run_checked("ccp-dashboard", "dashboard", dashboard)


if __name__ == "__main__":
    main()

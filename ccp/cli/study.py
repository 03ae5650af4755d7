"""`ccp-study ACTION [overrides]`: the preference study of Table 1's "Pref." column (conf/study.yaml).

    ccp-study serve study=table1 samples=outputs/study_samples     # the rating app on 127.0.0.1:8000
    ccp-study analyze study=table1                                  # analysis.json / analysis.md beside the database
    ccp-study reset-link study=table1 rater=rater03                 # a new invite link (rater=null: a new admin link)

Runs `ccp.study.run.run_study`; docs/study.md has the whole procedure.
"""

from __future__ import annotations

import sys

from ccp.config import ConfigError, check_command_line, compose, exit_on_config_error
from ccp.study.run import ACTIONS, run_study

USAGE = f"usage: ccp-study {{{','.join(ACTIONS)}}} [key=value ...]   (conf/study.yaml; docs/study.md)"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    with exit_on_config_error("ccp-study"):
        if not argv or argv[0] not in ACTIONS:
            raise ConfigError(f"give the action first, one of {', '.join(ACTIONS)} ({USAGE})")
        check_command_line("study", argv[1:], job_folder=False)  # no Hydra job: the database's folder is checked later
        try:
            cfg = compose("study", argv[1:])
        except Exception as err:  # Hydra's override and missing-config errors: one line, not a traceback
            raise ConfigError(f"{err} ({USAGE})") from None
        run_study(argv[0], cfg)


if __name__ == "__main__":
    main()

"""Tables 1-2 and Figs. 8-10 (`ccp-reproduce`, `make reproduce-tables`): config checks, inputs,
exports, per-cell records, measurements through the shared metric adapters, figures and the run."""

from ccp.reproduce.config import ReproduceConfigError, compose_reproduce
from ccp.reproduce.run import reproduce, summary_text

__all__ = ["ReproduceConfigError", "compose_reproduce", "reproduce", "summary_text"]

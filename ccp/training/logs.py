"""The run's CSV log: one version per run, continued (not overwritten) when the run resumes."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

CSV_NAME = "csv"


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when it opens its folder; this one
    keeps it and appends. Rows the earlier launch logged at or after the first step logged now
    (steps taken after its last checkpoint, which this launch takes again) are dropped first, so
    no step appears twice."""

    def __init__(self, log_dir: str) -> None:
        self._continuing = os.path.isfile(os.path.join(log_dir, self.NAME_METRICS_FILE))
        super().__init__(log_dir)
        if self._continuing:
            with open(self.metrics_file_path, newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])

    def _check_log_dir_exists(self) -> None:
        pass  # keep the earlier launch's metrics.csv

    def save(self) -> None:
        if self._continuing and self.metrics:
            self._continuing = False
            self._drop_rows_from(min(int(m["step"]) for m in self.metrics))
        super().save()

    def _drop_rows_from(self, step: int) -> None:
        with open(self.metrics_file_path, newline="") as file:
            reader = csv.DictReader(file)
            fieldnames = list(reader.fieldnames or [])
            rows = [row for row in reader if not row.get("step") or int(float(row["step"])) < step]
        tmp = f"{self.metrics_file_path}.tmp"
        with open(tmp, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_file_path)


class ContinuingCSVLogger(CSVLogger):
    """A `CSVLogger` whose writer appends to an existing version (`AppendingExperimentWriter`)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


def newest_version(run_dir: str | Path) -> int | None:
    versions = [int(p.name.split("_", 1)[1]) for p in (Path(run_dir) / CSV_NAME).glob("version_*")
                if p.is_dir() and p.name.split("_", 1)[1].isdigit()]
    return max(versions, default=None)


def csv_logger(run_dir: str | Path, resuming: bool) -> CSVLogger:
    """The run's CSV logger: a resumed run continues the newest version, a fresh run starts the next."""
    version = newest_version(run_dir) if resuming else None
    return ContinuingCSVLogger(save_dir=str(run_dir), name=CSV_NAME, version=version)

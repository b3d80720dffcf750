"""Experiment trackers: a CSV file by default, or any of Accelerate's trackers by name.

Trackers exist on the main process only; every other rank gets an empty list, so logging
calls cost nothing there.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

from accelerate.tracking import GeneralTracker

from .errors import ConfigurationError

KNOWN_TRACKERS = ("csv", "wandb", "tensorboard")


class CSVTracker(GeneralTracker):
    """Writes ``metrics.csv`` (one row per logging call) and ``hparams.json`` in ``logging_dir``.

    New metric names add columns; the file is rewritten with the wider header when that
    happens, so it stays loadable by any CSV reader (as Lightning's ``CSVLogger`` does).
    Appends to an existing file, so a resumed run continues the same table.
    """

    name = "csv"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike) -> None:
        super().__init__()
        self.run_name = run_name
        self.logging_dir = str(logging_dir)
        self.metrics_path = os.path.join(self.logging_dir, "metrics.csv")
        self._columns: list[str] = []

    @property
    def tracker(self) -> "CSVTracker":
        return self

    def start(self) -> None:
        os.makedirs(self.logging_dir, exist_ok=True)
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path, newline="") as f:
                header = next(csv.reader(f), [])
            self._columns = header

    def store_init_configuration(self, values: dict) -> None:
        os.makedirs(self.logging_dir, exist_ok=True)
        with open(os.path.join(self.logging_dir, "hparams.json"), "w") as f:
            json.dump(values, f, indent=2, default=repr)

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        row = {"step": step, **values}
        new = [k for k in row if k not in self._columns]
        if new:
            self._rewrite_with(self._columns + new)
        with open(self.metrics_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._columns).writerow(row)

    def _rewrite_with(self, columns: list[str]) -> None:
        rows: list[dict] = []
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path, newline="") as f:
                rows = list(csv.DictReader(f))
        tmp = self.metrics_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_path)
        self._columns = columns

    def finish(self) -> None:
        pass


def normalise_log_with(log_with: Any) -> list[Any]:
    """``None`` -> ``["csv"]``; a name or tracker -> a one-item list; validated."""
    if log_with is None:
        return ["csv"]
    items = list(log_with) if isinstance(log_with, (list, tuple)) else [log_with]
    for item in items:
        if isinstance(item, GeneralTracker):
            continue
        if not isinstance(item, str) or item not in KNOWN_TRACKERS:
            raise ConfigurationError(
                f"Trainer(log_with={log_with!r}): {item!r} is not a known tracker. Allowed: None (CSV), "
                f"{list(KNOWN_TRACKERS)}, a list of these, or an accelerate GeneralTracker instance."
            )
    return items


def build_trackers(log_with: list[Any], project_name: str, log_dir: str, config: dict) -> list[GeneralTracker]:
    """Instantiate and start the trackers (call on the main process only)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    trackers: list[GeneralTracker] = []
    for item in log_with:
        if isinstance(item, GeneralTracker):
            tracker = item
        elif item == "csv":
            tracker = CSVTracker(project_name, log_dir)
        else:
            cls = LOGGER_TYPE_TO_CLASS[item]
            tracker = cls(project_name, log_dir) if cls.requires_logging_directory else cls(project_name)
        tracker.start()
        tracker.store_init_configuration(_loggable_config(config))
        trackers.append(tracker)
    return trackers


def _loggable_config(config: dict) -> dict:
    """Hyperparameters reduced to the types every tracker accepts."""
    out = {}
    for k, v in config.items():
        out[k] = v if isinstance(v, (bool, int, float, str)) or v is None else repr(v)
    return out

"""Progress display on the main process: a bar on a terminal, plain log lines elsewhere.

A redrawn bar is unreadable in a CI log or a Slurm output file (thousands of carriage
returns), so when stderr is not a terminal each epoch prints a few lines instead::

    epoch 2 | step 140/400 | loss 0.4312 | lr 1.0e-03 | 85.2 it/s
    epoch 2 | step 400/400 | loss 0.3977 | lr 1.0e-03 | 84.9 it/s | 4.7 s

``ACCEL_TRAINER_PROGRESS=bar|lines|off`` overrides the automatic choice.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, TextIO

PROGRESS_ENV = "ACCEL_TRAINER_PROGRESS"
PROGRESS_MODES = ("bar", "lines", "off")


def make_progress(total: Any, epoch: int, enabled: bool, initial: int = 0) -> Any:
    """The progress display for one training epoch, or ``None`` when disabled.

    Args:
        total: the number of batches in the epoch (``None`` or ``math.inf`` when unknown).
        epoch: the epoch being trained (shown as is, 0-based like ``trainer.current_epoch``).
        enabled: False on non-main ranks and with ``Trainer(enable_progress_bar=False)``.
        initial: batches already done in this epoch (a run resumed mid-epoch).

    Returns:
        An object with ``update(n)``, ``set_postfix(dict, refresh=False)`` and ``close()``
        (a tqdm bar on a terminal or in a notebook, else :class:`LineProgress`), or ``None``.
    """
    if not enabled:
        return None
    mode = _mode()
    if mode == "off":
        return None
    total = None if total is None or total == math.inf else int(total)
    if mode == "lines":
        return LineProgress(total, epoch, initial=initial)
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=f"epoch {epoch}", unit="it", leave=True, dynamic_ncols=True, file=sys.stderr
    )


def _mode() -> str:
    forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if forced:
        if forced not in PROGRESS_MODES:
            raise ValueError(f"{PROGRESS_ENV}={forced!r} is not allowed: expected one of {list(PROGRESS_MODES)}.")
        return forced
    if "ipykernel" in sys.modules:  # a notebook: tqdm.auto draws a widget
        return "bar"
    try:
        return "bar" if sys.stderr.isatty() else "lines"
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return "lines"


class LineProgress:
    """Progress as occasional plain lines, for logs that are not a terminal.

    A line is printed when the epoch crosses another tenth of its length (at most one every
    ``min_interval_s`` seconds, so short epochs print only their final line), or when
    ``interval_s`` seconds passed since the last line (epochs of unknown length), and once
    when the epoch ends. The rate is measured since the previous line; the final line
    gives the epoch's mean rate (of its batches) and duration (with its validation).

    Args:
        total: batches in the epoch, or ``None`` when unknown.
        epoch: the epoch number shown.
        file: where to write (default ``sys.stderr``).
        interval_s: the longest silence between two lines.
        min_interval_s: the shortest gap between two intermediate lines.
        clock: a ``time.monotonic``-like function (tests pass a fake one).
        initial: batches already done in this epoch (a run resumed mid-epoch).
    """

    def __init__(
        self,
        total: int | None,
        epoch: int,
        file: TextIO | None = None,
        interval_s: float = 30.0,
        min_interval_s: float = 2.0,
        clock: Any = time.monotonic,
        initial: int = 0,
    ) -> None:
        self.total = total
        self.epoch = epoch
        self.n = self._initial = initial
        self.postfix: dict[str, Any] = {}
        self._file = file
        self._interval = interval_s
        self._min_interval = min_interval_s
        self._clock = clock
        self._start = self._last_time = self._last_update = clock()
        self._last_n = initial
        self._next_tenth = initial * 10 // total + 1 if total else 1
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._last_update = self._clock()
        since = now - self._last_time
        due = since >= self._interval
        if self.total:
            crossed = self.n * 10 >= self._next_tenth * self.total
            if crossed:
                self._next_tenth = self.n * 10 // self.total + 1
                due = due or since >= self._min_interval
            if self.n >= self.total:  # the final line is close()'s
                due = False
        if due:
            self._emit(now, final=False)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = False, **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.n > self._initial:
            self._emit(self._clock(), final=True)

    def format_line(self, now: float, final: bool) -> str:
        """The line for the current state (``final`` adds the epoch's duration)."""
        parts = [f"epoch {self.epoch}", f"step {self.n}/{self.total}" if self.total else f"step {self.n}"]
        for key, value in self.postfix.items():
            parts.append(f"{key} {_fmt(key, value)}")
        if final:
            # the rate of the batches alone: the epoch may be closed after its validation
            elapsed = self._last_update - self._start
            rate = (self.n - self._initial) / elapsed if elapsed > 0 else math.inf
        else:
            elapsed = now - self._last_time
            rate = (self.n - self._last_n) / elapsed if elapsed > 0 else math.inf
        parts.append(f"{rate:.1f} it/s" if math.isfinite(rate) else "- it/s")
        if final:
            parts.append(f"{now - self._start:.1f} s")
        return " | ".join(parts)

    def _emit(self, now: float, final: bool) -> None:
        line = self.format_line(now, final)
        print(line, file=self._file if self._file is not None else sys.stderr, flush=True)
        self._last_time, self._last_n = now, self.n


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if key == "lr" or key.startswith("lr"):
        return f"{number:.1e}"
    return f"{number:.4g}"

"""Checkpoint-and-exit on SIGTERM / SIGUSR1, the signals Slurm and cloud schedulers send.

The handler only sets a flag; the trainer acts on it at the next accumulation boundary,
once every rank has seen it, so all ranks stop after the same step and write one
consistent checkpoint. The process then exits with :data:`PREEMPTION_EXIT_CODE`
(75, ``EX_TEMPFAIL``: "temporary failure, try again"), and running the same command
again resumes from ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

PREEMPTION_EXIT_CODE = 75
PREEMPTION_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


class Preempted(SystemExit):
    """Raised (with exit code 75) after the preemption checkpoint is written."""

    def __init__(self, checkpoint_path: str) -> None:
        super().__init__(PREEMPTION_EXIT_CODE)
        self.checkpoint_path = checkpoint_path

    def __str__(self) -> str:
        return f"preempted: checkpoint written to {self.checkpoint_path}; rerun the same command to resume"


class PreemptionWatcher:
    """Turns the preemption signals into a flag for the duration of a ``fit``."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

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


class PreemptionPoll:
    """Decides at which global steps the ranks agree on the preemption flag, and agrees.

    Why not every step: one all-reduce costs about a millisecond over gloo (tens of
    microseconds over NVLink), as much as a whole step of a small model. Why not every N
    fixed steps: with large models N steps can outlast the scheduler's grace period. So the
    ranks poll about every ``period_s`` seconds of training: each rank proposes the number
    of steps that fit in ``period_s`` at its measured step time, and the smallest proposal
    travels in the same collective as the flags, so every rank polls again at the same
    global step. Latency: ``period_s`` plus one step; cost: one collective per period.
    """

    def __init__(self, period_s: float = 0.5, max_interval: int = 10_000) -> None:
        self.period_s = period_s
        self.max_interval = max_interval
        self.next_step = 0
        self._last: tuple[int, float] | None = None

    def due(self, global_step: int) -> bool:
        return global_step >= self.next_step

    def proposal(self, global_step: int, now: float) -> int:
        """Steps until the next poll, from this rank's step time since the last poll."""
        if self._last is None or global_step <= self._last[0]:
            return 1
        seconds_per_step = max((now - self._last[1]) / (global_step - self._last[0]), 1e-9)
        return max(1, min(self.max_interval, int(self.period_s / seconds_per_step)))

    def exchange(self, global_step: int, requested: bool, device: Any) -> bool:
        """All ranks at the same ``global_step``: True when any rank received a signal."""
        import time

        import torch
        import torch.distributed as dist

        now = time.perf_counter()
        # MAX of [flag, -proposal] gives "any rank" and the smallest proposal in one collective.
        values = torch.tensor([float(requested), -float(self.proposal(global_step, now))], device=device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        flag, negative_interval = values.tolist()
        self.next_step = global_step + max(1, int(-negative_interval))
        self._last = (global_step, now)
        return flag > 0

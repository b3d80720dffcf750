"""Checkpoint-and-exit on SIGTERM / SIGUSR1 (what Slurm and cloud schedulers send) and on Ctrl-C.

The handler only sets a flag; the trainer acts on it at the next accumulation boundary,
once every rank has seen it, so all ranks stop after the same step and write one
consistent checkpoint. The process then exits with :data:`PREEMPTION_EXIT_CODE`
(75, ``EX_TEMPFAIL``: "temporary failure, try again"), and running the same command
again resumes from ``checkpoints/last.ckpt``.

Ctrl-C (SIGINT) is the same graceful stop, started by a person: the first one prints one
line and the run checkpoints at the next step boundary, then exits with
:data:`INTERRUPT_EXIT_CODE` (130, the shell's code for a SIGINT). A second Ctrl-C stops at
once (``KeyboardInterrupt``, no checkpoint), for a step that never ends.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

PREEMPTION_EXIT_CODE = 75
INTERRUPT_EXIT_CODE = 130
PREEMPTION_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


def exit_code_for(signal_name: str | None) -> int:
    """130 after a Ctrl-C (SIGINT), 75 after any other preemption signal."""
    return INTERRUPT_EXIT_CODE if signal_name == "SIGINT" else PREEMPTION_EXIT_CODE


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written (exit code 75, or 130 after Ctrl-C)."""

    def __init__(self, checkpoint_path: str, signal_name: str | None = None) -> None:
        super().__init__(exit_code_for(signal_name))
        self.checkpoint_path = checkpoint_path
        self.signal_name = signal_name

    def __str__(self) -> str:
        return f"preempted: checkpoint written to {self.checkpoint_path}; rerun the same command to resume"


class PreemptionWatcher:
    """Turns the preemption signals and a first Ctrl-C into a flag for the duration of a ``fit``.

    Args:
        announce: print the one-line notice on the first Ctrl-C (the main process only, so
            that N ranks do not print it N times).
    """

    def __init__(self, announce: bool = True) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def install(self) -> None:
        self._pid = os.getpid()
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        # A SIGINT that the parent set to be ignored (a background job of a non-interactive
        # shell) stays ignored, as Python itself does.
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle_interrupt)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.requested:  # the first signal names the stop (a SIGTERM after a Ctrl-C is the same stop)
            self.signal_name = signal.Signals(signum).name
        self.requested = True

    def _handle_interrupt(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker (same process group): the trainer's process decides
        if self.requested and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: stop at once
        first = not self.requested
        self._handle(signum, frame)
        if first and self.announce:
            print(
                "\naccel_trainer: Ctrl-C: finishing the current step, then writing a checkpoint and exiting "
                "(press Ctrl-C again to stop at once, without a checkpoint).",
                file=sys.stderr,
                flush=True,
            )


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

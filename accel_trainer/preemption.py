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

Supervision, under a launcher (torchrun, i.e. ``accelerate launch``), by a watchdog thread:

* **the launcher is gone.** Killing ``accelerate launch`` (SIGKILL, the OOM killer, a
  ``kill`` of its process group -- torchrun starts every rank in a session of its own)
  used to leave the ranks training unsupervised. Each rank remembers its parent; when the
  parent changes, the rank treats it as a preemption: the ranks agree at the next poll,
  write ``last.ckpt`` and exit 75, ``run_status.json`` saying ``preempted`` with the reason.
* **a failing job is not a preemption.** When a rank fails, torchrun stops the others with
  SIGTERM and kills them 30 s later (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``). A rank that hangs
  (in ``training_step``, or inside a C call that never returns, where no Python signal
  handler can run) would turn the graceful handler into those 30 s. The watchdog sees
  every SIGTERM at once (``signal.set_wakeup_fd``), and when a rank of this job on the same
  host has already exited, the job is failing: the rank exits at once, without a checkpoint
  (exit code 143, what SIGTERM's default gives).
"""

from __future__ import annotations

import os
import select
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


def launched_by_torchrun(environ: Any = None) -> bool:
    """Whether this process is a worker of torchrun (``accelerate launch`` on several processes)."""
    env = os.environ if environ is None else environ
    return bool(env.get("TORCHELASTIC_RUN_ID"))


def _watch_launcher_default() -> bool:
    setting = os.environ.get("ACCEL_TRAINER_WATCH_LAUNCHER", "auto").lower()
    if setting in ("1", "true", "yes", "on"):
        return True
    if setting in ("0", "false", "no", "off"):
        return False
    return launched_by_torchrun()


def pid_has_exited(pid: int) -> bool:
    """True when ``pid`` no longer runs (gone, or a zombie its parent has not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X")
    except OSError:
        return False


class PreemptionWatcher:
    """Turns the preemption signals, a first Ctrl-C and a lost launcher into a flag for a ``fit``.

    Args:
        announce: print the one-line notice on the first Ctrl-C (the main process only, so
            that N ranks do not print it N times).
        watch_launcher: stop (as on a preemption signal) when this process's parent changes;
            default: under torchrun (``ACCEL_TRAINER_WATCH_LAUNCHER=1``/``0`` forces it).
        poll_s: how often the watchdog thread looks at the parent.

    Attributes:
        requested: a stop was asked for (on this rank).
        signal_name: the signal that asked (``"SIGTERM"``, ``"SIGUSR1"``, ``"SIGINT"``), or
            None when the launcher went away.
        cause: the reason in words, for messages and ``run_status.json``.
        siblings: ``(rank, pid)`` of the other ranks of this job on this host (set by the
            trainer): when one has exited, a SIGTERM means the job is failing.
    """

    def __init__(self, announce: bool = True, watch_launcher: bool | None = None, poll_s: float = 0.5) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self.cause: str | None = None
        self.announce = announce
        self.watch_launcher = _watch_launcher_default() if watch_launcher is None else watch_launcher
        self.poll_s = poll_s
        self.rank = 0
        self.siblings: list[tuple[int, int]] = []
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()
        self._parent: int | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wakeup: tuple[int, int] | None = None
        self._previous_wakeup = -1

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
        self._start_watchdog()

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        self._stop_watchdog()

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == getattr(signal, "SIGTERM", None):
            self._exit_if_job_failing()
        if not self.requested:  # the first signal names the stop (a SIGTERM after a Ctrl-C is the same stop)
            self.signal_name = signal.Signals(signum).name
            self.cause = f"{self.signal_name} received"
        self.requested = True

    def _handle_interrupt(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker (same process group): the trainer's process decides
        if self.requested and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: stop at once
        first = not self.requested
        self._handle(signum, frame)
        if first:
            self.cause = "Ctrl-C"
        if first and self.announce:
            print(
                "\naccel_trainer: Ctrl-C: finishing the current step, then writing a checkpoint and exiting "
                "(press Ctrl-C again to stop at once, without a checkpoint).",
                file=sys.stderr,
                flush=True,
            )


    # -- supervision ---------------------------------------------------------------------------------
    def _start_watchdog(self) -> None:
        """The thread that notices a lost launcher and every SIGTERM, even while the main thread is stuck."""
        if self._thread is not None:
            return
        self._parent = os.getppid() if self.watch_launcher else None
        if self._parent == 1:
            self._parent = None  # already an orphan: there is no launcher to watch
        self._wakeup = None
        try:
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            if previous != -1:  # someone else (an event loop) listens there: leave it to them
                signal.set_wakeup_fd(previous)
                os.close(r)
                os.close(w)
            else:
                self._wakeup = (r, w)
        except (OSError, ValueError, AttributeError):  # pragma: no cover - platforms without it
            self._wakeup = None
        if self._parent is None and self._wakeup is None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="accel_trainer-watchdog", daemon=True)
        self._thread.start()

    def _stop_watchdog(self) -> None:
        thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None and self._wakeup is not None:
            try:
                os.write(self._wakeup[1], b"\0")  # wake the thread from its select at once
            except OSError:
                pass
        if thread is not None:
            thread.join(timeout=2 * self.poll_s + 1)
        if self._wakeup is not None:
            try:
                signal.set_wakeup_fd(-1)
            except (ValueError, OSError):  # pragma: no cover - not the main thread
                pass
            for fd in self._wakeup:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._wakeup = None

    def _watch(self) -> None:
        while not self._stop.is_set():
            if self._wakeup is not None:
                try:
                    ready, _, _ = select.select([self._wakeup[0]], [], [], self.poll_s)
                except (OSError, ValueError):
                    return
                if ready:
                    try:
                        data = os.read(self._wakeup[0], 512)
                    except (BlockingIOError, OSError):
                        data = b""
                    if getattr(signal, "SIGTERM", -1) in data:
                        self._exit_if_job_failing()
            else:
                self._stop.wait(self.poll_s)
            if self._parent is not None and os.getppid() != self._parent:
                self._launcher_gone(self._parent)
                self._parent = None

    def _launcher_gone(self, parent: int) -> None:
        if not self.requested:
            self.signal_name = None
            self.cause = f"the launcher (PID {parent}) is gone"
        self.requested = True
        _say(
            f"accel_trainer: rank {self.rank}: the launcher that started this process (PID {parent}) is gone; "
            "finishing the current step, then writing a checkpoint and exiting."
        )

    def _exit_if_job_failing(self) -> None:
        """On SIGTERM: exit at once when a rank of this job on this host has already exited."""
        if os.getpid() != self._pid:
            return
        dead = [(rank, pid) for rank, pid in self.siblings if pid_has_exited(pid)]
        if not dead:
            return
        rank, pid = dead[0]
        _say(
            f"accel_trainer: rank {self.rank}: SIGTERM after rank {rank} (PID {pid}) of this job exited: the launcher "
            "is stopping a failed job, not preempting it. Exiting at once, without a checkpoint."
        )
        os._exit(128 + int(getattr(signal, "SIGTERM", 15)))


def _say(message: str) -> None:
    try:
        print(message, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # a closed stderr must not turn a message into a crash
        pass


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

        from .collectives import all_reduce_max_

        now = time.perf_counter()
        # MAX of [flag, -proposal] gives "any rank" and the smallest proposal in one collective.
        values = torch.tensor([float(requested), -float(self.proposal(global_step, now))], device=device)
        all_reduce_max_(values)
        flag, negative_interval = values.tolist()
        self.next_step = global_step + max(1, int(-negative_interval))
        self._last = (global_step, now)
        return flag > 0

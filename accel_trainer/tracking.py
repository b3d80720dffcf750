# mypy: disable-error-code="misc"
# (the mixin methods declare ``self: Trainer`` so that mypy checks them against the trainer's
# attributes; mypy reports such a self-type, a subclass of the mixin, as [misc]: silenced here)
"""The trainer's side of a run's records: trackers, ``config.yaml``, ``run_status.json``, the run-directory lock.

The records themselves are written by :mod:`accel_trainer.loggers`, :mod:`accel_trainer.run_status`
and :mod:`accel_trainer.run_dir`; this module decides when, from the trainer's state.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import TYPE_CHECKING, Any

from . import collectives
from . import run_status as run_records
from .launching import say_safely
from .loggers import CSVTracker, build_trackers, log_hyperparams
from .module import TrainingModule
from .run_state import RunState

if TYPE_CHECKING:
    from .trainer import Trainer


def _new_run_id() -> str:
    """A new run id: 12 hex digits."""
    import uuid

    return uuid.uuid4().hex[:12]



class RunTracking(RunState):
    """Trackers and run records glue (a mixin of :class:`~accel_trainer.trainer.Trainer`; ``self`` is the trainer)."""

    def _start_trackers(self: Trainer, module: TrainingModule, resumed_from: Any = None, log_dir: str | None = None) -> None:
        """Start the trackers (main process) in ``log_dir`` (default: the run directory).

        When ``fit`` resumed from a checkpoint of this run directory, the CSV table is first cut
        back to the rows logged before that checkpoint, so no step appears twice.
        """
        self._tracking = True
        self._csv_tracker = None
        if self._trackers or not self.accelerator.is_main_process:
            return
        self._trackers = build_trackers(
            self._log_with, self.project_name, log_dir or self.log_dir, dict(module.hparams)
        )
        if self.run_config:  # the resolved YAML config when started from the command line
            log_hyperparams(self._trackers, self.run_config)
        self._csv_tracker = next((t for t in self._trackers if isinstance(t, CSVTracker)), None)
        if self._csv_tracker is not None:
            if resumed_from is not None and self._is_own_checkpoint(resumed_from):
                self._csv_tracker.truncate(self.state.logged_rows, self.state.global_step)
            self.state.logged_rows = self._csv_tracker.rows

    def _is_own_checkpoint(self: Trainer, ckpt_path: Any) -> bool:
        """Whether ``ckpt_path`` ("last" or a path) lies in this run directory (whose table it continues)."""
        if os.fspath(ckpt_path) == "last":
            return True
        root = os.path.realpath(self.default_root_dir)
        return os.path.realpath(os.fspath(ckpt_path)).startswith(root + os.sep)

    def _log_to_trackers(self: Trainer, values: dict[str, float], step: int) -> None:
        self._logged.update(values)
        for tracker in self._trackers:
            tracker.log(values, step=step)
        if self._csv_tracker is not None:
            self.state.logged_rows = self._csv_tracker.rows

    def _write_run_config(self: Trainer) -> None:
        """``config.yaml`` in the run directory, once the run really starts (main process)."""
        if not self.run_config or not self.is_global_zero:
            return
        import yaml

        path = os.path.join(self.default_root_dir, "config.yaml")
        os.makedirs(self.default_root_dir, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            yaml.safe_dump(self.run_config, f, sort_keys=False, default_flow_style=False)
        os.replace(tmp, path)

    def _status_fields(self: Trainer) -> dict[str, Any]:
        return {
            "command": "fit",
            "run_id": (self._run_record or {}).get("id"),
            "step": self.state.global_step,
            "epoch": self.state.current_epoch,
            "checkpoint": run_records.last_checkpoint(os.path.abspath(self.default_root_dir)),
            "world_size": self.world_size,
        }

    def _begin_run_status(self: Trainer) -> None:
        self._run_started = True
        if self.is_global_zero:
            run_records.write_run_status(self.default_root_dir, "running", **self._status_fields())

    def _update_run_status(self: Trainer) -> None:
        if self._run_started and self.is_global_zero:
            run_records.write_run_status(self.default_root_dir, "running", **self._status_fields())

    def _end_run_status(self: Trainer, status: str, **fields: Any) -> None:
        """The outcome into ``run_status.json``; never masks the run's own error."""
        if not self._run_started or not self.is_global_zero:
            return
        self._run_started = False
        try:
            record = {**self._status_fields(), **fields}
            if record.get("checkpoint"):
                record["checkpoint"] = os.path.abspath(record["checkpoint"])
            if status == "finished":
                record.setdefault("exit_code", 0)
            run_records.write_run_status(self.default_root_dir, status, **record)
        except Exception as err:  # a full disk must not hide why the run ended
            warnings.warn(f"Could not write {run_records.STATUS_FILE}: {err}", UserWarning, stacklevel=2)

    def _stop_reason(self: Trainer) -> str:
        if self.should_stop:
            return "should_stop"
        if self.max_steps >= 0 and self.state.global_step >= self.max_steps:
            return "max_steps"
        return "max_epochs"

    def _say_nothing_to_do(self: Trainer) -> None:
        if not self.is_global_zero:
            return
        limits = [f"max_epochs={self.max_epochs}"] if self.max_epochs is not None else []
        if self.max_steps >= 0:
            limits.append(f"max_steps={self.max_steps}")
        print(
            f"accel_trainer: nothing left to do: the checkpoint is at epoch {self.state.current_epoch}, global_step "
            f"{self.state.global_step}, which already reaches {' / '.join(limits) or 'the end of the run'}"
            f"{' (early stopping)' if self.should_stop else ''}. Raise max_epochs (or max_steps) to train further, "
            "or start over in a new default_root_dir.",
            file=sys.stderr,
            flush=True,
        )

    def _claim_run_directory(self: Trainer) -> None:
        """Lock the run directory (main process), agreed by every rank; then clean a killed run's litter.

        Also starts this run's record (id and configuration fingerprint, written into every
        checkpoint) and tells the preemption watcher which ranks share this host.

        Raises:
            RunDirectoryLocked: on every rank, when another live run holds the directory.
        """
        import socket

        from . import compatibility
        from .run_dir import RunDirectoryLocked, RunLock, clean_stale_temporaries, describe_stale

        acc = self.accelerator
        args = {name: getattr(self, name, None) for name in compatibility.TRAINER_FIELDS}
        args["mixed_precision"] = acc.mixed_precision
        identity = compatibility.run_identity(self.run_config, self._module, args)
        self._run_record = {
            "id": _new_run_id(),
            "fingerprint": compatibility.fingerprint(identity),
            "identity": identity,
        }
        lock, error = None, None
        if acc.is_main_process:
            lock = RunLock(self.default_root_dir, {"run_id": self._run_record["id"]})
            try:
                lock.acquire()
            except RunDirectoryLocked as err:
                error = str(err)
            except OSError as err:
                error = f"Cannot lock the run directory {self.default_root_dir!r}: {err}."
        mine = (socket.gethostname(), os.getpid(), error)
        everyone = self._gather_from_ranks([mine]) if acc.num_processes > 1 else [mine]
        if everyone[0][2]:
            raise RunDirectoryLocked(everyone[0][2])
        self._run_lock = lock
        rank = acc.process_index
        self._preemption.rank = rank
        self._preemption.siblings = [(r, pid) for r, (host, pid, _) in enumerate(everyone) if host == mine[0] and r != rank]
        if lock is not None:
            note = describe_stale(lock)
            dirs = [self.checkpoint_dir] + [cb.dirpath for cb in self.checkpoint_callbacks if cb.dirpath]
            removed = clean_stale_temporaries(self.default_root_dir, dirs)
            if removed:
                names = ", ".join(os.path.relpath(p, self.default_root_dir) for p in removed[:5])
                more = f" and {len(removed) - 5} more" if len(removed) > 5 else ""
                note = (note + "\n" if note else "") + (
                    f"accel_trainer: removed {len(removed)} temporary file(s) a killed run left in "
                    f"{self.default_root_dir}: {names}{more}."
                )
            if note:
                say_safely(note)
        if acc.num_processes > 1:
            collectives.barrier(acc)  # the clean-up is done before any rank reads a checkpoint

    def _release_run_directory(self: Trainer) -> None:
        lock, self._run_lock = self._run_lock, None
        if lock is not None:
            lock.release()


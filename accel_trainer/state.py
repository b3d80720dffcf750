"""The training counters, in one object that round-trips through ``state_dict()``.

Every schedule in accel_trainer is a function of these counters, never of how many times
a hook happened to be called, so restoring this object restores every schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainingState:
    """Counters of a fit.

    Attributes:
        current_epoch: the epoch being trained (0-based); after ``fit`` returns, the number of
            completed epochs.
        global_step: accumulation boundaries passed so far (batches on which the optimizers had
            the chance to step), the same on every rank. 0 during the first batch.
        optimizer_steps: real (not skipped) steps taken by each optimizer.
        batches_done_in_epoch: training batches of ``current_epoch`` already consumed; lets a
            mid-epoch checkpoint resume exactly at the next batch.
        logged_rows: rows the main process had written to the run's ``metrics.csv`` (CSV
            tracker) when this state was saved; a resume drops the rows logged after it, so
            the table never holds a step twice. Not a training counter: 0 on the other
            ranks, and None when unknown (a checkpoint written before it existed).
        validated_at: the ``batches_done_in_epoch`` after which this epoch's latest validation
            run finished (-1: none yet). A checkpoint written between a batch and the validation
            due after it (``ModelCheckpoint(every_n_train_steps)``, preemption) resumes by running
            that validation first; one written at the end of it does not run it again.
        pending_plateau: step-interval ``ReduceLROnPlateau`` steps that are due after this
            batch's validation (indices into ``trainer.lr_schedulers``). They wait for the
            validation of the same batch, as in Lightning; a checkpoint taken in between carries them.
    """

    current_epoch: int = 0
    global_step: int = 0
    optimizer_steps: list[int] = field(default_factory=list)
    batches_done_in_epoch: int = 0
    logged_rows: int | None = 0
    validated_at: int = -1
    pending_plateau: list[int] = field(default_factory=list)

    def reset_for(self, num_optimizers: int) -> None:
        self.current_epoch = 0
        self.global_step = 0
        self.optimizer_steps = [0] * num_optimizers
        self.batches_done_in_epoch = 0
        self.logged_rows = 0
        self.validated_at = -1
        self.pending_plateau.clear()

    def start_epoch(self) -> None:
        """The counters of a new epoch (``current_epoch`` already advanced)."""
        self.batches_done_in_epoch = 0
        self.validated_at = -1

    def state_dict(self) -> dict[str, Any]:
        return {
            "current_epoch": self.current_epoch,
            "global_step": self.global_step,
            "optimizer_steps": list(self.optimizer_steps),
            "batches_done_in_epoch": self.batches_done_in_epoch,
            "logged_rows": self.logged_rows,
            "validated_at": self.validated_at,
            "pending_plateau": list(self.pending_plateau),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current_epoch = int(state["current_epoch"])
        self.global_step = int(state["global_step"])
        # Mutate in place: step hooks registered on the optimizers hold a reference to this list.
        self.optimizer_steps[:] = [int(s) for s in state["optimizer_steps"]]
        self.batches_done_in_epoch = int(state.get("batches_done_in_epoch", 0))
        rows = state.get("logged_rows")
        self.logged_rows = None if rows is None else int(rows)
        self.validated_at = int(state.get("validated_at", -1))
        # in place too: the SchedulerRunner appends to this very list
        self.pending_plateau[:] = [int(i) for i in state.get("pending_plateau", [])]

"""``Callback``: plain objects whose hooks the trainer calls by name.

Hooks carry Lightning 2's names and signatures; each is a documented no-op. The trainer
only calls the hooks a callback overrides (decided once per run), so an unused hook
costs nothing on the per-batch path.
"""

from __future__ import annotations

from typing import Any


class Callback:
    """Base class for callbacks. Override the hooks you need.

    Example:
        >>> class PrintEpoch(Callback):
        ...     def on_train_epoch_end(self, trainer, module):
        ...         print("finished epoch", trainer.current_epoch)
    """

    #: Callbacks that make decisions from monitored metrics (checkpointing, early stopping) run
    #: their ``on_train_epoch_end`` after the epoch schedulers stepped, so a checkpoint written
    #: there resumes exactly. (When validation is not exactly once per epoch, ``ModelCheckpoint``
    #: and ``EarlyStopping`` act in ``on_validation_end`` instead: ``trainer.monitor_at_validation_end``.)
    monitors_metrics: bool = False

    @property
    def state_key(self) -> str:
        """Key of this callback's entry in a checkpoint (unique per class by default)."""
        return type(self).__qualname__

    def state_dict(self) -> dict[str, Any]:
        """What to save in checkpoints."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from ``state_dict()``'s output."""

    def setup(self, trainer: Any, module: Any, stage: str) -> None:
        """Start of fit/validate/test."""

    def teardown(self, trainer: Any, module: Any, stage: str) -> None:
        """End of fit/validate/test."""

    def on_fit_start(self, trainer: Any, module: Any) -> None:
        """After optimizers are prepared."""

    def on_fit_end(self, trainer: Any, module: Any) -> None:
        """At the end of fit."""

    def on_sanity_check_start(self, trainer: Any, module: Any) -> None:
        """Before the sanity validation (``num_sanity_val_steps`` > 0)."""

    def on_sanity_check_end(self, trainer: Any, module: Any) -> None:
        """After the sanity validation."""

    def on_train_start(self, trainer: Any, module: Any) -> None:
        """Before the first training epoch."""

    def on_train_end(self, trainer: Any, module: Any) -> None:
        """After the last training epoch."""

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        """Before the first batch of an epoch."""

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        """After an epoch and its validation (see ``monitors_metrics`` for the ordering)."""

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        """Before each training batch."""

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After each training batch, ``trainer.global_step`` already advanced on a boundary."""

    def on_validation_start(self, trainer: Any, module: Any) -> None:
        """Before a validation run."""

    def on_validation_end(self, trainer: Any, module: Any) -> None:
        """After a validation run (also the sanity check); its metrics are reduced across ranks."""

    def on_validation_epoch_start(self, trainer: Any, module: Any) -> None:
        """Before the first validation batch."""

    def on_validation_epoch_end(self, trainer: Any, module: Any) -> None:
        """After the last validation batch."""

    def on_validation_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Before each validation batch."""

    def on_validation_batch_end(
        self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """After each validation batch."""

    def on_test_start(self, trainer: Any, module: Any) -> None:
        """Before a test run."""

    def on_test_end(self, trainer: Any, module: Any) -> None:
        """After a test run."""

    def on_test_epoch_start(self, trainer: Any, module: Any) -> None:
        """Before the first test batch."""

    def on_test_epoch_end(self, trainer: Any, module: Any) -> None:
        """After the last test batch."""

    def on_test_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Before each test batch."""

    def on_test_batch_end(
        self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """After each test batch."""

    def on_before_backward(self, trainer: Any, module: Any, loss: Any) -> None:
        """Before backward."""

    def on_after_backward(self, trainer: Any, module: Any) -> None:
        """After backward."""

    def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
        """Before ``optimizer_step`` on an accumulation boundary (after gradient clipping)."""

    def on_before_zero_grad(self, trainer: Any, module: Any, optimizer: Any) -> None:
        """In the default ``optimizer_step``, after the step and right before the gradients are zeroed."""

    def on_save_checkpoint(self, trainer: Any, module: Any, checkpoint: dict[str, Any]) -> None:
        """A checkpoint is being saved."""

    def on_load_checkpoint(self, trainer: Any, module: Any, checkpoint: dict[str, Any]) -> None:
        """A checkpoint is being loaded."""

    def on_exception(self, trainer: Any, module: Any, exception: BaseException) -> None:
        """Training raised; called before the exception propagates."""

"""``EarlyStopping``: stop when a monitored metric stops improving."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigurationError
from .base import Callback


class EarlyStopping(Callback):
    """Stop ``fit`` after ``patience`` checks without an improvement of more than ``min_delta``.

    When it checks follows Lightning's rule (``trainer.monitor_at_validation_end``):

    * validation runs exactly once per epoch, at its end (``val_check_interval=1.0``,
      ``check_val_every_n_epoch=1``), or there is no validation: once per epoch, after the
      epoch's validation and its schedulers;
    * otherwise (``check_val_every_n_epoch=N``, ``val_check_interval=0.25`` …): at the end of
      every validation run. An epoch without validation is not a check; a stop decided in
      the middle of an epoch ends that epoch right there.

    ``patience`` counts checks. The metric is the rank-reduced value, so every rank stops at
    the same check.

    Args:
        monitor: the metric to watch.
        min_delta: the smallest change that counts as an improvement.
        patience: checks without improvement before stopping.
        mode: "min" or "max".
        strict: raise when ``monitor`` was never logged (False: warn and do nothing).
        check_finite: stop at once when the metric becomes NaN or infinite.
        stopping_threshold: stop at once when the metric is better than this (Lightning's).
        divergence_threshold: stop at once when the metric is worse than this (Lightning's).
        check_on_train_epoch_end: None (the rule above), True (always once per epoch, after its
            schedulers) or False (always at the end of each validation run), as in Lightning.

    Raises:
        ConfigurationError: for a bad ``mode``, a negative ``patience``, or (strict) a metric never logged.
    """

    monitors_metrics = True

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0.0,
        patience: int = 3,
        mode: str = "min",
        strict: bool = True,
        check_finite: bool = True,
        verbose: bool = False,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
    ) -> None:
        if mode not in ("min", "max"):
            raise ConfigurationError(f"EarlyStopping(mode={mode!r}) is not allowed: expected 'min' or 'max'.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ConfigurationError(f"EarlyStopping(patience={patience!r}) is not allowed: expected an int >= 0.")
        self.monitor = monitor
        self.min_delta = abs(float(min_delta))
        self.patience = patience
        self.mode = mode
        self.strict = strict
        self.check_finite = check_finite
        self.verbose = verbose
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.check_on_train_epoch_end = check_on_train_epoch_end
        self.wait_count = 0
        self.stopped_epoch = 0
        self.best_score = math.inf if mode == "min" else -math.inf
        self.stopping_reason = ""

    @property
    def state_key(self) -> str:
        return f"EarlyStopping{{monitor={self.monitor!r}, mode={self.mode!r}}}"

    def on_validation_end(self, trainer: Any, module: Any) -> None:
        if _acts_after_validation(trainer, self.check_on_train_epoch_end):
            self._check(trainer, epoch=trainer.current_epoch)

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        if self.check_on_train_epoch_end is False or (
            self.check_on_train_epoch_end is None and getattr(trainer, "monitor_at_validation_end", False)
        ):
            return
        # runs after the epoch is counted: current_epoch is the number of completed epochs
        self._check(trainer, epoch=trainer.current_epoch - 1)

    def _check(self, trainer: Any, epoch: int) -> None:
        """One check, during ``epoch`` (0-based)."""
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            if self.strict:
                raise ConfigurationError(
                    f"EarlyStopping(monitor={self.monitor!r}) could not find that metric. Logged metrics: "
                    f"{sorted(metrics)}. Log it, or pass strict=False to ignore."
                )
            return
        value = metrics[self.monitor]
        current = float(value) if isinstance(value, torch.Tensor) else float(value)
        if self.check_finite and not math.isfinite(current):
            self._stop(trainer, epoch, f"{self.monitor} = {current} is not finite")
            return
        better = (lambda a, b: a < b) if self.mode == "min" else (lambda a, b: a > b)
        if self.stopping_threshold is not None and better(current, self.stopping_threshold):
            self._stop(trainer, epoch, f"stopping threshold reached: {self.monitor} = {current:.6g}")
            return
        if self.divergence_threshold is not None and better(-current, -self.divergence_threshold):
            self._stop(trainer, epoch, f"divergence threshold reached: {self.monitor} = {current:.6g}")
            return
        improved = current < self.best_score - self.min_delta if self.mode == "min" else current > self.best_score + self.min_delta
        if improved:
            self.best_score = current
            self.wait_count = 0
            return
        self.wait_count += 1
        if self.wait_count >= self.patience:
            self._stop(
                trainer, epoch, f"{self.monitor} did not improve in the last {self.wait_count} checks (best {self.best_score:.6g})"
            )

    def _stop(self, trainer: Any, epoch: int, reason: str) -> None:
        trainer.should_stop = True
        self.stopped_epoch = epoch  # the 0-based epoch of the check, as in Lightning
        self.stopping_reason = reason
        if self.verbose and trainer.is_global_zero:
            print(f"EarlyStopping: stopping after epoch {self.stopped_epoch}: {reason}.")

    def state_dict(self) -> dict[str, Any]:
        return {"wait_count": self.wait_count, "stopped_epoch": self.stopped_epoch, "best_score": self.best_score, "patience": self.patience}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wait_count = int(state_dict["wait_count"])
        self.stopped_epoch = int(state_dict["stopped_epoch"])
        self.best_score = float(state_dict["best_score"])


def _acts_after_validation(trainer: Any, on_train_epoch_end: bool | None) -> bool:
    """Whether a monitoring callback acts in this ``on_validation_end``: only during fit (not the
    sanity check, ``validate()``, ``test()``), then by the trainer's rule unless overridden."""
    if on_train_epoch_end is None:
        return bool(getattr(trainer, "monitor_at_validation_end", False))
    return not on_train_epoch_end and getattr(trainer, "training", False) and not getattr(trainer, "sanity_checking", False)

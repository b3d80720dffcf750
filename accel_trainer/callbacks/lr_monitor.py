"""``LearningRateMonitor``: every optimizer's param-group learning rates into the logs."""

from __future__ import annotations

from collections import Counter
from typing import Any

from ..errors import ConfigurationError
from .base import Callback


class LearningRateMonitor(Callback):
    """Log the learning rate each optimizer will use for its next step (warm-up included).

    Names follow Lightning: ``lr-{name or OptimizerClass}``, ``-{k}`` appended when two
    optimizers share a name, ``/pg{i}`` for param groups after the first.

    Args:
        logging_interval: "step" (every ``log_every_n_steps``), "epoch", or None (step when
            any scheduler is step-interval, else epoch).
        log_momentum: also log ``momentum``/``betas[0]``.
    """

    def __init__(self, logging_interval: str | None = None, log_momentum: bool = False) -> None:
        if logging_interval not in (None, "step", "epoch"):
            raise ConfigurationError(
                f"LearningRateMonitor(logging_interval={logging_interval!r}) is not allowed: expected None, 'step' or 'epoch'."
            )
        self.logging_interval = logging_interval
        self.log_momentum = log_momentum
        self.names: list[str] = []
        self.history: list[dict[str, float]] = []

    def on_train_start(self, trainer: Any, module: Any) -> None:
        self.names = self._names(trainer)
        if self.logging_interval is None:
            self._interval = "step" if any(c.interval == "step" for c in trainer.lr_schedulers) else "epoch"
        else:
            self._interval = self.logging_interval

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        if self._interval == "epoch":
            self._log(trainer)

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        if self._interval == "step" and trainer.global_step % trainer.log_every_n_steps == 0:
            if getattr(self, "_last_logged_step", None) != trainer.global_step:
                self._last_logged_step = trainer.global_step
                self._log(trainer)

    def _names(self, trainer: Any) -> list[str]:
        sched_names = {c.opt_idx: c.name for c in trainer.lr_schedulers if c.name}
        bases = []
        for i, opt in enumerate(trainer.optimizers):
            inner = getattr(opt, "optimizer", opt)
            bases.append(sched_names.get(i) or f"lr-{type(inner).__name__}")
        counts, seen, names = Counter(bases), Counter(), []
        for base in bases:
            if counts[base] > 1:
                names.append(f"{base}-{seen[base]}")
                seen[base] += 1
            else:
                names.append(base)
        return names

    def current_lrs(self, trainer: Any) -> dict[str, float]:
        values: dict[str, float] = {}
        for i, opt in enumerate(trainer.optimizers):
            lrs = trainer._step_tracker.effective_lrs(i, opt)
            for g, lr in enumerate(lrs):
                key = self.names[i] if g == 0 else f"{self.names[i]}/pg{g + 1}"
                values[key] = lr
                if self.log_momentum:
                    group = opt.param_groups[g]
                    momentum = group.get("momentum", group.get("betas", (None,))[0])
                    if momentum is not None:
                        values[key.replace("lr-", "momentum-", 1)] = float(momentum)
        return values

    def _log(self, trainer: Any) -> None:
        values = self.current_lrs(trainer)
        self.history.append({"step": trainer.global_step, "epoch": trainer.current_epoch, **values})
        trainer.log_to_trackers(values)

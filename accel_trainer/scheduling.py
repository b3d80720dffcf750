"""When each optimizer counts a step, and when each scheduler advances.

Two mechanisms, both driven by explicit counters in :class:`~accel_trainer.state.TrainingState`:

* :class:`StepTracker` hangs a pre- and a post-hook on every torch optimizer. The post-hook
  runs only when the optimizer's own ``step`` really ran, so a step the fp16 ``GradScaler``
  skipped (it never calls ``step`` on overflow) or one a user's ``optimizer_step`` override
  decided not to take is never counted. The pre-hook applies the declarative warm-up for the
  duration of that one step only, so the scheduler keeps seeing (and compounding) its own
  learning rate and the warm-up composes multiplicatively with any scheduler, including
  ``ReduceLROnPlateau``.
* :class:`SchedulerRunner` decides when schedulers step: step-interval ones after every
  ``frequency``-th *real* step of their optimizer, epoch-interval ones after every
  ``frequency``-th epoch, plateau ones with the (already rank-reduced) monitored metric.
  A step-interval plateau scheduler that is due waits for the end of its batch (after the
  validation ``val_check_interval`` runs on that batch, as Lightning orders it), so it sees
  the value of a validation that ran on the same batch, not the one before.
  It steps the user's scheduler exactly once per due step, whatever the number of
  processes (Accelerate's wrapper would step it ``num_processes`` times).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from .errors import ConfigurationError
from .optim import SchedulerConfig, unwrap_optimizer

if TYPE_CHECKING:  # pragma: no cover
    from .state import TrainingState


def warmup_factor(step_index: int, warmup_steps: int | None) -> float:
    """The seed's warm-up as a pure function: the multiplier for the k-th real step (k from 0)."""
    if not warmup_steps:
        return 1.0
    return min(1.0, (step_index + 1) / warmup_steps)


class StepTracker:
    """Counts the real steps of each optimizer and applies per-optimizer warm-up.

    Args:
        optimizers: the (prepared or raw) optimizers, in ``configure_optimizers`` order.
        state: the training state whose ``optimizer_steps`` list is incremented in place.
        warmup_steps: per optimizer, the warm-up length or ``None``.
    """

    def __init__(self, optimizers: list, state: TrainingState, warmup_steps: list[int | None]) -> None:
        self._state = state
        self._optimizers = list(optimizers)
        self._paused = False
        self._warmup = list(warmup_steps)
        self._saved_lrs: list[list[float] | None] = [None] * len(optimizers)
        self._handles = []
        for i, opt in enumerate(optimizers):
            raw = unwrap_optimizer(opt)
            if not hasattr(raw, "_optimizer_step_post_hooks"):
                # DeepSpeed's optimizer wrapper: torch's step hooks are not set up on it, and its
                # step() is a no-op marking the step the engine already took inside backward.
                # Count that call unless the engine skipped the step (fp16 overflow). The warm-up
                # is applied around the backward that takes the real step (warmup_applied).
                self._handles.append(_CountingStep(raw, self._make_post_hook(i)))
                continue
            if self._warmup[i]:  # the pre-hook only applies a warm-up: none, no hook to call
                self._handles.append(raw.register_step_pre_hook(self._make_pre_hook(i)))
            self._handles.append(raw.register_step_post_hook(self._make_post_hook(i)))

    def _make_pre_hook(self, i: int) -> Callable:
        def pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if self._paused:
                return
            factor = warmup_factor(self._state.optimizer_steps[i], self._warmup[i])
            if factor != 1.0:
                self._saved_lrs[i] = [g["lr"] for g in optimizer.param_groups]
                for g in optimizer.param_groups:
                    g["lr"] = _scale(g["lr"], factor)

        return pre_hook

    def _make_post_hook(self, i: int) -> Callable:
        def post_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if self._paused:
                return
            saved = self._saved_lrs[i]
            if saved is not None:
                # Restore the scheduler's own value: it must not compound the warm-up factor.
                for g, lr in zip(optimizer.param_groups, saved):
                    g["lr"] = lr
                self._saved_lrs[i] = None
            self._state.optimizer_steps[i] += 1

        return post_hook

    @contextlib.contextmanager
    def warmup_applied(self, i: int) -> Iterator[None]:
        """Optimizer ``i``'s warm-up factor on its learning rates for the duration of the block.

        For engines that take the real optimizer step inside backward (DeepSpeed): the
        pre-hook would fire only at the wrapper's no-op ``step()``, after the real one. The
        factor is that of the next real step (``optimizer_steps[i]`` is not yet advanced), and
        the scheduler's own learning rates are restored afterwards, as the post-hook does.
        """
        factor = warmup_factor(self._state.optimizer_steps[i], self._warmup[i])
        if factor == 1.0:
            yield
            return
        groups = unwrap_optimizer(self._optimizers[i]).param_groups
        saved = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = _scale(g["lr"], factor)
        try:
            yield
        finally:
            for g, lr in zip(groups, saved):
                g["lr"] = lr

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Neither count steps nor apply warm-up meanwhile (for steps that are not training steps).

        torch's sharded-state API initialises an optimizer without state by a zero-lr step;
        during a checkpoint save that step must leave ``optimizer_steps`` alone.
        """
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def effective_lrs(self, i: int, optimizer: torch.optim.Optimizer) -> list[float]:
        """The learning rates optimizer ``i``'s next real step will use (warm-up applied)."""
        factor = warmup_factor(self._state.optimizer_steps[i], self._warmup[i])
        return [float(g["lr"]) * factor for g in unwrap_optimizer(optimizer).param_groups]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class _CountingStep:
    """Calls ``post_hook`` after each ``optimizer.step()`` the optimizer did not skip; ``remove()`` undoes it."""

    def __init__(self, optimizer: Any, post_hook: Callable) -> None:
        self._optimizer = optimizer
        original = optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            if not getattr(optimizer, "step_was_skipped", False):
                post_hook(optimizer, args, kwargs)
            return result

        self._step = optimizer.step = step

    def remove(self) -> None:
        if vars(self._optimizer).get("step") is self._step:
            del self._optimizer.step


def _scale(lr: Any, factor: float) -> Any:
    # A tensor learning rate (capturable/fused optimizers) is scaled out of place so the saved
    # value is not mutated underneath us.
    return lr * factor


class SchedulerRunner:
    """Steps schedulers when they are due.

    Args:
        configs: every parsed scheduler config (``scheduler`` already prepared).
        num_optimizers: how many optimizers there are.
        step_fn: ``module.lr_scheduler_step(scheduler, metric)``.
        metrics: a callable returning the current ``callback_metrics`` mapping.
        pending_plateau: where due step-interval plateau steps wait (indices into ``configs``)
            until :meth:`flush_pending`; the trainer passes ``TrainingState.pending_plateau`` so
            a checkpoint carries them. ``None``: they step at once (the LR-schedule simulator,
            which runs no validation).
    """

    def __init__(
        self,
        configs: list[SchedulerConfig],
        num_optimizers: int,
        step_fn: Callable[[Any, Any], None],
        metrics: Callable[[], dict],
        pending_plateau: list[int] | None = None,
    ) -> None:
        self.configs = configs
        self._step_fn = step_fn
        self._metrics = metrics
        self._pending = pending_plateau
        self._index = {id(cfg): i for i, cfg in enumerate(configs)}
        self.step_schedulers: list[list[SchedulerConfig]] = [[] for _ in range(num_optimizers)]
        self.epoch_schedulers: list[SchedulerConfig] = []
        # whether each scheduler is a plateau one, decided once (the type of a scheduler never
        # changes; asking every step unwraps Accelerate's wrapper twice per step)
        self._plateau = {id(cfg): cfg.reduce_on_plateau for cfg in configs}
        self._by_optimizer: list[list[tuple[SchedulerConfig, bool]]] = [[] for _ in range(num_optimizers)]
        for cfg in configs:
            if cfg.interval == "step":
                self.step_schedulers[cfg.opt_idx].append(cfg)
                self._by_optimizer[cfg.opt_idx].append((cfg, self._plateau[id(cfg)]))
            else:
                self.epoch_schedulers.append(cfg)

    def every_step(self, opt_idx: int, direct: bool) -> list | None:
        """The schedulers to step after each real step of optimizer ``opt_idx``, when that is all there is to it.

        That is the usual case: step-interval schedulers with ``frequency`` 1, not plateau ones,
        stepped through the default ``lr_scheduler_step`` (``direct``): the trainer then steps
        them itself, without the two calls of :meth:`after_optimizer_steps` per step. Their
        Accelerate wrapper is skipped too (set to ``step_with_optimizer=False``, it only calls
        its scheduler's ``step``). ``None``: use :meth:`after_optimizer_steps`.
        """
        found = []
        for cfg, plateau in self._by_optimizer[opt_idx]:
            if plateau or cfg.frequency != 1 or not direct:
                return None
            scheduler = cfg.scheduler
            if type(scheduler).__name__ == "AcceleratedScheduler":
                if getattr(scheduler, "step_with_optimizer", True):
                    return None
                scheduler = scheduler.scheduler
            found.append(scheduler)
        return found

    def after_optimizer_steps(self, opt_idx: int, steps_before: int, steps_after: int) -> None:
        """Advance optimizer ``opt_idx``'s step schedulers for each real step just taken."""
        schedulers = self._by_optimizer[opt_idx]
        if not schedulers:
            return
        for n in range(steps_before + 1, steps_after + 1):
            for cfg, plateau in schedulers:
                if n % cfg.frequency == 0:
                    if plateau and self._pending is not None:
                        self._pending.append(self._index[id(cfg)])
                    elif plateau:
                        self._step(cfg)
                    else:
                        self._step_fn(cfg.scheduler, None)

    def flush_pending(self) -> None:
        """Step the plateau schedulers that came due during this batch, with the current metrics."""
        pending = self._pending
        if pending:
            due = list(pending)
            pending.clear()
            for i in due:
                self._step(self.configs[i])

    def after_epoch(self, completed_epochs: int) -> None:
        """Advance epoch-interval schedulers after the ``completed_epochs``-th epoch."""
        for cfg in self.epoch_schedulers:
            if completed_epochs % cfg.frequency == 0:
                self._step(cfg)

    def _step(self, cfg: SchedulerConfig) -> None:
        metric = None
        plateau = self._plateau.get(id(cfg))
        if plateau is None:
            plateau = cfg.reduce_on_plateau
        if plateau:
            metrics = self._metrics()
            if cfg.monitor not in metrics:
                available = sorted(metrics)
                msg = (
                    f"ReduceLROnPlateau (scheduler of optimizer {cfg.opt_idx}) monitors {cfg.monitor!r}, which was "
                    f"never logged. Logged metrics: {available}. Log it with self.log({cfg.monitor!r}, ...) or set "
                    "'monitor' to one of these"
                )
                if cfg.strict:
                    raise ConfigurationError(msg + ", or set 'strict': False to skip the step with a warning.")
                warnings.warn(msg + "; the scheduler step is skipped ('strict': False).", UserWarning, stacklevel=2)
                return
            value = metrics[cfg.monitor]
            metric = float(value) if isinstance(value, torch.Tensor) else value
        self._step_fn(cfg.scheduler, metric)

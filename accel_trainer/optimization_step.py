# mypy: disable-error-code="misc"
# (the mixin methods declare ``self: Trainer`` so that mypy checks them against the trainer's
# attributes; mypy reports such a self-type, a subclass of the mixin, as [misc]: silenced here)
"""One batch's optimization: toggling, forward/backward, loss extraction, clipping, the step.

This is the per-batch hot path (issue 16 made it lean: hooks resolved once, direct calls when
the dispatcher is bare, no device-to-host read per step), so it lives on its own, with
everything it needs read once into locals, apart from the loop's bookkeeping.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from . import collectives
from .errors import ConfigurationError, TrainingError
from .hooks import _overrides
from .internals import direct_optimizer
from .module import TrainingModule
from .run_state import RunState

if TYPE_CHECKING:
    from .trainer import Trainer

# torch's global module hooks: when any is set, training_step must go through the dispatcher's __call__
from .internals import GLOBAL_BACKWARD_HOOKS as _GLOBAL_BACKWARD  # noqa: E402
from .internals import GLOBAL_BACKWARD_PRE_HOOKS as _GLOBAL_BACKWARD_PRE  # noqa: E402
from .internals import GLOBAL_FORWARD_HOOKS as _GLOBAL_POST  # noqa: E402
from .internals import GLOBAL_FORWARD_PRE_HOOKS as _GLOBAL_PRE  # noqa: E402


class _Closure:
    """The ``second_order_closure`` handed to ``optimizer_step``.

    The forward/backward of this batch already ran before ``optimizer_step``, so the first
    call returns that loss without recomputing; later calls (LBFGS re-evaluations) zero the
    gradients and run ``training_step`` and backward again.

    On several processes the loss handed back is the mean over ranks: LBFGS decides from the
    loss value (line search, ``tolerance_change``), and its gradients are already the DDP
    mean, so a rank-local loss would let ranks pick different step sizes or a different
    number of re-evaluations -- diverged parameters, or a collective that never matches.
    """

    __slots__ = ("_trainer", "_batch", "_batch_idx", "_opt_idx", "_loss")

    def __init__(self, trainer: Trainer, batch: Any, batch_idx: int, opt_idx: int, loss: torch.Tensor | None) -> None:
        self._trainer, self._batch, self._batch_idx, self._opt_idx, self._loss = trainer, batch, batch_idx, opt_idx, loss

    def __call__(self) -> torch.Tensor:
        trainer = self._trainer
        loss: torch.Tensor | None
        if self._loss is not None:
            loss, self._loss = self._loss, None
        else:
            with torch.enable_grad():
                trainer._optimizers[self._opt_idx].zero_grad()
                loss = trainer._forward_backward(self._batch, self._batch_idx, self._opt_idx)
                if loss is None:
                    raise TrainingError("training_step returned None inside an optimizer closure; a closure needs a loss.")
                loss = loss.detach()
                if not math.isfinite(float(loss)):  # the optimizer reads it anyway; a step under way cannot be skipped
                    raise TrainingError(
                        f"training_step returned a non-finite loss ({float(loss)}) when optimizer {self._opt_idx}'s "
                        f"closure re-evaluated it during its step, at epoch {trainer.state.current_epoch}, batch_idx "
                        f"{self._batch_idx}: a step already under way cannot be skipped. Lower the learning rate or "
                        "the optimizer's step size (LBFGS: lr, max_iter, line_search_fn='strong_wolfe')."
                    )
                trainer._clip_gradients(self._opt_idx)
        if trainer.accelerator.num_processes > 1:
            loss = collectives.mean_over_ranks(trainer.accelerator, loss.detach().clone())
        return loss



def _mark_stepped(optimizers: list, steps: list[int]) -> None:
    """Tell torch's schedulers that the optimizers which stepped before a checkpoint did step.

    A resumed run may step a scheduler before its optimizer's first step in this process (a
    plateau step still due after the checkpoint's batch, an epoch scheduler after a batch that
    skipped that optimizer); torch would then warn "lr_scheduler.step() before optimizer.step()",
    wrongly: nothing of the schedule is skipped. torch sets the same flag on every real step.
    """
    from .internals import mark_optimizer_stepped
    from .optim import unwrap_optimizer

    for optimizer, count in zip(optimizers, steps):
        if count:
            mark_optimizer_stepped(unwrap_optimizer(optimizer))



def _scheduler_step_function(module: TrainingModule) -> Callable[[Any, Any], None]:
    """``module.lr_scheduler_step``, or the same steps without two layers of calls when it is not overridden.

    ``TrainingModule.lr_scheduler_step`` calls ``scheduler.step()`` (or ``step(metric)``), and the
    prepared scheduler, an ``AcceleratedScheduler`` that the trainer set to
    ``step_with_optimizer=False``, then only calls its own scheduler's ``step``: that call is
    made directly (it runs after every optimizer step with a step-interval scheduler).
    """
    hook = module.lr_scheduler_step
    if _overrides(module, "lr_scheduler_step"):
        return hook
    try:
        from accelerate.scheduler import AcceleratedScheduler
    except ImportError:  # pragma: no cover
        return hook

    def step(scheduler: Any, metric: Any) -> None:
        if type(scheduler) is AcceleratedScheduler and not scheduler.step_with_optimizer:
            scheduler = scheduler.scheduler
        if metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)

    return step



class OptimizationStep(RunState):
    """Runs the optimizers due on one batch (a mixin of :class:`~accel_trainer.trainer.Trainer`; ``self`` is the trainer)."""

    def _train_batch(self: Trainer, batch: Any, batch_idx: int, is_boundary: bool) -> Any:
        if not self._automatic or not self._optimizers:
            # manual optimization, or configure_optimizers returned None (forward passes only)
            self.accelerator.sync_gradients = True
            self._last_output = self._wrapped("training_step", batch, batch_idx)
            return self._last_output
        accelerator = self.accelerator
        if self._gradient_state.sync_gradients is not is_boundary:  # Accelerate's setter, only on a change
            accelerator.sync_gradients = is_boundary
        self._batch_idx = batch_idx
        outputs = None
        # the optimizers this batch steps (plan.py's rule; without frequencies, all of them at every step)
        due = self._fixed_optimizers or self._cycle.due(self.state.global_step)
        try:
            if is_boundary or self._one_process:
                # no no_sync contexts to enter: skip building an ExitStack on every batch
                for opt_idx in due:
                    outputs = self._optimize(batch, batch_idx, opt_idx, is_boundary)
            else:
                with contextlib.ExitStack() as context:
                    for wrapper in self._unique_wrappers:
                        context.enter_context(accelerator.no_sync(wrapper))
                    for opt_idx in due:
                        outputs = self._optimize(batch, batch_idx, opt_idx, is_boundary)
        finally:
            if self._toggle is not None:
                self._toggle.restore()  # every flag back as it was, for what runs between batches
        guard = self._guard
        assert guard is not None  # automatic optimization with optimizers (_setup_optimization)
        if guard.deferred:
            guard.end_batch(self._where)  # accelerators: start copying this batch's flags to the host
        return outputs


    def _lean_batch_step(self: Trainer) -> Callable[[Any, int, bool], Any] | None:
        """:meth:`_train_batch_lean` when this run is the one it covers, else None (the general path).

        It covers the commonest run: one process, automatic optimization with one optimizer and
        its default ``optimizer_step``/``optimizer_zero_grad``, no accumulation, clipping or
        per-step hooks, ``training_step`` called directly (no autocast or DDP wrapper), and a
        prepared optimizer whose ``step``/``zero_grad`` only forward to torch's
        (:func:`~accel_trainer.internals.direct_optimizer`). Decided once per epoch.
        """
        if not (
            self._automatic
            and len(self._optimizers) == 1
            and self._fixed_optimizers is not None
            and self._one_process
            and self.gradient_accumulation_steps == 1
            and self._call_directly
            and self._direct_backward
            and self._plain_step[0]
            and self._default_zero_grad
            and self.gradient_clip_val is None
            and self._toggle is None
        ):
            return None
        hooks = (self._on_before_backward, self._on_after_backward, self._on_before_optimizer_step, self._on_before_zero_grad)
        guard = self._guard
        if any(h is not None for h in hooks) or guard is None or guard.poison_backward:
            return None
        if direct_optimizer(self._optimizers[0]) is None:
            return None
        return self._train_batch_lean

    def _train_batch_lean(self: Trainer, batch: Any, batch_idx: int, is_boundary: bool) -> Any:
        """:meth:`_train_batch` with :meth:`_optimize` and :meth:`_forward_backward` inlined for the run
        :meth:`_lean_batch_step` describes: the same calls in the same order, minus the branches
        that cannot apply and two call layers (issue 16: the fixed per-step cost)."""
        if _GLOBAL_PRE or _GLOBAL_POST or _GLOBAL_BACKWARD_PRE or _GLOBAL_BACKWARD or not is_boundary:
            return self._train_batch(batch, batch_idx, is_boundary)  # a global module hook appeared: the full path
        if self._gradient_state.sync_gradients is not True:
            self.accelerator.sync_gradients = True
        self._batch_idx = batch_idx
        output = self._last_output = self._module.training_step(batch, batch_idx)  # type: ignore[union-attr]
        loss: torch.Tensor | None
        if type(output) is torch.Tensor and output.requires_grad and output.numel() == 1:
            loss = output
        else:
            loss = self._extract_loss(output, 0)
        guard = self._guard
        assert guard is not None  # _lean_batch_step checked
        if loss is not None:
            loss.backward()
            self._last_losses[0] = loss
            self._last_loss = loss
            wrapper = self._optimizers[0]
            if guard.check_step(0, loss, self._where):
                wrapper.zero_grad()  # on_nonfinite_loss="skip": no step; its gradients must not reach the next one
            else:
                optimizer = wrapper.optimizer  # FastAcceleratedOptimizer's step/zero_grad, called directly
                steps = self.state.optimizer_steps
                before = steps[0]
                optimizer.step()
                if wrapper._accel_trainer_set_to_none:
                    optimizer.zero_grad(set_to_none=True)
                else:
                    optimizer.zero_grad()
                after = steps[0]
                if after != before:
                    every_step = self._every_step[0]
                    if every_step is not None and after == before + 1:
                        for scheduler in every_step:
                            scheduler.step()
                    else:
                        assert self._runner is not None  # set by fit
                        self._runner.after_optimizer_steps(0, before, after)
        if guard.deferred:
            guard.end_batch(self._where)
        return output

    def _optimize(self: Trainer, batch: Any, batch_idx: int, opt_idx: int, is_boundary: bool) -> Any:
        if self._toggle is not None:
            self._toggle.enter(opt_idx)  # only optimizer opt_idx's parameters require grad
        guard, module = self._guard, self._module
        assert guard is not None and module is not None  # automatic optimization (_setup_optimization)
        loss = self._forward_backward(batch, batch_idx, opt_idx)
        if loss is None:
            return self._last_output
        if not is_boundary:
            guard.check_loss(opt_idx, loss, self._where)
            return self._last_output
        optimizer = self._optimizers[opt_idx]
        if guard.check_step(opt_idx, loss, self._where):
            # on_nonfinite_loss="skip": no step; its gradients must not reach the next one
            optimizer.zero_grad()
            return self._last_output
        if self.gradient_clip_val is not None:
            self._clip_gradients(opt_idx)
        if self._on_before_optimizer_step is not None:
            self._on_before_optimizer_step(optimizer)
        steps = self.state.optimizer_steps
        before = steps[opt_idx]
        if self._plain_step[opt_idx]:
            # TrainingModule.optimizer_step's own body (not overridden, no closure needed), inlined:
            # it runs on every step
            optimizer.step()
            if self._on_before_zero_grad is not None:
                self._on_before_zero_grad(optimizer)
            if self._default_zero_grad:
                optimizer.zero_grad()  # TrainingModule.optimizer_zero_grad's body
            else:
                module.optimizer_zero_grad(self.state.current_epoch, batch_idx, optimizer)
        else:
            closure = _Closure(self, batch, batch_idx, opt_idx, loss.detach())
            module.optimizer_step(self.state.current_epoch, batch_idx, optimizer, opt_idx, closure)
        after = steps[opt_idx]
        if after != before:
            every_step = self._every_step[opt_idx]
            if every_step is not None and after == before + 1:
                for scheduler in every_step:  # SchedulerRunner's usual case, without its two calls
                    scheduler.step()
            else:
                assert self._runner is not None  # set by fit
                self._runner.after_optimizer_steps(opt_idx, before, after)
        return self._last_output

    def _where(self: Trainer) -> dict[str, Any]:
        """Where the loop is, for the non-finite guard's messages."""
        return {
            "epoch": self.state.current_epoch,
            "batch_idx": self._batch_idx,
            "main_process": self.accelerator.is_main_process,
        }

    def _forward_backward(self: Trainer, batch: Any, batch_idx: int, opt_idx: int) -> torch.Tensor | None:
        args = (batch, batch_idx, opt_idx) if self._pass_optimizer_idx else (batch, batch_idx)
        module, guard = self._module, self._guard
        assert module is not None and guard is not None  # automatic optimization (_setup_optimization)
        if self._call_directly and not (_GLOBAL_PRE or _GLOBAL_POST or _GLOBAL_BACKWARD_PRE or _GLOBAL_BACKWARD):
            # the dispatcher is not wrapped (one process, no autocast) and has no hooks: its
            # nn.Module __call__ would only forward the call (~3 µs per step saved)
            output = module.training_step(*args)
        else:
            output = self._wrappers[opt_idx]("training_step", *args)
        self._last_output = output
        loss: torch.Tensor | None
        if type(output) is torch.Tensor and output.requires_grad and output.numel() == 1:
            loss = output  # the usual case, checked in three attribute reads
        else:
            loss = self._extract_loss(output, opt_idx)
            if loss is None:
                return None
        # Nothing is read back here: the non-finite guard checks the loss (and, before the
        # optimizer steps, the gradients) on the device (accel_trainer/nonfinite.py).
        if self._on_before_backward is not None:
            self._on_before_backward(loss)
        if guard.poison_backward:  # DDP "skip": a non-finite loss seeds its backward with NaN
            self.accelerator.backward(loss, **guard.backward_kwargs(loss))
        elif self._direct_backward:
            loss.backward()
        elif self._engine.step_inside_backward and self.accelerator.sync_gradients and self._automatic:
            # DeepSpeed takes the optimizer step inside this backward: the warm-up goes around it
            assert self._step_tracker is not None  # set by fit
            with self._step_tracker.warmup_applied(opt_idx):
                self.accelerator.backward(loss)
        else:
            self.accelerator.backward(loss)
        if self._on_after_backward is not None:
            self._on_after_backward()
        # kept as returned (detached only when shown): the graph is kept alive by _last_output anyway
        self._last_losses[opt_idx] = loss
        self._last_loss = loss
        return loss

    def _nonfinite_is_fatal(self: Trainer) -> bool:
        return self.on_nonfinite_loss == "raise"

    def _settle_nonfinite(self: Trainer) -> None:
        """Read the non-finite flags still in flight (accelerators, "raise"): before saves, validation, epoch ends."""
        guard = self._guard
        if guard is not None:
            guard.flush()

    def _extract_loss(self: Trainer, output: Any, opt_idx: int) -> torch.Tensor | None:
        if output is None:
            return None
        if isinstance(output, torch.Tensor):
            loss = output
        elif isinstance(output, dict):
            if "loss" not in output:
                raise ConfigurationError(
                    f"training_step returned a dict without a 'loss' key (keys: {sorted(output)}). Return a scalar "
                    "loss tensor, a dict with 'loss', or None to skip this optimizer for this batch."
                )
            self._log_legacy_dicts(output)
            loss = output["loss"]
            if loss is None:
                return None
            if not isinstance(loss, torch.Tensor):
                raise ConfigurationError(f"training_step returned {{'loss': {type(loss).__name__}}}; 'loss' must be a tensor.")
        else:
            raise ConfigurationError(
                f"training_step returned a {type(output).__name__}. Return a scalar loss tensor, a dict with "
                "'loss', or None to skip this optimizer for this batch."
            )
        if loss.numel() != 1:
            raise ConfigurationError(
                f"training_step must return a scalar loss; received a tensor of shape {tuple(loss.shape)} "
                f"(optimizer {opt_idx}). Reduce it, e.g. loss.mean()."
            )
        if not loss.requires_grad:
            raise ConfigurationError(
                f"The loss returned by training_step (optimizer {opt_idx}) does not require grad: it was detached, "
                "computed under torch.no_grad(), or depends only on parameters that optimizer "
                f"{opt_idx} does not own (those are frozen while it trains)."
            )
        return loss

    def _log_legacy_dicts(self: Trainer, output: dict) -> None:
        """Lightning 0.7's ``{"loss": ..., "log": {...}, "progress_bar": {...}}``."""
        metrics = self.metric_collector
        assert metrics is not None  # set by _attach
        logs = output.get("log")
        if isinstance(logs, dict):
            for name, value in logs.items():
                if isinstance(value, (torch.Tensor, int, float)):
                    metrics.log(name, value)
        bar = output.get("progress_bar")
        if isinstance(bar, dict):
            for name, value in bar.items():
                if isinstance(value, (torch.Tensor, int, float)):
                    metrics.progress_bar_metrics[name] = value

    def _clip_gradients(self: Trainer, opt_idx: int) -> None:
        if self.gradient_clip_val is None:
            return
        self._engine.clip_gradients(
            self._optimizers[opt_idx], self._optimizer_params[opt_idx], self._wrapped, len(self._optimizers),
            self.gradient_clip_val, self.gradient_clip_algorithm,
        )


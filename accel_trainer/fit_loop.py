# mypy: disable-error-code="misc"
# (the mixin methods declare ``self: Trainer`` so that mypy checks them against the trainer's
# attributes; mypy reports such a self-type, a subclass of the mixin, as [misc]: silenced here)
"""The fit loop: epochs, batches, accumulation boundaries, validation inside the epoch, epoch ends.

Kept apart from the trainer's facade so that the loop reads in one place, as the seed's
pseudocode and the "where every hook fires" outline in :mod:`accel_trainer.trainer` do. The
rules it follows (boundaries, which optimizers are due, the validation interval) come from
:mod:`accel_trainer.plan`, which the learning-rate preview follows too. One batch's
optimization is :mod:`accel_trainer.optimization_step`; validation runs are
:mod:`accel_trainer.evaluation`.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import checkpoint as ckpt_io
from . import data as data_utils
from .launching import say_safely
from .plan import is_accumulation_boundary, validation_interval
from .preemption import Preempted, exit_code_for
from .run_state import RunState

if TYPE_CHECKING:
    from .trainer import Trainer

_EXHAUSTED = object()


@dataclass
class _Epoch:
    """One epoch's plan, fixed at its start (see :mod:`accel_trainer.plan` for the rules)."""

    index: int
    n_batches: int | None  # batches it trains (None: unknown length)
    limit: int | float  # the limit_train_batches bound
    val_every: int | None  # validation every this many batches inside it (None: at its end only)
    validate: bool  # whether it validates at all (check_val_every_n_epoch)
    skip: int  # batches already trained before a mid-epoch resume
    iterator: Iterator[Any]
    progress: Any  # its progress bar, or None


class FitLoop(RunState):
    """The epoch/batch loop of ``Trainer.fit`` (a mixin of :class:`~accel_trainer.trainer.Trainer`; ``self`` is the trainer)."""

    def _fit_loop(self: Trainer) -> None:
        while not self._done():
            if self._run_train_epoch():
                # stopped inside an epoch (max_steps): the epoch end did not write last.ckpt
                self._save_last()
                break

    def _done(self: Trainer) -> bool:
        if self.should_stop:
            return True
        if self.max_steps is not None and self.max_steps >= 0 and self.state.global_step >= self.max_steps:
            return True
        return self.max_epochs is not None and self.state.current_epoch >= self.max_epochs

    def _run_train_epoch(self: Trainer) -> bool:
        """One epoch. Returns True when ``max_steps`` ended it before its last batch."""
        epoch = self._begin_train_epoch()
        stopped_by_steps = self._train_batches(epoch)
        self._settle_nonfinite()
        if stopped_by_steps:
            # A max_steps stop inside an epoch is a pause, not an epoch end: the position is kept
            # so that resuming with a larger max_steps continues this very epoch.
            self._close_progress(epoch.progress)
            self._progress_bar = None
            self._end_train_epoch_metrics()
            return True
        self._end_train_epoch(epoch)
        return False

    def _begin_train_epoch(self: Trainer) -> _Epoch:
        """``on_train_epoch_start``, then this epoch's plan and batch iterator (resumed mid-epoch when restored)."""
        state, metrics, loader = self.state, self.metric_collector, self._train_loader
        assert metrics is not None  # set by _attach
        index = state.current_epoch
        n_batches, limit = self._batches_per_epoch()
        val_every = validation_interval(self.val_check_interval, n_batches)
        validate = self._validates_in_epoch(index)
        metrics.stage = "train"
        metrics.epoch = index
        metrics.reset_stage("train")
        self._hooks("on_train_epoch_start")
        self._warn_if_no_step_logging(n_batches)
        self._epoch_first_step = state.global_step
        self._logged_steps_in_epoch = False
        skip = state.batches_done_in_epoch
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(index)
        if self._resume is None:  # the usual case: the loader's own iterator, no generator in between
            self._epoch_start = ckpt_io.capture_epoch_start(loader)
            iterator: Iterator[Any] = iter(loader)
        else:
            iterator = iter(self._epoch_iterator(loader, skip))
        progress = self._progress_bar = self._progress(n_batches, index, skip)
        return _Epoch(index, n_batches, limit, val_every, validate, skip, iterator, progress)

    def _train_batches(self: Trainer, epoch: _Epoch) -> bool:
        """The epoch's batches (the loop of the seed's pseudocode). Returns True when ``max_steps`` stopped
        it before the epoch's last batch."""
        state, metrics, iterator, progress = self.state, self.metric_collector, epoch.iterator, epoch.progress
        n_batches, limit, val_every, validate = epoch.n_batches, epoch.limit, epoch.val_every, epoch.validate
        check_val = validate and bool(val_every)  # validations inside this epoch
        accumulate, boundary = self.gradient_accumulation_steps, is_accumulation_boundary
        transfer, train_batch = self._transfer, self._lean_batch_step() or self._train_batch
        # on_train_batch_start may return -1 (the module's answer) to end the epoch
        batch_start, batch_end = self._hooks.caller("on_train_batch_start", result=True), self._hooks.caller("on_train_batch_end")
        log_every, sync_every = self.log_every_n_steps, self.check_rank_sync_every_n_steps
        one_process, preemption = self._one_process, self._preemption
        assert metrics is not None  # set by _attach
        # resumed from a checkpoint written inside a batch: first what was still due after it
        stop = self._finish_resumed_batch(epoch.skip, n_batches, val_every, validate)
        for batch_idx in itertools.count(epoch.skip):
            if stop or batch_idx >= limit:
                if self._resume is not None:
                    next(iterator, None)  # nothing left to train: still replay the epoch's shuffling draw and RNG
                return False
            try:
                batch = next(iterator)
            except StopIteration:
                return False
            if transfer is not None:
                batch = transfer(batch, 0)
            metrics.set_batch(batch)
            if batch_start is not None and batch_start(batch, batch_idx) == -1:
                return False
            is_boundary = boundary(batch_idx, accumulate, n_batches)
            outputs = train_batch(batch, batch_idx, is_boundary)
            state.batches_done_in_epoch = batch_idx + 1
            if is_boundary:
                step = state.global_step = state.global_step + 1
                if step % log_every == 0 or (sync_every and step % sync_every == 0):
                    self._after_boundary(progress)
                if preemption.requested if one_process else self._preemption_due():
                    self._preempt(progress)
            if batch_end is not None:
                batch_end(outputs, batch, batch_idx)
            if metrics.pending:
                metrics.flush()  # this batch's self.log values into their epoch sums, in one fused add
            if progress is not None:
                progress.update(1)
            last = n_batches is not None and batch_idx + 1 >= n_batches
            if self.max_steps >= 0 and state.global_step >= self.max_steps:
                if last:
                    return False
                # a pause after a complete batch: its validation (if due) and plateau steps included
                self._finish_batch(batch_idx + 1, val_every, validate)
                return True
            if self.should_stop if one_process else self._should_stop_now(is_boundary):
                return False  # the epoch ends here, with its validation (as Lightning validates on a stop)
            if (check_val or state.pending_plateau) and not last:
                # stop is True when a validation decided to stop (EarlyStopping): the epoch ends right after it
                stop = self._finish_batch(batch_idx + 1, val_every, validate)
        return False  # pragma: no cover - itertools.count never ends

    def _end_train_epoch(self: Trainer, epoch: _Epoch) -> None:
        """The epoch end: its validation, plateau steps, ``on_train_epoch_end``, epoch schedulers,
        checkpoint/early-stopping callbacks, ``last.ckpt``; a stop or preemption agreed by every rank."""
        state = self.state
        if epoch.validate and state.validated_at != state.batches_done_in_epoch:
            self._run_validation()
        # closed after the epoch's validation, so its last line shows this epoch's values
        self._close_progress(epoch.progress)
        self._progress_bar = None
        runner = self._runner
        assert runner is not None  # set by fit
        if self._automatic:
            runner.flush_pending()  # step-interval plateau schedulers due on the last batch
        self._end_train_epoch_metrics()
        self._hooks("on_train_epoch_end", monitoring=False)
        state.current_epoch = epoch.index + 1
        state.start_epoch()
        if self._automatic:  # as in Lightning, manual optimization steps its own schedulers
            runner.after_epoch(epoch.index + 1)
        self._check_rank_sync()
        # monitoring callbacks (checkpoint, early stopping) see the epoch fully finished
        for fn in self._monitoring_epoch_end():
            fn(self, self._module)
        # One collective for both flags: a preemption signal is also agreed at every epoch end,
        # which bounds its latency when steps became slower than the poll interval assumed.
        self.should_stop, preempt = self._any_rank_each(self.should_stop, self._preemption.requested)
        self._save_last()
        if preempt:
            self._preempt(None, save=False)  # last.ckpt was just written at this epoch boundary
        self._update_run_status()

    def _batches_per_epoch(self: Trainer) -> tuple[int | None, int | float]:
        """(batches this epoch trains, or None when unknown; the ``limit_train_batches`` bound)."""
        length = data_utils.loader_length(self._train_loader)
        limit = data_utils.limit_batches(self.limit_train_batches, length, "limit_train_batches")
        return (int(limit) if limit != math.inf else length), limit

    def _validates_in_epoch(self: Trainer, epoch: int) -> bool:
        return bool(self._val_loaders) and self.limit_val_batches != 0 and (epoch + 1) % self.check_val_every_n_epoch == 0

    def _validation_not_once_per_epoch(self: Trainer) -> bool:
        """Lightning's condition for ModelCheckpoint/EarlyStopping to act after each validation run."""
        if not self._val_loaders or self.limit_val_batches == 0:
            return False  # no validation: they act at each epoch end
        if self.check_val_every_n_epoch != 1:
            return True
        n_batches, _ = self._batches_per_epoch()
        every = validation_interval(self.val_check_interval, n_batches)
        return every is not None and (n_batches is None or every < n_batches)

    def _finish_batch(self: Trainer, done: int, val_every: int | None, validate_this_epoch: bool) -> bool:
        """After the ``done``-th batch of the epoch (not its last): the validation due there, then the
        step-interval plateau steps that waited for it. Returns True when training stops
        (decided in that validation, e.g. by EarlyStopping; agreed by every rank)."""
        stop = False
        if validate_this_epoch and val_every and done % val_every == 0 and self.state.validated_at != done:
            self._run_validation()
            stop = self.should_stop = self._any_rank(self.should_stop)
        if self._automatic and self._runner is not None:
            self._runner.flush_pending()
        return stop

    def _finish_resumed_batch(self: Trainer, skip: int, n_batches: int | None, val_every: int | None, validate_this_epoch: bool) -> bool:
        """Resumed from a checkpoint written inside batch ``skip`` - 1 (in ``on_train_batch_end``, by a
        preemption, or in ``on_validation_end``): run what was still due after that batch -- its
        validation unless the checkpoint says it ran, then the plateau steps waiting for it --
        from the RNG state of the save, as the uninterrupted run did. (After an epoch's last batch
        this happens at the epoch end instead.) Returns True when that validation stops training."""
        resume = self._resume
        if resume is None or not skip or (n_batches is not None and skip >= n_batches):
            return False
        due = validate_this_epoch and val_every is not None and val_every != 0 and skip % val_every == 0 and self.state.validated_at != skip
        if not due and not self.state.pending_plateau:
            return False
        self._epoch_start = resume["epoch_start"]
        ckpt_io.restore_rng_state(resume["rng"])
        stop = self._finish_batch(skip, val_every, validate_this_epoch)
        resume["rng"] = ckpt_io.capture_rng_state()  # the batches that follow start from here
        return stop

    def _epoch_iterator(self: Trainer, loader: Any, skip: int) -> Iterable:
        """This epoch's batches, resuming exactly after ``skip`` batches when restored mid-epoch.

        The shuffling order of an epoch is drawn when its first batch is fetched, from the
        sampler's generator (and the global RNG). A checkpoint records both as they were when
        the epoch started; resuming replays that draw, skips the batches already trained on,
        then restores the RNG as it was at the save, so dropout & co. continue identically.
        """
        resume, self._resume = self._resume, None
        if resume is None or not skip:
            self._epoch_start = ckpt_io.capture_epoch_start(loader)
            yield from loader
            return
        self._epoch_start = resume["epoch_start"]
        ckpt_io.restore_epoch_start(loader, self._epoch_start)
        iterator = iter(self.accelerator.skip_first_batches(loader, skip))
        first = next(iterator, _EXHAUSTED)
        ckpt_io.restore_rng_state(resume["rng"])
        if first is _EXHAUSTED:
            return
        yield first
        yield from iterator

    def _preemption_due(self: Trainer) -> bool:
        """True once every rank knows a preemption signal arrived (on any rank)."""
        if self._one_process:
            return self._preemption.requested
        step = self.state.global_step
        if not self._preempt_agreed and self._preemption_poll.due(step):
            self._preempt_agreed = self._preemption_poll.exchange(step, self._preemption.requested, self.accelerator.device)
        return self._preempt_agreed

    def _preempt(self: Trainer, progress: Any, save: bool = True) -> None:
        if progress is not None:
            progress.close()
        path = os.path.join(self.checkpoint_dir, ckpt_io.LAST_NAME)
        written = self.save_checkpoint(path) if save else True
        signal_name = self._preemption.signal_name
        if self.is_global_zero:
            cause = self._preemption.cause or f"{signal_name or 'preemption signal'} received"
            if written:
                outcome = f"checkpoint written to {path} at global_step {self.global_step}"
            else:
                outcome = f"no checkpoint written (the weights are not finite); {path} is the previous one, if any"
            say_safely(
                f"accel_trainer: {cause}; {outcome}. Exiting with code {exit_code_for(signal_name)}; run the same "
                "command again (ckpt_path='last') to resume."
            )
        raise Preempted(path if written else None, signal_name)  # type: ignore[arg-type]  # None: nothing written

    def _should_stop_now(self: Trainer, is_boundary: bool) -> bool:
        """``should_stop`` agreed by all ranks; on several ranks checked at logging boundaries only."""
        if self._one_process:
            return self.should_stop
        if not (is_boundary and self.state.global_step % self.log_every_n_steps == 0):
            return False
        self.should_stop = self._any_rank(self.should_stop)
        return self.should_stop

    def _monitoring_epoch_end(self: Trainer) -> list[Callable]:
        cbs, _ = self._hooks.implementations("on_train_epoch_end")
        return [fn for fn in cbs if getattr(getattr(fn, "__self__", None), "monitors_metrics", False)]

    def _end_train_epoch_metrics(self: Trainer) -> None:
        metrics = self.metric_collector
        assert metrics is not None  # set by _attach
        metrics.stage = "train"
        results = metrics.compute_epoch("train", self._gather_from_ranks)
        if not self._logged_steps_in_epoch and self.state.global_step > self._epoch_first_step:
            # No log_every_n_steps boundary fell in this epoch (a short run or short epochs):
            # its latest step values go to the trackers now rather than never.
            results = {**metrics.step_values_for_loggers("train", self.accelerator.reduce), **results}
        if results:
            self._log_to_trackers({**results, "epoch": self.state.current_epoch}, self.state.global_step)

    def _warn_if_no_step_logging(self: Trainer, n_batches: Any) -> None:
        """Lightning's warning when an epoch is shorter than ``log_every_n_steps`` (once per fit)."""
        if self._warned_log_interval or n_batches is None or n_batches == math.inf:
            return
        self._warned_log_interval = True
        steps = math.ceil(n_batches / self.gradient_accumulation_steps)
        if self.max_steps >= 0:
            steps = min(steps, self.max_steps)
        if steps < self.log_every_n_steps and self.is_global_zero:
            warnings.warn(
                f"The number of training steps per epoch ({steps}) is smaller than the logging interval "
                f"Trainer(log_every_n_steps={self.log_every_n_steps}): training step values (e.g. the loss) are "
                "logged once per epoch, at its end. Set a lower log_every_n_steps to log them more often.",
                UserWarning,
                stacklevel=2,
            )

    def _close_progress(self: Trainer, progress: Any) -> None:
        if progress is not None:
            progress.set_postfix(self._progress_postfix(), refresh=False)
            progress.close()

    def _after_boundary(self: Trainer, progress: Any) -> None:
        """At a logging boundary or a rank-sync step (the epoch loop checks which steps are)."""
        step = self.state.global_step
        if self.check_rank_sync_every_n_steps and step % self.check_rank_sync_every_n_steps == 0:
            self._check_rank_sync()
        if step % self.log_every_n_steps == 0:
            self._logged_steps_in_epoch = True
            assert self.metric_collector is not None  # set by _attach
            values = self.metric_collector.step_values_for_loggers("train", self.accelerator.reduce)
            if values:
                values["epoch"] = self.state.current_epoch
                self._log_to_trackers(values, step)
            if progress is not None:
                progress.set_postfix(self._progress_postfix(), refresh=False)

    def _progress_postfix(self: Trainer) -> dict[str, str]:
        postfix = {}
        n_opt = len(self._optimizers)
        if n_opt > 1 and self._last_losses:
            # one loss per optimizer (generator/discriminator), in optimizer order like the lr column
            postfix["loss"] = "/".join(
                f"{float(self._last_losses[i].detach()):.4g}" if i in self._last_losses else "-" for i in range(n_opt)
            )
        elif self._last_loss is not None:
            postfix["loss"] = f"{float(self._last_loss.detach()):.4g}"
        current = self.state.current_epoch
        metrics = self.metric_collector
        assert metrics is not None  # set by _attach
        from_epoch = metrics.progress_bar_epochs
        for name, value in metrics.progress_bar_metrics.items():
            # an epoch value (validation, on_epoch) shown during a later epoch says which epoch it is from
            epoch = from_epoch.get(name)
            key = name if epoch is None or epoch == current else f"{name} (epoch {epoch})"
            postfix[key] = f"{float(value):.4g}"
        tracker = self._step_tracker
        if tracker is not None and self._optimizers:
            # the learning rate of each optimizer's next real step (warm-up included), first param group
            postfix["lr"] = "/".join(f"{tracker.effective_lrs(i, opt)[0]:.1e}" for i, opt in enumerate(self._optimizers))
        return postfix


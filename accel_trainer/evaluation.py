# mypy: disable-error-code="misc"
# (the mixin methods declare ``self: Trainer`` so that mypy checks them against the trainer's
# attributes; mypy reports such a self-type, a subclass of the mixin, as [misc]: silenced here)
"""Validation, test and the sanity check: one evaluation run over some dataloaders.

The same run serves fit's validation (interruptible by a preemption signal), ``validate()``,
``test()`` and the sanity check; it keeps the ranks in lockstep when every forward is a
collective (:mod:`accel_trainer.lockstep`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from . import checkpoint as ckpt_io
from . import data as data_utils
from . import lockstep as lockstep_mod
from .errors import ConfigurationError
from .migration import (
    check_eval_step_signature,
)
from .module import TrainingModule
from .run_state import RunState

if TYPE_CHECKING:
    from .trainer import Trainer


class _ValidationInterrupted(Exception):
    """A preemption signal (or a lost launcher) stopped fit's validation at a batch boundary.

    Validation can take minutes; waiting for its end, then a training step and two saves,
    can outlast a scheduler's grace period. So fit's validation checks the flag before each
    batch and, when set on any rank, is abandoned: the preemption checkpoint is written as
    if it had not started, and resuming runs it again.
    """



class Evaluation(RunState):
    """Evaluation runs (a mixin of :class:`~accel_trainer.trainer.Trainer`; ``self`` is the trainer)."""

    def _run_validation(self: Trainer) -> list[dict[str, float]]:
        self._settle_nonfinite()
        try:
            return self._evaluate("validate", self._val_loaders, self.limit_val_batches, log=True)
        except _ValidationInterrupted:
            self._preempt(self._progress_bar)  # writes last.ckpt and raises Preempted
            raise  # pragma: no cover - _preempt always raises

    def _sanity_check(self: Trainer) -> None:
        self.sanity_checking = True
        self._hooks.callbacks_only("on_sanity_check_start")
        assert self.metric_collector is not None  # set by _attach
        callback_metrics = self.metric_collector.callback_metrics
        saved = dict(callback_metrics)
        self._evaluate("sanity", self._val_loaders, self.num_sanity_val_steps, log=False)
        callback_metrics.clear()
        callback_metrics.update(saved)
        self._hooks.callbacks_only("on_sanity_check_end")
        self.sanity_checking = False

    def _evaluate(self: Trainer, stage: str, loaders: list, limit: Any, log: bool) -> list[dict[str, float]]:
        """One validation/test/sanity run over ``loaders``; returns one results dict per dataloader."""
        module, metrics = self._module, self.metric_collector
        assert module is not None and metrics is not None  # set by _attach
        kind = "test" if stage == "test" else "validation"
        step_name = "test_step" if stage == "test" else "validation_step"
        auto_name = "test_loss" if stage == "test" else "val_loss"
        previous_stage = metrics.stage
        metrics.stage = stage
        metrics.reset_stage(stage)
        modes = [(m, m.training) for m in module.modules()]  # restored afterwards, submodule by submodule
        getattr(module, f"on_{kind}_model_eval")()
        self._hooks(f"on_{kind}_start")
        self._hooks(f"on_{kind}_epoch_start")
        limits = [data_utils.limit_batches(limit, data_utils.loader_length(dl), "limit_val_batches") for dl in loaders]
        lockstep = self._engine.forward_is_collective and self.accelerator.num_processes > 1
        if lockstep:
            targets, template_rank = lockstep_mod.agree_on_batch_counts([int(n) for n in limits], self.accelerator)
        several = len(loaders) > 1
        transfer = self._transfer
        # A preemption signal during fit's validation stops it at the next batch (see _ValidationInterrupted).
        interruptible = stage == "validate" and self.training
        rng_at_start = ckpt_io.capture_rng_state() if interruptible else None
        interrupted = False

        def stop_now() -> bool:
            if lockstep:  # every forward is a collective: the ranks must break at the same batch
                return self._any_rank(self._preemption.requested)
            return self._preemption.requested

        with torch.no_grad():
            for dl_idx, loader in enumerate(loaders):
                metrics.dataloader_idx = dl_idx if several else None
                n = limits[dl_idx]
                extra = (dl_idx,) if several else ()
                iterator = iter(loader)
                first = next(iterator, None) if n > 0 else None
                template = first
                if lockstep and template_rank is not None:  # before any forward: it is a collective too
                    shared = lockstep_mod.share_template(first, template_rank, self.accelerator)
                    template = first if first is not None else shared
                batches: Iterator[Any] = itertools.chain([first], iterator) if first is not None else iter(())
                done = 0
                for batch_idx, batch in enumerate(batches):
                    if batch_idx >= n:
                        break
                    if interruptible and stop_now():
                        interrupted = True
                        break
                    done = batch_idx + 1
                    if transfer is not None:
                        batch = transfer(batch, dl_idx)
                    metrics.set_batch(batch)
                    self._hooks(f"on_{kind}_batch_start", batch, batch_idx, *extra)
                    output = self._wrapped(step_name, batch, batch_idx, *extra)
                    metrics.log_returned(auto_name, output)
                    self._hooks(f"on_{kind}_batch_end", output, batch, batch_idx, *extra)
                    metrics.flush()
                if lockstep and not interrupted:
                    filler = lockstep_mod.empty_like(template)
                    if transfer is not None and filler is not None:
                        filler = transfer(filler, dl_idx)
                    interrupted = lockstep_mod.run_fillers(
                        self._wrapped, step_name, filler, done, targets[dl_idx] - done, extra, metrics,
                        stop=stop_now if interruptible else None,
                    )
                if interrupted:
                    break
        metrics.dataloader_idx = None
        if interruptible and self.accelerator.num_processes > 1 and not lockstep:
            interrupted = self._any_rank(interrupted)  # a rank that was not signalled finished its shard meanwhile
        if interrupted:
            self._abandon_evaluation(stage, previous_stage, modes, rng_at_start)
        results = self._end_evaluation(stage, kind, log)
        metrics.stage = previous_stage
        train_hook = f"on_{kind}_model_train"
        if getattr(type(module), train_hook) is not getattr(TrainingModule, train_hook):
            getattr(module, train_hook)()
        else:
            for m, training in modes:
                m.training = training
        return metrics.results_by_dataloader(stage, results, len(loaders))

    def _abandon_evaluation(
        self: Trainer, stage: str, previous_stage: str, modes: list[tuple[Any, bool]], rng_at_start: dict[str, Any] | None
    ) -> NoReturn:
        """Abandon an interrupted validation: no results, no callbacks; the checkpoint written next records
        that it did not run (validated_at unchanged), so a resume runs it again, from the RNG
        state it started from."""
        metrics = self.metric_collector
        assert metrics is not None and rng_at_start is not None  # set by _attach; captured when interruptible
        metrics.reset_stage(stage)
        metrics.stage = previous_stage
        for m, training in modes:
            m.training = training
        ckpt_io.restore_rng_state(rng_at_start)
        raise _ValidationInterrupted()

    def _end_evaluation(self: Trainer, stage: str, kind: str, log: bool) -> dict[str, float]:
        """``on_{kind}_epoch_end``, the epoch values reduced over ranks and logged, ``on_{kind}_end``."""
        metrics = self.metric_collector
        assert metrics is not None  # set by _attach
        metrics.in_epoch_end = True
        try:
            self._hooks(f"on_{kind}_epoch_end")
        finally:
            metrics.in_epoch_end = False
        results = metrics.compute_epoch(stage, self._gather_from_ranks)
        if log and results:
            # during fit a validation row says which epoch it belongs to, as every training row does
            row = {**results, "epoch": self.state.current_epoch} if self.training else results
            self._log_to_trackers(row, self.state.global_step)
        if stage == "validate" and self.training:
            # before on_validation_end: a checkpoint written there records that this validation ran
            self.state.validated_at = self.state.batches_done_in_epoch
        self._hooks(f"on_{kind}_end")
        return results

    def _eval_entry(self: Trainer, stage: str, module: TrainingModule, dataloaders: Any, datamodule: Any, factory: str) -> list[dict]:
        self._attach(module, stage, datamodule)
        try:
            loaders = data_utils.resolve(dataloaders, datamodule, module, factory)
            if not loaders:
                raise ConfigurationError(
                    f"{stage}() got no data: pass dataloaders, a datamodule with {factory}(), or define {factory}() on the module."
                )
            for loader in loaders:
                data_utils.check_not_empty(loader, stage)
            check_eval_step_signature(module, "test_step" if stage == "test" else "validation_step", len(loaders))
            self._prepare_model_only(module)
            prepared = [self._prepare_loader(dl, even_batches=False) for dl in loaders]
            # validate/test log into their own directory, never into the training run's tables
            self._start_trackers(module, log_dir=os.path.join(self.log_dir, stage))
            return self._evaluate(stage, prepared, self.limit_val_batches if stage == "validate" else None, log=True)
        finally:
            self._teardown(stage, datamodule)


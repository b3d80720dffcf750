# mypy: disable-error-code="misc"
# (the mixin methods declare ``self: Trainer`` so that mypy checks them against the trainer's
# attributes; mypy reports such a self-type, a subclass of the mixin, as [misc]: silenced here)
"""Wiring one run: attaching the module and callbacks, checking and preparing optimizers and data.

Everything ``fit``/``validate``/``test`` do before the first batch and after the last: the
module's hooks and callbacks resolved, ``configure_optimizers`` parsed and checked against the
module and the launched engine, the model, optimizers, schedulers and loaders prepared by
Accelerate, and the per-run state the loop reads set up.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from . import collectives
from . import data as data_utils
from .callbacks.base import Callback
from .callbacks.model_checkpoint import ModelCheckpoint
from .engines import DeepSpeedEngine, FSDPEngine, RunRequest
from .errors import ConfigurationError
from .hooks import _batch_transfer_hook, _Hooks, _overrides
from .internals import (
    cache_accelerate_availability_checks,
    ddp_ignore,
    forward_callable_directly,
    install_fast_optimizer,
    skip_noop_placement,
)
from .launching import seed_everything
from .metrics import MetricCollector
from .migration import (
    check_eval_step_signature,
    check_training_step_signature,
)
from .module import TrainingModule
from .nonfinite import NonFiniteGuard
from .optim import (
    OptimizationConfig,
    check_optimizers_against_module,
    mark_requires_closure,
    parse_configure_optimizers,
    requires_closure,
)
from .optimization_step import _mark_stepped, _scheduler_step_function
from .plan import OptimizerCycle, warmup_per_optimizer
from .run_state import RunState
from .scheduling import SchedulerRunner, StepTracker
from .toggle import OptimizerToggle

if TYPE_CHECKING:
    from .trainer import Trainer


class _StepDispatcher(torch.nn.Module):
    """Routes ``forward("training_step", ...)`` to the module's step methods.

    Wrapping this (not the bare module) with DDP and autocast makes ``training_step`` and
    ``validation_step`` run through the wrapper's ``forward``, so gradient synchronisation
    and mixed precision apply to exactly what the user wrote (Lightning does the same).
    """

    def __init__(self, module: TrainingModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, method: str, *args: Any) -> Any:
        return getattr(self.module, method)(*args)



class RunSetup(RunState):
    """Run set-up and teardown (a mixin of :class:`~accel_trainer.trainer.Trainer`; ``self`` is the trainer)."""

    def _attach(self: Trainer, module: TrainingModule, stage: str, datamodule: Any) -> None:
        if not isinstance(module, TrainingModule):
            raise ConfigurationError(
                f"Trainer.{stage}() needs an accel_trainer.TrainingModule, received {type(module).__name__}."
            )
        if datamodule is not None and not any(
            callable(getattr(datamodule, f, None)) for f in ("train_dataloader", "val_dataloader", "test_dataloader")
        ):
            raise ConfigurationError(
                f"datamodule must provide train_dataloader/val_dataloader/test_dataloader; received {type(datamodule).__name__}."
            )
        if self.seed is not None and stage == "fit":
            seed_everything(self.seed)
        self._reset_run_state()
        self._module = module
        module.trainer = self
        self.callbacks = self._with_module_callbacks(module)
        self.metric_collector = MetricCollector(self.accelerator.device, self.accelerator.num_processes, module)
        self._hooks = _Hooks(self, module, self.callbacks)
        # the hooks of every optimizer step, resolved once (None: nobody implements it)
        self._on_before_backward = self._hooks.caller("on_before_backward")
        self._on_after_backward = self._hooks.caller("on_after_backward")
        self._on_before_optimizer_step = self._hooks.caller("on_before_optimizer_step")
        self._on_before_zero_grad = self._hooks.caller("on_before_zero_grad")  # for the default optimizer_step
        self._transfer = _batch_transfer_hook(module, datamodule)
        module_prepares = type(module).prepare_data is not TrainingModule.prepare_data
        if datamodule is not None or module_prepares:
            # once per machine, before setup; the DataModule's first, then the module's (as in Lightning)
            if self.accelerator.is_local_main_process:
                if datamodule is not None and callable(getattr(datamodule, "prepare_data", None)):
                    datamodule.prepare_data()
                if module_prepares:
                    module.prepare_data()
            collectives.barrier(self.accelerator)
        if datamodule is not None and callable(getattr(datamodule, "setup", None)):
            datamodule.setup(stage)
        self._hooks("setup", stage)

    def _resolve_fit_data(
        self: Trainer, module: TrainingModule, train_dataloaders: Any, val_dataloaders: Any, datamodule: Any
    ) -> tuple[Any, list[Any]]:
        """fit's training dataloader and validation dataloaders (as given or from the datamodule/module), checked."""
        train_loaders = data_utils.resolve(train_dataloaders, datamodule, module, "train_dataloader")
        if not train_loaders:
            raise ConfigurationError(
                "fit() got no training data: pass train_dataloaders, a datamodule with train_dataloader(), "
                "or define train_dataloader() on the module."
            )
        if len(train_loaders) > 1:
            raise ConfigurationError(f"fit() takes one training dataloader, received {len(train_loaders)}.")
        val_loaders = data_utils.resolve(val_dataloaders, datamodule, module, "val_dataloader")
        data_utils.check_not_empty(train_loaders[0], "training")
        for loader in val_loaders:
            data_utils.check_not_empty(loader, "validation")
        if val_loaders:
            check_eval_step_signature(module, "validation_step", len(val_loaders))
        return train_loaders[0], val_loaders

    def _setup_fit(self: Trainer, module: TrainingModule, train_loader: Any, val_loaders: list[Any], ckpt_path: Any) -> None:
        """Optimizers, schedulers and loaders prepared, the checkpoint restored, the step tracker and scheduler runner made."""
        # what trainer.estimated_stepping_batches counts while configure_optimizers runs
        self._train_loader, self._train_loader_raw = None, train_loader

        config = self._configure_optimizers(module)
        self._validate_against_module(module, config)
        self._check_engine(module, config)
        self._setup_optimization(module, config, train_loader)
        self._train_loader = self._prepare_loader(train_loader, even_batches=True)
        self._val_loaders = [self._prepare_loader(dl, even_batches=False) for dl in val_loaders]
        self.state.reset_for(len(self._optimizers))
        self.should_stop = False
        if ckpt_path is not None:
            # before the step hooks exist: torch's sharded-state API may initialise an
            # optimizer with a zero-lr step, which must not count as a training step
            self._restore(ckpt_path)
            _mark_stepped(self._optimizers, self.state.optimizer_steps)
        self._step_tracker = StepTracker(
            self._optimizers, self.state, warmup_per_optimizer(self._scheduler_configs, len(self._optimizers))
        )
        self._runner = SchedulerRunner(
            self._scheduler_configs,
            len(self._optimizers),
            _scheduler_step_function(module),
            lambda: self.callback_metrics,
            pending_plateau=self.state.pending_plateau,
        )
        default_hook = _overrides(module, "lr_scheduler_step") is False
        self._every_step = [self._runner.every_step(i, default_hook) for i in range(len(self._optimizers))]
        self._monitor_on_validation = self._validation_not_once_per_epoch()

    def _with_module_callbacks(self: Trainer, module: TrainingModule) -> list[Callback]:
        """The trainer's callbacks plus ``module.configure_callbacks()``, in Lightning's order.

        A module callback replaces the trainer's callbacks of its type (or a parent type), and
        ``ModelCheckpoint`` callbacks go last, so that a checkpoint holds the state the other
        callbacks reached at the same check (e.g. EarlyStopping's patience count).
        """
        callbacks = list(self.callbacks)
        extra = module.configure_callbacks()
        if extra:
            extra = list(extra) if isinstance(extra, (list, tuple)) else [extra]
            for cb in extra:
                if not isinstance(cb, Callback):
                    raise ConfigurationError(
                        f"{type(module).__name__}.configure_callbacks() returned a {type(cb).__name__}; return an "
                        "accel_trainer.Callback or a list of them."
                    )
            replaced = {
                type(cb) for cb in callbacks if type(cb) is not Callback and any(isinstance(m, type(cb)) for m in extra)
            }
            callbacks = [cb for cb in callbacks if type(cb) not in replaced] + extra
        return [cb for cb in callbacks if not isinstance(cb, ModelCheckpoint)] + [
            cb for cb in callbacks if isinstance(cb, ModelCheckpoint)
        ]

    def _teardown(self: Trainer, stage: str, datamodule: Any) -> None:
        tracker = self._step_tracker
        if tracker is not None:
            tracker.remove()
            self._step_tracker = None
        for t in self._trackers:
            try:
                t.finish()
            except Exception as err:  # a tracker failing to close must not mask the run's own error
                warnings.warn(f"Tracker {type(t).__name__} failed to finish: {err}", UserWarning, stacklevel=2)
        self._trackers = []
        self._tracking = False
        if datamodule is not None and callable(getattr(datamodule, "teardown", None)):
            datamodule.teardown(stage)
        self._hooks("teardown", stage)

    def _configure_optimizers(self: Trainer, module: TrainingModule) -> OptimizationConfig:
        module.to(self.accelerator.device)
        return parse_configure_optimizers(module.configure_optimizers())

    def _validate_against_module(self: Trainer, module: TrainingModule, config: OptimizationConfig) -> None:
        """Combinations that only make sense once the module's optimizers are known."""
        automatic = getattr(module, "automatic_optimization", True)
        check_training_step_signature(module, len(config.optimizers), automatic)
        check_optimizers_against_module(module, config)
        needs_closure = [i for i, o in enumerate(config.optimizers) if requires_closure(o)]
        if needs_closure and self.gradient_accumulation_steps > 1:
            raise ConfigurationError(
                f"Optimizer {needs_closure[0]} ({type(config.optimizers[needs_closure[0]]).__name__}) re-evaluates the "
                f"loss through a closure, which cannot be combined with gradient_accumulation_steps="
                f"{self.gradient_accumulation_steps}. Use gradient_accumulation_steps=1."
            )
        if needs_closure and self.accelerator.mixed_precision == "fp16":
            raise ConfigurationError(
                f"Optimizer {needs_closure[0]} ({type(config.optimizers[needs_closure[0]]).__name__}) needs a closure, "
                "which fp16's GradScaler cannot drive correctly (it would re-run the closure on scaled gradients). "
                "Use mixed_precision='bf16' or 'no'."
            )
        if not automatic:
            if self.gradient_accumulation_steps > 1:
                raise ConfigurationError(
                    "Manual optimization (automatic_optimization = False) with gradient_accumulation_steps="
                    f"{self.gradient_accumulation_steps}: accumulate in your training_step instead, and use 1 here."
                )
            if self.gradient_clip_val is not None:
                raise ConfigurationError(
                    f"Manual optimization with gradient_clip_val={self.gradient_clip_val}: call "
                    "self.trainer.accelerator.clip_grad_norm_(...) in training_step instead, and leave it None here."
                )
            if config.frequencies is not None:
                raise ConfigurationError(
                    "Optimizer 'frequency' has no meaning under manual optimization: you decide which optimizer steps."
                )

    def _check_engine(self: Trainer, module: TrainingModule, config: OptimizationConfig) -> None:
        """Refuse what the launched engine (FSDP, DeepSpeed) cannot run, before anything is prepared."""
        self._engine.check(
            RunRequest(
                optimizer_names=[type(o).__name__ for o in config.optimizers],
                needs_closure=[i for i, o in enumerate(config.optimizers) if requires_closure(o)],
                overrides_optimizer_step=type(module).optimizer_step is not TrainingModule.optimizer_step,
                automatic_optimization=getattr(module, "automatic_optimization", True),
                gradient_accumulation_steps=self.gradient_accumulation_steps,
                gradient_clip_val=self.gradient_clip_val,
                gradient_clip_algorithm=self.gradient_clip_algorithm,
                warmup_optimizers=sorted({c.opt_idx for c in config.schedulers if c.warmup_steps}),
                module_name=type(module).__name__,
            )
        )
        automatic = getattr(module, "automatic_optimization", True)
        if isinstance(self._engine, DeepSpeedEngine) and self.on_nonfinite_loss == "skip" and automatic:
            raise ConfigurationError(
                "Trainer(on_nonfinite_loss='skip') cannot be honoured under DeepSpeed: its engine takes the optimizer "
                "step inside backward, before the trainer could look at the gradients, so a non-finite step cannot be "
                "skipped. Use on_nonfinite_loss='raise' (DeepSpeed's fp16 loss scaler skips overflowing steps by "
                "itself), or launch with DDP or FSDP."
            )

    def _setup_optimization(self: Trainer, module: TrainingModule, config: OptimizationConfig, train_loader: Any = None) -> None:

        accelerator = self.accelerator
        self._automatic = getattr(module, "automatic_optimization", True)
        n_opt = len(config.optimizers)
        dispatchers = self._make_dispatchers(module, config)
        prepared = self._engine.prepare(dispatchers, config.optimizers, [c.scheduler for c in config.schedulers], train_loader)
        wrappers = prepared.wrappers
        self._wrapped = wrappers[0]
        # the wrapper each optimizer's training_step runs through (the same one unless per-optimizer DDP)
        self._wrappers = wrappers if len(wrappers) == n_opt else [wrappers[0]] * max(n_opt, 1)
        self._unique_wrappers = wrappers
        self._call_directly = len(wrappers) == 1 and is_bare_dispatcher(wrappers[0])
        self._gradient_state = accelerator.gradient_state
        self._optimizers = prepared.optimizers
        cache_accelerate_availability_checks()  # the version fence: its warning comes as a run is set up
        for opt in self._optimizers:
            install_fast_optimizer(opt)
            mark_requires_closure(opt)
        default_step = _overrides(module, "optimizer_step") is False
        self._plain_step = [default_step and not requires_closure(opt) for opt in self._optimizers]
        self._default_zero_grad = _overrides(module, "optimizer_zero_grad") is False
        self._direct_backward = self._engine.direct_backward()
        for cfg, sched in zip(config.schedulers, prepared.schedulers):
            # We decide when a scheduler steps; Accelerate's wrapper would otherwise step it
            # num_processes times per call and skip steps by its own rules.
            if hasattr(sched, "step_with_optimizer"):
                sched.step_with_optimizer = False
            cfg.scheduler = sched
        self._scheduler_configs = config.schedulers
        self._pass_optimizer_idx = n_opt > 1
        self._cycle = OptimizerCycle(n_opt, config.frequencies)
        self._fixed_optimizers = self._cycle.all if not config.frequencies else None  # every optimizer, every batch
        self._optimizer_params = [
            [p for g in opt.param_groups for p in g["params"]] for opt in self._optimizers
        ]
        self._toggle = OptimizerToggle(self._optimizer_params) if n_opt > 1 and self._automatic else None
        self._guard = self._make_guard(module) if self._automatic and n_opt else None

    def _make_guard(self: Trainer, module: TrainingModule) -> NonFiniteGuard:
        """The non-finite policy for this run's engine (see accel_trainer/nonfinite.py)."""
        accelerator = self.accelerator
        owns_gradients = isinstance(self._engine, DeepSpeedEngine) or getattr(accelerator, "scaler", None) is not None
        return NonFiniteGuard(
            self.on_nonfinite_loss,
            self._optimizer_params,
            accelerator.device,
            rank=accelerator.process_index,
            num_processes=accelerator.num_processes,
            sharded=isinstance(self._engine, FSDPEngine),
            check_gradients=not owns_gradients,
            names=lambda: {id(p): name for name, p in module.named_parameters()},
        )

    def _make_dispatchers(self: Trainer, module: TrainingModule, config: OptimizationConfig) -> list[_StepDispatcher]:
        """One dispatcher, or one per optimizer when several optimizers train under DDP.

        Which one is :func:`~accel_trainer.engines.plan_wrappers`' decision (its docstring says why).
        """
        accelerator = self.accelerator
        owners = [{id(p) for g in opt.param_groups for p in g["params"]} for opt in config.optimizers]
        plan = self._engine.wrapper_plan(self._automatic, owners)
        if plan.find_unused_parameters:
            from accelerate.utils import DistributedDataParallelKwargs

            handler = accelerator.ddp_handler or DistributedDataParallelKwargs()
            handler.find_unused_parameters = True
            accelerator.ddp_handler = handler
        if not plan.per_optimizer:
            return [_StepDispatcher(module)]
        dispatchers = []
        for own in owners:
            dispatcher = _StepDispatcher(module)
            ignored = [name for name, p in dispatcher.named_parameters() if id(p) not in own]
            ddp_ignore(dispatcher, ignored)
            dispatchers.append(dispatcher)
        return dispatchers

    def _prepare_model_only(self: Trainer, module: TrainingModule) -> None:
        module.to(self.accelerator.device)
        self._wrapped = self._engine.prepare_for_evaluation(_StepDispatcher(module))

    def _prepare_loader(self: Trainer, loader: Any, even_batches: bool) -> Any:
        accelerator = self.accelerator
        previous = accelerator.even_batches
        # Validation shards are uneven on purpose: padding duplicates would bias the metrics.
        accelerator.even_batches = even_batches
        try:
            prepared = accelerator.prepare(loader)
        finally:
            accelerator.even_batches = previous

        skip_noop_placement(prepared)
        return prepared


def is_bare_dispatcher(wrapper: Any) -> bool:
    """The prepared model is our own ``_StepDispatcher``, unwrapped, its ``forward`` untouched, without hooks.

    That is the case on one process without mixed precision (Accelerate's ``prepare`` hands the
    model back as it is); DDP/FSDP wrappers, Accelerate's autocast ``forward`` or a hook make it
    False (``internals.forward_callable_directly`` reads torch's private hook dicts).
    """
    return type(wrapper) is _StepDispatcher and forward_callable_directly(wrapper)

"""``Trainer``: owns the ``Accelerator`` and runs fit / validate / test.

Where every hook fires during ``fit`` (callbacks first, then the module, as in Lightning 2)::

    setup("fit"); configure_optimizers(); accelerator.prepare(...)
    on_fit_start
    [sanity validation: on_sanity_check_start ... on_sanity_check_end]
    on_train_start
    for epoch:
        on_train_epoch_start
        for batch_idx, batch in train data:
            on_after_batch_transfer(batch, 0)               # module (or DataModule) hook, batch on its device
            on_train_batch_start(batch, batch_idx)          # module may return -1 to end the epoch
            for optimizer_i in the optimizers due (optimizer dict "frequency"):
                only optimizer_i's parameters require grad
                loss = training_step(batch, batch_idx, optimizer_i)   # through the DDP/autocast wrapper
                on_before_backward(loss); backward(loss); on_after_backward()
                on an accumulation boundary:
                    NaN/inf in the loss or gradients: raise, or skip this step (accel_trainer/nonfinite.py)
                    clip gradients; on_before_optimizer_step(optimizer)
                    optimizer_step(epoch, batch_idx, optimizer, optimizer_i, closure)
                        # the default: optimizer.step(); on_before_zero_grad(optimizer); optimizer_zero_grad(...)
                    step-interval schedulers of optimizer_i advance after each real step
                    (a step-interval ReduceLROnPlateau waits for the end of the batch, below)
            global_step += 1 on a boundary
            on_train_batch_end(outputs, batch, batch_idx)
            validation when val_check_interval says so (not after the epoch's last batch)
            step-interval plateau schedulers that came due in this batch advance
        validation (on_validation_model_eval, on_validation_start, on_validation_epoch_start, batches,
                    ..._epoch_end, on_validation_end, on_validation_model_train)
        step-interval plateau schedulers due after the last batch advance
        on_train_epoch_end (callbacks that do not monitor metrics, then the module)
        epoch-interval schedulers advance (plateau ones with the rank-reduced monitored value)
        on_train_epoch_end of ModelCheckpoint / EarlyStopping; checkpoints/last.ckpt written
    on_train_end; on_fit_end; teardown("fit")

ModelCheckpoint and EarlyStopping act at the epoch end shown above when validation runs
exactly once per epoch at its end (or not at all); otherwise in on_validation_end of every
validation run during fit (``trainer.monitor_at_validation_end``, Lightning's rule). A stop
decided there ends the epoch right after that validation.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from . import checkpoint as ckpt_io
from . import collectives
from . import data as data_utils
from . import lockstep as lockstep_mod
from . import run_status as run_records
from .arguments import CLIP_ALGORITHMS, MIXED_PRECISION, NONFINITE_POLICIES  # noqa: F401 - their old home
from .arguments import validate_trainer_args as _validate_trainer_args
from .callbacks.base import Callback
from .callbacks.early_stopping import EarlyStopping
from .callbacks.model_checkpoint import ModelCheckpoint
from .engines import DeepSpeedEngine, FSDPEngine, RunRequest, check_requested_engine, engine_for
from .errors import ConfigurationError, TrainingError
from .internals import GLOBAL_BACKWARD_HOOKS as _GLOBAL_BACKWARD
from .internals import GLOBAL_BACKWARD_PRE_HOOKS as _GLOBAL_BACKWARD_PRE
from .internals import GLOBAL_FORWARD_HOOKS as _GLOBAL_POST
from .internals import GLOBAL_FORWARD_PRE_HOOKS as _GLOBAL_PRE
from .internals import accelerator_present as _accelerator_present  # noqa: F401 - its old home
from .internals import cache_accelerate_availability_checks as _cache_accelerate_availability_checks
from .internals import forward_callable_directly
from .internals import install_fast_optimizer as _install_fast_zero_grad
from .internals import skip_noop_placement as _skip_noop_placement
from .launching import apply_collective_timeout as _apply_collective_timeout
from .launching import check_launch as _check_launch
from .launching import explain_collective_timeout as _explain_collective_timeout
from .launching import launched_world_size as _launched_world_size  # noqa: F401 - its old home
from .launching import make_accelerator as _make_accelerator
from .launching import seed_everything as _seed_everything
from .launching import settle_collectives_at_exit as _settle_collectives_at_exit
from .launching import warn_if_restarts_cannot_reconnect as _warn_if_restarts_cannot_reconnect
from .loggers import CSVTracker, LoggerView, build_trackers, log_hyperparams, normalise_log_with, tracker_name
from .metrics import MetricCollector
from .migration import (
    check_eval_step_signature,
    check_precision_device,
    check_training_step_signature,
    refuse_lightning_arguments,
)
from .module import TrainingModule
from .nonfinite import NonFiniteGuard
from .optim import (
    OptimizationConfig,
    SchedulerConfig,
    check_optimizers_against_module,
    mark_requires_closure,
    parse_configure_optimizers,
    requires_closure,
)
from .preemption import Preempted, PreemptionPoll, PreemptionWatcher, exit_code_for
from .progress import make_progress
from .scheduling import SchedulerRunner, StepTracker
from .state import TrainingState
from .toggle import OptimizerToggle

_EXHAUSTED = object()


class _ValidationInterrupted(Exception):
    """A preemption signal (or a lost launcher) stopped fit's validation at a batch boundary.

    Validation can take minutes; waiting for its end, then a training step and two saves,
    can outlast a scheduler's grace period. So fit's validation checks the flag before each
    batch and, when set on any rank, is abandoned: the preemption checkpoint is written as
    if it had not started, and resuming runs it again.
    """


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


class _Hooks:
    """Calls a hook on the callbacks that override it, then on the module.

    Which objects override which hook is decided once per run, so unused hooks cost nothing.
    """

    def __init__(self, trainer: Trainer, module: TrainingModule, callbacks: list[Callback]) -> None:
        self.trainer = trainer
        self.module = module
        self.callbacks = callbacks
        self._cache: dict[str, tuple[list[Callable], Callable | None]] = {}

    def _resolve(self, name: str) -> tuple[list[Callable], Callable | None]:
        base = getattr(Callback, name, None)
        cbs = [getattr(cb, name) for cb in self.callbacks if getattr(type(cb), name, None) is not base]
        mod_base = getattr(TrainingModule, name, None)
        impl = getattr(type(self.module), name, None)
        mod = getattr(self.module, name) if impl is not None and impl is not mod_base else None
        self._cache[name] = (cbs, mod)
        return cbs, mod

    def __call__(self, name: str, *args: Any, monitoring: bool | None = None) -> Any:
        cbs, mod = self._cache.get(name) or self._resolve(name)
        for fn in cbs:
            if monitoring is None or getattr(fn.__self__, "monitors_metrics", False) == monitoring:
                fn(self.trainer, self.module, *args)
        if mod is not None and monitoring is not True:
            return mod(*args)
        return None

    def caller(self, name: str, result: bool = False) -> Callable | None:
        """A function that calls hook ``name`` as ``__call__`` does, or None when neither a callback nor
        the module implements it (resolved once, so per-step hooks nobody uses cost nothing at all).

        ``result``: the caller reads the return value, which is the module's (a callback's is
        ignored), so a lone callback is not called directly then.
        """
        cbs, mod = self._cache.get(name) or self._resolve(name)
        if not cbs:
            return mod  # None when nobody implements it
        if len(cbs) == 1 and mod is None and not result:
            return functools.partial(cbs[0], self.trainer, self.module)
        return functools.partial(self.__call__, name)

    def callbacks_only(self, name: str, *args: Any) -> None:
        cbs, _ = self._cache.get(name) or self._resolve(name)
        for fn in cbs:
            fn(self.trainer, self.module, *args)


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

    def __init__(self, trainer: Trainer, batch: Any, batch_idx: int, opt_idx: int, loss: torch.Tensor) -> None:
        self._trainer, self._batch, self._batch_idx, self._opt_idx, self._loss = trainer, batch, batch_idx, opt_idx, loss

    def __call__(self) -> torch.Tensor:
        trainer = self._trainer
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
            loss = trainer.accelerator.reduce(loss.detach().clone(), "mean")
        return loss


class Trainer:
    """Runs a :class:`TrainingModule` on Accelerate: CPU, one GPU, DDP, bf16/fp16 alike.

    Args:
        max_epochs: epochs to train (default: 1000 when ``max_steps`` is also unset, as in Lightning).
        max_steps: stop after this many ``global_step``s (-1: no limit).
        cpu: force CPU even when a GPU is present.
        mixed_precision: "no", "bf16" or "fp16".
        gradient_accumulation_steps: batches per optimizer step.
        gradient_clip_val: clip gradients of each optimizer before its step (None: off).
        gradient_clip_algorithm: "norm" or "value".
        limit_train_batches, limit_val_batches: an int (batches) or float (fraction) per epoch.
        val_check_interval: float fraction of an epoch or int number of batches between validations.
        check_val_every_n_epoch: validate every N epochs.
        num_sanity_val_steps: validation batches run (and discarded) before training.
        log_every_n_steps: how often step metrics go to the trackers.
        log_with: None (CSV in ``log_dir``), "csv", "wandb", "tensorboard", or a list.
        project_name: tracker project name.
        default_root_dir: the run directory (logs, ``checkpoints/``).
        callbacks: a list of :class:`Callback`.
        seed: seed python, numpy and torch (at construction and again at the start of fit).
        enable_progress_bar: show a progress bar on the main process.
        on_nonfinite_loss: "raise" (default) or "skip" the optimizer step of that loss.
        check_rank_sync_every_n_steps: how often ranks compare counters and LRs (None: every epoch).
        collective_timeout: seconds a collective (all-reduce, barrier ...) may wait for the other
            ranks before it fails, ending the job (None: torch's default, 30 minutes for gloo, 10
            for NCCL). Bounds how long a rank that hangs or died unnoticed can stall the others.
        accelerator: an existing ``accelerate.Accelerator``, used as given.

    Raises:
        ConfigurationError: for any argument outside its allowed values (checked here, before
            anything runs); for a PyTorch Lightning argument this Trainer does not take
            (``devices``, ``precision``, ``strategy``, ``accumulate_grad_batches`` …), naming the
            equivalent; for ``mixed_precision="fp16"`` on a process without a GPU; at the start
            of ``fit`` for a bad ``configure_optimizers`` output, a ``training_step`` whose
            ``optimizer_idx`` argument does not fit the number of optimizers,
            LBFGS with gradient accumulation or fp16, manual optimization with gradient
            accumulation or clipping, an empty dataloader, and what the launched FSDP or
            DeepSpeed engine cannot run (:func:`accel_trainer.engines.check_engine_support`).

    Example:
        >>> trainer = Trainer(max_epochs=3, cpu=True, default_root_dir="runs/demo")
        >>> trainer.fit(model, train_loader, val_loader)
    """

    @refuse_lightning_arguments
    def __init__(
        self,
        max_epochs: int | None = None,
        max_steps: int = -1,
        cpu: bool = False,
        mixed_precision: str = "no",
        gradient_accumulation_steps: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        val_check_interval: int | float = 1.0,
        check_val_every_n_epoch: int = 1,
        num_sanity_val_steps: int = 0,
        log_every_n_steps: int = 50,
        log_with: Any = None,
        project_name: str = "accel_trainer",
        default_root_dir: str | os.PathLike = "runs",
        callbacks: list[Callback] | None = None,
        seed: int | None = None,
        enable_progress_bar: bool = True,
        on_nonfinite_loss: str = "raise",
        check_rank_sync_every_n_steps: int | None = None,
        collective_timeout: float | None = None,
        accelerator: Any = None,
    ) -> None:
        _validate_trainer_args(locals())
        if max_epochs is None and max_steps == -1:
            max_epochs = 1000
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.limit_train_batches = limit_train_batches
        self.limit_val_batches = limit_val_batches
        self.val_check_interval = val_check_interval
        self.check_val_every_n_epoch = check_val_every_n_epoch
        self.num_sanity_val_steps = num_sanity_val_steps
        self.log_every_n_steps = log_every_n_steps
        self.project_name = project_name
        self.default_root_dir = os.fspath(default_root_dir)
        self.callbacks: list[Callback] = list(callbacks or [])
        self.seed = seed
        self.enable_progress_bar = enable_progress_bar
        self.on_nonfinite_loss = on_nonfinite_loss
        self.check_rank_sync_every_n_steps = check_rank_sync_every_n_steps
        self._log_with = normalise_log_with(log_with)

        if seed is not None:
            _seed_everything(seed)
        self.collective_timeout = collective_timeout
        if accelerator is None:
            accelerator = _make_accelerator(cpu, mixed_precision, gradient_accumulation_steps, collective_timeout)
        elif gradient_accumulation_steps not in (1, accelerator.gradient_accumulation_steps):
            raise ConfigurationError(
                f"Trainer(gradient_accumulation_steps={gradient_accumulation_steps}) conflicts with the given "
                f"accelerator's gradient_accumulation_steps={accelerator.gradient_accumulation_steps}. Set it on one of them."
            )
        _check_launch(accelerator)
        _warn_if_restarts_cannot_reconnect()
        if collective_timeout is not None:
            _apply_collective_timeout(collective_timeout)
        check_requested_engine(accelerator)
        if accelerator.num_processes > 1:
            _settle_collectives_at_exit()
        check_precision_device(accelerator)
        self._accelerator = accelerator
        self.gradient_accumulation_steps = accelerator.gradient_accumulation_steps

        self.state = TrainingState()
        self.should_stop = False
        self._module: TrainingModule | None = None
        self._metrics: MetricCollector | None = None
        self._optimizers: list = []
        self._direct_backward = False
        self._scheduler_configs: list[SchedulerConfig] = []
        self._trackers: list = []
        self._logged: dict[str, float] = {}
        self.sanity_checking = False
        self.training = False
        #: the resolved configuration of a command-line run, logged with the hyperparameters
        self.run_config: dict[str, Any] | None = None
        self._monitor_on_validation = False
        self._tracking = False
        self._progress_bar: Any = None
        self._train_loader: Any = None
        self._train_loader_raw: Any = None
        #: this fit's run record (id, configuration fingerprint), written into its checkpoints
        self._run_record: dict[str, Any] | None = None
        self._run_lock: Any = None

    # -- facts ----------------------------------------------------------------------------------
    @property
    def accelerator(self) -> Any:
        return self._accelerator

    @property
    def global_step(self) -> int:
        return self.state.global_step

    @property
    def current_epoch(self) -> int:
        return self.state.current_epoch

    @property
    def optimizer_steps(self) -> list[int]:
        return self.state.optimizer_steps

    @property
    def optimizers(self) -> list:
        return self._optimizers

    @property
    def lr_schedulers(self) -> list[SchedulerConfig]:
        return self._scheduler_configs

    @property
    def callback_metrics(self) -> dict[str, torch.Tensor]:
        return self._metrics.callback_metrics if self._metrics is not None else {}

    @property
    def progress_bar_metrics(self) -> dict[str, Any]:
        return self._metrics.progress_bar_metrics if self._metrics is not None else {}

    @property
    def logged_metrics(self) -> dict[str, float]:
        return self._logged

    @property
    def is_global_zero(self) -> bool:
        return self._accelerator.is_main_process

    @property
    def world_size(self) -> int:
        return self._accelerator.num_processes

    @property
    def log_dir(self) -> str:
        return self.default_root_dir

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.default_root_dir, "checkpoints")

    @property
    def lightning_module(self) -> TrainingModule | None:
        return self._module

    @property
    def module(self) -> TrainingModule | None:
        return self._module

    @property
    def global_rank(self) -> int:
        """This process's rank among all processes."""
        return self._accelerator.process_index

    @property
    def local_rank(self) -> int:
        """This process's rank on its machine."""
        return self._accelerator.local_process_index

    @property
    def monitor_at_validation_end(self) -> bool:
        """True while ``ModelCheckpoint``/``EarlyStopping`` act at the end of each validation run.

        Lightning's rule: when validation does not run exactly once per epoch at its end
        (``check_val_every_n_epoch`` > 1, or validations inside the epoch through
        ``val_check_interval``), the callbacks act in ``on_validation_end`` of every validation
        run during fit; otherwise (and without validation) once per epoch, after the epoch's
        schedulers. Never during the sanity check, ``validate()`` or ``test()``.
        """
        return self._monitor_on_validation and self.training and not self.sanity_checking

    @property
    def checkpoint_callbacks(self) -> list[ModelCheckpoint]:
        return [cb for cb in self.callbacks if isinstance(cb, ModelCheckpoint)]

    @property
    def checkpoint_callback(self) -> ModelCheckpoint | None:
        """The first ``ModelCheckpoint`` among the callbacks (``None`` without one), as in Lightning."""
        found = self.checkpoint_callbacks
        return found[0] if found else None

    @property
    def early_stopping_callbacks(self) -> list[EarlyStopping]:
        return [cb for cb in self.callbacks if isinstance(cb, EarlyStopping)]

    @property
    def early_stopping_callback(self) -> EarlyStopping | None:
        """The first ``EarlyStopping`` among the callbacks (``None`` without one)."""
        found = self.early_stopping_callbacks
        return found[0] if found else None

    @property
    def loggers(self) -> list[LoggerView]:
        """The run's trackers through Lightning's logger API (while ``fit``/``validate``/``test`` run).

        On the main process, one :class:`~accel_trainer.loggers.LoggerView` per tracker; on the
        other ranks (trackers run on the main process only) as many views whose calls do nothing.
        Empty outside a run.
        """
        if not self._tracking:
            return []
        if self._accelerator.is_main_process:
            return [LoggerView(t, self, tracker_name(t)) for t in self._trackers]
        return [LoggerView(None, self, tracker_name(item)) for item in self._log_with]

    @property
    def logger(self) -> LoggerView | None:
        """The first of :attr:`loggers` (``None`` when nothing logs), as Lightning's ``trainer.logger``."""
        found = self.loggers
        return found[0] if found else None

    @property
    def estimated_stepping_batches(self) -> int | float:
        """How many ``global_step``s this ``fit`` will take (optimizer steps of each optimizer, without frequency).

        Lightning's formula: ``ceil(batches per epoch / gradient_accumulation_steps) * max_epochs``
        (batches per process, after ``limit_train_batches``), capped by ``max_steps``; ``max_steps``
        (or ``inf``) for a dataloader without length. Usable from ``configure_optimizers``, e.g.
        ``OneCycleLR(opt, max_lr, total_steps=self.trainer.estimated_stepping_batches)``.

        Raises:
            ConfigurationError: outside ``fit`` (there is no training dataloader to count).
        """
        if self._train_loader is not None:
            length = data_utils.loader_length(self._train_loader)
        elif self._train_loader_raw is not None:
            length = data_utils.loader_length(self._train_loader_raw)
            processes = self._accelerator.num_processes
            if length is not None and processes > 1 and not getattr(self._accelerator, "split_batches", False):
                length = math.ceil(length / processes)  # Accelerate's even sharding: batches per process
        else:
            raise ConfigurationError(
                "trainer.estimated_stepping_batches is known once fit() has its training dataloader (read it in "
                "configure_optimizers or later during fit)."
            )
        limit = data_utils.limit_batches(self.limit_train_batches, length, "limit_train_batches")
        batches = limit if limit != math.inf else length
        if batches is None:
            return self.max_steps if self.max_steps >= 0 else math.inf
        steps: int | float = math.inf
        if self.max_epochs is not None:
            steps = math.ceil(batches / self.gradient_accumulation_steps) * max(self.max_epochs, 1)
        return min(steps, self.max_steps) if self.max_steps >= 0 else steps

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on the main process only, through the progress bar when one is drawn (``self.print``)."""
        if not self._accelerator.is_main_process:
            return
        bar = self._progress_bar
        write = getattr(type(bar), "write", None) if bar is not None else None
        if callable(write) and "file" not in kwargs:
            write(kwargs.get("sep", " ").join(str(a) for a in args), end=kwargs.get("end", "\n"))
        else:
            print(*args, **kwargs)

    # -- fit ------------------------------------------------------------------------------------
    def fit(
        self,
        module: TrainingModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: Any = None,
        ckpt_path: str | os.PathLike | None = None,
    ) -> None:
        """Train ``module``. See the module docstring for where each hook fires.

        Args:
            module: the :class:`TrainingModule`.
            train_dataloaders: a dataloader (default: the datamodule's or module's ``train_dataloader()``).
            val_dataloaders: a dataloader or list (default: ``val_dataloader()``).
            datamodule: a :class:`DataModule`.
            ckpt_path: a checkpoint to resume from, or "last" for ``checkpoints/last.ckpt``
                (a fresh start, with a warning, when none exists yet).
        """
        self._attach(module, "fit", datamodule)
        try:
            # First: one live run per run directory, and no temporaries of a killed one left.
            self._claim_run_directory()
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
            # what trainer.estimated_stepping_batches counts while configure_optimizers runs
            self._train_loader, self._train_loader_raw = None, train_loaders[0]

            config = self._configure_optimizers(module)
            self._validate_against_module(module, config)
            self._check_engine(module, config)
            self._setup_optimization(module, config, train_loaders[0])
            self._train_loader = self._prepare_loader(train_loaders[0], even_batches=True)
            self._val_loaders = [self._prepare_loader(dl, even_batches=False) for dl in val_loaders]
            self.state.reset_for(len(self._optimizers))
            self.should_stop = False
            if ckpt_path is not None:
                # before the step hooks exist: torch's sharded-state API may initialise an
                # optimizer with a zero-lr step, which must not count as a training step
                self._restore(ckpt_path)
                _mark_stepped(self._optimizers, self.state.optimizer_steps)
            self._step_tracker = StepTracker(
                self._optimizers, self.state, self._warmup_per_optimizer(len(self._optimizers))
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
            # The run really starts here: a config or checkpoint refused above left the run
            # directory's records (config.yaml, metrics.csv, hparams.json, run_status.json) as they were.
            nothing_to_do = ckpt_path is not None and self._done()
            if nothing_to_do:
                self._say_nothing_to_do()
            else:
                self._start_trackers(module, resumed_from=ckpt_path)
                self._write_run_config()
            self._begin_run_status()

            self._preemption.install()
            self._hooks("on_fit_start")
            if self.num_sanity_val_steps and self._val_loaders:
                self._sanity_check()
            self.training = True
            self._hooks("on_train_start")
            self._fit_loop()
            self.training = False
            self._hooks("on_train_end")
            self._hooks("on_fit_end")
            self._end_run_status("finished", stop_reason="nothing left to do" if nothing_to_do else self._stop_reason())
        except Preempted as preempted:
            written = {"checkpoint": preempted.checkpoint_path} if preempted.checkpoint_path else {}
            self._end_run_status(
                "preempted", signal=preempted.signal_name, reason=self._preemption.cause, exit_code=preempted.code, **written
            )
            raise
        except BaseException as exc:
            _explain_collective_timeout(exc, self)
            self._end_run_status("failed", error=run_records.describe_error(exc))
            self._hooks.callbacks_only("on_exception", exc)
            raise
        finally:
            self._preemption.uninstall()
            self.training = False
            self._teardown("fit", datamodule)
            self._release_run_directory()

    def _fit_loop(self) -> None:
        while not self._done():
            if self._run_train_epoch():
                # stopped inside an epoch (max_steps): the epoch end did not write last.ckpt
                self._save_last()
                break

    def _done(self) -> bool:
        if self.should_stop:
            return True
        if self.max_steps is not None and self.max_steps >= 0 and self.state.global_step >= self.max_steps:
            return True
        return self.max_epochs is not None and self.state.current_epoch >= self.max_epochs

    def _run_train_epoch(self) -> bool:
        """One epoch. Returns True when ``max_steps`` ended it before its last batch."""
        module, state, metrics = self._module, self.state, self._metrics
        epoch = state.current_epoch
        loader = self._train_loader
        n_batches, limit = self._batches_per_epoch()
        val_every = self._val_every(n_batches)
        validate_this_epoch = self._validates_in_epoch(epoch)
        check_val = validate_this_epoch and bool(val_every)  # validations inside this epoch
        accumulate = self.gradient_accumulation_steps
        transfer = self._transfer
        # on_train_batch_start may return -1 (the module's answer) to end the epoch
        batch_start, batch_end = self._hooks.caller("on_train_batch_start", result=True), self._hooks.caller("on_train_batch_end")
        log_every, sync_every = self.log_every_n_steps, self.check_rank_sync_every_n_steps
        one_process, preemption = self._one_process, self._preemption

        metrics.stage = "train"
        metrics.epoch = epoch
        metrics.reset_stage("train")
        self._hooks("on_train_epoch_start")
        self._warn_if_no_step_logging(n_batches)
        self._epoch_first_step = state.global_step
        self._logged_steps_in_epoch = False
        skip = state.batches_done_in_epoch
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        if self._resume is None:  # the usual case: the loader's own iterator, no generator in between
            self._epoch_start = ckpt_io.capture_epoch_start(loader)
            iterator = iter(loader)
        else:
            iterator = self._epoch_iterator(loader, skip)
        progress = self._progress_bar = self._progress(n_batches, epoch, skip)
        stopped_by_steps = False
        # resumed from a checkpoint written inside a batch: first what was still due after it
        stop = self._finish_resumed_batch(skip, n_batches, val_every, validate_this_epoch)
        batch_idx = skip - 1
        for batch_idx in itertools.count(skip):
            if stop or batch_idx >= limit:
                if self._resume is not None:
                    next(iterator, None)  # nothing left to train: still replay the epoch's shuffling draw and RNG
                break
            try:
                batch = next(iterator)
            except StopIteration:
                break
            if transfer is not None:
                batch = transfer(batch, 0)
            metrics.set_batch(batch)
            if batch_start is not None and batch_start(batch, batch_idx) == -1:
                break
            is_boundary = (batch_idx + 1) % accumulate == 0 or (n_batches is not None and batch_idx + 1 >= n_batches)
            outputs = self._train_batch(batch, batch_idx, is_boundary)
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
                stopped_by_steps = not last
                if stopped_by_steps:
                    # a pause after a complete batch: its validation (if due) and plateau steps included
                    self._finish_batch(batch_idx + 1, val_every, validate_this_epoch)
                break
            if self.should_stop if one_process else self._should_stop_now(is_boundary):
                break  # the epoch ends here, with its validation (as Lightning validates on a stop)
            if (check_val or state.pending_plateau) and not last:
                if self._finish_batch(batch_idx + 1, val_every, validate_this_epoch):
                    break  # a validation decided to stop (EarlyStopping): the epoch ends right after it
        self._settle_nonfinite()
        if stopped_by_steps:
            # A max_steps stop inside an epoch is a pause, not an epoch end: the position is kept
            # so that resuming with a larger max_steps continues this very epoch.
            self._close_progress(progress)
            self._progress_bar = None
            self._end_train_epoch_metrics()
            return True
        if validate_this_epoch and state.validated_at != state.batches_done_in_epoch:
            self._run_validation()
        # closed after the epoch's validation, so its last line shows this epoch's values
        self._close_progress(progress)
        self._progress_bar = None
        if self._automatic:
            self._runner.flush_pending()  # step-interval plateau schedulers due on the last batch
        self._end_train_epoch_metrics()
        self._hooks("on_train_epoch_end", monitoring=False)
        state.current_epoch = epoch + 1
        state.start_epoch()
        if self._automatic:  # as in Lightning, manual optimization steps its own schedulers
            self._runner.after_epoch(epoch + 1)
        self._check_rank_sync()
        # monitoring callbacks (checkpoint, early stopping) see the epoch fully finished
        for fn in self._monitoring_epoch_end():
            fn(self, module)
        # One collective for both flags: a preemption signal is also agreed at every epoch end,
        # which bounds its latency when steps became slower than the poll interval assumed.
        self.should_stop, preempt = self._any_rank_each(self.should_stop, self._preemption.requested)
        self._save_last()
        if preempt:
            self._preempt(None, save=False)  # last.ckpt was just written at this epoch boundary
        self._update_run_status()
        return False

    def _batches_per_epoch(self) -> tuple[int | None, int | float]:
        """(batches this epoch trains, or None when unknown; the ``limit_train_batches`` bound)."""
        length = data_utils.loader_length(self._train_loader)
        limit = data_utils.limit_batches(self.limit_train_batches, length, "limit_train_batches")
        return (limit if limit != math.inf else length), limit

    def _validates_in_epoch(self, epoch: int) -> bool:
        return bool(self._val_loaders) and self.limit_val_batches != 0 and (epoch + 1) % self.check_val_every_n_epoch == 0

    def _validation_not_once_per_epoch(self) -> bool:
        """Lightning's condition for ModelCheckpoint/EarlyStopping to act after each validation run."""
        if not self._val_loaders or self.limit_val_batches == 0:
            return False  # no validation: they act at each epoch end
        if self.check_val_every_n_epoch != 1:
            return True
        n_batches, _ = self._batches_per_epoch()
        every = self._val_every(n_batches)
        return every is not None and (n_batches is None or every < n_batches)

    def _finish_batch(self, done: int, val_every: int | None, validate_this_epoch: bool) -> bool:
        """After the ``done``-th batch of the epoch (not its last): the validation due there, then the
        step-interval plateau steps that waited for it. Returns True when training stops
        (decided in that validation, e.g. by EarlyStopping; agreed by every rank)."""
        stop = False
        if validate_this_epoch and val_every and done % val_every == 0 and self.state.validated_at != done:
            self._run_validation()
            stop = self.should_stop = self._any_rank(self.should_stop)
        if self._automatic:
            self._runner.flush_pending()
        return stop

    def _finish_resumed_batch(self, skip: int, n_batches: int | None, val_every: int | None, validate_this_epoch: bool) -> bool:
        """Resumed from a checkpoint written inside batch ``skip`` - 1 (in ``on_train_batch_end``, by a
        preemption, or in ``on_validation_end``): run what was still due after that batch -- its
        validation unless the checkpoint says it ran, then the plateau steps waiting for it --
        from the RNG state of the save, as the uninterrupted run did. (After an epoch's last batch
        this happens at the epoch end instead.) Returns True when that validation stops training."""
        resume = self._resume
        if resume is None or not skip or (n_batches is not None and skip >= n_batches):
            return False
        due = validate_this_epoch and bool(val_every) and skip % val_every == 0 and self.state.validated_at != skip
        if not due and not self.state.pending_plateau:
            return False
        self._epoch_start = resume["epoch_start"]
        ckpt_io.restore_rng_state(resume["rng"])
        stop = self._finish_batch(skip, val_every, validate_this_epoch)
        resume["rng"] = ckpt_io.capture_rng_state()  # the batches that follow start from here
        return stop

    def _epoch_iterator(self, loader: Any, skip: int) -> Iterable:
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

    def _preemption_due(self) -> bool:
        """True once every rank knows a preemption signal arrived (on any rank)."""
        if self._one_process:
            return self._preemption.requested
        step = self.state.global_step
        if not self._preempt_agreed and self._preemption_poll.due(step):
            self._preempt_agreed = self._preemption_poll.exchange(step, self._preemption.requested, self.accelerator.device)
        return self._preempt_agreed

    def _preempt(self, progress: Any, save: bool = True) -> None:
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
            _say_safely(
                f"accel_trainer: {cause}; {outcome}. Exiting with code {exit_code_for(signal_name)}; run the same "
                "command again (ckpt_path='last') to resume."
            )
        raise Preempted(path if written else None, signal_name)

    def _should_stop_now(self, is_boundary: bool) -> bool:
        """``should_stop`` agreed by all ranks; on several ranks checked at logging boundaries only."""
        if self._one_process:
            return self.should_stop
        if not (is_boundary and self.state.global_step % self.log_every_n_steps == 0):
            return False
        self.should_stop = self._any_rank(self.should_stop)
        return self.should_stop

    def _any_rank_each(self, *flags: bool) -> list[bool]:
        """For each flag, whether any rank has it set (one collective for all of them; every rank calls it)."""
        return collectives.any_rank_each(self.accelerator, *flags)

    def _any_rank(self, flag: bool) -> bool:
        """Whether any rank has ``flag`` set (one collective; every rank calls it)."""
        return collectives.any_rank(self.accelerator, flag)

    def _monitoring_epoch_end(self) -> list[Callable]:
        cbs, _ = self._hooks._cache.get("on_train_epoch_end") or self._hooks._resolve("on_train_epoch_end")
        return [fn for fn in cbs if getattr(fn.__self__, "monitors_metrics", False)]

    def _end_train_epoch_metrics(self) -> None:
        metrics = self._metrics
        metrics.stage = "train"
        results = metrics.compute_epoch("train", self._gather_from_ranks)
        if not self._logged_steps_in_epoch and self.state.global_step > self._epoch_first_step:
            # No log_every_n_steps boundary fell in this epoch (a short run or short epochs):
            # its latest step values go to the trackers now rather than never.
            results = {**self._metrics.step_values_for_loggers("train", self.accelerator.reduce), **results}
        if results:
            self._log_to_trackers({**results, "epoch": self.state.current_epoch}, self.state.global_step)

    def _warn_if_no_step_logging(self, n_batches: Any) -> None:
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

    def _close_progress(self, progress: Any) -> None:
        if progress is not None:
            progress.set_postfix(self._progress_postfix(), refresh=False)
            progress.close()

    def _after_boundary(self, progress: Any) -> None:
        """At a logging boundary or a rank-sync step (the epoch loop checks which steps are)."""
        step = self.state.global_step
        if self.check_rank_sync_every_n_steps and step % self.check_rank_sync_every_n_steps == 0:
            self._check_rank_sync()
        if step % self.log_every_n_steps == 0:
            self._logged_steps_in_epoch = True
            values = self._metrics.step_values_for_loggers("train", self.accelerator.reduce)
            if values:
                values["epoch"] = self.state.current_epoch
                self._log_to_trackers(values, step)
            if progress is not None:
                progress.set_postfix(self._progress_postfix(), refresh=False)

    # -- one batch ------------------------------------------------------------------------------
    def _train_batch(self, batch: Any, batch_idx: int, is_boundary: bool) -> Any:
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
        due = self._all_optimizer_indices if self._frequency_cumsum is None else self._due_optimizers()
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
        if self._guard.deferred:
            self._guard.end_batch(self._where)  # accelerators: start copying this batch's flags to the host
        return outputs

    def _due_optimizers(self) -> Iterable[int]:
        if self._frequency_cumsum is None:
            return self._all_optimizer_indices
        place = self.state.global_step % self._frequency_cumsum[-1]
        return (bisect.bisect_right(self._frequency_cumsum, place),)

    def _optimize(self, batch: Any, batch_idx: int, opt_idx: int, is_boundary: bool) -> Any:
        if self._toggle is not None:
            self._toggle.enter(opt_idx)  # only optimizer opt_idx's parameters require grad
        loss = self._forward_backward(batch, batch_idx, opt_idx)
        if loss is None:
            return self._last_output
        if not is_boundary:
            self._guard.check_loss(opt_idx, loss, self._where)
            return self._last_output
        optimizer = self._optimizers[opt_idx]
        if self._guard.check_step(opt_idx, loss, self._where):
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
                self._module.optimizer_zero_grad(self.state.current_epoch, batch_idx, optimizer)
        else:
            closure = _Closure(self, batch, batch_idx, opt_idx, loss.detach())
            self._module.optimizer_step(self.state.current_epoch, batch_idx, optimizer, opt_idx, closure)
        after = steps[opt_idx]
        if after != before:
            every_step = self._every_step[opt_idx]
            if every_step is not None and after == before + 1:
                for scheduler in every_step:  # SchedulerRunner's usual case, without its two calls
                    scheduler.step()
            else:
                self._runner.after_optimizer_steps(opt_idx, before, after)
        return self._last_output

    def _where(self) -> dict[str, Any]:
        """Where the loop is, for the non-finite guard's messages."""
        return {
            "epoch": self.state.current_epoch,
            "batch_idx": self._batch_idx,
            "main_process": self.accelerator.is_main_process,
        }

    def _forward_backward(self, batch: Any, batch_idx: int, opt_idx: int) -> torch.Tensor | None:
        args = (batch, batch_idx, opt_idx) if self._pass_optimizer_idx else (batch, batch_idx)
        if self._call_directly and not (_GLOBAL_PRE or _GLOBAL_POST or _GLOBAL_BACKWARD_PRE or _GLOBAL_BACKWARD):
            # the dispatcher is not wrapped (one process, no autocast) and has no hooks: its
            # nn.Module __call__ would only forward the call (~3 µs per step saved)
            output = self._module.training_step(*args)
        else:
            output = self._wrappers[opt_idx]("training_step", *args)
        self._last_output = output
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
        if self._guard.poison_backward:  # DDP "skip": a non-finite loss seeds its backward with NaN
            self.accelerator.backward(loss, **self._guard.backward_kwargs(loss))
        elif self._direct_backward:
            loss.backward()
        elif self._engine.step_inside_backward and self.accelerator.sync_gradients and self._automatic:
            # DeepSpeed takes the optimizer step inside this backward: the warm-up goes around it
            with self._step_tracker.warmup_applied(opt_idx):
                self.accelerator.backward(loss)
        else:
            self.accelerator.backward(loss)
        if self._on_after_backward is not None:
            self._on_after_backward()
        # kept as returned (detached only when shown): the graph is kept alive by _last_output anyway
        self._last_loss = self._last_losses[opt_idx] = loss
        return loss

    def _nonfinite_is_fatal(self) -> bool:
        return self.on_nonfinite_loss == "raise"

    def _settle_nonfinite(self) -> None:
        """Read the non-finite flags still in flight (accelerators, "raise"): before saves, validation, epoch ends."""
        guard = getattr(self, "_guard", None)
        if guard is not None:
            guard.flush()

    def _extract_loss(self, output: Any, opt_idx: int) -> torch.Tensor | None:
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

    def _log_legacy_dicts(self, output: dict) -> None:
        """Lightning 0.7's ``{"loss": ..., "log": {...}, "progress_bar": {...}}``."""
        logs = output.get("log")
        if isinstance(logs, dict):
            for name, value in logs.items():
                if isinstance(value, (torch.Tensor, int, float)):
                    self._metrics.log(name, value)
        bar = output.get("progress_bar")
        if isinstance(bar, dict):
            for name, value in bar.items():
                if isinstance(value, (torch.Tensor, int, float)):
                    self._metrics.progress_bar_metrics[name] = value

    def _clip_gradients(self, opt_idx: int) -> None:
        if self.gradient_clip_val is None:
            return
        self._engine.clip_gradients(
            self._optimizers[opt_idx], self._optimizer_params[opt_idx], self._wrapped, len(self._optimizers),
            self.gradient_clip_val, self.gradient_clip_algorithm,
        )

    # -- validation -----------------------------------------------------------------------------
    def _run_validation(self) -> dict[str, float]:
        self._settle_nonfinite()
        try:
            return self._evaluate("validate", self._val_loaders, self.limit_val_batches, log=True)
        except _ValidationInterrupted:
            self._preempt(self._progress_bar)  # writes last.ckpt and raises Preempted
            raise  # pragma: no cover - _preempt always raises

    def _sanity_check(self) -> None:
        self.sanity_checking = True
        self._hooks.callbacks_only("on_sanity_check_start")
        saved = dict(self._metrics.callback_metrics)
        self._evaluate("sanity", self._val_loaders, self.num_sanity_val_steps, log=False)
        self._metrics.callback_metrics.clear()
        self._metrics.callback_metrics.update(saved)
        self._hooks.callbacks_only("on_sanity_check_end")
        self.sanity_checking = False

    def _evaluate(self, stage: str, loaders: list, limit: Any, log: bool) -> list[dict[str, float]]:
        """One validation/test/sanity run over ``loaders``; returns one results dict per dataloader."""
        module, metrics = self._module, self._metrics
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
                batches = itertools.chain([first], iterator) if first is not None else iter(())
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
            # Abandon this validation: no results, no callbacks; the checkpoint written next records
            # that it did not run (validated_at unchanged), so a resume runs it again, from the RNG
            # state it started from.
            metrics.reset_stage(stage)
            metrics.stage = previous_stage
            for m, training in modes:
                m.training = training
            ckpt_io.restore_rng_state(rng_at_start)
            raise _ValidationInterrupted()
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
        metrics.stage = previous_stage
        train_hook = f"on_{kind}_model_train"
        if getattr(type(module), train_hook) is not getattr(TrainingModule, train_hook):
            getattr(module, train_hook)()
        else:
            for m, training in modes:
                m.training = training
        return metrics.results_by_dataloader(stage, results, len(loaders))

    def validate(self, module: TrainingModule, dataloaders: Any = None, datamodule: Any = None) -> list[dict]:
        """Run one validation pass; returns one dict of metrics per dataloader (as Lightning)."""
        return self._eval_entry("validate", module, dataloaders, datamodule, "val_dataloader")

    def test(self, module: TrainingModule, dataloaders: Any = None, datamodule: Any = None) -> list[dict]:
        """Run one test pass; returns one dict of metrics per dataloader (as Lightning)."""
        return self._eval_entry("test", module, dataloaders, datamodule, "test_dataloader")

    def _eval_entry(self, stage: str, module: TrainingModule, dataloaders: Any, datamodule: Any, factory: str) -> list[dict]:
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

    # -- set-up -----------------------------------------------------------------------------------
    def _attach(self, module: TrainingModule, stage: str, datamodule: Any) -> None:
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
            _seed_everything(self.seed)
        self._module = module
        module.trainer = self
        self.callbacks = self._with_module_callbacks(module)
        self._metrics = MetricCollector(self.accelerator.device, self.accelerator.num_processes, module)
        self._hooks = _Hooks(self, module, self.callbacks)
        # the hooks of every optimizer step, resolved once (None: nobody implements it)
        self._on_before_backward = self._hooks.caller("on_before_backward")
        self._on_after_backward = self._hooks.caller("on_after_backward")
        self._on_before_optimizer_step = self._hooks.caller("on_before_optimizer_step")
        self._on_before_zero_grad = self._hooks.caller("on_before_zero_grad")  # for the default optimizer_step
        self._call_directly = False
        self._engine = engine_for(self.accelerator)
        self._transfer = _batch_transfer_hook(module, datamodule)
        self._last_output = None
        self._last_loss = None
        self._last_losses: dict[int, torch.Tensor] = {}
        self._warned_log_interval = False
        self._epoch_first_step = 0
        self._logged_steps_in_epoch = False
        self._run_started = False
        self._csv_tracker: CSVTracker | None = None
        self._resume: dict[str, Any] | None = None
        self._preemption = PreemptionWatcher(announce=self.accelerator.is_main_process)
        self._preempt_agreed = False
        self._preemption_poll = PreemptionPoll()
        self._one_process = self.accelerator.num_processes == 1  # asked on every step
        self._guard: NonFiniteGuard | None = None
        self._toggle: OptimizerToggle | None = None
        self._batch_idx = 0
        self._epoch_start: dict[str, Any] | None = None
        module_prepares = type(module).prepare_data is not TrainingModule.prepare_data
        if datamodule is not None or module_prepares:
            # once per machine, before setup; the DataModule's first, then the module's (as in Lightning)
            if self.accelerator.is_local_main_process:
                if datamodule is not None and callable(getattr(datamodule, "prepare_data", None)):
                    datamodule.prepare_data()
                if module_prepares:
                    module.prepare_data()
            self.accelerator.wait_for_everyone()
        if datamodule is not None and callable(getattr(datamodule, "setup", None)):
            datamodule.setup(stage)
        self._hooks("setup", stage)

    def _with_module_callbacks(self, module: TrainingModule) -> list[Callback]:
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

    def _teardown(self, stage: str, datamodule: Any) -> None:
        tracker = getattr(self, "_step_tracker", None)
        if tracker is not None:
            tracker.remove()
            self._step_tracker = None
        for t in self._trackers:
            try:
                t.finish()
            except Exception as err:  # a tracker failing to close must not mask the run's own error
                warnings.warn(f"Tracker {type(t).__name__} failed to finish: {err}", UserWarning)
        self._trackers = []
        self._tracking = False
        if datamodule is not None and callable(getattr(datamodule, "teardown", None)):
            datamodule.teardown(stage)
        self._hooks("teardown", stage)

    def _configure_optimizers(self, module: TrainingModule) -> OptimizationConfig:
        module.to(self.accelerator.device)
        return parse_configure_optimizers(module.configure_optimizers())

    def _validate_against_module(self, module: TrainingModule, config: OptimizationConfig) -> None:
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

    def _check_engine(self, module: TrainingModule, config: OptimizationConfig) -> None:
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

    def _setup_optimization(self, module: TrainingModule, config: OptimizationConfig, train_loader: Any = None) -> None:
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
        self._call_directly = len(wrappers) == 1 and _is_bare_dispatcher(wrappers[0])
        self._gradient_state = accelerator.gradient_state
        self._optimizers = prepared.optimizers
        _cache_accelerate_availability_checks()
        for opt in self._optimizers:
            _install_fast_zero_grad(opt)
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
        self._all_optimizer_indices = tuple(range(n_opt))
        self._frequency_cumsum = list(itertools.accumulate(config.frequencies)) if config.frequencies else None
        self._optimizer_params = [
            [p for g in opt.param_groups for p in g["params"]] for opt in self._optimizers
        ]
        self._toggle = OptimizerToggle(self._optimizer_params) if n_opt > 1 and self._automatic else None
        self._guard = self._make_guard(module) if self._automatic and n_opt else None

    def _make_guard(self, module: TrainingModule) -> NonFiniteGuard:
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

    @property
    def nonfinite_skips(self) -> int:
        """Optimizer steps skipped in this fit for a non-finite loss or gradients (``on_nonfinite_loss="skip"``)."""
        return self._guard.skipped if self._guard is not None else 0

    def _make_dispatchers(self, module: TrainingModule, config: OptimizationConfig) -> list[_StepDispatcher]:
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
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(dispatcher, ignored)
            dispatchers.append(dispatcher)
        return dispatchers

    def _prepare_model_only(self, module: TrainingModule) -> None:
        module.to(self.accelerator.device)
        self._wrapped = self._engine.prepare_for_evaluation(_StepDispatcher(module))

    def _prepare_loader(self, loader: Any, even_batches: bool) -> Any:
        accelerator = self.accelerator
        previous = accelerator.even_batches
        # Validation shards are uneven on purpose: padding duplicates would bias the metrics.
        accelerator.even_batches = even_batches
        try:
            prepared = accelerator.prepare(loader)
        finally:
            accelerator.even_batches = previous
        _skip_noop_placement(prepared)
        return prepared

    def _warmup_per_optimizer(self, n_opt: int) -> list[int | None]:
        warmup: list[int | None] = [None] * n_opt
        for cfg in self._scheduler_configs:
            if cfg.warmup_steps:
                warmup[cfg.opt_idx] = cfg.warmup_steps
        return warmup

    def _val_every(self, n_batches: Any) -> int | None:
        v = self.val_check_interval
        if isinstance(v, float):
            if v >= 1.0 or n_batches is None:
                return None
            return max(1, int(n_batches * v))
        return int(v)

    # -- logging ----------------------------------------------------------------------------------
    def _start_trackers(self, module: TrainingModule, resumed_from: Any = None, log_dir: str | None = None) -> None:
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

    def _is_own_checkpoint(self, ckpt_path: Any) -> bool:
        """Whether ``ckpt_path`` ("last" or a path) lies in this run directory (whose table it continues)."""
        if os.fspath(ckpt_path) == "last":
            return True
        root = os.path.realpath(self.default_root_dir)
        return os.path.realpath(os.fspath(ckpt_path)).startswith(root + os.sep)

    def _log_to_trackers(self, values: dict[str, float], step: int) -> None:
        self._logged.update(values)
        for tracker in self._trackers:
            tracker.log(values, step=step)
        if self._csv_tracker is not None:
            self.state.logged_rows = self._csv_tracker.rows

    # -- the run's records --------------------------------------------------------------------------
    def _write_run_config(self) -> None:
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

    def _status_fields(self) -> dict[str, Any]:
        return {
            "command": "fit",
            "run_id": (self._run_record or {}).get("id"),
            "step": self.state.global_step,
            "epoch": self.state.current_epoch,
            "checkpoint": run_records.last_checkpoint(os.path.abspath(self.default_root_dir)),
            "world_size": self.world_size,
        }

    def _begin_run_status(self) -> None:
        self._run_started = True
        if self.is_global_zero:
            run_records.write_run_status(self.default_root_dir, "running", **self._status_fields())

    def _update_run_status(self) -> None:
        if self._run_started and self.is_global_zero:
            run_records.write_run_status(self.default_root_dir, "running", **self._status_fields())

    def _end_run_status(self, status: str, **fields: Any) -> None:
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
            warnings.warn(f"Could not write {run_records.STATUS_FILE}: {err}", UserWarning)

    def _stop_reason(self) -> str:
        if self.should_stop:
            return "should_stop"
        if self.max_steps >= 0 and self.state.global_step >= self.max_steps:
            return "max_steps"
        return "max_epochs"

    def _say_nothing_to_do(self) -> None:
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

    def log_to_trackers(self, values: dict[str, float], step: int | None = None) -> None:
        """Send already-computed values (floats) to every tracker, e.g. from a callback."""
        self._log_to_trackers(values, self.state.global_step if step is None else step)

    def _gather_from_ranks(self, items: list) -> list:
        """Everything every rank passed in, in rank order (one object collective)."""
        return collectives.gather_objects(items)

    def _progress(self, total: Any, epoch: int, initial: int = 0) -> Any:
        return make_progress(total, epoch, self.enable_progress_bar and self.accelerator.is_main_process, initial=initial)

    def _progress_postfix(self) -> dict[str, str]:
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
        from_epoch = self._metrics.progress_bar_epochs
        for name, value in self._metrics.progress_bar_metrics.items():
            # an epoch value (validation, on_epoch) shown during a later epoch says which epoch it is from
            epoch = from_epoch.get(name)
            key = name if epoch is None or epoch == current else f"{name} (epoch {epoch})"
            postfix[key] = f"{float(value):.4g}"
        tracker = getattr(self, "_step_tracker", None)
        if tracker is not None and self._optimizers:
            # the learning rate of each optimizer's next real step (warm-up included), first param group
            postfix["lr"] = "/".join(f"{tracker.effective_lrs(i, opt)[0]:.1e}" for i, opt in enumerate(self._optimizers))
        return postfix

    # -- rank sync ------------------------------------------------------------------------------
    def _check_rank_sync(self) -> None:
        """Compare counters and learning rates across ranks (no-op on one process)."""
        collectives.check_rank_sync(self)

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, path: str | os.PathLike) -> bool:
        """Write a full checkpoint (atomically) to ``path``; every rank must call this.

        Under FSDP ``path`` becomes a directory every rank writes its shards into (see the
        README's "Checkpoints and resuming"); otherwise it is one file.

        Returns False, writing nothing, when the model's weights are not finite (a NaN or an
        infinity in a parameter or buffer): whatever ``path`` held is kept, and a warning
        says so. A checkpoint is never written with non-finite weights.
        """
        self._settle_nonfinite()  # a bad step still being checked raises before it is saved
        tracker = getattr(self, "_step_tracker", None)
        with tracker.paused() if tracker is not None else contextlib.nullcontext():
            return ckpt_io.save(os.fspath(path), self._checkpoint_parts(), lambda c: self._hooks("on_save_checkpoint", c))

    def _checkpoint_parts(self) -> ckpt_io.CheckpointParts:
        return ckpt_io.CheckpointParts(
            accelerator=self.accelerator,
            engine=self._engine,
            module=self._module,
            wrapper=self._wrapped,
            optimizers=self._optimizers,
            schedulers=[cfg.scheduler for cfg in self._scheduler_configs],
            state=self.state,
            callbacks=self.callbacks,
            callback_metrics=self._metrics.callback_metrics,
            train_loader=getattr(self, "_train_loader", None),
            epoch_start=self._epoch_start,
            run=self._run_record,
        )

    def _save_last(self) -> bool:
        return self.save_checkpoint(os.path.join(self.checkpoint_dir, ckpt_io.LAST_NAME))

    def _restore(self, ckpt_path: str | os.PathLike) -> None:
        path = os.fspath(ckpt_path)
        implicit = path == "last"
        if implicit:
            path = os.path.join(self.checkpoint_dir, ckpt_io.LAST_NAME)
            if self.accelerator.is_main_process:
                ckpt_io.resolve(path)  # repairs a directory publish a crash interrupted
            self.accelerator.wait_for_everyone()
            if not ckpt_io.exists(path):  # a file, or a directory for sharded checkpoints
                if self.is_global_zero:  # once, not once per rank
                    warnings.warn(f"ckpt_path='last' but {path} does not exist yet: starting from scratch.", UserWarning)
                return
        own = self._is_own_checkpoint(ckpt_path)

        def on_load(checkpoint: dict[str, Any]) -> None:
            saved = checkpoint.get("run") or {}
            if own and saved.get("id"):
                self._run_record["id"] = saved["id"]  # the same run continues
            elif saved.get("id"):
                self._run_record["resumed_from_run"] = saved["id"]
            self._hooks("on_load_checkpoint", checkpoint)

        self._resume = ckpt_io.restore(path, self._checkpoint_parts(), on_load, implicit=implicit)

    # -- the run directory --------------------------------------------------------------------------
    def _claim_run_directory(self) -> None:
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
                _say_safely(note)
        if acc.num_processes > 1:
            acc.wait_for_everyone()  # the clean-up is done before any rank reads a checkpoint

    def _release_run_directory(self) -> None:
        lock, self._run_lock = getattr(self, "_run_lock", None), None
        if lock is not None:
            lock.release()


def _new_run_id() -> str:
    """A new run id: 12 hex digits."""
    import uuid

    return uuid.uuid4().hex[:12]


def _say_safely(message: str) -> None:
    """One line on stderr; a closed stderr (the launcher is gone) must not turn it into a crash."""
    try:
        print(message, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _mark_stepped(optimizers: list, steps: list[int]) -> None:
    """Tell torch's schedulers that the optimizers which stepped before a checkpoint did step.

    A resumed run may step a scheduler before its optimizer's first step in this process (a
    plateau step still due after the checkpoint's batch, an epoch scheduler after a batch that
    skipped that optimizer); torch would then warn "lr_scheduler.step() before optimizer.step()",
    wrongly: nothing of the schedule is skipped. torch sets the same flag on every real step.
    """
    from .optim import unwrap_optimizer

    for optimizer, count in zip(optimizers, steps):
        if count:
            unwrap_optimizer(optimizer)._opt_called = True


def _overrides(module: TrainingModule, name: str) -> bool:
    """Whether ``module`` replaces ``TrainingModule.<name>`` (in its class or on the instance)."""
    return getattr(type(module), name) is not getattr(TrainingModule, name) or name in vars(module)


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


def _is_bare_dispatcher(wrapper: Any) -> bool:
    """The prepared model is our own ``_StepDispatcher``, unwrapped, its ``forward`` untouched, without hooks.

    That is the case on one process without mixed precision (Accelerate's ``prepare`` hands the
    model back as it is); DDP/FSDP wrappers, Accelerate's autocast ``forward`` or a hook make it
    False (``internals.forward_callable_directly`` reads torch's private hook dicts).
    """
    return type(wrapper) is _StepDispatcher and forward_callable_directly(wrapper)


def _batch_transfer_hook(module: TrainingModule, datamodule: Any) -> Callable | None:
    """``on_after_batch_transfer`` of the DataModule or else the module, when one defines it (else None)."""
    hook = getattr(datamodule, "on_after_batch_transfer", None) if datamodule is not None else None
    if callable(hook):
        return hook
    if type(module).on_after_batch_transfer is not TrainingModule.on_after_batch_transfer:
        return module.on_after_batch_transfer
    return None

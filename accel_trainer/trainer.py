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

Where the code is: this module is the facade (arguments, the ``Accelerator``, fit/validate/test,
properties, checkpoints); the loop above is :mod:`accel_trainer.fit_loop` (``_train_batches`` is
the batch loop), one batch's optimizers :mod:`accel_trainer.optimization_step`, validation/test
:mod:`accel_trainer.evaluation`, set-up :mod:`accel_trainer.run_setup`, hook calls
:mod:`accel_trainer.hooks`, the run's records :mod:`accel_trainer.tracking`, and the state they
share :mod:`accel_trainer.run_state`. The loop's rules come from :mod:`accel_trainer.plan`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import warnings
from typing import Any

import torch
from torch.nn.modules import module as nn_module

from . import checkpoint as ckpt_io
from . import data as data_utils
from . import run_status as run_records
from .callbacks.base import Callback
from .callbacks.early_stopping import EarlyStopping
from .callbacks.model_checkpoint import ModelCheckpoint
from .engines import check_requested_engine, requested_engine
from .errors import ConfigurationError, TrainingError
from .evaluation import Evaluation
from .fit_loop import FitLoop
from .loggers import LoggerView, normalise_log_with, tracker_name
from .metrics import MetricCollector
from .migration import (
    accelerator_string_message,
    check_precision_device,
    refuse_lightning_arguments,
)
from .module import TrainingModule
from .optim import SchedulerConfig, unwrap_optimizer
from .optimization_step import OptimizationStep
from .preemption import Preempted
from .progress import make_progress
from .run_setup import RunSetup, _StepDispatcher
from .run_state import RunState
from .state import TrainingState
from .tracking import RunTracking, _say_safely

MIXED_PRECISION = ("no", "bf16", "fp16")
_EXHAUSTED = object()
CLIP_ALGORITHMS = ("norm", "value")
NONFINITE_POLICIES = ("raise", "skip")


@functools.cache
def _cache_accelerate_availability_checks() -> None:
    """Cache ``accelerate.optimizer.is_lomo_available`` (done once, when the first run is set up).

    ``AcceleratedOptimizer.step`` calls ``is_lomo_available()`` twice on every step, and that is
    an uncached ``importlib.util.find_spec`` (a walk over ``sys.path`` with ``stat`` calls):
    about 0.1 ms per step, a quarter of a tiny model's whole step on CPU. Whether a package is
    installed cannot change during a run, so the answer is cached; only the name that
    ``accelerate.optimizer`` looks up is replaced, nothing else in Accelerate changes.
    """
    try:
        import accelerate.optimizer as accelerate_optimizer
    except Exception:  # pragma: no cover - a very different Accelerate version
        return
    check = getattr(accelerate_optimizer, "is_lomo_available", None)
    if callable(check) and not hasattr(check, "cache_info"):
        accelerate_optimizer.is_lomo_available = functools.lru_cache(maxsize=None)(check)


def _install_fast_zero_grad(optimizer: Any) -> None:
    """Give one prepared ``AcceleratedOptimizer`` a ``zero_grad`` that skips ``inspect.signature``.

    Accelerate's ``zero_grad`` inspects the wrapped optimizer's ``zero_grad`` signature on every
    call (about 50 µs). The answer is fixed for a given optimizer, so it is computed once here;
    the body is otherwise Accelerate's own: zero only when gradients sync, ``set_to_none``
    defaulting to True when the optimizer accepts it.
    """
    inner = getattr(optimizer, "optimizer", None)
    gradient_state = getattr(optimizer, "gradient_state", None)
    if inner is None or gradient_state is None or "zero_grad" in vars(optimizer):
        return
    from accelerate.optimizer import AcceleratedOptimizer

    if type(optimizer).zero_grad is not AcceleratedOptimizer.zero_grad:
        return  # a subclass with its own zero_grad: leave it alone
    try:
        accept_arg = "set_to_none" in inspect.signature(inner.zero_grad).parameters
    except (TypeError, ValueError):  # pragma: no cover - uninspectable builtin
        return

    def zero_grad(set_to_none: bool | None = None) -> None:
        if gradient_state.sync_gradients:
            if accept_arg:
                optimizer.optimizer.zero_grad(set_to_none=True if set_to_none is None else set_to_none)
            else:
                if set_to_none is not None:
                    raise ValueError("`set_to_none` for Optimizer.zero_grad` is not supported by this optimizer.")
                optimizer.optimizer.zero_grad()

    optimizer.zero_grad = zero_grad
    _install_fast_step(optimizer, AcceleratedOptimizer)


def _install_fast_step(optimizer: Any, accelerated_cls: type) -> None:
    """Give a prepared ``AcceleratedOptimizer`` a ``step`` without Accelerate's per-call checks.

    Without an fp16 ``GradScaler``, on anything but XLA and for optimizers other than LOMO,
    Accelerate's ``step`` reduces to ``if gradient_state.sync_gradients: optimizer.step(closure)``,
    but first reads an environment variable (``is_xla_gradients_synced``) and checks LOMO's
    availability on every call. This does just the reduced body; should a scaler appear later,
    it hands over to Accelerate's own ``step``.
    """
    if type(optimizer).step is not accelerated_cls.step or "step" in vars(optimizer):
        return
    if getattr(optimizer, "scaler", None) is not None:
        return
    if "XLA" in str(getattr(optimizer.accelerator_state, "distributed_type", "")):
        return
    inner, gradient_state = optimizer.optimizer, optimizer.gradient_state
    if type(inner).__module__.startswith("lomo_optim"):
        return
    accelerated_step = accelerated_cls.step

    def step(closure: Any = None) -> Any:
        if optimizer.scaler is not None:
            return accelerated_step(optimizer, closure)
        if gradient_state.sync_gradients:
            optimizer.optimizer.step(closure)  # looked up on each call: schedulers and Accelerate patch it
        return None

    optimizer.step = step


class Trainer(RunSetup, FitLoop, OptimizationStep, Evaluation, RunTracking, RunState):
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
        #: where TrainingModule.log records values: this run's collector (None before the first run)
        self.metric_collector: MetricCollector | None = None
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

        self._reset_run_state()

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
        return self.metric_collector.callback_metrics if self.metric_collector is not None else {}

    @property
    def progress_bar_metrics(self) -> dict[str, Any]:
        return self.metric_collector.progress_bar_metrics if self.metric_collector is not None else {}

    def effective_lrs(self, opt_idx: int) -> list[float]:
        """Per param group of optimizer ``opt_idx``, the learning rate of its next real step (warm-up applied).

        What ``LearningRateMonitor`` logs and the progress bar shows; outside ``fit`` (no warm-up
        counted), the optimizer's own learning rates.
        """
        optimizer = self._optimizers[opt_idx]
        if self._step_tracker is not None:
            return self._step_tracker.effective_lrs(opt_idx, optimizer)
        return [float(g["lr"]) for g in unwrap_optimizer(optimizer).param_groups]

    def before_zero_grad(self, optimizer: Any) -> None:
        """Run ``on_before_zero_grad(optimizer)``: the callbacks that implement it, then the module.

        What ``TrainingModule.optimizer_step``'s default calls between the step and ``zero_grad``
        (resolved once per run; nothing runs when nobody implements the hook).
        """
        hook = self._on_before_zero_grad
        if hook is not None:
            hook(optimizer)

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
            train_loader, val_loaders = self._resolve_fit_data(module, train_dataloaders, val_dataloaders, datamodule)
            self._setup_fit(module, train_loader, val_loaders, ckpt_path)
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

    def _any_rank_each(self, *flags: bool) -> list[bool]:
        """For each flag, whether any rank has it set (one collective for all of them)."""
        if self.accelerator.num_processes == 1:
            return [bool(f) for f in flags]
        tensor = torch.tensor([float(f) for f in flags], device=self.accelerator.device)
        return [v > 0 for v in self.accelerator.reduce(tensor, "sum").tolist()]

    def _any_rank(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        tensor = torch.tensor([float(flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(tensor, "sum").item() > 0)

    # -- one batch ------------------------------------------------------------------------------
    # -- validation -----------------------------------------------------------------------------
    def validate(self, module: TrainingModule, dataloaders: Any = None, datamodule: Any = None) -> list[dict]:
        """Run one validation pass; returns one dict of metrics per dataloader (as Lightning)."""
        return self._eval_entry("validate", module, dataloaders, datamodule, "val_dataloader")

    def test(self, module: TrainingModule, dataloaders: Any = None, datamodule: Any = None) -> list[dict]:
        """Run one test pass; returns one dict of metrics per dataloader (as Lightning)."""
        return self._eval_entry("test", module, dataloaders, datamodule, "test_dataloader")

    # -- set-up -----------------------------------------------------------------------------------
    @property
    def nonfinite_skips(self) -> int:
        """Optimizer steps skipped in this fit for a non-finite loss or gradients (``on_nonfinite_loss="skip"``)."""
        return self._guard.skipped if self._guard is not None else 0

    # -- logging ----------------------------------------------------------------------------------
    # -- the run's records --------------------------------------------------------------------------
    def log_to_trackers(self, values: dict[str, float], step: int | None = None) -> None:
        """Send already-computed values (floats) to every tracker, e.g. from a callback."""
        self._log_to_trackers(values, self.state.global_step if step is None else step)

    def _gather_from_ranks(self, items: list) -> list:
        """Everything every rank passed in, in rank order (one object collective)."""
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def _progress(self, total: Any, epoch: int, initial: int = 0) -> Any:
        return make_progress(total, epoch, self.enable_progress_bar and self.accelerator.is_main_process, initial=initial)

    # -- rank sync ------------------------------------------------------------------------------
    def _check_rank_sync(self) -> None:
        """Compare counters and learning rates across ranks (no-op on one process)."""
        if self.accelerator.num_processes == 1:
            return
        from .distributed import assert_ranks_in_sync

        assert_ranks_in_sync(self)

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
        tracker = self._step_tracker
        with tracker.paused() if tracker is not None else contextlib.nullcontext():
            return ckpt_io.save(os.fspath(path), self._checkpoint_parts(), lambda c: self._hooks("on_save_checkpoint", c))

    def _checkpoint_parts(self) -> ckpt_io.CheckpointParts:
        if self._module is None or self.metric_collector is None:
            raise TrainingError("save_checkpoint() needs a module being trained: call it during or after fit().")
        return ckpt_io.CheckpointParts(
            accelerator=self.accelerator,
            engine=self._engine,
            module=self._module,
            wrapper=self._wrapped,
            optimizers=self._optimizers,
            schedulers=[cfg.scheduler for cfg in self._scheduler_configs],
            state=self.state,
            callbacks=self.callbacks,
            callback_metrics=self.metric_collector.callback_metrics,
            train_loader=self._train_loader,
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
                    warnings.warn(f"ckpt_path='last' but {path} does not exist yet: starting from scratch.", UserWarning, stacklevel=2)
                return
        own = self._is_own_checkpoint(ckpt_path)

        def on_load(checkpoint: dict[str, Any]) -> None:
            saved = checkpoint.get("run") or {}
            record = self._run_record
            assert record is not None  # started by _claim_run_directory
            if own and saved.get("id"):
                record["id"] = saved["id"]  # the same run continues
            elif saved.get("id"):
                record["resumed_from_run"] = saved["id"]
            self._hooks("on_load_checkpoint", checkpoint)

        self._resume = ckpt_io.restore(path, self._checkpoint_parts(), on_load, implicit=implicit)

    # -- the run directory --------------------------------------------------------------------------
def _explain_collective_timeout(exc: BaseException, trainer: Trainer) -> None:
    """One line saying what a collective that timed out means (the exception itself is torch's)."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or not ("Timed out" in text or "timed out" in text or "Timeout" in text):
        return
    if trainer.accelerator.num_processes < 2:
        return
    bound = trainer.collective_timeout
    setting = f"collective_timeout={bound:g} s" if bound else "torch's default timeout (collective_timeout=None)"
    _say_safely(
        f"accel_trainer: rank {trainer.accelerator.process_index}: a collective timed out after {setting}: another "
        "rank did not reach it (it hangs, or died without the launcher noticing). Its traceback, if any, says where."
    )


def _validate_trainer_args(args: dict[str, Any]) -> None:
    """One check per argument, run before anything else (Raises: ConfigurationError)."""

    def fail(name: str, allowed: str) -> None:
        raise ConfigurationError(f"Trainer({name}={args[name]!r}) is not allowed: {allowed}.")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if args["max_epochs"] is not None and not (is_int(args["max_epochs"]) and args["max_epochs"] >= 0):
        fail("max_epochs", "expected None or an int >= 0")
    if not (is_int(args["max_steps"]) and args["max_steps"] >= -1):
        fail("max_steps", "expected -1 (no limit) or an int >= 0")
    if args["mixed_precision"] not in MIXED_PRECISION:
        fail("mixed_precision", f"expected one of {list(MIXED_PRECISION)}")
    if not (is_int(args["gradient_accumulation_steps"]) and args["gradient_accumulation_steps"] >= 1):
        fail("gradient_accumulation_steps", "expected an int >= 1")
    clip = args["gradient_clip_val"]
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip <= 0):
        fail("gradient_clip_val", "expected None or a number > 0")
    if args["gradient_clip_algorithm"] not in CLIP_ALGORITHMS:
        fail("gradient_clip_algorithm", f"expected one of {list(CLIP_ALGORITHMS)}")
    for name in ("limit_train_batches", "limit_val_batches"):
        v = args[name]
        if v is None:
            continue
        if isinstance(v, float) and 0.0 <= v <= 1.0:
            continue
        if is_int(v) and v >= 0:
            continue
        fail(name, "expected None, a float fraction in [0, 1] or an int number of batches >= 0")
    v = args["val_check_interval"]
    if not ((isinstance(v, float) and 0.0 < v <= 1.0) or (is_int(v) and v >= 1)):
        fail("val_check_interval", "expected a float fraction in (0, 1] or an int number of batches >= 1")
    if not (is_int(args["check_val_every_n_epoch"]) and args["check_val_every_n_epoch"] >= 1):
        fail("check_val_every_n_epoch", "expected an int >= 1")
    if not (is_int(args["num_sanity_val_steps"]) and args["num_sanity_val_steps"] >= 0):
        fail("num_sanity_val_steps", "expected an int >= 0")
    if not (is_int(args["log_every_n_steps"]) and args["log_every_n_steps"] >= 1):
        fail("log_every_n_steps", "expected an int >= 1")
    if args["on_nonfinite_loss"] not in NONFINITE_POLICIES:
        fail("on_nonfinite_loss", f"expected one of {list(NONFINITE_POLICIES)}")
    n = args["check_rank_sync_every_n_steps"]
    if n is not None and not (is_int(n) and n >= 1):
        fail("check_rank_sync_every_n_steps", "expected None (once per epoch) or an int >= 1")
    timeout = args["collective_timeout"]
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0 or timeout == math.inf):
        fail("collective_timeout", "expected None (torch's default) or a number of seconds > 0")
    if args["seed"] is not None and not is_int(args["seed"]):
        fail("seed", "expected None or an int")
    callbacks = args["callbacks"]
    if callbacks is not None:
        if not isinstance(callbacks, (list, tuple)):
            fail("callbacks", "expected a list of accel_trainer.Callback")
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise ConfigurationError(
                    f"Trainer(callbacks=[...]) contains a {type(cb).__name__}; every callback must subclass accel_trainer.Callback."
                )
    for name in ("cpu", "enable_progress_bar"):
        if not isinstance(args[name], bool):
            fail(name, "expected True or False")
    root = args["default_root_dir"]
    if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
        fail("default_root_dir", "expected a non-empty path (str or os.PathLike)")
    if not isinstance(args["project_name"], str) or not args["project_name"]:
        fail("project_name", "expected a non-empty str")
    acc = args["accelerator"]
    if isinstance(acc, str):
        raise ConfigurationError(accelerator_string_message(acc))
    if acc is not None and not hasattr(acc, "prepare"):
        fail("accelerator", "expected None or an accelerate.Accelerator")


def _is_bare_dispatcher(wrapper: Any) -> bool:
    """The prepared model is our own ``_StepDispatcher``, unwrapped, its ``forward`` untouched, without hooks.

    That is the case on one process without mixed precision (Accelerate's ``prepare`` hands the
    model back as it is); DDP/FSDP wrappers, Accelerate's autocast ``forward`` or a hook make it False.
    """
    return (
        type(wrapper) is _StepDispatcher
        and "forward" not in vars(wrapper)
        and getattr(wrapper, "_compiled_call_impl", None) is None
        and not (wrapper._forward_hooks or wrapper._forward_pre_hooks or wrapper._backward_hooks or wrapper._backward_pre_hooks)
    )


# Hooks registered for every module (``torch.nn.modules.module.register_module_forward_hook`` …):
# torch registers them into these dicts in place, so they are bound once. Calling the dispatcher
# directly is only right while all are empty (nn.Module.__call__ would run them).
_GLOBAL_PRE = nn_module._global_forward_pre_hooks
_GLOBAL_POST = nn_module._global_forward_hooks
_GLOBAL_BACKWARD_PRE = nn_module._global_backward_pre_hooks
_GLOBAL_BACKWARD = nn_module._global_backward_hooks


def _accelerator_present() -> bool:
    """Whether this machine has any device besides the CPU (CUDA, MPS, XPU …)."""
    if torch.cuda.is_available():
        return True
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _skip_noop_placement(loader: Any) -> None:
    """No ``send_to_device`` per batch where it cannot move anything.

    Accelerate's ``DataLoaderShard`` sends every batch to the accelerator's device (a recursive
    walk and a ``.to()`` per tensor: 9-21 µs per batch on one CPU process, measured in
    benchmarks/RESULTS.md). On a machine with no device besides the CPU every tensor a dataset
    yields is already a CPU tensor, so that placement is a no-op, and the loader is told so.
    Anywhere an accelerator exists (also with ``cpu=True``) batches are placed as Accelerate does.
    """
    if type(loader).__name__ != "DataLoaderShard" or getattr(loader, "device", None) is None:
        return
    if torch.device(loader.device).type == "cpu" and not _accelerator_present():
        loader.device = None


def _seed_everything(seed: int) -> None:
    from accelerate.utils import set_seed

    set_seed(seed)


def _make_accelerator(cpu: bool, mixed_precision: str, gradient_accumulation_steps: int, collective_timeout: float | None = None) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # A previous Trainer in this process may have fixed the precision; start from a clean
    # AcceleratorState (the process group, held by PartialState, is kept).
    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    if _launched_world_size() > 1 and not cpu and not torch.cuda.is_available():
        # A multi-process launch on a machine without GPUs: join the job over gloo on CPU
        # instead of letting every process train its own world-size-1 copy.
        cpu = True
    kwargs: dict[str, Any] = dict(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,
    )
    if collective_timeout is not None:
        from datetime import timedelta

        from accelerate.utils import InitProcessGroupKwargs

        # a process group created by this Accelerator starts with the bound (an existing one
        # gets it from _apply_collective_timeout)
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout))]
    if requested_engine() == "DEEPSPEED":
        from .engines.deepspeed import make_accelerator

        return make_accelerator(cpu, **kwargs)
    if requested_engine() == "FSDP" and (cpu or not torch.cuda.is_available()):
        from .engines.fsdp import cpu_accelerator

        return cpu_accelerator(**kwargs)
    return Accelerator(cpu=cpu, **kwargs)


def _apply_collective_timeout(seconds: float) -> None:
    """Bound every collective of the default process group by ``seconds`` (gloo and NCCL alike).

    Also when the group existed before this Trainer (an earlier Trainer in the process, or an
    ``accelerator=`` passed in), whose timeout ``InitProcessGroupKwargs`` can no longer set.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    from datetime import timedelta

    from torch.distributed import distributed_c10d

    setter = getattr(distributed_c10d, "_set_pg_timeout", None)
    if setter is None:  # pragma: no cover - a torch without it
        warnings.warn(
            "Trainer(collective_timeout=...) could not be applied to the existing process group (this torch has no "
            "_set_pg_timeout); create the Accelerator with InitProcessGroupKwargs(timeout=...) instead.",
            UserWarning,
        )
        return
    setter(timedelta(seconds=seconds))


def _launched_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


@functools.cache
def _settle_collectives_at_exit() -> None:
    """Let gloo's worker threads finish with the last collectives before the interpreter shuts down.

    A gloo worker thread drops its reference to a finished collective a moment after the
    caller's ``wait()`` returned; when that is the last reference, the work's destructor
    releases the Python tensors it held, which needs the GIL. If the main thread has begun
    interpreter shutdown by then (a process that exits right after its last collective, on a
    loaded machine), the worker thread cannot take the GIL, Python ends the thread, and the
    forced unwind through C++ aborts the process ("terminate called without an active
    exception", SIGABRT: seen in a core dump, in ``AsyncAllgatherCoalescedWork``'s destructor
    from ``ProcessGroupGloo::runLoop``) -- after all the work is done, yet the launcher reports
    the job failed. The process group cannot simply be destroyed first: FSDP's device mesh and
    the sharded parameters keep it alive. So at exit (registered once per process, when a
    Trainer joins several processes) the main thread sleeps briefly without the GIL, which lets
    those threads release their last references while Python still runs, then destroys the
    process group, as Accelerate's ``end_training()`` does.
    """
    import atexit

    def settle() -> None:
        import time

        import torch.distributed as dist

        time.sleep(0.25)
        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # pragma: no cover - exiting anyway; never mask the run's own outcome
                pass

    atexit.register(settle)


def _warn_if_restarts_cannot_reconnect() -> None:
    """torchrun restarts (``--max_restarts N``) whose workers share the agent's rendezvous store.

    That store keeps the first attempt's keys (a static rendezvous keeps one store for good),
    so after a restart the workers read the dead attempt's addresses and gloo fails to connect
    (PyTorch issue 135712). ``--rdzv_backend c10d`` with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``
    gives every attempt a store of its own (README, "Elastic restarts").
    """
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        if os.environ.get("RANK", "0") == "0":
            warnings.warn(
                "torchrun restarts are on (--max_restarts) but the workers share the launcher's rendezvous store, "
                "which keeps the first attempt's keys: after a restart the processes would find the dead attempt's "
                "addresses and fail to connect, so restarts will not reconnect. Launch with --rdzv_backend c10d and "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1.",
                UserWarning,
                stacklevel=3,
            )


def _check_launch(accelerator: Any) -> None:
    """Refuse a launch that would silently train N independent world-size-1 copies."""
    world_size = _launched_world_size()
    if world_size > 1 and accelerator.num_processes == 1:
        raise ConfigurationError(
            f"WORLD_SIZE={world_size} in the environment, but this process joined no process group "
            "(accelerator.num_processes == 1), so each process would train its own copy. On a machine "
            "without GPUs launch with ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes "
            f"{world_size} ... (or Trainer(cpu=True)); on GPUs check that every process sees a GPU."
        )

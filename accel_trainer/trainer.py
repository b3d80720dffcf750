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
import math
import os
import warnings
from typing import Any

import torch

from . import checkpoint as ckpt_io
from . import collectives
from . import data as data_utils
from . import run_status as run_records
from .arguments import validate_trainer_args
from .callbacks.base import Callback
from .callbacks.early_stopping import EarlyStopping
from .callbacks.model_checkpoint import ModelCheckpoint
from .engines import check_requested_engine
from .errors import ConfigurationError, TrainingError
from .evaluation import Evaluation
from .fit_loop import FitLoop
from .launching import (
    apply_collective_timeout,
    check_launch,
    explain_collective_timeout,
    make_accelerator,
    seed_everything,
    settle_collectives_at_exit,
    warn_if_restarts_cannot_reconnect,
)
from .loggers import LoggerView, normalise_log_with, tracker_name
from .metrics import MetricCollector
from .migration import check_precision_device, refuse_lightning_arguments
from .module import TrainingModule
from .optim import SchedulerConfig, unwrap_optimizer
from .optimization_step import OptimizationStep
from .preemption import Preempted
from .progress import make_progress
from .run_setup import RunSetup
from .run_state import RunState
from .state import TrainingState
from .tracking import RunTracking


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
        validate_trainer_args(locals())
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
            seed_everything(seed)
        self.collective_timeout = collective_timeout
        if accelerator is None:
            accelerator = make_accelerator(cpu, mixed_precision, gradient_accumulation_steps, collective_timeout)
        elif gradient_accumulation_steps not in (1, accelerator.gradient_accumulation_steps):
            raise ConfigurationError(
                f"Trainer(gradient_accumulation_steps={gradient_accumulation_steps}) conflicts with the given "
                f"accelerator's gradient_accumulation_steps={accelerator.gradient_accumulation_steps}. Set it on one of them."
            )
        check_launch(accelerator)
        warn_if_restarts_cannot_reconnect()
        if collective_timeout is not None:
            apply_collective_timeout(collective_timeout)
        check_requested_engine(accelerator)
        if accelerator.num_processes > 1:
            settle_collectives_at_exit()
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
            explain_collective_timeout(exc, self)
            self._end_run_status("failed", error=run_records.describe_error(exc))
            self._hooks.callbacks_only("on_exception", exc)
            raise
        finally:
            self._preemption.uninstall()
            self.training = False
            self._teardown("fit", datamodule)
            self._release_run_directory()

    def _any_rank_each(self, *flags: bool) -> list[bool]:
        """For each flag, whether any rank has it set (one collective for all of them; every rank calls it)."""
        return collectives.any_rank_each(self.accelerator, *flags)

    def _any_rank(self, flag: bool) -> bool:
        """Whether any rank has ``flag`` set (one collective; every rank calls it)."""
        return collectives.any_rank(self.accelerator, flag)

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
        return collectives.gather_objects(items)

    def _progress(self, total: Any, epoch: int, initial: int = 0) -> Any:
        return make_progress(total, epoch, self.enable_progress_bar and self.accelerator.is_main_process, initial=initial)

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
            collectives.barrier(self.accelerator)
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

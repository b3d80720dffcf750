"""The trainer's state, declared in one place: what every part of a run reads and writes.

:class:`~accel_trainer.trainer.Trainer` is assembled from a few parts (the set-up in
:mod:`accel_trainer.run_setup`, the loop in :mod:`accel_trainer.fit_loop`, one batch's
optimization in :mod:`accel_trainer.optimization_step`, evaluation in
:mod:`accel_trainer.evaluation`, the run's records in :mod:`accel_trainer.tracking`). They share
the attributes below: the trainer's own (created in ``Trainer.__init__``) are declared here
with their types, and the per-run ones are created by :meth:`RunState._reset_run_state`, from
``__init__`` and again at the start of every run, so that none is first created halfway
through a run and none needs a ``getattr(self, ..., None)`` guard.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch

from .engines import Engine, engine_for
from .hooks import _Hooks
from .plan import OptimizerCycle
from .preemption import PreemptionPoll, PreemptionWatcher

if TYPE_CHECKING:
    from .callbacks.base import Callback
    from .loggers import CSVTracker
    from .metrics import MetricCollector
    from .module import TrainingModule
    from .nonfinite import NonFiniteGuard
    from .optim import SchedulerConfig
    from .scheduling import SchedulerRunner, StepTracker
    from .state import TrainingState
    from .toggle import OptimizerToggle
    from .trainer import Trainer


class RunState:
    """The attributes the trainer's parts share (a base of :class:`~accel_trainer.trainer.Trainer`)."""

    # created in Trainer.__init__ (the arguments, then what lives across runs):
    max_epochs: int | None
    max_steps: int
    gradient_clip_val: float | None
    gradient_clip_algorithm: str
    gradient_accumulation_steps: int
    limit_train_batches: int | float | None
    limit_val_batches: int | float | None
    val_check_interval: int | float
    check_val_every_n_epoch: int
    num_sanity_val_steps: int
    log_every_n_steps: int
    project_name: str
    default_root_dir: str
    callbacks: list[Callback]
    seed: int | None
    enable_progress_bar: bool
    on_nonfinite_loss: str
    check_rank_sync_every_n_steps: int | None
    collective_timeout: float | None
    _log_with: list[Any]
    _accelerator: Any
    state: TrainingState
    should_stop: bool
    _module: TrainingModule | None
    #: where ``TrainingModule.log`` records values (None before the first run): the interface
    #: between ``self.log`` and the trainer, not part of the public API
    metric_collector: MetricCollector | None
    _optimizers: list[Any]
    _direct_backward: bool
    _scheduler_configs: list[SchedulerConfig]
    _trackers: list[Any]
    _logged: dict[str, float]
    sanity_checking: bool
    training: bool
    run_config: dict[str, Any] | None
    _monitor_on_validation: bool
    _tracking: bool
    _progress_bar: Any
    _train_loader: Any
    _train_loader_raw: Any
    _run_record: dict[str, Any] | None
    _run_lock: Any

    def _reset_run_state(self) -> None:
        """Create the per-run state: every attribute the loop, the optimization step and evaluation
        read. Called by ``__init__`` and again by ``_attach`` at the start of every run; set-up
        (``_attach``, ``_setup_optimization``, ``fit``) then fills in what the run needs."""
        # set up by _attach:
        self._hooks = _Hooks(cast("Trainer", self), None, self.callbacks)
        self._engine: Engine = engine_for(self._accelerator)
        self._transfer: Callable | None = None  # on_after_batch_transfer, when defined
        self._on_before_backward: Callable | None = None  # the per-step hooks, resolved once per run
        self._on_after_backward: Callable | None = None
        self._on_before_optimizer_step: Callable | None = None
        self._on_before_zero_grad: Callable | None = None
        self._one_process = self._accelerator.num_processes == 1  # asked on every step
        self._preemption = PreemptionWatcher(announce=self._accelerator.is_main_process)
        self._preemption_poll = PreemptionPoll()
        self._preempt_agreed = False
        self._csv_tracker: CSVTracker | None = None
        self._run_started = False  # run_status.json says "running"
        # set up by _setup_optimization (fit) or _prepare_model_only (validate/test):
        self._wrapped: Any = None  # the prepared step dispatcher (DDP/autocast wrapper) of evaluation
        self._wrappers: list[Any] = []  # the wrapper each optimizer's training_step runs through
        self._unique_wrappers: list[Any] = []
        self._call_directly = False  # one bare dispatcher: call training_step directly
        self._gradient_state: Any = self._accelerator.gradient_state
        self._automatic = True
        self._plain_step: list[bool] = []  # per optimizer: the default optimizer_step, without closure
        self._default_zero_grad = True
        self._pass_optimizer_idx = False
        self._cycle = OptimizerCycle(0)  # which optimizers are due at each global step
        self._fixed_optimizers: tuple[int, ...] | None = None  # the same ones at every step (no frequencies)
        self._optimizer_params: list[list[torch.nn.Parameter]] = []
        self._toggle: OptimizerToggle | None = None
        self._guard: NonFiniteGuard | None = None
        # set up by fit:
        self._val_loaders: list[Any] = []
        self._step_tracker: StepTracker | None = None  # counts real optimizer steps, applies the warm-up
        self._runner: SchedulerRunner | None = None
        self._every_step: list[list[Any] | None] = []  # per optimizer, its step schedulers when plain
        self._resume: dict[str, Any] | None = None  # what a restored checkpoint says of the epoch under way
        self._epoch_start: dict[str, Any] | None = None  # the epoch's sampler/RNG state, for checkpoints
        # the loop's position and what it shows:
        self._batch_idx = 0
        self._last_output: Any = None
        self._last_loss: torch.Tensor | None = None
        self._last_losses: dict[int, torch.Tensor] = {}
        self._warned_log_interval = False
        self._epoch_first_step = 0
        self._logged_steps_in_epoch = False

"""The learning rate each optimizer would follow, computed without training.

A schedule is the product of several rules that interact: the optimizer-dict ``frequency``
(which optimizer is used at a global step), the module's ``optimizer_step`` override (when
an optimizer really steps, and any learning rate it writes itself), step schedulers that
advance after every ``frequency``-th *real* step, epoch schedulers, and the declarative
``warmup_steps``. :func:`simulate_lr_schedule` replays exactly the trainer's rules — the
same :class:`~accel_trainer.scheduling.StepTracker` (warm-up, real-step counting) and
:class:`~accel_trainer.scheduling.SchedulerRunner` (when schedulers step) — over the loop's
counters, with every optimizer's ``step`` replaced by a no-op that only counts. No batch,
no forward, no gradient.

``ReduceLROnPlateau`` steps on a metric that only training produces. A simulation feeds it
what :func:`plateau_metric_from` builds from ``--plateau_from``: a constant, or the monitored
column of an earlier run's ``metrics.csv`` (:class:`MetricsHistory`) -- fed the run's own
history, the simulation reproduces the learning rates that run logged. Without either, the
plateau scheduler is left out, and the result says so (``skipped``), as the command does on
the terminal and on the plot.

``accel-trainer lr-schedule --config CONFIG --steps N [--plateau_from RUN/metrics.csv | VALUE]``
calls it, :func:`plot_lr_schedule` and :func:`write_lr_schedule_csv`.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import textwrap
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .errors import ConfigurationError
from .internals import mark_optimizer_stepped
from .optim import OptimizationConfig, parse_configure_optimizers, unwrap_optimizer
from .plan import OptimizerCycle, is_accumulation_boundary, warmup_per_optimizer
from .scheduling import SchedulerRunner, StepTracker
from .state import TrainingState


class LRSchedule(dict):
    """``{name: [learning rate at global step 0, 1, ...]}``, one entry per optimizer param group.

    Names are those ``LearningRateMonitor`` logs (Lightning's: ``lr-Adam``, ``lr-Adam-1``,
    ``lr-SGD/pg1``, a scheduler's ``name``; an optimizer with two schedulers under its first
    key), so a simulation compares directly with a run's ``metrics.csv``.
    The value at step ``s`` is the learning rate the optimizer uses if it steps at global
    step ``s`` (warm-up included) — the one it did use when it stepped.

    Attributes:
        real_steps: per name, the global steps at which that optimizer really stepped.
        epoch_starts: the global steps at which epochs 1, 2, ... start (empty without
            ``batches_per_epoch``).
        skipped: descriptions of schedulers that were not simulated (plateau schedulers
            without ``plateau_metric``, or past the end of the metric's history).
        notes: what each simulated plateau scheduler was fed (``"... stepped on val_acc from
            runs/x/metrics.csv (epochs 0-29)"``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.real_steps: dict[str, list[int]] = {}
        self.epoch_starts: list[int] = []
        self.skipped: list[str] = []
        self.notes: list[str] = []


def simulate_lr_schedule(
    module: Any,
    steps: int,
    batches_per_epoch: int | None = None,
    gradient_accumulation_steps: int = 1,
    plateau_metric: Callable[[int], float] | Mapping[str, Callable[[int], float]] | None = None,
    copy_module: bool = True,
) -> LRSchedule:
    """The learning rate each optimizer would use at each global step, without training.

    Follows the trainer's loop: ``global_step`` counts accumulation boundaries; on each, the
    optimizers due (optimizer-dict ``frequency``) go through the module's ``optimizer_step``
    (``self.trainer.global_step`` and ``current_epoch`` are live, as in training); a real
    step advances that optimizer's step schedulers; after every ``batches_per_epoch``
    batches, epoch schedulers step (plateau ones with ``plateau_metric``).

    Args:
        module: a :class:`~accel_trainer.TrainingModule` (automatic optimization).
        steps: how many global steps to simulate.
        batches_per_epoch: training batches per epoch (``len(train_dataloader)``, or the
            ``limit_train_batches`` value); ``None``: one endless epoch (epoch schedulers never step).
        gradient_accumulation_steps: as the Trainer argument (the last, partial window of an
            epoch also steps).
        plateau_metric: for ``ReduceLROnPlateau``: ``f(epoch) -> value`` of the monitored metric
            at the end of ``epoch`` (0-based), or ``{monitor_name: f}`` (e.g. a
            :class:`MetricsHistory`, or :func:`plateau_metric_from`'s result). ``f`` returning
            None means "unknown from here on": the plateau scheduler stops being stepped (noted in
            ``result.skipped``). ``None``: plateau schedulers are not stepped (listed in
            ``result.skipped``; warm-up still applies).
        copy_module: call ``configure_optimizers`` and ``optimizer_step`` on a deep copy, so
            the module is left untouched. ``False`` uses the module itself (no copy of a large
            model; its ``trainer`` is restored afterwards).

    Returns:
        An :class:`LRSchedule`.

    Raises:
        ConfigurationError: a bad argument, a manual-optimization module, or what
            ``configure_optimizers`` returns is invalid (the same checks as ``fit``).

    Example:
        >>> schedule = simulate_lr_schedule(MyGAN(), steps=2000, batches_per_epoch=100)   # doctest: +SKIP
        >>> schedule["lr-Adam"][:3], schedule.real_steps["lr-Adam"][:3]                    # doctest: +SKIP
        ([2e-06, 2e-06, 4e-06], [0, 2, 4])
    """
    _validate(steps, batches_per_epoch, gradient_accumulation_steps, plateau_metric)
    sim_module = _detached_copy(module) if copy_module else module
    if not getattr(sim_module, "automatic_optimization", True):
        raise ConfigurationError(
            f"{type(module).__name__} uses manual optimization (automatic_optimization = False): its training_step "
            "decides when optimizers and schedulers step, which cannot be replayed without training. "
            "Log the learning rates with LearningRateMonitor instead."
        )
    result = LRSchedule()
    trainer = _SimulatedTrainer(TrainingState(), max_steps=steps)
    previous_trainer = getattr(sim_module, "trainer", None)
    sim_module.trainer = trainer  # attached before configure_optimizers, as in fit
    try:
        config = parse_configure_optimizers(sim_module.configure_optimizers())
        if not config.optimizers:
            return result
        sim = _Simulation(sim_module, config, plateau_metric, trainer)
        try:
            sim.run(result, steps, batches_per_epoch, gradient_accumulation_steps)
        finally:
            sim.close()
    finally:
        sim_module.trainer = previous_trainer
    return result


def plot_lr_schedule(
    schedule: Mapping[str, list[float]],
    path: str | os.PathLike,
    title: str | None = None,
    notes: list[str] | None = None,
) -> str:
    """Plot a :func:`simulate_lr_schedule` result to a PNG; returns the path.

    One panel per optimizer param group (learning rates of different optimizers often differ
    by orders of magnitude), learning rate vs global step, dots at the steps where the
    optimizer really stepped, dotted lines at epoch starts. ``notes`` (default: the
    schedule's ``skipped`` and ``notes``) are printed under the panels, so a plateau scheduler
    left out of the simulation is visible on the picture, not only on the terminal.
    """
    from .plotting import _pyplot

    if not schedule:
        raise ValueError(
            "The schedule is empty: configure_optimizers returned no optimizer, so there is nothing to plot."
        )
    plt = _pyplot()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    real_steps = getattr(schedule, "real_steps", {}) or {}
    epoch_starts = getattr(schedule, "epoch_starts", []) or []
    names = list(schedule)
    if notes is None:
        notes = [f"not simulated: {s}" for s in getattr(schedule, "skipped", [])] + list(getattr(schedule, "notes", []))
    wrapped = [textwrap.fill(n, 110, subsequent_indent="    ") for n in notes]
    note_lines = sum(w.count("\n") + 1 for w in wrapped)
    fig, axes = plt.subplots(
        len(names), 1, figsize=(8.5, 2.6 * len(names) + 0.8 + 0.17 * note_lines), sharex=True, squeeze=False
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (ax, name) in enumerate(zip(axes[:, 0], names)):
        lrs = schedule[name]
        color = colors[k % len(colors)]
        ax.plot(
            range(len(lrs)), lrs, drawstyle="steps-post", color=color, linewidth=1.5, label=f"{name} (learning rate)"
        )
        real = real_steps.get(name, [])
        label = f"real steps ({len(real)} of {len(lrs)})"
        if real and len(real) <= 150:
            ax.plot(real, [lrs[s] for s in real], linestyle="none", marker="o", markersize=2.5, color="black", label=label)
        elif real:  # many steps: a rug along the bottom, so the dots do not hide the curve
            ax.plot(real, [0.0] * len(real), linestyle="none", marker="|", markersize=7, markeredgewidth=0.6,
                    color="black", alpha=0.6, transform=ax.get_xaxis_transform(), clip_on=False, label=label)
        for i, start in enumerate(epoch_starts if len(epoch_starts) <= 60 else []):
            ax.axvline(
                start, color="0.75", linewidth=0.8, linestyle=":", zorder=0, label="epoch start" if i == 0 else None
            )
        positive = [v for v in lrs if v > 0]
        if len(positive) == len(lrs) and max(positive) / min(positive) > 50:
            ax.set_yscale("log")  # decays over orders of magnitude stay readable
        else:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.set_ylabel("learning rate")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    axes[-1, 0].set_xlabel("global step")
    fig.suptitle(title or "Simulated learning-rate schedule (no training)")
    if wrapped:
        height = fig.get_figheight()
        bottom = (0.17 * note_lines + 0.25) / height
        fig.tight_layout(rect=(0, bottom, 1, 1))
        fig.text(0.01, 0.01, "\n".join(wrapped), fontsize="small", va="bottom", ha="left", color="darkred")
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_lr_schedule_csv(schedule: Mapping[str, list[float]], path: str | os.PathLike) -> str:
    """The schedule as a table: ``step`` and one column per optimizer param group; returns the path.

    The columns are the names ``LearningRateMonitor`` logs, so the table compares directly
    with a run's ``metrics.csv``.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    names = list(schedule)
    length = max((len(v) for v in schedule.values()), default=0)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *names])
        for step in range(length):
            writer.writerow([step, *(repr(schedule[n][step]) if step < len(schedule[n]) else "" for n in names)])
    return path


# -- what a plateau scheduler is fed ----------------------------------------------------------------
class ConstantMetric:
    """``f(epoch) -> value`` for every epoch: what a plateau scheduler does when the metric stalls."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def __call__(self, epoch: int) -> float:
        return self.value

    def describe(self, monitor: str) -> str:
        return f"a constant {monitor}={self.value:g} (a metric that never improves)"


class MetricsHistory(Mapping):
    """``{monitor: f(epoch)}`` from an earlier run's ``metrics.csv``.

    ``f(e)`` is the monitor's value at the end of epoch ``e`` as that run logged it (the
    last value logged during the epoch; an epoch without one carries the previous value, as
    ``trainer.callback_metrics`` does), and None past the last epoch the file records. A
    row's epoch is its ``epoch`` cell, or, for rows written without one, the epoch of the
    rows logged at the same step.

    Args:
        path: a ``metrics.csv``, or a run directory holding one.

    Raises:
        ConfigurationError: no such file, or (on lookup) no such column.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "metrics.csv")
        if not os.path.isfile(path):
            raise ConfigurationError(
                f"plateau_from={path!r}: no such file. Expected the metrics.csv of an earlier run (or its run "
                "directory), or a number to feed the plateau scheduler a constant."
            )
        self.path = path
        with open(path, newline="") as f:
            self._rows = list(csv.DictReader(f))
        self.columns = [c for c in (self._rows[0].keys() if self._rows else []) if c not in ("step", "epoch")]
        self._cache: dict[str, dict[int, float]] = {}

    def __getitem__(self, monitor: str) -> Callable[[int], float | None]:
        by_epoch = self._by_epoch(monitor)
        last = max(by_epoch) if by_epoch else -1

        def value_at(epoch: int) -> float | None:
            if epoch > last:
                return None
            known = [e for e in by_epoch if e <= epoch]
            return by_epoch[max(known)] if known else None

        value_at.source = self.describe(monitor)  # type: ignore[attr-defined]
        return value_at

    def __iter__(self):
        return iter(self.columns)

    def __len__(self) -> int:
        return len(self.columns)

    def __contains__(self, monitor: object) -> bool:
        return isinstance(monitor, str)  # every lookup answers, or names the missing column

    def describe(self, monitor: str) -> str:
        by_epoch = self._by_epoch(monitor)
        span = f"epochs {min(by_epoch)}-{max(by_epoch)}" if by_epoch else "no epochs"
        return f"{monitor} from {self.path} ({span})"

    def _by_epoch(self, monitor: str) -> dict[int, float]:
        if monitor in self._cache:
            return self._cache[monitor]
        if monitor not in self.columns:
            raise ConfigurationError(
                f"plateau_from={self.path!r} has no column {monitor!r}, the metric the plateau scheduler monitors. "
                f"Columns: {self.columns}."
            )
        epoch_at_step: dict[int, int] = {}
        for row in self._rows:
            step, epoch = _number(row.get("step")), _number(row.get("epoch"))
            if step is not None and epoch is not None:
                epoch_at_step.setdefault(int(step), int(epoch))
        values: dict[int, float] = {}
        last_epoch = None
        for row in self._rows:
            step, epoch, value = _number(row.get("step")), _number(row.get("epoch")), _number(row.get(monitor))
            if epoch is None and step is not None:
                epoch = epoch_at_step.get(int(step), last_epoch)
            if epoch is not None:
                last_epoch = int(epoch)
            if value is not None and epoch is not None:
                values[int(epoch)] = value  # the last value of the epoch wins, as in callback_metrics
        self._cache[monitor] = values
        return values


def plateau_metric_from(source: Any) -> Any:
    """What ``accel-trainer lr-schedule --plateau_from`` accepts: a number, or a metrics.csv / run directory.

    Returns a :class:`ConstantMetric` or a :class:`MetricsHistory` for ``simulate_lr_schedule(plateau_metric=...)``.
    """
    if isinstance(source, (int, float)) and not isinstance(source, bool):
        return ConstantMetric(source)
    text = os.fspath(source)
    try:
        return ConstantMetric(float(text))
    except ValueError:
        return MetricsHistory(text)


def _number(cell: Any) -> float | None:
    if cell is None or cell == "":
        return None
    try:
        value = float(cell)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


# -- the simulation ---------------------------------------------------------------------------------
class _SimulatedTrainer:
    """What ``self.trainer`` offers an ``optimizer_step`` override during a simulation."""

    simulating = True
    is_global_zero = True
    world_size = 1
    should_stop = False

    def __init__(self, state: TrainingState, max_steps: int) -> None:
        self.state = state
        self.optimizers: list = []
        self.lr_schedulers: list = []
        self.max_steps = max_steps
        self.max_epochs = None
        self.callback_metrics: dict[str, Any] = {}
        self.logged_metrics: dict = {}
        self.progress_bar_metrics: dict = {}

    @property
    def global_step(self) -> int:
        return self.state.global_step

    @property
    def current_epoch(self) -> int:
        return self.state.current_epoch

    @property
    def optimizer_steps(self) -> list[int]:
        return self.state.optimizer_steps

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"trainer.{name} is not available while simulating the learning-rate schedule (no training runs; "
            "available: global_step, current_epoch, optimizer_steps, optimizers, lr_schedulers, max_steps, "
            "callback_metrics). Guard that code with `if getattr(self.trainer, 'simulating', False)`."
        )


class _Simulation:
    def __init__(
        self, module: Any, config: OptimizationConfig, plateau_metric: Any, trainer: _SimulatedTrainer
    ) -> None:
        self.module = module
        self.config = config
        n_opt = len(config.optimizers)
        self.optimizers = [unwrap_optimizer(o) for o in config.optimizers]
        self.state = trainer.state
        self.state.reset_for(n_opt)
        trainer.optimizers, trainer.lr_schedulers = list(config.optimizers), list(config.schedulers)
        self.metrics = trainer.callback_metrics
        self._plateau_metric = plateau_metric
        warmup = warmup_per_optimizer(config.schedulers, n_opt)
        self.skipped = [
            f"scheduler {i} ({type(cfg.scheduler).__name__} of optimizer {cfg.opt_idx}, monitor {cfg.monitor!r}): "
            "no plateau_metric given, so it never reduces the learning rate here"
            for i, cfg in enumerate(config.schedulers)
            if cfg.reduce_on_plateau and plateau_metric is None
        ]
        self.notes = [
            f"scheduler {i} ({type(cfg.scheduler).__name__} of optimizer {cfg.opt_idx}) stepped on "
            f"{_describe_source(plateau_metric, cfg.monitor)}"
            for i, cfg in enumerate(config.schedulers)
            if cfg.reduce_on_plateau and plateau_metric is not None
        ]
        runnable = [c for c in config.schedulers if not (c.reduce_on_plateau and plateau_metric is None)]
        # The trainer's own rules: when a step counts, the warm-up factor, when schedulers step.
        self.runner = SchedulerRunner(runnable, n_opt, module.lr_scheduler_step, lambda: self.metrics)
        self._saved_steps = [opt.__dict__.get("step", _ABSENT) for opt in self.optimizers]
        self._step_lrs: list[list[float] | None] = [None] * n_opt
        for i, opt in enumerate(self.optimizers):
            opt.step = self._fake_step(i, opt)
        # The trainer's warm-up and step counting, as hooks that the fake step calls like a real one.
        self.tracker = StepTracker(self.optimizers, self.state, warmup)
        self.cycle = OptimizerCycle(n_opt, config.frequencies)
        self.names = _lr_names(config)

    def _fake_step(self, i: int, opt: torch.optim.Optimizer) -> Callable:
        """``optimizer.step`` without the update: the step hooks run, the learning rate is recorded."""

        def step(closure: Any = None) -> None:
            for hook in list(opt._optimizer_step_pre_hooks.values()):
                hook(opt, (), {})
            if self._step_lrs[i] is None:  # the first real step of this call is the one the trainer would time
                self._step_lrs[i] = [float(g["lr"]) for g in opt.param_groups]
            mark_optimizer_stepped(opt)  # tells torch schedulers the optimizer stepped (no order warning)
            for hook in list(opt._optimizer_step_post_hooks.values()):
                hook(opt, (), {})

        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        return step

    def run(self, result: LRSchedule, steps: int, batches_per_epoch: int | None, accumulate: int) -> None:
        state = self.state
        for names in self.names:
            for name in names:
                result[name], result.real_steps[name] = [], []
        result.skipped = list(self.skipped)
        result.notes = list(self.notes)
        self._result = result
        closure = _no_closure
        while state.global_step < steps:
            batch_idx = 0
            while state.global_step < steps and (batches_per_epoch is None or batch_idx < batches_per_epoch):
                if is_accumulation_boundary(batch_idx, accumulate, batches_per_epoch):
                    self._boundary(result, batch_idx, closure)
                    state.global_step += 1
                batch_idx += 1
                state.batches_done_in_epoch = batch_idx
            if batches_per_epoch is None or batch_idx < batches_per_epoch:
                break  # stopped inside an epoch: its schedulers do not step (as a max_steps pause)
            finished = state.current_epoch
            state.current_epoch += 1
            state.batches_done_in_epoch = 0
            self._set_plateau_metrics(finished)
            self.runner.after_epoch(finished + 1)
            if state.global_step < steps:
                result.epoch_starts.append(state.global_step)

    def _boundary(self, result: LRSchedule, batch_idx: int, closure: Callable) -> None:
        state = self.state
        stepped: dict[int, list[float]] = {}
        for i in self.cycle.due(state.global_step):
            before = state.optimizer_steps[i]
            self._step_lrs[i] = None
            self.module.optimizer_step(state.current_epoch, batch_idx, self.optimizers[i], i, closure)
            after = state.optimizer_steps[i]
            if after != before:
                stepped[i] = self._step_lrs[i] or []
                self.runner.after_optimizer_steps(i, before, after)
        for i, names in enumerate(self.names):
            lrs = stepped.get(i) or self.tracker.effective_lrs(i, self.optimizers[i])
            for name, lr in zip(names, lrs):
                result[name].append(float(lr))
                if i in stepped:
                    result.real_steps[name].append(state.global_step)

    def _set_plateau_metrics(self, epoch: int) -> None:
        metric = self._plateau_metric
        if metric is None:
            return
        for i, cfg in enumerate(self.config.schedulers):
            # a plateau scheduler always has a monitor (optim.py refuses one without)
            if cfg.reduce_on_plateau and cfg.monitor is not None and cfg in self.runner.epoch_schedulers:
                fn = metric.get(cfg.monitor) if isinstance(metric, Mapping) else metric
                if fn is None:
                    continue  # SchedulerRunner then reports the missing monitor as the trainer would
                value = fn(epoch)
                if value is None:  # past the end of the metric's history: stop guessing
                    self.runner.epoch_schedulers.remove(cfg)
                    self._result.skipped.append(
                        f"scheduler {i} ({type(cfg.scheduler).__name__} of optimizer {cfg.opt_idx}): "
                        f"{cfg.monitor!r} is not known after epoch {epoch - 1}, so it is not stepped from then on"
                    )
                    continue
                # a float32 tensor, as the trainer's callback_metrics hold: the same comparisons, bit for bit
                self.metrics[cfg.monitor] = torch.tensor(float(value))

    def close(self) -> None:
        self.tracker.remove()
        for opt, saved in zip(self.optimizers, self._saved_steps):
            if saved is _ABSENT:
                opt.__dict__.pop("step", None)
            else:
                opt.step = saved


_ABSENT = object()


def _no_closure() -> torch.Tensor:
    # The real closure re-runs training_step; a simulation has no loss to compute.
    return torch.zeros(())


def _describe_source(metric: Any, monitor: str | None) -> str:
    describe = getattr(metric, "describe", None)
    if callable(describe):
        return describe(monitor)
    if isinstance(metric, Mapping):
        fn = metric.get(monitor)
        source = getattr(fn, "source", None)
        return source or f"{monitor} from plateau_metric[{monitor!r}]"
    return f"{monitor} from the plateau_metric function"


def _lr_names(config: OptimizationConfig) -> list[list[str]]:
    """Per optimizer, the LearningRateMonitor key of each param group (its first, when it has several schedulers)."""
    from .callbacks.lr_monitor import optimizer_lr_keys

    return optimizer_lr_keys(config.optimizers, config.schedulers)


def _detached_copy(module: Any) -> Any:
    """A deep copy of ``module`` without its trainer (whose accelerator need not be copied)."""
    trainer = getattr(module, "trainer", None)
    try:
        module.trainer = None
        return copy.deepcopy(module)
    except Exception as err:
        warnings.warn(
            f"simulate_lr_schedule could not deep-copy {type(module).__name__} ({err}); simulating on the module "
            "itself (its parameters are never changed; pass copy_module=False to skip the copy attempt).",
            UserWarning,
            stacklevel=3,
        )
        return module
    finally:
        module.trainer = trainer


def _validate(steps: Any, batches_per_epoch: Any, accumulate: Any, plateau_metric: Any) -> None:
    def positive_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    if not positive_int(steps):
        raise ConfigurationError(
            f"simulate_lr_schedule(steps={steps!r}): expected a positive int number of global steps."
        )
    if batches_per_epoch is not None and not positive_int(batches_per_epoch):
        raise ConfigurationError(
            f"simulate_lr_schedule(batches_per_epoch={batches_per_epoch!r}): expected a positive int or None "
            "(one endless epoch)."
        )
    if not positive_int(accumulate):
        raise ConfigurationError(
            f"simulate_lr_schedule(gradient_accumulation_steps={accumulate!r}): expected a positive int."
        )
    if plateau_metric is not None and not callable(plateau_metric) and not isinstance(plateau_metric, Mapping):
        raise ConfigurationError(
            f"simulate_lr_schedule(plateau_metric={plateau_metric!r}): expected None, a function epoch -> value, "
            "or a dict {monitor name: function}."
        )

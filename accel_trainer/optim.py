"""Parse and validate what ``configure_optimizers`` returns.

Every return form of the seed specification and of CONTRACT.md is normalised here into
one shape, :class:`OptimizationConfig`: a list of optimizers, the optimizer-dict
``frequency`` of each (or ``None``), and one :class:`SchedulerConfig` per scheduler. All
user mistakes are caught here, before any training, as :class:`ConfigurationError`s that
name the bad value and the allowed ones.

Accepted forms::

    return opt                                   # 1. one optimizer
    return opt_a, opt_b                          # 2. a list or tuple of optimizers
    return [opt_a, opt_b], [sched_a, {...}]      # 3. two lists
    return {"optimizer": opt, "lr_scheduler": sched_or_dict, "monitor": "val_loss"}  # 4.
    return ({"optimizer": g, "frequency": 2}, {"optimizer": d, "frequency": 1})     # 4.
    return None                                  # 5. no optimizer (warning)
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from .errors import ConfigurationError

SCHEDULER_KEYS = ("scheduler", "interval", "frequency", "monitor", "strict", "name", "warmup_steps")
OPTIMIZER_DICT_KEYS = ("optimizer", "lr_scheduler", "monitor", "frequency")
INTERVALS = ("epoch", "step")
DEFAULT_PLATEAU_MONITOR = "val_loss"


@dataclass
class SchedulerConfig:
    """One scheduler and when it steps.

    Readable as attributes or as a mapping (``cfg["interval"]``), like Lightning's
    ``LRSchedulerConfig``. After ``fit`` starts, ``scheduler`` is the prepared scheduler.
    """

    scheduler: Any
    interval: str = "epoch"
    frequency: int = 1
    monitor: str | None = None
    strict: bool = True
    name: str | None = None
    warmup_steps: int | None = None
    opt_idx: int = 0

    @property
    def reduce_on_plateau(self) -> bool:
        return is_plateau_scheduler(self.scheduler)

    def __getitem__(self, key: str) -> Any:
        if key not in {f.name for f in fields(self)} | {"reduce_on_plateau"}:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


@dataclass
class OptimizationConfig:
    """The normalised result of ``configure_optimizers``."""

    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    frequencies: list[int] | None = None
    schedulers: list[SchedulerConfig] = field(default_factory=list)


def unwrap_scheduler(scheduler: Any) -> Any:
    """The user's scheduler behind Accelerate's ``AcceleratedScheduler`` wrapper, if any."""
    return getattr(scheduler, "scheduler", scheduler) if type(scheduler).__name__ == "AcceleratedScheduler" else scheduler


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer behind Accelerate's ``AcceleratedOptimizer`` wrapper, if any."""
    while type(optimizer).__name__ == "AcceleratedOptimizer":
        optimizer = optimizer.optimizer
    return optimizer


def innermost_optimizer(optimizer: Any) -> Any:
    """The user's torch optimizer behind every wrapper: Accelerate's, and DeepSpeed's ZeRO optimizer
    (which keeps the user's optimizer as ``.optimizer`` and has no ``defaults`` of its own)."""
    while hasattr(optimizer, "optimizer") and not (isinstance(optimizer, torch.optim.Optimizer) and "defaults" in vars(optimizer)):
        optimizer = optimizer.optimizer
    return optimizer


def is_plateau_scheduler(scheduler: Any) -> bool:
    return isinstance(unwrap_scheduler(scheduler), ReduceLROnPlateau)


def requires_closure(optimizer: torch.optim.Optimizer) -> bool:
    """True for optimizers such as LBFGS whose ``step`` needs a closure (no default).

    Called by the default ``optimizer_step`` on every step, so the ``inspect.signature`` answer
    (about 0.1 ms) is remembered per ``step`` function: the class's function for a plain bound
    method, or the function object itself when ``step`` was replaced on the instance (torch's
    LR schedulers do that). A new function object is inspected afresh; the cache holds its keys
    weakly, so it keeps no optimizer alive.
    """
    step = unwrap_optimizer(optimizer).step
    key = getattr(step, "__func__", step)
    try:
        return _REQUIRES_CLOSURE[key]
    except KeyError:
        pass
    except TypeError:  # not weak-referenceable or unhashable: inspect every time
        return _closure_is_required(step)
    answer = _REQUIRES_CLOSURE[key] = _closure_is_required(step)
    return answer


_REQUIRES_CLOSURE: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
_MARK = "_accel_trainer_requires_closure"


def mark_requires_closure(optimizer: Any) -> None:
    """Remember :func:`requires_closure`'s answer on a prepared optimizer (read by the default
    ``optimizer_step`` on every step: an attribute lookup instead of unwrapping and a weak-key lookup)."""
    try:
        vars(optimizer)[_MARK] = requires_closure(optimizer)
    except TypeError:  # no __dict__: it is asked every time
        pass


def marked_requires_closure(optimizer: Any) -> bool:
    """:func:`requires_closure`, from the mark the trainer left when there is one."""
    try:
        return vars(optimizer)[_MARK]
    except (KeyError, TypeError):
        return requires_closure(optimizer)


def _closure_is_required(step: Any) -> bool:
    try:
        param = inspect.signature(step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty


def is_torch_scheduler(scheduler: Any) -> bool:
    """A torch ``LRScheduler`` or ``ReduceLROnPlateau`` (whose ``step`` the default ``lr_scheduler_step`` calls right)."""
    from torch.optim.lr_scheduler import LRScheduler

    return isinstance(unwrap_scheduler(scheduler), (LRScheduler, ReduceLROnPlateau))


def default_step_fits(scheduler: Any, monitored: bool) -> bool:
    """Whether ``TrainingModule.lr_scheduler_step``'s default call -- ``step()``, or ``step(metric)``
    for a monitored scheduler -- fits the scheduler's ``step`` signature."""
    try:
        signature = inspect.signature(unwrap_scheduler(scheduler).step)
    except (TypeError, ValueError):
        return True  # cannot tell: let it run
    try:
        signature.bind(0.0) if monitored else signature.bind()
    except TypeError:
        return False
    return True


def _is_optimizer(obj: Any) -> bool:
    return isinstance(obj, torch.optim.Optimizer)


def _describe(obj: Any) -> str:
    return f"{type(obj).__name__} ({obj!r:.80})"


def parse_configure_optimizers(result: Any) -> OptimizationConfig:
    """Normalise and validate the return value of ``configure_optimizers``.

    Raises:
        ConfigurationError: for any form or key not listed in CONTRACT.md, an ``interval``
            other than ``"epoch"``/``"step"``, a non-positive ``frequency`` or
            ``warmup_steps``, a scheduler built on an optimizer that was not returned, a
            plateau scheduler with nothing to monitor, an optimizer returned twice, or
            ``frequency`` given to some optimizers but not all.
    """
    if result is None:
        warnings.warn(
            "configure_optimizers returned None: training runs forward passes only and no parameter is updated.",
            UserWarning,
            stacklevel=2,
        )
        return OptimizationConfig()

    optimizers: list[torch.optim.Optimizer] = []
    frequencies: list[int | None] = []
    raw_schedulers: list[tuple[Any, str | None]] = []  # (scheduler or dict, dict-form default monitor)

    if _is_optimizer(result):
        optimizers = [result]
    elif isinstance(result, dict):
        _parse_optimizer_dict(result, optimizers, frequencies, raw_schedulers, where="configure_optimizers()")
    elif isinstance(result, (list, tuple)):
        items = list(result)
        if not items:
            raise ConfigurationError(
                "configure_optimizers returned an empty list. Return an optimizer, a list of optimizers, "
                "`[optimizers], [schedulers]`, an optimizer dict (or a list of them), or None for no optimizer."
            )
        if len(items) == 2 and all(isinstance(x, (list, tuple)) for x in items):
            opts, scheds = items
            if not opts:
                raise ConfigurationError(
                    f"configure_optimizers returned two lists `[optimizers], [schedulers]` without any optimizer "
                    f"(received [[], {list(scheds)!r:.60}]): nothing would be trained, silently. Return the optimizers "
                    "in the first list, or None for a run without optimizer (forward passes only, with a warning)."
                )
            for i, opt in enumerate(opts):
                if not _is_optimizer(opt):
                    raise ConfigurationError(
                        f"configure_optimizers()[0][{i}] must be a torch.optim.Optimizer, received {_describe(opt)}."
                    )
            optimizers = list(opts)
            raw_schedulers = [(s, None) for s in scheds]
        elif all(isinstance(x, dict) for x in items):
            for i, d in enumerate(items):
                _parse_optimizer_dict(d, optimizers, frequencies, raw_schedulers, where=f"configure_optimizers()[{i}]")
        elif all(_is_optimizer(x) for x in items):
            optimizers = items
        else:
            kinds = ", ".join(type(x).__name__ for x in items)
            raise ConfigurationError(
                f"configure_optimizers returned a {type(result).__name__} of [{kinds}]. Allowed: a list of "
                "optimizers, a list of optimizer dicts, or two lists `[optimizers], [schedulers]`."
            )
    else:
        raise ConfigurationError(
            f"configure_optimizers returned {_describe(result)}. Allowed: an optimizer, a list/tuple of optimizers, "
            "`[optimizers], [schedulers]`, a dict with an 'optimizer' key (or a list of them), or None."
        )

    seen: dict[int, int] = {}
    for i, opt in enumerate(optimizers):
        if id(opt) in seen:
            raise ConfigurationError(
                f"configure_optimizers returned the same optimizer object at positions {seen[id(opt)]} and {i}; "
                "each optimizer must appear once."
            )
        seen[id(opt)] = i

    freq_list = None
    given = [f for f in frequencies if f is not None]
    if given:
        if len(given) != len(optimizers):
            raise ConfigurationError(
                "An optimizer 'frequency' was given to some optimizers but not all "
                f"(received frequencies {frequencies}). Give a positive int 'frequency' to every optimizer dict, or none."
            )
        freq_list = [int(f) for f in given]

    schedulers = [_parse_scheduler(entry, default_monitor, optimizers, i) for i, (entry, default_monitor) in enumerate(raw_schedulers)]
    seen_schedulers: dict[int, int] = {}
    for i, cfg in enumerate(schedulers):
        key = id(unwrap_scheduler(cfg.scheduler))
        if key in seen_schedulers:
            raise ConfigurationError(
                f"configure_optimizers returned the same scheduler object ({type(cfg.scheduler).__name__}) as schedulers "
                f"{seen_schedulers[key]} and {i}: it would step twice each time it is due (a StepLR(gamma=0.5) would halve "
                "the learning rate twice). List each scheduler once; for two schedules, build two scheduler objects."
            )
        seen_schedulers[key] = i
    warmed: dict[int, int] = {}
    for i, cfg in enumerate(schedulers):
        if cfg.warmup_steps is not None:
            if cfg.opt_idx in warmed:
                raise ConfigurationError(
                    f"Schedulers {warmed[cfg.opt_idx]} and {i} both set 'warmup_steps' for optimizer {cfg.opt_idx}; "
                    "a warm-up applies to an optimizer once: set it on one of its schedulers."
                )
            warmed[cfg.opt_idx] = i
    return OptimizationConfig(optimizers=optimizers, frequencies=freq_list, schedulers=schedulers)


def _parse_optimizer_dict(
    d: dict,
    optimizers: list,
    frequencies: list,
    raw_schedulers: list,
    where: str,
) -> None:
    unknown = sorted(set(d) - set(OPTIMIZER_DICT_KEYS))
    if unknown:
        raise ConfigurationError(
            f"{where} has unknown optimizer-dict key(s) {unknown}. Allowed keys: {list(OPTIMIZER_DICT_KEYS)}."
        )
    if "optimizer" not in d:
        raise ConfigurationError(f"{where} is a dict without the required 'optimizer' key (received keys {sorted(d)}).")
    opt = d["optimizer"]
    if not _is_optimizer(opt):
        raise ConfigurationError(f"{where}['optimizer'] must be a torch.optim.Optimizer, received {_describe(opt)}.")
    freq = d.get("frequency")
    if freq is not None:
        _check_positive_int(freq, f"{where}['frequency']")
    monitor = d.get("monitor")
    if monitor is not None and not isinstance(monitor, str):
        raise ConfigurationError(f"{where}['monitor'] must be a metric name (str), received {monitor!r}.")
    optimizers.append(opt)
    frequencies.append(freq)
    sched = d.get("lr_scheduler")
    if sched is not None:
        raw_schedulers.append((sched, monitor))


def _check_positive_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{what} must be a positive int, received {value!r}.")


def _parse_scheduler(entry: Any, default_monitor: str | None, optimizers: list, index: int) -> SchedulerConfig:
    where = f"scheduler {index}"
    if isinstance(entry, dict):
        unknown = sorted(set(entry) - set(SCHEDULER_KEYS))
        if unknown:
            raise ConfigurationError(
                f"{where} has unknown key(s) {unknown}. Allowed scheduler-dict keys: {list(SCHEDULER_KEYS)}."
            )
        if "scheduler" not in entry:
            raise ConfigurationError(
                f"{where} is a dict without the required 'scheduler' key (received keys {sorted(entry)})."
            )
        cfg = SchedulerConfig(scheduler=entry["scheduler"])
        cfg.interval = entry.get("interval", "epoch")
        cfg.frequency = entry.get("frequency", 1)
        cfg.monitor = entry.get("monitor", default_monitor)
        cfg.strict = entry.get("strict", True)
        cfg.name = entry.get("name")
        cfg.warmup_steps = entry.get("warmup_steps")
        explicit_monitor = "monitor" in entry or default_monitor is not None
    else:
        cfg = SchedulerConfig(scheduler=entry, monitor=default_monitor)
        explicit_monitor = default_monitor is not None

    sched = cfg.scheduler
    if isinstance(sched, dict) or _is_optimizer(sched) or not callable(getattr(sched, "step", None)):
        raise ConfigurationError(
            f"{where}: 'scheduler' must be a learning-rate scheduler (an object with .step()), received {_describe(sched)}."
        )
    missing = [m for m in ("state_dict", "load_state_dict") if not callable(getattr(sched, m, None))]
    if missing:
        raise ConfigurationError(
            f"{where}: {type(sched).__name__} has no {' / '.join(m + '()' for m in missing)}, so it cannot be saved in a "
            "checkpoint nor restored on resume (the first checkpoint, at the end of the first epoch, would fail). A "
            "scheduler needs step(), state_dict() and load_state_dict(), as torch's LRScheduler has (Lightning's "
            "rule for custom schedulers); subclass torch.optim.lr_scheduler.LRScheduler, or add the two methods."
        )
    if cfg.interval not in INTERVALS:
        raise ConfigurationError(f"{where}: 'interval' must be one of {list(INTERVALS)}, received {cfg.interval!r}.")
    _check_positive_int(cfg.frequency, f"{where}: 'frequency'")
    if cfg.warmup_steps is not None:
        _check_positive_int(cfg.warmup_steps, f"{where}: 'warmup_steps'")
    if not isinstance(cfg.strict, bool):
        raise ConfigurationError(f"{where}: 'strict' must be True or False, received {cfg.strict!r}.")
    if cfg.name is not None and not isinstance(cfg.name, str):
        raise ConfigurationError(f"{where}: 'name' must be a str, received {cfg.name!r}.")
    if cfg.monitor is not None and not isinstance(cfg.monitor, str):
        raise ConfigurationError(f"{where}: 'monitor' must be a metric name (str), received {cfg.monitor!r}.")

    if is_plateau_scheduler(sched):
        if explicit_monitor and not cfg.monitor:
            raise ConfigurationError(
                f"{where}: ReduceLROnPlateau needs a metric to monitor, received monitor={cfg.monitor!r}. "
                f"Set 'monitor' to a logged metric name (default {DEFAULT_PLATEAU_MONITOR!r})."
            )
        if cfg.monitor is None:
            cfg.monitor = DEFAULT_PLATEAU_MONITOR

    sched_opt = getattr(unwrap_scheduler(sched), "optimizer", None)
    if sched_opt is None:
        raise ConfigurationError(
            f"{where}: {type(sched).__name__} has no 'optimizer' attribute, so it cannot be tied to one of the "
            "returned optimizers. Build it on one of them (torch schedulers take the optimizer as first argument)."
        )
    for i, opt in enumerate(optimizers):
        if sched_opt is opt or sched_opt is unwrap_optimizer(opt):
            cfg.opt_idx = i
            break
    else:
        raise ConfigurationError(
            f"{where}: {type(sched).__name__} was built on a {type(sched_opt).__name__} that configure_optimizers did "
            f"not return (returned: {[type(o).__name__ for o in optimizers]}). Return that optimizer too, or build the "
            "scheduler on one of the returned optimizers."
        )
    return cfg


def check_optimizers_against_module(module: torch.nn.Module, config: OptimizationConfig) -> None:
    """What ``configure_optimizers`` returned, checked against the module it trains (at the start of ``fit``).

    Raises:
        ConfigurationError: an optimizer holds a parameter that is not the module's (it would
            not be moved to the device, synchronised across processes nor saved in
            checkpoints); a custom scheduler whose ``step`` the default ``lr_scheduler_step``
            cannot call (``step()``, or ``step(metric)`` when monitored) and the module does
            not override ``lr_scheduler_step`` (Lightning's rule for duck-typed schedulers).

    Warns:
        UserWarning: an optimizer all of whose parameters are frozen (``requires_grad=False``):
            it never changes anything.
    """
    own = {id(p) for p in module.parameters()}
    name = type(module).__name__
    for i, opt in enumerate(config.optimizers):
        params = [p for g in opt.param_groups for p in g["params"]]
        foreign = [p for p in params if id(p) not in own]
        if foreign:
            shapes = [tuple(p.shape) for p in foreign[:5]]
            raise ConfigurationError(
                f"Optimizer {i} ({type(opt).__name__}) holds {len(foreign)} parameter(s) that are not parameters of "
                f"{name} (shapes {shapes}{' ...' if len(foreign) > 5 else ''}): they would not be moved to the device, "
                "kept in sync across processes, nor saved in checkpoints. Register them on the module (e.g. "
                "self.temperature = torch.nn.Parameter(...) in __init__) and build the optimizer on self.parameters(), "
                "or leave them out of the optimizer."
            )
        if params and not any(p.requires_grad for p in params):
            warnings.warn(
                f"Optimizer {i} ({type(opt).__name__}) holds only frozen parameters ({len(params)}, all "
                "requires_grad=False): it will never change them. Unfreeze them, or leave this optimizer out.",
                UserWarning,
                stacklevel=3,
            )
    overridden = getattr(type(module), "lr_scheduler_step", None) is not _default_lr_scheduler_step()
    for i, cfg in enumerate(config.schedulers):
        if overridden or is_torch_scheduler(cfg.scheduler):
            continue
        monitored = cfg.monitor is not None
        if not default_step_fits(cfg.scheduler, monitored):
            call = "step(metric)" if monitored else "step()"
            raise ConfigurationError(
                f"scheduler {i}: {type(cfg.scheduler).__name__} is not a torch LRScheduler, and its step cannot be "
                f"called as {call}, which the default lr_scheduler_step does. Override "
                f"{name}.lr_scheduler_step(self, scheduler, metric) to step it (e.g. scheduler.step(epoch=self.current_epoch)), "
                "as Lightning requires for custom schedulers."
            )


def _default_lr_scheduler_step() -> Any:
    from .module import TrainingModule

    return TrainingModule.lr_scheduler_step

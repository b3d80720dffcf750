"""Every touch of Accelerate's or torch's private internals, in one place, fenced by a tested version window.

accel_trainer uses a few things neither library promises to keep: per-step shortcuts around
Accelerate's wrappers (they exist for the per-step cost that benchmarks/overhead.py measures),
and a handful of private hooks that no public API offers (resetting Accelerate's shared state,
bounding an existing process group's timeout, switching the state to FSDP on CPU). Each is a
named function here whose docstring names the upstream code it mirrors, and
tests/test_internals.py fails when that upstream code changes (a hash of its source, or a check
of the attribute it needs), so an upgrade cannot change it unnoticed.

**Version windows.** The shortcuts copy upstream code, so they are used only on the versions
they were checked against (:data:`TESTED_WINDOWS`: accelerate 1.15.x, torch 2.13.x). On any other
version each shortcut is off and the stock upstream code runs (same results, a little more time
per step), and one ``UntestedVersionWarning`` per package says so. ``ACCEL_TRAINER_FAST_PATHS=0``
turns the shortcuts off on purpose (to compare against stock Accelerate). The private hooks that
behaviour depends on (not speed) have no stock alternative: they are used wherever the attribute
exists, and the same structural tests fence them.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.modules import module as nn_module

# major.minor of each package whose internals the shortcuts below were read from and tested with
TESTED_WINDOWS: dict[str, tuple[int, int]] = {"accelerate": (1, 15), "torch": (2, 13)}


class UntestedVersionWarning(UserWarning):
    """A package is outside the version window accel_trainer's shortcuts were tested with."""


def _installed_version(package: str) -> str:
    if package == "torch":
        return torch.__version__
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a dependency
        return "0"


def _major_minor(version: str) -> tuple[int, int] | None:
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


@functools.cache
def fast_paths_enabled(package: str) -> bool:
    """Whether the shortcuts around ``package``'s internals are on (the installed version is in its window).

    Outside the window (or with ``ACCEL_TRAINER_FAST_PATHS=0``) they are off and the stock
    upstream code runs; outside the window one ``UntestedVersionWarning`` says so (once per
    process and package: the answer is cached).
    """
    if os.environ.get("ACCEL_TRAINER_FAST_PATHS", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    version = _installed_version(package)
    window = TESTED_WINDOWS[package]
    if _major_minor(version) == window:
        return True
    warnings.warn(
        f"accel_trainer: {package} {version} is outside the version window its per-step shortcuts were tested with "
        f"({package} {window[0]}.{window[1]}.x, accel_trainer/internals.py): they are off, and {package}'s own code runs "
        "instead (the same results, a little more time per step). Run tests/test_internals.py against this version "
        "and widen TESTED_WINDOWS when it passes.",
        UntestedVersionWarning,
        stacklevel=2,
    )
    return False


def cache_accelerate_availability_checks() -> None:
    """Decide (once per process) whether Accelerate's shortcuts are on; nothing of Accelerate is replaced.

    Up to issue 16 this replaced ``accelerate.optimizer.is_lomo_available`` with a cached copy for
    the whole process, for good: ``AcceleratedOptimizer.step`` calls it (an uncached
    ``importlib.util.find_spec``, ~0.1 ms) twice per step. The optimizer shortcut
    (:func:`install_fast_optimizer`) now decides once per optimizer whether it is a LOMO one and
    never calls the check on its path, so nothing process-wide is patched and nothing needs
    restoring. What is left at this call site (``Trainer._setup_optimization``) is the version
    fence, so that its warning comes when a run is set up.
    """
    fast_paths_enabled("accelerate")


# -- the prepared optimizer ---------------------------------------------------------------------
def _fast_optimizer_class() -> type:
    """The ``AcceleratedOptimizer`` subclass with the shortcuts (made on first use: Accelerate is imported lazily)."""
    from accelerate.optimizer import AcceleratedOptimizer

    class FastAcceleratedOptimizer(AcceleratedOptimizer):
        """Accelerate 1.15's ``AcceleratedOptimizer`` with ``step``/``zero_grad`` minus their per-call checks.

        Mirrors ``accelerate.optimizer.AcceleratedOptimizer.step`` and ``.zero_grad`` (1.15):

        * ``zero_grad`` inspects the wrapped optimizer's ``zero_grad`` signature on every call
          (~50 µs); the answer is fixed for an optimizer, so it is kept in
          ``_accel_trainer_set_to_none`` when the class is swapped in. The body is otherwise
          Accelerate's: zero only when gradients sync, ``set_to_none`` defaulting to True when
          the optimizer accepts it.
        * ``step`` first checks LOMO's availability twice (an uncached ``find_spec``) and reads
          ``is_xla_gradients_synced``; this class is only swapped in where neither applies
          (not XLA, not a ``lomo_optim`` optimizer, decided once), so it runs the rest of the
          body: the scaler protocol exactly as upstream writes it, or
          ``optimizer.step(closure)``, only when gradients sync.

        It is a module-level class (``accel_trainer.internals.FastAcceleratedOptimizer``) swapped
        in through ``__class__``, so a prepared optimizer still pickles and deep-copies (also
        after a fit: the process-wide ``GradientState``/``AcceleratorState`` views, which hold
        weak references, are re-attached on loading instead of pickled), and
        ``isinstance(opt, AcceleratedOptimizer)`` and its ``__name__`` hold.
        """

        _accel_trainer_set_to_none: bool

        def zero_grad(self, set_to_none: bool | None = None) -> None:
            if self.gradient_state.sync_gradients:
                if self._accel_trainer_set_to_none:
                    self.optimizer.zero_grad(set_to_none=True if set_to_none is None else set_to_none)
                else:
                    if set_to_none is not None:
                        raise ValueError("`set_to_none` for Optimizer.zero_grad` is not supported by this optimizer.")
                    self.optimizer.zero_grad()

        def step(self, closure: Any = None) -> Any:
            if self.gradient_state.sync_gradients:
                scaler = self.scaler
                if scaler is not None:
                    self.optimizer.step = self._optimizer_patched_step_method
                    scaler.step(self.optimizer, closure)
                    scaler.update()
                    # the step was skipped when the scaler found an overflow
                    self._is_overflow = not self._accelerate_step_called  # type: ignore[has-type]
                    self.optimizer.step = self._optimizer_original_step_method
                    self._accelerate_step_called = False
                else:
                    self.optimizer.step(closure)  # looked up on each call: schedulers and Accelerate patch it
            return None

        def __getstate__(self) -> dict:
            # ``gradient_state``/``accelerator_state`` are views of Accelerate's process-wide shared
            # state (GradientState holds weak references to the data loaders, which do not pickle):
            # they are left out and re-attached to this process's shared state on loading.
            state = super().__getstate__()
            return {k: v for k, v in state.items() if k not in ("gradient_state", "accelerator_state")}

        def __setstate__(self, state: dict) -> None:
            from accelerate.state import AcceleratorState, GradientState

            super().__setstate__(state)
            self.gradient_state = GradientState()
            try:
                self.accelerator_state = AcceleratorState()
            except ValueError:  # loaded in a process without an Accelerator: attached when one exists
                self.accelerator_state = None

    FastAcceleratedOptimizer.__module__ = __name__
    FastAcceleratedOptimizer.__qualname__ = "FastAcceleratedOptimizer"
    # Code that recognises Accelerate's wrapper by name (accel_trainer's own unwrap_optimizer,
    # user code) keeps doing so: the subclass is a drop-in.
    FastAcceleratedOptimizer.__name__ = "AcceleratedOptimizer"
    return FastAcceleratedOptimizer


_FAST_CLASSES: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    # ``FastAcceleratedOptimizer`` is made on first use (importing this module must not import
    # Accelerate); pickle finds it by this name (its ``__qualname__``; ``AcceleratedOptimizer``, its
    # ``__name__``, for pickle protocols that use that).
    if name in ("FastAcceleratedOptimizer", "AcceleratedOptimizer"):
        if not _FAST_CLASSES:
            _FAST_CLASSES["fast"] = _fast_optimizer_class()
        return _FAST_CLASSES["fast"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def install_fast_optimizer(optimizer: Any) -> bool:
    """Swap a prepared ``AcceleratedOptimizer`` to :class:`FastAcceleratedOptimizer` where that is exact.

    Left alone (and so stock): anything but a plain ``AcceleratedOptimizer`` (DeepSpeed's and
    other subclasses have their own ``step``), an instance whose ``step``/``zero_grad`` were
    replaced, XLA, LOMO optimizers, an uninspectable ``zero_grad``, and any version outside the
    window (:func:`fast_paths_enabled`). Returns whether it was swapped.
    """
    try:
        from accelerate.optimizer import AcceleratedOptimizer
    except ImportError:  # pragma: no cover - a dependency
        return False
    if type(optimizer) is not AcceleratedOptimizer or "step" in vars(optimizer) or "zero_grad" in vars(optimizer):
        return False
    if not fast_paths_enabled("accelerate"):
        return False
    if "XLA" in str(getattr(optimizer.accelerator_state, "distributed_type", "")):
        return False
    inner = optimizer.optimizer
    if type(inner).__module__.startswith("lomo_optim"):
        return False
    try:
        accepts = "set_to_none" in inspect.signature(inner.zero_grad).parameters
    except (TypeError, ValueError):  # pragma: no cover - uninspectable builtin
        return False
    optimizer._accel_trainer_set_to_none = accepts
    optimizer.__class__ = __getattr__("FastAcceleratedOptimizer")
    return True


def direct_optimizer(optimizer: Any) -> Any:
    """The torch optimizer whose own ``step()``/``zero_grad()`` a step may call instead of the prepared
    wrapper's, or None.

    Where :func:`install_fast_optimizer` swapped the class in, with no fp16 scaler and while
    gradients synchronise (the caller checks that), ``FastAcceleratedOptimizer.step`` is
    ``self.optimizer.step(None)`` and its ``zero_grad`` is ``self.optimizer.zero_grad(set_to_none=True)``
    (``zero_grad()`` for an optimizer whose ``zero_grad`` takes no ``set_to_none``): the one-process
    training step calls those itself (``OptimizationStep._train_batch_lean``), a call layer fewer per
    step. The caller reads ``.optimizer`` through the wrapper's ``optimizer`` attribute on each step
    and looks ``step`` up on it then, since LR schedulers and Accelerate patch the instance's ``step``.
    """
    cls = _FAST_CLASSES.get("fast")  # None until install_fast_optimizer swapped one in
    if cls is None or type(optimizer) is not cls or getattr(optimizer, "scaler", None) is not None:
        return None
    if "step" in vars(optimizer) or "zero_grad" in vars(optimizer):
        return None
    wrapper: Any = optimizer  # mypy narrows it to the class made at run time
    return wrapper.optimizer


# -- the prepared data loader ---------------------------------------------------------------------
def accelerator_present() -> bool:
    """Whether this machine has any device besides the CPU (CUDA, MPS, XPU …)."""
    if torch.cuda.is_available():
        return True
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def skip_noop_placement(loader: Any) -> None:
    """No ``send_to_device`` per batch where it cannot move anything.

    Mirrors ``accelerate.data_loader.DataLoaderShard.__iter__`` (1.15), which sends every batch to
    ``self.device`` unless it is None (a recursive walk and a ``.to()`` per tensor: 9-21 µs per
    batch on one CPU process, benchmarks/RESULTS.md). On a machine with no device besides the CPU
    every tensor a dataset yields is already a CPU tensor, so that placement is a no-op and the
    loader's ``device`` is set to None. Anywhere an accelerator exists (also with ``cpu=True``),
    and outside the accelerate window, batches are placed as Accelerate does.
    """
    if type(loader).__name__ != "DataLoaderShard" or getattr(loader, "device", None) is None:
        return
    if torch.device(loader.device).type == "cpu" and not accelerator_present() and fast_paths_enabled("accelerate"):
        loader.device = None


# -- calling a module without nn.Module.__call__ ---------------------------------------------------
# Hooks registered for every module (``torch.nn.modules.module.register_module_forward_hook`` …):
# torch registers them into these dicts in place, so they are bound once. Calling a module's
# ``forward`` directly is only right while all are empty (nn.Module.__call__ would run them).
GLOBAL_FORWARD_PRE_HOOKS: dict = nn_module._global_forward_pre_hooks
GLOBAL_FORWARD_HOOKS: dict = nn_module._global_forward_hooks
GLOBAL_BACKWARD_PRE_HOOKS: dict = nn_module._global_backward_pre_hooks
GLOBAL_BACKWARD_HOOKS: dict = nn_module._global_backward_hooks


def forward_callable_directly(module: torch.nn.Module) -> bool:
    """Whether calling ``module.forward(...)`` is what ``module(...)`` would do, minus ``nn.Module.__call__``.

    Mirrors ``torch.nn.Module._call_impl`` (torch 2.13): with no per-module hooks (forward,
    forward-pre, backward, backward-pre), no ``torch.compile`` wrapper (``_compiled_call_impl``)
    and no instance-level ``forward``, ``_call_impl`` calls ``forward`` directly apart from the
    global hooks, which the caller checks per step (:data:`GLOBAL_FORWARD_PRE_HOOKS` …). Outside
    the torch window this is False and every call goes through ``nn.Module.__call__``.
    """
    return (
        fast_paths_enabled("torch")
        and "forward" not in vars(module)
        and getattr(module, "_compiled_call_impl", None) is None
        and not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)
    )


# -- private torch kernels (bound once: they run per step) ------------------------------------------
def _foreach_add_fallback(tensors: list, others: list, alpha: float = 1) -> None:
    for tensor, other in zip(tensors, others):
        tensor.add_(other, alpha=alpha)


def _no_fused_check(*args: Any) -> None:
    raise NotImplementedError("this torch has no _amp_foreach_non_finite_check_and_unscale_")


#: ``torch._foreach_add_`` (torch 2.13): one fused in-place add over a list of tensors (metrics' epoch
#: sums); a loop of ``add_`` where torch has none.
foreach_add_: Callable[..., Any] = getattr(torch, "_foreach_add_", _foreach_add_fallback)
#: ``torch._amp_foreach_non_finite_check_and_unscale_`` (torch 2.13): the fp16 ``GradScaler``'s own fused
#: NaN/inf check (nonfinite.py); where torch has none it raises NotImplementedError, and the caller
#: falls back to its per-tensor check.
amp_foreach_non_finite_check_and_unscale_: Callable[..., Any] = getattr(
    torch, "_amp_foreach_non_finite_check_and_unscale_", _no_fused_check
)


# -- Accelerate's shared state ----------------------------------------------------------------------
def reset_accelerate_state(mixed_precision: str) -> None:
    """Start a new ``Accelerator`` from clean shared state, keeping the process group.

    Accelerate keeps ``AcceleratorState`` and ``GradientState`` in class-level ``_shared_state``
    dicts for the whole process, so a second Accelerator with another precision would be
    refused. Mirrors what Accelerate's own tests do between cases:
    ``AcceleratorState._reset_state(reset_partial_state=False)`` (only when the precision
    differs) and ``GradientState._reset_state()``; ``PartialState`` (which holds the process
    group) is kept.
    """
    from accelerate.state import AcceleratorState, GradientState

    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def switch_state_to_fsdp(accelerator: Any, plugin: Any, device: torch.device | None) -> None:
    """Make Accelerate's state say FSDP (and, for FSDP1, the plain ``cpu`` device) for an FSDP run on CPU.

    Accelerate (1.15, ``accelerate/state.py``) enables FSDP only for accelerator-backed
    distributed types; on CPU processes the state says ``MULTI_CPU``. The instance state and
    ``PartialState._shared_state`` (which other Accelerate utilities read) are both switched,
    as ``PartialState.__init__`` would have set them.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if device is not None:
        state.device = device
        PartialState._shared_state["device"] = device


# -- torch.nn.parallel / torch.optim ----------------------------------------------------------------
def ddp_ignore(module: torch.nn.Module, names: list[str]) -> None:
    """Have DDP leave the named parameters and buffers of ``module`` out of its gradient all-reduce.

    Calls ``torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``
    (torch 2.13; static, it only records the names on the module), the only way to keep one
    optimizer's DDP wrapper from reducing another optimizer's parameters. (Called from
    ``RunSetup._make_dispatchers``.)
    """
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)


def mark_optimizer_stepped(optimizer: torch.optim.Optimizer) -> None:
    """Tell torch's LR schedulers that ``optimizer`` has stepped (``optimizer._opt_called = True``).

    torch's ``LRScheduler`` (2.13, ``torch/optim/lr_scheduler.py``) warns "lr_scheduler.step()
    before optimizer.step()" unless this flag is set; torch sets it on every real step. (Set
    directly today by trainer.py's ``_mark_stepped`` and lr_schedule.py; those call sites move
    here when the other issue-17 branches land.)
    """
    optimizer._opt_called = True  # type: ignore[attr-defined]


# -- torch.distributed ------------------------------------------------------------------------------
def set_process_group_timeout(timeout: Any) -> bool:
    """Bound the default process group's collectives by ``timeout`` (a ``timedelta``); False where torch cannot.

    Calls ``torch.distributed.distributed_c10d._set_pg_timeout`` (torch 2.13), the only way to
    change the timeout of a group that already exists (``init_process_group(timeout=)`` sets it
    only at creation).
    """
    from torch.distributed import distributed_c10d

    setter = getattr(distributed_c10d, "_set_pg_timeout", None)
    if setter is None:  # pragma: no cover - a torch without it
        return False
    setter(timeout)
    return True


def load_dcp_unsharded(reader: Any, keys: set[str] | None) -> dict[str, Any]:
    """A DCP checkpoint's tensors (``keys``, or all) read unsharded into this process, without a process group.

    Mirrors ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` (torch 2.13), which
    does the same with the private ``state_dict_loader._load_state_dict`` and
    ``default_planner._EmptyStateDictLoadPlanner`` (no public API loads into an empty state dict).
    """
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    return state


# -- torchmetrics -----------------------------------------------------------------------------------
def metric_defaults(metric: Any) -> dict:
    """A torchmetrics ``Metric``'s state defaults (``Metric._defaults``: state name -> initial value).

    torchmetrics (1.x) keeps a metric's states outside the state dict and ``Metric.reset``
    restores them from ``_defaults``; with ``_device``, these private attributes are the only
    handle for putting a metric's states back (engines/fsdp.py).
    """
    return metric._defaults


def metric_device(metric: Any) -> Any:
    """The device a torchmetrics ``Metric`` believes its states are on (``Metric._device``)."""
    return metric._device


def restore_metric_states(metric: Any, defaults: dict, states: dict, device: Any) -> None:
    """Put back a metric's defaults, state values and device (as read by :func:`metric_defaults`, :func:`metric_device`)."""
    metric._defaults = defaults
    for key, value in states.items():
        setattr(metric, key, value)
    metric._device = device


__all__ = [
    "TESTED_WINDOWS",
    "UntestedVersionWarning",
    "accelerator_present",
    "amp_foreach_non_finite_check_and_unscale_",
    "cache_accelerate_availability_checks",
    "ddp_ignore",
    "fast_paths_enabled",
    "foreach_add_",
    "forward_callable_directly",
    "install_fast_optimizer",
    "load_dcp_unsharded",
    "mark_optimizer_stepped",
    "metric_defaults",
    "metric_device",
    "reset_accelerate_state",
    "restore_metric_states",
    "set_process_group_timeout",
    "skip_noop_placement",
    "switch_state_to_fsdp",
]

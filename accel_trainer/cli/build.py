"""The objects a parsed config names, instantiated by jsonargparse in the order a run needs.

jsonargparse resolves each ``class_path``, checks and converts the ``init_args`` and builds
the classes nested in them (``ArgumentParser.instantiate``). One ``instantiate`` call over
the whole config would build them in its own order, the Trainer (a class group) last; so each
part is handed to jsonargparse on its own, which decides two things users see:

- the Trainer comes first, because it applies ``trainer.seed``: the DataModule and the
  module are built after it, so the module's initial weights follow the seed;
- each callback is built on its own, so that a callback's check of its own arguments is
  reported under its place in the list (``trainer.callbacks[1]: ...``).

The optimizer and the scheduler need the module's parameters and the optimizer, which exist
only once the module does: jsonargparse builds them as factories
(``Callable[[params], Optimizer]``, LightningCLI's ``OptimizerCallable``), and
:func:`attach_optimizers` gives the module a ``configure_optimizers`` that calls them.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from jsonargparse import ArgumentError, ArgumentParser, Namespace

from ..callbacks import Callback
from ..data import DataModule
from ..module import TrainingModule
from ..trainer import Trainer
from .messages import CLIError
from .parser import SCHEDULER_DICT_DEFAULTS, qualify

_Scheduler = torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau


def build(cfg: Namespace) -> tuple[Trainer, DataModule | None, TrainingModule]:
    """The Trainer, DataModule (or None) and module a parsed config names, in that order (see above)."""
    trainer_args = cfg.trainer.clone()
    if trainer_args.callbacks is not None:
        trainer_args.callbacks = [
            _instantiate(f"trainer.callbacks[{i}]", spec, Callback)
            for i, spec in enumerate(trainer_args.callbacks)
        ]
    trainer = _instantiate("trainer", trainer_args, Trainer)
    return trainer, build_datamodule(cfg), build_module(cfg)


def build_datamodule(cfg: Namespace) -> DataModule | None:
    """The config's DataModule, or None without a ``data`` section."""
    if cfg.data is None:
        return None
    return _instantiate("data", cfg.data, DataModule)


def build_module(cfg: Namespace) -> TrainingModule:
    """The config's module, with the config's optimizer and scheduler attached when it has them."""
    module = _instantiate("module", cfg.module, TrainingModule)
    if cfg.optimizer is not None:
        section, keys = cfg.lr_scheduler, ("class_path", "init_args", *SCHEDULER_DICT_DEFAULTS)
        attach_optimizers(module, cfg.optimizer, None if section.class_path is None else {k: section[k] for k in keys})
    return module


def attach_optimizers(module: TrainingModule, optimizer: Any, lr_scheduler: dict | None = None) -> None:
    """Give ``module`` a ``configure_optimizers`` that builds the configured optimizer/scheduler.

    The method is bound to this instance at run time (``types.MethodType``), so a module
    class without ``configure_optimizers`` trains from a config, and one with it is
    overridden (with a warning) as LightningCLI does.

    Args:
        module: the module instance.
        optimizer: ``{"class_path": ..., "init_args": {...}}`` (or a jsonargparse Namespace).
        lr_scheduler: ``{"class_path": ..., "init_args": {...}, "interval": ..., ...}`` or None;
            the keys other than class_path/init_args become the scheduler dict of CONTRACT.md.

    Raises:
        CLIError: a class that cannot be imported, or arguments its signature does not accept.
    """
    make_optimizer, opt_name = _factory("optimizer", optimizer, "torch.optim",
                                        Callable[[Iterable], torch.optim.Optimizer])
    make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    sched_keys: dict[str, Any] = {}
    if lr_scheduler is not None:
        make_scheduler, sched_name = _factory("lr_scheduler", lr_scheduler, "torch.optim.lr_scheduler",
                                              Callable[[torch.optim.Optimizer], _Scheduler])
        sched_keys = {k: v for k, v in lr_scheduler.items() if k not in ("class_path", "init_args") and v is not None}
    if type(module).configure_optimizers is not TrainingModule.configure_optimizers:
        warnings.warn(
            f"{type(module).__name__}.configure_optimizers is replaced by the config's optimizer "
            f"({opt_name}){' and lr_scheduler (' + sched_name + ')' if make_scheduler else ''}.",
            UserWarning,
            stacklevel=2,
        )

    def configure_optimizers(self: TrainingModule) -> Any:
        opt = make_optimizer(self.parameters())
        if make_scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": make_scheduler(opt), **sched_keys}}

    module.configure_optimizers = types.MethodType(configure_optimizers, module)  # type: ignore[method-assign]


def _instantiate(key: str, value: Any, base: type) -> Any:
    """jsonargparse builds ``value``: the parsed ``class_path``/``init_args`` of a subclass of ``base``.

    For the Trainer, the parsed arguments of the class itself (the ``trainer`` section is a
    class group: no ``class_path``). A ``ValueError`` (``ConfigurationError`` included) from the
    class's own check of its arguments is a config error like any other, reported under ``key``.
    """
    parser = ArgumentParser(exit_on_error=False)
    if base is Trainer:
        parser.add_class_arguments(Trainer, "value", skip={"accelerator"})
    else:
        parser.add_argument("--value", type=base)
    try:
        return parser.instantiate(Namespace(value=value)).value
    except ValueError as err:
        raise CLIError(f"{key}: {err}") from None


def _factory(key: str, spec: Any, default_module: str, typehint: Any) -> tuple[Callable[..., Any], str]:
    """A callable jsonargparse builds from ``spec`` that takes the class's first argument, and the class's name."""
    spec = spec.as_dict() if isinstance(spec, Namespace) else dict(spec)
    value = {"class_path": qualify(spec["class_path"], default_module), "init_args": spec.get("init_args") or {}}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--value", type=typehint)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jsonargparse's deprecation notices are not for our users
            parsed = parser.parse_object({"value": value})
    except ArgumentError as err:
        raise CLIError(f"{key}: {err}") from None
    return parser.instantiate(parsed).value, parsed.value.class_path.rpartition(".")[2]

"""The command line: one jsonargparse parser per subcommand, :func:`parse`, and the checks it cannot express.

jsonargparse (as LightningCLI) type-checks every value against the signature of the class it
goes to, before anything is built; its parsers are declared here from tables, so that the
type of each key is known to the error messages without reading jsonargparse's private
attributes. Right after parsing come the two checks jsonargparse cannot make:

- ``lr_scheduler``: its class needs the optimizer as first argument and may be named by its
  short name (``StepLR``), so the section is plain keys here, resolved and checked against
  the class's signature by :func:`_check_lr_scheduler`;
- ``__init__`` arguments without a type hint: jsonargparse accepts any value for them, so
  they are checked against the type of their default (:func:`_check_untyped_init_args`).
"""

# ruff: noqa: UP045 -- `Optional[str]` is what `--help` prints as the type; `str | None` would change the help text

from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Sequence
from typing import Any, Literal, Optional

import torch
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, Namespace

from ..data import DataModule
from ..module import TrainingModule
from ..trainer import Trainer
from .messages import (
    PROG,
    CLIError,
    classes_in,
    explain_init_args_error,
    explain_parse_error,
    locate,
    show,
)

RUN_COMMANDS = ("fit", "validate", "test")
COMMANDS = (*RUN_COMMANDS, "plot", "lr-schedule", "status", "export")
DESCRIPTION = "``accel-trainer``: train, validate and test from YAML configs (jsonargparse, as LightningCLI)."
HELPS = {
    "fit": "Train a module (resumes from checkpoints/last.ckpt when it exists).",
    "validate": "Run one validation pass (weights from --ckpt_path, else the run's last.ckpt).",
    "test": "Run one test pass (weights from --ckpt_path, else the run's last.ckpt).",
    "plot": "Write PNG curves of a run's logged metrics and learning rates.",
    "lr-schedule": "Plot the learning rate each optimizer would follow, without training.",
    "status": "Print a run's run_status.json (running, finished, preempted or failed).",
    "export": "Write a checkpoint's module weights as one consolidated safetensors file (sharded FSDP checkpoints too).",
}
# The sections that name a class by class_path/init_args, with the base class it must subclass.
CLASS_SECTIONS: dict[str, type] = {"module": TrainingModule, "data": DataModule, "optimizer": torch.optim.Optimizer}
# lr_scheduler.<key>: add_argument keywords; the keys after init_args are the scheduler dict's of CONTRACT.md.
LR_SCHEDULER_ARGUMENTS: dict[str, dict[str, Any]] = {
    "class_path": {"type": Optional[str], "default": None,
                   "help": "a torch.optim.lr_scheduler class (a short name such as StepLR is enough)"},
    "init_args": {"type": Optional[dict], "default": None, "help": "its arguments, except the optimizer"},
    "interval": {"type": Literal["epoch", "step"], "default": "epoch"},
    "frequency": {"type": int, "default": 1},
    "monitor": {"type": Optional[str], "default": None, "help": "the metric a ReduceLROnPlateau steps on (default val_loss)"},
    "strict": {"type": bool, "default": True},
    "name": {"type": Optional[str], "default": None},
    "warmup_steps": {"type": Optional[int], "default": None, "help": "linear warm-up over this many optimizer steps"},
}
SCHEDULER_DICT_DEFAULTS = {k: v["default"] for k, v in LR_SCHEDULER_ARGUMENTS.items() if k not in ("class_path", "init_args")}
_CKPT_PATH = {"type": Optional[str], "default": None,
              "help": "checkpoint to resume from (fit) or to load the weights from (validate, test)"}
# Each subcommand's own arguments, after the config sections (a name without "--" is positional).
OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "fit": {
        "--ckpt_path": _CKPT_PATH,
        "--resume": {"type": bool, "default": True, "help": "resume from {default_root_dir}/checkpoints/last.ckpt when "
                                                            "it exists and no ckpt_path is given"},
        "--weights_from": {"type": Optional[str], "default": None,
                           "help": "start a new run from the module weights of this checkpoint (either layout); "
                                   "optimizers, schedulers and counters start fresh (for a checkpoint that does not "
                                   "fit as a resume)"},
    },
    "validate": {"--ckpt_path": _CKPT_PATH},
    "test": {"--ckpt_path": _CKPT_PATH},
    "plot": {
        "run_dir": {"type": str, "help": "a run directory (trainer.default_root_dir) holding metrics.csv"},
        "--out_dir": {"type": Optional[str], "default": None, "help": "where to write (default: RUN_DIR/plots)"},
    },
    "lr-schedule": {
        "--steps": {"type": int, "required": True, "help": "global steps to simulate"},
        "--out": {"type": Optional[str], "default": None, "help": "PNG path (default: {trainer.default_root_dir}/"
                                                                  "lr_schedule.png); the table goes beside it as .csv"},
        "--plateau_from": {"type": Optional[str], "default": None,
                           "help": "feed ReduceLROnPlateau: an earlier run's metrics.csv (or run directory), whose "
                                   "monitored column gives the metric at each epoch end, or a number (a metric that "
                                   "never improves)"},
    },
    "status": {
        "--run_dir": {"type": Optional[str], "default": None, "help": "the run directory (default: "
                                                                      "trainer.default_root_dir of the given config, "
                                                                      "as fit resolves it)"},
        "--field": {"type": Optional[str], "default": None, "help": "print only this field (e.g. status, step, checkpoint)"},
        "--newer_than": {"type": Optional[float], "default": None,
                         "help": "unix time: a status last written before it reads as 'none' (it belongs to an earlier "
                                 "job)"},
    },
    "export": {
        "checkpoint": {"type": str, "help": "a checkpoint (file or sharded directory) or a run directory"},
        "out": {"type": str, "help": "a .safetensors file, or a directory that receives model.safetensors"},
    },
}
_WITHOUT_CONFIG = ("plot", "export")  # subcommands that take no config file


def build_parser() -> tuple[ArgumentParser, dict[str, ArgumentParser]]:
    """The root parser and one parser per subcommand (``{"fit": parser, ...}``)."""
    root = _parser(PROG, DESCRIPTION)
    subcommands = root.add_subcommands(required=True, dest="subcommand")
    parsers: dict[str, ArgumentParser] = {}
    for name in COMMANDS:
        parser = parsers[name] = _parser(f"{PROG} {name}", HELPS[name])
        if name not in _WITHOUT_CONFIG:
            _add_config_sections(parser, module_required=name != "status")
        for flag, kwargs in OPTIONS[name].items():
            parser.add_argument(flag, **kwargs)
        subcommands.add_subcommand(name, parser, help=HELPS[name])
    return root, parsers


def _parser(prog: str, description: str) -> ArgumentParser:
    return ArgumentParser(prog=prog, description=description, exit_on_error=False, allow_abbrev=False)


def _add_config_sections(parser: ArgumentParser, module_required: bool) -> None:
    """``--config`` and the sections of a config file: module, data, trainer, optimizer, lr_scheduler."""
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML config file (may be given several times)")
    parser.add_subclass_arguments(TrainingModule, "module", required=module_required, instantiate=False,
                                  help="the TrainingModule: class_path and init_args")
    parser.add_subclass_arguments(DataModule, "data", required=False, instantiate=False,
                                  help="a DataModule: class_path and init_args (optional when the module has dataloaders)")
    parser.add_class_arguments(Trainer, "trainer", skip={"accelerator"}, instantiate=False)
    parser.add_subclass_arguments(torch.optim.Optimizer, "optimizer", skip={"params"}, required=False, instantiate=False,
                                  help="an optimizer built on the module's parameters (replaces configure_optimizers)")
    for name, kwargs in LR_SCHEDULER_ARGUMENTS.items():
        parser.add_argument(f"--lr_scheduler.{name}", **kwargs)


def declared_type(command: str | None, key: str) -> Any:
    """The type ``key`` of ``command``'s parser was declared with here, or None (trainer.*: the Trainer's signature)."""
    if key in CLASS_SECTIONS:
        return Optional[CLASS_SECTIONS[key]]
    if key.startswith("lr_scheduler."):
        return LR_SCHEDULER_ARGUMENTS.get(key.partition(".")[2], {}).get("type")
    options = OPTIONS.get(command or "", {})
    return (options.get(f"--{key}") or options.get(key) or {}).get("type")


def parse(argv: Sequence[str]) -> tuple[str, ArgumentParser, Namespace]:
    """Parse and check ``argv``; returns ``(subcommand, its parser, its config namespace)``.

    Raises:
        CLIError: a bad config or command line, with a message naming the key, the value
            received and what is allowed.
    """
    root, parsers = build_parser()
    argv = list(argv)
    named = next((a for a in argv if a in parsers), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jsonargparse's deprecation notices are not for our users
        try:
            cfg = root.parse_args(argv)
        except ArgumentError as err:
            parser = parsers.get(named or "")
            raise CLIError(explain_parse_error(str(err), named, parser, lambda key: declared_type(named, key))) from None
    command = cfg.subcommand
    if command not in _WITHOUT_CONFIG:
        _check_lr_scheduler(cfg[command])
        _check_untyped_init_args(cfg[command])
    return command, parsers[command], cfg[command]


def qualify(class_path: str, default_module: str) -> str:
    """A bare class name (``StepLR``) is looked up in ``default_module``."""
    return class_path if "." in class_path else f"{default_module}.{class_path}"


def _check_lr_scheduler(cfg: Namespace) -> None:
    """Resolve ``lr_scheduler.class_path`` and type-check its ``init_args`` against its signature."""
    section = cfg.lr_scheduler
    if section.class_path is None:
        given = {k: section[k] for k in SCHEDULER_DICT_DEFAULTS if section[k] != SCHEDULER_DICT_DEFAULTS[k]}
        if section.init_args or given:
            raise CLIError(
                f"lr_scheduler has {sorted(given) + (['init_args'] if section.init_args else [])} but no class_path. "
                "Name the scheduler: lr_scheduler.class_path, e.g. torch.optim.lr_scheduler.StepLR."
            )
        return
    if cfg.optimizer is None:
        raise CLIError(
            f"lr_scheduler.class_path={section.class_path!r} is set but optimizer is not: a scheduler from the config "
            "needs an optimizer from the config. Add optimizer: {class_path: torch.optim.Adam, init_args: {lr: ...}}, "
            "or build the scheduler in the module's configure_optimizers."
        )
    path = qualify(section.class_path, "torch.optim.lr_scheduler")
    cls = locate(path)
    bases = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if not (isinstance(cls, type) and issubclass(cls, bases)):
        reason = "cannot be imported" if cls is None else "not a learning-rate scheduler"
        close = difflib.get_close_matches(path.rpartition(".")[2], classes_in("torch.optim.lr_scheduler", bases[0]), n=1)
        raise CLIError(
            f"lr_scheduler.class_path: received {section.class_path!r} ({reason}); allowed: the import path (or, for "
            "torch's, the name) of a subclass of torch.optim.lr_scheduler.LRScheduler, e.g. StepLR, "
            f"torch.optim.lr_scheduler.CosineAnnealingLR.{' Did you mean ' + close[0] + '?' if close else ''}"
        )
    section.class_path = f"{cls.__module__}.{cls.__qualname__}"
    if section.frequency < 1:
        raise CLIError(f"lr_scheduler.frequency={section.frequency} is not allowed: expected an int >= 1.")
    if section.warmup_steps is not None and section.warmup_steps < 1:
        raise CLIError(f"lr_scheduler.warmup_steps={section.warmup_steps} is not allowed: expected null or an int >= 1.")
    checker = ArgumentParser(exit_on_error=False, allow_abbrev=False)
    checker.add_class_arguments(cls, "lr_scheduler.init_args", skip={"optimizer"}, instantiate=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = checker.parse_object({"lr_scheduler": {"init_args": dict(section.init_args or {})}})
    except ArgumentError as err:
        raise CLIError(explain_init_args_error(str(err), "lr_scheduler.init_args", cls)) from None
    section.init_args = dict(vars(parsed.lr_scheduler.init_args))


def _check_untyped_init_args(cfg: Namespace) -> None:
    """Type-check ``__init__`` arguments that have no type hint against their default's type.

    jsonargparse accepts any value for an unannotated parameter, so ``g_lr=0.01`` took
    ``--module.init_args.g_lr fast`` and failed much later with a raw ``TypeError``. A
    bool/int/float/str default says what was meant: that type is checked here (an int for a
    float default becomes a float; a number for a str default its text). A default of None,
    or any other type, still accepts anything.
    """
    for key in ("module", "data"):
        spec = cfg.get(key)
        if spec is None or spec.get("class_path") is None or spec.get("init_args") is None:
            continue
        cls, init_args = locate(spec.class_path), spec.init_args
        try:
            params = inspect.signature(cls).parameters
        except (TypeError, ValueError):
            continue
        for name, param in params.items():
            default = param.default
            if param.annotation is not inspect.Parameter.empty or type(default) not in (bool, int, float, str):
                continue
            value = init_args.get(name)
            if value is None or value is default:
                continue
            fixed = _coerce_like(value, default)
            if fixed is _MISMATCH:
                raise CLIError(
                    f"{key}.init_args.{name}: received {show(value)}; allowed: {type(default).__name__} (inferred from "
                    f"the default {name}={default!r} of {cls.__name__}, which has no type hint; annotate the parameter "
                    "to allow another type)."
                )
            init_args[name] = fixed


_MISMATCH = object()


def _coerce_like(value: Any, default: Any) -> Any:
    """``value`` as the type of ``default`` (bool, int, float or str), or ``_MISMATCH``."""
    if isinstance(default, bool):
        return value if isinstance(value, bool) else _MISMATCH
    if isinstance(value, bool):
        return _MISMATCH  # True for a number or a name is a mistake, not a value
    if isinstance(default, int):
        return value if isinstance(value, int) else _MISMATCH
    if isinstance(default, float):
        return float(value) if isinstance(value, (int, float)) else _MISMATCH
    if isinstance(value, str):
        return value
    return str(value) if isinstance(value, (int, float)) else _MISMATCH

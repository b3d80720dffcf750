"""``accel-trainer``: train, validate and test from YAML configs (jsonargparse, as LightningCLI).

Subcommands::

    accel-trainer fit      --config configs/digits_gan.yaml [--trainer.max_epochs 3] [--module.init_args.lr=0.01]
    accel-trainer validate --config configs/digits_classifier.yaml [--ckpt_path PATH]
    accel-trainer test     --config configs/digits_classifier.yaml [--ckpt_path PATH]
    accel-trainer plot RUN_DIR                                     # PNG curves of metrics.csv and the LRs
    accel-trainer export CKPT_OR_RUN_DIR OUT                       # consolidated weights (safetensors)
    accel-trainer lr-schedule --config configs/digits_gan.yaml --steps 2000   # the LR schedule, without training
    accel-trainer status --config configs/digits_gan.yaml [--field status]    # the run's run_status.json

``python -m accel_trainer ...`` and ``launch/train.py ...`` (= ``fit``) are the same command.
A config has these top-level keys (any value can be overridden with a dotted key,
``--a.b value`` or ``--a.b=value``)::

    module:        {class_path: pkg.Class, init_args: {...}}   # a TrainingModule (required)
    data:          {class_path: pkg.Class, init_args: {...}}   # a DataModule (optional)
    trainer:       {max_epochs: 10, default_root_dir: runs/x, ...}   # Trainer arguments
    optimizer:     {class_path: torch.optim.Adam, init_args: {lr: 0.001}}        # optional
    lr_scheduler:  {class_path: ..., init_args: {...}, interval: epoch, frequency: 1,
                    monitor: val_loss, strict: true, name: null, warmup_steps: null}  # optional
    ckpt_path:     null     # fit: resume from this checkpoint (default: run_dir/checkpoints/last.ckpt if it exists)
    resume:        true     # fit: false to ignore an existing last.ckpt
    weights_from:  null     # fit: start a new run from this checkpoint's module weights only

What the command does, in order (every process of a launch does the same):

1. Parse and type-check the config against the signatures of the named classes. A bad
   config (unknown key, wrong type, class not found) prints one error naming the key, the
   value received and what is allowed, and exits with status 2 (no traceback).
2. Build the Trainer (which applies ``trainer.seed``), then the DataModule and the module.
3. ``optimizer`` / ``lr_scheduler``: give the module instance a ``configure_optimizers``
   (bound at run time with ``types.MethodType``) that builds them on ``self.parameters()``;
   this replaces the class's own ``configure_optimizers``, if any, with a warning.
4. Hand the resolved config to the Trainer as ``trainer.run_config``: once the run really
   starts (its checkpoint, if any, restored), the Trainer writes it to
   ``{trainer.default_root_dir}/config.yaml`` (main process) and to the trackers. A command
   that fails before that leaves the run directory as it was.
5. ``fit``: resume from ``ckpt_path``, else from ``{default_root_dir}/checkpoints/last.ckpt``
   when it exists, so re-running an interrupted command continues it. ``validate``/``test``
   write their own files (``config_validate.yaml``, ``validate/metrics.csv`` ...), never the
   training run's.

Ctrl-C during ``fit`` checkpoints at the next step and exits 130 (a second Ctrl-C stops at
once); anywhere else it stops at once with one line, exit status 130, no traceback.

Under a W&B sweep (``wandb agent`` sets ``WANDB_SWEEP_ID`` and ``WANDB_RUN_ID``) each run gets
its own directory, ``{default_root_dir}/sweeps/{sweep_id}/{run_id}``, so that the runs of a
sweep never resume from each other's checkpoints.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import sys
import types
import warnings
from collections.abc import Sequence
from typing import Any, Literal, Optional

import torch

from .data import DataModule, loader_length
from .errors import CheckpointError, ConfigurationError
from .module import TrainingModule
from .trainer import Trainer

PROG = "accel-trainer"
RUN_COMMANDS = ("fit", "validate", "test")
COMMANDS = (*RUN_COMMANDS, "plot", "lr-schedule", "status", "export")
CONFIG_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130
SCHEDULER_DICT_DEFAULTS = {
    "interval": "epoch",
    "frequency": 1,
    "monitor": None,
    "strict": True,
    "name": None,
    "warmup_steps": None,
}


class CLIError(Exception):
    """A user error found by the CLI: printed without a traceback, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``accel-trainer`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Example:
        >>> main(["fit", "--config", "configs/digits_classifier.yaml", "--trainer.max_epochs", "1"])  # doctest: +SKIP
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # Like ``python -m``, let class paths name modules of the directory the command runs in.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    command = argv[0] if argv and argv[0] in COMMANDS else ""
    try:
        command, parser, cfg = parse(argv)
        if command in RUN_COMMANDS:
            run(command, parser, cfg)
        elif command == "plot":
            _plot(cfg)
        elif command == "export":
            _export(cfg)
        elif command == "status":
            _status(cfg)
        else:
            _lr_schedule(parser, cfg)
    except (CLIError, ConfigurationError, CheckpointError) as err:
        print(f"{PROG} {command}: error: {err}".replace("  error", " error"), file=sys.stderr, flush=True)
        return CONFIG_ERROR_EXIT
    except KeyboardInterrupt:
        # Ctrl-C outside fit's graceful window, or a second Ctrl-C inside it: one line, not a traceback.
        print(
            f"\n{PROG} {command}: interrupted (Ctrl-C); stopped at once.".replace("  interrupted", " interrupted"),
            file=sys.stderr,
            flush=True,
        )
        return INTERRUPTED_EXIT
    return 0


# ---------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------


def build_parser() -> tuple[Any, dict[str, Any]]:
    """The root parser and one parser per subcommand (``{"fit": parser, ...}``)."""
    from jsonargparse import ArgumentParser

    root = ArgumentParser(prog=PROG, description=_first_paragraph(__doc__), exit_on_error=False, allow_abbrev=False)
    subcommands = root.add_subcommands(required=True, dest="subcommand")
    parsers: dict[str, Any] = {}
    helps = {
        "fit": "Train a module (resumes from checkpoints/last.ckpt when it exists).",
        "validate": "Run one validation pass (weights from --ckpt_path, else the run's last.ckpt).",
        "test": "Run one test pass (weights from --ckpt_path, else the run's last.ckpt).",
        "plot": "Write PNG curves of a run's logged metrics and learning rates.",
        "lr-schedule": "Plot the learning rate each optimizer would follow, without training.",
        "export": "Write a checkpoint's module weights as one consolidated safetensors file (sharded FSDP checkpoints too).",
        "status": "Print a run's run_status.json (running, finished, preempted or failed).",
    }
    for name in RUN_COMMANDS:
        parsers[name] = _run_parser(name, helps[name])
    parsers["plot"] = _plot_parser(helps["plot"])
    parsers["lr-schedule"] = _run_parser("lr-schedule", helps["lr-schedule"])
    parsers["lr-schedule"].add_argument("--steps", type=int, required=True, help="global steps to simulate")
    parsers["lr-schedule"].add_argument(
        "--out", type=Optional[str], default=None,
        help="PNG path (default: {trainer.default_root_dir}/lr_schedule.png); the table goes beside it as .csv",
    )
    parsers["lr-schedule"].add_argument(
        "--plateau_from", type=Optional[str], default=None,
        help="feed ReduceLROnPlateau: an earlier run's metrics.csv (or run directory), whose monitored column gives "
        "the metric at each epoch end, or a number (a metric that never improves)",
    )
    parsers["status"] = _run_parser("status", helps["status"], module_required=False)
    parsers["status"].add_argument(
        "--run_dir", type=Optional[str], default=None,
        help="the run directory (default: trainer.default_root_dir of the given config, as fit resolves it)",
    )
    parsers["status"].add_argument(
        "--field", type=Optional[str], default=None, help="print only this field (e.g. status, step, checkpoint)"
    )
    parsers["status"].add_argument(
        "--newer_than", type=Optional[float], default=None,
        help="unix time: a status last written before it reads as 'none' (it belongs to an earlier job)",
    )
    parsers["export"] = _export_parser(helps["export"])
    for name, parser in parsers.items():
        subcommands.add_subcommand(name, parser, help=helps[name])
    return root, parsers


def _run_parser(name: str, description: str, module_required: bool = True) -> Any:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=f"{PROG} {name}", description=description, exit_on_error=False, allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML config file (may be given several times)")
    parser.add_subclass_arguments(TrainingModule, "module", required=module_required, instantiate=False,
                                  help="the TrainingModule: class_path and init_args")
    parser.add_subclass_arguments(DataModule, "data", required=False, instantiate=False,
                                  help="a DataModule: class_path and init_args (optional when the module has dataloaders)")
    parser.add_class_arguments(Trainer, "trainer", skip={"accelerator"}, instantiate=False)
    parser.add_subclass_arguments(torch.optim.Optimizer, "optimizer", skip={"params"}, required=False, instantiate=False,
                                  help="an optimizer built on the module's parameters (replaces configure_optimizers)")
    parser.add_argument("--lr_scheduler.class_path", type=Optional[str], default=None,
                        help="a torch.optim.lr_scheduler class (a short name such as StepLR is enough)")
    parser.add_argument("--lr_scheduler.init_args", type=Optional[dict], default=None,
                        help="its arguments, except the optimizer")
    parser.add_argument("--lr_scheduler.interval", type=Literal["epoch", "step"], default="epoch")
    parser.add_argument("--lr_scheduler.frequency", type=int, default=1)
    parser.add_argument("--lr_scheduler.monitor", type=Optional[str], default=None,
                        help="the metric a ReduceLROnPlateau steps on (default val_loss)")
    parser.add_argument("--lr_scheduler.strict", type=bool, default=True)
    parser.add_argument("--lr_scheduler.name", type=Optional[str], default=None)
    parser.add_argument("--lr_scheduler.warmup_steps", type=Optional[int], default=None,
                        help="linear warm-up over this many optimizer steps")
    if name in ("fit", "validate", "test"):
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="checkpoint to resume from (fit) or to load the weights from (validate, test)")
    if name == "fit":
        parser.add_argument("--resume", type=bool, default=True,
                            help="resume from {default_root_dir}/checkpoints/last.ckpt when it exists and no ckpt_path is given")
        parser.add_argument("--weights_from", type=Optional[str], default=None,
                            help="start a new run from the module weights of this checkpoint (either layout); optimizers, "
                                 "schedulers and counters start fresh (for a checkpoint that does not fit as a resume)")
    return parser


def _plot_parser(description: str) -> Any:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=f"{PROG} plot", description=description, exit_on_error=False, allow_abbrev=False)
    parser.add_argument("run_dir", type=str, help="a run directory (trainer.default_root_dir) holding metrics.csv")
    parser.add_argument("--out_dir", type=Optional[str], default=None, help="where to write (default: RUN_DIR/plots)")
    return parser


def _export_parser(description: str) -> Any:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=f"{PROG} export", description=description, exit_on_error=False, allow_abbrev=False)
    parser.add_argument("checkpoint", type=str, help="a checkpoint (file or sharded directory) or a run directory")
    parser.add_argument("out", type=str, help="a .safetensors file, or a directory that receives model.safetensors")
    return parser


def parse(argv: Sequence[str]) -> tuple[str, Any, Any]:
    """Parse and check ``argv``; returns ``(subcommand, its parser, its config namespace)``.

    Raises:
        CLIError: a bad config or command line, with a message naming the key, the value
            received and what is allowed.
    """
    from jsonargparse import ArgumentError

    root, parsers = build_parser()
    argv = list(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jsonargparse's deprecation notices are not for our users
        try:
            cfg = root.parse_args(argv)
        except ArgumentError as err:
            raise CLIError(explain_parse_error(str(err), parsers, argv)) from None
    command = cfg.subcommand
    if command not in ("plot", "export"):
        _check_lr_scheduler(cfg[command])
        _check_untyped_init_args(cfg[command])
    return command, parsers[command], cfg[command]


# ---------------------------------------------------------------------------------------------
# Running a config
# ---------------------------------------------------------------------------------------------


def run(command: str, parser: Any, cfg: Any) -> Any:
    """Build everything ``cfg`` names and run ``command``; returns the trainer.

    Args:
        command: "fit", "validate" or "test".
        parser: the subcommand's parser (to dump the resolved config).
        cfg: the parsed namespace of the subcommand.
    """
    from .run_status import last_checkpoint

    _apply_sweep_run_dir(cfg)
    resolved_text = _dump(parser, cfg)
    trainer, datamodule, module = build(cfg)
    # Written by the Trainer once the run really starts (config.yaml), never by a command that fails first.
    trainer.run_config = _yaml_load(resolved_text)
    root = trainer.default_root_dir
    if command == "fit":
        ckpt_path = cfg.ckpt_path
        last = last_checkpoint(root)
        weights_from = cfg.weights_from
        if weights_from is not None:
            if ckpt_path is not None:
                raise CLIError(
                    f"--weights_from {weights_from} and --ckpt_path {ckpt_path}: pick one (weights_from starts a new run "
                    "from a checkpoint's weights; ckpt_path resumes a run from it)."
                )
            _load_weights(trainer, module, weights_from, what="a new run from the weights of")
        elif ckpt_path is None and cfg.resume and last is not None:
            ckpt_path = "last"
            _say(trainer, f"Resuming from {last} (pass --resume false, or a new --trainer.default_root_dir, to start over).")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics = ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(trainer.callback_metrics.items()) if _is_scalar(v))
        from .engines import engine_for

        engine = f" with {engine_for(trainer.accelerator).describe()}" if trainer.world_size > 1 else ""
        _say(trainer, f"fit done on {trainer.world_size} process(es){engine}: epoch {trainer.current_epoch}, global_step {trainer.global_step}; {metrics}; run dir {root}")
    else:
        _load_weights(trainer, module, cfg.ckpt_path)
        if trainer.is_global_zero:
            _atomic_write(os.path.join(root, f"config_{command}.yaml"), resolved_text)
        results = getattr(trainer, command)(module, datamodule=datamodule)
        if trainer.is_global_zero:
            for key, value in sorted({k: v for per_dataloader in results for k, v in per_dataloader.items()}.items()):
                print(f"{key}: {float(value):.6g}", flush=True)
    return trainer


def build(cfg: Any) -> tuple[Trainer, DataModule | None, TrainingModule]:
    """The Trainer, DataModule (or None) and module a parsed config names, in that order.

    The Trainer comes first because it applies ``trainer.seed``: the module's initial
    weights then follow the seed.
    """
    trainer_kwargs = _instantiate_kwargs(cfg.trainer, "trainer")
    trainer = _construct(Trainer, trainer_kwargs, "trainer")
    datamodule = _instantiate_spec(cfg.data, "data") if cfg.data is not None else None
    module = _instantiate_spec(cfg.module, "module")
    if cfg.optimizer is not None:
        attach_optimizers(module, cfg.optimizer, _scheduler_spec(cfg.lr_scheduler))
    return trainer, datamodule, module


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
    """
    opt_cls = _import_class(_qualify(_get(optimizer, "class_path"), "torch.optim"), "optimizer.class_path")
    opt_args = _as_dict(_get(optimizer, "init_args"))
    sched_cls = sched_args = sched_keys = None
    if lr_scheduler is not None:
        sched_path = _qualify(lr_scheduler["class_path"], "torch.optim.lr_scheduler")
        sched_cls = _import_class(sched_path, "lr_scheduler.class_path")
        sched_args = _as_dict(lr_scheduler.get("init_args"))
        sched_keys = {k: v for k, v in lr_scheduler.items() if k not in ("class_path", "init_args") and v is not None}
    if type(module).configure_optimizers is not TrainingModule.configure_optimizers:
        warnings.warn(
            f"{type(module).__name__}.configure_optimizers is replaced by the config's optimizer "
            f"({opt_cls.__name__}){' and lr_scheduler (' + sched_cls.__name__ + ')' if sched_cls else ''}.",
            UserWarning,
            stacklevel=2,
        )

    def configure_optimizers(self: TrainingModule) -> Any:
        opt = opt_cls(self.parameters(), **opt_args)
        if sched_cls is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched_cls(opt, **sched_args), **sched_keys}}

    module.configure_optimizers = types.MethodType(configure_optimizers, module)


def _load_weights(trainer: Trainer, module: TrainingModule, ckpt_path: str | None, what: str = "weights from") -> None:
    """validate/test: weights from ``ckpt_path``, else the run's ``last.ckpt``, else as built."""
    from .checkpoint import load_weights
    from .run_status import last_checkpoint

    path = ckpt_path
    if path is None or path == "last":
        last = os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")
        if last_checkpoint(trainer.default_root_dir) is not None:
            path = last
        elif path == "last":
            raise CLIError(f"ckpt_path='last' but {last} does not exist (train first with `{PROG} fit`).")
        else:
            _say(trainer, f"No checkpoint at {last}: evaluating the freshly initialised module (pass --ckpt_path).")
            return
    state = load_weights(path)
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise CLIError(f"ckpt_path={path!r} does not fit {type(module).__name__}: {err}") from None
    _say(trainer, f"Loaded weights from {path}." if what == "weights from" else f"Starting {what} {path} (optimizers, schedulers and counters start fresh).")


def _apply_sweep_run_dir(cfg: Any) -> None:
    sweep, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if sweep and run_id:
        cfg.trainer.default_root_dir = os.path.join(os.fspath(cfg.trainer.default_root_dir), "sweeps", sweep, run_id)


# ---------------------------------------------------------------------------------------------
# plot and lr-schedule
# ---------------------------------------------------------------------------------------------


def _export(cfg: Any) -> None:
    from .export import export

    path, summary = export(cfg.checkpoint, cfg.out)
    print(
        f"{PROG} export: wrote {path}: {summary['tensors']} tensors, {summary['parameters']:,} parameters, "
        f"{summary['bytes'] / 2**20:.1f} MiB (a checkpoint written by {summary['engine']} at global_step "
        f"{summary['global_step']}, epoch {summary['epoch']})"
    )


def _plot(cfg: Any) -> None:
    from .plotting import plot_run

    try:
        paths = plot_run(cfg.run_dir, cfg.out_dir)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from None
    for path in paths:
        print(path)


def _status(cfg: Any) -> None:
    import json

    from .run_status import read_run_status

    if cfg.run_dir is not None:
        run_dir = cfg.run_dir
    elif cfg.module is not None:
        _apply_sweep_run_dir(cfg)
        run_dir = os.fspath(cfg.trainer.default_root_dir)
    else:
        raise CLIError(
            "status needs the run: --run_dir DIR, or the same --config (and overrides) as the fit command, whose "
            "trainer.default_root_dir is the run directory."
        )
    record = read_run_status(run_dir)
    if record is None or (cfg.newer_than is not None and float(record.get("updated_unix", 0)) < cfg.newer_than):
        record = {"status": "none"}
    record["run_dir"] = os.path.abspath(run_dir)
    if cfg.field is None:
        print(json.dumps(record, sort_keys=False))
    else:
        value = record.get(cfg.field)
        print("" if value is None else value)


def _lr_schedule(parser: Any, cfg: Any) -> None:
    from .lr_schedule import plateau_metric_from, plot_lr_schedule, simulate_lr_schedule, write_lr_schedule_csv

    if cfg.steps < 1:
        raise CLIError(f"--steps={cfg.steps} is not allowed: expected an int >= 1.")
    if cfg.trainer.seed is not None:
        torch.manual_seed(cfg.trainer.seed)
    module = _instantiate_spec(cfg.module, "module")
    if cfg.optimizer is not None:
        attach_optimizers(module, cfg.optimizer, _scheduler_spec(cfg.lr_scheduler))
    batches = None
    if cfg.data is not None:
        datamodule = _instantiate_spec(cfg.data, "data")
        datamodule.setup("fit")
        batches = loader_length(datamodule.train_dataloader())
    elif callable(getattr(module, "train_dataloader", None)):
        batches = loader_length(module.train_dataloader())
    limit = cfg.trainer.limit_train_batches
    if batches is not None and limit is not None:
        batches = min(batches, limit) if isinstance(limit, int) else max(1, int(batches * limit))
    plateau = plateau_metric_from(cfg.plateau_from) if cfg.plateau_from is not None else None
    schedule = simulate_lr_schedule(
        module, cfg.steps, batches_per_epoch=batches,
        gradient_accumulation_steps=cfg.trainer.gradient_accumulation_steps,
        plateau_metric=plateau,
    )
    for skipped in schedule.skipped:
        hint = "" if plateau is not None else (
            " Feed it with --plateau_from RUN_DIR/metrics.csv (the monitored column of an earlier run) or "
            "--plateau_from VALUE (a constant: a metric that stopped improving)."
        )
        print(f"{PROG} lr-schedule: note: not simulated: {skipped}.{hint}", file=sys.stderr, flush=True)
    for note in schedule.notes:
        print(f"{PROG} lr-schedule: note: {note}.", file=sys.stderr, flush=True)
    out = cfg.out or os.path.join(os.fspath(cfg.trainer.default_root_dir), "lr_schedule.png")
    title = f"{type(module).__name__}: simulated learning rates ({cfg.steps} steps, {batches or 'endless'} batches/epoch)"
    print(plot_lr_schedule(schedule, out, title=title))
    print(write_lr_schedule_csv(schedule, os.path.splitext(out)[0] + ".csv"))


# ---------------------------------------------------------------------------------------------
# Instantiation
# ---------------------------------------------------------------------------------------------


def _instantiate_spec(spec: Any, key: str) -> Any:
    cls = _import_class(_get(spec, "class_path"), f"{key}.class_path")
    kwargs = _instantiate_kwargs(_get(spec, "init_args"), f"{key}.init_args")
    return _construct(cls, kwargs, key)


def _instantiate_kwargs(init_args: Any, key: str) -> dict[str, Any]:
    """Init args with nested ``class_path`` specs (e.g. trainer.callbacks) instantiated."""
    out = {}
    for name, value in _as_dict(init_args).items():
        out[name] = _instantiate_value(value, f"{key}.{name}")
    return out


def _instantiate_value(value: Any, key: str) -> Any:
    if isinstance(value, list):
        return [_instantiate_value(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if _is_spec(value):
        return _instantiate_spec(value, key)
    return value


def _construct(cls: type, kwargs: dict[str, Any], key: str) -> Any:
    try:
        return cls(**kwargs)
    except (ConfigurationError, ValueError) as err:
        # the class's own validation of its arguments: a config error like any other
        raise CLIError(f"{key}: {err}") from None


def _is_spec(value: Any) -> bool:
    """A ``{class_path: ..., init_args: ...}`` mapping or namespace."""
    return (isinstance(value, dict) or hasattr(value, "class_path")) and _get(value, "class_path") is not None


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if hasattr(obj, "get"):
        return obj.get(key)
    return getattr(obj, key, None)


def _as_dict(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if hasattr(obj, "as_dict") and not isinstance(obj, dict):
        return {k: getattr(obj, k) for k in vars(obj)}
    return dict(obj)


def _import_class(class_path: str, key: str) -> type:
    try:
        return _import_object(class_path)
    except Exception as err:  # ImportError, AttributeError, ValueError: all "no such class"
        raise CLIError(f"{key}: cannot import {class_path!r} ({err}).") from None


def _qualify(class_path: str, default_module: str) -> str:
    """A bare class name (``StepLR``) is looked up in ``default_module``."""
    return class_path if "." in class_path else f"{default_module}.{class_path}"


def _import_object(path: str) -> Any:
    """``package.module.Name`` (or ``package.module.Outer.Inner``) -> the object."""
    import importlib

    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError as err:
            if split == 1 or not (err.name and ".".join(parts[:split]).startswith(err.name)):
                raise
            continue
        for name in parts[split:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"{path!r} is not a dotted import path (package.module.Name)")


# ---------------------------------------------------------------------------------------------
# lr_scheduler: a scheduler class plus the scheduler-dict keys
# ---------------------------------------------------------------------------------------------


def _check_lr_scheduler(cfg: Any) -> None:
    """Resolve ``lr_scheduler.class_path`` and type-check its ``init_args`` against its signature."""
    from jsonargparse import ArgumentError, ArgumentParser

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
    path = _qualify(section.class_path, "torch.optim.lr_scheduler")
    cls = _try_import(path)
    bases = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if not (isinstance(cls, type) and issubclass(cls, bases)):
        reason = "cannot be imported" if cls is None else "not a learning-rate scheduler"
        close = difflib.get_close_matches(path.rpartition(".")[2], _classes_in("torch.optim.lr_scheduler", bases[0]), n=1)
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
        raise CLIError(_explain_group_error(str(err), "lr_scheduler.init_args", cls)) from None
    section.init_args = {k: v for k, v in vars(parsed.lr_scheduler.init_args).items()}


def _check_untyped_init_args(cfg: Any) -> None:
    """Type-check ``__init__`` arguments that have no type hint against their default's type.

    jsonargparse accepts any value for an unannotated parameter, so ``g_lr=0.01`` took
    ``--module.init_args.g_lr fast`` and failed much later with a raw ``TypeError``. A
    bool/int/float/str default says what was meant: that type is checked here (an int for a
    float default becomes a float; a number for a str default its text). A default of None,
    or any other type, still accepts anything.
    """
    for key in ("module", "data"):
        spec = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
        if spec is None or _get(spec, "class_path") is None:
            continue
        cls = _try_import(_get(spec, "class_path"))
        init_args = _get(spec, "init_args")
        if cls is None or init_args is None:
            continue
        try:
            params = inspect.signature(cls).parameters
        except (TypeError, ValueError):
            continue
        for name, param in params.items():
            default = param.default
            if param.annotation is not inspect.Parameter.empty or type(default) not in (bool, int, float, str):
                continue
            value = _get(init_args, name)
            if value is None or value is default:
                continue
            fixed = _coerce_like(value, default)
            if fixed is _MISMATCH:
                raise CLIError(
                    f"{key}.init_args.{name}: received {_show(value)}; allowed: {type(default).__name__} (inferred from "
                    f"the default {name}={default!r} of {cls.__name__}, which has no type hint; annotate the parameter "
                    "to allow another type)."
                )
            if fixed is not value:
                if isinstance(init_args, dict):
                    init_args[name] = fixed
                else:
                    setattr(init_args, name, fixed)


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


def _scheduler_spec(section: Any) -> dict | None:
    if section is None or section.class_path is None:
        return None
    return {k: section[k] for k in ("class_path", "init_args", *SCHEDULER_DICT_DEFAULTS)}


# ---------------------------------------------------------------------------------------------
# Errors a user can read
# ---------------------------------------------------------------------------------------------


# The classes a class_path of each key must subclass (for "allowed" in messages).
_BASES = {
    "module": "accel_trainer.TrainingModule",
    "data": "accel_trainer.DataModule",
    "optimizer": "torch.optim.Optimizer",
    "trainer.callbacks": "accel_trainer.Callback",
}


def explain_parse_error(message: str, parsers: dict[str, Any], argv: list[str]) -> str:
    """Turn a jsonargparse error into one line: the key, the value received, what is allowed.

    Falls back to jsonargparse's own message when it has an unfamiliar shape.
    """
    command = next((a for a in argv if a in parsers), None)
    parser = parsers.get(command)
    try:
        summary = _summarise(message, parser) if parser is not None else None
    except Exception:  # a message shape we do not know: jsonargparse's own words are still right
        summary = None
    if summary is None:
        return message.strip()
    return f"{summary}\n(`{PROG} {command} --help` lists every key; `--module.help CLASS` the arguments of a class.)"


def _summarise(message: str, parser: Any) -> str | None:
    unknown = re.search(r"does not accept option '([^']+)'", message) or re.search(
        r"nrecognized arguments: (\S+)(?: (\S+))?", message
    )
    if unknown:
        key = unknown.group(1).lstrip("-")
        value = unknown.group(2) if unknown.lastindex and unknown.lastindex >= 2 else None
        if "=" in key:
            key, value = key.split("=", 1)
        top = key.split(".")[0]
        sections = [k for k in _parser_keys(parser, "") if k != "config"]
        if "." in key and top not in sections:
            # an unknown top-level section (trainr:): name it, not the keys under it
            return _unknown_key(top, None, sections, "") + f" (It holds {key}.)"
        return _unknown_key(key, value, _parser_keys(parser, key.rpartition(".")[0]), key.rpartition(".")[0])
    head = re.match(r'\s*Parser key "([^"]+)":\s*(.*)', message, re.S)
    if not head:
        return None
    key, body = head.group(1), head.group(2)
    given = _given_value(body)
    if key == "config":
        return f"--config: {body.strip()}"
    problem = re.search(r"Problem with given class_path '([^']+)':\s*(.*?)\n\s*- Expected a <class 'NoneType'>", body, re.S)
    if problem:
        class_path, inner = problem.group(1), problem.group(2).strip()
        cls = _try_import(class_path)
        bad_option = re.search(r"(?:Option|Key) '([^']+)' is not (?:accepted|expected)", inner)
        nested = re.search(r'Parser key "([^"]+)":\s*(.*)', inner, re.S)
        if cls is not None and bad_option:
            name = bad_option.group(1)
            value = _init_arg_value(given, name)
            allowed = _signature_names(cls, skip=_skipped(key))
            return _unknown_key(f"{key}.init_args.{name}", value, allowed, f"{key}.init_args ({cls.__name__})")
        if cls is not None and nested:
            name = nested.group(1)
            got = re.search(r"Got value: (.*)", nested.group(2))
            value = got.group(1).strip() if got else _init_arg_value(given, name)
            return (
                f"{key}.init_args.{name}: received {_show(value)}; allowed: {_param_type(cls, name)} "
                f"(the type of {name} in {cls.__name__})."
            )
        return _bad_class(key, class_path, inner.splitlines()[0].strip() if inner else "")
    if re.search(r"Expected a path but|dot import path|does not correspond to a subclass|Not a valid subclass|"
                 r"not a valid class_path|No module named|has no attribute", body):
        class_path = given.get("class_path") if isinstance(given, dict) else given
        reason = re.search(r"(does not correspond to a subclass of \w+|No module named [^\n]+|has no attribute [^\n]+)", body)
        return _bad_class(key, class_path, reason.group(1) if reason else "")
    got = re.search(r"Got value: (.*)", body)
    value = got.group(1).strip() if got and given is None else given
    return f"{key}: received {_show(value)}; allowed: {_action_type(parser, key)}."


def _unknown_key(key: str, value: Any, allowed: list[str], where: str) -> str:
    leaf = key.rpartition(".")[2]
    received = f" (received {key}={_show(value)})" if value is not None else ""
    close = difflib.get_close_matches(leaf, allowed, n=1)
    hint = f" Did you mean {key.rpartition('.')[0] + '.' if '.' in key else ''}{close[0]}?" if close else ""
    scope = f"under {where}" if where else "at the top level"
    return f"{key}: unknown key{received}. Allowed {scope}: {', '.join(allowed) or '(none)'}.{hint}"


def _bad_class(key: str, class_path: Any, reason: str) -> str:
    base = _BASES.get(key, "the expected base class")
    broken = _import_failure(class_path) if isinstance(class_path, str) else None
    if broken:
        return f"{key}.class_path: received {_show(class_path)}, but {broken}. Fix that module, then run again."
    suggestion = ""
    if isinstance(class_path, str) and "." in class_path:
        candidates = _classes_in(class_path.rpartition(".")[0], _try_import(base) if base in _BASES.values() else None)
        close = difflib.get_close_matches(class_path.rpartition(".")[2], candidates, n=1)
        if close:
            suggestion = f" Did you mean {class_path.rpartition('.')[0]}.{close[0]}?"
    reason = f" ({reason.rstrip('.')})" if reason else ""
    return (
        f"{key}.class_path: received {_show(class_path)}{reason}; allowed: the import path of a subclass of "
        f"{base}, e.g. {_EXAMPLES.get(key, 'package.module.ClassName')}.{suggestion}"
    )


_EXAMPLES = {
    "module": "accel_trainer.examples.digits.DigitsClassifier",
    "data": "accel_trainer.examples.digits.DigitsDataModule",
    "optimizer": "torch.optim.Adam",
    "trainer.callbacks": "accel_trainer.callbacks.EarlyStopping",
}


def _skipped(key: str) -> set[str]:
    return {"params"} if key == "optimizer" else set()


def _given_value(body: str) -> Any:
    import ast

    found = re.findall(r"Given value: (.*)", body)
    if not found:
        return None
    text = found[-1].strip()
    nested = re.match(r"NestedArg\(key='[^']*', val=(.*)\)$", text)
    if nested:
        text = nested.group(1)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _init_arg_value(given: Any, name: str) -> Any:
    if isinstance(given, dict):
        return (given.get("init_args") or {}).get(name, given.get(name))
    return given


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _parser_keys(parser: Any, prefix: str) -> list[str]:
    """The keys a parser accepts directly under ``prefix`` ("" for the top level)."""
    keys: list[str] = []
    for action in parser._actions:
        dest = getattr(action, "dest", "")
        if not dest or dest in ("help", "print_config") or dest.endswith(".help"):
            continue
        if prefix:
            if not dest.startswith(prefix + "."):
                continue
            dest = dest[len(prefix) + 1 :]
        name = dest.split(".")[0]
        if name not in keys:
            keys.append(name)
    return keys


def _action_type(parser: Any, key: str) -> str:
    for action in parser._actions:
        if getattr(action, "dest", None) == key:
            hint = getattr(action, "_typehint", None)
            if hint is not None:
                return _describe_type(hint)
            if action.choices:
                return "one of " + ", ".join(map(repr, action.choices))
    return "see --help"


def _param_type(cls: type, name: str) -> str:
    import typing

    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:
        hints = {}
    if name in hints:
        return _describe_type(hints[name])
    try:
        annotation = inspect.signature(cls).parameters[name].annotation
    except (KeyError, TypeError, ValueError):
        return "see --help"
    return "any value" if annotation is inspect.Parameter.empty else _describe_type(annotation)


def _describe_type(hint: Any) -> str:
    """``int | None``, ``one of 'epoch', 'step'``, ``float``: a type as a user reads it."""
    import typing

    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        return " | ".join(_describe_type(a) for a in args)
    if hint is type(None):
        return "None"
    if hint is Any:
        return "any value"
    if origin is not None:
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", str(hint))


def _import_failure(class_path: str) -> str | None:
    """Why importing ``class_path``'s module fails inside the user's own code, or None.

    None means the module or class simply does not exist (the usual "allowed: ..." message
    fits). Anything else -- a SyntaxError, an import the module itself makes that fails, an
    exception raised at import time -- is the real cause, and is named with its file and line.
    """
    import importlib
    import traceback

    parts = class_path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:split])
        try:
            importlib.import_module(name)
            return None
        except ModuleNotFoundError as err:
            if err.name and name.startswith(err.name):
                continue  # this prefix is not a module: try a shorter one (Outer.Inner classes)
            return f"importing {name} failed: ModuleNotFoundError: {err}"
        except SyntaxError as err:
            where = f"{err.filename}, line {err.lineno}" if err.filename else f"line {err.lineno}"
            text = f": {err.text.strip()}" if err.text and err.text.strip() else ""
            return f"importing {name} failed: {type(err).__name__}: {err.msg} ({where}){text}"
        except Exception as err:
            frames = traceback.extract_tb(err.__traceback__)
            user = [f for f in frames if "importlib" not in f.filename]
            where = f" ({user[-1].filename}, line {user[-1].lineno})" if user else ""
            return f"importing {name} failed: {type(err).__name__}: {err}{where}"
    return None


def _try_import(class_path: str) -> Any:
    try:
        return _import_object(class_path)
    except Exception:
        return None


def _classes_in(module_path: str, base: Any) -> list[str]:
    import importlib

    try:
        module = importlib.import_module(module_path)
    except Exception:
        return []
    return [
        name for name, obj in vars(module).items()
        if isinstance(obj, type) and (base is None or (isinstance(base, type) and issubclass(obj, base)))
    ]


def _explain_group_error(message: str, key: str, cls: type) -> str:
    """A jsonargparse error from checking ``init_args`` of ``cls`` (the lr_scheduler) as one line."""
    bad_option = re.search(
        r"(?:Option|Key) '([^']+)' is not (?:accepted|expected)|does not accept (?:option|nested key) '([^']+)'", message
    )
    if bad_option:
        name = (bad_option.group(1) or bad_option.group(2)).rpartition(".")[2]
        return _unknown_key(f"{key}.{name}", None, _signature_names(cls, skip={"optimizer"}), f"{key} ({cls.__name__})")
    nested = re.search(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
    if nested:
        name = nested.group(1).rpartition(".")[2]
        got = re.search(r"Got value: (.*)", nested.group(2)) or re.search(r"Given value: (.*)", nested.group(2))
        value = got.group(1).strip() if got else "?"
        return f"{key}.{name}: received {value!r}; allowed: {_param_type(cls, name)} (the type of {name} in {cls.__name__})."
    return f"{key}: {message.strip()}"


def _signature_names(cls: type, skip: set[str] = frozenset()) -> list[str]:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return []
    return [n for n, p in params.items() if n not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _dump(parser: Any, cfg: Any) -> str:
    cfg = cfg.clone()
    for key in ("config", "__path__"):
        if key in cfg:
            del cfg[key]
    return parser.dump(cfg, skip_none=False, skip_validation=True)


def _yaml_load(text: str) -> dict:
    import yaml

    return yaml.safe_load(text) or {}


def _atomic_write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _say(trainer: Trainer, message: str) -> None:
    if trainer.is_global_zero:
        print(f"[{PROG}] {message}", file=sys.stderr, flush=True)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)


def _first_paragraph(doc: str | None) -> str:
    return (doc or "").strip().split("\n\n")[0]

"""What each subcommand does once its config is parsed: fit/validate/test, plot, export, status, lr-schedule.

Every process of a launch runs the same command; what only the main process may do
(printing, writing ``config_validate.yaml``) is guarded by ``trainer.is_global_zero``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentParser, Namespace

from ..data import loader_length
from ..module import TrainingModule
from ..trainer import Trainer
from .build import build, build_datamodule, build_module
from .messages import PROG, CLIError


def run_command(command: str, parser: ArgumentParser, cfg: Namespace) -> None:
    """Run the parsed subcommand ``command``."""
    if command == "plot":
        _plot(cfg)
    elif command == "export":
        _export(cfg)
    elif command == "status":
        _status(cfg)
    elif command == "lr-schedule":
        _lr_schedule(cfg)
    else:
        run(command, parser, cfg)


def run(command: str, parser: ArgumentParser, cfg: Namespace) -> Trainer:
    """Build everything ``cfg`` names and run ``command``; returns the trainer.

    Args:
        command: "fit", "validate" or "test".
        parser: the subcommand's parser (to dump the resolved config).
        cfg: the parsed namespace of the subcommand.
    """
    _apply_sweep_run_dir(cfg)
    resolved_text = _dump(parser, cfg)
    trainer, datamodule, module = build(cfg)
    # Written by the Trainer once the run really starts (config.yaml), never by a command that fails first.
    trainer.run_config = yaml.safe_load(resolved_text) or {}
    if command == "fit":
        _fit(trainer, datamodule, module, cfg)
        return trainer
    _load_weights(trainer, module, cfg.ckpt_path)
    if trainer.is_global_zero:
        _atomic_write(os.path.join(trainer.default_root_dir, f"config_{command}.yaml"), resolved_text)
    results = getattr(trainer, command)(module, datamodule=datamodule)
    if trainer.is_global_zero:
        for key, value in sorted({k: v for per_dataloader in results for k, v in per_dataloader.items()}.items()):
            print(f"{key}: {float(value):.6g}", flush=True)
    return trainer


def _fit(trainer: Trainer, datamodule: Any, module: TrainingModule, cfg: Namespace) -> None:
    """``fit``: from ``--weights_from``, or resuming from ``--ckpt_path`` or the run's ``last.ckpt``."""
    from ..engines import engine_for
    from ..run_status import last_checkpoint

    root = trainer.default_root_dir
    ckpt_path, weights_from = cfg.ckpt_path, cfg.weights_from
    last = last_checkpoint(root)
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
    engine = f" with {engine_for(trainer.accelerator).describe()}" if trainer.world_size > 1 else ""
    _say(trainer, f"fit done on {trainer.world_size} process(es){engine}: epoch {trainer.current_epoch}, "
                  f"global_step {trainer.global_step}; {metrics}; run dir {root}")


def _load_weights(trainer: Trainer, module: TrainingModule, ckpt_path: str | None, what: str = "weights from") -> None:
    """validate/test: weights from ``ckpt_path``, else the run's ``last.ckpt``, else as built."""
    from ..checkpoint import load_weights
    from ..run_status import last_checkpoint

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
    _say(trainer, f"Loaded weights from {path}." if what == "weights from"
         else f"Starting {what} {path} (optimizers, schedulers and counters start fresh).")


def _apply_sweep_run_dir(cfg: Namespace) -> None:
    """Under a W&B sweep (``wandb agent``), each run gets ``{default_root_dir}/sweeps/{sweep_id}/{run_id}``.

    So that the runs of a sweep never resume from each other's checkpoints.
    """
    sweep, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if sweep and run_id:
        cfg.trainer.default_root_dir = os.path.join(os.fspath(cfg.trainer.default_root_dir), "sweeps", sweep, run_id)


def _export(cfg: Namespace) -> None:
    from ..export import export

    path, summary = export(cfg.checkpoint, cfg.out)
    print(
        f"{PROG} export: wrote {path}: {summary['tensors']} tensors, {summary['parameters']:,} parameters, "
        f"{summary['bytes'] / 2**20:.1f} MiB (a checkpoint written by {summary['engine']} at global_step "
        f"{summary['global_step']}, epoch {summary['epoch']})"
    )


def _plot(cfg: Namespace) -> None:
    from ..plotting import plot_run

    try:
        paths = plot_run(cfg.run_dir, cfg.out_dir)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from None
    for path in paths:
        print(path)


def _status(cfg: Namespace) -> None:
    from ..run_status import read_run_status

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


def _lr_schedule(cfg: Namespace) -> None:
    """The learning rates the config's optimizers would follow, simulated without a Trainer."""
    from ..lr_schedule import (
        plateau_metric_from,
        plot_lr_schedule,
        simulate_lr_schedule,
        write_lr_schedule_csv,
    )

    if cfg.steps < 1:
        raise CLIError(f"--steps={cfg.steps} is not allowed: expected an int >= 1.")
    if cfg.trainer.seed is not None:
        torch.manual_seed(cfg.trainer.seed)
    module = build_module(cfg)
    batches = None
    datamodule = build_datamodule(cfg)
    if datamodule is not None:
        datamodule.setup("fit")
        batches = loader_length(datamodule.train_dataloader())
    elif callable(loader := getattr(module, "train_dataloader", None)):
        batches = loader_length(loader())
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


def _dump(parser: ArgumentParser, cfg: Namespace) -> str:
    """The resolved config as YAML: every default filled in, without ``--config`` itself."""
    cfg = cfg.clone()
    for key in ("config", "__path__"):
        if key in cfg:
            del cfg[key]
    return parser.dump(cfg, skip_none=False, skip_validation=True)


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

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

The package, one job per module:

- ``__init__``: :func:`main`: runs a subcommand; a user error becomes one line and exit status 2.
- :mod:`.parser`: the command line and config schema (jsonargparse), and the checks it cannot make.
- :mod:`.build`: the objects a config names, instantiated by jsonargparse in the order a run needs.
- :mod:`.commands`: what each subcommand does.
- :mod:`.messages`: the errors a user reads: the key, the value received, what is allowed.
- :mod:`.jsonargparse_errors`: the only reader of jsonargparse's error text (it has no structured errors).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ..errors import CheckpointError, ConfigurationError
from .build import attach_optimizers, build
from .commands import run, run_command
from .messages import PROG, CLIError
from .parser import COMMANDS, RUN_COMMANDS, build_parser, parse

__all__ = [
    "COMMANDS", "PROG", "RUN_COMMANDS", "CLIError",
    "attach_optimizers", "build", "build_parser", "main", "parse", "run",
]

CONFIG_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130


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
        run_command(command, parser, cfg)
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

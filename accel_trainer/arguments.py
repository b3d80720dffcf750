"""The checks of ``Trainer(...)``'s arguments: one per argument, run before anything else.

Kept apart from the trainer so that what each argument allows can be read (and tested) on one
screen; every refusal is a ``ConfigurationError`` naming the argument, its value and what is allowed.
"""

from __future__ import annotations

import math
import os
from typing import Any

from .callbacks.base import Callback
from .errors import ConfigurationError
from .migration import accelerator_string_message

MIXED_PRECISION = ("no", "bf16", "fp16")
CLIP_ALGORITHMS = ("norm", "value")
NONFINITE_POLICIES = ("raise", "skip")


def validate_trainer_args(args: dict[str, Any]) -> None:
    """One check per argument, run before anything else (Raises: ConfigurationError)."""

    def fail(name: str, allowed: str) -> None:
        raise ConfigurationError(f"Trainer({name}={args[name]!r}) is not allowed: {allowed}.")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if args["max_epochs"] is not None and not (is_int(args["max_epochs"]) and args["max_epochs"] >= 0):
        fail("max_epochs", "expected None or an int >= 0")
    if not (is_int(args["max_steps"]) and args["max_steps"] >= -1):
        fail("max_steps", "expected -1 (no limit) or an int >= 0")
    if args["mixed_precision"] not in MIXED_PRECISION:
        fail("mixed_precision", f"expected one of {list(MIXED_PRECISION)}")
    if not (is_int(args["gradient_accumulation_steps"]) and args["gradient_accumulation_steps"] >= 1):
        fail("gradient_accumulation_steps", "expected an int >= 1")
    clip = args["gradient_clip_val"]
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip <= 0):
        fail("gradient_clip_val", "expected None or a number > 0")
    if args["gradient_clip_algorithm"] not in CLIP_ALGORITHMS:
        fail("gradient_clip_algorithm", f"expected one of {list(CLIP_ALGORITHMS)}")
    for name in ("limit_train_batches", "limit_val_batches"):
        v = args[name]
        if v is None:
            continue
        if isinstance(v, float) and 0.0 <= v <= 1.0:
            continue
        if is_int(v) and v >= 0:
            continue
        fail(name, "expected None, a float fraction in [0, 1] or an int number of batches >= 0")
    v = args["val_check_interval"]
    if not ((isinstance(v, float) and 0.0 < v <= 1.0) or (is_int(v) and v >= 1)):
        fail("val_check_interval", "expected a float fraction in (0, 1] or an int number of batches >= 1")
    if not (is_int(args["check_val_every_n_epoch"]) and args["check_val_every_n_epoch"] >= 1):
        fail("check_val_every_n_epoch", "expected an int >= 1")
    if not (is_int(args["num_sanity_val_steps"]) and args["num_sanity_val_steps"] >= 0):
        fail("num_sanity_val_steps", "expected an int >= 0")
    if not (is_int(args["log_every_n_steps"]) and args["log_every_n_steps"] >= 1):
        fail("log_every_n_steps", "expected an int >= 1")
    if args["on_nonfinite_loss"] not in NONFINITE_POLICIES:
        fail("on_nonfinite_loss", f"expected one of {list(NONFINITE_POLICIES)}")
    n = args["check_rank_sync_every_n_steps"]
    if n is not None and not (is_int(n) and n >= 1):
        fail("check_rank_sync_every_n_steps", "expected None (once per epoch) or an int >= 1")
    timeout = args["collective_timeout"]
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0 or timeout == math.inf):
        fail("collective_timeout", "expected None (torch's default) or a number of seconds > 0")
    if args["seed"] is not None and not is_int(args["seed"]):
        fail("seed", "expected None or an int")
    callbacks = args["callbacks"]
    if callbacks is not None:
        if not isinstance(callbacks, (list, tuple)):
            fail("callbacks", "expected a list of accel_trainer.Callback")
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise ConfigurationError(
                    f"Trainer(callbacks=[...]) contains a {type(cb).__name__}; every callback must subclass accel_trainer.Callback."
                )
    for name in ("cpu", "enable_progress_bar"):
        if not isinstance(args[name], bool):
            fail(name, "expected True or False")
    root = args["default_root_dir"]
    if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
        fail("default_root_dir", "expected a non-empty path (str or os.PathLike)")
    if not isinstance(args["project_name"], str) or not args["project_name"]:
        fail("project_name", "expected a non-empty str")
    acc = args["accelerator"]
    if isinstance(acc, str):
        raise ConfigurationError(accelerator_string_message(acc))
    if acc is not None and not hasattr(acc, "prepare"):
        fail("accelerator", "expected None or an accelerate.Accelerator")

"""Save and restore everything a run needs to continue exactly.

A checkpoint is one file written atomically: serialised to a temporary file in the same
directory, flushed to disk, then ``os.replace``d over the target, so a crash mid-write
never leaves a truncated ``last.ckpt``. Files load with ``torch.load(weights_only=True)``
(no arbitrary pickles), which is why RNG states and hyperparameters are stored as plain
lists, numbers and strings.
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError

FORMAT = "accel_trainer/1"
LAST_NAME = "last.ckpt"


def capture_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return [_to_lists(x) for x in obj]
    return obj


def plain(value: Any) -> Any:
    """``value`` reduced to what ``torch.load(weights_only=True)`` accepts."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return repr(value)


def atomic_save(obj: dict[str, Any], path: str) -> None:
    """Write ``obj`` to ``path`` so that ``path`` is always either the old or the new file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint_file(path: str) -> dict[str, Any]:
    """Load a checkpoint, turning torch's low-level failures into a :class:`CheckpointError`."""
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint not found: {path!r} (no such file).")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler can raise almost anything on arbitrary bytes
        raise CheckpointError(
            f"Checkpoint {path!r} cannot be read: it is truncated or corrupt ({type(err).__name__}: {err})."
        ) from err
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path!r} is not an accel_trainer checkpoint (expected format {FORMAT!r}, found {found!r}).")
    return checkpoint


def check_compatible(checkpoint: dict[str, Any], module: torch.nn.Module, num_optimizers: int, num_schedulers: int, path: str) -> None:
    """Name what differs between a checkpoint and the run about to load it."""
    saved = checkpoint["state_dict"]
    current = module.state_dict()
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    mismatched = sorted(k for k in set(saved) & set(current) if tuple(saved[k].shape) != tuple(current[k].shape))
    problems = []
    if missing:
        problems.append(f"parameters missing from the checkpoint: {missing[:10]}")
    if unexpected:
        problems.append(f"parameters in the checkpoint the module does not have: {unexpected[:10]}")
    if mismatched:
        shapes = [f"{k}: saved {tuple(saved[k].shape)} vs module {tuple(current[k].shape)}" for k in mismatched[:10]]
        problems.append(f"shape mismatches: {shapes}")
    n_opt = len(checkpoint["optimizer_states"])
    if n_opt != num_optimizers:
        problems.append(f"the checkpoint has {n_opt} optimizer(s), configure_optimizers returned {num_optimizers}")
    n_sched = len(checkpoint["lr_schedulers"])
    if n_sched != num_schedulers:
        problems.append(f"the checkpoint has {n_sched} scheduler(s), configure_optimizers returned {num_schedulers}")
    if problems:
        raise CheckpointError(f"Checkpoint {path!r} does not fit {type(module).__name__}: " + "; ".join(problems) + ".")

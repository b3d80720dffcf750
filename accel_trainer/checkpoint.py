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
    """Write ``obj`` to ``path`` so that ``path`` is always either the old or the new file.

    The file gets the mode any new file of this process gets (``0o666`` less the umask), as
    with ``open()``: ``mkstemp`` alone would leave it ``0600``, unreadable to the rest of a
    group sharing the run directory or to the host user of a Docker-mounted ``runs/``.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def load_checkpoint_file(path: str) -> dict[str, Any]:
    """Load a checkpoint, turning torch's low-level failures into a :class:`CheckpointError`."""
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint not found: {path!r} (no such file).")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler can raise almost anything on arbitrary bytes
        raise CheckpointError(f"Checkpoint {path!r} cannot be read: {_why_unreadable(err)}.") from err
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path!r} is not an accel_trainer checkpoint (expected format {FORMAT!r}, found {found!r}).")
    return checkpoint


def _why_unreadable(err: Exception) -> str:
    """What a ``torch.load(weights_only=True)`` failure means for an accel_trainer checkpoint.

    torch's own message advises loading with ``weights_only=False``: wrong here, since every
    accel_trainer checkpoint loads with ``weights_only=True``, and unsafe for a file of unknown
    origin. So only the useful part of it is kept.
    """
    import re

    text = str(err)
    unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsupported:
        return (
            f"it holds a pickled {unsupported.group(1)} object, which an accel_trainer checkpoint never contains "
            "(it holds only tensors, numbers, strings, lists and dicts): it was not written by "
            "accel_trainer's Trainer.save_checkpoint, or it is corrupt"
        )
    if "zip archive" in text or "central directory" in text or isinstance(err, EOFError):
        return "it is truncated or corrupt (not a complete torch.save archive; was it copied or written only partly?)"
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    first = (detail.group(1) if detail else text).strip().splitlines()
    reason = f"{type(err).__name__}: {first[0].strip()}" if first and first[0].strip() else type(err).__name__
    return f"it is truncated or corrupt ({reason})"


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


# -- what a checkpoint holds ------------------------------------------------------------------
def _sampler_generator(loader: Any) -> torch.Generator | None:
    """The generator a prepared dataloader draws each epoch's shuffling order from."""
    return getattr(loader, "synchronized_generator", None)


def _global_batch_size(loader: Any) -> int | None:
    """Samples per step over all ranks (what a position in the epoch is measured in)."""
    return getattr(loader, "total_batch_size", None) or getattr(loader, "batch_size", None)


def capture_epoch_start(loader: Any) -> dict[str, Any]:
    """RNG and sampler state just before an epoch draws its shuffling order."""
    generator = _sampler_generator(loader)
    return {
        "rng": capture_rng_state(),
        "sampler_generator": generator.get_state() if generator is not None else None,
    }


def restore_epoch_start(loader: Any, snapshot: dict[str, Any]) -> None:
    restore_rng_state(snapshot["rng"])
    generator = _sampler_generator(loader)
    if generator is not None and snapshot.get("sampler_generator") is not None:
        generator.set_state(snapshot["sampler_generator"])


def build_checkpoint(trainer: Any) -> dict[str, Any]:
    """Everything needed to continue ``trainer``'s fit exactly (call on every rank)."""
    from accelerate.utils import gather_object

    module = trainer.module
    state = trainer.state
    at_boundary = state.batches_done_in_epoch == 0
    loader = getattr(trainer, "_train_loader", None)
    epoch_start = capture_epoch_start(loader) if at_boundary or trainer._epoch_start is None else trainer._epoch_start
    per_rank = {"rng": capture_rng_state(), "epoch_start": epoch_start}
    if trainer.world_size > 1:
        per_rank_states = gather_object([per_rank])
    else:
        per_rank_states = [per_rank]
    if _is_fsdp(trainer):
        from .sharded_state import gather_full_state

        model_state, optimizer_states = gather_full_state(trainer._wrapped, trainer.optimizers)
        grads: dict[str, Any] = {}  # sharded; carried gradients are not saved under FSDP
    else:
        model_state, optimizer_states = module.state_dict(), [opt.state_dict() for opt in trainer.optimizers]
        grads = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
    checkpoint: dict[str, Any] = {
        "format": FORMAT,
        "state_dict": model_state,
        "optimizer_states": optimizer_states,
        "lr_schedulers": [cfg.scheduler.state_dict() for cfg in trainer.lr_schedulers],
        "loops": state.state_dict(),
        # Gradients an optimizer_step override left un-zeroed (it skipped a step) carry into
        # the next batch; without them a resumed run would take a different step.
        "grads": grads,
        "world_size": trainer.world_size,
        "global_batch_size": _global_batch_size(loader),
        "rank_states": per_rank_states,
        "callbacks": {cb.state_key: plain(cb.state_dict()) for cb in trainer.callbacks},
        "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "hparams": plain(dict(module.hparams)),
    }
    scaler = getattr(trainer.accelerator, "scaler", None)
    if scaler is not None:
        checkpoint["scaler"] = scaler.state_dict()
    trainer._hooks("on_save_checkpoint", checkpoint)
    return checkpoint


def _is_fsdp(trainer: Any) -> bool:
    from .engines import engine_name

    return engine_name(trainer.accelerator.distributed_type) == "FSDP"


def restore_checkpoint(trainer: Any, path: str) -> dict[str, Any] | None:
    """Load ``path`` into ``trainer``; returns what a mid-epoch resume still needs (else None)."""
    if _is_fsdp(trainer):
        raise CheckpointError(
            f"Resuming from {path!r} under FSDP is not supported yet: the checkpoint holds the full (gathered) "
            "weights and optimizer state, but putting them back into shards has not been verified to continue "
            "exactly. Resume this run under DDP (launch/multi_gpu.yaml), or start a new FSDP run from the weights: "
            "module.load_state_dict(accel_trainer.checkpoint.load_checkpoint_file(path)['state_dict'])."
        )
    checkpoint = load_checkpoint_file(path)
    module = trainer.module
    check_compatible(checkpoint, module, len(trainer.optimizers), len(trainer.lr_schedulers), path)
    module.load_state_dict(checkpoint["state_dict"])
    grads = checkpoint.get("grads", {})
    for name, p in module.named_parameters():
        p.grad = grads[name].to(p.device, p.dtype) if name in grads else None
    for opt, opt_state in zip(trainer.optimizers, checkpoint["optimizer_states"]):
        opt.load_state_dict(opt_state)
    for cfg, sched_state in zip(trainer.lr_schedulers, checkpoint["lr_schedulers"]):
        cfg.scheduler.load_state_dict(sched_state)
    scaler = getattr(trainer.accelerator, "scaler", None)
    if scaler is not None and "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    trainer.state.load_state_dict(checkpoint["loops"])
    saved_world = int(checkpoint.get("world_size", 1))
    loader = getattr(trainer, "_train_loader", None)
    saved_batch, batch = checkpoint.get("global_batch_size"), _global_batch_size(loader)
    if trainer.state.batches_done_in_epoch and saved_batch and batch and saved_batch != batch:
        # The position is counted in batches: carry it over as samples seen this epoch.
        trainer.state.batches_done_in_epoch = trainer.state.batches_done_in_epoch * saved_batch // batch
    for cb in trainer.callbacks:
        if cb.state_key in checkpoint["callbacks"]:
            cb.load_state_dict(checkpoint["callbacks"][cb.state_key])
    for name, value in checkpoint.get("callback_metrics", {}).items():
        trainer.callback_metrics.setdefault(name, torch.tensor(value))
    rank_states = checkpoint["rank_states"]
    mine = rank_states[trainer.accelerator.process_index] if saved_world == trainer.world_size else rank_states[0]
    if trainer.state.batches_done_in_epoch == 0:
        restore_epoch_start(loader, mine["epoch_start"])  # the next epoch starts exactly as it would have
    restore_rng_state(mine["rng"])
    trainer._hooks("on_load_checkpoint", checkpoint)
    if trainer.state.batches_done_in_epoch == 0:
        return None
    return {"rng": mine["rng"], "epoch_start": mine["epoch_start"]}

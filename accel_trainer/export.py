"""``accel-trainer export CKPT OUT``: a checkpoint's weights as one consolidated safetensors file.

Training checkpoints are for resuming: under FSDP a checkpoint is a directory of per-rank
shards (plus optimizer state, counters, RNG). For inference and sharing one wants the
module's full weights in a standard format: this reassembles them (in this one process's
memory: run it on a machine with room for the full model, not inside a training job) and
writes ``safetensors``, which loads without unpickling anything::

    from safetensors.torch import load_file
    module.load_state_dict(load_file("model.safetensors"))
"""

from __future__ import annotations

import os
from typing import Any

import torch

from . import checkpoint as ckpt_io
from .errors import CheckpointError

FILE_NAME = "model.safetensors"


def locate(path: str) -> str:
    """The checkpoint ``path`` names: itself, or a run directory's ``checkpoints/last.ckpt``."""
    if ckpt_io.exists(path):
        return path
    last = os.path.join(path, "checkpoints", ckpt_io.LAST_NAME)
    if os.path.isdir(path) and ckpt_io.exists(last):
        return last
    if os.path.lexists(path):
        return path  # let read() say what is wrong with it
    raise CheckpointError(f"Checkpoint not found: {path!r} (neither a checkpoint nor a run directory with checkpoints/{ckpt_io.LAST_NAME}).")


def export(checkpoint: str, out: str) -> tuple[str, dict[str, Any]]:
    """Write ``checkpoint``'s module weights to ``out`` (a ``.safetensors`` file, or a directory
    that receives ``model.safetensors``). Returns the file written and a summary.
    """
    from safetensors.torch import save_file

    path = locate(checkpoint)
    source = ckpt_io.read(path)
    weights = ckpt_io.load_weights(path)
    if out.endswith(".safetensors"):
        target = out
    else:
        target = os.path.join(out, FILE_NAME)
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    loops = source.checkpoint.get("loops", {})
    metadata = {
        "format": "pt",
        "source": os.path.abspath(path),
        "engine": str(source.checkpoint.get("engine", "DDP")),
        "global_step": str(loops.get("global_step", "")),
        "epoch": str(loops.get("current_epoch", "")),
    }
    # safetensors refuses tensors that share memory (tied weights): each is written on its own
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in weights.items() if isinstance(t, torch.Tensor)}
    tmp = target + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, target)
    summary = {
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
        "bytes": os.path.getsize(target),
        **{k: metadata[k] for k in ("engine", "global_step", "epoch")},
    }
    return target, summary

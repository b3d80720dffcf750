"""Checksums that turn a damaged checkpoint into an error instead of a silently different run.

``torch.load`` notices a truncated archive, but not a changed byte inside tensor data: a
flipped bit in a weight, an Adam moment or an RNG state loads without a word and the
"resumed" run quietly differs from the one that was saved. So every checkpoint records,
when it is written, a SHA-256 checksum

* of each top-level section of its trainer state (``state_dict``, ``optimizer_states``,
  ``loops``, ``rank_states`` ...), computed over the *values* (every tensor's dtype, shape
  and bytes, every number and string), so the same digest is recomputed from what
  ``torch.load`` returns, and the section that changed can be named;
* of each payload file a sharded checkpoint keeps beside its state file (DCP shards, FSDP1's
  per-rank gradients, an engine's own checkpoint files): the plain SHA-256 of the file's
  bytes, which ``sha256sum`` reproduces. Each rank hashes the files it wrote itself (see
  ``Engine.payload_file_owner``); the global main process records them all.

Both are verified on every load; a mismatch raises :class:`~accel_trainer.errors.CheckpointError`
naming the file (and section). A checkpoint written before checksums existed has no record
and loads as before.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any

import torch

from .errors import CheckpointError

ALGORITHM = "sha256"
#: the key under which a checkpoint records its checksums (never part of what is hashed)
KEY = "integrity"
_CHUNK = 4 << 20

#: what each section of a checkpoint is, for messages
SECTION_NAMES = {
    "state_dict": "the model weights",
    "optimizer_states": "the optimizer states",
    "grads": "the carried gradients",
    "lr_schedulers": "the scheduler states",
    "loops": "the training counters",
    "rank_states": "the RNG states",
    "scaler": "the fp16 gradient scaler",
    "callbacks": "the callback states",
    "sharded": "the description of the shards",
}


def value_digest(value: Any) -> str:
    """SHA-256 of a checkpoint value, computed from its content (not from its pickled bytes)."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def section_digests(checkpoint: dict[str, Any]) -> dict[str, str]:
    """One digest per top-level entry of ``checkpoint`` (the integrity record itself excluded)."""
    return {str(k): value_digest(v) for k, v in checkpoint.items() if k != KEY}


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes (the value ``sha256sum`` prints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def record(checkpoint: dict[str, Any], files: dict[str, str] | None = None) -> None:
    """Add the integrity record to ``checkpoint`` (last, once every other entry is in place)."""
    checkpoint.pop(KEY, None)
    checkpoint[KEY] = {"algorithm": ALGORITHM, "sections": section_digests(checkpoint), "files": dict(files or {})}


def verify_sections(checkpoint: dict[str, Any], path: str) -> None:
    """Raise :class:`CheckpointError` naming ``path`` when a section differs from its recorded checksum."""
    rec = checkpoint.get(KEY)
    if rec is None:
        return  # written before checksums existed
    if not isinstance(rec, dict) or rec.get("algorithm") != ALGORITHM or not isinstance(rec.get("sections"), dict):
        raise CheckpointError(f"Checkpoint {path!r} is corrupt: its integrity record is damaged ({_short(rec)}). {_WAY_OUT}")
    recorded: dict[str, str] = rec["sections"]
    present = {str(k) for k in checkpoint if k != KEY}
    missing = sorted(set(recorded) - present)
    added = sorted(present - set(recorded))
    changed = sorted(k for k in set(recorded) & present if value_digest(checkpoint[k]) != recorded[k])
    if not (missing or added or changed):
        return
    parts = []
    if changed:
        parts.append("changed: " + ", ".join(f"{k!r} ({SECTION_NAMES.get(k, 'an entry of on_save_checkpoint')})" for k in changed))
    if missing:
        parts.append(f"gone: {missing}")
    if added:
        parts.append(f"not there when it was saved: {added}")
    raise CheckpointError(
        f"Checkpoint {path!r} is corrupt: its content does not match the {ALGORITHM} checksums recorded when it was "
        f"written ({'; '.join(parts)}). The file was damaged after it was saved (disk, copy or transfer). {_WAY_OUT}"
    )


def verify_files(directory: str, files: dict[str, str], names: Iterable[str] | None = None) -> list[str]:
    """Problems with the recorded payload files under ``directory`` (only ``names`` when given).

    Returns one message per file that is missing or whose bytes no longer match, each naming the file.
    """
    problems = []
    for name in sorted(files if names is None else names):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            problems.append(f"{path!r} is missing")
            continue
        actual = file_digest(path)
        if actual != files[name]:
            problems.append(f"{path!r} is corrupt ({ALGORITHM} {actual[:12]}... instead of the recorded {files[name][:12]}...)")
    return problems


def raise_for_files(path: str, problems: list[str]) -> None:
    if problems:
        raise CheckpointError(
            f"Checkpoint {path!r} is damaged: " + "; ".join(problems) + ". Its files were changed, removed or cut "
            f"short after it was saved (disk, copy or transfer). {_WAY_OUT}"
        )


_WAY_OUT = (
    "Resume from another checkpoint (ckpt_path=<a file ModelCheckpoint wrote>), or start over without it "
    "(accel-trainer fit --resume false, or fit(ckpt_path=None))."
)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


# -- hashing values --------------------------------------------------------------------------------
def _feed(h: Any, obj: Any) -> None:
    """Feed a canonical encoding of ``obj`` into ``h``: a type tag, then the content.

    What ``torch.load`` gives back for what was saved encodes identically (tuples and lists
    share a tag; dicts keep their insertion order, which pickling preserves).
    """
    if obj is None:
        h.update(b"N")
    elif isinstance(obj, bool):
        h.update(b"T" if obj else b"F")
    elif isinstance(obj, int):
        h.update(b"i%d;" % obj)
    elif isinstance(obj, float):
        h.update(b"f" + obj.hex().encode() + b";")
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(b"s%d:" % len(data))
        h.update(data)
    elif isinstance(obj, (bytes, bytearray)):
        h.update(b"b%d:" % len(obj))
        h.update(obj)
    elif isinstance(obj, torch.Tensor):
        _feed_tensor(h, obj)
    elif isinstance(obj, (list, tuple)):
        h.update(b"l%d:" % len(obj))
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, dict):
        h.update(b"d%d:" % len(obj))
        for key, item in obj.items():
            _feed(h, key)
            _feed(h, item)
    else:  # complex, torch.dtype, torch.device, sets ...: their repr is their content
        text = f"{type(obj).__qualname__}:{obj!r}".encode()
        h.update(b"o%d:" % len(text))
        h.update(text)


def _feed_tensor(h: Any, tensor: torch.Tensor) -> None:
    t = tensor.detach()
    header = f"{t.dtype}|{tuple(t.shape)}|".encode()
    h.update(b"t%d:" % len(header))
    h.update(header)
    if t.layout != torch.strided or t.is_quantized:
        h.update(repr(t.cpu()).encode())  # not in accel_trainer's own checkpoints; still deterministic
        return
    if t.numel() == 0:
        return
    data = t.cpu().contiguous().reshape(-1).view(torch.uint8)
    h.update(data.numpy().data)  # the buffer itself (a memoryview), no copy

"""Save and restore everything a run needs to continue exactly.

Two layouts, one content:

* **one file** (single process and DDP): everything, written by the global main process.
* **a directory** (engines that shard, i.e. FSDP): every rank writes its own shards of the
  model, optimizer state and carried gradients into ``shards/`` (DCP, see
  :mod:`accel_trainer.sharded_state`), and the global main process writes the rest --
  counters, schedulers, RNG states of every rank, callbacks -- as ``trainer_state.pt``.

Either is published atomically: a file is written to a temporary file in the same
directory, flushed, then ``os.replace``d over the target; a directory is written under a
temporary name and renamed into place only once every rank has finished, the previous one
renamed aside first and removed last (a crash between the two renames is repaired by
:func:`resolve`). So ``last.ckpt`` always names a complete checkpoint. Everything loads
with ``torch.load(weights_only=True)`` (no arbitrary pickles), which is why RNG states and
hyperparameters are stored as plain lists, numbers and strings.

What else protects a run (README, "Checkpoints and resuming"):

* a checkpoint is never written with non-finite weights: :func:`save` checks the model's
  parameters and buffers first and, when any holds a NaN or an infinity, writes nothing,
  keeps the previous checkpoint and says so (:func:`nonfinite_weights`);
* every checkpoint records SHA-256 checksums of its sections and of its payload files,
  verified on every load (:mod:`accel_trainer.integrity`);
* before anything is restored, :func:`restore` checks that the checkpoint fits the run
  (:mod:`accel_trainer.compatibility`): sections present, parameter names and shapes,
  optimizer and scheduler classes, param groups, and the run's configuration.

Nothing here reads a ``Trainer``: :class:`CheckpointParts` hands in what a checkpoint is
made of, and the engine (:mod:`accel_trainer.engines`) saves and restores its own part.
"""

from __future__ import annotations

import glob
import itertools
import os
import random
import re
import shutil
import sys
import tempfile
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import collectives, compatibility, integrity
from .errors import CheckpointError

FORMAT = "accel_trainer/1"
LAST_NAME = "last.ckpt"
#: inside a sharded checkpoint directory: the trainer's state file, and the DCP shards
STATE_FILE = "trainer_state.pt"
SHARDS_DIR = "shards"


def capture_rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()
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
        publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def publish(staged: str, path: str) -> None:
    """Move the complete ``staged`` file or directory to ``path``, replacing what was there.

    A file over a file is one atomic ``os.replace``. Otherwise (a directory, or a file where
    a directory was) the old entry is renamed aside first, the new one renamed into place,
    then the old one removed: at every moment ``path`` or its aside copy is complete, and
    :func:`resolve` renames the aside copy back if a crash struck between the two renames.
    """
    if not os.path.isdir(staged) and not os.path.isdir(path):
        os.replace(staged, path)
        return
    aside = None
    if os.path.lexists(path):
        aside = _aside_name(path)
        os.rename(path, aside)
    os.rename(staged, path)
    _fsync_directory(os.path.dirname(os.path.abspath(path)))
    if aside is not None:
        remove(aside)


def _aside_name(path: str) -> str:
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".old-{tail}-{uuid.uuid4().hex[:8]}")


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def remove(path: str) -> None:
    """Delete a checkpoint of either layout (nothing when it does not exist)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def exists(path: str) -> bool:
    """A complete checkpoint of either layout is at ``path``."""
    return os.path.isfile(path) or os.path.isfile(os.path.join(path, STATE_FILE))


def resolve(path: str) -> str:
    """``path``, after repairing a publish that a crash interrupted between its two renames.

    Only the global main process may call this while other ranks run (it renames).
    """
    if not os.path.lexists(path):
        head, tail = os.path.split(os.path.abspath(path))
        asides = sorted(glob.glob(os.path.join(glob.escape(head), f".old-{glob.escape(tail)}-*")), key=os.path.getmtime)
        complete = [a for a in asides if exists(a)]
        if complete:
            os.rename(complete[-1], path)
    return path


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
        raise CheckpointError(f"Checkpoint {path!r} cannot be read: {_why_unreadable(err, path)}.") from err
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path!r} is not an accel_trainer checkpoint (expected format {FORMAT!r}, found {found!r}).")
    integrity.verify_sections(checkpoint, path)
    return checkpoint


def _why_unreadable(err: Exception, path: str | None = None) -> str:
    """What a ``torch.load(weights_only=True)`` failure means for an accel_trainer checkpoint.

    torch's own message advises loading with ``weights_only=False``: wrong here, since every
    accel_trainer checkpoint loads with ``weights_only=True``, and unsafe for a file of unknown
    origin. So only the useful part of it is kept. A file that is a plain ``pickle`` (not a
    ``torch.save`` archive), or an archive torch cannot read, is looked into without running
    it (:mod:`pickletools` lists what it would build) so that a foreign object is named.
    """
    text = str(err)
    unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsupported:
        return _foreign(unsupported.group(1))
    foreign = _pickled_globals(path) if path is not None else None
    if foreign is not None and foreign[1]:
        return _foreign(", ".join(foreign[1]), foreign[0])
    if foreign is not None and foreign[0] == "plain":
        return (
            "it is a plain Python pickle (written with pickle.dump, not torch.save), not an accel_trainer checkpoint"
        )
    if "zip archive" in text or "central directory" in text or isinstance(err, EOFError):
        return "it is truncated or corrupt (not a complete torch.save archive; was it copied or written only partly?)"
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    first = (detail.group(1) if detail else text).strip().splitlines()
    reason = f"{type(err).__name__}: {first[0].strip()}" if first and first[0].strip() else type(err).__name__
    return f"it is truncated or corrupt ({reason})"


_READABLE = {"_reconstruct": "numpy.ndarray", "scalar": "numpy scalar"}


def _foreign(names: str, kind: str = "archive") -> str:
    names = ", ".join(
        _READABLE.get(n.rsplit(".", 1)[-1], n) if n.startswith("numpy") else n for n in names.split(", ")
    )
    where = "a plain Python pickle (written with pickle.dump, not torch.save) that holds" if kind == "plain" else "it holds"
    plural = "objects" if "," in names else "object"
    return (
        f"{'it is ' if kind == 'plain' else ''}{where} a pickled {names} {plural}, which an accel_trainer checkpoint never "
        "contains (it holds only tensors, numbers, strings, lists and dicts): it was not written by accel_trainer's "
        "Trainer.save_checkpoint, or it is corrupt"
    )


#: the globals torch.save itself writes into an archive of tensors, lists and dicts
_TORCH_GLOBALS = re.compile(r"^(torch\.|collections\.OrderedDict$|_codecs\.encode$|builtins\.(set|frozenset|complex|bytearray)$)")


def _pickled_globals(path: str) -> tuple[str, list[str]] | None:
    """The classes and functions a pickle names (without unpickling it), or None when it is no pickle.

    Returns ``("plain", names)`` for a file that is itself a pickle, ``("archive", names)``
    for a ``torch.save`` archive whose ``data.pkl`` names something torch does not write.
    """
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pkl = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if pkl is None:
                    return None
                data, kind = archive.read(pkl), "archive"
        else:
            with open(path, "rb") as f:
                data, kind = f.read(64 << 20), "plain"
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    names: list[str] = []
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(str(arg))
            elif opcode.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif opcode.name == "STOP":
                break
    except Exception:  # not a pickle, or cut short: nothing to name
        return None
    foreign = sorted({n for n in names if not _TORCH_GLOBALS.match(n)})
    if foreign:
        return kind, foreign
    return (kind, []) if kind == "plain" else None


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




# -- a checkpoint of a run -------------------------------------------------------------------
@dataclass
class CheckpointParts:
    """What a checkpoint is made of, handed in by the trainer (this module never reads a Trainer).

    Attributes:
        accelerator: the run's Accelerator (rank, world size, collectives, scaler).
        engine: the run's :class:`~accel_trainer.engines.Engine`; saves/restores the tensors.
        module: the user's module; ``wrapper``: the prepared model the optimizers train.
        optimizers: the prepared optimizers; ``schedulers``: the prepared schedulers, in order.
        state: the :class:`~accel_trainer.state.TrainingState` counters.
        callbacks: the run's callbacks (``state_key``, ``state_dict``, ``load_state_dict``).
        callback_metrics: the latest reduced metrics (restored so monitors see them again).
        train_loader: the prepared training dataloader (its sampler position and batch size).
        epoch_start: RNG/sampler state captured when the current epoch began (None at a boundary).
        run: this run's record -- ``{"id", "fingerprint", "identity"}`` (see
            :mod:`accel_trainer.compatibility`) -- written into checkpoints and compared on resume.
    """

    accelerator: Any
    engine: Any
    module: torch.nn.Module
    wrapper: torch.nn.Module
    optimizers: list
    schedulers: list
    state: Any
    callbacks: list = field(default_factory=list)
    callback_metrics: dict = field(default_factory=dict)
    train_loader: Any = None
    epoch_start: dict[str, Any] | None = None
    run: dict[str, Any] | None = None


def save(path: str, parts: CheckpointParts, on_save: Callable[[dict[str, Any]], None] | None = None) -> bool:
    """Write a checkpoint of ``parts`` to ``path`` (every rank calls this; it returns on every rank
    once the checkpoint is complete). ``on_save(checkpoint)`` may add entries before it is written.

    Returns False, having written nothing, when the model's weights are not finite (NaN or
    infinite values in a parameter or buffer): the previous checkpoint at ``path``, if any,
    is kept, and the main process says so on stderr and with a warning.
    """
    accelerator, engine = parts.accelerator, parts.engine
    bad = nonfinite_weights(parts.wrapper, accelerator, parts.module)
    if bad is not None:
        _refuse_nonfinite(path, bad, parts)
        return False
    checkpoint = _trainer_state(parts)
    if not engine.sharded_checkpoints:
        checkpoint.update(engine.save_payload(None, parts.module, parts.wrapper, parts.optimizers))
        if on_save is not None:
            on_save(checkpoint)
        if accelerator.is_main_process:
            integrity.record(checkpoint)
            atomic_save(checkpoint, path)
        collectives.barrier(accelerator)
        return True
    if on_save is not None:
        on_save(checkpoint)
    staging = _agreed_staging_directory(path, accelerator)
    meta = engine.save_payload(os.path.join(staging, engine.payload_dir), parts.module, parts.wrapper, parts.optimizers)
    checkpoint["sharded"] = {"payload_dir": engine.payload_dir, **meta}
    collectives.barrier(accelerator)  # every rank's shards are on disk
    files = _payload_digests(staging, parts)  # each rank hashes the files it wrote
    if accelerator.is_main_process:
        integrity.record(checkpoint, files)
        atomic_save(checkpoint, os.path.join(staging, STATE_FILE))
        publish(staging, path)
    collectives.barrier(accelerator)
    return True


def _payload_files(directory: str) -> list[str]:
    """Every file of a checkpoint directory but its state file, as sorted relative paths."""
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != STATE_FILE:
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def _payload_digests(directory: str, parts: CheckpointParts) -> dict[str, str]:
    """SHA-256 of every payload file of a sharded checkpoint, each hashed by the rank that wrote it
    (``Engine.payload_file_owner``), gathered on every rank (a collective)."""
    accelerator, engine = parts.accelerator, parts.engine
    rank, world = accelerator.process_index, accelerator.num_processes
    files = _payload_files(directory)
    mine = {
        name: integrity.file_digest(os.path.join(directory, name))
        for index, name in enumerate(files)
        if engine.payload_file_owner(name, index, world) == rank
    }
    if world == 1:
        return mine
    merged: dict[str, str] = {}
    for part in collectives.gather_objects([mine]):
        merged.update(part)
    return merged


# -- non-finite weights ----------------------------------------------------------------------------
def nonfinite_weights(wrapper: torch.nn.Module, accelerator: Any = None, module: torch.nn.Module | None = None) -> list[str] | None:
    """Names of the parameters and buffers holding a NaN or an infinity, or None when all are finite.

    Every rank calls this (one small collective on several processes): each checks the
    tensors it holds (its shards under FSDP), and the answer is agreed, so every rank takes
    the same decision. The names are this rank's (empty when only another rank's shards are bad).
    """
    own = {}
    if module is not None:  # the user's names for the tensors it shares with the wrapper
        own = {id(t): compatibility.clean_name(n) for n, t in itertools.chain(module.named_parameters(), module.named_buffers())}
    names, flags = [], []
    for name, tensor in itertools.chain(wrapper.named_parameters(), wrapper.named_buffers()):
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor's shard
        names.append(own.get(id(tensor)) or compatibility.clean_name(name))
        flags.append(torch.isfinite(local.detach()).all())
    local_bad = [n for n, ok in zip(names, torch.stack(flags).tolist() if flags else []) if not ok]
    count = len(local_bad)
    if accelerator is not None and accelerator.num_processes > 1:
        total = torch.tensor([float(count)], device=accelerator.device)
        collectives.all_reduce_max_(total)
        count = int(total.item())
    return local_bad if count else None


def _refuse_nonfinite(path: str, bad: list[str], parts: CheckpointParts) -> None:
    if not parts.accelerator.is_main_process:
        return
    state = parts.state
    where = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "") if bad else "the weights of another rank"
    kept = "is kept" if exists(path) else "does not exist (nothing was replaced)"
    message = (
        f"accel_trainer: NOT writing checkpoint {path} at epoch {state.current_epoch}, global_step {state.global_step}: "
        f"the model's weights are not finite (NaN or inf in {where}). The previous checkpoint at that path {kept}. "
        "The run has diverged: lower the learning rate, clip gradients (gradient_clip_val), or pass "
        "Trainer(on_nonfinite_loss='skip'), then resume from the last good checkpoint."
    )
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:  # a closed stderr (the launcher is gone) must not turn this into a crash
        pass
    warnings.warn(message, UserWarning, stacklevel=3)


def _agreed_staging_directory(path: str, accelerator: Any) -> str:
    """A fresh directory beside ``path``, the same on every rank (created by the main process)."""
    head, tail = os.path.split(os.path.abspath(path))
    name = [os.path.join(head, f".tmp-{tail}-{uuid.uuid4().hex[:12]}")]
    if accelerator.is_main_process:
        os.makedirs(name[0])
    if accelerator.num_processes > 1:
        collectives.broadcast_objects(name, from_process=0)
    return name[0]


def _trainer_state(parts: CheckpointParts) -> dict[str, Any]:
    """Everything but the model/optimizer tensors (the same for every engine; a collective)."""
    accelerator, state, loader = parts.accelerator, parts.state, parts.train_loader
    at_boundary = state.batches_done_in_epoch == 0
    epoch_start = capture_epoch_start(loader) if at_boundary or parts.epoch_start is None else parts.epoch_start
    per_rank = {"rng": capture_rng_state(), "epoch_start": epoch_start}
    rank_states = collectives.gather_objects([per_rank]) if accelerator.num_processes > 1 else [per_rank]
    checkpoint: dict[str, Any] = {
        "format": FORMAT,
        "engine": parts.engine.label,
        "lr_schedulers": [s.state_dict() for s in parts.schedulers],
        "loops": state.state_dict(),
        "world_size": accelerator.num_processes,
        "global_batch_size": _global_batch_size(loader),
        "rank_states": rank_states,
        "callbacks": {cb.state_key: plain(cb.state_dict()) for cb in parts.callbacks},
        "callback_metrics": {k: float(v) for k, v in parts.callback_metrics.items()},
        "hparams": plain(dict(getattr(parts.module, "hparams", {}) or {})),
        # what the checkpoint was taken of, compared before a resume restores anything
        "optimizer_specs": compatibility.optimizer_specs(parts.module, parts.optimizers),
        "scheduler_specs": compatibility.scheduler_specs(parts.schedulers),
    }
    if parts.run is not None:
        checkpoint["run"] = plain(parts.run)
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        checkpoint["scaler"] = scaler.state_dict()
    return checkpoint


def read(path: str, accelerator: Any = None) -> Any:
    """The checkpoint at ``path`` (either layout) as a :class:`~accel_trainer.engines.PayloadSource`, verified.

    The state (the file, or a sharded checkpoint's state file) is checked against its
    recorded checksums, and so is every payload file of a sharded checkpoint: by this process
    alone, or -- when every rank of ``accelerator`` calls this (a collective) -- shared out
    over the ranks, every rank then raising the same error.

    Raises:
        CheckpointError: naming the file that is missing, unreadable or damaged.
    """
    from .engines import PayloadSource

    if os.path.isdir(path):
        state_file = os.path.join(path, STATE_FILE)
        if not os.path.isfile(state_file):
            raise CheckpointError(
                f"{path!r} is a directory but not an accel_trainer checkpoint: a sharded checkpoint holds "
                f"{STATE_FILE} and {SHARDS_DIR}/ (this one has {sorted(os.listdir(path))[:10]})."
            )
        checkpoint = load_checkpoint_file(state_file)
        if "sharded" not in checkpoint:
            raise CheckpointError(f"{state_file!r} has no description of its shards: the checkpoint is incomplete.")
        _verify_payload_files(path, checkpoint, accelerator)
        payload = os.path.basename(str(checkpoint["sharded"].get("payload_dir", SHARDS_DIR)))
        return PayloadSource(path, checkpoint, shards=os.path.join(path, payload))
    return PayloadSource(path, load_checkpoint_file(path))


def _verify_payload_files(path: str, checkpoint: dict[str, Any], accelerator: Any) -> None:
    files = (checkpoint.get(integrity.KEY) or {}).get("files") or {}
    if not files:
        return  # written before payload checksums existed
    names = sorted(files)
    world = accelerator.num_processes if accelerator is not None else 1
    if world == 1:
        integrity.raise_for_files(path, integrity.verify_files(path, files))
        return
    rank = accelerator.process_index
    mine = integrity.verify_files(path, files, [n for i, n in enumerate(names) if i % world == rank])
    problems = [p for part in collectives.gather_objects([mine]) for p in part]
    integrity.raise_for_files(path, problems)


# What fit()'s resume compares, kept importable from here.
saved_shapes = compatibility.saved_shapes


def restore(
    path: str,
    parts: CheckpointParts,
    on_load: Callable[[dict[str, Any]], None] | None = None,
    implicit: bool = False,
) -> dict[str, Any] | None:
    """Load ``path`` (either layout, written by any engine) into ``parts`` (every rank calls this).

    Nothing is restored before the checkpoint is verified (:mod:`accel_trainer.integrity`)
    and found to fit the run (:func:`accel_trainer.compatibility.check_fits`; with
    ``parts.run``, also :func:`~accel_trainer.compatibility.compare_runs`, strictly when
    ``implicit``, i.e. resuming ``ckpt_path="last"``).

    Returns what a mid-epoch resume still needs (the RNG at the save and at the epoch's
    start), or None when the checkpoint was taken at an epoch boundary.
    """
    accelerator, state, loader = parts.accelerator, parts.state, parts.train_loader
    source = read(path, accelerator)
    checkpoint = source.checkpoint
    compatibility.check_fits(
        checkpoint,
        path,
        module_name=type(parts.module).__name__,
        shapes=parts.engine.state_shapes(parts.module, parts.wrapper),
        optimizers=compatibility.optimizer_specs(parts.module, parts.optimizers),
        schedulers=compatibility.scheduler_specs(parts.schedulers),
    )
    for message in compatibility.compare_runs(checkpoint.get("run"), parts.run, path, implicit):
        if accelerator.is_main_process:
            warnings.warn(message, UserWarning, stacklevel=3)
    parts.engine.restore_payload(source, parts.module, parts.wrapper, parts.optimizers)
    for scheduler, sched_state in zip(parts.schedulers, checkpoint["lr_schedulers"]):
        scheduler.load_state_dict(sched_state)
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    state.load_state_dict(checkpoint["loops"])
    saved_world = int(checkpoint.get("world_size", 1))
    saved_batch, batch = checkpoint.get("global_batch_size"), _global_batch_size(loader)
    if state.batches_done_in_epoch and saved_batch and batch and saved_batch != batch:
        # The position is counted in batches: carry it over as samples seen this epoch.
        state.batches_done_in_epoch = state.batches_done_in_epoch * saved_batch // batch
    for cb in parts.callbacks:
        if cb.state_key in checkpoint["callbacks"]:
            cb.load_state_dict(checkpoint["callbacks"][cb.state_key])
    for name, value in checkpoint.get("callback_metrics", {}).items():
        parts.callback_metrics.setdefault(name, torch.tensor(value))
    rank_states = checkpoint["rank_states"]
    mine = rank_states[accelerator.process_index] if saved_world == accelerator.num_processes else rank_states[0]
    if state.batches_done_in_epoch == 0:
        restore_epoch_start(loader, mine["epoch_start"])  # the next epoch starts exactly as it would have
    restore_rng_state(mine["rng"])
    if on_load is not None:
        on_load(checkpoint)
    if state.batches_done_in_epoch == 0:
        return None
    return {"rng": mine["rng"], "epoch_start": mine["epoch_start"]}


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """The module's full state dict from a checkpoint of either layout (for evaluation and export).

    A sharded checkpoint is reassembled in this process's memory, so call it on one process.
    """
    from .sharded_state import PREFIX, read_full_state

    source = read(path)
    if source.shards is None:
        return source.checkpoint["state_dict"]
    if source.checkpoint["sharded"].get("engine") == "DeepSpeed":
        from .engines.deepspeed import consolidated_weights

        model = consolidated_weights(source.shards)
    else:
        model = read_full_state(source.shards, prefixes=["model."])["model"]
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in model.items()}

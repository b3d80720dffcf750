"""Every cross-rank collective accel_trainer starts: the one list of where ranks must meet.

A collective returns only when every rank of the process group has called it, in the same
order; a rank that skips one (an ``if`` on rank-local data, an exception, an early return)
leaves the others waiting until ``collective_timeout`` (or forever). So each function's
docstring says which callers reach it and why every rank does; a new collective belongs here,
with the same note (tests/test_collectives.py fails on one started anywhere else).

All functions are no-ops, or return their input, on one process (no process group), so callers
need no guard of their own. They look ``torch.distributed``'s functions up on each call (tests
count collectives by replacing them).

Where ranks meet (per training step, nothing: DDP's gradient all-reduce is torch's own):

* every ``check_rank_sync_every_n_steps`` steps and at each epoch end: :func:`check_rank_sync`;
* about every 0.5 s of training: the preemption poll (:func:`all_reduce_max_`, preemption.py);
* ``should_stop`` at logging boundaries, after validation and at epoch ends: :func:`any_rank`, :func:`any_rank_each`;
* epoch-end metrics: one :func:`all_reduce_` per reduce op (metrics.py);
* evaluation start: the batch-count agreement and filler template (lockstep.py);
* a non-finite check under a sharded engine with ``"skip"``: :func:`all_reduce_max_` (nonfinite.py);
* checkpoint save/restore and run-directory set-up: :func:`barrier`, :func:`gather_objects`,
  :func:`broadcast_objects`; FSDP's carried gradients and CPU state sync (engines/fsdp.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .trainer import Trainer


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _op(name: str) -> Any:
    import torch.distributed as dist

    return {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[name]


# -- flags -----------------------------------------------------------------------------------------
def any_rank_each(accelerator: Any, *flags: bool) -> list[bool]:
    """For each flag, whether any rank has it set (one collective for all of them).

    Every rank must call this with the same number of flags. Callers: ``Trainer._any_rank_each``
    at the epoch end (stop and preemption flags), which every rank reaches after the same
    number of batches (the loaders are evenly sharded), never under a rank-local condition.
    """
    if accelerator.num_processes == 1:
        return [bool(f) for f in flags]
    tensor = torch.tensor([float(f) for f in flags], device=accelerator.device)
    return [v > 0 for v in accelerator.reduce(tensor, "sum").tolist()]


def any_rank(accelerator: Any, flag: bool) -> bool:
    """Whether any rank has ``flag`` set (one collective).

    Every rank must call this. Callers: ``Trainer._any_rank`` (``should_stop`` at a logging
    boundary, decided from ``global_step``, equal on every rank; after a validation run and an
    interrupted evaluation, which every rank runs in lock-step).
    """
    if accelerator.num_processes == 1:
        return flag
    tensor = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(tensor, "sum").item() > 0)


def any_process(flag: bool) -> bool:
    """Whether any process of the default group has ``flag`` set (one all-reduce, on CPU tensors).

    For code that has no ``Accelerator`` at hand. Every rank must call this. Callers:
    engines/fsdp.py saving FSDP1's carried gradients, which every rank does as part of a
    checkpoint save (itself reached by every rank).
    """
    if not _initialized():
        return flag
    value = torch.tensor([float(flag)])
    all_reduce_max_(value)
    return bool(value.item() > 0)


# -- tensors -----------------------------------------------------------------------------------------
def all_reduce_(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """``tensor`` reduced in place over ranks with ``op`` ("sum", "max" or "min"), and returned.

    Every rank must call this with a tensor of the same shape and the same ``op``. Callers:
    metrics.py at the end of an epoch (every rank holds the same logged names: ``self.log``
    runs in the same steps everywhere) and the callers of :func:`all_reduce_max_`.
    """
    if _initialized():
        import torch.distributed as dist

        dist.all_reduce(tensor, op=_op(op))
    return tensor


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` replaced in place by its element-wise maximum over ranks.

    Every rank must call this with a tensor of the same shape. Callers: preemption.py's poll
    (every rank polls at the same ``global_step``, agreed in the previous poll); lockstep.py at
    the start of every evaluation (every rank starts it); nonfinite.py's check under a sharded
    engine with ``on_nonfinite_loss="skip"`` (on every boundary, which every rank reaches).
    """
    return all_reduce_(tensor, "max")


def gather(accelerator: Any, tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dimension 0, in rank order (``accelerator.gather``).

    Every rank must call this with tensors of the same shape (but for dimension 0's sizes, which
    must agree too). Callers: distributed.py's rank-sync check (see :func:`check_rank_sync`).
    """
    return accelerator.gather(tensor)


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``tensor`` overwritten in place by rank ``src``'s.

    Every rank must call this for the same tensors in the same order. Callers: engines/fsdp.py
    before wrapping a model (every rank prepares the same model).
    """
    if _initialized():
        import torch.distributed as dist

        dist.broadcast(tensor, src=src)
    return tensor


# -- Python objects -----------------------------------------------------------------------------------
def gather_objects(items: list) -> list:
    """Everything every rank passed in, in rank order (one object collective).

    Every rank must call this. Callers: ``Trainer._gather_from_ranks`` (checkpoint and run
    records, called by every rank at the same point), checkpoint.py.
    """
    from accelerate.utils import gather_object

    return gather_object(list(items))


def broadcast_objects(holder: list, from_process: int = 0) -> list:
    """``holder``'s items replaced by rank ``from_process``'s, in place (one object broadcast), and returned.

    Every rank must call this with a list of the same length. Callers: lockstep.py's filler
    template (every rank, when some rank has no batch), checkpoint.py.
    """
    from accelerate.utils import broadcast_object_list

    broadcast_object_list(holder, from_process=from_process)
    return holder


def barrier(accelerator: Any) -> None:
    """Wait until every rank is here (``accelerator.wait_for_everyone``).

    Every rank must call this. Callers: checkpoint writing and restoring, run-directory set-up
    and clean-up, which every rank runs.
    """
    accelerator.wait_for_everyone()


# -- whole checks ---------------------------------------------------------------------------------------
def check_rank_sync(trainer: Trainer) -> None:
    """Compare counters and learning rates across ranks (no-op on one process): two gathers.

    Every rank must call this. Callers: ``Trainer._check_rank_sync`` at every
    ``check_rank_sync_every_n_steps``-th boundary and at each epoch end, both reached by
    every rank at the same step.
    """
    if trainer.accelerator.num_processes == 1:
        return
    from .distributed import assert_ranks_in_sync

    assert_ranks_in_sync(trainer)


def mean_over_ranks(accelerator: Any, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s mean over ranks (``accelerator.reduce(..., "mean")``).

    Every rank must call this. Meant for the closure's loss under a closure-requiring
    optimizer (every rank evaluates the closure in the same step).
    """
    return accelerator.reduce(tensor, "mean")


__all__ = [
    "all_reduce_",
    "all_reduce_max_",
    "any_process",
    "any_rank",
    "any_rank_each",
    "barrier",
    "broadcast_",
    "broadcast_objects",
    "check_rank_sync",
    "gather",
    "gather_objects",
    "mean_over_ranks",
]

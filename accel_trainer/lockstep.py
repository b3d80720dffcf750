"""Keep every rank's forward passes in step when the engine's forward is itself a collective.

Under DDP an evaluation forward pass is local: a rank with fewer validation batches (the
shards of an uneven validation set differ by one batch) simply finishes first. Under FSDP
every forward all-gathers each sharded block's parameters from all ranks, so the ranks
must run the same number of forward passes or the collectives mismatch (gloo aborts,
NCCL hangs). Padding the shorter shards with repeated samples, as Lightning's and
Accelerate's samplers do, would count those samples twice in the metrics.

So validation keeps its real, unpadded shards (the metrics are exactly DDP's), the ranks
agree once per loader on the largest batch count, and a rank that has run out takes the
missing passes as *fillers*: ``validation_step`` on an empty batch (its first batch sliced to
zero samples), with everything it logs discarded and no batch hooks called. Zero samples
contribute nothing to a torchmetrics metric either.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch


def empty_like(batch: Any) -> Any:
    """``batch`` with every tensor sliced to zero samples along its first dimension."""
    if isinstance(batch, torch.Tensor):
        return batch[:0] if batch.dim() else batch
    if isinstance(batch, dict):
        return type(batch)((k, empty_like(v)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(empty_like(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(empty_like(v) for v in batch)
    return batch


def agree_on_batch_counts(counts: list[int], accelerator: Any) -> tuple[list[int], int | None]:
    """Per loader the largest batch count over ranks, and a rank that has a batch of every loader.

    One all-reduce (every rank calls this at the start of an evaluation). The second value
    is the lowest rank whose every loader has at least one batch, or None when every rank
    does (then each rank slices its own first batch for its fillers).
    """
    from .collectives import all_reduce_max_

    rank, world = accelerator.process_index, accelerator.num_processes
    has_all = all(c > 0 for c in counts)
    values = torch.tensor([float(c) for c in counts] + [float(world - rank if has_all else 0), float(0 if has_all else 1)])
    all_reduce_max_(values)
    targets = [int(v) for v in values[: len(counts)].tolist()]
    someone_empty = values[-1].item() > 0
    source = world - int(values[-2].item()) if someone_empty else None
    return targets, source


def share_template(batch: Any, source: int, accelerator: Any) -> Any:
    """The empty filler batch of rank ``source`` on every rank (for ranks without any batch)."""
    from .collectives import broadcast_objects

    holder = [empty_like(batch) if accelerator.process_index == source else None]
    return broadcast_objects(holder, from_process=source)[0]


def run_fillers(forward: Any, step_name: str, template: Any, first_index: int, count: int, extra: tuple, metrics: Any, stop: Any = None) -> bool:
    """``count`` filler passes of ``step_name`` on the empty ``template`` (logging discarded).

    ``stop`` (a collective, called before each pass on every rank) ends them early: returns
    True when it did.
    """
    if count <= 0:
        return False
    empty = empty_like(template)
    metrics.discarding = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # losses of empty batches warn (mean of nothing)
            for k in range(count):
                if stop is not None and stop():
                    return True
                forward(step_name, empty, first_index + k, *extra)
    finally:
        metrics.discarding = False
    return False

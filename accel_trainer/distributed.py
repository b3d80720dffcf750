"""Cross-rank consistency checks.

A rank whose counters or learning rates drift from the others trains a different model
while DDP keeps averaging gradients as if nothing happened, or hangs in the next collective.
Comparing a small fingerprint at a known point turns that into an immediate, named error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .collectives import gather
from .errors import RankDesyncError
from .optim import unwrap_optimizer

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import Trainer


def fingerprint(trainer: Trainer) -> tuple[list[str], torch.Tensor]:
    """Names and values of everything that must agree across ranks."""
    names = ["global_step", "current_epoch"]
    values = [float(trainer.global_step), float(trainer.current_epoch)]
    for i, steps in enumerate(trainer.optimizer_steps):
        names.append(f"optimizer_steps[{i}]")
        values.append(float(steps))
    for i, opt in enumerate(trainer.optimizers):
        for g, group in enumerate(unwrap_optimizer(opt).param_groups):
            names.append(f"lr of optimizer {i} param group {g}")
            values.append(float(group["lr"]))
    return names, torch.tensor(values, dtype=torch.float64)


def assert_ranks_in_sync(trainer: Trainer) -> None:
    """Raise :class:`RankDesyncError` naming every value that differs between ranks."""
    accelerator = trainer.accelerator
    names, values = fingerprint(trainer)
    # The fingerprint's length itself must agree before the values can be gathered.
    length = torch.tensor([float(len(values))], dtype=torch.float64, device=accelerator.device)
    lengths = gather(accelerator, length).cpu()
    if not torch.all(lengths == lengths[0]):
        raise RankDesyncError(
            f"Ranks disagree on the number of optimizers/param groups: {lengths.tolist()} values per rank."
        )
    gathered = gather(accelerator, values.to(accelerator.device)).cpu().view(accelerator.num_processes, -1)
    differing = []
    for j, name in enumerate(names):
        column = gathered[:, j]
        if not torch.all(column == column[0]):
            per_rank = ", ".join(f"rank {r}: {v:g}" for r, v in enumerate(column.tolist()))
            differing.append(f"{name} ({per_rank})")
    if differing:
        raise RankDesyncError(
            "Ranks have diverged at global_step "
            f"{trainer.global_step}: " + "; ".join(differing) + ". Every rank must take the same optimizer steps "
            "(an optimizer_step override must decide from values that are equal on all ranks, such as batch_nb, "
            "global_step or trainer.optimizer_steps, never from rank-local data)."
        )

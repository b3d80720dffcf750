"""The loop's rules as pure functions of its counters.

The trainer's loop and the learning-rate preview (:mod:`accel_trainer.lr_schedule`) both
follow these rules; writing them once keeps the preview from drifting away from the loop:

* which batches are accumulation boundaries (where ``global_step`` advances and the
  optimizers may step);
* which optimizers are due at a global step (optimizer-dict ``frequency``, Lightning 1.x);
* each optimizer's declarative warm-up length;
* every how many batches validation runs inside an epoch.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import Any


def is_accumulation_boundary(batch_idx: int, accumulate: int, batches_in_epoch: int | None) -> bool:
    """Whether batch ``batch_idx`` (0-based in its epoch) ends an accumulation window.

    Every ``accumulate``-th batch does, and so does the epoch's last batch (a partial window
    still steps), as in Lightning.
    """
    return (batch_idx + 1) % accumulate == 0 or (batches_in_epoch is not None and batch_idx + 1 >= batches_in_epoch)


class OptimizerCycle:
    """Which optimizers are due at each global step.

    Args:
        num_optimizers: how many optimizers there are.
        frequencies: optimizer-dict ``frequency`` values (optimizer ``i`` is used for
            ``frequencies[i]`` consecutive global steps, then the next one), or None: every
            optimizer at every step.

    Example:
        >>> [OptimizerCycle(2, [2, 1]).due(s) for s in range(4)]
        [(0,), (0,), (1,), (0,)]
    """

    def __init__(self, num_optimizers: int, frequencies: Sequence[int] | None = None) -> None:
        self.all = tuple(range(num_optimizers))
        self._cumsum = list(itertools.accumulate(frequencies)) if frequencies else None

    def due(self, global_step: int) -> tuple[int, ...]:
        if self._cumsum is None:
            return self.all
        return (bisect.bisect_right(self._cumsum, global_step % self._cumsum[-1]),)


def warmup_per_optimizer(schedulers: Sequence[Any], num_optimizers: int) -> list[int | None]:
    """Per optimizer, the ``warmup_steps`` a scheduler dict gives it (None: no warm-up)."""
    warmup: list[int | None] = [None] * num_optimizers
    for cfg in schedulers:
        if cfg.warmup_steps:
            warmup[cfg.opt_idx] = cfg.warmup_steps
    return warmup


def validation_interval(val_check_interval: int | float, batches_in_epoch: int | None) -> int | None:
    """Every how many batches validation runs inside an epoch (None: only at its end).

    A float is a fraction of the epoch (1.0: at its end only); an int a number of batches.
    """
    if isinstance(val_check_interval, float):
        if val_check_interval >= 1.0 or batches_in_epoch is None:
            return None
        return max(1, int(batches_in_epoch * val_check_interval))
    return int(val_check_interval)

"""plan.py: the loop's rules as pure functions (shared by the trainer and the LR-schedule preview)."""

from __future__ import annotations

import types

import pytest

from accel_trainer.plan import OptimizerCycle, is_accumulation_boundary, validation_interval, warmup_per_optimizer


def test_accumulation_boundaries_include_the_epochs_last_partial_window():
    assert [b for b in range(7) if is_accumulation_boundary(b, 3, 7)] == [2, 5, 6]
    assert [b for b in range(7) if is_accumulation_boundary(b, 1, 7)] == list(range(7))
    assert [b for b in range(7) if is_accumulation_boundary(b, 3, None)] == [2, 5]  # an endless epoch


def test_the_optimizer_cycle_follows_frequencies_over_global_steps():
    cycle = OptimizerCycle(3, [2, 1, 3])
    assert [cycle.due(s)[0] for s in range(12)] == [0, 0, 1, 2, 2, 2, 0, 0, 1, 2, 2, 2]
    assert OptimizerCycle(2).due(5) == (0, 1)  # no frequencies: every optimizer at every step


def test_warmup_lengths_per_optimizer():
    cfgs = [types.SimpleNamespace(opt_idx=1, warmup_steps=4), types.SimpleNamespace(opt_idx=0, warmup_steps=None)]
    assert warmup_per_optimizer(cfgs, 3) == [None, 4, None]


@pytest.mark.parametrize(
    "interval, batches, expected", [(1.0, 10, None), (0.5, 10, 5), (0.25, 10, 2), (0.01, 10, 1), (0.5, None, None), (3, 10, 3)]
)
def test_validation_interval(interval, batches, expected):
    assert validation_interval(interval, batches) == expected

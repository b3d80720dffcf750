"""accel_trainer/collectives.py is the one place that starts a cross-rank collective.

A collective started anywhere else would be one nobody lists, and a rank skipping it deadlocks
the others; the scan below fails on any new one. The functions themselves are checked on one
process (they must be no-ops there) and on two gloo ranks.
"""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

from accel_trainer import collectives

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "accel_trainer"

# torch.distributed / Accelerate functions that make every rank meet
COLLECTIVE_FUNCTIONS = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all", "all_to_all_single",
    "broadcast", "broadcast_object_list", "barrier", "monitored_barrier", "gather_object", "scatter",
    "scatter_object_list", "reduce_scatter", "reduce_scatter_tensor", "wait_for_everyone", "gather_for_metrics",
    "reduce_op",
}  # fmt: skip
# Accelerator methods whose names are too common to flag on any receiver (torch.gather, functools.reduce)
ACCELERATOR_METHODS = {"reduce", "gather", "pad_across_processes"}

ALLOWED = {"collectives.py"}
# Files whose collectives are not routed yet, with exact counts (none left; kept for a future move)
PENDING: dict[str, int] = {}


def _receiver(node: ast.expr) -> str:
    return ast.unparse(node).lower()


def collective_calls(path: pathlib.Path) -> list[str]:
    """``line: call`` for every collective started in ``path`` (calls and the imports of Accelerate's helpers)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute):
                if _receiver(func.value) == "collectives":
                    continue  # the way to start one
                if func.attr in COLLECTIVE_FUNCTIONS or (func.attr in ACCELERATOR_METHODS and "accelerator" in _receiver(func.value)):
                    found.append(f"{node.lineno}: {ast.unparse(func)}")
            elif isinstance(func, ast.Name) and func.id in COLLECTIVE_FUNCTIONS:
                found.append(f"{node.lineno}: {func.id}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("torch.distributed", "accelerate")):
            for alias in node.names:
                if alias.name in COLLECTIVE_FUNCTIONS:
                    found.append(f"{node.lineno}: import {alias.name}")
    return found


def test_the_scan_sees_each_kind_of_collective(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import torch.distributed as dist\n"
        "from accelerate.utils import gather_object\n"
        "dist.all_reduce(t)\n"
        "self.accelerator.reduce(t, 'sum')\n"
        "trainer.accelerator.wait_for_everyone()\n"
        "gather_object([1])\n"
        "torch.gather(t, 0, i)\n"  # not a collective
        "functools.reduce(f, xs)\n"  # not a collective
    )
    assert [line.split(":")[0] for line in collective_calls(sample)] == ["2", "3", "4", "5", "6"]


def test_no_collective_outside_collectives_py():
    stray, counts = {}, {}
    for path in sorted(PACKAGE.rglob("*.py")):
        calls = collective_calls(path)
        if not calls or path.name in ALLOWED:
            continue
        rel = str(path.relative_to(PACKAGE))
        if rel in PENDING:
            counts[rel] = len(calls)
        else:
            stray[rel] = calls
    assert not stray, (
        f"collectives started outside accel_trainer/collectives.py: {stray}. Add a function there (its docstring says "
        "which callers reach it and why every rank does) and call that."
    )
    assert counts == {k: v for k, v in PENDING.items() if k in counts}, f"collectives in files pending routing: {counts}"


def test_collectives_py_names_its_callers():
    for name in collectives.__all__:
        doc = getattr(collectives, name).__doc__ or ""
        assert "Every rank must call this" in doc and ("Callers" in doc or "Meant for" in doc), name


# -- one process: no process group, nothing to wait for ---------------------------------------------


class _OneProcess:
    num_processes = 1
    device = torch.device("cpu")

    def gather(self, tensor):
        return tensor

    def wait_for_everyone(self):
        self.waited = True


def test_on_one_process_the_collectives_return_their_input():
    acc = _OneProcess()
    assert collectives.any_rank_each(acc, True, False, 0) == [True, False, False]
    assert collectives.any_rank(acc, True) is True
    assert collectives.any_process(False) is False
    t = torch.tensor([1.0, -2.0])
    assert collectives.all_reduce_(t, "sum") is t and t.tolist() == [1.0, -2.0]
    assert collectives.all_reduce_max_(t) is t and t.tolist() == [1.0, -2.0]
    assert collectives.broadcast_(t) is t
    assert collectives.gather(acc, t) is t
    assert collectives.gather_objects([3, 4]) == [3, 4]
    assert collectives.broadcast_objects(["x"]) == ["x"]
    collectives.barrier(acc)
    assert acc.waited


# -- two gloo ranks ---------------------------------------------------------------------------------------


def _every_collective_on_two_ranks() -> None:
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    rank = acc.process_index
    assert collectives.any_rank_each(acc, rank == 1, False) == [True, False]
    assert collectives.any_rank(acc, rank == 0) is True
    assert collectives.any_process(rank == 1) is True
    assert collectives.all_reduce_(torch.tensor([float(rank + 1)]), "sum").item() == 3.0
    assert collectives.all_reduce_(torch.tensor([float(rank + 1)]), "min").item() == 1.0
    assert collectives.all_reduce_max_(torch.tensor([float(rank)])).item() == 1.0
    assert collectives.broadcast_(torch.tensor([float(rank + 5)]), src=1).item() == 6.0
    assert collectives.gather(acc, torch.tensor([float(rank)])).tolist() == [0.0, 1.0]
    assert collectives.gather_objects([f"r{rank}"]) == ["r0", "r1"]
    assert collectives.broadcast_objects([rank], from_process=1) == [1]
    assert collectives.mean_over_ranks(acc, torch.tensor([float(rank)])).item() == 0.5
    collectives.barrier(acc)


@pytest.mark.slow
def test_every_collective_on_two_ranks():
    from distributed.launcher import run_on_ranks

    run_on_ranks(_every_collective_on_two_ranks)

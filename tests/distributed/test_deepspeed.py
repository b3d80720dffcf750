"""DeepSpeed ZeRO 1/2/3 on 2 gloo CPU ranks: same results as DDP, exact resume, refusals, export.

Needs the optional extra (``pip install -e ".[deepspeed]"``): skipped without it, except in
CI, where ``ACCEL_TRAINER_REQUIRE_DEEPSPEED=1`` turns a missing DeepSpeed into a failure.
"""

from __future__ import annotations

import os

import pytest
import torch

from . import fsdp_jobs
from .launcher import run_on_ranks
from .test_fsdp import _full, _run  # the same 2-rank job runner (fsdp_jobs covers every engine)

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]

STAGES = ("zero1", "zero2", "zero3")


@pytest.mark.parametrize("stage, case", [("zero1", "f"), ("zero2", "f"), ("zero3", "f"), ("zero2", "a")])
def test_zero_equals_ddp(tmp_path_factory, stage, case):
    """a: AdamW, a step scheduler and clipping; f: warm-up, ReduceLROnPlateau, accumulation and clipping.
    The learning rate of every optimizer step, the counters and the metrics equal the DDP run's."""
    ddp = _full(tmp_path_factory, "ddp", case)
    zero = _full(tmp_path_factory, stage, case)
    assert zero["engine"] == "DeepSpeedEngine" and zero["distributed_type"].endswith("DEEPSPEED")
    diff = fsdp_jobs.assert_equal_runs(ddp, zero, tolerance=1e-6)
    print(f"{case}/{stage} vs DDP, max abs difference: {diff}")
    if case == "f":
        lrs = zero["step_lrs"][0]
        # the warm-up composes with the step scheduler (x0.8 every 3 real steps), per real step
        assert lrs[:5] == pytest.approx([0.02 * 0.8 ** (k // 3) * (k + 1) / 5 for k in range(5)])
        assert zero["lrs"][0][0] < 0.02 * 0.8 ** 5  # the plateau scheduler halved it too


@pytest.mark.parametrize(
    "stage, stop", [("zero1", 9), ("zero2", 9), ("zero3", 9), ("zero2", 6)], ids=["zero1-mid-epoch", "zero2-mid-epoch", "zero3-mid-epoch", "zero2-epoch-end"]
)
def test_resume_under_zero_is_bitwise_exact(tmp_path_factory, tmp_path, stage, stop):
    full = _full(tmp_path_factory, stage, "f")
    first = _run(tmp_path, stage, "f", "split", max_steps=stop)
    assert first["global_step"] == stop
    last = os.path.join(first["root"], "checkpoints", "last.ckpt")
    assert sorted(os.listdir(last)) == ["deepspeed", "trainer_state.pt"]
    files = os.listdir(os.path.join(last, "deepspeed", "checkpoint"))
    assert {f for f in files if "optim_states" in f} == {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    resumed = _run(tmp_path, stage, "f", "split", ckpt_path="last")
    for key in ("global_step", "optimizer_steps", "epoch", "lrs"):
        assert resumed[key] == full[key], key
    for name, value in full["params"].items():
        assert torch.equal(value, resumed["params"][name]), name


def test_a_zero_checkpoint_resumes_only_under_its_stage_and_world_size(tmp_path):
    _run(tmp_path, "zero2", "f", "run", max_steps=3)
    with pytest.raises(Exception, match="ZeRO-2 checkpoint of 2 processes; this run is ZeRO-3"):
        _run(tmp_path, "zero3", "f", "run", ckpt_path="last")
    with pytest.raises(Exception, match="DDP cannot read ZeRO's partitioned optimizer state"):
        _run(tmp_path, "ddp", "f", "run", ckpt_path="last")
    # and the other way round: a DDP file is not a ZeRO checkpoint
    _run(tmp_path, "ddp", "f", "ddp-run", max_steps=3)
    with pytest.raises(Exception, match="a DeepSpeed run resumes only from a DeepSpeed checkpoint"):
        _run(tmp_path, "zero2", "f", "ddp-run", ckpt_path="last")


def test_export_consolidates_a_zero3_checkpoint(tmp_path):
    from safetensors.torch import load_file

    from accel_trainer.export import export

    run = _run(tmp_path, "zero3", "f", "run", max_steps=6)
    path, summary = export(run["root"], str(tmp_path / "weights.safetensors"))
    assert summary["engine"] == "DeepSpeed"
    weights = load_file(path)
    assert set(weights) == set(run["params"])
    for name, value in run["params"].items():
        assert torch.equal(weights[name], value), name


def test_validate_under_zero3_with_uneven_shards(tmp_path):
    run_on_ranks(fsdp_jobs.evaluate_under, args=(str(tmp_path), "zero3"))
    results = torch.load(tmp_path / "evaluate.pt", weights_only=False)
    assert results["engine"] == "DeepSpeedEngine"
    assert results["validate"] == pytest.approx(results["expected"], abs=1e-6)
    assert results["test"] == pytest.approx(results["expected_test"], abs=1e-6)


def test_bf16_under_deepspeed_casts_the_batch_and_trains(tmp_path):
    run = _run(tmp_path, "zero2", "a", "bf16", mixed_precision="bf16", max_epochs=1)
    assert run["global_step"] == 8 and run["optimizer_steps"] == [8]
    assert all(torch.isfinite(v).all() for v in run["params"].values())


def test_several_optimizers_are_refused_before_anything_is_prepared(tmp_path):
    with pytest.raises(Exception, match="DeepSpeed cannot train 2 optimizers"):
        run_on_ranks(fsdp_jobs.run, args=("zero2", "b", str(tmp_path), None, None, {}))
    assert not os.path.exists(tmp_path / "checkpoints")

"""FSDP (1 and 2) on 2 gloo CPU ranks through Accelerate's own prepare: same results as DDP,
exact resume, sharded checkpoints that resume across engines and world sizes, export.

Every job runs on forked ranks (``run_on_ranks``) and records, on rank 0, what is compared
(``fsdp_jobs.py``). Runs shared by several tests are computed once per module.
"""

from __future__ import annotations

import os

import pytest
import torch

from accel_trainer import checkpoint as ckpt_io
from accel_trainer import sharded_state

from . import fsdp_jobs
from .launcher import run_on_ranks

pytestmark = pytest.mark.slow

_CACHE: dict[tuple, dict] = {}


def _run(tmp_root, engine: str, case: str, name: str, ckpt_path=None, num_processes: int = 2, **options) -> dict:
    root = os.path.join(str(tmp_root), name)
    out = root + ".pt"
    run_on_ranks(fsdp_jobs.run, args=(engine, case, root, out, ckpt_path, options), num_processes=num_processes)
    result = torch.load(out, weights_only=False)
    result["root"] = root
    return result


def _full(tmp_path_factory, engine: str, case: str, **options) -> dict:
    """An uninterrupted run, computed once per module and reused by several tests."""
    key = (engine, case, tuple(sorted(options.items())))
    if key not in _CACHE:
        _CACHE[key] = _run(tmp_path_factory.mktemp("full"), engine, case, f"{engine}-{case}", **options)
    return _CACHE[key]


def _assert_bitwise(a: dict, b: dict) -> None:
    for key in ("global_step", "optimizer_steps", "epoch", "lrs"):
        assert a[key] == b[key], f"{key}: {a[key]} vs {b[key]}"
    for name, value in a["params"].items():
        assert torch.equal(value, b["params"][name]), f"{name} differs (max {float((value - b['params'][name]).abs().max()):.3g})"


# -- the engine really is FSDP, and equals DDP ---------------------------------------------------
@pytest.mark.parametrize(
    "case, engine",
    [("a", "fsdp1"), ("a", "fsdp2"), ("b", "fsdp2"), ("c", "fsdp1"), ("c", "fsdp2"), ("d", "fsdp1"), ("e", "fsdp1")],
    ids=[
        "one-optimizer-clip-fsdp1", "one-optimizer-clip-fsdp2", "gan-override-warmup-plateau-fsdp2",
        "accumulation-bf16-fsdp1", "accumulation-bf16-fsdp2", "one-optimizer-override-warmup-fsdp1", "two-optimizers-fsdp1",
    ],
)
def test_fsdp_equals_ddp(tmp_path_factory, case, engine):
    ddp = _full(tmp_path_factory, "ddp", case)
    fsdp = _full(tmp_path_factory, engine, case)
    assert ddp["engine"] == "DDPEngine" and ddp["distributed_type"].endswith("MULTI_CPU")
    assert fsdp["engine"] == "FSDPEngine" and fsdp["distributed_type"].endswith("FSDP")
    if engine == "fsdp2":
        assert set(fsdp["sharded_params"]) == {"DTensor"}, "the model was not sharded"
    diff = fsdp_jobs.assert_equal_runs(ddp, fsdp, tolerance=1e-6)
    print(f"{case}/{engine} vs DDP, max abs difference: {diff}")  # shown with -s; quoted in the README
    assert len(fsdp["step_lrs"][0]) == fsdp["optimizer_steps"][0] > 0


# -- exact resume ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "engine, case, stop",
    [
        ("fsdp2", "b", 14),  # mid-epoch, the discriminator's override kept its gradients un-zeroed
        ("fsdp2", "b", 10),  # exactly at an epoch end
        ("fsdp2", "a", 13),  # mid-epoch, one optimizer with clipping
        ("fsdp1", "d", 9),  # mid-epoch with carried gradients (FSDP1 keeps them per rank)
        ("fsdp1", "a", 16),  # an epoch end
    ],
)
def test_resume_under_fsdp_is_bitwise_exact(tmp_path_factory, tmp_path, engine, case, stop):
    full = _full(tmp_path_factory, engine, case)
    first = _run(tmp_path, engine, case, "split", max_steps=stop)
    assert first["global_step"] == stop
    last = os.path.join(first["root"], "checkpoints", "last.ckpt")
    assert os.path.isdir(last) and sorted(os.listdir(last))[-2:] == [ckpt_io.SHARDS_DIR, ckpt_io.STATE_FILE]
    resumed = _run(tmp_path, engine, case, "split", ckpt_path="last")
    _assert_bitwise(full, resumed)


@pytest.mark.parametrize("first, second", [("fsdp2", "ddp"), ("ddp", "fsdp2"), ("fsdp1", "fsdp2"), ("fsdp2", "fsdp1")])
def test_a_checkpoint_resumes_under_another_engine(tmp_path_factory, tmp_path, first, second):
    case, stop = ("b", 14) if "fsdp1" not in (first, second) else ("a", 13)
    reference = _full(tmp_path_factory, second, case)
    _run(tmp_path, first, case, "split", max_steps=stop)
    resumed = _run(tmp_path, second, case, "split", ckpt_path="last")
    assert resumed["engine"] == ("DDPEngine" if second == "ddp" else "FSDPEngine")
    for key in ("global_step", "optimizer_steps", "epoch", "lrs"):
        assert resumed[key] == reference[key], key
    diff = fsdp_jobs.max_abs_difference(reference, resumed)["params"]
    assert diff <= 1e-6, f"{first} -> {second}: parameters differ by {diff}"


def test_resharding_two_ranks_to_one_and_one_to_two(tmp_path):
    """DCP reshards: the weights restored on another world size equal the saved ones bitwise,
    and the continued run keeps the schedules (counters, learning rates) of an uninterrupted run."""
    stop = 13
    two = _run(tmp_path, "fsdp2", "a", "two", max_steps=stop)
    # 2 -> 1: the sharded directory, loaded by one process without FSDP
    one = _run(tmp_path, "ddp", "a", "two", ckpt_path="last", num_processes=1, max_steps=stop, batch_scale=2)
    assert one["world_size"] == 1
    for name, value in two["params"].items():
        assert torch.equal(value, one["params"][name]), name
    # 1 -> 2: one process's single-file checkpoint, sharded by FSDP on two ranks
    one_more = _run(tmp_path, "ddp", "a", "one", num_processes=1, max_steps=stop + 5, batch_scale=2)
    assert os.path.isfile(os.path.join(one_more["root"], "checkpoints", "last.ckpt"))
    two_again = _run(tmp_path, "fsdp2", "a", "one", ckpt_path="last", max_steps=stop + 5)
    assert two_again["world_size"] == 2 and set(two_again["sharded_params"]) == {"DTensor"}
    for name, value in one_more["params"].items():
        assert torch.equal(value, two_again["params"][name]), name
    # continuing after a reshard: the schedules of an uninterrupted run
    continued = _run(tmp_path, "ddp", "a", "two", ckpt_path="last", num_processes=1, batch_scale=2)
    uninterrupted = _run(tmp_path, "fsdp2", "a", "reference")
    for key in ("global_step", "optimizer_steps", "epoch", "lrs"):
        assert continued[key] == uninterrupted[key], key


def test_validate_and_test_under_fsdp2(tmp_path):
    run_on_ranks(fsdp_jobs.evaluate_under, args=(str(tmp_path), "fsdp2"))
    results = torch.load(tmp_path / "evaluate.pt", weights_only=False)
    assert results["engine"] == "FSDPEngine"
    assert results["validate"] == pytest.approx(results["expected"], abs=1e-6)
    assert results["test"] == pytest.approx(results["expected_test"], abs=1e-6)


# -- sharded checkpoints --------------------------------------------------------------------------
def test_each_rank_writes_only_its_own_shards(tmp_path):
    run_on_ranks(fsdp_jobs.save_big_sharded, args=(str(tmp_path),))
    info = torch.load(tmp_path / "sizes.pt", weights_only=False)
    shards = os.path.join(info["path"], ckpt_io.SHARDS_DIR)
    files = sorted(f for f in os.listdir(shards) if f.endswith(".distcp"))
    assert files == ["__0_0.distcp", "__1_0.distcp"], files
    full = info["full_bytes"]  # parameters + both Adam moments, unsharded
    sizes = [os.path.getsize(os.path.join(shards, f)) for f in files]
    for size in sizes:
        assert 0.4 * full < size < 0.6 * full, (sizes, full)  # each rank: about half, never the whole
    assert os.path.getsize(os.path.join(info["path"], ckpt_io.STATE_FILE)) < 0.01 * full
    assert not any(name.startswith(".tmp-") for name in os.listdir(os.path.dirname(info["path"])))


def test_export_writes_consolidated_safetensors_from_a_sharded_checkpoint(tmp_path):
    from safetensors.torch import load_file

    from accel_trainer.cli import main

    run = _run(tmp_path, "fsdp2", "a", "run", max_steps=13)
    out = tmp_path / "export"
    assert main(["export", run["root"], str(out)]) == 0
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == set(run["params"])
    for name, value in run["params"].items():
        assert torch.equal(weights[name], value), name
    module, *_ = fsdp_jobs.case_setup("a")
    module.load_state_dict(weights)  # loads into the plain module


def test_a_kill_during_a_sharded_save_keeps_the_previous_last(tmp_path):
    fsdp_jobs.kill_during_sharded_save(tmp_path)


def test_a_damaged_shard_is_named_before_anything_is_restored(tmp_path):
    """Issue 15: every payload file's sha256 (what sha256sum prints) is recorded, each hashed by the
    rank that wrote it, and verified on load -- by one process, or shared out over the ranks."""
    import hashlib

    from accel_trainer.errors import CheckpointError

    run = _run(tmp_path, "fsdp2", "a", "run", max_steps=5)
    last = os.path.join(run["root"], "checkpoints", "last.ckpt")
    files = torch.load(os.path.join(last, ckpt_io.STATE_FILE), weights_only=True)["integrity"]["files"]
    assert {"shards/.metadata", "shards/__0_0.distcp", "shards/__1_0.distcp"} <= set(files), files
    for name, digest in files.items():
        with open(os.path.join(last, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, name
    shard = os.path.join(last, "shards", "__1_0.distcp")
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(shard, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp' is corrupt \(sha256"):
        ckpt_io.load_weights(last)  # one process (export, evaluation)
    with pytest.raises(Exception) as err:  # both ranks of a resume refuse, naming the file
        _run(tmp_path, "fsdp2", "a", "run", ckpt_path="last")
    assert "__1_0.distcp' is corrupt" in str(err.value), str(err.value)[-2000:]

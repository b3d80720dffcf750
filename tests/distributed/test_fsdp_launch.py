"""FSDP through the real launcher and the CLI, as a user starts it on a machine without GPUs.

``accelerate launch --use_fsdp`` (or ``--config_file launch/fsdp.yaml``) must train with FSDP --
never plain DDP in FSDP's clothes -- resume by running the same command again, and its
sharded checkpoint must export to safetensors. Two "machines" over loopback must form one
FSDP2 job equal to a single-node one.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest
import torch

from .test_launch import ACCELERATE, REPO, TESTS, _LAUNCH_VARS, _free_port

pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(ACCELERATE_USE_CPU="1", PYTHONPATH=os.pathsep.join([TESTS, REPO]), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _launch(launch_args: list[str], root, *trainer_args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [
        ACCELERATE, "launch", *launch_args, "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        os.path.join(REPO, "launch", "train.py"), "--config", os.path.join(REPO, "configs", "digits_classifier.yaml"),
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *trainer_args,
    ]
    return subprocess.run(command, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"


def test_use_fsdp_trains_fsdp2_resumes_and_exports(tmp_path):
    root = tmp_path / "run"
    flags = ["--use_fsdp", "--fsdp_version", "2"]  # Accelerate's defaults otherwise (cpu_ram_efficient_loading included)
    proc = _launch(flags, root, "--trainer.max_epochs", "2")
    assert proc.returncode == 0, _explain(proc)
    out = proc.stdout + proc.stderr
    assert "with FSDP2 over gloo on CPU" in out, _explain(proc)
    last = root / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / "shards" / "__1_0.distcp").is_file()

    # the same command with more epochs continues the run from its sharded checkpoint
    again = _launch(flags, root, "--trainer.max_epochs", "3")
    assert again.returncode == 0, _explain(again)
    assert "Resuming from" in again.stdout + again.stderr and "global_step 30" in again.stdout + again.stderr, _explain(again)

    export = subprocess.run(
        [os.path.join(os.path.dirname(ACCELERATE), "accel-trainer"), "export", str(root), str(tmp_path / "weights.safetensors")],
        env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert export.returncode == 0, _explain(export)
    assert "a checkpoint written by FSDP at global_step 30" in export.stdout, export.stdout
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "weights.safetensors"))
    assert {k.split(".")[0] for k in weights} >= {"net"}, sorted(weights)


def test_launch_fsdp_yaml_trains_fsdp1_on_cpu(tmp_path):
    """launch/fsdp.yaml (fsdp_version 1, sync_module_states, cpu_ram_efficient_loading) used to crash
    inside Accelerator() on a machine without GPUs; it now trains FSDP1 on the CPU processes."""
    proc = _launch(["--config_file", os.path.join(REPO, "launch", "fsdp.yaml")], tmp_path / "run", "--trainer.max_epochs", "1", "--trainer.cpu", "true")
    assert proc.returncode == 0, _explain(proc)
    assert "with FSDP1 over gloo on CPU" in proc.stdout + proc.stderr, _explain(proc)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt" / "trainer_state.pt").is_file()


# -- two machines over loopback ---------------------------------------------------------------------
SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys
    import torch
    from helpers import loader
    from test_resume import Everything
    from accel_trainer import Trainer
    from accel_trainer.sharded_state import model_state

    root, out, ckpt = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
    trainer = Trainer(max_epochs=2, max_steps=7 if ckpt == "stop" else -1, enable_progress_bar=False, default_root_dir=root, seed=3)
    module = Everything()
    trainer.fit(module, loader(64, batch_size=4, shuffle=True), loader(33, batch_size=5), ckpt_path="last" if ckpt == "resume" else None)
    full = model_state(trainer._wrapped, full=True)  # a collective: the unsharded parameters on every rank
    digest = hashlib.sha256(b"".join(full[k].detach().numpy().tobytes() for k in sorted(full))).hexdigest()
    result = {"rank": trainer.accelerator.process_index, "world_size": trainer.world_size,
              "engine": str(trainer.accelerator.distributed_type), "global_step": trainer.global_step,
              "optimizer_steps": trainer.optimizer_steps,
              "lrs": [[g["lr"] for g in o.param_groups] for o in trainer.optimizers], "params": digest}
    with open(f"{out}-{result['rank']}.json", "w") as f:
        json.dump(result, f)
    """
)

FSDP2 = ["--use_fsdp", "--fsdp_version", "2"]


def _two_nodes(script, root, out, *extra):
    port = _free_port()
    procs = [
        subprocess.Popen(
            [ACCELERATE, "launch", "--config_file", os.path.join(REPO, "launch", "multi_node.yaml"), *FSDP2,
             "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
             "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
             str(script), str(root), str(out), *extra],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-3000:]


def _one_node(script, root, out, *extra):
    command = [ACCELERATE, "launch", *FSDP2, "--num_machines", "1", "--num_processes", "2", "--main_process_port", str(_free_port()),
               "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(root), str(out), *extra]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def _results(out):
    return [json.load(open(f"{out}-{rank}.json")) for rank in (0, 1)]


def test_two_nodes_fsdp2_equal_one_node_write_each_shard_once_and_resume(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    _one_node(script, tmp_path / "single", tmp_path / "single")
    _two_nodes(script, tmp_path / "multi", tmp_path / "multi")
    single, multi = _results(tmp_path / "single"), _results(tmp_path / "multi")
    assert [r["engine"] for r in multi] == ["DistributedType.FSDP"] * 2
    assert [r["world_size"] for r in multi] == [2, 2]
    for s, m in zip(single, multi):
        for key in ("global_step", "optimizer_steps", "lrs", "params"):
            assert s[key] == m[key], key
    checkpoints = tmp_path / "multi" / "checkpoints"
    assert os.listdir(checkpoints) == ["last.ckpt"]  # written once, no stray staging directory
    shards = sorted(os.listdir(checkpoints / "last.ckpt" / "shards"))
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], shards  # each rank's shard, once

    _two_nodes(script, tmp_path / "resumed", tmp_path / "stopped", "stop")
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt" / "trainer_state.pt", weights_only=True)
    assert state["loops"]["global_step"] == 7
    _two_nodes(script, tmp_path / "resumed", tmp_path / "resumed", "resume")
    for m, r in zip(multi, _results(tmp_path / "resumed")):
        for key in ("global_step", "optimizer_steps", "lrs", "params"):
            assert m[key] == r[key], key

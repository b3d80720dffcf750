"""``accelerate launch --config_file launch/<name>.yaml launch/train.py --config configs/<name>.yaml``.

``cpu.yaml`` and ``cpu_ddp.yaml`` run end to end through the real launcher (the GAN config,
a few batches); a probe callback added through the config records, on every rank, the
world size and a checksum of the parameters. The GPU and cluster files cannot run here:
they are checked for the number of processes they declare.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
LAUNCH = os.path.join(REPO, "launch")

PROBE = textwrap.dedent(
    '''
    import hashlib, json, os

    from accel_trainer import Callback


    class RankProbe(Callback):
        """Writes what this rank saw at the end of fit to out_dir/rank-<index>.json."""

        def __init__(self, out_dir: str):
            self.out_dir = out_dir

        def on_fit_end(self, trainer, module):
            digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in module.parameters()))
            result = {"rank": trainer.accelerator.process_index, "world_size": trainer.world_size,
                      "global_step": trainer.global_step, "optimizer_steps": list(trainer.optimizer_steps),
                      "checksum": digest.hexdigest(), "pid": os.getpid()}
            print("RANK_RESULT", json.dumps(result), flush=True)
            with open(os.path.join(self.out_dir, f"rank-{result['rank']}.json"), "w") as fh:
                json.dump(result, fh)
    '''
)

# Variables of an enclosing launch that would confuse the child job.
_LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _launch(tmp_path, launch_config: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    (probe_dir / "rank_probe.py").write_text(PROBE)
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    config = tmp_path / "probe.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "rank_probe.RankProbe", "init_args": {"out_dir": str(out_dir)}},
    ]}}))
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("ACCELERATE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(probe_dir), REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["WANDB_MODE"] = "offline"
    cmd = [
        ACCELERATE, "launch", "--config_file", os.path.join(LAUNCH, launch_config), "launch/train.py",
        "--config", "configs/digits_gan.yaml", "--config", str(config),
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches=8", "--trainer.limit_val_batches=1",
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.enable_progress_bar=false",
        "--module.init_args.learning_rate=0.002",  # the --key=value form `wandb agent` produces
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, timeout=180, capture_output=True, text=True)
    results = [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank-*.json"))]
    return proc, results


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"


@pytest.mark.slow
def test_cpu_yaml_runs_one_process_end_to_end(tmp_path):
    proc, results = _launch(tmp_path, "cpu.yaml")
    assert proc.returncode == 0, _explain(proc)
    assert [(r["rank"], r["world_size"], r["global_step"]) for r in results] == [(0, 1, 8)], _explain(proc)
    run = tmp_path / "run"
    assert (run / "samples" / "epoch_000.png").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["module"]["init_args"]["learning_rate"] == 0.002


@pytest.mark.slow
def test_cpu_ddp_yaml_forms_one_group_of_two_ranks(tmp_path):
    proc, results = _launch(tmp_path, "cpu_ddp.yaml")
    assert proc.returncode == 0, _explain(proc)
    assert sorted(r["rank"] for r in results) == [0, 1], f"{results}\n{_explain(proc)}"
    assert len({r["pid"] for r in results}) == 2
    assert [r["world_size"] for r in results] == [2, 2], results
    # 8 batches per rank and epoch; the GAN's optimizer_step steps G every 2 batches, D every 4
    assert [r["global_step"] for r in results] == [8, 8]
    assert [r["optimizer_steps"] for r in results] == [[4, 2], [4, 2]]
    assert results[0]["checksum"] == results[1]["checksum"], "parameters differ across ranks"
    assert "fit done on 2 process(es)" in proc.stderr, _explain(proc)
    assert (tmp_path / "run" / "samples" / "epoch_000.png").is_file()  # written by rank 0 only
    assert sorted(os.listdir(tmp_path / "run" / "samples")) == ["epoch_000.png"]


@pytest.mark.parametrize(
    "name, distributed_type, processes, machines",
    [
        ("cpu.yaml", "NO", 1, 1),
        ("cpu_ddp.yaml", "MULTI_GPU", 2, 1),  # torchrun starts 2; the Trainer joins them over gloo without GPUs
        ("single_gpu.yaml", "NO", 1, 1),
        ("multi_gpu.yaml", "MULTI_GPU", 4, 1),
        ("multi_node.yaml", "MULTI_GPU", 16, 2),
        ("fsdp.yaml", "FSDP", 4, 1),
    ],
)
def test_launch_files_declare_their_processes(name, distributed_type, processes, machines):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(os.path.join(LAUNCH, name))
    assert str(config.distributed_type).rsplit(".", 1)[-1] == distributed_type
    assert (config.num_processes, config.num_machines) == (processes, machines)


def test_slurm_script_requeues_and_passes_node_rank_and_main_address():
    text = open(os.path.join(LAUNCH, "slurm.sbatch")).read()
    for needle in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@120", "scontrol requeue", "srun ",
                   "accelerate launch", '--machine_rank "$SLURM_NODEID"', "scontrol show hostnames", "launch/train.py"):
        assert needle in text, needle
    assert subprocess.run(["bash", "-n", os.path.join(LAUNCH, "slurm.sbatch")]).returncode == 0

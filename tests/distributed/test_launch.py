"""The real launcher: ``accelerate launch --multi_gpu --num_processes 2`` on a CPU machine.

(a) With ``ACCELERATE_USE_CPU=1`` both processes join one gloo group (world size 2) and end
    with bitwise the same parameters.
(b) Without it, Accelerate alone would give two independent world-size-1 runs, silently.
    accel_trainer must either join the 2-rank group anyway or refuse with an error that says
    to set ``ACCELERATE_USE_CPU``: never two silent world-size-1 runs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.join(REPO, "tests")
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")

SCRIPT = textwrap.dedent(
    '''
    import hashlib, json, os, sys, tempfile

    from helpers import Regressor, loader

    from accel_trainer import Trainer

    out_dir, cpu = sys.argv[1], sys.argv[2] == "cpu"
    kwargs = {"cpu": True} if cpu else {}
    trainer = Trainer(max_epochs=2, enable_progress_bar=False, default_root_dir=tempfile.mkdtemp(), **kwargs)
    module = Regressor()
    trainer.fit(module, loader(64, batch_size=8, shuffle=True))
    checksum = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in module.parameters())).hexdigest()
    rank = trainer.accelerator.process_index
    result = {"rank": rank, "pid": os.getpid(), "world_size": trainer.world_size,
              "global_step": trainer.global_step, "checksum": checksum}
    print("RESULT", json.dumps(result), flush=True)
    with open(os.path.join(out_dir, f"result-{os.getpid()}.json"), "w") as fh:
        json.dump(result, fh)
    '''
)

# Variables of an enclosing launch (none expected under pytest) that would confuse the child job.
_LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, use_cpu_env: bool, trainer_cpu: bool) -> tuple[subprocess.CompletedProcess, list[dict]]:
    script = tmp_path / "train_two_ranks.py"
    script.write_text(SCRIPT)
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("ACCELERATE_")}
    env["PYTHONPATH"] = os.pathsep.join([REPO, TESTS, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if use_cpu_env:
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [
        ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(script), str(out_dir), "cpu" if trainer_cpu else "default",
    ]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), timeout=120, capture_output=True, text=True)
    results = [json.loads(p.read_text()) for p in sorted(out_dir.glob("result-*.json"))]
    return proc, results


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"


@pytest.mark.slow
def test_launch_with_accelerate_use_cpu(tmp_path):
    proc, results = _launch(tmp_path, use_cpu_env=True, trainer_cpu=True)
    assert proc.returncode == 0, _explain(proc)
    assert sorted(r["rank"] for r in results) == [0, 1], f"{results}\n{_explain(proc)}"
    assert [r["world_size"] for r in results] == [2, 2], results
    assert [r["global_step"] for r in results] == [8, 8], results  # 64 samples / (8 x 2 ranks) x 2 epochs
    assert results[0]["checksum"] == results[1]["checksum"], f"parameters differ across ranks: {results}"


@pytest.mark.slow
@pytest.mark.parametrize("trainer_cpu", [False, True], ids=["Trainer()", "Trainer(cpu=True)"])
def test_launch_without_accelerate_use_cpu_never_silently_splits(tmp_path, trainer_cpu):
    proc, results = _launch(tmp_path, use_cpu_env=False, trainer_cpu=trainer_cpu)
    if proc.returncode == 0:
        # it joined: both processes in one group, same result
        assert len(results) == 2 and [r["world_size"] for r in results] == [2, 2], (
            f"exit code 0 but not one 2-rank group (two silent world-size-1 runs?): {results}\n{_explain(proc)}"
        )
        assert sorted(r["rank"] for r in results) == [0, 1], f"{results}\n{_explain(proc)}"
        assert results[0]["checksum"] == results[1]["checksum"], f"parameters differ across ranks: {results}"
    else:
        # it refused: loudly, saying how to launch, and before any process finished training alone
        assert "ACCELERATE_USE_CPU" in proc.stdout + proc.stderr, _explain(proc)
        assert all(r["world_size"] != 1 for r in results), f"a world-size-1 run completed: {results}"

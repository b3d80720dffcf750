"""DeepSpeed through the real launcher and the CLI on a machine without GPUs (needs the extra)."""

from __future__ import annotations

import os
import subprocess

import pytest

from .test_fsdp_launch import _env, _explain
from .test_fsdp_launch import _launch as _launch_train
from .test_launch import ACCELERATE, REPO

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]


def _launch(launch_args: list[str], root, *trainer_args: str) -> subprocess.CompletedProcess:
    """test_fsdp_launch's launch of launch/train.py, with more time: DeepSpeed's start-up is slower."""
    return _launch_train(launch_args, root, *trainer_args, timeout=400)


def test_launch_deepspeed_yaml_trains_zero2_with_the_trainers_clipping_resumes_and_exports(tmp_path):
    root = tmp_path / "run"
    config = ["--config_file", os.path.join(REPO, "launch", "deepspeed.yaml")]
    proc = _launch(config, root, "--trainer.max_epochs", "2", "--trainer.gradient_clip_val", "1.0")
    assert proc.returncode == 0, _explain(proc)
    out = proc.stdout + proc.stderr
    assert "with DeepSpeed ZeRO-2 over gloo on CPU" in out, _explain(proc)
    assert "lr-Adam=" in out  # LearningRateMonitor names the user's optimizer, not DeepSpeed's wrapper
    last = root / "checkpoints" / "last.ckpt"
    assert (last / "trainer_state.pt").is_file() and (last / "deepspeed" / "checkpoint").is_dir()

    again = _launch(config, root, "--trainer.max_epochs", "3", "--trainer.gradient_clip_val", "1.0")
    assert again.returncode == 0, _explain(again)
    assert "global_step 30" in again.stdout + again.stderr, _explain(again)

    export = subprocess.run(
        [os.path.join(os.path.dirname(ACCELERATE), "accel-trainer"), "export", str(root), str(tmp_path / "w.safetensors")],
        env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert export.returncode == 0, _explain(export)
    assert "written by DeepSpeed at global_step 30" in export.stdout, export.stdout


def test_use_deepspeed_zero3_with_trainer_cpu_true(tmp_path):
    proc = _launch(["--use_deepspeed", "--zero_stage", "3"], tmp_path / "run", "--trainer.max_epochs", "1", "--trainer.cpu", "true")
    assert proc.returncode == 0, _explain(proc)
    assert "with DeepSpeed ZeRO-3 over gloo on CPU" in proc.stdout + proc.stderr, _explain(proc)


def test_a_clipping_conflict_between_the_launch_and_the_trainer_is_an_error(tmp_path):
    proc = _launch(
        ["--use_deepspeed", "--zero_stage", "2", "--gradient_clipping", "1.0"], tmp_path / "run",
        "--trainer.max_epochs", "1", "--trainer.gradient_clip_val", "0.5",
    )
    assert proc.returncode != 0
    assert "gradient_clip_val=0.5) conflicts with the DeepSpeed config's gradient_clipping=1.0" in proc.stdout + proc.stderr, _explain(proc)
    assert not (tmp_path / "run" / "checkpoints").exists()

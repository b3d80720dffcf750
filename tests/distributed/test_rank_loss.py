"""Losing a rank under the real launcher: the survivor does not hang, and the failed rank is named."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from .test_launch import ACCELERATE, REPO, TESTS, _LAUNCH_VARS, _free_port

SCRIPT = textwrap.dedent(
    """
    import os, tempfile
    from helpers import Regressor, loader
    from accel_trainer import Callback, Trainer

    class DieOnRank1(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 3 and trainer.accelerator.process_index == 1:
                os._exit(3)   # a crash: no exception, no cleanup

    trainer = Trainer(max_epochs=50, cpu=True, enable_progress_bar=False,
                      default_root_dir=tempfile.mkdtemp(), callbacks=[DieOnRank1()])
    trainer.fit(Regressor(), loader(64, batch_size=8))
    """
)


NAN_ON_RANK_1 = textwrap.dedent(
    """
    import tempfile
    import torch
    from helpers import Regressor, loader
    from accel_trainer import Trainer

    class NaNOnRank1(Regressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if self.trainer.global_step == 3 and self.trainer.accelerator.process_index == 1:
                return loss * float("nan")
            return loss

    trainer = Trainer(max_epochs=50, cpu=True, enable_progress_bar=False, default_root_dir=tempfile.mkdtemp())
    trainer.fit(NaNOnRank1(), loader(64, batch_size=8))
    """
)


def _launch(script_text: str, tmp_path) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "job.py"
    script.write_text(script_text)
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(ACCELERATE_USE_CPU="1", PYTHONPATH=os.pathsep.join([TESTS, REPO]), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    command = [
        ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(script),
    ]
    start = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    return result, time.monotonic() - start


@pytest.mark.slow
def test_a_dead_rank_stops_the_job_and_is_named(tmp_path):
    result, elapsed = _launch(SCRIPT, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert elapsed < 120, f"the job took {elapsed:.0f} s to notice a dead rank"
    assert "rank      : 1" in output or "rank: 1" in output, output[-3000:]


@pytest.mark.slow
def test_a_nonfinite_loss_on_one_rank_ends_the_job_naming_that_rank(tmp_path):
    """on_nonfinite_loss="raise" needs no per-step agreement: the raising rank's exit ends the job."""
    result, elapsed = _launch(NAN_ON_RANK_1, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert elapsed < 120, f"the job took {elapsed:.0f} s to end after rank 1 raised"
    assert "TrainingError" in output and "non-finite loss (nan on rank 1" in output, output[-3000:]

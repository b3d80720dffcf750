"""``launch/slurm.sbatch``'s preempt-then-requeue flow, under the real ``accelerate launch``.

There is no Slurm here, so ``srun`` and ``scontrol`` are stand-ins on ``PATH``: ``srun`` runs
its command as the task of node 0 (``SLURM_NODEID=0``), ``scontrol`` answers ``show
hostnames`` and records ``requeue``. Everything else is the recipe as a cluster runs it:
``bash launch/slurm.sbatch`` starts ``accelerate launch`` (torchrun) with 2 CPU ranks, Slurm's
SIGUSR1 reaches the script, the trap sends SIGTERM to the launcher, the ranks checkpoint and
write run_status.json, torchrun exits 1 (not 75), and the script requeues from the status.
The "requeued" job (the same script again, ``SLURM_RESTART_COUNT=1``) resumes and finishes,
and does not requeue.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from accel_trainer.run_status import read_run_status

from .test_launch import REPO, _LAUNCH_VARS, _free_port

BIN = os.path.dirname(sys.executable)

SRUN = """#!/bin/bash
# stand-in for srun on one node: drop srun's options, run the command as node 0's task
while [[ "$1" == --* ]]; do shift; done
export SLURM_NODEID=0
exec "$@"
"""

SCONTROL = """#!/bin/bash
echo "$@" >> "$SCONTROL_LOG"
if [ "$1" = show ] && [ "$2" = hostnames ]; then echo 127.0.0.1; fi
"""

SLOW_MODULE = textwrap.dedent(
    '''
    import os, time
    from accel_trainer import Callback

    class Slow(Callback):
        """After global step 3, touch SLOW_MARKER and sleep after every batch (when SLOW_MARKER is set)."""

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            marker = os.environ.get("SLOW_MARKER")
            if marker and trainer.global_step >= 3:
                if trainer.is_global_zero:
                    open(marker, "w").close()
                time.sleep(0.1)
    '''
)


def _sbatch(tmp_path, restart_count: int, marker=None) -> subprocess.Popen:
    fake_bin = tmp_path / "bin"
    if not fake_bin.exists():
        fake_bin.mkdir()
        for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
            (fake_bin / name).write_text(text)
            (fake_bin / name).chmod(0o755)
        (tmp_path / "slow_cb.py").write_text(SLOW_MODULE)
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith(("ACCELERATE_", "SLURM_"))}
    env.update(
        PATH=os.pathsep.join([str(fake_bin), BIN, env.get("PATH", "")]),
        PYTHONPATH=os.pathsep.join([REPO, str(tmp_path)]),
        WANDB_MODE="offline", OMP_NUM_THREADS="1", ACCEL_TRAINER_PROGRESS="off",
        SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="1", SLURM_GPUS_ON_NODE="2", SLURM_JOB_NODELIST="node1",
        SLURM_RESTART_COUNT=str(restart_count), MAIN_PROCESS_PORT=str(_free_port()),
        SCONTROL_LOG=str(tmp_path / "scontrol.log"),
    )
    if marker is not None:
        env["SLOW_MARKER"] = str(marker)
    args = [
        "--config", os.path.join(REPO, "configs", "digits_classifier.yaml"),
        "--trainer.max_epochs=3", "--trainer.log_every_n_steps=2", f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.callbacks+=slow_cb.Slow",
    ]
    return subprocess.Popen(
        ["bash", os.path.join(REPO, "launch", "slurm.sbatch"), *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _requeues(tmp_path) -> list[str]:
    log = tmp_path / "scontrol.log"
    return [line for line in log.read_text().splitlines() if line.startswith("requeue")] if log.exists() else []


@pytest.mark.slow
def test_sigusr1_checkpoints_requeues_from_run_status_and_the_requeued_job_finishes(tmp_path):
    marker = tmp_path / "training"
    job = _sbatch(tmp_path, restart_count=0, marker=marker)
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert job.poll() is None, f"the job ended before training:\n{job.stdout.read()}"
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what Slurm sends 120 s before the time limit
    output, _ = job.communicate(timeout=180)

    assert job.returncode == 0, output
    assert "Received 15 death signal" in output  # torchrun got SIGTERM and passed it on (and exits 1)
    assert "run status: preempted" in output, output
    assert _requeues(tmp_path) == ["requeue 4242"], output
    status = read_run_status(tmp_path / "run")
    assert status["status"] == "preempted" and status["signal"] == "SIGTERM" and status["exit_code"] == 75, status
    assert status["world_size"] == 2 and 3 <= status["step"] < 30, status  # 10 steps an epoch on 2 ranks
    assert os.path.isfile(status["checkpoint"]) and status["slurm_job_id"] == "4242"

    # The requeued job: the same script and arguments resume and finish; no second requeue.
    job = _sbatch(tmp_path, restart_count=1)
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output
    assert "run status: finished" in output, output
    assert _requeues(tmp_path) == ["requeue 4242"]
    status = read_run_status(tmp_path / "run")
    assert (status["status"], status["step"], status["epoch"], status["slurm_restart_count"]) == ("finished", 30, 3, 1)
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows if r["train_loss"]]
    assert steps == sorted(set(steps)) and steps[-1] == 30, steps  # each logged step once, in order

"""Issue 15 on 2 ranks: the run-directory lock, non-finite weights and SIGTERM during validation
agreed across ranks (forked ranks), and supervision under the real ``accelerate launch``: a
launcher killed or sent SIGUSR1, and a hung rank bounded by ``collective_timeout``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from accel_trainer import checkpoint as ckpt_io
from accel_trainer.run_dir import RunLock
from accel_trainer.run_status import read_run_status

from . import supervision_jobs
from .launcher import run_on_ranks
from .test_launch import ACCELERATE, REPO, TESTS, _LAUNCH_VARS, _free_port

pytestmark = pytest.mark.slow


def _results(out_dir) -> list[dict]:
    return [json.loads((out_dir / f"result-{r}.json").read_text()) for r in (0, 1)]


# -- forked ranks ------------------------------------------------------------------------------------
def test_a_locked_run_directory_is_refused_on_every_rank(tmp_path):
    root = tmp_path / "run"
    lock = RunLock(root)
    lock.acquire()  # another live run (this process) holds the directory
    try:
        run_on_ranks(supervision_jobs.locked_run, args=(str(root), str(tmp_path)))
    finally:
        lock.release()
    results = _results(tmp_path)
    assert [r["outcome"] for r in results] == ["refused", "refused"], results
    assert all(f"in use by a live run (PID {os.getpid()}" in r["message"] for r in results)
    assert [r["global_step"] for r in results] == [0, 0]


def test_nonfinite_weights_on_one_rank_are_refused_by_both(tmp_path):
    root = tmp_path / "run"
    run_on_ranks(supervision_jobs.nonfinite_on_one_rank, args=(str(root), str(tmp_path)))
    results = _results(tmp_path)
    assert len(results[0]["refused"]) == 1 and results[1]["refused"] == []  # the main process says it, once
    assert "not finite (NaN or inf in the weights of another rank)" in results[0]["refused"][0], results[0]
    assert [r["written_after"] for r in results] == [False, False]
    saved = ckpt_io.load_checkpoint_file(str(root / "checkpoints" / "last.ckpt"))
    assert saved["loops"]["global_step"] == 4  # epoch 0's, kept
    assert not (root / "after.ckpt").exists()


def test_sigterm_in_validation_on_one_rank_stops_both_at_once(tmp_path):
    root = tmp_path / "run"
    run_on_ranks(supervision_jobs.sigterm_in_validation, args=(str(root), str(tmp_path)))
    results = _results(tmp_path)
    assert [r["outcome"] for r in results] == ["preempted", "preempted"], results
    assert results[0]["seen"] == [0, 1], results[0]  # the signalled rank stopped at its next batch (of 16)
    assert [r["global_step"] for r in results] == [8, 8] and [r["code"] for r in results] == [75, 75]
    saved = ckpt_io.load_checkpoint_file(results[0]["checkpoint"])
    assert saved["loops"]["global_step"] == 8 and saved["loops"]["validated_at"] == -1  # the validation runs again
    assert read_run_status(root)["status"] == "preempted"


# -- the real launcher -------------------------------------------------------------------------------
def _launch(tmp_path, *args: str, env_extra: dict | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith(("ACCELERATE_", "PET_"))}
    env.update(
        ACCELERATE_USE_CPU="1", PYTHONPATH=os.pathsep.join([TESTS, REPO]), WANDB_MODE="offline", OMP_NUM_THREADS="1",
        **(env_extra or {}),
    )
    command = [
        ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()), supervision_jobs.__file__, *args,
    ]
    # a session of its own, so that the test can signal the launcher's process group without itself
    return subprocess.Popen(command, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _wait_for(path, proc, timeout=180.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, "the job never reached the marker"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    from accel_trainer.preemption import pid_has_exited

    return not pid_has_exited(pid)


@pytest.mark.parametrize(
    "how",
    ["SIGKILL to the launcher's process group", "SIGUSR1 to the launcher", "SIGUSR1 to a launcher that forwards it"],
)
def test_ranks_stop_and_checkpoint_when_their_launcher_is_killed_or_signalled(tmp_path, how):
    root = tmp_path / "run"
    forwards = "forwards" in how
    env = {"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"} if forwards else None
    job = _launch(tmp_path, "slow", str(root), env_extra=env)
    _wait_for(tmp_path / "training", job)
    _wait_for(tmp_path / "pid-1", job)
    ranks = [int((tmp_path / f"pid-{r}").read_text()) for r in (0, 1)]
    if how.startswith("SIGKILL"):
        os.killpg(job.pid, signal.SIGKILL)  # the ranks are in sessions of their own: only the launcher dies
    else:
        job.send_signal(signal.SIGUSR1)
    killed_at = time.monotonic()
    # the ranks inherited the launcher's stdout: it closes when they have exited
    output, _ = job.communicate(timeout=120)
    elapsed = time.monotonic() - killed_at
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in ranks), f"ranks still running after their launcher went:\n{output[-3000:]}"
    assert elapsed < 60, f"the ranks took {elapsed:.0f} s to stop"

    status = read_run_status(root)
    assert status["status"] == "preempted" and status["exit_code"] == 75, (status, output[-3000:])
    assert 3 <= status["step"] <= 30, status  # stopped within a few steps, not 400 steps later
    if forwards:
        assert status["signal"] == "SIGUSR1" and "Received 10 death signal" in output, (status, output[-3000:])
    else:
        assert status["signal"] is None and status["reason"] == f"the launcher (PID {job.pid}) is gone", status
        assert "the launcher that started this process" in output
    saved = ckpt_io.load_checkpoint_file(str(root / "checkpoints" / "last.ckpt"))
    assert saved["loops"]["global_step"] == status["step"]

    if how.startswith("SIGKILL"):  # the same command resumes and finishes
        final = _launch(tmp_path, "finish", str(root))
        output, _ = final.communicate(timeout=240)
        assert final.returncode == 0, output[-3000:]
        finished = json.loads((tmp_path / "finished.json").read_text())
        assert finished == {"global_step": 48, "epoch": 6}


def test_a_hung_rank_ends_the_job_within_the_collective_timeout(tmp_path):
    """Rank 1 hangs in training_step; rank 0's next collective times out after collective_timeout, and
    torchrun's SIGTERM then ends rank 1 at once (a graceful handler would have held it 30 s)."""
    root = tmp_path / "run"
    job = _launch(tmp_path, "hang", str(root))
    _wait_for(tmp_path / "hanging", job)
    hung_at = time.monotonic()
    output, _ = job.communicate(timeout=180)
    elapsed = time.monotonic() - hung_at
    print(f"a hung rank ended the job {elapsed:.1f} s after it hung (collective_timeout 5 s)")  # shown with -s
    assert job.returncode != 0, output[-3000:]
    bound = supervision_jobs.HANG_TIMEOUT_S
    assert elapsed < bound + 15, f"the job took {elapsed:.0f} s to end after rank 1 hung (timeout {bound} s)\n{output[-3000:]}"
    assert "a collective timed out after collective_timeout=5 s" in output, output[-3000:]
    assert "SIGTERM after rank 0" in output and "Exiting at once, without a checkpoint" in output, output[-3000:]
    assert read_run_status(root)["status"] == "failed"

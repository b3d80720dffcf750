"""Runs that survive faults: preemption signals and a SIGKILL in the middle of a save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from accel_trainer import Trainer
from accel_trainer.checkpoint import load_checkpoint_file
from accel_trainer.preemption import PREEMPTION_EXIT_CODE

from test_resume import Everything, _loaders, _run, _snapshot

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT_DIR = os.path.dirname(TESTS_DIR)

CHILD_PRELUDE = """
import os, sys, time
sys.path[:0] = [{tests!r}, {root!r}]
import torch
from accel_trainer import Callback
from test_resume import _run
"""


def _start(script: str, tmp_path) -> subprocess.Popen:
    path = tmp_path / "child.py"
    path.write_text(CHILD_PRELUDE.format(tests=TESTS_DIR, root=ROOT_DIR) + textwrap.dedent(script))
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)


def _wait_for(path, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"child exited early with {proc.returncode}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("child never reached the marker")
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_checkpoints_exits_75_and_resumes_exactly(tmp_path, sig):
    run_dir = tmp_path / "run"
    marker = tmp_path / "training"
    proc = _start(
        f"""
        class SlowAfterStep5(Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                if trainer.global_step >= 5:
                    open({str(marker)!r}, "w").close()
                    time.sleep(0.1)   # leave the parent time to signal mid-training
        _run({str(run_dir)!r}, max_epochs=4, callbacks=[SlowAfterStep5()])
        """,
        tmp_path,
    )
    _wait_for(marker, proc)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTION_EXIT_CODE, output
    assert "checkpoint written" in output
    saved = load_checkpoint_file(str(run_dir / "checkpoints" / "last.ckpt"))
    stopped_at = saved["loops"]["global_step"]
    assert 5 <= stopped_at < 40, stopped_at  # stopped early, after finishing a step

    resumed_trainer, resumed_module = _run(run_dir, ckpt_path="last", max_epochs=4)
    reference_trainer, reference_module = _run(tmp_path / "reference", max_epochs=4)
    resumed, reference = _snapshot(resumed_trainer, resumed_module), _snapshot(reference_trainer, reference_module)
    assert resumed["global_step"] == reference["global_step"] == 40
    assert resumed["optimizer_steps"] == reference["optimizer_steps"]
    assert resumed["lrs"] == reference["lrs"]
    for name, value in reference["params"].items():
        assert torch.equal(value, resumed["params"][name]), name


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_a_loadable_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    marker = tmp_path / "saving"
    proc = _start(
        f"""
        import accel_trainer.checkpoint as ckpt
        real_save, calls = torch.save, []
        def slow_save(obj, f, *args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                return real_save(obj, f, *args, **kwargs)   # the first epoch's last.ckpt: complete
            f.write(b"partial checkpoint bytes")                 # the second save: killed halfway
            f.flush()
            open({str(marker)!r}, "w").close()
            time.sleep(120)
        ckpt.torch.save = slow_save
        _run({str(run_dir)!r}, max_epochs=4)
        """,
        tmp_path,
    )
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint_file(str(last))  # the previous, complete one
    assert checkpoint["loops"]["current_epoch"] == 1 and checkpoint["loops"]["global_step"] == 10

    trainer, module = _run(run_dir, ckpt_path="last", max_epochs=4)
    reference_trainer, reference_module = _run(tmp_path / "reference", max_epochs=4)
    for name, value in _snapshot(reference_trainer, reference_module)["params"].items():
        assert torch.equal(value, module.state_dict()[name]), name


def test_max_steps_stop_mid_epoch_then_resume_with_more_steps(tmp_path):
    """A max_steps stop is a pause: the same command with a larger max_steps continues."""
    _run(tmp_path, max_steps=7)
    trainer = Trainer(cpu=True, enable_progress_bar=False, default_root_dir=str(tmp_path), seed=7, max_steps=15)
    trainer.fit(Everything(), *_loaders(), ckpt_path="last")
    assert trainer.global_step == 15 and trainer.current_epoch == 1


def test_preemption_poll_interval_follows_the_measured_step_time():
    from accel_trainer.preemption import PreemptionPoll

    poll = PreemptionPoll(period_s=0.5, max_interval=1000)
    assert poll.due(0) and poll.due(7)  # before any poll: poll at once
    assert poll.proposal(3, now=10.0) == 1  # nothing measured yet: poll again next step
    poll._last = (10, 100.0)
    assert poll.proposal(20, now=101.0) == 5  # 0.1 s per step: every 5 steps
    assert poll.proposal(20, now=100.001) == 1000  # 0.1 ms per step: capped
    assert poll.proposal(11, now=130.0) == 1  # a 30 s step: every step
    poll.next_step = 25
    assert not poll.due(24) and poll.due(25)

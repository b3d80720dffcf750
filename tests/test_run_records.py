"""A run directory's records through the real command: Ctrl-C, run_status.json, and commands
that must not touch them (a refused resume, validate, test, a finished run re-run).

The Ctrl-C tests run ``python -m accel_trainer fit`` in a subprocess and send it SIGINT, as
a terminal does; the others call :func:`accel_trainer.cli.main` in-process.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from accel_trainer import cli
from accel_trainer.run_status import read_run_status

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSIFIER = os.path.join(REPO, "configs", "digits_classifier.yaml")

# A callback that, once training passed `after_step`, touches a marker file and then sleeps
# after every batch, so that a signal lands in the middle of training. Inactive unless
# SLOW_MARKER is set, so the resumed and the reference runs go at full speed.
SLOW_MODULE = textwrap.dedent(
    '''
    import os, time
    from accel_trainer import Callback

    class Slow(Callback):
        def __init__(self, after_step: int = 5, seconds: float = 0.05):
            self.after_step, self.seconds = after_step, seconds

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            marker = os.environ.get("SLOW_MARKER")
            if marker and trainer.global_step >= self.after_step:
                open(marker, "w").close()
                time.sleep(self.seconds)
    '''
)


def _config(tmp_path, run: str, seconds: float = 0.05, after_step: int = 25) -> str:
    """A 3-epoch digits classifier (20 steps an epoch) logging every 5 steps, with LR monitor and Slow."""
    text = textwrap.dedent(
        f"""
        trainer:
          max_epochs: 3
          log_every_n_steps: 5
          default_root_dir: {tmp_path / run}
          callbacks:
            - class_path: accel_trainer.callbacks.LearningRateMonitor
            - class_path: slow_cb.Slow
              init_args: {{after_step: {after_step}, seconds: {seconds}}}
        """
    )
    path = tmp_path / f"{run}.yaml"
    path.write_text(text)
    return str(path)


def _start(tmp_path, config: str, marker) -> subprocess.Popen:
    (tmp_path / "slow_cb.py").write_text(SLOW_MODULE)
    env = {**os.environ, "WANDB_MODE": "offline", "SLOW_MARKER": str(marker), "ACCEL_TRAINER_PROGRESS": "lines"}
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.Popen(
        [sys.executable, "-m", "accel_trainer", "fit", "--config", CLASSIFIER, "--config", config],
        cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait_for(path, proc, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"exited early with {proc.returncode}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("never reached the marker")
        time.sleep(0.02)


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _series(rows: list[dict], column: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[column])) for r in rows if r.get(column)]


def _fit_in_process(tmp_path, config: str) -> None:
    (tmp_path / "slow_cb.py").write_text(SLOW_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        assert cli.main(["fit", "--config", CLASSIFIER, "--config", config]) == 0
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("slow_cb", None)


@pytest.mark.slow
def test_first_ctrl_c_checkpoints_exits_130_and_the_resumed_table_equals_an_uninterrupted_one(tmp_path):
    config = _config(tmp_path, "run")
    marker = tmp_path / "training"
    proc = _start(tmp_path, config, marker)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)

    assert proc.returncode == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert "Ctrl-C: finishing the current step, then writing a checkpoint and exiting" in output
    assert "checkpoint written to" in output and "Exiting with code 130" in output
    status = read_run_status(tmp_path / "run")
    assert status["status"] == "preempted" and status["signal"] == "SIGINT" and status["exit_code"] == 130, status
    assert 25 <= status["step"] < 60 and os.path.isfile(status["checkpoint"]), status
    rows_at_interrupt = len(_rows(tmp_path / "run" / "metrics.csv"))

    resumed = subprocess.run(
        [sys.executable, "-m", "accel_trainer", "fit", "--config", CLASSIFIER, "--config", config],
        cwd=str(tmp_path), env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr
    assert read_run_status(tmp_path / "run")["status"] == "finished"

    # No step is logged twice, and the step and validation values are the uninterrupted run's
    # (resuming is exact on the CPU). Two things legitimately differ: LearningRateMonitor logs
    # once more where training restarts, and an epoch aggregate of the interrupted epoch
    # (train_acc) covers only its resumed part.
    _fit_in_process(tmp_path, _config(tmp_path, "reference"))
    reference = _rows(tmp_path / "reference" / "metrics.csv")
    rows = _rows(tmp_path / "run" / "metrics.csv")
    assert len(rows) > rows_at_interrupt
    cells = [(r["step"], k) for r in rows for k, v in r.items() if v and k not in ("step", "epoch")]
    assert len(cells) == len(set(cells)), "a (step, metric) pair appears twice"
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps)
    for column in ("train_loss", "val_loss", "val_acc"):
        assert _series(rows, column) == _series(reference, column), column
    lr = [c for c in rows[0] if c.startswith("lr")]
    assert lr and all(
        {s: v for s, v in _series(rows, c) if s != status["step"]} == dict(_series(reference, c)) for c in lr
    )


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_with_one_line(tmp_path):
    config = _config(tmp_path, "run", seconds=30.0, after_step=3)
    marker = tmp_path / "training"
    proc = _start(tmp_path, config, marker)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGINT)  # during the callback's sleep: the step does not finish for 30 s
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)

    assert proc.returncode == 130, output
    assert "press Ctrl-C again to stop at once" in output
    assert "accel-trainer fit: interrupted (Ctrl-C); stopped at once." in output
    assert "Traceback" not in output, output
    status = read_run_status(tmp_path / "run")
    assert status["status"] == "failed" and status["error"].startswith("KeyboardInterrupt"), status


# -- commands that must leave a run's records alone -----------------------------------------------


def _tiny(tmp_path, *extra: str, command: str = "fit") -> list[str]:
    return [
        command, "--config", CLASSIFIER, "--trainer.limit_train_batches", "3", "--trainer.max_epochs", "1",
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.enable_progress_bar=false", *extra,
    ]


def _fingerprint(run_dir) -> dict[str, str]:
    """Every file of the run directory, with the hash of its bytes."""
    out = {}
    for root, _, files in os.walk(run_dir):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, run_dir)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def test_a_refused_resume_or_config_leaves_the_run_directory_untouched(tmp_path, capsys):
    assert cli.main(_tiny(tmp_path)) == 0
    before = _fingerprint(tmp_path / "run")
    assert {"config.yaml", "hparams.json", "metrics.csv", "run_status.json", os.path.join("checkpoints", "last.ckpt")} <= set(before)

    # a checkpoint that does not fit the new module: refused, and config.yaml still the run's
    assert cli.main(_tiny(tmp_path, "--trainer.max_epochs=2", "--module.init_args.hidden_dim=64")) == 2
    assert "does not fit DigitsClassifier" in capsys.readouterr().err
    assert _fingerprint(tmp_path / "run") == before
    # a bad config
    assert cli.main(_tiny(tmp_path, "--trainer.max_epoch=2")) == 2
    assert _fingerprint(tmp_path / "run") == before


def test_validate_and_test_write_their_own_files(tmp_path, capsys):
    assert cli.main(_tiny(tmp_path)) == 0
    before = _fingerprint(tmp_path / "run")
    assert cli.main(_tiny(tmp_path, command="validate")) == 0
    assert cli.main(_tiny(tmp_path, command="test")) == 0
    after = _fingerprint(tmp_path / "run")
    assert {k: after[k] for k in before} == before  # the training run's files are as they were
    assert {"validate/metrics.csv", "validate/hparams.json", "config_validate.yaml",
            "test/metrics.csv", "test/hparams.json", "config_test.yaml"} <= set(after)
    assert "val_acc" in _rows(tmp_path / "run" / "validate" / "metrics.csv")[0]
    assert "test_acc" in _rows(tmp_path / "run" / "test" / "metrics.csv")[0]


def test_rerunning_a_finished_run_says_there_is_nothing_left_to_do(tmp_path, capsys):
    assert cli.main(_tiny(tmp_path)) == 0
    before = _fingerprint(tmp_path / "run")
    capsys.readouterr()
    assert cli.main(_tiny(tmp_path)) == 0
    err = capsys.readouterr().err
    assert "nothing left to do: the checkpoint is at epoch 1, global_step 3, which already reaches max_epochs=1" in err
    after = _fingerprint(tmp_path / "run")
    changed = {k for k in before if after[k] != before[k]}
    assert changed == {"run_status.json"}, changed
    status = read_run_status(tmp_path / "run")
    assert (status["status"], status["stop_reason"], status["step"]) == ("finished", "nothing left to do", 3)

    # another configuration in the same run directory is refused before anything is restored (issue 15)
    assert cli.main(_tiny(tmp_path, "--module.init_args.lr=0.5")) == 2
    err = capsys.readouterr().err
    assert "of another configuration: module.init_args.lr: 0.003 -> 0.5" in err, err
    assert _fingerprint(tmp_path / "run") == after  # config.yaml keeps the lr the run was trained with


def test_run_status_through_the_status_command(tmp_path, capsys):
    argv = _tiny(tmp_path)[1:]
    assert cli.main(["status", *argv, "--field", "status"]) == 0
    assert capsys.readouterr().out.strip() == "none"  # no run yet
    assert cli.main(_tiny(tmp_path)) == 0
    capsys.readouterr()
    assert cli.main(["status", *argv]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["status"] == "finished" and record["step"] == 3 and record["epoch"] == 1
    assert record["checkpoint"] == str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert record["run_dir"] == str(tmp_path / "run")
    assert cli.main(["status", "--run_dir", str(tmp_path / "run"), "--field", "step"]) == 0
    assert capsys.readouterr().out.strip() == "3"
    # a status written before --newer_than belongs to an earlier job step
    assert cli.main(["status", *argv, "--newer_than", str(time.time() + 60), "--field", "status"]) == 0
    assert capsys.readouterr().out.strip() == "none"
    assert cli.main(["status"]) == 2
    assert "--run_dir" in capsys.readouterr().err


def test_a_failed_run_is_recorded_with_its_error(tmp_path):
    from accel_trainer import Trainer
    from accel_trainer.errors import TrainingError
    from helpers import Regressor, loader

    class Diverges(Regressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.global_step == 3 else loss

    trainer = Trainer(max_epochs=2, cpu=True, enable_progress_bar=False, default_root_dir=str(tmp_path))
    with pytest.raises(TrainingError):
        trainer.fit(Diverges(), loader(64, 8))
    status = read_run_status(tmp_path)
    assert status["status"] == "failed" and status["step"] == 3 and status["epoch"] == 0
    assert status["error"].startswith("TrainingError: training_step returned a non-finite loss")
    assert status["checkpoint"] is None  # no epoch finished: nothing to resume from


def test_checkpoints_are_created_with_the_umask_like_any_file(tmp_path):
    from accel_trainer.checkpoint import atomic_save

    for umask, mode in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
        previous = os.umask(umask)
        try:
            path = tmp_path / f"umask_{umask:o}.ckpt"
            atomic_save({"x": 1}, str(path))
        finally:
            os.umask(previous)
        assert os.stat(path).st_mode & 0o777 == mode, (oct(umask), oct(os.stat(path).st_mode))

"""Progress: a tqdm bar on a terminal, plain periodic lines otherwise (CI, Slurm logs)."""

from __future__ import annotations

import io
import re
import sys

import pytest

from accel_trainer import Trainer
from accel_trainer.progress import PROGRESS_ENV, LineProgress, make_progress
from helpers import Regressor, loader


class FakeClock:
    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        return self.now

    def advance(self) -> None:
        self.now += self.tick


def _run(progress: LineProgress, clock: FakeClock, n: int, postfix_at: int | None = None) -> None:
    for i in range(n):
        clock.advance()
        if postfix_at is not None and i == postfix_at:
            progress.set_postfix({"loss": "0.4312", "lr": 1e-3}, refresh=False)
        progress.update(1)
    progress.close()


def test_lines_every_tenth_of_a_slow_epoch():
    out, clock = io.StringIO(), FakeClock(tick=0.5)
    progress = LineProgress(100, epoch=2, file=out, clock=clock)
    _run(progress, clock, 100, postfix_at=5)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # 10%, 20%, ..., 90%, and the epoch's final line
    assert lines[0] == "epoch 2 | step 10/100 | loss 0.4312 | lr 1.0e-03 | 2.0 it/s"
    assert lines[4].startswith("epoch 2 | step 50/100 |")
    assert lines[-1] == "epoch 2 | step 100/100 | loss 0.4312 | lr 1.0e-03 | 2.0 it/s | 50.0 s"


def test_a_fast_epoch_prints_one_line():
    out, clock = io.StringIO(), FakeClock(tick=0.001)
    progress = LineProgress(400, epoch=0, file=out, clock=clock)
    _run(progress, clock, 400)
    lines = out.getvalue().splitlines()
    assert lines == ["epoch 0 | step 400/400 | 1000.0 it/s | 0.4 s"]


def test_resumed_epoch_counts_from_the_resume_point():
    out, clock = io.StringIO(), FakeClock(tick=0.5)
    progress = LineProgress(100, epoch=3, file=out, clock=clock, initial=40)
    _run(progress, clock, 60)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("epoch 3 | step 50/100 |") and len(lines) == 6
    assert lines[-1] == "epoch 3 | step 100/100 | 2.0 it/s | 30.0 s"


def test_unknown_length_prints_every_interval():
    out, clock = io.StringIO(), FakeClock(tick=1.0)
    progress = LineProgress(None, epoch=1, file=out, clock=clock, interval_s=10.0)
    _run(progress, clock, 35)
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[1] for line in lines] == ["step 10", "step 20", "step 30", "step 35"]
    assert lines[0].endswith("| 1.0 it/s")


def test_mode_selection(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert make_progress(10, 0, enabled=False) is None  # other ranks, enable_progress_bar=False
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    assert isinstance(make_progress(10, 0, enabled=True), LineProgress)
    monkeypatch.setenv(PROGRESS_ENV, "bar")
    bar = make_progress(10, 0, enabled=True)
    assert type(bar).__name__.startswith("tqdm")
    bar.set_postfix({"loss": "1.0"}, refresh=False)
    bar.update(1)
    bar.close()
    monkeypatch.setenv(PROGRESS_ENV, "off")
    assert make_progress(10, 0, enabled=True) is None
    monkeypatch.setenv(PROGRESS_ENV, "fancy")
    with pytest.raises(ValueError, match="'bar', 'lines', 'off'"):
        make_progress(10, 0, enabled=True)


def test_trainer_prints_plain_lines_when_stderr_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    trainer = Trainer(max_epochs=2, cpu=True, default_root_dir=str(tmp_path), log_every_n_steps=2)
    trainer.fit(Regressor(), loader(n=64, batch_size=8))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2, err
    assert re.fullmatch(r"epoch 0 \| step 8/8 \| loss [0-9.e+-]+ .*\| [0-9.]+ it/s \| [0-9.]+ s", lines[0]), lines[0]
    assert "\r" not in err

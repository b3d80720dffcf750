"""Progress: a tqdm bar on a terminal, plain periodic lines otherwise (CI, Slurm logs)."""

from __future__ import annotations

import io
import re
import sys

import pytest
import torch

from accel_trainer import Callback, Trainer
from accel_trainer.progress import PROGRESS_ENV, LineProgress, make_progress
from helpers import Regressor, TwoPart, loader


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


# -- what the trainer's lines say ---------------------------------------------------------------------


def _every_tenth(monkeypatch) -> io.StringIO:
    """The trainer's progress as LineProgress lines at every tenth of an epoch, into a buffer."""
    import accel_trainer.trainer as trainer_module

    out = io.StringIO()

    def make(total, epoch, enabled, initial=0):
        return LineProgress(total, epoch, file=out, min_interval_s=0.0, initial=initial) if enabled else None

    monkeypatch.setattr(trainer_module, "make_progress", make)
    return out


class ValOnBar(Regressor):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y), prog_bar=True)


def test_an_epoch_value_shown_during_a_later_epoch_says_which_epoch_it_is_from(tmp_path, monkeypatch):
    out = _every_tenth(monkeypatch)
    trainer = Trainer(max_epochs=2, cpu=True, default_root_dir=str(tmp_path), log_every_n_steps=1)
    val_losses = []

    class Record(Callback):
        def on_validation_end(self, trainer, module):
            val_losses.append(float(trainer.callback_metrics["val_loss"]))

    trainer.callbacks.append(Record())
    trainer.fit(ValOnBar(), loader(n=80, batch_size=8), loader(n=16, batch_size=8))
    lines = out.getvalue().splitlines()
    epoch0 = [line for line in lines if line.startswith("epoch 0 ")]
    epoch1 = [line for line in lines if line.startswith("epoch 1 ")]
    assert len(epoch0) == len(epoch1) == 10, lines
    assert all("val_loss" not in line for line in epoch0[:-1])
    # the epoch's last line comes after its validation and shows that validation's value
    assert f"| val_loss {val_losses[0]:.4g} |" in epoch0[-1], epoch0[-1]
    assert all(f"| val_loss (epoch 0) {val_losses[0]:.4g} |" in line for line in epoch1[:-1]), epoch1
    assert f"| val_loss {val_losses[1]:.4g} |" in epoch1[-1] and "(epoch" not in epoch1[-1], epoch1[-1]


def test_two_optimizers_show_one_loss_each(tmp_path, monkeypatch):
    out = _every_tenth(monkeypatch)

    class Recording(TwoPart):
        def training_step(self, batch, batch_idx, optimizer_idx):
            loss = super().training_step(batch, batch_idx, optimizer_idx)
            self.last = getattr(self, "last", {})
            self.last[optimizer_idx] = float(loss.detach())
            return loss

    module = Recording()
    trainer = Trainer(max_epochs=1, cpu=True, default_root_dir=str(tmp_path), log_every_n_steps=1)
    trainer.fit(module, loader(n=80, batch_size=8))
    final = out.getvalue().splitlines()[-1]
    assert f"| loss {module.last[0]:.4g}/{module.last[1]:.4g} |" in final, final
    assert re.search(r"\| lr [0-9.e+-]+/[0-9.e+-]+ \|", final), final


def test_a_run_shorter_than_log_every_n_steps_warns_and_logs_at_each_epoch_end(tmp_path):
    import csv

    trainer = Trainer(max_epochs=2, cpu=True, enable_progress_bar=False, default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=r"training steps per epoch \(4\) is smaller than the logging interval "
                                         r"Trainer\(log_every_n_steps=50\).*logged once per epoch, at its end"):
        trainer.fit(Regressor(), loader(n=32, batch_size=8))
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["train_loss"]]
    assert [(r["step"], r["epoch"]) for r in rows] == [("4", "0"), ("8", "1")]
    assert float(rows[-1]["train_loss"]) == pytest.approx(float(trainer.callback_metrics["train_loss"]))

    # long enough: no warning, and no extra epoch-end rows
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer = Trainer(max_epochs=1, cpu=True, enable_progress_bar=False, default_root_dir=str(tmp_path / "b"),
                          log_every_n_steps=2)
        trainer.fit(Regressor(), loader(n=32, batch_size=8))
    with open(tmp_path / "b" / "metrics.csv", newline="") as f:
        assert [r["step"] for r in csv.DictReader(f) if r["train_loss"]] == ["2", "4"]

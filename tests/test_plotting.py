"""plot_run: PNG curves from a run's metrics.csv."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from accel_trainer import Trainer
from accel_trainer.callbacks import LearningRateMonitor
from accel_trainer.plotting import EmptyMetricsError, MetricsNotFoundError, metric_families, plot_run
from helpers import Regressor, TwoPart, loader


class Scheduled(Regressor):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("val_loss", loss)
        self.log("val_mae", (self(x) - y).abs().mean())

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5), "interval": "step"}]


def _png_size(path):
    with Image.open(path) as img:
        return img.format, img.size


def test_plot_run_writes_metric_and_lr_pngs(tmp_path):
    trainer = Trainer(
        max_epochs=3,
        cpu=True,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path / "run"),
        log_every_n_steps=2,
        callbacks=[LearningRateMonitor()],
    )
    trainer.fit(Scheduled(lr=0.02), loader(n=64, batch_size=8), loader(n=32, batch_size=8))
    paths = plot_run(tmp_path / "run")
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["metrics.png", "lr.png"]
    assert all(p.startswith(str(tmp_path / "run" / "plots")) for p in paths)
    for path in paths:
        fmt, (width, height) = _png_size(path)
        assert fmt == "PNG" and width >= 600 and height >= 300
    out = plot_run(str(tmp_path / "run"), out_dir=tmp_path / "elsewhere")
    assert all(p.startswith(str(tmp_path / "elsewhere")) for p in out)


def test_two_optimizers_lr_plot(tmp_path):
    trainer = Trainer(
        max_epochs=1,
        cpu=True,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
        log_every_n_steps=1,
        callbacks=[LearningRateMonitor(logging_interval="step")],
    )
    trainer.fit(TwoPart(), loader(n=32, batch_size=8))
    paths = plot_run(tmp_path)
    # TwoPart logs no metric: only the learning rates of its Adam and SGD are plotted
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["lr.png"]


def test_metric_families_put_train_and_val_together():
    families = metric_families(["val_loss", "train_loss_step", "train_loss_epoch", "val_acc", "train_acc", "g_loss"])
    assert families == {
        "loss": ["train_loss_epoch", "train_loss_step", "val_loss"],
        "acc": ["train_acc", "val_acc"],
        "g_loss": ["g_loss"],
    }


def test_missing_and_empty_metrics_are_clear_errors(tmp_path):
    with pytest.raises(MetricsNotFoundError, match="No metrics.csv at .*log_with") as err:
        plot_run(tmp_path / "nowhere")
    assert isinstance(err.value, FileNotFoundError) and str(tmp_path / "nowhere") in str(err.value)
    (tmp_path / "metrics.csv").write_text("step,train_loss,epoch\n")
    with pytest.raises(EmptyMetricsError, match="holds no logged values") as err:
        plot_run(tmp_path)
    assert isinstance(err.value, ValueError)


class NamedSchedule(Regressor):
    def configure_optimizers(self):
        opt = torch.optim.SGD([{"params": [self.net.weight]}, {"params": [self.net.bias], "lr": 0.01}], lr=self.hparams.lr, momentum=0.9)
        return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5), "interval": "step", "name": "gen"}]


def test_named_scheduler_lr_columns_go_to_lr_png(tmp_path, monkeypatch):
    """A named scheduler's column is just its name (Lightning's key): the plot still finds it."""
    import accel_trainer.plotting as plotting

    trainer = Trainer(
        max_epochs=2, cpu=True, enable_progress_bar=False, default_root_dir=str(tmp_path), log_every_n_steps=1,
        callbacks=[LearningRateMonitor(log_momentum=True)],
    )
    trainer.fit(NamedSchedule(lr=0.02), loader(n=32, batch_size=8))
    plotted = {}

    def record(kind):
        def fake(plt, series, names, *args):
            plotted[kind] = sorted(names) if kind == "lr" else sorted(n for members in names.values() for n in members)
        return fake

    monkeypatch.setattr(plotting, "_plot_lrs", record("lr"))
    monkeypatch.setattr(plotting, "_plot_families", record("metrics"))
    paths = plot_run(tmp_path)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["metrics.png", "lr.png"]
    assert plotted["lr"] == ["gen/pg1", "gen/pg2"]
    assert plotted["metrics"] == ["train_loss"]  # neither the LRs nor their momentum twins


def test_runs_without_the_lr_record_still_plot_lr_columns(tmp_path, monkeypatch):
    import accel_trainer.plotting as plotting

    (tmp_path / "metrics.csv").write_text(
        "step,train_loss,lr-Adam,lr-Adam-1,lr-Adam/pg2-momentum,epoch\n0,1.0,0.1,0.2,0.9,0\n1,0.5,0.1,0.2,0.9,0\n"
    )
    plotted = {}
    monkeypatch.setattr(plotting, "_plot_lrs", lambda plt, series, names, *a: plotted.setdefault("lr", sorted(names)))
    plot_run(tmp_path)
    assert plotted["lr"] == ["lr-Adam", "lr-Adam-1"]

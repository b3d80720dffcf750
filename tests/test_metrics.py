"""``self.log`` / ``self.log_dict``: defaults, epoch aggregation, reductions, torchmetrics
objects, callback/progress-bar/logged metrics, and the CSV log."""

from __future__ import annotations

import csv
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from accel_trainer import Trainer
from accel_trainer.errors import ConfigurationError
from helpers import Regressor, regression_data

SIZES = [4, 4, 2]  # batch sizes of a 10-sample loader with batch_size=4: the last one is smaller


def _data(n=10, seed=0):
    return regression_data(n, seed=seed)


def _trending_data(n=10, seed=0):
    """Inputs whose values grow with the index, so batch means differ clearly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g) + torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return TensorDataset(x, x.sum(dim=1, keepdim=True))


def _loader(data, batch_size=4):
    return DataLoader(data, batch_size=batch_size)


def _csv_rows(trainer):
    with open(os.path.join(trainer.log_dir, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _weighted(values, weights):
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


class _Defaults(Regressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        self.log("t_default", float(batch_idx))
        self.log("both", float(batch_idx * 10), on_step=True, on_epoch=True)
        self.log_dict({"d_a": float(batch_idx + 1), "d_b": float(batch_idx + 2)}, on_step=False, on_epoch=True)
        return torch.nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        self.log("v_default", float(batch_idx))


def test_on_step_on_epoch_defaults(trainer_kwargs):
    model = _Defaults()
    trainer = Trainer(max_epochs=1, log_every_n_steps=1, **trainer_kwargs)
    trainer.fit(model, _loader(_data()), _loader(_data(seed=1)))
    idx = range(len(SIZES))
    logged, cb = trainer.logged_metrics, trainer.callback_metrics

    # training_step default: on_step only
    assert logged["t_default"] == 2.0
    assert "t_default_epoch" not in logged and "t_default_step" not in logged
    assert float(cb["t_default"]) == 2.0
    # validation default: on_epoch only, sample-weighted mean
    expected_v = _weighted(list(idx), SIZES)
    assert logged["v_default"] == pytest.approx(expected_v)
    assert "v_default_step" not in logged
    assert float(cb["v_default"]) == pytest.approx(expected_v)
    # both: name_step and name_epoch
    expected_both = _weighted([10.0 * i for i in idx], SIZES)
    assert logged["both_step"] == 20.0
    assert logged["both_epoch"] == pytest.approx(expected_both)
    assert "both" not in logged
    assert float(cb["both"]) == pytest.approx(expected_both)
    assert float(cb["both_epoch"]) == pytest.approx(expected_both)
    assert float(cb["both_step"]) == 20.0
    # log_dict with options
    assert logged["d_a"] == pytest.approx(_weighted([i + 1 for i in idx], SIZES))
    assert logged["d_b"] == pytest.approx(_weighted([i + 2 for i in idx], SIZES))

    rows = _csv_rows(trainer)
    step_rows = [r for r in rows if r.get("t_default")]
    assert [(int(r["step"]), float(r["t_default"])) for r in step_rows] == [(1, 0.0), (2, 1.0), (3, 2.0)]
    assert [float(r["both_step"]) for r in step_rows] == [0.0, 10.0, 20.0]
    v_rows = [r for r in rows if r.get("v_default")]
    assert len(v_rows) == 1 and float(v_rows[0]["v_default"]) == pytest.approx(expected_v)


class _Means(Regressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        self.log("x_mean", x.mean(), on_step=False, on_epoch=True)
        self.log("weighted_idx", float(batch_idx), on_step=False, on_epoch=True, batch_size=[1, 2, 7][batch_idx])
        return torch.nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_x_mean", x.mean())
        self.log("val_x_sum", x.sum(), reduce_fx="sum")
        self.log("val_x_max", x.max(), reduce_fx="max")
        self.log("val_x_min", x.min(), reduce_fx="min")
        self.log("val_x_max_fn", x.max(), reduce_fx=torch.max)


def test_epoch_values_are_sample_weighted_and_reductions(trainer_kwargs):
    train, val = _trending_data(seed=0), _trending_data(seed=1)
    trainer = Trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(_Means(), _loader(train), _loader(val))
    logged = trainer.logged_metrics

    xt, xv = train.tensors[0], val.tensors[0]
    # a plain mean of the three batch means differs from the exact sample mean
    batch_means = [xt[i : i + 4].mean().item() for i in (0, 4, 8)]
    assert abs(sum(batch_means) / 3 - xt.mean().item()) > 0.1
    assert logged["x_mean"] == pytest.approx(xt.mean().item(), abs=1e-6)
    assert logged["val_x_mean"] == pytest.approx(xv.mean().item(), abs=1e-6)
    # explicit batch_size overrides the inferred one
    assert logged["weighted_idx"] == pytest.approx(_weighted([0, 1, 2], [1, 2, 7]))
    assert logged["val_x_sum"] == pytest.approx(xv.sum().item(), abs=1e-5)
    assert logged["val_x_max"] == pytest.approx(xv.max().item())
    assert logged["val_x_min"] == pytest.approx(xv.min().item())
    assert logged["val_x_max_fn"] == pytest.approx(xv.max().item())


class _TorchMetrics(Regressor):
    def __init__(self):
        super().__init__()
        import torchmetrics

        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=3)
        self.train_mean = torchmetrics.MeanMetric()
        self.per_epoch = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.train_mean.update(x.mean(dim=1) + 10.0 * self.current_epoch)
        self.log("train_mean", self.train_mean, on_step=False, on_epoch=True)
        return torch.nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, labels = batch
        preds = torch.full_like(labels, self.current_epoch % 3)
        self.val_acc(preds, labels)
        self.log("val_acc", self.val_acc)

    def on_train_epoch_end(self):
        self.per_epoch.append(
            (float(self.trainer.callback_metrics["val_acc"]), float(self.trainer.callback_metrics["train_mean"]))
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.01)


def test_torchmetrics_objects_are_computed_and_reset_per_epoch(trainer_kwargs):
    train = _data(seed=2)
    labels = torch.tensor([0, 1, 0, 0, 2, 1, 0, 1, 2, 0])
    val = TensorDataset(torch.zeros(10, 4), labels)
    model = _TorchMetrics()
    trainer = Trainer(max_epochs=3, **trainer_kwargs)
    trainer.fit(model, _loader(train), _loader(val))

    base_mean = train.tensors[0].mean().item()
    expected = [((labels == e).float().mean().item(), base_mean + 10.0 * e) for e in range(3)]
    assert [e[0] for e in expected] == pytest.approx([0.5, 0.3, 0.2])
    assert len(model.per_epoch) == 3
    for (acc, mean), (exp_acc, exp_mean) in zip(model.per_epoch, expected):
        assert acc == pytest.approx(exp_acc)
        assert mean == pytest.approx(exp_mean, abs=1e-5)
    rows = [r for r in _csv_rows(trainer) if r.get("val_acc")]
    assert [float(r["val_acc"]) for r in rows] == pytest.approx([e[0] for e in expected])


class _ProgBar(Regressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("shown", loss, prog_bar=True)
        self.log("hidden", loss)
        self.log("not_logged", loss * 3, logger=False)
        self.last = loss.item()
        return loss


def test_prog_bar_logger_flag_and_callback_metrics(trainer_kwargs):
    model = _ProgBar()
    trainer = Trainer(max_epochs=1, log_every_n_steps=1, **trainer_kwargs)
    trainer.fit(model, _loader(_data()))
    assert "shown" in trainer.progress_bar_metrics and "hidden" not in trainer.progress_bar_metrics
    assert float(trainer.progress_bar_metrics["shown"]) == pytest.approx(model.last)
    assert float(trainer.callback_metrics["not_logged"]) == pytest.approx(3 * model.last, rel=1e-5)
    assert "not_logged" not in trainer.logged_metrics
    assert "not_logged" not in _csv_rows(trainer)[0]
    assert trainer.logged_metrics["hidden"] == pytest.approx(model.last)


class _LossLogger(Regressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        self.losses.append(loss.item())
        return loss


@pytest.mark.parametrize("log_with", [None, "csv", ["csv"]])
def test_csv_rows_follow_log_every_n_steps(trainer_kwargs, log_with):
    model = _LossLogger()
    model.losses = []
    trainer = Trainer(max_epochs=2, log_every_n_steps=3, log_with=log_with, **trainer_kwargs)
    data = regression_data(64)
    trainer.fit(model, DataLoader(data, batch_size=8), DataLoader(regression_data(16, seed=1), batch_size=8))
    assert trainer.log_dir == trainer_kwargs["default_root_dir"]
    rows = _csv_rows(trainer)
    assert "train_loss" in rows[0] and "val_loss" in rows[0] and "step" in rows[0]
    loss_rows = [r for r in rows if r.get("train_loss")]
    total = 2 * 8
    steps = [s for s in range(1, total + 1) if s % 3 == 0]
    assert [int(r["step"]) for r in loss_rows] == steps
    assert [float(r["train_loss"]) for r in loss_rows] == pytest.approx([model.losses[s - 1] for s in steps], rel=1e-6)
    val_rows = [r for r in rows if r.get("val_loss")]
    assert [int(r["step"]) for r in val_rows] == [8, 16]


class _BadLog(Regressor):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        if self.kind == "reduce":
            self.log("m", loss, reduce_fx="median")
        elif self.kind == "vector":
            self.log("m", (self(x) - y).abs())
        else:
            self.log("m", "text")
        return loss


@pytest.mark.parametrize("kind, fragment", [("reduce", "median"), ("vector", r"\(4, 1\)"), ("string", "str")])
def test_invalid_log_calls(trainer_kwargs, kind, fragment):
    with pytest.raises(ConfigurationError, match=fragment):
        Trainer(max_epochs=1, **trainer_kwargs).fit(_BadLog(kind), _loader(_data()))


# ---------------------------------------------------------------------------------------------
# several validation dataloaders, and what callback_metrics holds after validation (issue 13)
# Key sets checked against PyTorch Lightning 2.6.6 on the same module.
# ---------------------------------------------------------------------------------------------


class _TwoLoaders(Regressor):
    def __init__(self):
        super().__init__()
        self.hook_idx = []

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, _ = batch
        self.log("val_x", x[:, 0].mean())
        self.log("val_both", x[:, 0].mean(), on_step=True, on_epoch=True)
        self.log(f"own{dataloader_idx}", float(dataloader_idx), add_dataloader_idx=False)
        self.log("merged", x[:, 0].mean(), add_dataloader_idx=False)

    def on_validation_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
        self.hook_idx.append(dataloader_idx)

    def on_validation_epoch_end(self):
        self.log("at_end", 7.0)


def _two_val_sets():
    return _trending_data(10, seed=1), _trending_data(6, seed=2)


def test_several_validation_dataloaders_are_logged_per_dataloader(trainer_kwargs):
    a, b = _two_val_sets()
    module = _TwoLoaders()
    trainer = Trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(module, _loader(_data()), [_loader(a), _loader(b)])
    cb, logged = trainer.callback_metrics, trainer.logged_metrics
    mean_a, mean_b = a.tensors[0][:, 0].mean().item(), b.tensors[0][:, 0].mean().item()
    assert float(cb["val_x/dataloader_idx_0"]) == pytest.approx(mean_a, rel=1e-6)
    assert float(cb["val_x/dataloader_idx_1"]) == pytest.approx(mean_b, rel=1e-6)
    assert "val_x" not in cb  # no merged value under the bare name
    assert {k for k in cb if k.startswith(("val_", "own", "merged", "at_end"))} == {
        "val_x/dataloader_idx_0", "val_x/dataloader_idx_1", "val_both/dataloader_idx_0", "val_both/dataloader_idx_1",
        "val_both_epoch/dataloader_idx_0", "val_both_epoch/dataloader_idx_1", "own0", "own1", "merged", "at_end",
    }
    assert "val_both_epoch/dataloader_idx_1" in logged and "val_both/dataloader_idx_1" not in logged
    # add_dataloader_idx=False with one name from both dataloaders: one sample-weighted value over both
    both = torch.cat([a.tensors[0][:, 0], b.tensors[0][:, 0]]).mean().item()
    assert float(cb["merged"]) == pytest.approx(both, rel=1e-6)
    assert module.hook_idx == [0, 0, 0, 1, 1]
    columns = _csv_rows(trainer)[0].keys()
    assert {"val_x/dataloader_idx_0", "val_x/dataloader_idx_1"} <= set(columns)


def test_validate_returns_one_dict_per_dataloader(trainer_kwargs):
    a, b = _two_val_sets()
    results = Trainer(**trainer_kwargs).validate(_TwoLoaders(), [_loader(a), _loader(b)])
    assert [sorted(r) for r in results] == [
        ["at_end", "merged", "own0", "val_both_epoch/dataloader_idx_0", "val_x/dataloader_idx_0"],
        ["at_end", "merged", "own1", "val_both_epoch/dataloader_idx_1", "val_x/dataloader_idx_1"],
    ]
    assert results[0]["val_x/dataloader_idx_0"] == pytest.approx(a.tensors[0][:, 0].mean().item(), rel=1e-6)
    assert results[0]["merged"] == results[1]["merged"] and results[0]["at_end"] == 7.0
    one = Trainer(**trainer_kwargs).validate(Regressor(), _loader(a))
    assert len(one) == 1 and list(one[0]) == ["val_loss"]


class _ReturnsLossTwoLoaders(Regressor):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)


def test_returned_val_loss_is_per_dataloader_too(trainer_kwargs):
    a, b = _two_val_sets()
    results = Trainer(**trainer_kwargs).validate(_ReturnsLossTwoLoaders(), [_loader(a), _loader(b)])
    assert [list(r) for r in results] == [["val_loss/dataloader_idx_0"], ["val_loss/dataloader_idx_1"]]


class _NamesDataloader(Regressor):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss/dataloader_idx_0", 1.0)


def test_a_name_that_already_names_a_dataloader_is_refused(trainer_kwargs):
    with pytest.raises(ConfigurationError, match="add_dataloader_idx=False"):
        Trainer(**trainer_kwargs).validate(_NamesDataloader(), _loader(_data()))


class _StepAndEpochInValidation(Regressor):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("t_both", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("v_both", float(batch_idx), on_step=True, on_epoch=True)
        self.log("v_step_only", float(batch_idx), on_step=True, on_epoch=False)
        self.seen = sorted(self.trainer.callback_metrics)


def test_callback_metrics_hold_no_step_values_of_validation(trainer_kwargs):
    """Lightning: after validation, name and name_epoch, never name_step (training keeps its name_step)."""
    module = _StepAndEpochInValidation()
    trainer = Trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(module, _loader(_data()), _loader(_data(seed=1)))
    cb = trainer.callback_metrics
    assert {"v_both", "v_both_epoch"} <= set(cb)
    assert "v_both_step" not in cb and "v_step_only" not in cb
    assert {"t_both", "t_both_step", "t_both_epoch"} <= set(cb)
    assert float(cb["v_both"]) == float(cb["v_both_epoch"]) == pytest.approx(_weighted([0, 1, 2], SIZES))
    assert "v_both" not in module.seen and "v_step_only" not in module.seen  # not even during validation
    trainer.validate(module, _loader(_data(seed=1)))
    assert sorted(trainer.callback_metrics) == ["v_both", "v_both_epoch"]

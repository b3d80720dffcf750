"""The digits examples reach their documented quality (short versions of the README's runs).

Full length (``configs/digits_*.yaml``, measured and written down in the README): the
classifier reaches val_acc >= 0.95, the GAN a digit score around 5. Here: the classifier
>= 0.9 after 3 epochs, and the GAN's grids go from noise (score ~1) to digit-like shapes
(score > 2) in 15 epochs, with the seed's stepping schedule (G every 2 batches, D every 4).
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from accel_trainer import Trainer
from accel_trainer.examples.digits import (
    DigitsClassifier,
    DigitsDataModule,
    DigitsGAN,
    _digits,
    digit_score,
    save_digit_grid,
)


def _column(path, name):
    with open(path, newline="") as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


def test_datamodule_splits_are_disjoint_stratified_and_reproducible():
    dm = DigitsDataModule(batch_size=32, val_fraction=0.2, test_fraction=0.1, seed=0)
    dm.setup("fit")
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sum(sizes) == 1797 and sizes[1] == pytest.approx(0.2 * 1797, abs=2) and sizes[2] == pytest.approx(0.1 * 1797, abs=2)
    rows = [set(map(tuple, s.tensors[0].numpy().round(4))) for s in (dm.train_set, dm.val_set, dm.test_set)]
    assert sum(len(r) for r in rows) >= 1797 - 20  # a few images are duplicated in the data set itself
    assert torch.bincount(dm.val_set.tensors[1], minlength=10).min() >= 30  # every class in validation
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 64) and x.min() >= 0 and x.max() <= 1 and y.dtype == torch.int64
    again = DigitsDataModule(batch_size=32, seed=0)
    again.setup("fit")
    assert torch.equal(again.val_set.tensors[0], dm.val_set.tensors[0])
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=0.8, test_fraction=0.3)


def test_classifier_reaches_90_percent_in_3_epochs(tmp_path):
    trainer = Trainer(max_epochs=3, seed=0, cpu=True, enable_progress_bar=False, default_root_dir=str(tmp_path))
    module = DigitsClassifier()
    datamodule = DigitsDataModule(batch_size=64)
    trainer.fit(module, datamodule=datamodule)
    assert float(trainer.callback_metrics["val_acc"]) >= 0.9
    plateau = trainer.lr_schedulers[0]
    assert plateau.monitor == "val_acc"
    assert getattr(plateau.scheduler, "scheduler", plateau.scheduler).mode == "max"
    (result,) = trainer.test(module, datamodule=datamodule)
    assert result["test_acc"] >= 0.88


def test_classifier_warmup_init_arg_reaches_the_scheduler_dict(tmp_path):
    trainer = Trainer(max_epochs=1, limit_train_batches=2, cpu=True, enable_progress_bar=False, default_root_dir=str(tmp_path))
    trainer.fit(DigitsClassifier(warmup_steps=50), datamodule=DigitsDataModule())
    assert trainer.lr_schedulers[0].warmup_steps == 50


@pytest.mark.slow
def test_gan_grids_improve_and_follow_the_seeds_stepping_schedule(tmp_path):
    epochs = 15
    trainer = Trainer(max_epochs=epochs, seed=0, cpu=True, enable_progress_bar=False, default_root_dir=str(tmp_path))
    module = DigitsGAN()
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16))

    batches = 79  # ceil(1257 training images / 16)
    assert trainer.global_step == batches * epochs
    # generator every 2 batches (batch_nb 0, 2, ..., 78), discriminator every 4 (0, 4, ..., 76)
    assert trainer.optimizer_steps == [40 * epochs, 20 * epochs]
    adam, sgd = (getattr(o, "optimizer", o) for o in trainer.optimizers)
    assert isinstance(adam, torch.optim.Adam) and isinstance(sgd, torch.optim.SGD)
    # LambdaLR on the discriminator, after the warm-up: d_learning_rate * decay ** epochs
    assert sgd.param_groups[0]["lr"] == pytest.approx(0.05 * 0.99**epochs)

    samples = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert samples == [f"epoch_{e:03d}.png" for e in range(epochs)]
    from PIL import Image

    with Image.open(tmp_path / "samples" / "epoch_000.png") as image:
        assert image.width > 200 and image.height > 200

    scores = _column(tmp_path / "metrics.csv", "val_digit_score")
    assert len(scores) == epochs
    assert scores[0] < 1.5, scores  # noise: one "class" everywhere
    assert scores[-1] > 2.0 and scores[-1] > scores[0] + 1.0, scores


def test_digit_score_separates_real_digits_from_noise(tmp_path):
    x, _ = _digits()
    real = torch.from_numpy(x[:256]) * 2 - 1
    assert digit_score(real) > 6.0
    assert digit_score(torch.zeros(256, 64)) < 1.5
    path = save_digit_grid(np.random.default_rng(0).random((16, 8, 8)), str(tmp_path / "grid.png"), title="t")
    assert (tmp_path / "grid.png").stat().st_size > 1000 and path.endswith("grid.png")

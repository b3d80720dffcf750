"""Exact resume: a run stopped and resumed ends bitwise equal to an uninterrupted one."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from accel_trainer import Trainer, TrainingModule
from accel_trainer.callbacks import EarlyStopping, ModelCheckpoint


class Everything(TrainingModule):
    """Two optimizers, dropout, a step scheduler with warm-up, an epoch scheduler and a plateau one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.generator = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 4))
        self.discriminator = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))

    def training_step(self, batch, batch_idx, optimizer_idx):
        x, _ = batch
        fake = self.generator(x + 0.1 * torch.randn_like(x))
        if optimizer_idx == 0:
            loss = -self.discriminator(fake).mean()
        else:
            loss = self.discriminator(fake.detach()).mean() - self.discriminator(x).mean()
        self.log(f"loss{optimizer_idx}", loss, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        self.log("val_loss", (self.generator(x) - x).pow(2).mean())

    def configure_optimizers(self):
        g = torch.optim.Adam(self.generator.parameters(), lr=0.01)
        d = torch.optim.SGD(self.discriminator.parameters(), lr=0.05, momentum=0.9)
        return [g, d], [
            {"scheduler": torch.optim.lr_scheduler.StepLR(g, step_size=3, gamma=0.7), "interval": "step", "warmup_steps": 5},
            {"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(g, patience=0, factor=0.5), "monitor": "val_loss"},
            torch.optim.lr_scheduler.ExponentialLR(d, gamma=0.9),
        ]

    def optimizer_step(self, current_epoch, batch_nb, optimizer, optimizer_i, second_order_closure=None):
        if optimizer_i == 1 and batch_nb % 2 == 1:
            return  # the discriminator steps every other batch
        optimizer.step()
        optimizer.zero_grad()


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 4, generator=g)
    return TensorDataset(x, torch.zeros(60, 1))


def _loaders():
    return DataLoader(_data(), batch_size=6, shuffle=True), DataLoader(_data(), batch_size=20)


def _snapshot(trainer, module):
    return {
        "params": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "lrs": [[g["lr"] for g in opt.param_groups] for opt in trainer.optimizers],
        "global_step": trainer.global_step,
        "optimizer_steps": list(trainer.optimizer_steps),
        "epoch": trainer.current_epoch,
    }


def _run(root, ckpt_path=None, **kwargs):
    trainer = Trainer(cpu=True, enable_progress_bar=False, default_root_dir=str(root), seed=7, **kwargs)
    module = Everything()
    trainer.fit(module, *_loaders(), ckpt_path=ckpt_path)
    return trainer, module


def _assert_same(a, b):
    assert a["global_step"] == b["global_step"]
    assert a["optimizer_steps"] == b["optimizer_steps"]
    assert a["epoch"] == b["epoch"]
    assert a["lrs"] == b["lrs"]
    for name, value in a["params"].items():
        assert torch.equal(value, b["params"][name]), f"{name} differs after resume"


@pytest.mark.parametrize("stop_at_step", [13, 10, 20])  # mid-epoch (13), exactly at epoch ends (10, 20)
def test_resume_from_last_is_bitwise_exact(tmp_path, stop_at_step):
    full_trainer, full_module = _run(tmp_path / "full", max_epochs=4)
    reference = _snapshot(full_trainer, full_module)

    first, _ = _run(tmp_path / "split", max_epochs=4, max_steps=stop_at_step)
    assert first.global_step == stop_at_step
    assert os.path.isfile(tmp_path / "split" / "checkpoints" / "last.ckpt")
    resumed_trainer, resumed_module = _run(tmp_path / "split", ckpt_path="last", max_epochs=4)
    _assert_same(_snapshot(resumed_trainer, resumed_module), reference)


def test_resume_from_a_mid_epoch_step_checkpoint(tmp_path):
    """A ModelCheckpoint(every_n_train_steps) file in the middle of an epoch resumes exactly."""
    full_trainer, full_module = _run(tmp_path / "full", max_epochs=3)
    reference = _snapshot(full_trainer, full_module)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "steps"), every_n_train_steps=7, save_top_k=-1)
    _run(tmp_path / "with_ckpts", max_epochs=3, callbacks=[checkpoint])
    files = sorted(os.listdir(tmp_path / "steps"))
    assert "epoch=0-step=7.ckpt" in files, files
    resumed_trainer, resumed_module = _run(
        tmp_path / "resumed", ckpt_path=str(tmp_path / "steps" / "epoch=0-step=7.ckpt"), max_epochs=3
    )
    _assert_same(_snapshot(resumed_trainer, resumed_module), reference)


def test_callback_state_survives_resume(tmp_path):
    stopper = EarlyStopping(monitor="val_loss", patience=100)
    _run(tmp_path, max_epochs=2, callbacks=[stopper])
    resumed = EarlyStopping(monitor="val_loss", patience=100)
    trainer = Trainer(cpu=True, enable_progress_bar=False, default_root_dir=str(tmp_path), max_epochs=2, callbacks=[resumed])
    trainer.fit(Everything(), *_loaders(), ckpt_path="last")
    assert resumed.best_score == stopper.best_score
    assert resumed.wait_count == stopper.wait_count


# -- checkpoints written by validation-driven ModelCheckpoint (issue 13) -------------------------
class EverythingStepPlateau(Everything):
    """``Everything`` plus a step-interval ReduceLROnPlateau on the generator, monitoring val_loss.

    The generator steps every batch (10 per epoch), so with ``frequency`` equal to the batches
    between validations its plateau scheduler is due exactly on the batches that validate:
    it must see that validation, not the one before.
    """

    def __init__(self, plateau_frequency=2, epoch_plateau_frequency=1):
        super().__init__()
        self.plateau_frequency = plateau_frequency
        self.epoch_plateau_frequency = epoch_plateau_frequency

    def configure_optimizers(self):
        (g, d), schedulers = super().configure_optimizers()
        schedulers[1]["frequency"] = self.epoch_plateau_frequency  # the epoch plateau: only after validated epochs
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(g, patience=0, factor=0.8)
        step_plateau = {"scheduler": plateau, "interval": "step", "frequency": self.plateau_frequency, "monitor": "val_loss"}
        return [g, d], schedulers + [step_plateau]


def _run_with(root, module_cls, callbacks=(), ckpt_path=None, plateau_frequency=2, **kwargs):
    trainer = Trainer(cpu=True, enable_progress_bar=False, default_root_dir=str(root), seed=7, callbacks=list(callbacks), **kwargs)
    module = module_cls(plateau_frequency, kwargs.get("check_val_every_n_epoch", 1))
    trainer.fit(module, *_loaders(), ckpt_path=ckpt_path)
    return trainer, module


@pytest.mark.parametrize(
    "schedule",
    [
        dict(val_check_interval=2, plateau_frequency=2),
        dict(val_check_interval=0.5, plateau_frequency=5),
        dict(check_val_every_n_epoch=2, plateau_frequency=20),
    ],
    ids=["val_check_interval=2", "val_check_interval=0.5", "check_val_every_n_epoch=2"],
)
def test_every_validation_driven_checkpoint_resumes_exactly(tmp_path, schedule):
    """ModelCheckpoint saving at the end of each validation (mid-epoch, or before the epoch's
    schedulers), and every_n_train_steps saving between a batch and its validation: resuming
    from any of these files ends bitwise equal to the uninterrupted run."""
    epochs = 4
    per_validation = ModelCheckpoint(dirpath=str(tmp_path / "val"), monitor="val_loss", save_top_k=-1)
    per_steps = ModelCheckpoint(dirpath=str(tmp_path / "steps"), every_n_train_steps=3, save_top_k=-1)
    stopper = EarlyStopping(monitor="val_loss", patience=100)
    full_trainer, full_module = _run_with(
        tmp_path / "full", EverythingStepPlateau, [stopper, per_validation, per_steps], max_epochs=epochs, **schedule
    )
    reference = _snapshot(full_trainer, full_module)
    files = sorted(os.listdir(tmp_path / "val")) + sorted(os.listdir(tmp_path / "steps"))
    per_epoch_validations = {"val_check_interval=2": 5, "val_check_interval=0.5": 2}
    assert len(os.listdir(tmp_path / "val")) == (
        epochs // 2 if "check_val_every_n_epoch" in schedule else epochs * per_epoch_validations[
            f"val_check_interval={schedule['val_check_interval']}"
        ]
    )
    checked = 0
    for directory in ("val", "steps"):
        for name in sorted(os.listdir(tmp_path / directory)):
            path = str(tmp_path / directory / name)
            loops = torch.load(path, map_location="cpu", weights_only=True)["loops"]
            if loops["global_step"] >= reference["global_step"]:
                continue
            resumed_trainer, resumed_module = _run_with(
                tmp_path / f"resumed-{directory}-{name}", EverythingStepPlateau, ckpt_path=path, max_epochs=epochs, **schedule
            )
            _assert_same(_snapshot(resumed_trainer, resumed_module), reference)
            checked += 1
    assert checked >= 6, files


def test_max_steps_pause_runs_the_validation_due_on_its_batch(tmp_path):
    """A max_steps stop inside an epoch completes its batch first (validation, plateau step), then pauses."""
    full_trainer, full_module = _run_with(tmp_path / "full", EverythingStepPlateau, max_epochs=3, val_check_interval=2)
    reference = _snapshot(full_trainer, full_module)
    first, _ = _run_with(tmp_path / "split", EverythingStepPlateau, max_epochs=3, max_steps=14, val_check_interval=2)
    loops = torch.load(str(tmp_path / "split" / "checkpoints" / "last.ckpt"), map_location="cpu", weights_only=True)["loops"]
    assert (loops["global_step"], loops["batches_done_in_epoch"], loops["validated_at"], loops["pending_plateau"]) == (14, 4, 4, [])
    resumed_trainer, resumed_module = _run_with(tmp_path / "split", EverythingStepPlateau, ckpt_path="last", max_epochs=3, val_check_interval=2)
    _assert_same(_snapshot(resumed_trainer, resumed_module), reference)

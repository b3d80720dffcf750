"""Lightning 2 hooks and attributes users override or read (issue 13, point 6)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch.utils.data import DataLoader

from accel_trainer import Callback, DataModule, Trainer, TrainingModule
from accel_trainer.callbacks import EarlyStopping, ModelCheckpoint
from accel_trainer.errors import ConfigurationError
from accel_trainer.loggers import LoggerView
from helpers import Regressor, TwoPart, loader, regression_data


# -- on_before_zero_grad / optimizer_zero_grad --------------------------------------------------
class _ZeroGradSpy(Regressor):
    def __init__(self):
        super().__init__()
        self.record = []

    def optimizer_step(self, *args):
        self.record.append("optimizer_step")
        super().optimizer_step(*args)

    def on_before_zero_grad(self, optimizer):
        # after the step (parameters moved), before the zeroing (gradients still there)
        self.record.append(("on_before_zero_grad", optimizer is self.trainer.optimizers[0], self.net.weight.grad.abs().sum().item() > 0))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.record.append(("on_train_batch_end", self.net.weight.grad))


class _CallbackZeroGrad(Callback):
    def __init__(self, record):
        self.record = record

    def on_before_zero_grad(self, trainer, module, optimizer):
        self.record.append("cb.on_before_zero_grad")


def test_on_before_zero_grad_runs_between_the_step_and_the_zeroing(trainer_kwargs):
    module = _ZeroGradSpy()
    Trainer(max_epochs=1, callbacks=[_CallbackZeroGrad(module.record)], **trainer_kwargs).fit(module, loader(16, 8))
    assert module.record == [
        "optimizer_step", "cb.on_before_zero_grad", ("on_before_zero_grad", True, True), ("on_train_batch_end", None),
    ] * 2


class _OwnOptimizerStep(_ZeroGradSpy):
    def optimizer_step(self, current_epoch, batch_nb, optimizer, optimizer_i, second_order_closure=None):
        optimizer.step()
        optimizer.zero_grad()


def test_an_optimizer_step_override_decides_itself(trainer_kwargs):
    """As in Lightning 0.7: the hook belongs to the default optimizer_step."""
    module = _OwnOptimizerStep()
    Trainer(max_epochs=1, **trainer_kwargs).fit(module, loader(16, 8))
    assert [r for r in module.record if r[0] == "on_before_zero_grad"] == []


class _KeepZeros(Regressor):
    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        self.calls = getattr(self, "calls", []) + [(epoch, batch_idx)]
        optimizer.zero_grad(set_to_none=False)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.grad_after = self.net.weight.grad


def test_optimizer_zero_grad_override(trainer_kwargs):
    module = _KeepZeros()
    Trainer(max_epochs=2, **trainer_kwargs).fit(module, loader(16, 8))
    assert module.calls == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert module.grad_after is not None and torch.count_nonzero(module.grad_after) == 0


# -- on_after_batch_transfer ---------------------------------------------------------------------
class _Shift(Regressor):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        self.seen.append((self.trainer.training and not self.trainer.sanity_checking, dataloader_idx, x.device.type))
        return x, y * 0.0 + 5.0

    def training_step(self, batch, batch_idx):
        assert torch.all(batch[1] == 5.0)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        assert torch.all(batch[1] == 5.0)
        self.log("val_y", batch[1].mean())


def test_on_after_batch_transfer_changes_every_batch(trainer_kwargs):
    module = _Shift()
    trainer = Trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(module, loader(16, 8), [loader(8, 8), loader(8, 8)])
    assert [s[1] for s in module.seen] == [0, 0, 0, 1]  # two training batches, then one per validation dataloader
    assert all(device == "cpu" for *_, device in module.seen)
    assert float(trainer.callback_metrics["val_y/dataloader_idx_1"]) == 5.0


class _DataModuleTransfer(DataModule):
    def train_dataloader(self):
        return loader(16, 8)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return x, y * 0.0 + 5.0


class _CountsTransfers(_Shift):
    def on_after_batch_transfer(self, batch, dataloader_idx):
        raise AssertionError("the DataModule's hook wins")


def test_datamodule_on_after_batch_transfer_wins(trainer_kwargs):
    Trainer(max_epochs=1, **trainer_kwargs).fit(_CountsTransfers(), datamodule=_DataModuleTransfer())


# -- train / eval modes around validation ----------------------------------------------------------
class _FrozenPart(Regressor):
    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.BatchNorm1d(4)
        self.modes = []

    def on_fit_start(self):
        self.frozen.eval()  # a frozen part the user keeps in eval mode

    def training_step(self, batch, batch_idx):
        self.modes.append((self.training, self.frozen.training))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.modes.append(("val", self.training, self.frozen.training))
        return super().validation_step(batch, batch_idx)


def test_validation_restores_every_submodule_mode(trainer_kwargs):
    """Lightning 2: eval for validation, then each submodule gets its own mode back (a frozen part stays eval)."""
    module = _FrozenPart()
    Trainer(max_epochs=2, **trainer_kwargs).fit(module, loader(16, 8), loader(8, 8))
    assert module.modes == [(True, False), (True, False), ("val", False, False)] * 2
    assert module.training and not module.frozen.training


class _OwnEvalHooks(Regressor):
    def __init__(self):
        super().__init__()
        self.calls = []

    def on_validation_model_eval(self):
        self.calls.append("eval")
        super().on_validation_model_eval()

    def on_validation_model_train(self):
        self.calls.append("train")
        self.train()

    def on_test_model_eval(self):
        self.calls.append("test_eval")
        self.eval()


def test_model_eval_and_train_hooks_are_called(trainer_kwargs):
    module = _OwnEvalHooks()
    trainer = Trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(module, loader(16, 8), loader(8, 8))
    trainer.test(module, loader(8, 8))
    assert module.calls == ["eval", "train", "test_eval"]


# -- prepare_data, print, ranks -------------------------------------------------------------------
class _Prepares(Regressor):
    def __init__(self):
        super().__init__()
        self.order = []

    def prepare_data(self):
        self.order.append("prepare_data")

    def setup(self, stage):
        self.order.append(f"setup:{stage}")


def test_module_prepare_data_runs_before_setup(trainer_kwargs):
    module = _Prepares()
    trainer = Trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(module, loader(16, 8))
    trainer.validate(module, loader(8, 8))
    assert module.order == ["prepare_data", "setup:fit", "prepare_data", "setup:validate"]


class _Prints(Regressor):
    def on_train_epoch_end(self):
        self.print("epoch", self.current_epoch, "done", sep="-")


def test_self_print_prints_on_the_main_process(trainer_kwargs, capsys):
    trainer = Trainer(max_epochs=2, **trainer_kwargs)
    trainer.fit(_Prints(), loader(16, 8))
    assert capsys.readouterr().out.splitlines() == ["epoch-0-done", "epoch-1-done"]
    assert (trainer.global_rank, trainer.local_rank) == (0, 0) and trainer.lightning_module.global_rank == 0


# -- logger / loggers -------------------------------------------------------------------------------
class _UsesLogger(Regressor):
    def on_train_start(self):
        self.seen_logger = self.logger
        self.logger.log_hyperparams({"extra": 3})

    def on_train_epoch_end(self):
        self.logger.log_metrics({"custom": 1.5})
        self.experiment = self.logger.experiment


def test_self_logger_is_lightning_shaped(trainer_kwargs):
    module = _UsesLogger()
    trainer = Trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(module, loader(16, 8))
    assert isinstance(module.seen_logger, LoggerView) and module.seen_logger.name == "csv"
    assert module.seen_logger.save_dir == trainer.log_dir
    assert module.experiment.metrics_path == os.path.join(trainer.log_dir, "metrics.csv")  # the CSV tracker itself
    with open(os.path.join(trainer.log_dir, "metrics.csv")) as f:
        assert "custom" in f.readline()
    with open(os.path.join(trainer.log_dir, "hparams.json")) as f:
        assert json.load(f)["extra"] == 3
    assert trainer.logger is None and trainer.loggers == []  # outside a run
    silent = Trainer(max_epochs=1, log_with=[], **{**trainer_kwargs, "default_root_dir": trainer_kwargs["default_root_dir"] + "/b"})
    module = Regressor()
    silent.fit(module, loader(16, 8))
    assert module.logger is None


def test_non_main_rank_logger_swallows_calls():
    view = LoggerView(None, trainer=None, name="wandb")
    view.log_metrics({"x": 1.0})
    view.experiment.log({"x": 1})  # a wandb call on rank 1: nothing happens
    view.experiment.add_image("k", None, 0)
    assert view.experiment["anything"] is not None


# -- checkpoint / early-stopping callback properties --------------------------------------------------
def test_callback_properties(trainer_kwargs):
    es, mc = EarlyStopping(monitor="val_loss"), ModelCheckpoint()
    trainer = Trainer(callbacks=[mc, es], **trainer_kwargs)
    assert trainer.checkpoint_callback is mc and trainer.checkpoint_callbacks == [mc]
    assert trainer.early_stopping_callback is es and trainer.early_stopping_callbacks == [es]
    assert Trainer(**trainer_kwargs).checkpoint_callback is None


# -- estimated_stepping_batches ------------------------------------------------------------------------
class _OneCycle(Regressor):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        self.total = self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=self.total)
        return [opt], [{"scheduler": schedule, "interval": "step"}]


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(max_epochs=3), 3 * 5),  # 40 samples / batch 8 = 5 batches per epoch
        (dict(max_epochs=3, gradient_accumulation_steps=2), 3 * 3),  # the last, partial window also steps
        (dict(max_epochs=3, limit_train_batches=2), 3 * 2),
        (dict(max_epochs=3, max_steps=7), 7),
        (dict(max_steps=4), 4),
    ],
)
def test_estimated_stepping_batches_in_configure_optimizers(trainer_kwargs, kwargs, expected):
    """Lightning's formula; OneCycleLR sized with it runs to its very last step without error."""
    module = _OneCycle()
    trainer = Trainer(**kwargs, **trainer_kwargs)
    trainer.fit(module, loader(40, 8))
    assert module.total == expected == trainer.global_step


def test_estimated_stepping_batches_outside_fit_is_a_clear_error(trainer_kwargs):
    with pytest.raises(ConfigurationError, match="estimated_stepping_batches"):
        Trainer(**trainer_kwargs).estimated_stepping_batches


def test_estimated_stepping_batches_without_length(trainer_kwargs):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(regression_data(16))

    trainer = Trainer(max_epochs=2, **trainer_kwargs)
    trainer._train_loader_raw = DataLoader(Stream(), batch_size=8)
    assert trainer.estimated_stepping_batches == math.inf
    trainer.max_steps = 5
    assert trainer.estimated_stepping_batches == 5


# -- toggle_optimizer under manual optimization ---------------------------------------------------------
class _ManualToggle(TwoPart):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.flags = []

    def training_step(self, batch, batch_idx):
        x, _ = batch
        g_opt, d_opt = self.optimizers()
        self.toggle_optimizer(g_opt)
        self.flags.append((all(p.requires_grad for p in self.generator.parameters()),
                           any(p.requires_grad for p in self.discriminator.parameters())))
        g_opt.zero_grad()
        self.manual_backward(-self.discriminator(self.generator(x)).mean())
        g_opt.step()
        self.untoggle_optimizer(g_opt)
        with self.toggled_optimizer(d_opt):
            self.flags.append((any(p.requires_grad for p in self.generator.parameters()),
                               all(p.requires_grad for p in self.discriminator.parameters())))
            d_opt.zero_grad()
            self.manual_backward(self.discriminator(x).mean())
            d_opt.step()
        self.flags.append(all(p.requires_grad for p in self.parameters()))


def test_toggle_optimizer(trainer_kwargs):
    module = _ManualToggle()
    trainer = Trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(module, loader(8, 8))
    assert module.flags == [(True, False), (False, True), True]
    assert trainer.optimizer_steps == [1, 1]


# -- on_save_checkpoint / on_load_checkpoint ----------------------------------------------------------
class _Extra(Regressor):
    def __init__(self):
        super().__init__()
        self.loaded = None

    def on_save_checkpoint(self, checkpoint):
        checkpoint["my_counter"] = 7 + self.current_epoch

    def on_load_checkpoint(self, checkpoint):
        self.loaded = checkpoint["my_counter"]


class _SeesCheckpoints(Callback):
    def __init__(self):
        self.saved, self.loaded = [], []

    def on_save_checkpoint(self, trainer, module, checkpoint):
        self.saved.append(checkpoint["loops"]["global_step"])

    def on_load_checkpoint(self, trainer, module, checkpoint):
        self.loaded.append(checkpoint["my_counter"])


def test_checkpoint_hooks_add_and_read_entries(trainer_kwargs):
    cb = _SeesCheckpoints()
    Trainer(max_epochs=2, callbacks=[cb], **trainer_kwargs).fit(_Extra(), loader(16, 8))
    assert cb.saved == [2, 4]  # last.ckpt after each epoch
    module, cb = _Extra(), _SeesCheckpoints()
    Trainer(max_epochs=3, callbacks=[cb], **trainer_kwargs).fit(module, loader(16, 8), ckpt_path="last")
    assert module.loaded == 9 and cb.loaded == [9]


def test_only_the_modules_on_train_batch_start_can_end_the_epoch(trainer_kwargs):
    """A callback returning -1 from on_train_batch_start does not end the epoch (Lightning: only the module's does)."""
    from accel_trainer import Callback, Trainer
    from helpers import Regressor, loader

    class ReturnsMinusOne(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            return -1

    trainer = Trainer(max_epochs=1, callbacks=[ReturnsMinusOne()], **trainer_kwargs)
    trainer.fit(Regressor(), loader(32, 8))
    assert trainer.global_step == 4

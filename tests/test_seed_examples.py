"""Every code block of the seed's ``optimization.rst``, run as written.

``pytorch_lightning.LightningModule`` is replaced by ``accel_trainer.TrainingModule`` and
every ``...`` by concrete arguments; each example trains with a real ``Trainer`` and the
test checks what the seed promises it does.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from torch.optim import SGD, Adam
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from accel_trainer import Trainer, TrainingModule
from helpers import Regressor, TwoPart, loader


def _raw(optimizer):
    """The torch optimizer behind a prepared (Accelerate-wrapped) one."""
    return getattr(optimizer, "optimizer", optimizer)


def _lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def _scripted(values, epoch):
    return torch.tensor(float(values[epoch]))


# ------------------------------------------------------------------------------------------
# Learning rate scheduling
# ------------------------------------------------------------------------------------------


class NoScheduler(Regressor):
    # no LR scheduler
    def configure_optimizers(self):
        self.adam = Adam(self.parameters(), lr=0.01)
        return self.adam


def test_no_lr_scheduler(trainer_kwargs):
    module = NoScheduler()
    before = [p.detach().clone() for p in module.parameters()]
    n_batches, epochs = 4, 2
    trainer = Trainer(max_epochs=epochs, **trainer_kwargs)
    trainer.fit(module, loader(n=8 * n_batches, batch_size=8))

    assert trainer.optimizer_steps == [n_batches * epochs]
    assert trainer.global_step == n_batches * epochs
    assert trainer.lr_schedulers == []
    assert len(trainer.optimizers) == 1 and _raw(trainer.optimizers[0]) is module.adam
    after = list(module.parameters())
    assert all(not torch.equal(b, a.detach()) for b, a in zip(before, after))
    # No scheduler: the learning rate is untouched.
    assert _lr(module.adam) == 0.01


class AdamPlateau(Regressor):
    """``return [Adam(...)], [ReduceLROnPlateau()]`` with a scripted val_loss per epoch."""

    def __init__(self, val_losses, factor):
        super().__init__()
        self.val_losses = val_losses
        self.factor = factor
        self.epoch_lrs = []

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", _scripted(self.val_losses, self.current_epoch))

    def on_train_epoch_start(self):
        self.epoch_lrs.append(_lr(self.trainer.optimizers[0]))

    # Adam + LR scheduler
    def configure_optimizers(self):
        adam = Adam(self.parameters(), lr=0.01)
        self.plateau = ReduceLROnPlateau(adam, factor=self.factor, patience=0)
        return [adam], [self.plateau]


def test_adam_with_reduce_lr_on_plateau(trainer_kwargs):
    # val_loss improves once (1.0 -> 0.5) and then stalls: with patience=0 the plateau
    # scheduler reduces after every epoch whose val_loss does not improve on the best,
    # i.e. after epoch 2 and again after epoch 3.
    val_losses = [1.0, 0.5, 0.5, 0.5]
    factor = 0.5
    base = 0.01
    module = AdamPlateau(val_losses, factor)
    trainer = Trainer(max_epochs=len(val_losses), **trainer_kwargs)
    trainer.fit(module, loader(16, 8), loader(16, 8))

    cfg = trainer.lr_schedulers[0]
    assert len(trainer.lr_schedulers) == 1
    assert cfg.monitor == "val_loss"  # the default
    assert cfg.interval == "epoch" and cfg.opt_idx == 0
    assert module.plateau.best == min(val_losses)

    first_stall = next(e for e in range(1, len(val_losses)) if val_losses[e] >= min(val_losses[:e]))
    assert first_stall == 2
    expected = [base if e <= first_stall else base * factor ** (e - first_stall) for e in range(len(val_losses))]
    assert module.epoch_lrs == pytest.approx(expected)
    # The plateau scheduler also stepped after the last epoch.
    assert _lr(trainer.optimizers[0]) == pytest.approx(base * factor ** (len(val_losses) - first_stall))
    assert trainer.optimizer_steps == [2 * len(val_losses)]


class TwoOptimizersBase(TwoPart):
    """TwoPart plus a scripted val_loss and a per-batch record of both learning rates."""

    def __init__(self, val_losses=None):
        super().__init__()
        self.val_losses = val_losses or []
        self.batch_lrs = []  # (epoch, lr of opt 0, lr of opt 1) at every batch start

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", _scripted(self.val_losses, self.current_epoch))

    def on_train_batch_start(self, batch, batch_idx):
        opts = self.trainer.optimizers
        self.batch_lrs.append((self.current_epoch, _lr(opts[0]), _lr(opts[1])))


class TwoWithSchedulers(TwoOptimizersBase):
    # Two optimziers each with a scheduler
    def configure_optimizers(self):
        adam = Adam(self.generator.parameters(), lr=0.01)
        sgd = SGD(self.discriminator.parameters(), lr=0.1)
        self.plateau = ReduceLROnPlateau(adam, factor=0.1, patience=0)
        self.lambda_lr = LambdaLR(sgd, lambda epoch: 0.5**epoch)
        return [adam, sgd], [self.plateau, self.lambda_lr]


def test_two_optimizers_each_with_a_scheduler(trainer_kwargs):
    epochs, n_batches = 3, 2
    module = TwoWithSchedulers(val_losses=[1.0] * epochs)  # never improves after epoch 0
    trainer = Trainer(max_epochs=epochs, **trainer_kwargs)
    trainer.fit(module, loader(8 * n_batches, 8), loader(8, 8))

    cfgs = trainer.lr_schedulers
    assert [c.opt_idx for c in cfgs] == [0, 1]
    assert [c.interval for c in cfgs] == ["epoch", "epoch"]
    assert trainer.optimizer_steps == [epochs * n_batches, epochs * n_batches]

    # LambdaLR steps once per epoch; the plateau reduces (factor 0.1) after every epoch but the first.
    for e in range(epochs):
        lrs = {(lr0, lr1) for (ep, lr0, lr1) in module.batch_lrs if ep == e}
        assert len(lrs) == 1, f"an epoch scheduler changed the LR inside epoch {e}: {lrs}"
        lr0, lr1 = lrs.pop()
        assert lr1 == pytest.approx(0.1 * 0.5**e)
        assert lr0 == pytest.approx(0.01 * 0.1 ** max(0, e - 1))
    assert module.lambda_lr.last_epoch == epochs  # also stepped after the last epoch
    assert _lr(trainer.optimizers[1]) == pytest.approx(0.1 * 0.5**epochs)
    assert _lr(trainer.optimizers[0]) == pytest.approx(0.01 * 0.1 ** (epochs - 1))


class TwoWithSchedulerDict(TwoOptimizersBase):
    def __init__(self, recalls, val_losses):
        super().__init__(val_losses=val_losses)
        self.recalls = recalls
        self.epoch_recalls = []

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", _scripted(self.val_losses, self.current_epoch))
        self.log("val_recall", _scripted(self.recalls, self.current_epoch))

    def on_train_epoch_end(self):
        self.epoch_recalls.append(float(self.trainer.callback_metrics["val_recall"]))

    # Same as above with additional params passed to the first scheduler
    def configure_optimizers(self):
        optimizers = [Adam(self.generator.parameters(), lr=0.01), SGD(self.discriminator.parameters(), lr=0.1)]
        self.plateau = ReduceLROnPlateau(optimizers[0], mode="max", patience=7)
        self.lambda_lr = LambdaLR(optimizers[1], lambda epoch: 0.9**epoch)
        schedulers = [
            {
                "scheduler": self.plateau,
                "monitor": "val_recall",  # Default: val_loss
                "interval": "epoch",
                "frequency": 1,
            },
            self.lambda_lr,
        ]
        return optimizers, schedulers


def test_scheduler_dict_monitoring_val_recall(trainer_kwargs):
    recalls = [0.2, 0.6, 0.4]
    val_losses = [5.0, 4.0, 3.0]  # decreasing, so a plateau fed val_loss would end with another best
    module = TwoWithSchedulerDict(recalls, val_losses)
    trainer = Trainer(max_epochs=len(recalls), **trainer_kwargs)
    trainer.fit(module, loader(16, 8), loader(16, 8))

    first, second = trainer.lr_schedulers
    assert first.monitor == "val_recall"
    assert first["interval"] == "epoch" and first["frequency"] == 1
    assert first.opt_idx == 0
    assert second.opt_idx == 1 and second["interval"] == "epoch" and second.monitor is None

    assert module.epoch_recalls == pytest.approx(recalls)
    # mode='max' on val_recall: the best is the largest recall, one bad epoch since.
    assert module.plateau.best == pytest.approx(max(module.epoch_recalls))
    assert module.plateau.num_bad_epochs == len(recalls) - 1 - recalls.index(max(recalls))
    # patience=7: no reduction in 3 epochs; LambdaLR stepped once per epoch.
    assert {lr0 for _, lr0, _ in module.batch_lrs} == {0.01}
    for e in range(len(recalls)):
        lr1s = [lr1 for ep, _, lr1 in module.batch_lrs if ep == e]
        assert lr1s and lr1s == pytest.approx([0.1 * 0.9**e] * len(lr1s))


# ------------------------------------------------------------------------------------------
# Use multiple optimizers (like GANs)
# ------------------------------------------------------------------------------------------


class TwoNoSchedulers(TwoPart):
    """Records the order of training_step calls and real optimizer steps."""

    def __init__(self):
        super().__init__()
        self.events = []
        self._current = None

    def training_step(self, batch, batch_idx, optimizer_idx):
        self._current = (self.current_epoch, batch_idx)
        self.events.append(("train", self.current_epoch, batch_idx, optimizer_idx))
        return super().training_step(batch, batch_idx, optimizer_idx)

    def on_fit_start(self):
        for i, opt in enumerate(self.trainer.optimizers):
            _raw(opt).register_step_post_hook(self._post_hook(i))

    def _post_hook(self, i):
        def hook(optimizer, args, kwargs):
            self.events.append(("step", *self._current, i))

        return hook

    # two optimizers, no schedulers
    def configure_optimizers(self):
        return Adam(self.generator.parameters(), lr=0.01), SGD(self.discriminator.parameters(), lr=0.01)


def test_two_optimizers_called_sequentially(trainer_kwargs):
    epochs, n_batches = 2, 3
    module = TwoNoSchedulers()
    trainer = Trainer(max_epochs=epochs, **trainer_kwargs)
    trainer.fit(module, loader(8 * n_batches, 8))

    # for epoch: for batch: for opt: train_step(opt); opt.step()
    expected = [
        (kind, e, b, i)
        for e in range(epochs)
        for b in range(n_batches)
        for i in (0, 1)
        for kind in ("train", "step")
    ]
    assert module.events == expected
    assert trainer.lr_schedulers == []
    assert trainer.optimizer_steps == [epochs * n_batches] * 2
    assert trainer.global_step == epochs * n_batches
    # while optimizer i trains, only its own parameters require grad
    for _, opt_idx, _, (gen_grad, disc_grad) in module.calls:
        assert (gen_grad, disc_grad) == ((True, False) if opt_idx == 0 else (False, True))


class TwoOneScheduler(TwoOptimizersBase):
    # Two optimizers, one scheduler for adam only
    def configure_optimizers(self):
        adam = Adam(self.generator.parameters(), lr=0.01)
        self.plateau = ReduceLROnPlateau(adam, factor=0.5, patience=0)
        return [adam, SGD(self.discriminator.parameters(), lr=0.1)], [self.plateau]


def test_two_optimizers_one_scheduler_for_adam_only(trainer_kwargs):
    epochs, n_batches = 3, 2
    module = TwoOneScheduler(val_losses=[2.0, 2.0, 2.0])
    trainer = Trainer(max_epochs=epochs, **trainer_kwargs)
    trainer.fit(module, loader(8 * n_batches, 8), loader(8, 8))

    assert len(trainer.lr_schedulers) == 1
    cfg = trainer.lr_schedulers[0]
    assert cfg.opt_idx == 0 and cfg.monitor == "val_loss"
    assert trainer.optimizer_steps == [epochs * n_batches] * 2
    for e in range(epochs):
        lrs = [(lr0, lr1) for ep, lr0, lr1 in module.batch_lrs if ep == e]
        assert lrs and lrs == [(pytest.approx(0.01 * 0.5 ** max(0, e - 1)), 0.1)] * len(lrs)
    assert _lr(trainer.optimizers[0]) == pytest.approx(0.01 * 0.5 ** (epochs - 1))
    assert _lr(trainer.optimizers[1]) == 0.1  # SGD has no scheduler


# ------------------------------------------------------------------------------------------
# Step optimizers at arbitrary intervals
# ------------------------------------------------------------------------------------------


class PlainOptimizerStep(Regressor):
    def optimizer_step(self, current_epoch, batch_nb, optimizer, optimizer_i, second_order_closure=None):
        optimizer.step()
        optimizer.zero_grad()


def test_plain_optimizer_step_override(trainer_kwargs):
    module = PlainOptimizerStep()
    before = [p.detach().clone() for p in module.parameters()]
    trainer = Trainer(max_epochs=2, **trainer_kwargs)
    trainer.fit(module, loader(24, 8))
    assert trainer.optimizer_steps == [6]
    assert trainer.global_step == 6
    assert all(not torch.equal(b, a.detach()) for b, a in zip(before, module.parameters()))


class Alternating(TwoPart):
    def __init__(self):
        super().__init__()
        self.stepped_on = ([], [])  # (epoch, batch_idx) of each real step, per optimizer
        self._batch = None

    def on_train_batch_start(self, batch, batch_idx):
        self._batch = (self.current_epoch, batch_idx)

    def on_fit_start(self):
        for i, opt in enumerate(self.trainer.optimizers):
            _raw(opt).register_step_post_hook(self._post_hook(i))

    def _post_hook(self, i):
        def hook(optimizer, args, kwargs):
            self.stepped_on[i].append(self._batch)

        return hook

    # Alternating schedule for optimizer steps (ie: GANs)
    def optimizer_step(self, current_epoch, batch_nb, optimizer, optimizer_i, second_order_closure=None):
        # update generator opt every 2 steps
        if optimizer_i == 0:
            if batch_nb % 2 == 0:
                optimizer.step()
                optimizer.zero_grad()

        # update discriminator opt every 4 steps
        if optimizer_i == 1:
            if batch_nb % 4 == 0:
                optimizer.step()
                optimizer.zero_grad()

        # ...
        # add as many optimizers as you want


@pytest.mark.parametrize("epochs, n_batches", [(1, 8), (2, 6)])
def test_alternating_optimizer_step(trainer_kwargs, epochs, n_batches):
    module = Alternating()
    trainer = Trainer(max_epochs=epochs, **trainer_kwargs)
    trainer.fit(module, loader(8 * n_batches, 8))

    gen = [(e, b) for e in range(epochs) for b in range(n_batches) if b % 2 == 0]
    disc = [(e, b) for e in range(epochs) for b in range(n_batches) if b % 4 == 0]
    assert module.stepped_on == (gen, disc)
    assert trainer.optimizer_steps == [len(gen), len(disc)]
    assert trainer.global_step == epochs * n_batches
    if (epochs, n_batches) == (1, 8):
        assert trainer.optimizer_steps == [4, 2]


class SeedWarmup(Regressor):
    def __init__(self, hparams):
        super().__init__()
        self.hparams = hparams
        self.used_lrs = []

    def configure_optimizers(self):
        return SGD(self.parameters(), lr=self.hparams.learning_rate)

    def on_fit_start(self):
        # Registered after the trainer's own hooks: sees the LR the step really uses.
        _raw(self.trainer.optimizers[0]).register_step_pre_hook(
            lambda opt, args, kwargs: self.used_lrs.append(opt.param_groups[0]["lr"])
        )

    # learning rate warm-up
    def optimizer_step(self, current_epoch, batch_nb, optimizer, optimizer_i, second_order_closure=None):
        # warm up lr
        if self.trainer.global_step < 500:
            lr_scale = min(1., float(self.trainer.global_step + 1) / 500.)
            for pg in optimizer.param_groups:
                pg['lr'] = lr_scale * self.hparams.learning_rate

        # update params
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("as_namespace", [False, True], ids=["dict", "namespace"])
def test_learning_rate_warmup_override(trainer_kwargs, as_namespace):
    lr = 0.2
    hparams = {"learning_rate": lr}
    if as_namespace:
        hparams = argparse.Namespace(**hparams)
    module = SeedWarmup(hparams)
    assert module.hparams.learning_rate == lr
    epochs, n_batches = 2, 4
    trainer = Trainer(max_epochs=epochs, **trainer_kwargs)
    trainer.fit(module, loader(8 * n_batches, 8))

    n_steps = epochs * n_batches
    assert trainer.optimizer_steps == [n_steps]
    assert module.used_lrs == pytest.approx([(k + 1) / 500.0 * lr for k in range(n_steps)])


class SignatureProbe(Regressor):
    def __init__(self):
        super().__init__()
        self.records = []
        self.losses = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(float(loss.detach()))
        return loss

    def optimizer_step(self, *args, **kwargs):
        closure_value = args[4]() if len(args) > 4 and callable(args[4]) else None
        self.records.append((args, kwargs, self.trainer.global_step, closure_value))
        optimizer = args[2]
        optimizer.step()
        optimizer.zero_grad()


def test_optimizer_step_receives_seed_positional_arguments(trainer_kwargs):
    module = SignatureProbe()
    epochs, n_batches = 2, 3
    trainer = Trainer(max_epochs=epochs, **trainer_kwargs)
    trainer.fit(module, loader(8 * n_batches, 8))

    assert len(module.records) == epochs * n_batches
    for args, kwargs, _, _ in module.records:
        assert len(args) == 5 and kwargs == {}
        assert args[2] is trainer.optimizers[0]
        assert args[3] == 0
        assert callable(args[4])
    assert [r[0][0] for r in module.records] == [e for e in range(epochs) for _ in range(n_batches)]
    assert [r[0][1] for r in module.records] == list(range(n_batches)) * epochs
    assert [r[2] for r in module.records] == list(range(epochs * n_batches))  # 0 during the first batch
    # the closure's first call returns this batch's loss
    assert [float(r[3]) for r in module.records] == pytest.approx(module.losses)
    assert trainer.optimizer_steps == [epochs * n_batches]


def test_plain_module_training_step_with_two_arguments(trainer_kwargs):
    """The seed's modules subclass TrainingModule directly; a 2-argument training_step is fine."""

    class Tiny(TrainingModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def configure_optimizers(self):
            return Adam(self.parameters(), lr=0.01)

    module = Tiny()
    trainer = Trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(module, loader(16, 8))
    assert trainer.optimizer_steps == [2]

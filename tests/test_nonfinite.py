"""The non-finite policy covers gradients as well as the loss (issue 15, point 1).

Faults are injected the way they happen: a NaN loss, and a finite loss whose backward
overflows (a gradient hook multiplies by inf). "raise" must name what was non-finite (loss or
gradients, which optimizer, epoch, batch); "skip" must decide before the optimizer steps, so
a skipped step leaves the weights and the optimizer state untouched.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from accel_trainer import Callback, Trainer
from accel_trainer.errors import TrainingError
from accel_trainer.nonfinite import NonFiniteGuard
from accel_trainer.toggle import OptimizerToggle
from helpers import Regressor, TwoPart, loader

AT = (1, 3)  # (epoch, batch_idx) of the injected fault; 8 batches per epoch


def _blow_up(tensor: torch.Tensor) -> None:
    """The backward through ``tensor`` overflows: its gradient becomes inf (NaN where it was 0)."""
    tensor.register_hook(lambda g: g * float("inf"))


class InfGradients(Regressor):
    """A finite loss whose gradients are non-finite at ``AT``."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        if (self.current_epoch, batch_idx) == AT:
            _blow_up(out)
        return torch.nn.functional.mse_loss(out, y)


class NaNLoss(Regressor):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if (self.current_epoch, batch_idx) == AT else loss


class Snapshots(Callback):
    """Weights and optimizer state before and after the batch at ``AT``."""

    def __init__(self, at: tuple[int, int] = AT) -> None:
        self.at = at
        self.before: dict = {}
        self.after: dict = {}

    @staticmethod
    def _take(trainer, module) -> dict:
        opt = trainer.optimizers[0].optimizer
        state = {f"state.{i}.{k}": v.clone() for i, s in enumerate(opt.state.values()) for k, v in s.items() if torch.is_tensor(v)}
        return {**{n: p.detach().clone() for n, p in module.named_parameters()}, **state}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.at:
            self.before = self._take(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.at:
            self.after = self._take(trainer, module)


def _finite(module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


# -- raise (default) --------------------------------------------------------------------------------
def test_nonfinite_gradients_raise_naming_gradients_optimizer_epoch_batch_and_parameters(trainer_kwargs):
    model = InfGradients()
    trainer = Trainer(max_epochs=2, **trainer_kwargs)
    with pytest.raises(TrainingError) as info:
        trainer.fit(model, loader(64, 8))
    message = str(info.value)
    assert "gradients of optimizer 0" in message and "non-finite" in message, message
    assert "epoch 1, batch_idx 3" in message and "loss was finite" in message, message
    assert "'net.weight'" in message and "'net.bias'" in message, message
    # on the CPU the flag is read before the optimizer steps: the bad step was never taken
    assert trainer.optimizer_steps == [8 + 3]
    assert _finite(model)


def test_a_nonfinite_loss_is_named_as_the_loss(trainer_kwargs):
    trainer = Trainer(max_epochs=2, **trainer_kwargs)
    with pytest.raises(TrainingError, match=r"training_step returned a non-finite loss \(nan on rank 0.*epoch 1, batch_idx 3, optimizer 0"):
        trainer.fit(NaNLoss(), loader(64, 8))


def test_deferred_read_raises_one_batch_later_with_the_same_precise_message(trainer_kwargs, monkeypatch):
    """What accelerators do (no device sync per step): the flag of batch k is read during batch k+1."""
    monkeypatch.setattr(NonFiniteGuard, "force_deferred", True)
    model = InfGradients()
    trainer = Trainer(max_epochs=2, **trainer_kwargs)
    with pytest.raises(TrainingError) as info:
        trainer.fit(model, loader(64, 8))
    message = str(info.value)
    assert "gradients of optimizer 0" in message and "epoch 1, batch_idx 3" in message, message
    assert "read one batch later" in message and "that optimizer step was taken" in message, message
    # batch 3's step was taken; batch 4 raised before its own step
    assert trainer.optimizer_steps == [8 + 4]
    assert trainer.global_step == 8 + 4  # raised inside batch 4, before it completed


def test_deferred_read_happens_before_the_epoch_end_checkpoint(trainer_kwargs, monkeypatch, tmp_path):
    """A fault on an epoch's last batch raises before last.ckpt is written from those weights."""
    monkeypatch.setattr(NonFiniteGuard, "force_deferred", True)

    class LastBatch(InfGradients):
        def training_step(self, batch, batch_idx):
            x, y = batch
            out = self(x)
            if (self.current_epoch, batch_idx) == (0, 7):
                _blow_up(out)
            return torch.nn.functional.mse_loss(out, y)

    trainer = Trainer(max_epochs=2, **trainer_kwargs)
    with pytest.raises(TrainingError, match="epoch 0, batch_idx 7"):
        trainer.fit(LastBatch(), loader(64, 8))
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_nonfinite_gradients_of_the_second_optimizer_name_it(trainer_kwargs):
    class BlowsUpDiscriminator(TwoPart):
        def training_step(self, batch, batch_idx, optimizer_idx):
            x, _ = batch
            fake = self.generator(x)
            if optimizer_idx == 0:
                return -self.discriminator(fake).mean()
            score = self.discriminator(fake.detach())
            if (self.current_epoch, batch_idx) == AT:
                _blow_up(score)
            return score.mean() - self.discriminator(x).mean()

    trainer = Trainer(max_epochs=2, **trainer_kwargs)
    with pytest.raises(TrainingError) as info:
        trainer.fit(BlowsUpDiscriminator(), loader(64, 8))
    message = str(info.value)
    assert "gradients of optimizer 1" in message and "epoch 1, batch_idx 3" in message, message
    assert "'discriminator.weight'" in message and "generator" not in message, message
    assert trainer.optimizer_steps == [8 + 4, 8 + 3]  # the generator stepped on that batch, the discriminator not


def test_a_nonfinite_loss_in_an_accumulation_window_raises_at_its_batch(trainer_kwargs):
    trainer = Trainer(max_epochs=2, gradient_accumulation_steps=2, **trainer_kwargs)
    with pytest.raises(TrainingError, match="non-finite loss.*epoch 1, batch_idx 2"):

        class NaNEarly(Regressor):
            def training_step(self, batch, batch_idx):
                loss = super().training_step(batch, batch_idx)
                return loss * float("nan") if (self.current_epoch, batch_idx) == (1, 2) else loss

        trainer.fit(NaNEarly(), loader(64, 8))
    assert trainer.optimizer_steps == [4 + 1]


# -- skip (opt-in) ----------------------------------------------------------------------------------
@pytest.mark.parametrize("model_cls", [InfGradients, NaNLoss], ids=["gradients", "loss"])
def test_skip_decides_before_the_step_and_leaves_weights_and_state_untouched(trainer_kwargs, model_cls):
    model = model_cls()
    snap = Snapshots()
    trainer = Trainer(max_epochs=2, on_nonfinite_loss="skip", callbacks=[snap], **trainer_kwargs)
    with pytest.warns(UserWarning, match=r"skipped the step of optimizer 0 at epoch 1, batch_idx 3: its (gradients were|loss was) non-finite"):
        trainer.fit(model, loader(64, 8))
    assert snap.before and snap.before.keys() == snap.after.keys()
    for name, value in snap.before.items():
        assert torch.equal(value, snap.after[name]), f"{name} changed in the skipped step"
    assert trainer.optimizer_steps == [16 - 1] and trainer.global_step == 16
    assert trainer.nonfinite_skips == 1
    assert _finite(model)
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_skip_warns_at_the_first_skip_then_as_the_count_doubles(trainer_kwargs):
    class AlwaysNaN(Regressor):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * float("nan")

    trainer = Trainer(max_epochs=2, on_nonfinite_loss="skip", **trainer_kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(AlwaysNaN(), loader(64, 8))
    counts = [int(m.group(1)) for w in caught if (m := re.search(r"(\d+) step\(s\) skipped so far", str(w.message)))]
    assert counts == [1, 2, 4, 8, 16]
    assert trainer.nonfinite_skips == 16 and trainer.optimizer_steps == [0]


def test_skip_with_accumulation_skips_the_whole_window(trainer_kwargs):
    class NaNEarly(Regressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if (self.current_epoch, batch_idx) == (1, 2) else loss

    snap = Snapshots(at=(1, 3))  # the boundary batch of the window (batches 2 and 3)
    trainer = Trainer(max_epochs=2, gradient_accumulation_steps=2, on_nonfinite_loss="skip", callbacks=[snap], **trainer_kwargs)
    with pytest.warns(UserWarning, match="skipped the step"):
        trainer.fit(NaNEarly(), loader(64, 8))
    assert trainer.optimizer_steps == [8 - 1] and trainer.global_step == 8
    for name, value in snap.before.items():
        assert torch.equal(value, snap.after[name]), name


# -- toggling stays linear ----------------------------------------------------------------------------
def _count_toggles(monkeypatch) -> list[int]:
    calls = [0]
    original = torch.Tensor.requires_grad_

    def counted(self, flag=True):
        calls[0] += 1
        return original(self, flag)

    monkeypatch.setattr(torch.Tensor, "requires_grad_", counted)
    return calls


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_toggling_costs_grow_linearly_with_the_number_of_optimizers(monkeypatch, n):
    params = [[torch.nn.Parameter(torch.ones(1)) for _ in range(4)] for _ in range(n)]
    toggle = OptimizerToggle(params)
    calls = _count_toggles(monkeypatch)
    seen = []
    for i in range(n):
        toggle.enter(i)
        seen.append([[p.requires_grad for p in ps] for ps in params])
    toggle.restore()
    total = 4 * n
    # off for the first turn, 2 x 4 per change of turn, back on at the end: 4 x total, not n x 2 x total
    assert calls[0] == (total - 4) + (n - 1) * 8 + (total - 4) <= 4 * total
    for i, flags in enumerate(seen):
        assert flags == [[j == i] * 4 for j in range(n)]
    assert all(p.requires_grad for ps in params for p in ps)


def test_toggling_keeps_shared_frozen_and_unowned_parameters_as_documented():
    shared, frozen, alone = (torch.nn.Parameter(torch.ones(1)) for _ in range(3))
    frozen.requires_grad_(False)
    a, b, c = (torch.nn.Parameter(torch.ones(1)) for _ in range(3))
    outside = torch.nn.Parameter(torch.ones(1))  # in no optimizer: never touched
    toggle = OptimizerToggle([[a, shared], [b, shared, frozen], [c, alone]])
    expected = {
        0: dict(a=True, b=False, c=False, shared=True, frozen=False, alone=False),
        1: dict(a=False, b=True, c=False, shared=True, frozen=False, alone=False),
        2: dict(a=False, b=False, c=True, shared=False, frozen=False, alone=True),
    }
    named = dict(a=a, b=b, c=c, shared=shared, frozen=frozen, alone=alone)
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0], [2, 1]):
        for i in order:
            toggle.enter(i)
            assert {k: p.requires_grad for k, p in named.items()} == expected[i], (order, i)
            assert outside.requires_grad
        toggle.restore()
        assert {k: p.requires_grad for k, p in named.items()} == dict(a=True, b=True, c=True, shared=True, frozen=False, alone=True)

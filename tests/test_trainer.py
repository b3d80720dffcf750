"""The training loop of CONTRACT.md: order, counters, accumulation, clipping, closures,
manual optimization, validation scheduling, limits, seeding, precision, evaluation entry
points, data sources, hook order, properties and error handling."""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from accel_trainer import Callback, DataModule, Trainer, TrainingModule
from accel_trainer.errors import ConfigurationError, TrainingError
from helpers import Regressor, TwoPart, loader, regression_data


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(before, module):
    return any(not torch.equal(before[n], p.detach()) for n, p in module.named_parameters())


# ---------------------------------------------------------------------------------------------
# order of the loop, toggling, signatures
# ---------------------------------------------------------------------------------------------


def test_two_optimizers_batch_major_order_toggling_and_counters(trainer_kwargs):
    model = TwoPart()
    trainer = Trainer(max_epochs=2, **trainer_kwargs)
    trainer.fit(model, loader(64, 8))  # 8 batches per epoch

    n = 8
    expected = [(b, i) for _ in range(2) for b in range(n) for i in (0, 1)]
    assert [(c[0], c[1]) for c in model.calls] == expected
    # global_step seen in training_step: boundaries so far (0 during the first batch)
    assert [c[2] for c in model.calls] == [e * n + b for e in range(2) for b in range(n) for _ in (0, 1)]
    # only the current optimizer's parameters require grad
    for _, opt_idx, _, (gen_grad, disc_grad) in model.calls:
        assert (gen_grad, disc_grad) == ((True, False) if opt_idx == 0 else (False, True))
    # restored afterwards
    assert all(p.requires_grad for p in model.parameters())
    # global_step counts boundaries, not the sum over optimizers
    assert trainer.global_step == 2 * n
    assert trainer.optimizer_steps == [2 * n, 2 * n]
    assert trainer.current_epoch == 2


class _FrozenRecorder(TwoPart):
    def training_step(self, batch, batch_idx, optimizer_idx):
        self.flags.append((optimizer_idx, {n: p.requires_grad for n, p in self.named_parameters()}))
        return super().training_step(batch, batch_idx, optimizer_idx)


def test_user_frozen_parameter_stays_frozen(trainer_kwargs):
    model = _FrozenRecorder()
    model.flags = []
    model.discriminator.bias.requires_grad_(False)
    frozen_bias = model.discriminator.bias.detach().clone()
    Trainer(max_epochs=1, **trainer_kwargs).fit(model, loader(32, 8))

    assert len(model.flags) == 8
    for opt_idx, flags in model.flags:
        assert flags["discriminator.bias"] is False
        if opt_idx == 0:
            assert flags["generator.weight"] and flags["generator.bias"]
            assert not flags["discriminator.weight"]
        else:
            assert not flags["generator.weight"] and not flags["generator.bias"]
            assert flags["discriminator.weight"]
    assert model.discriminator.bias.requires_grad is False
    assert model.discriminator.weight.requires_grad
    assert model.generator.weight.requires_grad and model.generator.bias.requires_grad
    assert torch.equal(model.discriminator.bias.detach(), frozen_bias)


class _ArgCounter(Regressor):
    def training_step(self, batch, batch_idx, *rest):
        self.extra_args.append(len(rest))
        self.batch_indices.append((self.current_epoch, batch_idx))
        return super().training_step(batch, batch_idx)


def test_one_optimizer_two_arg_signature_and_batch_idx_restart(trainer_kwargs):
    model = _ArgCounter()
    model.extra_args, model.batch_indices = [], []
    before = _params(model)
    trainer = Trainer(max_epochs=3, **trainer_kwargs)
    trainer.fit(model, loader(32, 8))  # 4 batches
    assert model.extra_args == [0] * 12  # no optimizer_idx with a single optimizer
    assert model.batch_indices == [(e, b) for e in range(3) for b in range(4)]
    assert _changed(before, model)
    assert trainer.global_step == 12 and trainer.optimizer_steps == [12]


def test_plain_two_argument_training_step_trains(trainer_kwargs):
    model = Regressor()
    data = regression_data(64)
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(model(data.tensors[0]), data.tensors[1]).item()
    Trainer(max_epochs=3, **trainer_kwargs).fit(model, loader(64, 8))
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(model(data.tensors[0]), data.tensors[1]).item()
    assert after < before


# ---------------------------------------------------------------------------------------------
# None / dict returns
# ---------------------------------------------------------------------------------------------


class _SkipsDiscriminator(TwoPart):
    """Optimizer 1 is skipped (training_step returns None) on odd batches."""

    def __init__(self):
        super().__init__()
        self.step_calls, self.backward_for = [], []

    def training_step(self, batch, batch_idx, optimizer_idx):
        self._current = (batch_idx, optimizer_idx)
        out = super().training_step(batch, batch_idx, optimizer_idx)
        if optimizer_idx == 1 and batch_idx % 2 == 1:
            return None
        return out

    def on_after_backward(self):
        self.backward_for.append(self._current)

    def optimizer_step(self, current_epoch, batch_nb, optimizer, optimizer_i, second_order_closure=None):
        self.step_calls.append((batch_nb, optimizer_i, self.trainer.global_step))
        super().optimizer_step(current_epoch, batch_nb, optimizer, optimizer_i, second_order_closure)


def test_none_skips_backward_step_and_counting(trainer_kwargs):
    model = _SkipsDiscriminator()
    trainer = Trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(model, loader(64, 8))  # 8 batches
    expected_steps = [(b, i) for b in range(8) for i in (0, 1) if not (i == 1 and b % 2 == 1)]
    assert [(b, i) for b, i, _ in model.step_calls] == expected_steps
    assert model.backward_for == expected_steps
    # global_step inside optimizer_step is the number of boundaries before this batch
    assert [g for _, _, g in model.step_calls] == [b for b, _ in expected_steps]
    assert trainer.optimizer_steps == [8, 4]
    assert trainer.global_step == 8


class _DictReturn(Regressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.losses.append(loss.item())
        return {"loss": loss, "log": {"dict_logged": loss.detach() * 2}, "progress_bar": {"pb": loss.detach()},
                "extra": "ignored"}


def test_dict_return_with_log_and_progress_bar(trainer_kwargs):
    model = _DictReturn()
    model.losses = []
    before = _params(model)
    trainer = Trainer(max_epochs=1, log_every_n_steps=1, **trainer_kwargs)
    trainer.fit(model, loader(32, 8))
    assert _changed(before, model)
    assert trainer.optimizer_steps == [4]
    assert trainer.logged_metrics["dict_logged"] == pytest.approx(2 * model.losses[-1], rel=1e-5)
    import csv

    with open(os.path.join(trainer.log_dir, "metrics.csv"), newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("dict_logged")]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [float(r["dict_logged"]) for r in rows] == pytest.approx([2 * v for v in model.losses], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# global_step and gradient accumulation
# ---------------------------------------------------------------------------------------------


class _AccumRecorder(Regressor):
    def __init__(self, lr=0.1):
        super().__init__(lr=lr)
        self.seen_steps, self.step_calls = [], []

    def training_step(self, batch, batch_idx):
        self.seen_steps.append(self.trainer.global_step)
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def optimizer_step(self, current_epoch, batch_nb, optimizer, optimizer_i, second_order_closure=None):
        self.step_calls.append((batch_nb, self.trainer.global_step))
        super().optimizer_step(current_epoch, batch_nb, optimizer, optimizer_i, second_order_closure)


def test_gradient_accumulation_counts_and_matches_hand_computed_update(trainer_kwargs):
    lr = 0.1
    model = _AccumRecorder(lr=lr)
    reference = copy.deepcopy(model.net)
    trainer = Trainer(max_epochs=1, gradient_accumulation_steps=2, **trainer_kwargs)
    dl = loader(64, 8)  # 8 batches -> 4 boundaries
    trainer.fit(model, dl)

    assert trainer.global_step == 4
    assert trainer.optimizer_steps == [4]
    assert model.step_calls == [(1, 0), (3, 1), (5, 2), (7, 3)]
    assert model.seen_steps == [0, 0, 1, 1, 2, 2, 3, 3]

    # hand-computed: mean of the two batch gradients, one SGD step per pair
    batches = list(dl)
    for k in range(0, 8, 2):
        reference.zero_grad()
        for x, y in batches[k : k + 2]:
            (torch.nn.functional.mse_loss(reference(x), y) / 2).backward()
        with torch.no_grad():
            for p in reference.parameters():
                p -= lr * p.grad
    for p, q in zip(model.net.parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_two_optimizers(trainer_kwargs):
    model = TwoPart()
    trainer = Trainer(max_epochs=1, gradient_accumulation_steps=2, **trainer_kwargs)
    trainer.fit(model, loader(64, 8))
    assert trainer.global_step == 4
    assert trainer.optimizer_steps == [4, 4]
    assert [c[2] for c in model.calls] == [b // 2 for b in range(8) for _ in (0, 1)]


# ---------------------------------------------------------------------------------------------
# clipping
# ---------------------------------------------------------------------------------------------


class _BigGrad(Regressor):
    def __init__(self):
        super().__init__(lr=1e-3)
        self.pre, self.post, self.first_update = [], [], None

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 1000.0 * torch.nn.functional.mse_loss(self(x), y)

    def on_after_backward(self):
        grads = [p.grad.detach().clone() for p in self.parameters()]
        self.pre.append(grads)

    def on_before_optimizer_step(self, optimizer):
        self.post.append([p.grad.detach().clone() for p in self.parameters()])
        self._before = [p.detach().clone() for p in self.parameters()]

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.first_update is None:
            self.first_update = [p.detach() - b for p, b in zip(self.parameters(), self._before)]


def _total_norm(grads):
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


def test_gradient_clip_norm(trainer_kwargs):
    clip = 0.5
    model = _BigGrad()
    Trainer(max_epochs=1, gradient_clip_val=clip, **trainer_kwargs).fit(model, loader(32, 8))
    assert len(model.post) == 4
    assert all(_total_norm(g) > 10 * clip for g in model.pre)  # clipping had work to do
    for g in model.post:
        assert _total_norm(g) <= clip * (1 + 1e-4)
    # the step used the clipped gradient: ||delta|| = lr * ||clipped grad||
    assert _total_norm(model.first_update) == pytest.approx(1e-3 * _total_norm(model.post[0]), rel=1e-3)


def test_gradient_clip_value(trainer_kwargs):
    clip = 0.05
    model = _BigGrad()
    Trainer(max_epochs=1, gradient_clip_val=clip, gradient_clip_algorithm="value", **trainer_kwargs).fit(
        model, loader(32, 8)
    )
    assert len(model.post) == 4
    assert all(max(g.abs().max().item() for g in grads) > 10 * clip for grads in model.pre)
    for grads in model.post:
        assert max(g.abs().max().item() for g in grads) <= clip + 1e-7
        # value clipping clamps element-wise: every element of a huge gradient sits at +-clip
        assert all(torch.allclose(g.abs(), torch.full_like(g, clip)) for g in grads)


# ---------------------------------------------------------------------------------------------
# LBFGS
# ---------------------------------------------------------------------------------------------


class _LBFGSModule(Regressor):
    def __init__(self):
        super().__init__()
        self.n_calls = 0

    def training_step(self, batch, batch_idx):
        self.n_calls += 1
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=5)


def test_lbfgs_uses_closure_and_decreases_loss(trainer_kwargs):
    model = _LBFGSModule()
    data = regression_data(32)
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(model(data.tensors[0]), data.tensors[1]).item()
    trainer = Trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(model, loader(32, 8))  # 4 batches
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(model(data.tensors[0]), data.tensors[1]).item()
    assert model.n_calls > 4  # the closure re-evaluated the loss
    assert trainer.optimizer_steps == [4]
    assert after < 0.5 * before


def test_lbfgs_with_accumulation_is_a_configuration_error(trainer_kwargs):
    model = _LBFGSModule()
    trainer = Trainer(max_epochs=1, gradient_accumulation_steps=2, **trainer_kwargs)
    with pytest.raises(ConfigurationError, match="gradient_accumulation_steps") as info:
        trainer.fit(model, loader(32, 8))
    assert "LBFGS" in str(info.value)
    assert model.n_calls == 0


# ---------------------------------------------------------------------------------------------
# manual optimization
# ---------------------------------------------------------------------------------------------


class _Manual(Regressor):
    def __init__(self):
        super().__init__(lr=0.1)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        sched = self.lr_schedulers()
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.manual_backward(loss)
        if batch_idx % 2 == 0:
            opt.step()
            opt.zero_grad()
            sched.step()
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


def test_manual_optimization(trainer_kwargs):
    model = _Manual()
    before = _params(model)
    trainer = Trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(model, loader(64, 8))  # 8 batches, a step on the 4 even ones
    assert _changed(before, model)
    assert trainer.optimizer_steps == [4]
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)


def test_manual_optimization_with_accumulation_is_a_configuration_error(trainer_kwargs):
    trainer = Trainer(max_epochs=1, gradient_accumulation_steps=2, **trainer_kwargs)
    with pytest.raises(ConfigurationError, match="gradient_accumulation_steps"):
        trainer.fit(_Manual(), loader(32, 8))


# ---------------------------------------------------------------------------------------------
# validation scheduling, limits, stopping
# ---------------------------------------------------------------------------------------------


class _ValRecorder(Regressor):
    def __init__(self):
        super().__init__()
        self.val_runs, self.val_batches, self.train_batches = [], [], 0

    def training_step(self, batch, batch_idx):
        self.train_batches += 1
        return super().training_step(batch, batch_idx)

    def on_validation_start(self):
        self.val_runs.append((self.current_epoch, self.global_step))
        self.val_batches.append(0)

    def validation_step(self, batch, batch_idx):
        self.val_batches[-1] += 1
        return super().validation_step(batch, batch_idx)


def test_val_check_interval_float(trainer_kwargs):
    model = _ValRecorder()
    Trainer(max_epochs=2, val_check_interval=0.5, **trainer_kwargs).fit(model, loader(64, 8), loader(16, 8))
    assert model.val_runs == [(0, 4), (0, 8), (1, 12), (1, 16)]


def test_val_check_interval_int(trainer_kwargs):
    model = _ValRecorder()
    Trainer(max_epochs=1, val_check_interval=2, **trainer_kwargs).fit(model, loader(48, 8), loader(16, 8))
    assert model.val_runs == [(0, 2), (0, 4), (0, 6)]


def test_check_val_every_n_epoch(trainer_kwargs):
    model = _ValRecorder()
    Trainer(max_epochs=4, check_val_every_n_epoch=2, **trainer_kwargs).fit(model, loader(16, 8), loader(16, 8))
    assert [e for e, _ in model.val_runs] == [1, 3]


@pytest.mark.parametrize(
    "limit_train, limit_val, train_per_epoch, val_per_run",
    [(3, 2, 3, 2), (0.25, 0.5, 2, 2), (None, None, 8, 4)],
)
def test_limit_batches(trainer_kwargs, limit_train, limit_val, train_per_epoch, val_per_run):
    model = _ValRecorder()
    trainer = Trainer(max_epochs=2, limit_train_batches=limit_train, limit_val_batches=limit_val, **trainer_kwargs)
    trainer.fit(model, loader(64, 8), loader(32, 8))  # 8 train batches, 4 val batches
    assert model.train_batches == 2 * train_per_epoch
    assert trainer.global_step == 2 * train_per_epoch
    assert model.val_batches == [val_per_run, val_per_run]


def test_max_steps_stops_exactly_and_writes_last(trainer_kwargs):
    model = _ValRecorder()
    trainer = Trainer(max_steps=11, **trainer_kwargs)
    trainer.fit(model, loader(32, 8))  # 4 batches per epoch
    assert trainer.global_step == 11
    assert model.train_batches == 11
    assert trainer.optimizer_steps == [11]
    last = os.path.join(trainer_kwargs["default_root_dir"], "checkpoints", "last.ckpt")
    assert os.path.isfile(last)
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["loops"]["global_step"] == 11
    assert torch.equal(ckpt["state_dict"]["net.weight"], model.net.weight.detach())


def test_max_epochs(trainer_kwargs):
    model = _ValRecorder()
    trainer = Trainer(max_epochs=3, **trainer_kwargs)
    trainer.fit(model, loader(32, 8), loader(16, 8))
    assert trainer.current_epoch == 3
    assert trainer.global_step == 12
    assert model.train_batches == 12
    assert [e for e, _ in model.val_runs] == [0, 1, 2]


class _Dropout(TrainingModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _seeded_run(tmp_path, name, seed, disturb):
    model = _Dropout()
    torch.manual_seed(disturb)  # the global RNG differs between runs: only seed= may make them agree
    trainer = Trainer(max_epochs=2, seed=seed, cpu=True, enable_progress_bar=False, default_root_dir=str(tmp_path / name))
    torch.rand(disturb)
    trainer.fit(model, loader(32, 8, shuffle=True))
    return [p.detach().clone() for p in model.parameters()]


def test_seed_gives_identical_runs(tmp_path):
    a = _seeded_run(tmp_path, "a", seed=7, disturb=11)
    b = _seeded_run(tmp_path, "b", seed=7, disturb=23)
    c = _seeded_run(tmp_path, "c", seed=8, disturb=11)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


class _SanityRecorder(Regressor):
    def __init__(self):
        super().__init__()
        self.events = []

    def training_step(self, batch, batch_idx):
        self.events.append(("train", batch_idx))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.events.append(("sanity" if self.trainer.sanity_checking else "val", batch_idx))
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y) + (100.0 if self.trainer.sanity_checking else 0.0))


def test_num_sanity_val_steps(trainer_kwargs):
    model = _SanityRecorder()
    trainer = Trainer(max_epochs=1, num_sanity_val_steps=2, **trainer_kwargs)
    trainer.fit(model, loader(16, 8), loader(32, 8))  # 2 train, 4 val batches
    assert model.events == [("sanity", 0), ("sanity", 1), ("train", 0), ("train", 1)] + [("val", b) for b in range(4)]
    assert float(trainer.callback_metrics["val_loss"]) < 100.0  # sanity values discarded

    model = _SanityRecorder()
    Trainer(max_epochs=1, num_sanity_val_steps=0, **{**trainer_kwargs, "default_root_dir": trainer_kwargs["default_root_dir"] + "/b"}).fit(
        model, loader(16, 8), loader(32, 8)
    )
    assert model.events[0] == ("train", 0)


# ---------------------------------------------------------------------------------------------
# bf16 on CPU
# ---------------------------------------------------------------------------------------------


class _DtypeRecorder(Regressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        self.dtypes.append(out.dtype)
        loss = torch.nn.functional.mse_loss(out.float(), y)
        self.losses.append(loss.item())
        return loss


def test_bf16_on_cpu(trainer_kwargs):
    model = _DtypeRecorder()
    model.dtypes, model.losses = [], []
    before = _params(model)
    trainer = Trainer(max_epochs=2, mixed_precision="bf16", **trainer_kwargs)
    trainer.fit(model, loader(32, 8))
    assert trainer.accelerator.mixed_precision == "bf16"
    assert set(model.dtypes) == {torch.bfloat16}  # the forward ran under bf16 autocast
    assert all(math.isfinite(v) for v in model.losses)
    assert _changed(before, model)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.losses[-1] < model.losses[0]


# ---------------------------------------------------------------------------------------------
# validate / test / data sources
# ---------------------------------------------------------------------------------------------


class _ReturnsLoss(Regressor):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_mse", torch.nn.functional.mse_loss(self(x), y))
        self.log("test_max_abs", (self(x) - y).abs().max(), reduce_fx="max")


def test_validate_returns_sample_weighted_val_loss(trainer_kwargs):
    model = _ReturnsLoss()
    data = regression_data(20, seed=3)
    dl = DataLoader(data, batch_size=8)  # 8, 8, 4: uneven
    trainer = Trainer(**trainer_kwargs)
    results = trainer.validate(model, dl)
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(model(data.tensors[0]), data.tensors[1]).item()
        batch_means = [torch.nn.functional.mse_loss(model(x), y).item() for x, y in dl]
    assert abs(sum(batch_means) / 3 - expected) > 1e-4  # an unweighted mean would differ
    assert isinstance(results, list) and len(results) == 1 and isinstance(results[0], dict)
    assert results[0]["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(expected, rel=1e-5)


def test_test_returns_list_of_dicts(trainer_kwargs):
    model = _ReturnsLoss()
    data = regression_data(20, seed=4)
    trainer = Trainer(**trainer_kwargs)
    results = trainer.test(model, DataLoader(data, batch_size=8))
    with torch.no_grad():
        out = model(data.tensors[0])
        mse = torch.nn.functional.mse_loss(out, data.tensors[1]).item()
        max_abs = (out - data.tensors[1]).abs().max().item()
    assert isinstance(results, list) and len(results) == 1
    assert results[0]["test_mse"] == pytest.approx(mse, rel=1e-5)
    assert results[0]["test_max_abs"] == pytest.approx(max_abs, rel=1e-6)


class _OwnData(_ValRecorder):
    def train_dataloader(self):
        return loader(24, 8)

    def val_dataloader(self):
        return loader(16, 8)


def test_module_dataloaders_are_used(trainer_kwargs):
    model = _OwnData()
    trainer = Trainer(max_epochs=2, **trainer_kwargs)
    trainer.fit(model)
    assert model.train_batches == 6
    assert model.val_batches == [2, 2]
    assert trainer.global_step == 6


class _DM(DataModule):
    def __init__(self):
        self.calls = []

    def prepare_data(self):
        self.calls.append("prepare_data")

    def setup(self, stage):
        self.calls.append(f"setup:{stage}")
        self.train = regression_data(40)
        self.val = regression_data(24, seed=1)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=8)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=8)


def test_datamodule(trainer_kwargs):
    dm = _DM()
    model = _ValRecorder()
    trainer = Trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(model, datamodule=dm)
    assert dm.calls[:2] == ["prepare_data", "setup:fit"]
    assert model.train_batches == 5
    assert model.val_batches == [3]
    results = trainer.validate(model, datamodule=dm)
    assert "setup:validate" in dm.calls
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(model(dm.val.tensors[0]), dm.val.tensors[1]).item()
    assert results[0]["val_loss"] == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# hook order
# ---------------------------------------------------------------------------------------------

_HOOKS = [
    "on_fit_start", "on_train_start", "on_train_epoch_start", "on_train_batch_start", "on_before_backward",
    "on_after_backward", "on_before_optimizer_step", "on_train_batch_end", "on_validation_start",
    "on_validation_epoch_start", "on_validation_batch_start", "on_validation_batch_end", "on_validation_epoch_end",
    "on_validation_end", "on_train_epoch_end", "on_train_end", "on_fit_end",
]


def _recording_class(base, prefix, with_trainer_args):
    def make(name):
        if with_trainer_args:
            def hook(self, trainer, module, *args):
                self.record.append(f"{prefix}.{name}")
        else:
            def hook(self, *args):
                self.record.append(f"{prefix}.{name}")
        return hook

    return type(f"Rec{prefix}", (base,), {name: make(name) for name in _HOOKS})


class _HookModule(_recording_class(Regressor, "mod", False)):
    def training_step(self, batch, batch_idx):
        self.record.append("mod.training_step")
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.record.append("mod.validation_step")
        return super().validation_step(batch, batch_idx)

    def optimizer_step(self, *args):
        self.record.append("mod.optimizer_step")
        super().optimizer_step(*args)


def test_hook_order_one_epoch(trainer_kwargs):
    record = []
    model = _HookModule()
    model.record = record
    cb = _recording_class(Callback, "cb", True)()
    cb.record = record
    Trainer(max_epochs=1, callbacks=[cb], **trainer_kwargs).fit(model, loader(16, 8), loader(16, 8))

    def both(name):
        return [f"cb.{name}", f"mod.{name}"]

    expected = both("on_fit_start") + both("on_train_start") + both("on_train_epoch_start")
    for _ in range(2):
        expected += both("on_train_batch_start") + ["mod.training_step"] + both("on_before_backward")
        expected += both("on_after_backward") + both("on_before_optimizer_step") + ["mod.optimizer_step"]
        expected += both("on_train_batch_end")
    expected += both("on_validation_start") + both("on_validation_epoch_start")
    for _ in range(2):
        expected += both("on_validation_batch_start") + ["mod.validation_step"] + both("on_validation_batch_end")
    expected += both("on_validation_epoch_end") + both("on_validation_end")
    expected += both("on_train_epoch_end") + both("on_train_end") + both("on_fit_end")
    assert record == expected


# ---------------------------------------------------------------------------------------------
# properties and hparams
# ---------------------------------------------------------------------------------------------


class _Views(Regressor):
    def training_step(self, batch, batch_idx):
        t = self.trainer
        self.views.append((t, self.current_epoch, t.current_epoch, self.global_step, t.global_step, self.device))
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


def test_trainer_and_module_properties(trainer_kwargs):
    from accelerate import Accelerator

    model = _Views(lr=0.2)
    model.views = []
    trainer = Trainer(max_epochs=2, log_every_n_steps=1, **trainer_kwargs)
    trainer.fit(model, loader(16, 8), loader(16, 8))

    assert trainer.global_step == 4 and trainer.current_epoch == 2
    assert trainer.optimizer_steps == [2 * 2]
    assert len(trainer.optimizers) == 1
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.2 * 0.5**2)
    assert len(trainer.lr_schedulers) == 1
    cfg = trainer.lr_schedulers[0]
    assert cfg.interval == "epoch" and cfg["interval"] == "epoch" and cfg.frequency == 1 and cfg.opt_idx == 0
    assert set(trainer.callback_metrics) >= {"train_loss", "val_loss"}
    assert set(trainer.logged_metrics) >= {"train_loss", "val_loss"}
    assert isinstance(trainer.accelerator, Accelerator)
    assert trainer.is_global_zero is True
    assert trainer.world_size == 1
    assert os.path.isfile(os.path.join(trainer.log_dir, "metrics.csv"))

    assert [(v[1], v[3]) for v in model.views] == [(0, 0), (0, 1), (1, 2), (1, 3)]
    for t, ep, tep, gs, tgs, device in model.views:
        assert t is trainer and ep == tep and gs == tgs and device == torch.device("cpu")
    assert model.trainer is trainer


def test_hparams_namespace_dict_and_save_hyperparameters(trainer_kwargs):
    class FromNamespace(Regressor):
        def __init__(self, ns):
            super().__init__()
            self.hparams = ns

    model = FromNamespace(argparse.Namespace(lr=0.25, note="x"))
    assert model.hparams.lr == 0.25 and model.hparams.note == "x"
    trainer = Trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(model, loader(16, 8))
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.25

    model.hparams = {"lr": 0.5}
    assert model.hparams.lr == 0.5

    r = Regressor(lr=0.03, features=4)
    assert dict(r.hparams) == {"lr": 0.03, "features": 4}
    assert r.hparams.lr == 0.03
    with open(os.path.join(trainer.log_dir, "hparams.json")) as f:
        assert json.load(f)["lr"] == 0.25


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

_BAD_ARGS = [
    ("mixed_precision", "fp32", ["fp32", "bf16", "fp16"]),
    ("gradient_clip_algorithm", "l2", ["l2", "norm", "value"]),
    ("val_check_interval", 0, ["val_check_interval"]),
    ("val_check_interval", 1.5, ["val_check_interval", "1.5"]),
    ("on_nonfinite_loss", "ignore", ["ignore", "raise", "skip"]),
    ("max_steps", -2, ["max_steps", "-2"]),
    ("max_epochs", -1, ["max_epochs", "-1"]),
    ("log_with", "mlflow", ["mlflow", "csv"]),
    ("gradient_accumulation_steps", 0, ["gradient_accumulation_steps", "0"]),
    ("gradient_clip_val", -1.0, ["gradient_clip_val", "-1.0"]),
    ("limit_train_batches", 1.5, ["limit_train_batches", "1.5"]),
    ("limit_val_batches", -1, ["limit_val_batches", "-1"]),
    ("check_val_every_n_epoch", 0, ["check_val_every_n_epoch", "0"]),
    ("num_sanity_val_steps", -1, ["num_sanity_val_steps", "-1"]),
    ("log_every_n_steps", 0, ["log_every_n_steps", "0"]),
    ("check_rank_sync_every_n_steps", 0, ["check_rank_sync_every_n_steps", "0"]),
    ("seed", "abc", ["seed", "abc"]),
    ("project_name", "", ["project_name"]),
    ("callbacks", [object()], ["object", "Callback"]),
    ("callbacks", "ModelCheckpoint", ["callbacks", "ModelCheckpoint"]),
    ("accelerator", "cuda", ["accelerator", "cuda"]),
]


@pytest.mark.parametrize("name, value, fragments", _BAD_ARGS, ids=[f"{a[0]}={a[1]!r}" for a in _BAD_ARGS])
def test_invalid_trainer_argument(trainer_kwargs, name, value, fragments):
    with pytest.raises(ConfigurationError) as info:
        Trainer(**{**trainer_kwargs, name: value})
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize(
    "name, value",
    [("cpu", "yes"), ("enable_progress_bar", "no"), ("default_root_dir", 123)],
)
def test_invalid_trainer_argument_types(trainer_kwargs, name, value):
    """Arguments typed bool/path in CONTRACT.md: a wrong type is a configuration error too."""
    with pytest.raises(ConfigurationError) as info:
        Trainer(**{**trainer_kwargs, name: value})
    assert name in str(info.value) and repr(value) in str(info.value)


class _BadReturn(Regressor):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def training_step(self, batch, batch_idx):
        x, y = batch
        per_sample = (self(x) - y) ** 2
        if self.kind == "vector":
            return per_sample
        if self.kind == "string":
            return "loss"
        return {"los": per_sample.mean()}


def test_non_scalar_loss_names_shape(trainer_kwargs):
    with pytest.raises(ConfigurationError, match=re.escape("(8, 1)")):
        Trainer(max_epochs=1, **trainer_kwargs).fit(_BadReturn("vector"), loader(16, 8))


@pytest.mark.parametrize("kind, fragment", [("string", "str"), ("dict", "loss")])
def test_bad_training_step_returns(trainer_kwargs, kind, fragment):
    with pytest.raises(ConfigurationError, match=fragment):
        Trainer(max_epochs=1, **trainer_kwargs).fit(_BadReturn(kind), loader(16, 8))


class _NaNAt(Regressor):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        if self.current_epoch == 1 and batch_idx == 3:
            loss = loss * float("nan")
        return loss


def test_nonfinite_loss_raises_training_error(trainer_kwargs):
    model = _NaNAt()
    trainer = Trainer(max_epochs=2, **trainer_kwargs)
    with pytest.raises(TrainingError) as info:
        trainer.fit(model, loader(64, 8))
    message = str(info.value)
    assert re.search(r"epoch\D{0,3}1\b", message), message
    assert re.search(r"batch(_idx)?\D{0,3}3\b", message), message
    assert trainer.optimizer_steps == [8 + 3]  # no step for the NaN batch
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_loss_skip(trainer_kwargs):
    model = _NaNAt()
    trainer = Trainer(max_epochs=2, on_nonfinite_loss="skip", **trainer_kwargs)
    trainer.fit(model, loader(64, 8))
    assert trainer.optimizer_steps == [16 - 1]
    assert trainer.global_step == 16
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _CountsSteps(Regressor):
    def __init__(self):
        super().__init__()
        self.n = 0

    def training_step(self, batch, batch_idx):
        self.n += 1
        return super().training_step(batch, batch_idx)


def test_empty_dataloader_is_a_configuration_error(trainer_kwargs):
    empty = DataLoader(TensorDataset(torch.zeros(5, 4), torch.zeros(5, 1)), batch_size=8, drop_last=True)
    model = _CountsSteps()
    with pytest.raises(ConfigurationError, match="length 0"):
        Trainer(max_epochs=1, **trainer_kwargs).fit(model, empty)
    assert model.n == 0
    with pytest.raises(ConfigurationError):
        Trainer(max_epochs=1, **trainer_kwargs).fit(model, loader(16, 8), DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0, 1))))
    assert model.n == 0


def test_lbfgs_under_fp16_is_refused_before_training(trainer_kwargs, monkeypatch):
    """The fp16 scaler would re-run an LBFGS closure on scaled gradients: refuse it up front."""
    from accel_trainer.errors import ConfigurationError

    # fp16 without a GPU is itself refused when the Trainer is built (issue 13); switch that check
    # off so that this CPU machine still reaches the LBFGS rule, which is what this test is about.
    monkeypatch.setattr("accel_trainer.trainer.check_precision_device", lambda accelerator: None)

    class LBFGSRegressor(Regressor):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters(), lr=0.1)

        def training_step(self, batch, batch_idx):
            self.calls = getattr(self, "calls", 0) + 1
            return super().training_step(batch, batch_idx)

    module = LBFGSRegressor()
    trainer = Trainer(max_epochs=1, mixed_precision="fp16", **trainer_kwargs)
    with pytest.raises(ConfigurationError, match="LBFGS.*fp16|fp16.*LBFGS|closure"):
        trainer.fit(module, loader())
    assert getattr(module, "calls", 0) == 0

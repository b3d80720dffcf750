"""Callbacks (base, ModelCheckpoint, EarlyStopping, LearningRateMonitor), ``last.ckpt`` and
resuming from checkpoints."""

from __future__ import annotations

import csv
import os

import pytest
import torch
from torch.utils.data import DataLoader

from accel_trainer import Callback, Trainer, TrainingModule
from accel_trainer.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from accel_trainer.errors import CheckpointError, ConfigurationError
from helpers import Regressor, TwoPart, loader, regression_data

NB = 4  # training batches per epoch of loader(32, 8)


def _ckpt_dir(trainer_kwargs):
    return os.path.join(trainer_kwargs["default_root_dir"], "checkpoints")


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _kept(directory):
    """Checkpoint files other than last.ckpt, mapped to the global_step stored in them."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".ckpt") and name != "last.ckpt":
            path = os.path.join(directory, name)
            out[path] = _load(path)["loops"]["global_step"]
    return out


# ---------------------------------------------------------------------------------------------
# Callback base
# ---------------------------------------------------------------------------------------------


class _Dispatch(Callback):
    def __init__(self):
        self.calls = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.calls.append(("train_batch_start", trainer, module, len(batch[0]), batch_idx))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.calls.append(("train_batch_end", trainer, module, outputs, batch_idx))

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self.calls.append(("val_batch_end", trainer, module, len(batch[0]), batch_idx))

    def on_train_epoch_end(self, trainer, module):
        self.calls.append(("train_epoch_end", trainer, module, trainer.current_epoch, None))


def test_callback_hooks_receive_trainer_module_and_arguments(trainer_kwargs):
    cb = _Dispatch()
    model = Regressor()
    trainer = Trainer(max_epochs=1, callbacks=[cb], **trainer_kwargs)
    trainer.fit(model, DataLoader(regression_data(20), batch_size=8), loader(16, 8))
    assert all(c[1] is trainer and c[2] is model for c in cb.calls)
    kinds = [(c[0], c[4]) for c in cb.calls]
    assert kinds == [
        ("train_batch_start", 0), ("train_batch_end", 0),
        ("train_batch_start", 1), ("train_batch_end", 1),
        ("train_batch_start", 2), ("train_batch_end", 2),
        ("val_batch_end", 0), ("val_batch_end", 1),
        ("train_epoch_end", None),
    ]
    assert [c[3] for c in cb.calls if c[0] == "train_batch_start"] == [8, 8, 4]
    # outputs of on_train_batch_end: what training_step returned (the loss)
    outputs = [c[3] for c in cb.calls if c[0] == "train_batch_end"]
    assert all(isinstance(o, torch.Tensor) and o.numel() == 1 for o in outputs)
    assert cb.calls[-1][3] == 0  # 0-based epoch inside on_train_epoch_end


class _Stateful(Callback):
    def __init__(self):
        self.epochs_seen = 0
        self.loaded = None

    def on_train_epoch_end(self, trainer, module):
        self.epochs_seen += 1

    def state_dict(self):
        return {"epochs_seen": self.epochs_seen}

    def load_state_dict(self, state_dict):
        self.loaded = dict(state_dict)
        self.epochs_seen = state_dict["epochs_seen"]


def test_callback_state_dict_round_trip(trainer_kwargs):
    first = _Stateful()
    Trainer(max_epochs=2, callbacks=[first], **trainer_kwargs).fit(Regressor(), loader(32, 8))
    saved = _load(os.path.join(_ckpt_dir(trainer_kwargs), "last.ckpt"))["callbacks"]
    assert saved[first.state_key] == {"epochs_seen": 2}

    second = _Stateful()
    Trainer(max_epochs=3, callbacks=[second], **trainer_kwargs).fit(Regressor(), loader(32, 8), ckpt_path="last")
    assert second.loaded == {"epochs_seen": 2}
    assert second.epochs_seen == 3


# ---------------------------------------------------------------------------------------------
# ModelCheckpoint
# ---------------------------------------------------------------------------------------------


class _Scored(Regressor):
    """Logs ``score`` = ``seq[epoch]`` in validation."""

    def __init__(self, seq):
        super().__init__()
        self.seq = seq

    def validation_step(self, batch, batch_idx):
        self.log("score", float(self.seq[self.current_epoch]))


def _fit_scored(trainer_kwargs, seq, callbacks, **kw):
    trainer = Trainer(max_epochs=kw.pop("max_epochs", len(seq)), callbacks=callbacks, **trainer_kwargs, **kw)
    trainer.fit(_Scored(seq), loader(32, 8), loader(16, 8))
    return trainer


SEQ = [5.0, 3.0, 4.0, 1.0, 2.0, 6.0]


@pytest.mark.parametrize("mode", ["min", "max"])
def test_model_checkpoint_top_k(trainer_kwargs, mode):
    k = 2
    cb = ModelCheckpoint(monitor="score", mode=mode, save_top_k=k)
    _fit_scored(trainer_kwargs, SEQ, [cb])
    ranked = sorted(range(len(SEQ)), key=lambda e: SEQ[e], reverse=(mode == "max"))
    best_epochs = sorted(ranked[:k])

    kept = _kept(_ckpt_dir(trainer_kwargs))
    assert len(kept) == k
    epochs_on_disk = sorted(gs // NB - 1 for gs in kept.values())
    assert epochs_on_disk == best_epochs
    assert set(cb.best_k_models) == set(kept)
    for path, gs in kept.items():
        assert cb.best_k_models[path] == pytest.approx(SEQ[gs // NB - 1])
    best = ranked[0]
    assert cb.best_model_score == pytest.approx(SEQ[best])
    assert cb.best_model_path in kept
    assert _load(cb.best_model_path)["loops"]["global_step"] == (best + 1) * NB


def test_model_checkpoint_save_top_k_all_and_none(trainer_kwargs, tmp_path):
    all_cb = ModelCheckpoint(dirpath=str(tmp_path / "all"), monitor="score", save_top_k=-1)
    none_cb = ModelCheckpoint(dirpath=str(tmp_path / "none"), monitor="score", save_top_k=0)
    _fit_scored(trainer_kwargs, SEQ, [all_cb, none_cb])
    kept = _kept(str(tmp_path / "all"))
    assert sorted(kept.values()) == [(e + 1) * NB for e in range(len(SEQ))]
    for path, gs in kept.items():
        assert all_cb.best_k_models[path] == pytest.approx(SEQ[gs // NB - 1])
    assert not os.path.isdir(tmp_path / "none") or _kept(str(tmp_path / "none")) == {}


def test_model_checkpoint_without_monitor_keeps_latest(trainer_kwargs, tmp_path):
    latest = ModelCheckpoint(dirpath=str(tmp_path / "one"))
    two = ModelCheckpoint(dirpath=str(tmp_path / "two"), save_top_k=2)
    _fit_scored(trainer_kwargs, SEQ[:4], [latest, two])
    assert sorted(_kept(str(tmp_path / "one")).values()) == [4 * NB]
    assert sorted(_kept(str(tmp_path / "two")).values()) == [3 * NB, 4 * NB]
    assert _load(latest.best_model_path)["loops"]["global_step"] == 4 * NB


def test_model_checkpoint_save_last(trainer_kwargs, tmp_path):
    d = tmp_path / "mine"
    cb = ModelCheckpoint(dirpath=str(d), monitor="score", save_last=True)
    trainer = _fit_scored(trainer_kwargs, SEQ[:3], [cb])
    last = d / "last.ckpt"
    assert last.is_file()
    assert _load(str(last))["loops"]["global_step"] == 3 * NB
    assert torch.equal(_load(str(last))["state_dict"]["net.weight"], trainer.lightning_module.net.weight.detach())


def test_model_checkpoint_every_n_epochs(trainer_kwargs):
    cb = ModelCheckpoint(save_top_k=-1, every_n_epochs=2)
    _fit_scored(trainer_kwargs, SEQ[:5], [cb])
    assert sorted(_kept(_ckpt_dir(trainer_kwargs)).values()) == [2 * NB, 4 * NB]


def test_model_checkpoint_every_n_train_steps(trainer_kwargs):
    cb = ModelCheckpoint(save_top_k=-1, every_n_train_steps=3)
    _fit_scored(trainer_kwargs, SEQ[:2], [cb])  # 8 steps
    kept = _kept(_ckpt_dir(trainer_kwargs))
    assert sorted(kept.values()) == [3, 6]
    for path, gs in kept.items():
        assert _load(path)["loops"]["optimizer_steps"] == [gs]


def test_model_checkpoint_unknown_monitor(trainer_kwargs):
    cb = ModelCheckpoint(monitor="never_logged")
    with pytest.raises(ConfigurationError, match="never_logged"):
        _fit_scored(trainer_kwargs, SEQ[:2], [cb])


# ---------------------------------------------------------------------------------------------
# EarlyStopping
# ---------------------------------------------------------------------------------------------


class _EpochCounter(Callback):
    def __init__(self):
        self.started = 0

    def on_train_epoch_start(self, trainer, module):
        self.started += 1


@pytest.mark.parametrize(
    "seq, mode, patience, min_delta, stop_epoch",
    [
        # best 4.0 at epoch 1; epochs 2 and 3 do not improve -> patience 2 exhausted at epoch 3
        ([5.0, 4.0, 4.5, 4.2, 3.0, 2.0, 1.0, 0.5], "min", 2, 0.0, 3),
        # an equal value is no improvement: best 2.0 at epoch 1, then 2.0, 2.0 -> epoch 3
        ([3.0, 2.0, 2.0, 2.0, 1.0, 0.5, 0.25, 0.1], "min", 2, 0.0, 3),
        # improvements smaller than min_delta do not count: 4.95 and 4.92 are not < 5 - 0.1
        ([5.0, 4.95, 4.92, 4.5, 4.0, 3.5, 3.0, 2.5], "min", 2, 0.1, 2),
        # max mode: best 3.0 at epoch 2, then 2.5, 2.9, 3.0 (equal is no improvement) -> epoch 5
        ([1.0, 2.0, 3.0, 2.5, 2.9, 3.0, 1.0, 1.0], "max", 3, 0.0, 5),
    ],
)
def test_early_stopping_stops_at_expected_epoch(trainer_kwargs, seq, mode, patience, min_delta, stop_epoch):
    counter = _EpochCounter()
    es = EarlyStopping(monitor="score", mode=mode, patience=patience, min_delta=min_delta)
    trainer = _fit_scored(trainer_kwargs, seq, [es, counter])
    assert counter.started == stop_epoch + 1
    assert trainer.current_epoch == stop_epoch + 1  # completed epochs, as in Lightning 2
    assert trainer.global_step == (stop_epoch + 1) * NB
    assert trainer.should_stop
    last = _load(os.path.join(_ckpt_dir(trainer_kwargs), "last.ckpt"))
    assert last["loops"]["global_step"] == (stop_epoch + 1) * NB


def test_early_stopping_without_min_delta_does_not_stop_on_small_improvements(trainer_kwargs):
    counter = _EpochCounter()
    es = EarlyStopping(monitor="score", mode="min", patience=1)
    seq = [5.0, 4.95, 4.92, 4.5, 4.0, 3.5]
    trainer = _fit_scored(trainer_kwargs, seq, [es, counter])
    assert counter.started == len(seq)
    assert trainer.current_epoch == len(seq)
    assert not trainer.should_stop


# ---------------------------------------------------------------------------------------------
# LearningRateMonitor
# ---------------------------------------------------------------------------------------------


def _csv(trainer):
    with open(os.path.join(trainer.log_dir, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_lr_monitor_two_optimizers(trainer_kwargs):
    lrm = LearningRateMonitor()
    trainer = Trainer(max_epochs=2, callbacks=[lrm], **trainer_kwargs)
    trainer.fit(TwoPart(lr=0.01), loader(32, 8))
    assert trainer.logged_metrics["lr-Adam"] == pytest.approx(0.01)
    assert trainer.logged_metrics["lr-SGD"] == pytest.approx(0.01)
    rows = [r for r in _csv(trainer) if r.get("lr-Adam")]
    assert len(rows) == 2  # epoch interval: once per epoch
    assert all(float(r["lr-SGD"]) == pytest.approx(0.01) for r in rows)


class _Groups(Regressor):
    def configure_optimizers(self):
        opt = torch.optim.SGD([{"params": [self.net.weight], "lr": 0.1}, {"params": [self.net.bias], "lr": 0.01}])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return [opt], [{"scheduler": sched, "interval": "epoch", "name": "my_lr"}]


def test_lr_monitor_scheduler_name_and_param_groups(trainer_kwargs):
    lrm = LearningRateMonitor(logging_interval="epoch")
    trainer = Trainer(max_epochs=3, callbacks=[lrm], **trainer_kwargs)
    trainer.fit(_Groups(), loader(32, 8))
    rows = [r for r in _csv(trainer) if r.get("my_lr/pg2")]
    assert len(rows) == 3
    first_key = "my_lr" if "my_lr" in rows[0] else "my_lr/pg1"
    # logged at the start of each epoch: the LR that epoch trains with (StepLR halves per epoch)
    assert [float(r[first_key]) for r in rows] == pytest.approx([0.1 * 0.5**e for e in range(3)])
    assert [float(r["my_lr/pg2"]) for r in rows] == pytest.approx([0.01 * 0.5**e for e in range(3)])
    assert not any(k.startswith("lr-SGD") for k in trainer.logged_metrics)


class _Warm(Regressor):
    def __init__(self):
        super().__init__(lr=0.2)
        self.used = []

    def on_train_start(self):
        inner = self.trainer.optimizers[0]
        while hasattr(inner, "optimizer"):
            inner = inner.optimizer
        inner.register_step_pre_hook(lambda opt, args, kwargs: self.used.append(opt.param_groups[0]["lr"]))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        return [opt], [{"scheduler": sched, "interval": "step", "warmup_steps": 4}]


def test_lr_monitor_includes_warmup_and_matches_used_lr(trainer_kwargs):
    lrm = LearningRateMonitor()
    model = _Warm()
    trainer = Trainer(max_epochs=2, log_every_n_steps=1, callbacks=[lrm], **trainer_kwargs)
    trainer.fit(model, loader(32, 8))  # 8 real steps
    n = 2 * NB
    expected = [0.2 * 0.9**k * min(1.0, (k + 1) / 4) for k in range(n)]
    assert model.used == pytest.approx(expected)
    logged = [h["lr-SGD"] for h in lrm.history]
    assert logged == pytest.approx(expected)
    rows = [r for r in _csv(trainer) if r.get("lr-SGD")]
    assert [int(r["step"]) for r in rows] == list(range(n))
    assert [float(r["lr-SGD"]) for r in rows] == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# last.ckpt and resuming
# ---------------------------------------------------------------------------------------------


class _LastChecker(Callback):
    def __init__(self, directory):
        self.directory = directory
        self.seen = []

    def on_train_epoch_start(self, trainer, module):
        path = os.path.join(self.directory, "last.ckpt")
        if trainer.current_epoch == 0:
            assert not os.path.exists(path)
            return
        loops = _load(path)["loops"]
        self.seen.append((trainer.current_epoch, loops["current_epoch"], loops["global_step"]))


def test_last_checkpoint_written_every_epoch(trainer_kwargs):
    checker = _LastChecker(_ckpt_dir(trainer_kwargs))
    Trainer(max_epochs=3, callbacks=[checker], **trainer_kwargs).fit(Regressor(), loader(32, 8))
    assert checker.seen == [(1, 1, NB), (2, 2, 2 * NB)]
    assert _load(os.path.join(_ckpt_dir(trainer_kwargs), "last.ckpt"))["loops"]["global_step"] == 3 * NB


class _Resumable(TrainingModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
        self.starts = []

    def on_train_start(self):
        t = self.trainer
        self.starts.append((t.current_epoch, t.global_step, list(t.optimizer_steps)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=0.01)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)]


def _run(root, max_epochs, ckpt_path=None):
    model = _Resumable()
    trainer = Trainer(max_epochs=max_epochs, seed=5, cpu=True, enable_progress_bar=False, default_root_dir=str(root))
    trainer.fit(model, loader(40, 8, shuffle=True), ckpt_path=ckpt_path)
    return model, trainer


def test_resume_from_last_is_bitwise_identical(tmp_path):
    nb = 5
    _run(tmp_path / "resumed", 2)
    resumed, t_resumed = _run(tmp_path / "resumed", 4, ckpt_path="last")
    straight, t_straight = _run(tmp_path / "straight", 4)

    assert resumed.starts == [(2, 2 * nb, [2 * nb])]
    assert t_resumed.current_epoch == 4 and t_resumed.global_step == 4 * nb
    assert t_resumed.optimizer_steps == [4 * nb]
    assert t_resumed.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 0.7**4)
    for (name, p), q in zip(resumed.named_parameters(), straight.parameters()):
        assert torch.equal(p, q), name


def test_missing_checkpoint_is_a_checkpoint_error(trainer_kwargs, tmp_path):
    with pytest.raises(CheckpointError):
        Trainer(max_epochs=1, **trainer_kwargs).fit(Regressor(), loader(16, 8), ckpt_path=str(tmp_path / "nope.ckpt"))


def _truncated_checkpoint(trainer_kwargs):
    Trainer(max_epochs=1, **trainer_kwargs).fit(Regressor(), loader(16, 8))
    data = open(os.path.join(_ckpt_dir(trainer_kwargs), "last.ckpt"), "rb").read()
    return data[: len(data) // 2]


_CORRUPT = {
    "text": lambda kw: b"this is not a checkpoint" * 10,
    "empty": lambda kw: b"",
    "random_bytes": lambda kw: bytes(torch.randint(0, 256, (512,), generator=torch.Generator().manual_seed(0)).tolist()),
    "truncated": _truncated_checkpoint,
    "not_a_dict": lambda kw: _saved_bytes([1, 2, 3]),
}


def _saved_bytes(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("kind", sorted(_CORRUPT))
def test_corrupt_checkpoint_is_a_checkpoint_error(trainer_kwargs, tmp_path, kind):
    bad = tmp_path / f"{kind}.ckpt"
    bad.write_bytes(_CORRUPT[kind](trainer_kwargs))
    model = Regressor()
    before = model.net.weight.detach().clone()
    with pytest.raises(CheckpointError):
        Trainer(max_epochs=2, **trainer_kwargs).fit(model, loader(16, 8), ckpt_path=str(bad))
    assert torch.equal(model.net.weight.detach(), before)  # nothing trained


def test_checkpoint_with_different_shapes_names_the_parameter(trainer_kwargs, tmp_path):
    Trainer(max_epochs=1, **trainer_kwargs).fit(Regressor(features=4), loader(16, 8))
    path = os.path.join(_ckpt_dir(trainer_kwargs), "last.ckpt")
    other = Regressor(features=5)
    data = DataLoader(regression_data(16, features=5), batch_size=8)
    with pytest.raises(CheckpointError, match=r"net\.weight"):
        Trainer(max_epochs=2, **{**trainer_kwargs, "default_root_dir": str(tmp_path / "b")}).fit(other, data, ckpt_path=path)



# ---------------------------------------------------------------------------------------------
# ModelCheckpoint / EarlyStopping when validation is not exactly once per epoch (issue 13)
# The expected numbers below are what PyTorch Lightning 2.6.6 does on the same job (run side
# by side: same data, schedule and callbacks; EarlyStopping/ModelCheckpoint/spy in that order).
# ---------------------------------------------------------------------------------------------


class _PerCheck(Regressor):
    """Logs ``score`` = ``seq[k]`` in the k-th validation run of fit; records events."""

    def __init__(self, seq):
        super().__init__()
        self.seq = seq
        self.k = 0
        self.events = []
        self.train_batches = 0

    def training_step(self, batch, batch_idx):
        self.train_batches += 1
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.log("score", float(self.seq[self.k]))

    def on_validation_end(self):
        self.k += 1

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.01)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)]


class _Spy(Callback):
    """After EarlyStopping and ModelCheckpoint (which run last): what they decided, per hook."""

    def __init__(self, es):
        self.es = es
        self.events = []

    def on_validation_end(self, trainer, module):
        self.events.append(("val_end", trainer.current_epoch, trainer.global_step, self.es.wait_count, trainer.should_stop))

    def on_train_epoch_end(self, trainer, module):
        self.events.append(("epoch_end", trainer.current_epoch, trainer.global_step, self.es.wait_count, trainer.should_stop))


def _fit_per_check(trainer_kwargs, seq, patience, **kw):
    es = EarlyStopping(monitor="score", patience=patience)
    mc = ModelCheckpoint(monitor="score", save_top_k=-1)
    spy = _Spy(es)
    module = _PerCheck(seq)
    # ModelCheckpoint listed first: it is moved after the other callbacks, as in Lightning
    trainer = Trainer(callbacks=[mc, es, spy], **trainer_kwargs, **kw)
    trainer.fit(module, loader(32, 8), loader(16, 8))
    return trainer, module, es, mc, spy


def _files(trainer_kwargs):
    return sorted(n for n in os.listdir(_ckpt_dir(trainer_kwargs)) if n != "last.ckpt")


SEQ_CHECKS = [5.0, 4.0, 4.5, 4.2, 3.0, 2.0, 1.0, 0.5]


def test_check_val_every_n_epoch_callbacks_act_after_each_validation(trainer_kwargs):
    """check_val_every_n_epoch=2: no error after epoch 0, patience counts validation checks."""
    trainer, module, es, mc, spy = _fit_per_check(trainer_kwargs, SEQ_CHECKS, patience=2, max_epochs=8, check_val_every_n_epoch=2)
    assert trainer.callbacks[-1] is mc  # ModelCheckpoint runs last
    assert [e[:5] for e in spy.events if e[0] == "val_end"] == [
        ("val_end", 1, 8, 0, False), ("val_end", 3, 16, 0, False), ("val_end", 5, 24, 1, False), ("val_end", 7, 32, 2, True),
    ]
    assert [e[3] for e in spy.events if e[0] == "epoch_end"] == [0, 0, 0, 0, 0, 1, 1, 2]  # epochs without validation count nothing
    assert es.stopped_epoch == 7 and trainer.current_epoch == 8 and trainer.global_step == 32
    assert _files(trainer_kwargs) == ["epoch=1-step=8.ckpt", "epoch=3-step=16.ckpt", "epoch=5-step=24.ckpt", "epoch=7-step=32.ckpt"]
    assert mc.best_model_score == 4.0 and mc.best_model_path.endswith("epoch=3-step=16.ckpt")


def test_check_val_every_n_epoch_non_strict_early_stopping_counts_checks_only(trainer_kwargs):
    """strict=False used to count the epochs without validation as non-improvements and stop early."""
    es = EarlyStopping(monitor="score", patience=1, strict=False)
    module = _PerCheck([3.0, 2.0, 1.0])  # improves at every validation
    trainer = Trainer(max_epochs=6, check_val_every_n_epoch=2, callbacks=[es], **trainer_kwargs)
    trainer.fit(module, loader(32, 8), loader(16, 8))
    assert trainer.current_epoch == 6 and not trainer.should_stop
    assert es.wait_count == 0 and es.best_score == 1.0


def test_val_check_interval_callbacks_act_after_each_validation(trainer_kwargs):
    trainer, module, es, mc, spy = _fit_per_check(trainer_kwargs, SEQ_CHECKS, patience=2, max_epochs=4, val_check_interval=0.5)
    assert [e for e in spy.events if e[0] == "val_end"] == [
        ("val_end", 0, 2, 0, False), ("val_end", 0, 4, 0, False), ("val_end", 1, 6, 1, False), ("val_end", 1, 8, 2, True),
    ]
    assert es.stopped_epoch == 1 and trainer.current_epoch == 2 and trainer.global_step == 8
    assert _files(trainer_kwargs) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=1-step=6.ckpt", "epoch=1-step=8.ckpt"]
    assert mc.best_model_path.endswith("epoch=0-step=4.ckpt")


def test_a_stop_decided_in_a_mid_epoch_validation_ends_the_epoch_there(trainer_kwargs):
    trainer, module, es, mc, spy = _fit_per_check(trainer_kwargs, SEQ_CHECKS, patience=1, max_epochs=4, val_check_interval=0.5)
    assert spy.events == [
        ("val_end", 0, 2, 0, False), ("val_end", 0, 4, 0, False), ("epoch_end", 0, 4, 0, False),
        ("val_end", 1, 6, 1, True), ("epoch_end", 1, 6, 1, True),
    ]
    assert module.train_batches == 6 and module.k == 3  # no batch and no validation after the stop
    assert es.stopped_epoch == 1 and trainer.current_epoch == 2 and trainer.global_step == 6
    last = _load(os.path.join(_ckpt_dir(trainer_kwargs), "last.ckpt"))["loops"]
    assert (last["current_epoch"], last["global_step"], last["batches_done_in_epoch"]) == (2, 6, 0)


def test_once_per_epoch_validation_keeps_acting_at_epoch_end(trainer_kwargs):
    trainer, module, es, mc, spy = _fit_per_check(trainer_kwargs, SEQ_CHECKS, patience=2, max_epochs=8)
    assert not trainer.monitor_at_validation_end
    # at the end of epoch e the spy (also an epoch-end hook, before the monitoring callbacks) sees the previous count
    assert trainer.global_step == 4 * NB and es.stopped_epoch == 3
    assert _files(trainer_kwargs) == [f"epoch={e}-step={(e + 1) * NB}.ckpt" for e in range(4)]


def test_checkpoint_at_most_once_per_global_step(trainer_kwargs):
    """Validation after every batch with gradient_accumulation_steps=2: two validations share a
    global_step, one file per step, nothing before the first step (Lightning's rule)."""
    mc = ModelCheckpoint(monitor="score", save_top_k=-1)
    module = _PerCheck([5.0, 4.0, 3.0, 2.0])
    trainer = Trainer(max_epochs=1, val_check_interval=1, gradient_accumulation_steps=2, callbacks=[mc], **trainer_kwargs)
    trainer.fit(module, loader(32, 8), loader(16, 8))
    assert module.k == 4  # validated after each of the 4 batches (global_step 0, 1, 1, 2)
    assert _files(trainer_kwargs) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"]
    assert mc.best_k_models[mc.best_model_path] == 2.0


def test_no_validation_data_callbacks_act_at_epoch_end(trainer_kwargs):
    """Without validation there is nothing to wait for (Lightning would never check with check_val_every_n_epoch=2)."""

    class TrainScore(Regressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_score", float(self.current_epoch), on_step=False, on_epoch=True)
            return loss

    mc = ModelCheckpoint(monitor="train_score", mode="max", save_top_k=-1)
    trainer = Trainer(max_epochs=3, check_val_every_n_epoch=2, callbacks=[mc], **trainer_kwargs)
    trainer.fit(TrainScore(), loader(32, 8))
    assert _files(trainer_kwargs) == [f"epoch={e}-step={(e + 1) * NB}.ckpt" for e in range(3)]


def test_callbacks_do_not_act_during_sanity_check_or_validate(trainer_kwargs):
    es = EarlyStopping(monitor="score", patience=0)
    mc = ModelCheckpoint(monitor="score", save_top_k=-1)
    module = _PerCheck([1.0] * 10)
    trainer = Trainer(max_epochs=1, val_check_interval=0.5, num_sanity_val_steps=1, callbacks=[es, mc], **trainer_kwargs)
    trainer.fit(module, loader(32, 8), loader(16, 8))
    # the sanity run (k=0) is not a check: best 1.0 at the first real validation, then one non-improvement
    assert es.wait_count == 1 and trainer.should_stop and trainer.global_step == 4
    trainer.validate(module, loader(16, 8))
    assert es.wait_count == 1 and len(_files(trainer_kwargs)) == 2  # validate() neither checks nor saves


class _ModuleCallbacks(Regressor):
    def __init__(self, cbs):
        super().__init__()
        self.cbs = cbs

    def configure_callbacks(self):
        return self.cbs


def test_configure_callbacks_replaces_same_type_and_orders_checkpoints_last(trainer_kwargs):
    trainer_es, module_es = EarlyStopping(monitor="val_loss", patience=5), EarlyStopping(monitor="val_loss", patience=1)
    mc, other = ModelCheckpoint(), _Stateful()
    trainer = Trainer(max_epochs=1, callbacks=[mc, trainer_es], **trainer_kwargs)
    trainer.fit(_ModuleCallbacks([module_es, other]), loader(16, 8), loader(16, 8))
    assert trainer.callbacks == [module_es, other, mc]
    assert trainer.early_stopping_callback is module_es and trainer.checkpoint_callback is mc
    assert other.epochs_seen == 1
    with pytest.raises(ConfigurationError, match="configure_callbacks"):
        Trainer(max_epochs=1, **trainer_kwargs).fit(_ModuleCallbacks([object()]), loader(16, 8))


# ---------------------------------------------------------------------------------------------
# LearningRateMonitor: Lightning's key names (issue 13). The expected key sets are the columns
# PyTorch Lightning 2.6.6's LearningRateMonitor(log_momentum=True) writes for the same optimizers.
# ---------------------------------------------------------------------------------------------


class _Optimizers(TrainingModule):
    """Manual optimization (any number of optimizers, any signature) with a chosen configure_optimizers."""

    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
        self.kind = kind
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opts = self.optimizers()
        for opt in opts if isinstance(opts, list) else [opts]:
            opt.zero_grad()
            x, y = batch
            self.manual_backward(torch.nn.functional.mse_loss(self.a(x) + self.b(x) + self.c(x), y))
            opt.step()

    def configure_optimizers(self):
        adam = lambda params, lr=0.01: torch.optim.Adam(params, lr=lr)  # noqa: E731
        a, b, c = self.a.parameters(), self.b.parameters(), self.c.parameters()
        kind = self.kind
        if kind == "one":
            return adam(self.parameters())
        if kind == "two_adam":
            return [adam(a), adam(b, 0.02)]
        if kind == "three_adam":
            return [adam(a), adam(b), adam(c)]
        if kind == "adam_sgd":
            return [adam(a), torch.optim.SGD(b, lr=0.1)]
        if kind == "groups":
            return adam([{"params": a}, {"params": b, "lr": 0.1}])
        if kind == "named":
            opt = adam(self.parameters())
            return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1), "name": "my_lr"}]
        if kind == "named_groups":
            opt = adam([{"params": a}, {"params": b, "lr": 0.1}])
            return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1), "name": "my_lr"}]
        if kind == "second_named":
            o1, o2 = adam(a), adam(b, 0.02)
            return [o1, o2], [{"scheduler": torch.optim.lr_scheduler.StepLR(o2, 1), "name": "gen"}]
        if kind == "second_scheduled":
            o1, o2 = adam(a), adam(b, 0.02)
            return [o1, o2], [torch.optim.lr_scheduler.StepLR(o2, 1)]
        if kind == "two_schedulers_one_optimizer":
            opt = adam(self.parameters())
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1), torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)]
        if kind == "sgd_momentum":
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        if kind == "named_param_group":
            return adam([{"params": a, "name": "head"}, {"params": b, "name": "body"}])
        raise AssertionError(kind)


_LIGHTNING_KEYS = {
    "one": ["lr-Adam", "lr-Adam-momentum"],
    "two_adam": ["lr-Adam", "lr-Adam-1", "lr-Adam-1-momentum", "lr-Adam-momentum"],
    "three_adam": ["lr-Adam", "lr-Adam-1", "lr-Adam-1-momentum", "lr-Adam-2", "lr-Adam-2-momentum", "lr-Adam-momentum"],
    "adam_sgd": ["lr-Adam", "lr-Adam-momentum", "lr-SGD", "lr-SGD-momentum"],
    "groups": ["lr-Adam/pg1", "lr-Adam/pg1-momentum", "lr-Adam/pg2", "lr-Adam/pg2-momentum"],
    "named": ["my_lr", "my_lr-momentum"],
    "named_groups": ["my_lr/pg1", "my_lr/pg1-momentum", "my_lr/pg2", "my_lr/pg2-momentum"],
    "second_named": ["gen", "gen-momentum", "lr-Adam", "lr-Adam-momentum"],
    "second_scheduled": ["lr-Adam", "lr-Adam-1", "lr-Adam-1-momentum", "lr-Adam-momentum"],
    "two_schedulers_one_optimizer": ["lr-Adam", "lr-Adam-1", "lr-Adam-1-momentum", "lr-Adam-momentum"],
    "sgd_momentum": ["lr-SGD", "lr-SGD-momentum"],
    "named_param_group": ["lr-Adam/body", "lr-Adam/body-momentum", "lr-Adam/head", "lr-Adam/head-momentum"],
}


@pytest.mark.parametrize("kind", sorted(_LIGHTNING_KEYS))
def test_lr_monitor_keys_are_lightnings(trainer_kwargs, kind):
    trainer = Trainer(max_epochs=1, limit_train_batches=2, callbacks=[LearningRateMonitor(log_momentum=True)], **trainer_kwargs)
    trainer.fit(_Optimizers(kind), loader(32, 8))
    columns = [c for c in _csv(trainer)[0].keys() if c not in ("step", "epoch")]
    assert sorted(columns) == _LIGHTNING_KEYS[kind]
    assert all(k in trainer.callback_metrics for k in _LIGHTNING_KEYS[kind])  # Lightning puts them there too


def test_lr_monitor_names_the_scheduled_optimizer_first(trainer_kwargs):
    """As Lightning: optimizers with a scheduler are named first, so the second Adam (0.02) is lr-Adam."""
    trainer = Trainer(max_epochs=1, limit_train_batches=2, callbacks=[LearningRateMonitor()], **trainer_kwargs)
    trainer.fit(_Optimizers("second_scheduled"), loader(32, 8))
    assert trainer.logged_metrics["lr-Adam"] == pytest.approx(0.02) and trainer.logged_metrics["lr-Adam-1"] == pytest.approx(0.01)
    trainer = Trainer(max_epochs=1, limit_train_batches=2, callbacks=[LearningRateMonitor()], **{**trainer_kwargs, "default_root_dir": trainer_kwargs["default_root_dir"] + "/b"})
    trainer.fit(_Optimizers("two_adam"), loader(32, 8))
    assert trainer.logged_metrics["lr-Adam"] == pytest.approx(0.01) and trainer.logged_metrics["lr-Adam-1"] == pytest.approx(0.02)


def test_lr_monitor_param_groups_with_one_name_are_refused(trainer_kwargs):
    class SameName(_Optimizers):
        def configure_optimizers(self):
            return torch.optim.SGD([{"params": self.a.parameters(), "name": "x"}, {"params": self.b.parameters(), "name": "x"}], lr=0.1)

    with pytest.raises(ConfigurationError, match="'x'"):
        Trainer(max_epochs=1, callbacks=[LearningRateMonitor()], **trainer_kwargs).fit(SameName("one"), loader(32, 8))


def test_lr_monitor_none_interval_logs_each_scheduler_at_its_own_interval(trainer_kwargs):
    """Lightning's rule: a step scheduler's key at logging steps, an optimizer without scheduler at epoch starts too."""

    class Mixed(Regressor):
        def __init__(self):
            super().__init__()
            self.extra = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx, optimizer_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self(x) + self.extra(x), y)

        def configure_optimizers(self):
            adam = torch.optim.Adam(self.net.parameters(), lr=0.01)
            sgd = torch.optim.SGD(self.extra.parameters(), lr=0.02)
            return [adam, sgd], [{"scheduler": torch.optim.lr_scheduler.StepLR(adam, 1, 0.5), "interval": "step"}]

    lrm = LearningRateMonitor()
    trainer = Trainer(max_epochs=2, log_every_n_steps=2, callbacks=[lrm], **trainer_kwargs)
    trainer.fit(Mixed(), loader(32, 8))  # 4 steps per epoch
    adam_steps = [h["step"] for h in lrm.history if "lr-Adam" in h]
    sgd_steps = [h["step"] for h in lrm.history if "lr-SGD" in h]
    assert adam_steps == [0, 2, 4, 6]  # every log_every_n_steps
    assert sgd_steps == [0, 2, 4, 6]  # epoch starts (0, 4) and logging steps, once per step
    assert [h["lr-Adam"] for h in lrm.history if "lr-Adam" in h] == pytest.approx([0.01 * 0.5**s for s in (0, 2, 4, 6)])


@pytest.mark.parametrize(
    "filename, auto, expected",
    [
        ("{epoch}-{val_loss:.2f}", True, "epoch=3-val_loss=0.26.ckpt"),
        ("best-{step}", True, "best-step=40.ckpt"),
        ("{epoch}-{val_loss:.2f}", False, "3-0.26.ckpt"),
        (None, True, "epoch=3-step=40.ckpt"),
    ],
)
def test_model_checkpoint_filenames_are_lightnings(filename, auto, expected):
    """The names PyTorch Lightning 2.6.6's ModelCheckpoint.format_checkpoint_name gives for the same values."""

    class FakeTrainer:
        callback_metrics = {"val_loss": torch.tensor(0.2567)}

    cb = ModelCheckpoint(filename=filename, auto_insert_metric_name=auto)
    assert cb._format_name({"epoch": 3, "step": 40, "val_loss": 0.2567}, FakeTrainer()) + ".ckpt" == expected
    with pytest.raises(ConfigurationError, match="'val_acc'"):
        ModelCheckpoint(filename="{val_acc}")._format_name({"epoch": 3, "step": 40}, FakeTrainer())


@pytest.mark.parametrize(
    "kwargs, stop_epoch, reason",
    [
        (dict(stopping_threshold=3.5), 3, "stopping threshold"),  # 1.0 < 3.5 at the 4th epoch (Lightning: current < threshold)
        (dict(divergence_threshold=4.8), 2, "divergence threshold"),  # 5.0 > 4.8 at epoch 2
    ],
)
def test_early_stopping_thresholds(trainer_kwargs, kwargs, stop_epoch, reason):
    es = EarlyStopping(monitor="score", patience=100, **kwargs)
    trainer = _fit_scored(trainer_kwargs, [4.0, 3.9, 5.0 if "divergence_threshold" in kwargs else 3.8, 1.0, 0.5], [es])
    assert es.stopped_epoch == stop_epoch and trainer.current_epoch == stop_epoch + 1
    assert reason in es.stopping_reason


def test_overriding_where_the_callbacks_act(trainer_kwargs):
    """check_on_train_epoch_end / save_on_train_epoch_end, as in Lightning: the rule, overridden either way."""
    es = EarlyStopping(monitor="score", patience=1, check_on_train_epoch_end=True)  # once per epoch despite 0.5
    mc = ModelCheckpoint(monitor="score", save_top_k=-1, save_on_train_epoch_end=False)  # after every validation
    module = _PerCheck([5.0, 4.0, 4.5, 4.2, 3.0, 2.0, 1.0, 0.5])
    trainer = Trainer(max_epochs=2, val_check_interval=0.5, callbacks=[es, mc], **trainer_kwargs)
    trainer.fit(module, loader(32, 8), loader(16, 8))
    assert _files(trainer_kwargs) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=1-step=6.ckpt", "epoch=1-step=8.ckpt"]
    # EarlyStopping saw only the epoch-end values 4.0 and 4.2: one non-improvement, patience 1 -> stop after epoch 1
    assert es.best_score == 4.0 and es.stopped_epoch == 1 and trainer.should_stop
    trainer = Trainer(
        max_epochs=2, callbacks=[ModelCheckpoint(monitor="score", save_top_k=-1, save_on_train_epoch_end=False)],
        **{**trainer_kwargs, "default_root_dir": trainer_kwargs["default_root_dir"] + "/b"},
    )
    trainer.fit(_PerCheck([3.0, 2.0]), loader(32, 8), loader(16, 8))  # once per epoch, but asked to save after validation
    assert sorted(os.listdir(trainer.checkpoint_dir)) == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", "last.ckpt"]

"""Issue 15: faults that used to lose or corrupt work, each injected here.

(1) non-finite weights are never checkpointed; ModelCheckpoint/EarlyStopping and NaN scores;
(2) a changed byte in a checkpoint, a foreign pickle; (3) a checkpoint that does not fit the
run, refused before anything is restored; (4) one live run per run directory, run identity;
(6) SIGTERM during validation, collective_timeout; (7) configure_optimizers gaps; (8) stale
temporaries. The multi-process faults (ranks, the real launcher) are in
tests/distributed/test_supervision.py.
"""

from __future__ import annotations

import fractions
import math
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from accel_trainer import Callback, Trainer
from accel_trainer import checkpoint as ckpt_io
from accel_trainer.callbacks import EarlyStopping, ModelCheckpoint
from accel_trainer.errors import CheckpointError, ConfigurationError
from accel_trainer.preemption import PREEMPTION_EXIT_CODE
from accel_trainer.run_dir import LOCK_NAME, RunDirectoryLocked, RunLock
from accel_trainer.run_status import read_run_status

from helpers import Regressor, TwoPart, loader
from test_faults import _start, _wait_for
from test_resume import Everything, _loaders, _run


def _fit(root, module=None, ckpt_path=None, **kwargs):
    trainer = Trainer(cpu=True, enable_progress_bar=False, default_root_dir=str(root), **kwargs)
    module = module if module is not None else Regressor()
    trainer.fit(module, loader(32, 8), loader(16, 8), ckpt_path=ckpt_path)
    return trainer, module


# -- 1. non-finite weights never reach a checkpoint ----------------------------------------------
class _PoisonAtEpochEnd(Callback):
    """Turns a weight into NaN at the end of epoch ``epoch`` (before last.ckpt is written)."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                next(module.parameters())[0].fill_(float("nan"))


def test_a_checkpoint_is_never_written_with_nonfinite_weights(tmp_path, capsys):
    keep_all = ModelCheckpoint(save_top_k=-1)  # no monitor: every epoch
    with pytest.warns(UserWarning, match=r"NOT writing checkpoint .*last.ckpt at epoch 2, global_step 8: the model's weights are not finite \(NaN or inf in net.weight\)"):
        trainer, module = _fit(tmp_path, max_epochs=2, callbacks=[_PoisonAtEpochEnd(1), keep_all])
    assert "The previous checkpoint at that path is kept" in capsys.readouterr().err
    last = ckpt_io.load_checkpoint_file(str(tmp_path / "checkpoints" / "last.ckpt"))
    assert last["loops"]["global_step"] == 4  # the good one of epoch 0, not replaced by the NaN weights
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())
    # ModelCheckpoint recorded only what was written
    assert [os.path.basename(p) for p in keep_all._recent] == ["epoch=0-step=4.ckpt"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert trainer.save_checkpoint(tmp_path / "explicit.ckpt") is False and not (tmp_path / "explicit.ckpt").exists()


def test_model_checkpoint_never_ranks_a_nan_score(trainer_kwargs, tmp_path):
    from test_callbacks import _fit_scored

    cb = ModelCheckpoint(dirpath=str(tmp_path / "best"), monitor="score", mode="min", save_top_k=2, filename="{epoch}")
    with pytest.warns(UserWarning, match=r"monitor='score'\): the score is NaN"):
        _fit_scored(trainer_kwargs, [5.0, float("nan"), 4.0, float("nan")], [cb])
    assert sorted(os.listdir(tmp_path / "best")) == ["epoch=0.ckpt", "epoch=2.ckpt"]
    assert cb.best_model_score == 4.0 and cb.best_model_path.endswith("epoch=2.ckpt")


@pytest.mark.parametrize("check_finite, stopped_after", [(True, 3), (False, 4)])
def test_early_stopping_check_finite(trainer_kwargs, check_finite, stopped_after):
    from test_callbacks import _fit_scored

    stopper = EarlyStopping(monitor="score", patience=10, check_finite=check_finite)
    trainer = _fit_scored(trainer_kwargs, [5.0, 4.0, float("nan"), 3.0], [stopper])
    assert trainer.current_epoch == stopped_after
    if check_finite:
        assert stopper.stopping_reason == "score = nan is not finite" and stopper.stopped_epoch == 2
    else:
        assert stopper.best_score == 3.0  # a NaN is not an improvement, and did not stop the run


# -- 2. checkpoint integrity ----------------------------------------------------------------------
def _data_records(path):
    """(name, offset, size) of every tensor-data record of a torch.save archive."""
    out = []
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        for info in archive.infolist():
            if "/data/" in info.filename and info.file_size > 0:
                f.seek(info.header_offset)
                header = f.read(30)
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                out.append((info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size))
    return out


def test_every_changed_byte_in_tensor_data_is_an_error_naming_file_and_section(tmp_path):
    trainer, _ = _run(tmp_path / "run", max_epochs=1)  # Adam + SGD momentum, RNG states, dropout
    path = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    original = open(path, "rb").read()
    records = _data_records(path)
    assert len(records) >= 10
    sections = set()
    for name, offset, size in records:
        damaged = bytearray(original)
        damaged[offset + size // 2] ^= 0x01  # one bit of one value
        broken = tmp_path / "broken.ckpt"
        broken.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError) as err:
            ckpt_io.load_checkpoint_file(str(broken))
        message = str(err.value)
        assert str(broken) in message, message
        assert "does not match the sha256 checksums recorded when it was written" in message, message
        sections.update(s for s in ("'state_dict'", "'optimizer_states'", "'rank_states'") if s in message)
    assert sections == {"'state_dict'", "'optimizer_states'", "'rank_states'"}  # weights, Adam moments, RNG
    # and resuming from it is refused before anything is restored
    module = Everything()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(CheckpointError, match="is corrupt"):
        Trainer(cpu=True, enable_progress_bar=False, default_root_dir=str(tmp_path / "other"), max_epochs=2).fit(
            module, *_loaders(), ckpt_path=str(broken)
        )
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_a_plain_pickle_of_a_foreign_class_is_named(tmp_path):
    path = tmp_path / "pickled.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"format": "accel_trainer/1", "x": fractions.Fraction(1, 2)}, f)
    with pytest.raises(CheckpointError) as err:
        ckpt_io.load_checkpoint_file(str(path))
    message = str(err.value)
    assert "a plain Python pickle (written with pickle.dump, not torch.save) that holds a pickled fractions.Fraction" in message
    assert "truncated" not in message and "weights_only" not in message


# -- 3. a checkpoint that does not fit: refused before anything is restored ------------------------
class _Opt(Regressor):
    def __init__(self, make):
        super().__init__()
        self.make = make

    def configure_optimizers(self):
        return self.make(self)


def _adam(m):
    return torch.optim.Adam(m.parameters(), lr=0.01)


def _sgd(m):
    return torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)


def _adamw(m):
    return torch.optim.AdamW(m.parameters(), lr=0.01)


def _two_groups(m):
    return torch.optim.Adam([{"params": [m.net.weight]}, {"params": [m.net.bias], "lr": 0.1}], lr=0.01)


def _steplr(m):
    opt = _adam(m)
    return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1)]


def _lambdalr(m):
    opt = _adam(m)
    return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.9**e)]


@pytest.mark.parametrize(
    "saved, resumed, expected",
    [
        (_adam, _sgd, "optimizer 0 is a torch.optim.sgd.SGD but was a torch.optim.adam.Adam when saved"),
        (_adam, _adamw, "optimizer 0 is a torch.optim.adamw.AdamW but was a torch.optim.adam.Adam when saved"),
        (_adam, _two_groups, "optimizer 0 has 2 param group(s), the checkpoint 1"),
        (_steplr, _lambdalr, "scheduler 0 is a torch.optim.lr_scheduler.LambdaLR but was a torch.optim.lr_scheduler.StepLR"),
    ],
    ids=["adam-to-sgd", "adam-to-adamw", "param-groups", "scheduler-type"],
)
def test_a_mismatched_checkpoint_is_refused_before_anything_is_restored(tmp_path, saved, resumed, expected):
    _fit(tmp_path / "a", _Opt(saved), max_epochs=1)
    module = _Opt(resumed)
    torch.manual_seed(123)
    with torch.no_grad():
        module.net.weight.normal_()
    before = module.net.weight.clone()
    with pytest.raises(CheckpointError) as err:
        _fit(tmp_path / "b", module, ckpt_path=str(tmp_path / "a" / "checkpoints" / "last.ckpt"), max_epochs=2)
    message = str(err.value)
    assert expected in message, message
    assert "--resume false" in message and "--weights_from" in message and "load_weights" in message, message
    assert torch.equal(module.net.weight, before)  # nothing was restored


def test_swapped_optimizers_are_named(tmp_path):
    _fit(tmp_path / "a", TwoPart(), max_epochs=1)

    class Swapped(TwoPart):
        def configure_optimizers(self):
            return (
                torch.optim.SGD(self.discriminator.parameters(), lr=0.01),
                torch.optim.Adam(self.generator.parameters(), lr=0.01),
            )

    with pytest.raises(CheckpointError) as err:
        _fit(tmp_path / "b", Swapped(), ckpt_path=str(tmp_path / "a" / "checkpoints" / "last.ckpt"), max_epochs=2)
    assert "optimizer 0 is a torch.optim.sgd.SGD but was a torch.optim.adam.Adam" in str(err.value)
    assert "optimizer 1 is a torch.optim.adam.Adam but was a torch.optim.sgd.SGD" in str(err.value)


def test_same_optimizer_class_over_other_parameters_is_named(tmp_path):
    def per_part(m):
        return torch.optim.SGD(m.generator.parameters(), lr=0.01), torch.optim.SGD(m.discriminator.parameters(), lr=0.01)

    class Other(TwoPart):
        def configure_optimizers(self):
            return torch.optim.SGD(self.discriminator.parameters(), lr=0.01), torch.optim.SGD(self.generator.parameters(), lr=0.01)

    class Saved(TwoPart):
        configure_optimizers = per_part

    _fit(tmp_path / "a", Saved(), max_epochs=1)
    with pytest.raises(CheckpointError, match=r"optimizer 0 param group 0 trains other parameters than in the checkpoint"):
        _fit(tmp_path / "b", Other(), ckpt_path=str(tmp_path / "a" / "checkpoints" / "last.ckpt"), max_epochs=2)


@pytest.mark.parametrize("section", ["lr_schedulers", "optimizer_states", "rank_states"])
def test_a_checkpoint_missing_a_section_is_named(tmp_path, section):
    _fit(tmp_path / "a", max_epochs=1)
    checkpoint = ckpt_io.load_checkpoint_file(str(tmp_path / "a" / "checkpoints" / "last.ckpt"))
    del checkpoint[section]
    del checkpoint["integrity"]  # an edited file, not a damaged one
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    with pytest.raises(CheckpointError, match=rf"is incomplete: it has no '{section}'"):
        _fit(tmp_path / "b", ckpt_path=str(tmp_path / "edited.ckpt"), max_epochs=2)


def test_a_checkpoint_from_before_these_records_still_resumes(tmp_path):
    _fit(tmp_path / "a", _Opt(_adam), max_epochs=1)
    checkpoint = ckpt_io.load_checkpoint_file(str(tmp_path / "a" / "checkpoints" / "last.ckpt"))
    for key in ("integrity", "optimizer_specs", "scheduler_specs", "run"):
        del checkpoint[key]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    trainer, _ = _fit(tmp_path / "b", _Opt(_adam), ckpt_path=str(tmp_path / "old.ckpt"), max_epochs=2)
    assert trainer.global_step == 8
    with pytest.raises(CheckpointError, match=r"optimizer 0 has 2 param group\(s\), the checkpoint 1"):
        _fit(tmp_path / "c", _Opt(_two_groups), ckpt_path=str(tmp_path / "old.ckpt"), max_epochs=2)


# -- 4. run identity and concurrency -----------------------------------------------------------------
@pytest.mark.slow
def test_a_second_run_in_a_live_run_directory_is_refused_naming_the_holder(tmp_path):
    marker = tmp_path / "training"
    proc = _start(
        f"""
        class Slow(Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                open({str(marker)!r}, "w").close()
                time.sleep(0.2)
        _run({str(tmp_path / 'run')!r}, max_epochs=1, callbacks=[Slow()])
        """,
        tmp_path,
    )
    try:
        _wait_for(marker, proc)
        with pytest.raises(RunDirectoryLocked) as err:
            _run(tmp_path / "run", max_epochs=1)
        message = str(err.value)
        assert f"in use by a live run (PID {proc.pid} on host" in message, message
        assert "--trainer.default_root_dir" in message
    finally:
        output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released
    _run(tmp_path / "run", ckpt_path="last", max_epochs=2)  # the directory is free again


def test_a_lock_left_by_a_killed_run_is_stale_and_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "run" / LOCK_NAME
    lock.parent.mkdir()
    lock.write_text(f'{{"pid": {dead.pid}, "host": "somewhere", "started": "2026-01-01T00:00:00+00:00"}}\n')
    _fit(tmp_path / "run", max_epochs=1)
    err = capsys.readouterr().err
    assert f"run.lock was left by PID {dead.pid} on host somewhere" in err and "stale lock, taken over" in err, err


def test_the_lock_is_held_by_one_process_at_a_time(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunDirectoryLocked, match=f"PID {os.getpid()}"):
        RunLock(tmp_path).acquire()
    first.release()
    second = RunLock(tmp_path)
    second.acquire()
    assert second.stale_holder is None
    second.release()


def test_checkpoints_carry_the_run_id_and_configuration(tmp_path):
    trainer, _ = _fit(tmp_path, Regressor(lr=0.05), max_epochs=1)
    saved = ckpt_io.load_checkpoint_file(str(tmp_path / "checkpoints" / "last.ckpt"))["run"]
    status = read_run_status(tmp_path)
    assert saved["id"] == status["run_id"] and len(saved["id"]) == 12
    assert saved["identity"]["module.hparams.lr"] == 0.05 and len(saved["fingerprint"]) == 16

    # another configuration, resumed as "last": refused, naming the field
    with pytest.raises(CheckpointError) as err:
        _fit(tmp_path, Regressor(lr=0.5), ckpt_path="last", max_epochs=2)
    assert f"belongs to run {saved['id']} of another configuration: module.hparams.lr: 0.05 -> 0.5" in str(err.value)
    assert "--ckpt_path" in str(err.value) and "--resume false" in str(err.value)
    # named explicitly: a warning, and a new run that records where it came from
    with pytest.warns(UserWarning, match=r"with another configuration, as asked by naming the checkpoint: module.hparams.lr"):
        _fit(tmp_path / "other", Regressor(lr=0.5), ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"), max_epochs=2)
    other = ckpt_io.load_checkpoint_file(str(tmp_path / "other" / "checkpoints" / "last.ckpt"))["run"]
    assert other["id"] != saved["id"] and other["resumed_from_run"] == saved["id"]
    # only harmless fields differ: a warning, and the same run continues
    with pytest.warns(UserWarning, match=r"Resuming run .* with changed settings: trainer.max_epochs: 1 -> 3"):
        _fit(tmp_path, Regressor(lr=0.05), ckpt_path="last", max_epochs=3)
    assert ckpt_io.load_checkpoint_file(str(tmp_path / "checkpoints" / "last.ckpt"))["run"]["id"] == saved["id"]


# -- 6. SIGTERM during validation; collective_timeout ----------------------------------------------
SLOW_VALIDATION = """
from test_resume import Everything, _loaders
from accel_trainer import Trainer

class SlowValidation(Everything):
    def validation_step(self, batch, batch_idx):
        if self.trainer.training and self.trainer.current_epoch == 1:
            with open({log!r}, "a") as f:
                f.write(f"val {{self.trainer.global_step}} {{batch_idx}}\\n")
            time.sleep(0.3)
        return super().validation_step(batch, batch_idx)

    def training_step(self, batch, batch_idx, optimizer_idx):
        if self.trainer.current_epoch == 1 and optimizer_idx == 0:
            with open({log!r}, "a") as f:
                f.write(f"train {{self.trainer.global_step}}\\n")
        return super().training_step(batch, batch_idx, optimizer_idx)

train, val = _loaders()
val = torch.utils.data.DataLoader(val.dataset, batch_size=4)   # 15 validation batches
Trainer(cpu=True, enable_progress_bar=False, default_root_dir={root!r}, seed=7, max_epochs=3,
        val_check_interval={interval}).fit(SlowValidation(), train, val, ckpt_path={ckpt!r})
"""


@pytest.mark.slow
@pytest.mark.parametrize("interval", [1.0, 0.5], ids=["epoch-end-validation", "mid-epoch-validation"])
def test_sigterm_during_validation_stops_at_the_next_batch_and_resumes_exactly(tmp_path, interval):
    log = tmp_path / "log.txt"
    root = str(tmp_path / "run")
    proc = _start(SLOW_VALIDATION.format(log=str(log), root=root, interval=interval, ckpt=None), tmp_path)
    deadline = time.monotonic() + 120
    while not (log.exists() and "val" in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "slow"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTION_EXIT_CODE, output
    lines = log.read_text().splitlines()
    first_val = next(i for i, line in enumerate(lines) if line.startswith("val"))
    after = lines[first_val:]
    assert all(line.startswith("val") for line in after), after  # no training step after the signal
    assert len(after) <= 3, after  # stopped at the next validation batch (15 in all)
    saved = ckpt_io.load_checkpoint_file(os.path.join(root, "checkpoints", "last.ckpt"))
    assert saved["loops"]["global_step"] == int(after[0].split()[1])  # the step the validation followed
    assert read_run_status(root)["status"] == "preempted"

    resumed = _start(SLOW_VALIDATION.format(log=str(tmp_path / "log2.txt"), root=root, interval=interval, ckpt="last"), tmp_path)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    reference = _start(SLOW_VALIDATION.format(log=str(tmp_path / "log3.txt"), root=str(tmp_path / "ref"), interval=interval, ckpt=None), tmp_path)
    output, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, output
    a = ckpt_io.load_checkpoint_file(os.path.join(root, "checkpoints", "last.ckpt"))
    b = ckpt_io.load_checkpoint_file(str(tmp_path / "ref" / "checkpoints" / "last.ckpt"))
    assert a["loops"]["global_step"] == b["loops"]["global_step"] == 30
    for name, value in b["state_dict"].items():
        assert torch.equal(value, a["state_dict"][name]), name
    assert a["loops"]["optimizer_steps"] == b["loops"]["optimizer_steps"]


@pytest.mark.parametrize("value", [0, -1, True, "5", math.inf])
def test_collective_timeout_is_validated(value):
    with pytest.raises(ConfigurationError, match=r"collective_timeout"):
        Trainer(cpu=True, collective_timeout=value)


def test_collective_timeout_is_a_cli_option():
    from accel_trainer.cli import parse

    _, _, cfg = parse(["fit", "--config", os.path.join(os.path.dirname(__file__), "..", "configs", "digits_classifier.yaml"),
                       "--trainer.collective_timeout", "120"])
    assert cfg.trainer.collective_timeout == 120


# -- 7. configure_optimizers gaps --------------------------------------------------------------------
class _Configured(Regressor):
    def __init__(self, configure):
        super().__init__()
        self._configure = configure

    def configure_optimizers(self):
        return self._configure(self)


class _NoState:
    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self):
        pass


class _EpochStep(_NoState):
    def step(self, epoch):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _same_scheduler_twice(m):
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    return [opt], [sched, sched]


def _empty_lists(m):
    return [[], []]


def _no_state_dict(m):
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    return [opt], [_NoState(opt)]


def _step_needs_epoch(m):
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    return [opt], [_EpochStep(opt)]


def _foreign_parameter(m):
    return torch.optim.SGD([*m.parameters(), torch.nn.Parameter(torch.ones(3))], lr=0.1)


@pytest.mark.parametrize(
    "configure, expected",
    [
        (_same_scheduler_twice, "the same scheduler object (StepLR) as schedulers 0 and 1: it would step twice"),
        (_empty_lists, "two lists `[optimizers], [schedulers]` without any optimizer"),
        (_no_state_dict, "_NoState has no state_dict() / load_state_dict()"),
        (_step_needs_epoch, "its step cannot be called as step(), which the default lr_scheduler_step does"),
        (_foreign_parameter, r"Optimizer 0 (SGD) holds 1 parameter(s) that are not parameters of _Configured (shapes [(3,)])"),
    ],
    ids=["same-scheduler-twice", "empty-lists", "no-state-dict", "step-needs-an-argument", "foreign-parameter"],
)
def test_configure_optimizers_gaps_are_refused_before_training(trainer_kwargs, configure, expected):
    module = _Configured(configure)
    trainer = Trainer(max_epochs=1, **trainer_kwargs)
    with pytest.raises(ConfigurationError) as err:
        trainer.fit(module, loader(32, 8))
    assert expected in str(err.value), str(err.value)
    assert trainer.global_step == 0


def test_a_scheduler_with_an_epoch_step_is_fine_with_an_override(trainer_kwargs):
    class Override(_Configured):
        def lr_scheduler_step(self, scheduler, metric):
            scheduler.step(epoch=self.current_epoch)

    trainer = Trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(Override(_step_needs_epoch), loader(32, 8))
    assert trainer.global_step == 4


def test_an_optimizer_of_frozen_parameters_only_warns(trainer_kwargs):
    class Frozen(TwoPart):
        def training_step(self, batch, batch_idx, optimizer_idx):
            return super().training_step(batch, batch_idx, optimizer_idx) if optimizer_idx == 0 else None

        def configure_optimizers(self):
            for p in self.discriminator.parameters():
                p.requires_grad_(False)
            return torch.optim.SGD(self.generator.parameters(), lr=0.1), torch.optim.SGD(self.discriminator.parameters(), lr=0.1)

    with pytest.warns(UserWarning, match=r"Optimizer 1 \(SGD\) holds only frozen parameters \(2, all requires_grad=False\)"):
        Trainer(max_epochs=1, **trainer_kwargs).fit(Frozen(), loader(32, 8))


# -- 8. stale temporaries ------------------------------------------------------------------------------
def test_a_run_removes_the_temporaries_a_killed_run_left(tmp_path, capsys):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / ".tmp-abc123.ckpt").write_bytes(b"half a checkpoint")
    (checkpoints / ".tmp-last.ckpt-0123456789ab").mkdir()  # a sharded save's staging directory
    (checkpoints / ".tmp-last.ckpt-0123456789ab" / "trainer_state.pt").write_bytes(b"x")
    (tmp_path / "run_status.json.tmp-4242").write_text("{")
    elsewhere = tmp_path.parent / f"{tmp_path.name}-shared"
    elsewhere.mkdir()
    (elsewhere / ".tmp-other-run.ckpt").write_bytes(b"not ours")
    _fit(tmp_path, max_epochs=1, callbacks=[ModelCheckpoint(dirpath=str(elsewhere))])
    assert sorted(os.listdir(checkpoints)) == ["last.ckpt"]
    assert not (tmp_path / "run_status.json.tmp-4242").exists()
    assert (elsewhere / ".tmp-other-run.ckpt").exists()  # outside the run directory: maybe another run's
    assert "removed 3 temporary file(s) a killed run left" in capsys.readouterr().err


def test_cli_weights_from_starts_a_new_run_from_the_weights_only(tmp_path, capsys):
    from accel_trainer import cli

    from test_run_records import _tiny

    assert cli.main(_tiny(tmp_path)) == 0
    source = tmp_path / "run" / "checkpoints" / "last.ckpt"
    trained = ckpt_io.load_checkpoint_file(str(source))
    other = ["--trainer.default_root_dir", str(tmp_path / "new"), "--optimizer.class_path", "torch.optim.SGD",
             "--optimizer.init_args.lr", "0.01"]
    # as a resume, another optimizer is refused ...
    assert cli.main([*_tiny(tmp_path), *other, "--ckpt_path", str(source)]) == 2
    assert "optimizer 0 is a torch.optim.sgd.SGD but was a torch.optim.adam.Adam" in capsys.readouterr().err
    # ... as weights only, it is a new run: fresh counters and optimizer, the trained weights
    assert cli.main([*_tiny(tmp_path), *other, "--weights_from", str(source), "--trainer.max_epochs", "0"]) == 0
    assert "Starting a new run from the weights of" in capsys.readouterr().err
    assert cli.main([*_tiny(tmp_path), *other, "--weights_from", str(source), "--ckpt_path", str(source)]) == 2
    assert "pick one" in capsys.readouterr().err
    assert cli.main([*_tiny(tmp_path), *other, "--weights_from", str(source)]) == 0
    new = ckpt_io.load_checkpoint_file(str(tmp_path / "new" / "checkpoints" / "last.ckpt"))
    assert new["loops"]["global_step"] == 3 and new["optimizer_specs"][0]["class"] == "torch.optim.sgd.SGD"
    assert new["run"]["id"] != trained["run"]["id"]

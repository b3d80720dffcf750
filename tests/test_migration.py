"""A PyTorch Lightning user's first mistakes get an answer that names our equivalent (issue 13, points 7 and 8)."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils.data import DataLoader

from accel_trainer import Trainer
from accel_trainer.errors import ConfigurationError
from helpers import Regressor, TwoPart, loader, regression_data

CONTRACT_ARGUMENTS = {
    "max_epochs": None, "max_steps": -1, "cpu": False, "mixed_precision": "no", "gradient_accumulation_steps": 1,
    "gradient_clip_val": None, "gradient_clip_algorithm": "norm", "limit_train_batches": None,
    "limit_val_batches": None, "val_check_interval": 1.0, "check_val_every_n_epoch": 1, "num_sanity_val_steps": 0,
    "log_every_n_steps": 50, "log_with": None, "project_name": "accel_trainer", "default_root_dir": "runs",
    "callbacks": None, "seed": None, "enable_progress_bar": True, "on_nonfinite_loss": "raise",
    "check_rank_sync_every_n_steps": None,
    "collective_timeout": None,  # issue 15: bounds a hang (not a Lightning argument)
    "accelerator": None,
}


def test_trainer_signature_is_still_the_contract():
    """Answering Lightning arguments must not widen the signature (the CLI reads it)."""
    params = inspect.signature(Trainer).parameters
    assert {name: p.default for name, p in params.items()} == CONTRACT_ARGUMENTS
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params.values())


_LIGHTNING = [
    (dict(devices=2), ["Trainer(devices=2)", "Lightning", "accelerate launch", "--num_processes 2"]),
    (dict(gpus=4), ["Trainer(gpus=4)", "--num_processes 4"]),
    (dict(precision="bf16-mixed"), ["precision='bf16-mixed'", "mixed_precision='bf16'"]),
    (dict(precision="16-mixed"), ["mixed_precision='fp16'", "GPU"]),
    (dict(precision=16), ["mixed_precision='fp16'"]),
    (dict(precision="32-true"), ["mixed_precision='no'"]),
    (dict(strategy="ddp"), ["strategy='ddp'", "accelerate launch --multi_gpu", "Trainer(accelerator=...)"]),
    (dict(accumulate_grad_batches=4), ["accumulate_grad_batches=4", "gradient_accumulation_steps=4"]),
    (dict(num_nodes=2), ["--num_machines"]),
    (dict(logger=False), ["log_with", "[]"]),
    (dict(resume_from_checkpoint="last.ckpt"), ["ckpt_path"]),
    (dict(fast_dev_run=True), ["limit_train_batches=1"]),
    (dict(enable_checkpointing=False), ["last.ckpt", "ModelCheckpoint"]),
]


@pytest.mark.parametrize("kwargs, fragments", _LIGHTNING, ids=[next(iter(k)) + "=" + repr(next(iter(k.values()))) for k, _ in _LIGHTNING])
def test_lightning_trainer_argument_names_our_equivalent(trainer_kwargs, kwargs, fragments):
    with pytest.raises(ConfigurationError) as info:
        Trainer(**trainer_kwargs, **kwargs)
    assert isinstance(info.value, ValueError)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


@pytest.mark.parametrize(
    "device, fragments",
    [("gpu", ["accelerator='gpu'", "accelerate.Accelerator", "cpu=True"]), ("cpu", ["Trainer(cpu=True)"]),
     ("cuda", ["accelerator", "cuda"])],
)
def test_accelerator_as_a_device_name_explains_ours(trainer_kwargs, device, fragments):
    """``accelerator=`` is ours (an accelerate.Accelerator); Lightning's device names get the translation."""
    with pytest.raises(ConfigurationError) as info:
        Trainer(accelerator=device, **trainer_kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_several_lightning_arguments_are_all_answered(trainer_kwargs):
    with pytest.raises(ConfigurationError) as info:
        Trainer(devices=2, strategy="ddp", precision="bf16-mixed", **trainer_kwargs)
    message = str(info.value)
    assert "devices=2" in message and "strategy='ddp'" in message and "mixed_precision='bf16'" in message


@pytest.mark.parametrize("typo, suggestion", [("max_epoch", "max_epochs"), ("gradient_clip_value", "gradient_clip_val")])
def test_misspelled_argument_still_fails_loudly(trainer_kwargs, typo, suggestion):
    """Neither ours nor Lightning's: Python's TypeError, now with the closest valid names."""
    with pytest.raises(TypeError) as info:
        Trainer(**{typo: 3}, **trainer_kwargs)
    assert repr(typo) in str(info.value) and repr(suggestion) in str(info.value)
    assert not isinstance(info.value, ConfigurationError)


def test_positional_arguments_still_work(trainer_kwargs):
    trainer = Trainer(2, **trainer_kwargs)
    assert trainer.max_epochs == 2


# -- fp16 without a GPU (point 8) ----------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU, where fp16 is valid")
def test_fp16_without_gpu_is_refused_before_anything_runs(trainer_kwargs):
    """Accelerate would run fp16 on a CPU silently in float32 while the config says fp16."""
    with pytest.raises(ConfigurationError) as info:
        Trainer(mixed_precision="fp16", **trainer_kwargs)
    message = str(info.value)
    assert "fp16" in message and "GPU" in message and "mixed_precision='bf16'" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU, where fp16 is valid")
def test_fp16_accelerator_handed_in_without_gpu_is_refused(trainer_kwargs):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    kwargs = {k: v for k, v in trainer_kwargs.items() if k != "cpu"}
    with pytest.raises(ConfigurationError, match="fp16"):
        Trainer(accelerator=accelerator, **kwargs)


def test_bf16_on_cpu_is_still_accepted(trainer_kwargs):
    assert Trainer(mixed_precision="bf16", **trainer_kwargs).accelerator.mixed_precision == "bf16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_on_a_gpu_is_accepted(tmp_path):
    trainer = Trainer(mixed_precision="fp16", enable_progress_bar=False, default_root_dir=str(tmp_path), max_epochs=1)
    assert trainer.accelerator.mixed_precision == "fp16" and trainer.accelerator.device.type == "cuda"


# -- training_step / validation_step signatures (point 7) -------------------------------------------
class _LightningTwoStyle(TwoPart):
    """Lightning 2's signature with two optimizers under automatic optimization."""

    def training_step(self, batch, batch_idx):
        self.calls.append(batch_idx)
        x, _ = batch
        return self.discriminator(self.generator(x)).mean()


def test_two_argument_training_step_with_two_optimizers_is_refused_before_training(trainer_kwargs):
    module = _LightningTwoStyle()
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ConfigurationError) as info:
        Trainer(max_epochs=1, **trainer_kwargs).fit(module, loader(16, 8))
    message = str(info.value)
    assert "optimizer_idx" in message and "2 optimizers" in message
    assert "automatic_optimization = False" in message and "manual_backward" in message
    assert module.calls == []  # refused before the first batch
    assert all(torch.equal(a, p) for a, p in zip(before, module.parameters()))


class _ManualTwo(TwoPart):
    """What the error suggests: Lightning 2's manual optimization with the two-argument signature."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, _ = batch
        g_opt, d_opt = self.optimizers()
        fake = self.generator(x)
        g_opt.zero_grad()
        self.manual_backward(-self.discriminator(fake).mean())
        g_opt.step()
        d_opt.zero_grad()
        self.manual_backward(self.discriminator(fake.detach()).mean() - self.discriminator(x).mean())
        d_opt.step()


def test_the_suggested_manual_optimization_trains(trainer_kwargs):
    trainer = Trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(_ManualTwo(), loader(16, 8))
    assert trainer.optimizer_steps == [2, 2]


class _OptimizerIdxWithoutDefault(Regressor):
    def training_step(self, batch, batch_idx, optimizer_idx):
        return super().training_step(batch, batch_idx)


def test_required_optimizer_idx_with_one_optimizer_is_refused(trainer_kwargs):
    with pytest.raises(ConfigurationError, match=r"optimizer_idx=0|default"):
        Trainer(max_epochs=1, **trainer_kwargs).fit(_OptimizerIdxWithoutDefault(), loader(16, 8))


class _NoDataloaderIdx(Regressor):
    def validation_step(self, batch, batch_idx):
        return super().validation_step(batch, batch_idx)


class _RequiredDataloaderIdx(Regressor):
    def validation_step(self, batch, batch_idx, dataloader_idx):
        return super().validation_step(batch, batch_idx)


def test_dataloader_idx_must_fit_the_number_of_validation_dataloaders(trainer_kwargs):
    two = [loader(16, 8), DataLoader(regression_data(8, seed=2), batch_size=8)]
    module = _NoDataloaderIdx()
    with pytest.raises(ConfigurationError, match="dataloader_idx"):
        Trainer(max_epochs=1, **trainer_kwargs).fit(module, loader(16, 8), two)
    assert module.trainer.global_step == 0  # before training
    with pytest.raises(ConfigurationError, match="dataloader_idx"):
        Trainer(**trainer_kwargs).validate(_NoDataloaderIdx(), two)
    with pytest.raises(ConfigurationError, match=r"dataloader_idx=0|default"):
        Trainer(max_epochs=1, **trainer_kwargs).fit(_RequiredDataloaderIdx(), loader(16, 8), loader(16, 8))

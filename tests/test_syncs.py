"""No device-to-host synchronisation in a steady-state training step (issue 16).

On a GPU every read of a tensor's value on the host (``.item()``, ``bool(t)``, ``float(t)``,
``.tolist()``, ``.cpu()``, ``.numpy()``) waits for every kernel queued so far, so the CPU can
no longer run ahead and queue the next step. These tests count those calls while a few hundred
CPU steps train: the code paths are the same on every device, so a call counted here is a sync
on a GPU. The only reads allowed are at logging boundaries (``log_every_n_steps``: the step
values go to the trackers), at epoch ends, and inside ``torch.optim`` (its CPU step counters).
"""

from __future__ import annotations

import collections
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from accel_trainer import Callback, Trainer, TrainingModule
from accel_trainer.nonfinite import NonFiniteGuard

SYNC_METHODS = ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy")
LOG_EVERY = 50


class SyncCounter(Callback):
    """Records every host read of a tensor, with the batch whose span it fell in and the caller."""

    def __init__(self) -> None:
        self.batch: tuple[int, int] | None = None
        self.reads: dict[tuple[int, int] | None, list[str]] = collections.defaultdict(list)
        self.boundary_steps: dict[tuple[int, int], int] = {}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, _name=name, **kwargs):
                caller = sys._getframe(1)
                where = caller.f_code.co_filename.replace("\\", "/")
                if "/torch/optim/" not in where:  # the optimizers' own CPU step counters
                    self.reads[self.batch].append(f"{_name} from {where}:{caller.f_lineno}")
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batch = (trainer.current_epoch, batch_idx)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.boundary_steps[self.batch] = trainer.global_step

    def steady_state_reads(self, batches_per_epoch: int) -> dict[tuple[int, int], list[str]]:
        """Reads in the span of each batch that is neither a logging boundary nor an epoch's last batch."""
        found = {}
        for key, reads in self.reads.items():
            if key is None or not reads:
                continue
            epoch, batch_idx = key
            if batch_idx == batches_per_epoch - 1:  # its span runs into the epoch end
                continue
            if self.boundary_steps.get(key, 0) % LOG_EVERY == 0:  # the step values go to the trackers
                continue
            found[key] = reads
        return found


def _data(n: int = 1200, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class OneOptimizer(TrainingModule):
    """Adam with a warmed-up step scheduler, self.log of tensors (step, epoch, progress bar)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        loss = torch.nn.functional.mse_loss(out, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_mae", (out - y).abs().mean(), on_step=True, on_epoch=True)
        self.log("out_max", out.max(), on_step=False, on_epoch=True, reduce_fx="max")
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=40, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "warmup_steps": 30}}


class TwoOptimizers(TrainingModule):
    """A GAN's shape: two nets, each loss through both, toggled parameters, a step scheduler each."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(6, 6)
        self.b = torch.nn.Linear(6, 1)

    def training_step(self, batch, batch_idx, optimizer_idx):
        x, y = batch
        out = self.b(torch.tanh(self.a(x)))
        loss = torch.nn.functional.mse_loss(out, y) if optimizer_idx == 0 else out.pow(2).mean()
        self.log(f"loss_{optimizer_idx}", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        opts = [torch.optim.SGD(self.a.parameters(), lr=0.01, momentum=0.9), torch.optim.Adam(self.b.parameters(), lr=1e-3)]
        scheds = [
            {"scheduler": torch.optim.lr_scheduler.StepLR(o, step_size=50, gamma=0.5), "interval": "step"} for o in opts
        ]
        return opts, scheds


def _fit(module, monkeypatch, tmp_path, **kwargs) -> tuple[SyncCounter, Trainer]:
    monkeypatch.setenv("ACCEL_TRAINER_PROGRESS", "lines")  # the default outside a terminal, drawn too
    counter = SyncCounter()
    trainer = Trainer(
        max_epochs=2, cpu=True, default_root_dir=str(tmp_path), log_every_n_steps=LOG_EVERY, callbacks=[counter], **kwargs
    )
    counter.install(monkeypatch)
    trainer.fit(module, _data())
    return counter, trainer


def _assert_no_steady_state_reads(counter: SyncCounter, batches_per_epoch: int = 150) -> None:
    steady = counter.steady_state_reads(batches_per_epoch)
    assert not steady, f"{len(steady)} steady-state steps read tensors back, e.g. {next(iter(steady.items()))}"
    # the counter does see reads: the logging boundaries and epoch ends make some
    assert any(counter.reads[k] for k in counter.reads if k is not None), "the counter recorded nothing at all"


def test_one_optimizer_with_warmup_clipping_and_logging_reads_nothing_back(monkeypatch, tmp_path):
    counter, trainer = _fit(OneOptimizer(), monkeypatch, tmp_path, gradient_clip_val=1.0)
    assert trainer.global_step == 300
    _assert_no_steady_state_reads(counter)


def test_two_optimizers_read_nothing_back(monkeypatch, tmp_path):
    counter, trainer = _fit(TwoOptimizers(), monkeypatch, tmp_path)
    assert trainer.optimizer_steps == [300, 300]
    _assert_no_steady_state_reads(counter)


def test_gradient_accumulation_reads_nothing_back(monkeypatch, tmp_path):
    counter, trainer = _fit(OneOptimizer(), monkeypatch, tmp_path, gradient_accumulation_steps=3)
    assert trainer.global_step == 100
    _assert_no_steady_state_reads(counter)


def test_the_accelerator_path_reads_nothing_back(monkeypatch, tmp_path):
    """On accelerators the non-finite flags are copied asynchronously and read one batch late."""
    monkeypatch.setattr(NonFiniteGuard, "force_deferred", True)
    counter, trainer = _fit(OneOptimizer(), monkeypatch, tmp_path, gradient_clip_val=1.0)
    assert trainer._guard.deferred
    _assert_no_steady_state_reads(counter)


def test_the_counter_sees_a_per_step_read(monkeypatch, tmp_path):
    """The counter is not blind: a training_step that reads its loss back is caught at every step."""

    class ReadsItsLoss(OneOptimizer):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.last = float(loss.detach())
            return loss

    counter, _ = _fit(ReadsItsLoss(), monkeypatch, tmp_path)
    steady = counter.steady_state_reads(150)
    assert len(steady) > 250, len(steady)
    assert all(any(r.startswith("__float__") for r in reads) for reads in steady.values())

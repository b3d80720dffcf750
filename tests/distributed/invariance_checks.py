"""Two-rank invariance checks: what must not depend on the number of processes.

Each ``check_*`` function runs on every rank of a 2-process job and asserts, on every rank,
that counters, learning rates, monitored metrics and parameters agree across ranks and,
where a ``ref_path`` is given, with a single-process run of the same training. References
are computed by ``compute_references`` in a single process (the pytest parent, or a
subprocess that ``main()`` starts) and handed to the ranks as a ``torch.save`` file.

Fair 1-vs-2 comparisons keep the number of optimizer steps equal: 1 process with batch
``2 * B`` against 2 processes with batch ``B`` on the same (unshuffled) data, so each
optimizer step sees the same global batch.

Run directly with:
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no tests/distributed/invariance_checks.py
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import subprocess
import sys
import tempfile
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from helpers import Regressor, TwoPart, regression_data  # noqa: E402

from accel_trainer import Callback, Trainer, TrainingModule  # noqa: E402
from accel_trainer.callbacks import EarlyStopping, ModelCheckpoint  # noqa: E402
from accel_trainer.errors import RankDesyncError  # noqa: E402

#: A rank stuck in a collective is killed (with every thread's traceback on stderr) after this
#: long, so a hang fails the test instead of blocking the suite for gloo's 30-minute timeout.
WATCHDOG_S = int(os.environ.get("ACCEL_TRAINER_TEST_WATCHDOG_S", "120"))

#: Per-rank batch size B; the single-process reference uses 2 * B.
B = 8


# -- plumbing ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _watchdog(seconds: int | None = None) -> Iterator[None]:
    faulthandler.dump_traceback_later(seconds or WATCHDOG_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def _trainer(root: str, **kwargs: Any) -> Trainer:
    return Trainer(cpu=True, enable_progress_bar=False, default_root_dir=root, **kwargs)


def _gather(trainer: Trainer, value: Any) -> list:
    """``value`` from every rank, in rank order (any picklable object)."""
    from accelerate.utils import gather_object

    return gather_object([value])


def _assert_two_ranks(trainer: Trainer) -> None:
    assert trainer.world_size == 2, f"expected 2 ranks, got world_size={trainer.world_size}"


def _assert_same_on_all_ranks(trainer: Trainer, what: str, value: Any) -> list:
    values = _gather(trainer, value)
    assert len(values) == 2, f"{what}: gathered {len(values)} values, expected 2"
    assert values[0] == values[1], f"{what} differs across ranks: rank 0: {values[0]!r}, rank 1: {values[1]!r}"
    return values


def _assert_params_identical(trainer: Trainer, module: torch.nn.Module) -> None:
    flat = torch.cat([p.detach().flatten().double() for p in module.parameters()]).unsqueeze(0)
    gathered = trainer.accelerator.gather(flat.to(trainer.accelerator.device)).cpu()
    assert gathered.shape[0] == 2
    assert torch.equal(gathered[0], gathered[1]), (
        f"parameters differ across ranks (max abs diff {float((gathered[0] - gathered[1]).abs().max()):.3g})"
    )


def _load(ref_path: str | None, name: str) -> dict:
    assert ref_path is not None, f"check needs the single-process reference {name!r} (compute_references)"
    return torch.load(ref_path, weights_only=False)[name]


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def _lr(optimizer: Any) -> float:
    return float(getattr(optimizer, "optimizer", optimizer).param_groups[0]["lr"])


class RecordLRs(Callback):
    """Per optimizer: the LR each real step used (warm-up included) and the LR at each epoch start.

    The step LR is read by an optimizer step pre-hook registered in ``on_fit_start``, after the
    trainer's own warm-up pre-hook, so it sees the learning rate the update really uses.
    ``per_epoch`` ends with the LR after the last epoch (epoch schedulers step after it too).
    """

    def __init__(self) -> None:
        self.per_step: list[list[float]] = []
        self.per_epoch: list[list[float]] = []
        self._handles: list = []

    def on_fit_start(self, trainer: Any, module: Any) -> None:
        self.per_step = [[] for _ in trainer.optimizers]
        self.per_epoch = [[] for _ in trainer.optimizers]
        for i, opt in enumerate(trainer.optimizers):
            raw = getattr(opt, "optimizer", opt)

            def hook(optimizer: Any, args: Any, kwargs: Any, i: int = i) -> None:
                self.per_step[i].append(float(optimizer.param_groups[0]["lr"]))

            self._handles.append(raw.register_step_pre_hook(hook))

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        for i, opt in enumerate(trainer.optimizers):
            self.per_epoch[i].append(_lr(opt))

    def on_fit_end(self, trainer: Any, module: Any) -> None:
        for i, opt in enumerate(trainer.optimizers):
            self.per_epoch[i].append(_lr(opt))
        for h in self._handles:
            h.remove()
        self._handles.clear()


class RecordEpochMetrics(Callback):
    """``callback_metrics[name]`` after every validation run, as floats."""

    def __init__(self, *names: str) -> None:
        self.names = names
        self.values: dict[str, list[float]] = {n: [] for n in names}

    def on_validation_end(self, trainer: Any, module: Any) -> None:
        for n in self.names:
            self.values[n].append(float(trainer.callback_metrics[n]))


# -- data -------------------------------------------------------------------------------------
def train_loader(batch_size: int, n: int = 64, shuffle: bool = False) -> DataLoader:
    return DataLoader(regression_data(n, seed=0), batch_size=batch_size, shuffle=shuffle)


def plateau_val_loader() -> DataLoader:
    """33 samples in batches of 4 (9 batches: 5 on rank 0, 4 on rank 1 — an odd, uneven split).

    Each sample also carries a slope: +16 in even batches (rank 0's shard, 17 samples) and -17
    in odd ones (rank 1's, 16 samples), so ``mean(1 + slope * epoch)`` over the whole set is
    exactly 1 every epoch (a plateau), while rank 0 alone sees it rise and rank 1 alone sees
    it fall. A decision taken on a rank-local value therefore differs between the ranks and
    from the single-process run.
    """
    x, y = regression_data(33, seed=1).tensors
    slope = torch.tensor([16.0 if (i // 4) % 2 == 0 else -17.0 for i in range(33)]).unsqueeze(1)
    assert float(slope.sum()) == 0.0
    return DataLoader(TensorDataset(x, y, slope), batch_size=4)


def _full_val_mse(net: Callable, loader: DataLoader) -> float:
    x, y = loader.dataset.tensors[:2]
    with torch.no_grad():
        return float(((net(x).double() - y.double()) ** 2).mean())


# -- modules ----------------------------------------------------------------------------------
class Heads(TrainingModule):
    """Two linear heads summed, one SGD optimizer each; ``schedules`` picks the schedulers."""

    def __init__(self, schedules: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(4, 1)
        self.b = torch.nn.Linear(4, 1)
        self.schedules = schedules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)

    def training_step(self, batch: Any, batch_idx: int, optimizer_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, slope = batch
        self.log("val_loss", F.mse_loss(self(x), y))
        self.log("val_plateau", (1.0 + slope * self.current_epoch).mean())

    def configure_optimizers(self) -> Any:
        opt_a = torch.optim.SGD(self.a.parameters(), lr=0.1)
        opt_b = torch.optim.SGD(self.b.parameters(), lr=0.1)
        if self.schedules == "epoch":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_a, factor=0.5, patience=0)
            return [opt_a, opt_b], [
                {"scheduler": plateau, "monitor": "val_plateau"},
                torch.optim.lr_scheduler.StepLR(opt_b, step_size=1, gamma=0.8),
            ]
        return [opt_a, opt_b], [
            {"scheduler": torch.optim.lr_scheduler.ExponentialLR(opt_a, gamma=0.9), "interval": "step"},
            {
                "scheduler": torch.optim.lr_scheduler.StepLR(opt_b, step_size=3, gamma=0.5),
                "interval": "step",
                "warmup_steps": 4,
            },
        ]


class Probe(Regressor):
    """``Regressor`` whose validation also logs the plateau metric of ``plateau_val_loader``."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, slope = batch
        self.log("val_loss", F.mse_loss(self(x), y))
        self.log("val_plateau", (1.0 + slope * self.current_epoch).mean())


class PerValidationHeads(Heads):
    """Validation k logs ``val_plateau = mean(1 + slope * k)`` (exactly 1 over the whole set, rising on
    rank 0's shard, falling on rank 1's), and optimizer a has a step-interval ReduceLROnPlateau on it
    that is due on the batches that validate (``val_check_interval=0.5`` of 4 batches, frequency 2)."""

    def __init__(self) -> None:
        super().__init__("validation")
        self.k = 0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, slope = batch
        self.log("val_loss", F.mse_loss(self(x), y))
        self.log("val_plateau", (1.0 + slope * self.k).mean())

    def on_validation_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.k += 1

    def configure_optimizers(self) -> Any:
        opt_a = torch.optim.SGD(self.a.parameters(), lr=0.1)
        opt_b = torch.optim.SGD(self.b.parameters(), lr=0.1)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_a, factor=0.5, patience=0)
        return [opt_a, opt_b], [{"scheduler": plateau, "interval": "step", "frequency": 2, "monitor": "val_plateau"}]


class MeanOfValues(Regressor):
    """Logs a ``torchmetrics.MeanMetric`` (as an object) and a plain mean of ``x + 10 * epoch``."""

    def __init__(self) -> None:
        super().__init__()
        from torchmetrics import MeanMetric

        self.mean_metric = MeanMetric()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        (v,) = batch
        v = v.float() + 10.0 * self.current_epoch
        self.mean_metric.update(v)
        self.log("val_mean", self.mean_metric)
        self.log("val_plain_mean", v.mean())


class SeedIntervals(TwoPart):
    """The seed's "step optimizer A every 2 batches and optimizer B every 4" override, with a
    step-interval scheduler on each optimizer so learning rates move with real steps."""

    def configure_optimizers(self) -> Any:
        g, d = super().configure_optimizers()
        return [g, d], [
            {"scheduler": torch.optim.lr_scheduler.ExponentialLR(g, gamma=0.9), "interval": "step"},
            {"scheduler": torch.optim.lr_scheduler.ExponentialLR(d, gamma=0.8), "interval": "step"},
        ]

    def optimizer_step(self, current_epoch, batch_nb, optimizer, optimizer_i, second_order_closure=None):
        if optimizer_i == 0:
            if batch_nb % 2 == 0:
                optimizer.step()
                optimizer.zero_grad()
        if optimizer_i == 1:
            if batch_nb % 4 == 0:
                optimizer.step()
                optimizer.zero_grad()


WARMUP = 5


class SeedWarmup(TwoPart):
    """The seed's learning-rate warm-up override (500 steps shortened to ``WARMUP``)."""

    def optimizer_step(self, current_epoch, batch_nb, optimizer, optimizer_i, second_order_closure=None):
        if self.trainer.global_step < WARMUP:
            lr_scale = min(1.0, float(self.trainer.global_step + 1) / WARMUP)
            for pg in optimizer.param_groups:
                pg["lr"] = lr_scale * self.hparams.lr
        optimizer.step()
        optimizer.zero_grad()


class Gan(TwoPart):
    """A small GAN: generator (noise -> sample) and discriminator (sample -> logit), Adam each.

    The noise is a fixed function of the batch, so each rank's shard makes its own noise.
    Records every time a parameter of the other network still required grad.
    """

    def __init__(self) -> None:
        super().__init__(lr=1e-2)
        torch.manual_seed(0)
        self.generator = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        self.discriminator = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LeakyReLU(0.2), torch.nn.Linear(8, 1))
        self.toggle_violations: list[tuple] = []

    def training_step(self, batch: Any, batch_idx: int, optimizer_idx: int) -> torch.Tensor:
        real, _ = batch
        gen_on = [p.requires_grad for p in self.generator.parameters()]
        disc_on = [p.requires_grad for p in self.discriminator.parameters()]
        expected = (optimizer_idx == 0, optimizer_idx == 1)
        if not (all(gen_on) == expected[0] and any(gen_on) == expected[0] and all(disc_on) == expected[1] and any(disc_on) == expected[1]):
            self.toggle_violations.append((batch_idx, optimizer_idx, gen_on, disc_on))
        noise = torch.sin(real[:, :2] * 3.0)
        fake = self.generator(noise)
        ones = torch.ones(real.shape[0], 1)
        if optimizer_idx == 0:
            return F.binary_cross_entropy_with_logits(self.discriminator(fake), ones)
        real_loss = F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
        fake_loss = F.binary_cross_entropy_with_logits(self.discriminator(fake.detach()), torch.zeros_like(ones))
        return (real_loss + fake_loss) / 2

    def configure_optimizers(self) -> Any:
        return (
            torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr),
            torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.lr),
        )


class DesyncedStep(Regressor):
    """Rank 1 skips the optimizer step that rank 0 takes on the first batch.

    Skipping ``optimizer.step()`` involves no collective, so both ranks go on to the next
    backward (which all-reduces) and reach the rank-sync check at ``global_step`` 2.
    """

    def optimizer_step(self, current_epoch, batch_nb, optimizer, optimizer_i, second_order_closure=None):
        if self.trainer.accelerator.process_index == 1 and self.trainer.global_step == 0:
            return
        optimizer.step()
        optimizer.zero_grad()


class AccumulatingTwoPart(TwoPart):
    """``TwoPart`` with a step scheduler per optimizer; remembers which optimizer is training."""

    current_optimizer = -1

    def training_step(self, batch: Any, batch_idx: int, optimizer_idx: int) -> torch.Tensor:
        self.current_optimizer = optimizer_idx
        return super().training_step(batch, batch_idx, optimizer_idx)

    def configure_optimizers(self) -> Any:
        g, d = super().configure_optimizers()
        return [g, d], [
            {"scheduler": torch.optim.lr_scheduler.StepLR(g, step_size=1, gamma=0.5), "interval": "step"},
            {"scheduler": torch.optim.lr_scheduler.StepLR(d, step_size=1, gamma=0.5), "interval": "step"},
        ]


class GradSyncProbe(Callback):
    """Gathers the gradient of the training optimizer's first weight after every backward
    (``on_after_backward``) and before every optimizer step (``on_before_optimizer_step``),
    and records whether both ranks hold the same tensor."""

    def __init__(self) -> None:
        self.batch_idx = -1
        self.after_backward: list[tuple[int, int, int, bool]] = []  # (epoch, batch_idx, opt, same)
        self.before_step: list[tuple[int, int, int, bool]] = []

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def _same(self, trainer: Any, module: Any) -> tuple[int, bool]:
        i = module.current_optimizer
        p = module.generator.weight if i == 0 else module.discriminator.weight
        assert p.grad is not None, f"optimizer {i}: no gradient after backward"
        g = trainer.accelerator.gather(p.grad.detach().flatten().unsqueeze(0)).cpu()
        return i, bool(torch.equal(g[0], g[1]))

    def on_after_backward(self, trainer: Any, module: Any) -> None:
        i, same = self._same(trainer, module)
        self.after_backward.append((trainer.current_epoch, self.batch_idx, i, same))

    def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
        i, same = self._same(trainer, module)
        self.before_step.append((trainer.current_epoch, self.batch_idx, i, same))


class NanOnRankOne(Regressor):
    """Rank 1's loss is NaN on batch 1 of epoch 0; rank 0's loss stays finite."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.trainer.accelerator.process_index == 1 and self.current_epoch == 0 and batch_idx == 1:
            loss = loss * float("nan")
        return loss


class DtypeRecorder(Regressor):
    """Records the dtype of the forward output (bf16 under autocast)."""

    def __init__(self) -> None:
        super().__init__()
        self.output_dtypes: set = set()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        self.output_dtypes.add(str(out.dtype))
        loss = F.mse_loss(out.float(), y)
        self.log("train_loss", loss)
        return loss


# -- runs (shared by the single-process reference and the two ranks) ----------------------------
def _run_epoch_schedules(batch_size: int) -> dict:
    rec = RecordLRs()
    with tempfile.TemporaryDirectory() as root:
        trainer = _trainer(root, max_epochs=4, callbacks=[rec])
        module = Heads("epoch")
        trainer.fit(module, train_loader(batch_size), plateau_val_loader())
    return {
        "per_epoch": rec.per_epoch,
        "per_step": rec.per_step,
        "global_step": trainer.global_step,
        "optimizer_steps": list(trainer.optimizer_steps),
        "_trainer": trainer,
    }


def _run_step_schedules(batch_size: int) -> dict:
    rec = RecordLRs()
    with tempfile.TemporaryDirectory() as root:
        trainer = _trainer(root, max_epochs=2, callbacks=[rec])
        module = Heads("step")
        trainer.fit(module, train_loader(batch_size))
    return {
        "per_step": rec.per_step,
        "global_step": trainer.global_step,
        "optimizer_steps": list(trainer.optimizer_steps),
        "_trainer": trainer,
    }


def _run_monitoring(batch_size: int) -> dict:
    val = plateau_val_loader()
    with tempfile.TemporaryDirectory() as root:
        # validate() on the untrained (seeded) model: identical weights on 1 and 2 processes
        validated = _trainer(root).validate(Probe(), val)[0]
        rec = RecordEpochMetrics("val_loss", "val_plateau")
        stop = EarlyStopping(monitor="val_plateau", patience=2)
        best_loss = ModelCheckpoint(monitor="val_loss", filename="loss-{epoch}")
        best_plateau = ModelCheckpoint(monitor="val_plateau", filename="plateau-{epoch}")
        trainer = _trainer(root, max_epochs=10, callbacks=[rec, stop, best_loss, best_plateau])
        module = Probe()
        trainer.fit(module, train_loader(batch_size), val)
        direct = _full_val_mse(module, val)
    return {
        "validate_val_loss": validated["val_loss"],
        "epoch_val_loss": rec.values["val_loss"],
        "epoch_val_plateau": rec.values["val_plateau"],
        "current_epoch": trainer.current_epoch,
        "stopped_epoch": stop.stopped_epoch,
        "best_val_loss": best_loss.best_model_score,
        "best_val_plateau": best_plateau.best_model_score,
        "final_val_loss": float(trainer.callback_metrics["val_loss"]),
        "direct_final_val_mse": direct,
        "_trainer": trainer,
    }


def _run_validation_decisions(batch_size: int) -> dict:
    """EarlyStopping / ModelCheckpoint acting after each validation (val_check_interval=0.5) and a
    step plateau scheduler due on validating batches, all on a metric whose rank-local values
    disagree (4 batches per epoch and rank; validations after batches 2 and 4)."""
    rec, values = RecordLRs(), RecordEpochMetrics("val_plateau", "val_loss")
    with tempfile.TemporaryDirectory() as root:
        stop = EarlyStopping(monitor="val_plateau", patience=2)
        best = ModelCheckpoint(monitor="val_loss", save_top_k=-1)
        trainer = _trainer(root, max_epochs=4, val_check_interval=0.5, callbacks=[rec, values, stop, best])
        module = PerValidationHeads()
        trainer.fit(module, train_loader(batch_size), plateau_val_loader())
        files = sorted(os.path.basename(path) for path in best.best_k_models)  # known on every rank
    return {
        "per_step": rec.per_step,
        "val_plateau": values.values["val_plateau"],
        "val_loss": values.values["val_loss"],
        "global_step": trainer.global_step,
        "current_epoch": trainer.current_epoch,
        "stopped_epoch": stop.stopped_epoch,
        "wait_count": stop.wait_count,
        "files": files,
        "best_val_loss": best.best_model_score,
        "_trainer": trainer,
    }


def _run_seed_module(module_class: type, batch_size: int) -> dict:
    """Train one of the seed's optimizer_step overrides, recording the LR of every step."""
    rec = RecordLRs()
    with tempfile.TemporaryDirectory() as root:
        trainer = _trainer(root, max_epochs=2, callbacks=[rec])
        module = module_class()
        trainer.fit(module, train_loader(batch_size))
    return {
        "per_step": rec.per_step,
        "global_step": trainer.global_step,
        "optimizer_steps": list(trainer.optimizer_steps),
        "_trainer": trainer,
        "_module": module,
    }


REFERENCES: dict[str, Callable[[], dict]] = {
    "epoch_schedules": lambda: _run_epoch_schedules(2 * B),
    "step_schedules": lambda: _run_step_schedules(2 * B),
    "monitoring": lambda: _run_monitoring(2 * B),
    "validation_decisions": lambda: _run_validation_decisions(2 * B),
    "seed_intervals": lambda: _run_seed_module(SeedIntervals, 2 * B),
    "seed_warmup": lambda: _run_seed_module(SeedWarmup, 2 * B),
}


def compute_references(names: list[str] | None = None) -> dict[str, dict]:
    """Single-process runs (call in a process with no distributed launch around it)."""
    out = {}
    for name in names or list(REFERENCES):
        result = REFERENCES[name]()
        trainer = result["_trainer"]
        assert trainer.world_size == 1, f"reference {name!r} ran on {trainer.world_size} processes"
        out[name] = {k: v for k, v in result.items() if not k.startswith("_")}
    return out


def write_references(path: str, names: list[str] | None = None) -> None:
    torch.save(compute_references(names), path)


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_")}


# -- 1. schedules are world-size invariant -----------------------------------------------------
def check_epoch_schedules(ref_path: str | None = None) -> None:
    """ReduceLROnPlateau (once per epoch, on a global plateau) and StepLR per epoch."""
    with _watchdog():
        result = _run_epoch_schedules(B)
        trainer = result["_trainer"]
        _assert_two_ranks(trainer)
        mine = _public(result)
        _assert_same_on_all_ranks(trainer, "epoch-schedule run (LRs per epoch, counters)", mine)
        # the global plateau reduces from the second epoch on; StepLR multiplies by 0.8 per epoch
        expected_plateau = [0.1, 0.1, 0.05, 0.025, 0.0125]
        expected_step = [0.1 * 0.8**e for e in range(5)]
        assert all(_close(a, b, 1e-9) for a, b in zip(mine["per_epoch"][0], expected_plateau)) and len(
            mine["per_epoch"][0]
        ) == 5, f"ReduceLROnPlateau LR per epoch {mine['per_epoch'][0]}, expected {expected_plateau}"
        assert all(_close(a, b, 1e-9) for a, b in zip(mine["per_epoch"][1], expected_step)) and len(
            mine["per_epoch"][1]
        ) == 5, f"StepLR LR per epoch {mine['per_epoch'][1]}, expected {expected_step}"
        ref = _load(ref_path, "epoch_schedules")
        assert mine["per_epoch"] == ref["per_epoch"], (
            f"LR per epoch on 2 ranks {mine['per_epoch']} != 1 process {ref['per_epoch']}"
        )
        assert mine["per_step"] == ref["per_step"], "LR per optimizer step differs from 1 process"
        assert (mine["global_step"], mine["optimizer_steps"]) == (ref["global_step"], ref["optimizer_steps"])


def check_step_schedules(ref_path: str | None = None) -> None:
    """A "step"-interval ExponentialLR and a "step" StepLR with declarative ``warmup_steps``."""
    with _watchdog():
        result = _run_step_schedules(B)
        trainer = result["_trainer"]
        _assert_two_ranks(trainer)
        mine = _public(result)
        _assert_same_on_all_ranks(trainer, "step-schedule run (LRs per step, counters)", mine)
        assert mine["global_step"] == 8 and mine["optimizer_steps"] == [8, 8], mine
        expected_exp = [0.1 * 0.9**k for k in range(8)]
        expected_warm = [0.1 * 0.5 ** (k // 3) * min(1.0, (k + 1) / 4) for k in range(8)]
        assert len(mine["per_step"][0]) == 8 and all(
            _close(a, b, 1e-9) for a, b in zip(mine["per_step"][0], expected_exp)
        ), f"ExponentialLR per step {mine['per_step'][0]}, expected {expected_exp}"
        assert len(mine["per_step"][1]) == 8 and all(
            _close(a, b, 1e-9) for a, b in zip(mine["per_step"][1], expected_warm)
        ), f"StepLR + warmup_steps=4 per step {mine['per_step'][1]}, expected {expected_warm}"
        ref = _load(ref_path, "step_schedules")
        assert mine == ref, f"2 ranks {mine} != 1 process {ref}"


# -- 2. monitored metrics are reduced before decisions -----------------------------------------
def check_monitored_metrics(ref_path: str | None = None) -> None:
    """Odd validation set: val_loss, EarlyStopping and ModelCheckpoint decide on global values."""
    with _watchdog():
        result = _run_monitoring(B)
        trainer = result["_trainer"]
        _assert_two_ranks(trainer)
        mine = _public(result)
        ref = _load(ref_path, "monitoring")
        # validate(): same weights on 1 and 2 processes, so the same sample-weighted mean
        _assert_same_on_all_ranks(trainer, "validate() val_loss", mine["validate_val_loss"])
        assert _close(mine["validate_val_loss"], ref["validate_val_loss"], 1e-6), (
            f"validate() val_loss on 2 ranks {mine['validate_val_loss']!r} != 1 process {ref['validate_val_loss']!r}"
        )
        # the last epoch's val_loss is the whole-set MSE of the final weights
        assert _close(mine["final_val_loss"], mine["direct_final_val_mse"], 1e-6), (
            f"epoch val_loss {mine['final_val_loss']!r} != MSE over all 33 validation samples "
            f"{mine['direct_final_val_mse']!r}"
        )
        _assert_same_on_all_ranks(trainer, "val_loss per epoch", mine["epoch_val_loss"])
        # every epoch the plateau metric is exactly 1 over the whole set (1 + 16e / 1 - 17e per rank)
        _assert_same_on_all_ranks(trainer, "val_plateau per epoch", mine["epoch_val_plateau"])
        assert mine["epoch_val_plateau"] == [1.0] * len(mine["epoch_val_plateau"]), (
            f"val_plateau per epoch {mine['epoch_val_plateau']}: not reduced over both ranks' shards"
        )
        # EarlyStopping(patience=2) on the plateau: stops after epoch 2, on every rank, like 1 process
        _assert_same_on_all_ranks(trainer, "current_epoch after early stopping", mine["current_epoch"])
        assert mine["current_epoch"] == ref["current_epoch"] == 3, (
            f"stopped at current_epoch {mine['current_epoch']} (1 process: {ref['current_epoch']}, expected 3)"
        )
        _assert_same_on_all_ranks(trainer, "EarlyStopping.stopped_epoch", mine["stopped_epoch"])
        # ModelCheckpoint(monitor=...) keeps the same best score on every rank
        _assert_same_on_all_ranks(trainer, "ModelCheckpoint(monitor='val_loss').best_model_score", mine["best_val_loss"])
        _assert_same_on_all_ranks(
            trainer, "ModelCheckpoint(monitor='val_plateau').best_model_score", mine["best_val_plateau"]
        )
        assert mine["best_val_plateau"] == 1.0, mine["best_val_plateau"]
        assert mine["best_val_loss"] == min(mine["epoch_val_loss"]), (mine["best_val_loss"], mine["epoch_val_loss"])
        # training on 2 ranks sums gradients in another order than on 1: equal up to rounding
        assert len(mine["epoch_val_loss"]) == len(ref["epoch_val_loss"])
        for e, (a, b) in enumerate(zip(mine["epoch_val_loss"], ref["epoch_val_loss"])):
            assert _close(a, b, 1e-5), f"epoch {e}: val_loss on 2 ranks {a!r}, on 1 process {b!r}"
        assert _close(mine["best_val_loss"], ref["best_val_loss"], 1e-5), (mine["best_val_loss"], ref["best_val_loss"])


def check_validation_driven_decisions(ref_path: str | None = None) -> None:
    """Issue 13: the callbacks act after every validation and the step plateau scheduler sees its
    batch's validation -- on the reduced value, so both ranks (and one process) decide alike."""
    with _watchdog():
        result = _run_validation_decisions(B)
        trainer = result["_trainer"]
        _assert_two_ranks(trainer)
        mine = _public(result)
        _assert_same_on_all_ranks(trainer, "validation-driven decisions", {k: v for k, v in mine.items() if k != "val_loss"})
        assert mine["val_plateau"] == [1.0, 1.0, 1.0], f"val_plateau per validation {mine['val_plateau']}: not reduced"
        # EarlyStopping(patience=2): best at validation 0, stops at validation 2, in the middle of epoch 1
        assert (mine["global_step"], mine["current_epoch"], mine["stopped_epoch"], mine["wait_count"]) == (6, 2, 1, 2), mine
        assert mine["files"] == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=1-step=6.ckpt"], mine["files"]
        # the step plateau: due after a's real steps 2, 4, 6 (the validating batches): best 1 after the first
        # validation, then a reduction after each of the next two (LR used by each of a's 6 steps)
        assert mine["per_step"][0] == [0.1, 0.1, 0.1, 0.1, 0.05, 0.05], mine["per_step"]
        ref = _load(ref_path, "validation_decisions")
        for key in ("per_step", "val_plateau", "global_step", "current_epoch", "stopped_epoch", "files"):
            assert mine[key] == ref[key], f"{key}: 2 ranks {mine[key]} != 1 process {ref[key]}"
        assert all(_close(a, b, 1e-5) for a, b in zip(mine["val_loss"], ref["val_loss"])), (mine["val_loss"], ref["val_loss"])


class TwoValidationSets(Regressor):
    """Logs ``val_x`` per dataloader and ``val_all`` over both (add_dataloader_idx=False)."""

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, _ = batch
        self.log("val_x", x[:, 0].mean())
        self.log("val_all", x[:, 0].mean(), add_dataloader_idx=False)

    def on_train_epoch_end(self) -> None:
        # Lightning's logger API on every rank: rank 1 has no tracker, its calls do nothing
        self.logger.log_metrics({"from_rank": float(self.global_rank)})
        if self.global_rank == 1:
            self.logger.experiment.add_scalar("anything", 1.0)  # what TensorBoard code calls: a no-op here
        self.ranks = (self.global_rank, self.local_rank)


def check_several_validation_dataloaders() -> None:
    """Per-dataloader names reduced over both ranks, also for a dataloader whose only batch is on rank 0."""
    with _watchdog(), tempfile.TemporaryDirectory() as root:
        odd = DataLoader(regression_data(33, seed=1), batch_size=4)  # 9 batches: 5 on rank 0, 4 on rank 1
        one = DataLoader(regression_data(8, seed=2), batch_size=8)  # 1 batch: rank 1 gets none
        trainer = _trainer(root, max_epochs=1)
        module = TwoValidationSets()
        results = trainer.validate(module, [odd, one])
        _assert_same_on_all_ranks(trainer, "validate() with two dataloaders", results)
        first, second = (float(dl.dataset.tensors[0][:, 0].mean()) for dl in (odd, one))
        both = float(torch.cat([odd.dataset.tensors[0][:, 0], one.dataset.tensors[0][:, 0]]).mean())
        assert sorted(results[0]) == ["val_all", "val_x/dataloader_idx_0"] and sorted(results[1]) == ["val_all", "val_x/dataloader_idx_1"]
        assert _close(results[0]["val_x/dataloader_idx_0"], first, 1e-6) and _close(results[1]["val_x/dataloader_idx_1"], second, 1e-6)
        assert _close(results[0]["val_all"], both, 1e-6) and results[0]["val_all"] == results[1]["val_all"]
        trainer.fit(module, train_loader(B), [odd, one])
        _assert_same_on_all_ranks(trainer, "callback_metrics after fit", sorted(trainer.callback_metrics))
        _assert_same_on_all_ranks(trainer, "val_x/dataloader_idx_1", float(trainer.callback_metrics["val_x/dataloader_idx_1"]))
        assert [r[0] for r in _gather(trainer, module.ranks)] == [0, 1]
        assert module.ranks[1] == trainer.accelerator.local_process_index
        if trainer.is_global_zero:
            with open(os.path.join(root, "metrics.csv")) as f:
                header = f.readline()
            assert "from_rank" in header and "val_x/dataloader_idx_1" in header, header


def check_metric_object() -> None:
    """A torchmetrics MeanMetric over 9 samples (5 batches of 2: 3 on rank 0, 2 on rank 1)."""
    with _watchdog(), tempfile.TemporaryDirectory() as root:
        values = DataLoader(TensorDataset(torch.arange(9, dtype=torch.float32)), batch_size=2)
        rec = RecordEpochMetrics("val_mean", "val_plain_mean")
        trainer = _trainer(root, max_epochs=2, callbacks=[rec])
        _assert_two_ranks(trainer)
        module = MeanOfValues()
        results = trainer.validate(module, values)[0]
        _assert_same_on_all_ranks(trainer, "validate() results", results)
        assert results["val_mean"] == 4.0, f"MeanMetric of 0..8 gave {results['val_mean']!r}, expected 4.0"
        assert results["val_plain_mean"] == 4.0, f"self.log mean of 0..8 gave {results['val_plain_mean']!r}"
        # during fit: computed and reset every epoch (epoch 1 logs 10..18)
        rec.values = {n: [] for n in rec.names}
        trainer.fit(module, train_loader(B), values)
        _assert_same_on_all_ranks(trainer, "per-epoch metrics", rec.values)
        assert rec.values["val_mean"] == [4.0, 14.0], f"MeanMetric per epoch {rec.values['val_mean']}, expected [4.0, 14.0]"
        assert rec.values["val_plain_mean"] == [4.0, 14.0], rec.values["val_plain_mean"]


# -- 3. the seed's optimizer_step overrides, and a GAN -----------------------------------------
def check_seed_step_intervals(ref_path: str | None = None) -> None:
    """Generator every 2 batches, discriminator every 4 (the seed's override)."""
    with _watchdog():
        result = _run_seed_module(SeedIntervals, B)
        trainer = result["_trainer"]
        _assert_two_ranks(trainer)
        mine = _public(result)
        _assert_same_on_all_ranks(trainer, "seed interval override (steps, LRs)", mine)
        # 4 batches per epoch, 2 epochs: generator at batches 0 and 2, discriminator at batch 0
        assert mine["global_step"] == 8 and mine["optimizer_steps"] == [4, 2], mine
        expected = [[0.01 * 0.9**k for k in range(4)], [0.01 * 0.8**k for k in range(2)]]
        assert [len(s) for s in mine["per_step"]] == [4, 2] and all(
            _close(a, b, 1e-9) for got, exp in zip(mine["per_step"], expected) for a, b in zip(got, exp)
        ), f"LR per real step {mine['per_step']}, expected {expected}"
        ref = _load(ref_path, "seed_intervals")
        assert mine == ref, f"2 ranks {mine} != 1 process {ref}"
        _assert_params_identical(trainer, result["_module"])


def check_seed_warmup(ref_path: str | None = None) -> None:
    """The seed's warm-up override (LR set from global_step inside optimizer_step)."""
    with _watchdog():
        result = _run_seed_module(SeedWarmup, B)
        trainer = result["_trainer"]
        _assert_two_ranks(trainer)
        mine = _public(result)
        _assert_same_on_all_ranks(trainer, "seed warm-up override (steps, LRs)", mine)
        assert mine["global_step"] == 8 and mine["optimizer_steps"] == [8, 8], mine
        expected = [min(1.0, float(g + 1) / WARMUP) * 0.01 for g in range(8)]
        assert mine["per_step"] == [expected, expected], f"LR per step {mine['per_step']}, expected {expected}"
        ref = _load(ref_path, "seed_warmup")
        assert mine == ref, f"2 ranks {mine} != 1 process {ref}"
        _assert_params_identical(trainer, result["_module"])


def check_gan_parameters_identical() -> None:
    """A GAN on different shards (shuffled): every parameter bitwise equal on all ranks."""
    with _watchdog(), tempfile.TemporaryDirectory() as root:
        trainer = _trainer(root, max_epochs=2)
        _assert_two_ranks(trainer)
        module = Gan()
        before = [p.detach().clone() for p in module.parameters()]
        trainer.fit(module, train_loader(B, shuffle=True))
        assert module.toggle_violations == [], f"wrong requires_grad toggling: {module.toggle_violations[:4]}"
        assert trainer.optimizer_steps == [8, 8] and trainer.global_step == 8, (trainer.optimizer_steps, trainer.global_step)
        assert all(not torch.equal(a, p) for a, p in zip(before, module.parameters())), "some parameter never trained"
        _assert_params_identical(trainer, module)
        _assert_same_on_all_ranks(trainer, "counters", (trainer.global_step, list(trainer.optimizer_steps)))


# -- 4. the rank-sync guard --------------------------------------------------------------------
def check_rank_desync_detected() -> None:
    """Rank 1 skips a step rank 0 takes: the check at global_step 2 raises on both ranks."""
    with _watchdog(), tempfile.TemporaryDirectory() as root:
        trainer = _trainer(root, max_epochs=2, check_rank_sync_every_n_steps=2)
        _assert_two_ranks(trainer)
        rank = trainer.accelerator.process_index
        message = None
        try:
            trainer.fit(DesyncedStep(), train_loader(B))
        except RankDesyncError as err:
            message = str(err)
        messages = _gather(trainer, message)
        assert all(m is not None for m in messages), f"RankDesyncError not raised on every rank: {messages}"
        assert "optimizer_steps[0]" in message, f"rank {rank}: message does not name optimizer_steps[0]: {message}"
        assert "rank 0: 2" in message and "rank 1: 1" in message, f"rank {rank}: per-rank counts missing: {message}"
        assert trainer.global_step == 2, f"rank {rank}: raised at global_step {trainer.global_step}, expected 2"


# -- 5. gradient accumulation with two optimizers ----------------------------------------------
def check_accumulation_two_optimizers() -> None:
    """gradient_accumulation_steps=2, 5 batches per rank per epoch (boundaries at 1, 3, 4)."""
    with _watchdog(), tempfile.TemporaryDirectory() as root:
        probe, rec = GradSyncProbe(), RecordLRs()
        trainer = _trainer(root, max_epochs=2, gradient_accumulation_steps=2, callbacks=[probe, rec])
        _assert_two_ranks(trainer)
        module = AccumulatingTwoPart()
        trainer.fit(module, train_loader(B, n=80))
        boundaries = {1, 3, 4}
        for epoch, batch_idx, opt, same in probe.after_backward:
            if batch_idx in boundaries:
                assert same, f"epoch {epoch} batch {batch_idx} optimizer {opt}: gradients not synchronised at a boundary"
            else:
                assert not same, (
                    f"epoch {epoch} batch {batch_idx} optimizer {opt}: gradients equal on both ranks on a "
                    "non-boundary batch (synchronised when they should accumulate locally)"
                )
        assert len(probe.after_backward) == 2 * 5 * 2, probe.after_backward
        steps = [(e, b, o) for e, b, o, _ in probe.before_step]
        assert steps == [(e, b, o) for e in range(2) for b in (1, 3, 4) for o in (0, 1)], steps
        assert all(same for *_, same in probe.before_step), probe.before_step
        assert trainer.global_step == 6, f"global_step {trainer.global_step}, expected 6 boundaries"
        assert trainer.optimizer_steps == [6, 6], trainer.optimizer_steps
        expected = [0.01 * 0.5**k for k in range(6)]
        assert rec.per_step == [expected, expected], f"LR per real step {rec.per_step}, expected {expected}"
        assert [_lr(o) for o in trainer.optimizers] == [0.01 * 0.5**6] * 2
        _assert_same_on_all_ranks(trainer, "counters and LRs", (trainer.global_step, list(trainer.optimizer_steps), rec.per_step))
        _assert_params_identical(trainer, module)


# -- 6. a non-finite loss on one rank -----------------------------------------------------------
def check_nonfinite_on_one_rank() -> None:
    """Rank 1's loss is NaN once; with on_nonfinite_loss="skip" both ranks skip that step."""
    with _watchdog(), tempfile.TemporaryDirectory() as root:
        trainer = _trainer(root, max_epochs=2, on_nonfinite_loss="skip")
        _assert_two_ranks(trainer)
        module = NanOnRankOne()
        trainer.fit(module, train_loader(B))
        _assert_same_on_all_ranks(trainer, "optimizer_steps", list(trainer.optimizer_steps))
        assert trainer.optimizer_steps == [7], f"optimizer_steps {trainer.optimizer_steps}, expected [7] (8 - 1 skipped)"
        assert trainer.global_step == 8, trainer.global_step
        assert all(torch.isfinite(p).all() for p in module.parameters())
        _assert_params_identical(trainer, module)


# -- 7. bf16 on CPU -----------------------------------------------------------------------------
def check_bf16_cpu() -> None:
    with _watchdog(), tempfile.TemporaryDirectory() as root:
        trainer = _trainer(root, max_epochs=2, mixed_precision="bf16")
        _assert_two_ranks(trainer)
        assert trainer.accelerator.mixed_precision == "bf16", trainer.accelerator.mixed_precision
        module = DtypeRecorder()
        before = [p.detach().clone() for p in module.parameters()]
        trainer.fit(module, train_loader(B, shuffle=True))
        assert module.output_dtypes == {"torch.bfloat16"}, f"forward outputs were {module.output_dtypes}, not bf16"
        assert trainer.global_step == 8 and trainer.optimizer_steps == [8]
        assert all(p.dtype == torch.float32 for p in module.parameters())
        assert all(torch.isfinite(p).all() for p in module.parameters())
        assert any(not torch.equal(a, p) for a, p in zip(before, module.parameters())), "no parameter changed"
        _assert_params_identical(trainer, module)


# -- 2b. a rank that gets no validation batch ---------------------------------------------------
def check_rank_without_validation_batches() -> None:
    """One validation batch on 2 ranks: rank 1 gets none (validation shards are not padded).

    The reduced metrics must still reach every rank: ``validate()`` returns the same dict on
    both, and ``EarlyStopping``/``ModelCheckpoint`` (strict) find ``val_loss`` on both, so both
    ranks take the same decision. A ``MeanMetric`` logged only on rank 0 must not hang.
    """
    # a short watchdog: the MeanMetric part can hang if rank 1 skips torchmetrics' collective
    with _watchdog(min(WATCHDOG_S, 30)), tempfile.TemporaryDirectory() as root:
        one_batch = DataLoader(regression_data(8, seed=1), batch_size=8)
        trainer = _trainer(root)
        _assert_two_ranks(trainer)
        results = trainer.validate(Regressor(), one_batch)[0]
        _assert_same_on_all_ranks(trainer, "validate() results with one validation batch", results)
        assert _close(results["val_loss"], _full_val_mse(Regressor(), one_batch), 1e-6), results

        stop = EarlyStopping(monitor="val_loss", patience=1)
        best = ModelCheckpoint(monitor="val_loss")
        trainer = _trainer(root, max_epochs=3, callbacks=[stop, best])
        trainer.fit(Regressor(), train_loader(B), one_batch)
        _assert_same_on_all_ranks(trainer, "callback_metrics['val_loss']", float(trainer.callback_metrics["val_loss"]))
        _assert_same_on_all_ranks(trainer, "current_epoch", trainer.current_epoch)
        _assert_same_on_all_ranks(trainer, "best_model_score", best.best_model_score)

        values = DataLoader(TensorDataset(torch.arange(2, dtype=torch.float32)), batch_size=2)
        results = _trainer(root).validate(MeanOfValues(), values)[0]
        _assert_same_on_all_ranks(trainer, "validate() MeanMetric results with one batch", results)
        assert results["val_mean"] == 0.5 and results["val_plain_mean"] == 0.5, results


CHECKS_WITH_REFERENCE = {
    "check_epoch_schedules": "epoch_schedules",
    "check_step_schedules": "step_schedules",
    "check_monitored_metrics": "monitoring",
    "check_seed_step_intervals": "seed_intervals",
    "check_seed_warmup": "seed_warmup",
    "check_validation_driven_decisions": "validation_decisions",
}
CHECKS_WITHOUT_REFERENCE = [
    "check_metric_object",
    "check_gan_parameters_identical",
    "check_rank_desync_detected",
    "check_accumulation_two_optimizers",
    "check_nonfinite_on_one_rank",
    "check_bf16_cpu",
    "check_rank_without_validation_batches",
    "check_several_validation_dataloaders",
]

_LAUNCH_ENV_PREFIXES = ("ACCELERATE_", "TORCHELASTIC_", "OMP_")
_LAUNCH_ENV_NAMES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                     "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _references_in_subprocess(path: str) -> None:
    """Compute the references in a fresh single process (this one is already part of a job)."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV_NAMES and not k.startswith(_LAUNCH_ENV_PREFIXES)}
    subprocess.run([sys.executable, os.path.abspath(__file__), "--references", path], env=env, check=True, timeout=300)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = os.path.join(tmp, "references.pt")
        _references_in_subprocess(ref_path)
        for name in CHECKS_WITH_REFERENCE:
            globals()[name](ref_path)
    for name in CHECKS_WITHOUT_REFERENCE:
        globals()[name]()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--references":
        write_references(sys.argv[2])
    else:
        main()

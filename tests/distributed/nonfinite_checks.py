"""Non-finite loss and gradients on 2 gloo ranks: every rank decides alike, without a collective per step.

Each ``check_*`` runs on every rank of a 2-process job (``launcher.run_on_ranks``), under DDP or
FSDP (asked for as ``accelerate launch --use_fsdp`` does, see ``fsdp_jobs.ask_for``).

* Under DDP "skip" decides from the gradients after the all-reduce (identical on every rank);
  a rank's non-finite loss reaches them through a NaN backward seed. No Python collective runs
  in a steady-state step (counted by patching ``torch.distributed``).
* Under FSDP gradients are shards: a non-finite value lands in one rank's shard, so "skip"
  all-reduces the flag (one number per optimizer step); the fault below is injected so that it
  lands in the *other* rank's shard, which a per-rank decision would get wrong.
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile
import traceback
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from fsdp_jobs import ask_for, full_state  # noqa: E402
from invariance_checks import _assert_params_identical, _assert_same_on_all_ranks, _watchdog  # noqa: E402

from accel_trainer import Callback, Trainer, TrainingModule  # noqa: E402
from accel_trainer.errors import TrainingError  # noqa: E402

AT = (0, 2)  # (epoch, batch_idx) of the fault
BATCHES = 8  # per rank and epoch


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2 * BATCHES * 4, 6, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True).tanh()), batch_size=4)


class Faulty(TrainingModule):
    """An MLP whose backward overflows, or whose loss is NaN, at ``AT`` on the ranks in ``ranks``.

    ``fault="column"``: the gradient flowing into hidden unit 0 becomes inf on that rank, so the
    gradient of the first layer's row 0 is non-finite in that rank's local sum only: after DDP's
    all-reduce on every rank; under FSDP (rows sharded over 2 ranks) in rank 0's shard only.
    ``fault="all"``: every gradient element of the hidden layer is non-finite.
    ``fault="loss"``: the loss is NaN.
    """

    def __init__(self, fault: str, ranks: tuple[int, ...]) -> None:
        super().__init__()
        torch.manual_seed(0)
        # called as one Sequential: under FSDP2 a submodule's parameters are gathered by its
        # wrapped ancestor's forward, so training_step must not call sublayers one by one
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.net[1].register_forward_hook(self._inject)
        self.fault, self.ranks = fault, ranks
        self._here = False

    def _inject(self, layer: Any, inputs: Any, h: torch.Tensor) -> None:
        if self._here and self.fault == "column":
            h.register_hook(lambda g: g.index_fill(1, torch.tensor([0]), float("inf")))
        elif self._here and self.fault == "all":
            h.register_hook(lambda g: g * float("inf"))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self._here = (self.current_epoch, batch_idx) == AT and self.trainer.global_rank in self.ranks
        loss = F.mse_loss(self.net(x), y)
        return loss * float("nan") if self._here and self.fault == "loss" else loss

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Snapshot(Callback):
    """The full parameters before and after the batch at ``AT`` (every rank; a collective under FSDP)."""

    def __init__(self) -> None:
        self.before: dict = {}
        self.after: dict = {}

    def _take(self, trainer: Trainer, module: Any) -> dict:
        if trainer.world_size > 1 and type(trainer._engine).__name__ == "FSDPEngine":
            return full_state(trainer)
        return {n: p.detach().clone() for n, p in module.named_parameters()}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == AT:
            self.before = self._take(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == AT:
            self.after = self._take(trainer, module)


class CountCollectives(Callback):
    """Python-level collectives per training batch, with the accel_trainer frames that called them.

    DDP's gradient all-reduce runs in C++ (not counted); what is counted is every collective
    the trainer, Accelerate or a callback starts from Python.
    """

    NAMES = (
        "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
        "broadcast_object_list", "reduce_scatter_tensor", "barrier", "gather_object", "reduce",
    )

    def __init__(self) -> None:
        self.batch: tuple[int, int] | None = None
        self.calls: dict[Any, list[str]] = collections.defaultdict(list)

    def install(self) -> None:
        import torch.distributed as dist

        for name in self.NAMES:
            original = getattr(dist, name, None)
            if original is None:
                continue

            def counted(*args, _original=original, _name=name, **kwargs):
                frames = [f"{os.path.basename(f.filename)}:{f.name}" for f in traceback.extract_stack()[:-1] if "accel_trainer" in f.filename]
                self.calls[self.batch].append(f"{_name} via {' > '.join(frames[-3:])}")
                return _original(*args, **kwargs)

            setattr(dist, name, counted)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batch = (trainer.current_epoch, batch_idx)

    def per_step(self) -> dict:
        """Collectives in the span of each batch that is not an epoch's last one, except the
        preemption poll (about every 0.5 s of training, not per step)."""
        return {
            key: [c for c in calls if "preemption.py" not in c]
            for key, calls in self.calls.items()
            if key is not None and key[1] != BATCHES - 1 and any("preemption.py" not in c for c in calls)
        }


def _run(engine: str, fault: str, ranks: tuple[int, ...], policy: str, callbacks: list) -> tuple[Trainer, Faulty]:
    ask_for(engine)
    module = Faulty(fault, ranks)
    trainer = Trainer(
        max_epochs=1, cpu=True, enable_progress_bar=False, default_root_dir=tempfile.mkdtemp(),
        on_nonfinite_loss=policy, callbacks=callbacks, log_every_n_steps=1000,
    )
    trainer.fit(module, _data())
    return trainer, module


def _assert_skipped_alike(trainer: Trainer, module: Faulty, snap: Snapshot) -> None:
    assert trainer.world_size == 2
    _assert_same_on_all_ranks(trainer, "optimizer_steps", list(trainer.optimizer_steps))
    assert trainer.optimizer_steps == [BATCHES - 1], trainer.optimizer_steps
    assert trainer.nonfinite_skips == 1, trainer.nonfinite_skips
    assert snap.before and snap.before.keys() == snap.after.keys()
    for name, value in snap.before.items():
        assert torch.equal(value, snap.after[name]), f"rank {trainer.global_rank}: {name} changed in the skipped step"


def check_ddp_skip_gradients_on_one_rank() -> None:
    """Rank 1's backward overflows (its loss is finite): both ranks skip that step, weights untouched."""
    with _watchdog():
        snap = Snapshot()
        trainer, module = _run("ddp", "column", (1,), "skip", [snap])
        _assert_skipped_alike(trainer, module, snap)
        _assert_params_identical(trainer, module)
        assert all(bool(torch.isfinite(p).all()) for p in module.parameters())


def check_ddp_skip_loss_on_one_rank_without_collectives() -> None:
    """Rank 1's loss is NaN: both ranks skip, and no step runs a collective to agree on it."""
    with _watchdog():
        snap, count = Snapshot(), CountCollectives()
        count.install()
        trainer, module = _run("ddp", "loss", (1,), "skip", [snap, count])
        _assert_skipped_alike(trainer, module, snap)
        _assert_params_identical(trainer, module)
        per_step = count.per_step()
        assert not per_step, f"collectives inside training steps: {per_step}"
        assert any(count.calls.values()), "the counter saw no collective at all (the epoch end has some)"


def check_fsdp2_skip_gradients_in_the_other_ranks_shard() -> None:
    """Rank 1 overflows into row 0 of the first layer, which rank 0's shard holds: both skip."""
    with _watchdog():
        snap = Snapshot()
        trainer, module = _run("fsdp2", "column", (1,), "skip", [snap])
        assert type(trainer._engine).__name__ == "FSDPEngine"
        _assert_skipped_alike(trainer, module, snap)
        state = full_state(trainer)
        assert all(bool(torch.isfinite(v).all()) for v in state.values())
        _assert_same_on_all_ranks(trainer, "parameters", {k: v.tolist() for k, v in state.items()})


def check_fsdp2_raise_checks_the_local_shards() -> None:
    """Every rank's gradients overflow: each rank finds it in its own DTensor shards and raises."""
    with _watchdog():
        try:
            _run("fsdp2", "all", (0, 1), "raise", [])
        except TrainingError as err:
            message = str(err)
            assert "gradients of optimizer 0" in message and "epoch 0, batch_idx 2" in message, message
            assert "'net.0.weight'" in message, message
        else:
            raise AssertionError("no TrainingError for non-finite gradients under FSDP2")


CHECKS = [
    "check_ddp_skip_gradients_on_one_rank",
    "check_ddp_skip_loss_on_one_rank_without_collectives",
    "check_fsdp2_skip_gradients_in_the_other_ranks_shard",
    "check_fsdp2_raise_checks_the_local_shards",
]

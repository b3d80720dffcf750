"""Resume checks on 2 ranks, and across world sizes (saved on 2, resumed on 1, and back).

Run directly with the real launcher:
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no tests/distributed/resume_checks.py
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from test_resume import Everything, EverythingStepPlateau, _data, _loaders, _run, _run_with, _snapshot  # noqa: E402

from accel_trainer import Callback, Trainer  # noqa: E402
from accel_trainer.callbacks import ModelCheckpoint  # noqa: E402


def _shared_dir(trainer: Trainer, path: str | None) -> str:
    """One temporary directory that every rank agrees on (rank 0 picks it)."""
    from accelerate.utils import broadcast_object_list

    chosen = [path or tempfile.mkdtemp()]
    broadcast_object_list(chosen, from_process=0)
    return chosen[0]


def check_two_rank_resume_is_exact(root: str | None = None) -> None:
    reference_trainer, reference_module = _run(os.path.join(root or tempfile.mkdtemp(), "full"), max_epochs=3)
    root = _shared_dir(reference_trainer, root)
    assert reference_trainer.world_size == 2
    reference = _snapshot(reference_trainer, reference_module)
    split = os.path.join(root, "split")
    first, _ = _run(split, max_epochs=3, max_steps=7)  # 5 batches per rank per epoch: mid-epoch 1
    assert first.global_step == 7
    resumed_trainer, resumed_module = _run(split, ckpt_path="last", max_epochs=3)
    resumed = _snapshot(resumed_trainer, resumed_module)
    assert resumed["global_step"] == reference["global_step"] == 15
    assert resumed["optimizer_steps"] == reference["optimizer_steps"]
    assert resumed["lrs"] == reference["lrs"]
    for name, value in reference["params"].items():
        assert torch.equal(value, resumed["params"][name]), f"{name} differs after a 2-rank resume"


def check_two_rank_resume_from_validation_checkpoints(root: str | None = None) -> None:
    """Issue 13 on 2 ranks (5 batches per rank and epoch, validation after batches 2, 4 and 5): files
    written between a batch and its validation, after a mid-epoch validation, and after the
    epoch's last validation (before its schedulers) all resume bitwise exactly."""
    schedule = dict(max_epochs=3, val_check_interval=2)
    root = _shared_dir(Trainer(cpu=True, enable_progress_bar=False, default_root_dir=tempfile.mkdtemp()), root)
    per_validation = ModelCheckpoint(dirpath=os.path.join(root, "val"), monitor="val_loss", save_top_k=-1)
    per_steps = ModelCheckpoint(dirpath=os.path.join(root, "steps"), every_n_train_steps=2, save_top_k=-1)
    full_trainer, full_module = _run_with(
        os.path.join(root, "full"), EverythingStepPlateau, [per_validation, per_steps], **schedule
    )
    assert full_trainer.world_size == 2 and full_trainer.global_step == 15
    reference = _snapshot(full_trainer, full_module)
    for name in ("steps/epoch=0-step=2.ckpt", "val/epoch=0-step=4.ckpt", "val/epoch=0-step=5.ckpt", "steps/epoch=1-step=6.ckpt"):
        resumed_trainer, resumed_module = _run_with(
            os.path.join(root, "resumed-" + name.replace("/", "-")), EverythingStepPlateau,
            ckpt_path=os.path.join(root, name), **schedule,
        )
        resumed = _snapshot(resumed_trainer, resumed_module)
        assert resumed["global_step"] == reference["global_step"] and resumed["lrs"] == reference["lrs"], name
        for param, value in reference["params"].items():
            assert torch.equal(value, resumed["params"][param]), f"{param} differs after resuming {name} on 2 ranks"


class _SignalOnRank1(Callback):
    """Rank 1 alone receives SIGTERM after global step 5; every step takes >= 0.2 s."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        time.sleep(0.2)  # the ranks poll for signals about every 0.5 s of training
        if trainer.global_step == 5 and trainer.accelerator.process_index == 1:
            os.kill(os.getpid(), signal.SIGTERM)


def check_signal_on_one_rank_stops_every_rank_at_the_same_step(root: str | None = None) -> None:
    from accelerate.utils import gather_object

    from accel_trainer.preemption import Preempted

    reference_trainer, reference_module = _run(os.path.join(root or tempfile.mkdtemp(), "full"), max_epochs=3)
    root = _shared_dir(reference_trainer, root)
    reference = _snapshot(reference_trainer, reference_module)
    split = os.path.join(root, "split")
    trainer = Trainer(cpu=True, enable_progress_bar=False, default_root_dir=split, seed=7, max_epochs=3,
                      callbacks=[_SignalOnRank1()])
    try:
        trainer.fit(Everything(), *_loaders())
        raise AssertionError("fit returned normally although rank 1 got SIGTERM")
    except Preempted as stop:
        assert stop.code == 75
    stopped = gather_object([trainer.global_step])
    assert stopped[0] == stopped[1], f"ranks stopped at different steps: {stopped}"
    assert 5 <= stopped[0] <= 8, stopped  # noticed within about 0.5 s (2-3 steps of 0.2 s)
    assert os.path.exists(os.path.join(split, "checkpoints", "last.ckpt"))
    resumed_trainer, resumed_module = _run(split, ckpt_path="last", max_epochs=3)
    resumed = _snapshot(resumed_trainer, resumed_module)
    assert resumed["global_step"] == reference["global_step"] == 15
    assert resumed["lrs"] == reference["lrs"]
    for name, value in reference["params"].items():
        assert torch.equal(value, resumed["params"][name]), f"{name} differs after a preempted 2-rank run resumed"


def unshuffled(batch_size: int):
    return DataLoader(_data(), batch_size=batch_size), DataLoader(_data(), batch_size=20)


def fit_unshuffled(root: str, batch_size: int, **kwargs) -> Trainer:
    trainer = Trainer(cpu=True, enable_progress_bar=False, default_root_dir=root, seed=7, **kwargs)
    trainer.fit(Everything(), *unshuffled(batch_size), **({"ckpt_path": kwargs.pop("ckpt_path")} if "ckpt_path" in kwargs else {}))
    return trainer


def save_on_this_world(root: str, stop_at: int) -> None:
    """Train until ``stop_at`` with a global batch of 12 (6 per rank on 2 ranks, 12 on 1)."""
    import accelerate

    world = accelerate.PartialState(cpu=True).num_processes
    trainer = Trainer(cpu=True, enable_progress_bar=False, default_root_dir=root, seed=7, max_epochs=3, max_steps=stop_at)
    trainer.fit(Everything(), *unshuffled(12 // world))
    assert trainer.global_step == stop_at


def resume_on_this_world(root: str) -> dict:
    import accelerate

    world = accelerate.PartialState(cpu=True).num_processes
    trainer = Trainer(cpu=True, enable_progress_bar=False, default_root_dir=root, seed=7, max_epochs=3)
    module = Everything()
    trainer.fit(module, *unshuffled(12 // world), ckpt_path="last")
    return _snapshot(trainer, module)


def check_resume_saved_on_1(root: str) -> None:
    """Resume on 2 ranks what a single process saved; compare with a file the parent wrote."""
    result = resume_on_this_world(root)
    expected = torch.load(os.path.join(root, "expected.pt"), weights_only=True)
    assert result["global_step"] == expected["global_step"]
    assert result["optimizer_steps"] == expected["optimizer_steps"]
    assert result["lrs"] == expected["lrs"]


def save_on_one_process_with_expectations(root: str) -> None:
    """The single-process half of the 1 -> 2 test (run in a subprocess: see test_resume_ranks)."""
    reference = fit_unshuffled(os.path.join(root, "reference"), 12, max_epochs=3)
    expected = {
        "global_step": reference.global_step,
        "optimizer_steps": list(reference.optimizer_steps),
        "lrs": [[g["lr"] for g in opt.param_groups] for opt in reference.optimizers],
    }
    run = os.path.join(root, "run")
    save_on_this_world(run, 7)
    torch.save(expected, os.path.join(run, "expected.pt"))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--save-on-one":
        save_on_one_process_with_expectations(sys.argv[2])
        return
    check_two_rank_resume_is_exact()


if __name__ == "__main__":
    main()

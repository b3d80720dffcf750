"""The same jobs under DDP and under FSDP (1 and 2) on 2 gloo CPU ranks, recorded for comparison.

``run(engine, case, out_dir, **options)`` runs on every rank of a 2-process job (forked by
``launcher.run_on_ranks``, or started by ``accelerate launch``): it asks for the engine the
way ``accelerate launch --use_fsdp --fsdp_version N`` does (the ``ACCELERATE_USE_FSDP`` /
``FSDP_*`` environment), builds a ``Trainer(cpu=True)`` -- which then trains with FSDP on CPU
-- and writes, from rank 0, what the comparison needs: full parameters, the learning rate of
every optimizer step, counters and monitored metrics. The tests compare these records.

Cases:
    a: one optimizer, AdamW + a step-interval scheduler + ``gradient_clip_val``.
    b: two optimizers with the seed's step-interval ``optimizer_step`` override, a warm-up
       and a ``ReduceLROnPlateau`` (``test_resume.Everything``: dropout, shuffling too).
    c: gradient accumulation (2) and bf16.
    d: one optimizer with a skipping ``optimizer_step`` override (carried gradients) and a
       warm-up -- what FSDP1 accepts of case b.
    e: case b's two optimizers with the default ``optimizer_step`` (FSDP1 accepts several
       optimizers only so).
    f: one optimizer, a warmed-up step scheduler and a ReduceLROnPlateau, accumulation (2) and
       clipping -- what DeepSpeed accepts.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from test_resume import Everything  # noqa: E402

from accel_trainer import Callback, Trainer, TrainingModule  # noqa: E402

ENGINES = ("ddp", "fsdp1", "fsdp2")


class Wide(TrainingModule):
    """An MLP with a step scheduler; ``clip`` and accumulation come from the Trainer."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.net(x).float(), y)
        self.log("train_loss", loss, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x).float(), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", F.mse_loss(self.net(x).float(), y))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=0.01)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.7), "interval": "step"}}


class WideEveryOther(Wide):
    """One optimizer stepping every other batch (the seed's override, gradients kept in between),
    with a declarative warm-up: allowed under FSDP1 too (one optimizer)."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        return [opt], [{"scheduler": torch.optim.lr_scheduler.ExponentialLR(opt, 0.95), "interval": "step", "warmup_steps": 4}]

    def optimizer_step(self, current_epoch, batch_nb, optimizer, optimizer_i, second_order_closure=None):
        if batch_nb % 2 == 1:
            optimizer.step()
            optimizer.zero_grad()


class WideWarmupPlateau(Wide):
    """One optimizer with a warmed-up step scheduler and a ReduceLROnPlateau: what DeepSpeed accepts."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=0.01)
        return [opt], [
            {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.8), "interval": "step", "warmup_steps": 5},
            {"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0, threshold=0.5), "monitor": "val_loss"},
        ]


class EverythingDefaultStep(Everything):
    """Case b without the override: two optimizers each stepping every batch (what FSDP1 accepts)."""

    optimizer_step = TrainingModule.optimizer_step


def _wide_data(n: int = 96) -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, (x[:, :1] * 2 - x[:, 1:2]).tanh() + 0.05 * torch.randn(n, 1, generator=g))


def _everything_data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 4, generator=g)
    return TensorDataset(x, torch.zeros(60, 1))


def case_setup(case: str) -> tuple[TrainingModule, DataLoader, DataLoader, dict]:
    """Module, loaders (per-rank batch size) and Trainer options of each case."""
    if case == "a":
        return Wide(), DataLoader(_wide_data(), batch_size=6, shuffle=True), DataLoader(_wide_data(40), batch_size=8), {"gradient_clip_val": 0.5}
    if case == "b":
        return Everything(), DataLoader(_everything_data(), batch_size=3, shuffle=True), DataLoader(_everything_data(), batch_size=10), {}
    if case == "c":
        return (
            Wide(lr=0.02),
            DataLoader(_wide_data(), batch_size=4, shuffle=True),
            DataLoader(_wide_data(40), batch_size=8),
            {"gradient_accumulation_steps": 2, "mixed_precision": "bf16"},
        )
    if case == "e":
        return EverythingDefaultStep(), DataLoader(_everything_data(), batch_size=3, shuffle=True), DataLoader(_everything_data(), batch_size=10), {}
    if case == "f":
        return (
            WideWarmupPlateau(lr=0.02),
            DataLoader(_wide_data(), batch_size=4, shuffle=True),
            DataLoader(_wide_data(40), batch_size=8),
            {"gradient_accumulation_steps": 2, "gradient_clip_val": 0.5},
        )
    if case == "d":
        return WideEveryOther(), DataLoader(_wide_data(), batch_size=6, shuffle=True), DataLoader(_wide_data(40), batch_size=8), {}
    raise ValueError(case)


class Record(Callback):
    """The learning rate of every real optimizer step and the monitored metrics after each validation."""

    def __init__(self) -> None:
        self.step_lrs: list[list[float]] = []
        self.val_loss: list[float] = []
        self._handles: list = []

    def on_fit_start(self, trainer: Any, module: Any) -> None:
        self.step_lrs = [[] for _ in trainer.optimizers]
        for i, opt in enumerate(trainer.optimizers):
            raw = opt
            while hasattr(raw, "optimizer"):  # Accelerate's wrapper, DeepSpeed's ZeRO optimizer: the torch optimizer
                raw = raw.optimizer

            def hook(optimizer: Any, args: Any, kwargs: Any, i: int = i) -> None:
                self.step_lrs[i].append(float(optimizer.param_groups[0]["lr"]))

            self._handles.append(raw.register_step_pre_hook(hook))

    def on_validation_end(self, trainer: Any, module: Any) -> None:
        if not trainer.sanity_checking and "val_loss" in trainer.callback_metrics:
            self.val_loss.append(float(trainer.callback_metrics["val_loss"]))

    def on_fit_end(self, trainer: Any, module: Any) -> None:
        for h in self._handles:
            h.remove()


def ask_for(engine: str) -> None:
    """Set the environment ``accelerate launch`` sets for ``engine``: ``ddp``, ``fsdp1``/``fsdp2``
    (its default FSDP flags), ``zero1``/``zero2``/``zero3`` (``--use_deepspeed --zero_stage N``)."""
    for key in [k for k in os.environ if k.startswith(("FSDP_", "ACCELERATE_DEEPSPEED_"))] + ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"]:
        os.environ.pop(key, None)
    if engine == "ddp":
        return
    if engine.startswith("zero"):
        os.environ.update({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": engine[-1]})
        import torch.distributed as dist

        if dist.is_initialized():  # forked ranks (run_on_ranks): DeepSpeed reads its rank from the environment
            os.environ.update(RANK=str(dist.get_rank()), LOCAL_RANK=str(dist.get_rank()))
        return
    os.environ.update(
        {
            "ACCELERATE_USE_FSDP": "true",
            "FSDP_VERSION": engine[-1],
            # accelerate launch's defaults for --use_fsdp
            "FSDP_USE_ORIG_PARAMS": "true",
            "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
            "FSDP_SYNC_MODULE_STATES": "true",
            "FSDP_OFFLOAD_PARAMS": "false",
            "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
            "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP",
            "FSDP_MIN_NUM_PARAMS": "20",  # small enough that the test models get nested units
            "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
        }
    )


def full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The module's full (unsharded) state dict on every rank, keys as ``module.state_dict()``."""
    from accel_trainer.sharded_state import PREFIX, model_state

    if type(trainer._engine).__name__ == "DeepSpeedEngine":
        import deepspeed

        module = trainer.lightning_module
        with deepspeed.zero.GatheredParameters(list(module.parameters())):  # ZeRO-3 partitions; a no-op below it
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    state = model_state(trainer._wrapped, full=True)
    return {k[len(PREFIX):]: v.detach().float().cpu().clone() for k, v in state.items()}


def record(trainer: Trainer, rec: Record) -> dict[str, Any]:
    return {
        "engine": type(trainer._engine).__name__,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "world_size": trainer.world_size,
        "params": full_state(trainer),
        "step_lrs": rec.step_lrs,
        "val_loss": rec.val_loss,
        "global_step": trainer.global_step,
        "optimizer_steps": list(trainer.optimizer_steps),
        "epoch": trainer.current_epoch,
        "lrs": [[float(g["lr"]) for g in getattr(o, "optimizer", o).param_groups] for o in trainer.optimizers],
        "sharded_params": [type(p).__name__ for p in trainer._wrapped.parameters()],
    }


def run(engine: str, case: str, root: str, out: str | None = None, ckpt_path: str | None = None, trainer_options: dict | None = None) -> None:
    """One job on every rank; rank 0 writes its record to ``out``.

    ``trainer_options`` may hold ``batch_scale``: multiply the training batch size (a
    1-process run with ``batch_scale=2`` steps on the same global batches as 2 ranks).
    """
    ask_for(engine)
    module, train, val, options = case_setup(case)
    rec = Record()
    options.update(trainer_options or {})
    scale = options.pop("batch_scale", 1)
    if scale != 1:
        train = DataLoader(train.dataset, batch_size=train.batch_size * scale, shuffle=True)
    options.setdefault("max_epochs", 3)
    trainer = Trainer(cpu=True, enable_progress_bar=False, default_root_dir=root, seed=7, callbacks=[rec], **options)
    trainer.fit(module, train, val, ckpt_path=ckpt_path)
    result = record(trainer, rec)
    if out is not None and trainer.is_global_zero:
        torch.save(result, out)
    trainer.accelerator.wait_for_everyone()


def max_abs_difference(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Largest absolute difference per compared quantity (parameters, step LRs, metrics)."""
    out = {"params": max(float((a["params"][k] - b["params"][k]).abs().max()) for k in a["params"])}
    out["step_lrs"] = max(
        (abs(x - y) for la, lb in zip(a["step_lrs"], b["step_lrs"]) for x, y in zip(la, lb)), default=0.0
    )
    out["val_loss"] = max((abs(x - y) for x, y in zip(a["val_loss"], b["val_loss"])), default=0.0)
    return out


def assert_equal_runs(a: dict[str, Any], b: dict[str, Any], tolerance: float = 1e-6) -> dict[str, float]:
    assert set(a["params"]) == set(b["params"])
    for key in ("global_step", "optimizer_steps", "epoch"):
        assert a[key] == b[key], f"{key}: {a[key]} vs {b[key]}"
    assert [len(x) for x in a["step_lrs"]] == [len(x) for x in b["step_lrs"]], "a different number of optimizer steps"
    assert len(a["val_loss"]) == len(b["val_loss"])
    diff = max_abs_difference(a, b)
    assert all(v <= tolerance for v in diff.values()), f"differences above {tolerance}: {diff}"
    return diff


# -- evaluation, big shards, a kill during a save ----------------------------------------------
def evaluate_under(root: str, engine: str) -> None:
    """validate() on an uneven split (3 batches on rank 0, 2 on rank 1) and test() where rank 1
    has no batch at all: both equal the mean over the whole set, computed in one process."""
    ask_for(engine)
    module, _, _, _ = case_setup("a")
    val = DataLoader(_wide_data(40), batch_size=8)
    test = DataLoader(_wide_data(8), batch_size=8)
    with torch.no_grad():
        x, y = _wide_data(40).tensors
        expected_val = float(F.mse_loss(module.net(x), y))
        x, y = _wide_data(8).tensors
        expected_test = float(F.mse_loss(module.net(x), y))
    trainer = Trainer(cpu=True, enable_progress_bar=False, default_root_dir=root)
    (val_results,) = trainer.validate(module, val)
    trainer2 = Trainer(cpu=True, enable_progress_bar=False, default_root_dir=root)
    (test_results,) = trainer2.test(module, test)
    if trainer.is_global_zero:
        torch.save(
            {
                "engine": type(trainer._engine).__name__,
                "validate": val_results["val_loss"],
                "test": test_results["test_loss"],
                "expected": expected_val,
                "expected_test": expected_test,
            },
            os.path.join(root, "evaluate.pt"),
        )
    trainer.accelerator.wait_for_everyone()


class Big(TrainingModule):
    def __init__(self, width: int = 512, depth: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return self.net(x).pow(2).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-4)


def save_big_sharded(root: str) -> None:
    ask_for("fsdp2")
    module = Big()
    trainer = Trainer(cpu=True, enable_progress_bar=False, default_root_dir=root, max_steps=1)
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(8, 512)), batch_size=2))
    numel = sum(p.numel() for p in module.parameters())
    path = os.path.join(root, "checkpoints", "last.ckpt")
    if trainer.is_global_zero:
        torch.save({"path": path, "full_bytes": 3 * 4 * numel}, os.path.join(root, "sizes.pt"))
    trainer.accelerator.wait_for_everyone()


def kill_during_sharded_save(tmp_path: Any) -> None:
    """SIGKILL a 2-rank FSDP job (its whole process group) while its shards sit in the staging
    directory: ``last.ckpt`` must still be the previous complete checkpoint, and resume exactly."""
    import glob
    import subprocess
    import time

    from distributed.test_launch import ACCELERATE, REPO, TESTS, _LAUNCH_VARS, _free_port

    root = str(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(ACCELERATE_USE_CPU="1", PYTHONPATH=os.pathsep.join([TESTS, REPO, os.path.dirname(__file__)]), OMP_NUM_THREADS="1", WANDB_MODE="offline")

    def launch(*args: str, slow: bool = False) -> subprocess.Popen:
        command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
                   __file__, *args]
        return subprocess.Popen(command, env={**env, "FSDP_JOBS_SLOW_SAVE": "1" if slow else "0"}, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first = launch("fsdp2", "a", root, "-", "none", "1")
    out = first.communicate(timeout=240)[0]
    assert first.returncode == 0, out[-3000:]
    last = os.path.join(root, "checkpoints", "last.ckpt")
    saved_step = torch.load(os.path.join(last, "trainer_state.pt"), weights_only=True)["loops"]["global_step"]

    doomed = launch("fsdp2", "a", root, "-", "last", "3", slow=True)
    pattern = os.path.join(root, "checkpoints", ".tmp-last.ckpt-*", "shards", ".metadata")
    deadline = time.monotonic() + 180
    while not glob.glob(pattern):
        assert doomed.poll() is None, doomed.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the slow save never started"
        time.sleep(0.05)
    _kill_tree(doomed.pid)  # the launcher, torchrun's agent and both ranks
    doomed.communicate(timeout=60)

    state = torch.load(os.path.join(last, "trainer_state.pt"), weights_only=True)
    assert state["loops"]["global_step"] == saved_step, "last.ckpt changed although its replacement never completed"
    assert glob.glob(pattern), "the interrupted save's staging directory should be left (never published)"

    result = os.path.join(str(tmp_path), "resumed.pt")
    final = launch("fsdp2", "a", root, result, "last", "3")
    out = final.communicate(timeout=240)[0]
    assert final.returncode == 0, out[-3000:]
    resumed = torch.load(result, weights_only=False)
    assert resumed["global_step"] == 24 and resumed["epoch"] == 3
    # the killed save's staging directory was removed when the next run started (issue 15)
    assert not glob.glob(os.path.join(root, "checkpoints", ".tmp-*")), os.listdir(os.path.join(root, "checkpoints"))
    assert "removed 1 temporary file(s) a killed run left" in out, out[-3000:]


def _kill_tree(root: int) -> None:
    """SIGKILL ``root`` and every descendant at once, as a machine losing power would (torchrun
    starts its workers in sessions of their own, so a process-group kill would miss them)."""
    import signal

    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    doomed, todo = [], [root]
    while todo:
        pid = todo.pop()
        doomed.append(pid)
        todo.extend(children.get(pid, []))
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _slow_down_saves() -> None:
    """Test hook: every sharded save sleeps after writing its shards, before it is published."""
    import time

    from accel_trainer import sharded_state

    original = sharded_state.save_sharded

    def slow(directory: str, state: dict) -> None:
        original(directory, state)
        time.sleep(120)

    sharded_state.save_sharded = slow


def main() -> None:
    """``accelerate launch fsdp_jobs.py ENGINE CASE ROOT OUT|- CKPT|none MAX_EPOCHS``."""
    import faulthandler

    faulthandler.enable()  # a rank that aborts (gloo, C++) shows where it was
    engine, case, root, out, ckpt, epochs = sys.argv[1:7]
    if os.environ.get("FSDP_JOBS_SLOW_SAVE") == "1":
        _slow_down_saves()
    run(engine, case, root, None if out == "-" else out, None if ckpt == "none" else ckpt, {"max_epochs": int(epochs)})


if __name__ == "__main__":
    main()

"""The one-process lean batch step (issue 16): taken only where it is exact, and exact where taken.

``OptimizationStep._train_batch_lean`` is ``_train_batch`` with ``_optimize`` and
``_forward_backward`` inlined for the commonest run. Users must not be able to tell which path
ran: the same weights, optimizer state, learning rates, counters and logged values, bit for bit;
and every feature the lean step does not cover must send the run down the general path.
"""

from __future__ import annotations

import pytest
import torch

from accel_trainer import Callback, Trainer
from accel_trainer.trainer import Trainer as TrainerClass
from helpers import Regressor, TwoPart, loader


class Scheduled(Regressor):
    """Adam with a step-interval scheduler and a warm-up: what the lean step's scheduler branch covers."""

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "warmup_steps": 4}}


class PathSpy(Callback):
    """Which batch step each epoch used, and the learning rate after every batch."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.lrs: list[float] = []

    def on_train_epoch_start(self, trainer, module):
        step = trainer._lean_batch_step()
        self.paths.append("lean" if step is not None else "general")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _fit(trainer_kwargs, module, monkeypatch=None, general=False, **kwargs):
    if general:
        assert monkeypatch is not None
        monkeypatch.setattr(TrainerClass, "_lean_batch_step", lambda self: None)
    spy = PathSpy()
    trainer = Trainer(max_epochs=2, callbacks=[spy], **{**trainer_kwargs, **kwargs})
    trainer.fit(module, loader(n=48, batch_size=8))
    return trainer, spy


def _optimizer_state(trainer) -> dict:
    opt = trainer.optimizers[0].optimizer
    return {f"{i}.{k}": v for i, s in enumerate(opt.state.values()) for k, v in s.items() if torch.is_tensor(v)}


def test_the_default_one_process_run_takes_the_lean_step_and_matches_the_general_path(trainer_kwargs, monkeypatch, tmp_path):
    calls = {"lean": 0, "general": 0}
    for name, key in (("_train_batch_lean", "lean"), ("_train_batch", "general")):
        original = getattr(TrainerClass, name)

        def counted(self, *args, _original=original, _key=key):
            calls[_key] += 1
            return _original(self, *args)

        monkeypatch.setattr(TrainerClass, name, counted)
    lean_module = Scheduled()
    lean, lean_spy = _fit(trainer_kwargs, lean_module)
    assert lean_spy.paths == ["lean", "lean"]
    assert calls == {"lean": 12, "general": 0}

    general_module = Scheduled()
    general, general_spy = _fit({**trainer_kwargs, "default_root_dir": str(tmp_path / "general")}, general_module, monkeypatch, general=True)
    assert general_spy.paths == ["general", "general"]
    assert calls == {"lean": 12, "general": 12}

    for (name, a), (_, b) in zip(lean_module.state_dict().items(), general_module.state_dict().items()):
        assert torch.equal(a, b), name
    state_a, state_b = _optimizer_state(lean), _optimizer_state(general)
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert lean_spy.lrs == general_spy.lrs  # warm-up and the step scheduler, step by step
    assert lean.global_step == general.global_step == 12
    assert lean.state.optimizer_steps == general.state.optimizer_steps == [12]
    assert torch.equal(lean.callback_metrics["train_loss"], general.callback_metrics["train_loss"])


class ClipHook(Callback):
    def __init__(self) -> None:
        self.calls = 0

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.calls += 1


class OwnStep(Regressor):
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_idx, second_order_closure=None):
        optimizer.step(second_order_closure)
        optimizer.zero_grad()


@pytest.mark.parametrize(
    "case",
    ["gradient_clip_val", "gradient_accumulation_steps", "on_before_optimizer_step", "optimizer_step override", "two optimizers"],
)
def test_runs_the_lean_step_does_not_cover_take_the_general_path(trainer_kwargs, case):
    kwargs: dict = {}
    module = Regressor()
    hook = ClipHook()
    callbacks: list = []
    if case == "gradient_clip_val":
        kwargs["gradient_clip_val"] = 0.5
    elif case == "gradient_accumulation_steps":
        kwargs["gradient_accumulation_steps"] = 2
    elif case == "on_before_optimizer_step":
        callbacks.append(hook)
    elif case == "optimizer_step override":
        module = OwnStep()
    else:
        module = TwoPart()
    spy = PathSpy()
    trainer = Trainer(max_epochs=1, callbacks=[spy, *callbacks], **trainer_kwargs, **kwargs)
    trainer.fit(module, loader(n=32, batch_size=8))
    assert spy.paths == ["general"]
    if case == "on_before_optimizer_step":
        assert hook.calls == 4  # the hook the lean step would have skipped ran at every step


def test_a_global_module_hook_registered_during_the_run_is_honoured(trainer_kwargs):
    """The lean step calls training_step directly, as the general path does without global hooks;
    a global forward hook registered mid-run sends the next batches down the general path, which
    calls the module through nn.Module.__call__ so that the hook fires."""
    seen: list[str] = []

    class Register(Callback):
        handle = None

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx == 1 and self.handle is None:
                inner = {id(module), id(module.net)}
                self.handle = torch.nn.modules.module.register_module_forward_hook(
                    lambda mod, args, out: None if id(mod) in inner else seen.append(type(mod).__name__)
                )

    register = Register()
    try:
        Trainer(max_epochs=1, callbacks=[register], **trainer_kwargs).fit(Regressor(), loader(n=32, batch_size=8))
    finally:
        if register.handle is not None:
            register.handle.remove()
    assert len(seen) == 2, seen  # batches 2 and 3 ran through the dispatcher's __call__

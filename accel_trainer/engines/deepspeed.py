"""DeepSpeed (ZeRO) through Accelerate: what it refuses, and how the model and schedulers are prepared."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigurationError
from .base import DDP_ALTERNATIVE, FSDP_ALTERNATIVE, Engine, Prepared, RunRequest


def check_deepspeed(request: RunRequest) -> None:
    """Refuse what DeepSpeed cannot run.

    One engine owns one optimizer and steps it inside ``accelerator.backward`` at every
    accumulation boundary; the optimizer handed back is a ``DeepSpeedOptimizerWrapper``
    whose ``step`` and ``zero_grad`` do nothing. Hence: more than one optimizer (the engine
    would never step or toggle the others); an overridden ``optimizer_step`` under automatic
    optimization (it runs after the engine already stepped, so it cannot decide when to step,
    skip a step or change the learning rate of the step); an optimizer that needs a closure
    (the engine steps without one); ``gradient_clip_val`` (the engine clips inside its step
    with the DeepSpeed config's ``gradient_clipping``); ``warmup_steps`` (it scales the
    learning rate around ``optimizer.step()``, after the engine's real step).

    Raises:
        ConfigurationError: naming what was asked, why, and what to use instead.
    """
    names = list(request.optimizer_names)
    needs_closure = request.needs_closure
    overrides_optimizer_step = request.overrides_optimizer_step and request.automatic_optimization
    gradient_clip_val = request.gradient_clip_val
    warmup_optimizers = request.warmup_optimizers
    module_name = request.module_name
    if len(names) > 1:
        raise ConfigurationError(
            f"DeepSpeed cannot train {len(names)} optimizers (configure_optimizers returned {list(names)}): its "
            "engine owns exactly one optimizer and steps it itself at every accumulation boundary, so the others "
            f"would never be stepped. Train several optimizers with {DDP_ALTERNATIVE} or {FSDP_ALTERNATIVE}."
        )
    if needs_closure:
        i = needs_closure[0]
        raise ConfigurationError(
            f"Optimizer {i} ({names[i]}) needs a closure (it re-evaluates the loss during its step), which DeepSpeed "
            "cannot run: the engine steps the optimizer inside backward, without a closure. Launch with "
            f"{DDP_ALTERNATIVE}, or train on one process."
        )
    if overrides_optimizer_step:
        raise ConfigurationError(
            f"{module_name} overrides optimizer_step, which DeepSpeed cannot honour: the engine takes the real "
            "optimizer step inside backward at every accumulation boundary, before optimizer_step runs (the "
            "optimizer's step() is a no-op there), so an override cannot decide when to step, skip a step or change "
            "the learning rate of a step. For a learning-rate warm-up use a step-interval scheduler, e.g. "
            "{'scheduler': torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / W, total_iters=W - 1), "
            f"'interval': 'step'}}; to keep the override, launch with {DDP_ALTERNATIVE} or {FSDP_ALTERNATIVE}."
        )
    if gradient_clip_val is not None:
        raise ConfigurationError(
            f"Trainer(gradient_clip_val={gradient_clip_val}) cannot be applied under DeepSpeed: the engine clips "
            "inside its own step, before the trainer could, with the DeepSpeed config's 'gradient_clipping'. Set "
            "gradient_clipping in the DeepSpeed config (deepspeed_config in the accelerate config file) and leave "
            "gradient_clip_val=None."
        )
    if warmup_optimizers:
        raise ConfigurationError(
            f"A scheduler dict sets 'warmup_steps' for optimizer {warmup_optimizers[0]}, which DeepSpeed cannot "
            "honour: the warm-up scales the learning rate around optimizer.step(), but the engine takes the real "
            "step earlier, inside backward. Use a step-interval warm-up scheduler instead: "
            "torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / W, total_iters=W - 1) with 'interval': 'step' "
            f"gives the same learning rates as 'warmup_steps': W; or launch with {DDP_ALTERNATIVE} or "
            f"{FSDP_ALTERNATIVE}."
        )
    raise ConfigurationError(
        "DeepSpeed is not supported yet: the trainer writes checkpoints/last.ckpt at the end of every epoch from "
        "the global main process, and under ZeRO the optimizer state (stage 1-2) and the weights (stage 3) are "
        "partitioned across ranks, so that file would hold one rank's partition. Launch with "
        f"{DDP_ALTERNATIVE} or {FSDP_ALTERNATIVE} (checkpoints hold the full gathered state there)."
    )


class DeepSpeedEngine(Engine):
    """Accelerate's DeepSpeed integration (one model, one optimizer, the trainer's schedulers)."""

    label = "DeepSpeed"

    def check(self, request: RunRequest) -> None:
        check_deepspeed(request)

    def prepare(self, dispatchers: list, optimizers: list, schedulers: list, train_loader: Any) -> Prepared:
        """Model and optimizer through ``deepspeed.initialize``; the schedulers stay the trainer's.

        In one ``prepare`` call, Accelerate's ``_prepare_deepspeed`` (accelerate/accelerator.py)
        keeps a single scheduler: every scheduler passed comes back as the last one. A
        DeepSpeed-native schedule (``WarmupLR``, ``OneCycle`` …) is handed to
        ``deepspeed.initialize``, whose engine steps it inside every ``engine.step()``, and
        comes back as a ``DeepSpeedSchedulerWrapper`` whose ``step()`` does nothing: interval,
        frequency, monitor and plateau rules could not apply. So the model and optimizer are
        prepared first, then each scheduler through ``prepare_scheduler``, which wraps it in a
        plain ``AcceleratedScheduler`` that the ``SchedulerRunner`` steps like any other. (A
        second ``prepare`` call would not do that: with no model in the call,
        ``_prepare_deepspeed`` hands schedulers back unwrapped.) The scheduler still drives the
        learning rate: DeepSpeed steps the optimizer it was built on (ZeRO wraps it and steps
        it; CPU offload builds its optimizer from the same ``param_groups`` dicts).

        The dataloaders are prepared later, so a ``train_micro_batch_size_per_gpu: auto`` in
        the DeepSpeed config is filled here from the training loader's ``batch_size``, as
        ``_prepare_deepspeed`` itself does when a loader is in the call (without one it raises).
        """
        from torch.optim.lr_scheduler import LRScheduler

        accelerator = self.accelerator
        plugin = accelerator.deepspeed_plugin
        batch_size = getattr(train_loader, "batch_size", None)
        if plugin is not None and batch_size and plugin.is_auto("train_micro_batch_size_per_gpu"):
            if accelerator.split_batches:
                batch_size //= accelerator.num_processes
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
        prepared = accelerator.prepare(*dispatchers, *optimizers)
        prepared = list(prepared) if isinstance(prepared, (list, tuple)) else [prepared]
        # Only LRSchedulers are wrapped, as in a plain prepare call; other schedulers pass as given.
        prepared_schedulers = [
            accelerator.prepare_scheduler(s) if isinstance(s, LRScheduler) else s for s in schedulers
        ]
        n = len(dispatchers)
        return Prepared(prepared[:n], prepared[n:], prepared_schedulers)

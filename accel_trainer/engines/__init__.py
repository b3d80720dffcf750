"""The engine a run trains under -- plain/DDP, FSDP or DeepSpeed -- one module each.

* :mod:`.base`: the small interface (check, prepare, clip, checkpoint payload) and the
  :class:`RunRequest` the rules read;
* :mod:`.ddp`: one process and DDP (the per-optimizer wrapper plan);
* :mod:`.fsdp`: FSDP 1 and 2, sharded checkpoints, FSDP on CPU;
* :mod:`.deepspeed`: DeepSpeed's refusals and preparation.

This module picks the engine for an accelerator (:func:`engine_for`) and makes sure the
engine a launch asked for is the one that runs (:func:`check_requested_engine`): Accelerate
silently drops an FSDP or DeepSpeed request on CPU and trains DDP instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigurationError
from .base import DDP_ENGINES, DEEPSPEED, FSDP, Engine, PayloadSource, Prepared, RunRequest, WrapperPlan, engine_name
from .ddp import DDPEngine, plan_wrappers
from .deepspeed import DeepSpeedEngine, check_deepspeed
from .fsdp import FSDPEngine, check_fsdp


def engine_for(accelerator: Any) -> Engine:
    """The engine implementation for ``accelerator.distributed_type``."""
    name = engine_name(accelerator.distributed_type)
    if name == FSDP:
        return FSDPEngine(accelerator)
    if name == DEEPSPEED:
        return DeepSpeedEngine(accelerator)
    return DDPEngine(accelerator)


def requested_engine(environ: Mapping[str, str] | None = None) -> str | None:
    """``"FSDP"`` or ``"DEEPSPEED"`` when the launch asked for one (``accelerate launch --use_fsdp`` …)."""
    env = os.environ if environ is None else environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return DEEPSPEED
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return FSDP
    return None


_HOW = {
    FSDP: (
        "FSDP runs on GPUs (accelerate launch --use_fsdp ... or --config_file launch/fsdp.yaml) and, for "
        "debugging and CI, on CPU processes when the Trainer builds the Accelerator itself (Trainer(cpu=True) or a "
        "machine without GPUs; do not pass accelerator=...)"
    ),
    DEEPSPEED: "DeepSpeed needs the Trainer to build the Accelerator (do not pass accelerator=...) and the deepspeed package",
}


def check_requested_engine(accelerator: Any, environ: Mapping[str, str] | None = None) -> None:
    """Raise when the launch asked for FSDP or DeepSpeed and ``accelerator`` would run something else.

    Raises:
        ConfigurationError: naming the engine asked for, the one that would run, and how to
            get the one asked for. Never DDP in FSDP's clothes.
    """
    asked = requested_engine(environ)
    if asked is None:
        return
    actual = engine_name(accelerator.distributed_type)
    if actual == asked:
        return
    label = {FSDP: "FSDP", DEEPSPEED: "DeepSpeed"}[asked]
    would = {"MULTI_CPU": "DDP on CPU (gloo)", "MULTI_GPU": "DDP", "NO": "a single process without sharding"}.get(actual, actual)
    raise ConfigurationError(
        f"The launch asked for {label} (ACCELERATE_USE_{asked}=true), but this Accelerator would train with {would} "
        f"(distributed_type {actual}). {_HOW[asked]}. To train with {would} on purpose, launch without "
        f"--use_{'fsdp' if asked == FSDP else 'deepspeed'}."
    )


def check_engine_support(
    distributed_type: Any,
    *,
    optimizer_names: Sequence[str],
    needs_closure: Sequence[int] = (),
    overrides_optimizer_step: bool = False,
    automatic_optimization: bool = True,
    gradient_accumulation_steps: int = 1,
    gradient_clip_val: float | None = None,
    gradient_clip_algorithm: str = "norm",
    warmup_optimizers: Sequence[int] = (),
    fsdp_plugin: Any = None,
    module_name: str = "The module",
) -> None:
    """Refuse what ``distributed_type`` cannot run (:func:`.fsdp.check_fsdp`, :func:`.deepspeed.check_deepspeed`).

    Example:
        >>> check_engine_support("DEEPSPEED", optimizer_names=["Adam", "Adam"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        accel_trainer.errors.ConfigurationError: DeepSpeed cannot train 2 optimizers ...
    """
    request = RunRequest(
        optimizer_names=list(optimizer_names),
        needs_closure=list(needs_closure),
        overrides_optimizer_step=overrides_optimizer_step,
        automatic_optimization=automatic_optimization,
        gradient_accumulation_steps=gradient_accumulation_steps,
        gradient_clip_val=gradient_clip_val,
        gradient_clip_algorithm=gradient_clip_algorithm,
        warmup_optimizers=list(warmup_optimizers),
        module_name=module_name,
    )
    engine = engine_name(distributed_type)
    if engine == DEEPSPEED:
        check_deepspeed(request)
    elif engine == FSDP:
        check_fsdp(request, fsdp_plugin)


__all__ = [
    "DDP_ENGINES",
    "DDPEngine",
    "DeepSpeedEngine",
    "Engine",
    "FSDPEngine",
    "PayloadSource",
    "Prepared",
    "RunRequest",
    "WrapperPlan",
    "check_engine_support",
    "check_requested_engine",
    "engine_for",
    "engine_name",
    "plan_wrappers",
    "requested_engine",
]

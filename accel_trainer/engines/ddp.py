"""One process, or DDP over N processes: the engine every other one is measured against.

The model is wrapped by Accelerate (``DistributedDataParallel`` on several processes),
every rank holds the whole model and optimizer state, and a checkpoint is one file the
global main process writes (the format ``accel_trainer.checkpoint`` has always used).
It can also resume from a sharded FSDP checkpoint: DCP reassembles the full tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .. import sharded_state
from .base import DDP_ENGINES, Engine, PayloadSource, WrapperPlan, engine_name, refuse_deepspeed_payload


def plan_wrappers(distributed_type: Any, num_processes: int, automatic: bool, owners: Sequence[set[int]]) -> WrapperPlan:
    """Decide the DDP wrappers for optimizers owning the parameter ids in ``owners``.

    Under DDP, the loop's toggling means optimizer i's backward gives gradients only to
    optimizer i's parameters. One DDP wrapper would then need ``find_unused_parameters``
    (a graph traversal on every step), so disjoint optimizers get one wrapper each that
    ignores every parameter it does not own: each backward reduces exactly the gradients it
    produced. Optimizers that share parameters fall back to one wrapper with
    ``find_unused_parameters=True``. Everything else (one process, one optimizer, manual
    optimization, and FSDP/DeepSpeed, whose ``prepare`` accepts a single model) gets one
    plain wrapper.

    Args:
        distributed_type: ``accelerator.distributed_type`` (or its name).
        num_processes: ``accelerator.num_processes``.
        automatic: the module's ``automatic_optimization``.
        owners: per optimizer, the ``id``s of the parameters it owns.

    Example:
        >>> plan_wrappers("MULTI_GPU", 2, True, [{1, 2}, {3}])
        WrapperPlan(per_optimizer=True, find_unused_parameters=False)
    """
    n_opt = len(owners)
    if n_opt < 2 or not automatic or num_processes == 1 or engine_name(distributed_type) not in DDP_ENGINES:
        return WrapperPlan()
    shared = any(owners[i] & owners[j] for i in range(n_opt) for j in range(i + 1, n_opt))
    if shared:
        return WrapperPlan(find_unused_parameters=True)
    return WrapperPlan(per_optimizer=True)


class DDPEngine(Engine):
    """One process or DDP (also any other Accelerate engine without sharding rules, e.g. XLA)."""

    label = "DDP"

    def wrapper_plan(self, automatic: bool, owners: Sequence[set[int]]) -> WrapperPlan:
        acc = self.accelerator
        return plan_wrappers(acc.distributed_type, acc.num_processes, automatic, owners)

    def direct_backward(self) -> bool:
        # accelerator.backward(loss) only divides by gradient_accumulation_steps and calls
        # loss.backward() when there is no DeepSpeed/Megatron engine and no fp16 scaler; with
        # accumulation 1 the division is a no-op (x / 1 == x exactly), so call backward directly.
        from accelerate import Accelerator

        acc = self.accelerator
        return (
            acc.gradient_accumulation_steps == 1
            and getattr(acc, "scaler", None) is None
            and engine_name(acc.distributed_type) in ("NO", *DDP_ENGINES)
            and type(acc).backward is Accelerator.backward
            and "backward" not in vars(acc)
        )

    def clip_gradients(self, optimizer: Any, params: list, wrapped: torch.nn.Module, n_optimizers: int, max_norm: float, algorithm: str) -> None:
        acc = self.accelerator
        if engine_name(acc.distributed_type) == "XLA":  # gradients are reduced inside Accelerate's clip
            clip = acc.clip_grad_norm_ if algorithm == "norm" else acc.clip_grad_value_
            clip(params, max_norm)
            return
        # Unscale only this optimizer: Accelerate's clip_grad_norm_ unscales every optimizer,
        # which under fp16 with two optimizers unscales the other one twice.
        acc.unscale_gradients(optimizer=optimizer)
        if algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            torch.nn.utils.clip_grad_value_(params, max_norm)

    # -- checkpoints ----------------------------------------------------------------------------
    def save_payload(self, directory: str | None, module: torch.nn.Module, wrapper: torch.nn.Module, optimizers: list) -> dict[str, Any]:
        return {
            "state_dict": module.state_dict(),
            "optimizer_states": [opt.state_dict() for opt in optimizers],
            # Gradients an optimizer_step override left un-zeroed (it skipped a step) carry into
            # the next batch; without them a resumed run would take a different step.
            "grads": {name: p.grad for name, p in module.named_parameters() if p.grad is not None},
        }

    def restore_payload(self, source: PayloadSource, module: torch.nn.Module, wrapper: torch.nn.Module, optimizers: list) -> None:
        refuse_deepspeed_payload(source, "DDP")
        if source.shards is not None:  # written by FSDP: DCP reassembles the full tensors
            sharded_state.restore_payload(source.shards, source.checkpoint["sharded"], module, wrapper, optimizers)
            return
        checkpoint = source.checkpoint
        module.load_state_dict(checkpoint["state_dict"])
        grads = checkpoint.get("grads", {})
        for name, p in module.named_parameters():
            p.grad = grads[name].to(p.device, p.dtype) if name in grads else None
        for opt, opt_state in zip(optimizers, checkpoint["optimizer_states"]):
            opt.load_state_dict(opt_state)


__all__ = ["DDPEngine", "plan_wrappers"]

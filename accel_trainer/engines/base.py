"""The interface every engine implements, and what a run asks of an engine.

An *engine* is what Accelerate trains the model with: plain (one process), DDP, FSDP or
DeepSpeed. The loop of CONTRACT.md is written once; everything that differs between
engines sits behind the small :class:`Engine` interface below, one module per engine:

* ``check`` -- refuse, before anything is prepared, what the engine cannot run correctly;
* ``wrapper_plan`` / ``prepare`` / ``prepare_for_evaluation`` -- wrap the model and hand
  the optimizers and schedulers to Accelerate;
* ``clip_gradients`` -- clip one optimizer's gradients the way the engine's shards allow;
* ``save_payload`` / ``restore_payload`` -- the model, optimizer and carried-gradient part
  of a checkpoint (the rest -- counters, schedulers, RNG, callbacks -- is the same for every
  engine and lives in :mod:`accel_trainer.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..errors import CheckpointError

#: the engines under which the trainer builds its own DDP wrappers (see ``ddp.plan_wrappers``)
DDP_ENGINES = ("MULTI_GPU", "MULTI_CPU")
FSDP = "FSDP"
DEEPSPEED = "DEEPSPEED"

DDP_ALTERNATIVE = "DDP (accelerate launch --config_file launch/multi_gpu.yaml)"
FSDP_ALTERNATIVE = "FSDP (--config_file launch/fsdp.yaml)"


def engine_name(distributed_type: Any) -> str:
    """``"FSDP"``, ``"DEEPSPEED"``, ``"MULTI_GPU"`` … for a ``DistributedType`` or its name."""
    value = getattr(distributed_type, "value", distributed_type)
    return str(value).rsplit(".", 1)[-1].upper()


@dataclass
class RunRequest:
    """What a run asks of the engine, as names and numbers (so the rules are pure and testable).

    Attributes:
        optimizer_names: the type name of each optimizer, in ``configure_optimizers`` order.
        needs_closure: indices of the optimizers whose ``step`` needs a closure (LBFGS).
        overrides_optimizer_step: the module overrides ``TrainingModule.optimizer_step``.
        automatic_optimization: the module's ``automatic_optimization``.
        gradient_accumulation_steps, gradient_clip_val, gradient_clip_algorithm: the Trainer's.
        warmup_optimizers: indices of the optimizers a scheduler dict gives ``warmup_steps``.
        module_name: the module's class name, for the messages.
    """

    optimizer_names: Sequence[str] = ()
    needs_closure: Sequence[int] = ()
    overrides_optimizer_step: bool = False
    automatic_optimization: bool = True
    gradient_accumulation_steps: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    warmup_optimizers: Sequence[int] = field(default_factory=tuple)
    module_name: str = "The module"


class WrapperPlan(NamedTuple):
    """How the trainer wraps the module before ``accelerator.prepare``.

    Attributes:
        per_optimizer: one DDP wrapper per optimizer, each ignoring the parameters that
            optimizer does not own (otherwise: one wrapper for all optimizers).
        find_unused_parameters: the single wrapper must tolerate parameters that get no
            gradient in a backward pass.
    """

    per_optimizer: bool = False
    find_unused_parameters: bool = False


@dataclass
class Prepared:
    """What ``Engine.prepare`` hands back: wrappers (one, or one per optimizer), optimizers, schedulers."""

    wrappers: list
    optimizers: list
    schedulers: list


class Engine:
    """The plain/DDP behaviour; FSDP and DeepSpeed override what differs.

    Args:
        accelerator: the run's ``accelerate.Accelerator``.
    """

    #: for messages ("DDP", "FSDP", "DeepSpeed")
    label = "DDP"
    #: checkpoints are a directory every rank writes its shards into (else one file that the
    #: global main process writes)
    sharded_checkpoints = False
    #: every forward pass is a collective (FSDP all-gathers sharded parameters), so all ranks
    #: must run the same number of them (see ``accel_trainer.lockstep``)
    forward_is_collective = False
    #: the optimizer's real step happens inside ``accelerator.backward`` at a boundary (DeepSpeed),
    #: so the warm-up must be applied around that backward, not around ``optimizer.step()``
    step_inside_backward = False
    #: a sharded checkpoint's payload sub-directory
    payload_dir = "shards"

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def describe(self) -> str:
        """What trains, in words (for the command line's summary): "DDP over gloo on CPU" …"""
        acc = self.accelerator
        if acc.num_processes == 1:
            return f"a single process on {acc.device}"
        backend = getattr(acc.state, "backend", None)
        name = self.variant()
        return f"{name} over {backend} on {acc.device.type.upper()}" if backend else name

    def variant(self) -> str:
        """The engine's name with its version or stage ("FSDP2", "DeepSpeed ZeRO-3"); default: ``label``."""
        return self.label

    # -- before training ------------------------------------------------------------------------
    def check(self, request: RunRequest) -> None:
        """Raise ``ConfigurationError`` for what this engine cannot run; the default runs everything."""

    def wrapper_plan(self, automatic: bool, owners: Sequence[set[int]]) -> WrapperPlan:
        return WrapperPlan()

    def prepare(self, dispatchers: list, optimizers: list, schedulers: list, train_loader: Any) -> Prepared:
        prepared = self.accelerator.prepare(*dispatchers, *optimizers, *schedulers)
        if not isinstance(prepared, (list, tuple)):
            prepared = [prepared]
        prepared = list(prepared)
        n_wrappers, n_opt = len(dispatchers), len(optimizers)
        return Prepared(prepared[:n_wrappers], prepared[n_wrappers : n_wrappers + n_opt], prepared[n_wrappers + n_opt :])

    def prepare_for_evaluation(self, dispatcher: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.prepare(dispatcher)

    def direct_backward(self) -> bool:
        """May the loop call ``loss.backward()`` instead of ``accelerator.backward(loss)``?"""
        return False

    # -- each step ------------------------------------------------------------------------------
    def clip_gradients(self, optimizer: Any, params: list, wrapped: torch.nn.Module, n_optimizers: int, max_norm: float, algorithm: str) -> None:
        raise NotImplementedError

    # -- checkpoints ----------------------------------------------------------------------------
    def save_payload(self, directory: str | None, module: torch.nn.Module, wrapper: torch.nn.Module, optimizers: list) -> dict[str, Any]:
        """The model/optimizer/carried-gradient part of a checkpoint (every rank calls this).

        With ``sharded_checkpoints`` the tensors are written into ``directory`` and only
        their description is returned (it goes into the checkpoint's state file); otherwise
        ``directory`` is None and the tensors themselves are returned (the global main
        process writes them into the single checkpoint file).
        """
        raise NotImplementedError

    def restore_payload(self, source: PayloadSource, module: torch.nn.Module, wrapper: torch.nn.Module, optimizers: list) -> None:
        """Load what :meth:`save_payload` wrote, by any engine, into this run (every rank calls this)."""
        raise NotImplementedError

    def state_shapes(self, module: torch.nn.Module, wrapper: torch.nn.Module) -> dict[str, tuple[int, ...]]:
        """Name -> global shape of every tensor of the module being trained (to check a checkpoint against)."""
        from ..sharded_state import PREFIX, model_state

        return {k[len(PREFIX):] if k.startswith(PREFIX) else k: tuple(v.shape) for k, v in model_state(wrapper).items()}

    def payload_file_owner(self, name: str, index: int, world_size: int) -> int:
        """The rank that hashes payload file ``name`` (the ``index``-th, sorted) of a checkpoint directory.

        Each file's checksum is recorded in the checkpoint (:mod:`accel_trainer.integrity`);
        a rank hashing the files it wrote itself reads them from its own page cache. The
        default spreads the files over the ranks; an engine whose file names carry the
        writing rank says so here.
        """
        return index % world_size


def refuse_deepspeed_payload(source: PayloadSource, engine_label: str) -> None:
    """A ZeRO checkpoint holds the engine's own partitioned format: only DeepSpeed resumes it."""
    meta = source.checkpoint.get("sharded") or {}
    if meta.get("engine") == "DeepSpeed":
        raise CheckpointError(
            f"{source.path!r} was written by DeepSpeed ZeRO-{meta.get('zero_stage')} on {meta.get('world_size')} "
            f"processes; {engine_label} cannot read ZeRO's partitioned optimizer state. Resume it under DeepSpeed "
            f"with the same stage and number of processes, or export its weights (accel-trainer export {source.path} "
            "weights.safetensors) and start a new run from them."
        )


@dataclass
class PayloadSource:
    """Where a checkpoint's model/optimizer/gradient part comes from.

    Attributes:
        path: the checkpoint (file, or directory of a sharded checkpoint), for messages.
        checkpoint: the checkpoint dict: a file's whole content, or a sharded checkpoint's
            state file (whose ``"sharded"`` entry describes the shards).
        shards: the DCP directory of a sharded checkpoint (None for a single file).
    """

    path: str
    checkpoint: dict[str, Any]
    shards: str | None = None

"""Full (unsharded) model and optimizer state under FSDP, for the trainer's single-file checkpoints.

Under FSDP each rank holds a shard of every parameter and of the optimizer state, so
``module.state_dict()`` / ``optimizer.state_dict()`` on the global main process would save
one shard and call it the model. torch's ``torch.distributed.checkpoint.state_dict`` API
(``get_model_state_dict`` / ``get_optimizer_state_dict`` with ``full_state_dict=True``) gathers
the full tensors -- a collective, so every rank calls it, as ``Trainer.save_checkpoint``
already requires -- onto rank 0's CPU (the others get empty dicts: only rank 0 writes), and
works alike for FSDP1 (``use_orig_params``) and FSDP2. The optimizer state comes keyed by
parameter name instead of index.

Resuming a run under FSDP is refused for now (``checkpoint.restore_checkpoint``): putting
this state back with ``set_model_state_dict`` / ``set_optimizer_state_dict`` restored equal
tensors in a CPU test with FSDP2 over gloo, yet the continued run differed from an
uninterrupted one, and without a GPU the cause could not be pinned down.
"""

from __future__ import annotations

from typing import Any, Sequence

PREFIX = "module."  # the trainer wraps the user's module in a dispatcher under this attribute


def _options(cpu_offload: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def _raw(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps it


def gather_full_state(wrapper: Any, optimizers: Sequence[Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The module's full state dict (keys as ``module.state_dict()`` names them) and each optimizer's."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _options(cpu_offload=True)
    model = get_model_state_dict(wrapper, options=options)
    model = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in model.items()}
    optimizer_states = [get_optimizer_state_dict(wrapper, _raw(opt), options=options) for opt in optimizers]
    return model, optimizer_states

"""FSDP2 (torch ``fully_shard``) on 2 gloo CPU ranks: the checkpoint's full-state gather.

Accelerate offers FSDP only on GPUs, but torch's ``fully_shard`` runs on CPU over gloo, so
the part of checkpointing that differs under FSDP -- gathering full tensors from the
shards -- is checked here with the trainer's own function.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _Dispatcher(torch.nn.Module):  # the trainer's wrapper keeps the user's module as .module
    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _train(wrapper, optimizer, steps: int) -> None:
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g)  # the same batch on every rank: FSDP's mean == one process
        loss = wrapper(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def check_full_state_gather() -> None:
    from torch.distributed.fsdp import fully_shard

    from accel_trainer.sharded_state import gather_full_state

    assert dist.get_world_size() == 2
    reference = _model()
    reference_opt = torch.optim.Adam(reference.parameters(), lr=0.01)
    _train(reference, reference_opt, 3)

    wrapper = _Dispatcher(_model())
    fully_shard(wrapper)
    optimizer = torch.optim.Adam(wrapper.parameters(), lr=0.01)
    assert any(type(p).__name__ == "DTensor" for p in wrapper.parameters()), "not sharded"
    _train(wrapper, optimizer, 3)

    model_state, (opt_state,) = gather_full_state(wrapper, [optimizer])
    # like the trainer's save: gathered on rank 0 (the saving process), empty elsewhere
    rank = dist.get_rank()
    assert bool(model_state) == (rank == 0), f"rank {rank} got {len(model_state)} tensors"
    if rank != 0:
        return
    assert set(model_state) == set(reference.state_dict()), sorted(model_state)
    for name, value in reference.state_dict().items():
        assert tuple(model_state[name].shape) == tuple(value.shape), name  # full, not a shard
        assert torch.allclose(model_state[name], value, atol=1e-6), name
    # Adam's moments are full too: one entry per parameter name, shaped like the parameter
    assert set(opt_state["state"]) == {"module." + k for k in reference.state_dict()}

"""Model and optimizer state through ``torch.distributed.checkpoint`` (DCP): sharded saves, resharded loads.

Under FSDP every rank holds a shard of each parameter and of its optimizer state. A
sharded checkpoint is a DCP directory: every rank writes only its own shards (one
``__<rank>_0.distcp`` file each, plus rank 0's ``.metadata``), so no rank ever
materialises the full model or optimizer state. Loading goes through DCP's planner,
which reads whatever slices the *loading* layout needs: the same directory resumes on
another number of ranks, under FSDP1, FSDP2, DDP or a single process.

Everything here uses torch's public state-dict API (``get_/set_model_state_dict``,
``get_/set_optimizer_state_dict``), whose keys are parameter names (fully qualified,
relative to the wrapper the trainer prepares, so they start with ``module.``) rather than
optimizer indices. The same functions serve plain modules, DDP, FSDP1 (``use_orig_params``)
and FSDP2 alike; only carried gradients differ between engines (``grads``, below).

Two traps of that API, and what is done about them:

* ``get_optimizer_state_dict`` (and ``set_``) first *initialise* an optimizer without state
  by taking a zero-learning-rate step on zero gradients. Parameters do not move, but the
  state does (Adam's ``step`` becomes 1), so saving a run whose optimizer has not stepped
  yet would change how the run continues. :func:`optimizer_state` therefore skips that
  initialisation (torch skips it when any parameter has a gradient, so a zero gradient is
  lent for the duration of the call), and loading puts back exactly the saved state.
* ``set_optimizer_state_dict`` refuses to run while parameters carry gradients, so a
  restore clears them first and puts carried gradients back last.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

#: the trainer wraps the user's module in a dispatcher under this attribute, so every
#: parameter name the state-dict API produces starts with it
PREFIX = "module."


def _raw(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps it


def _options(full: bool, **kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, **kwargs)


@contextlib.contextmanager
def _without_initialisation(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Keep torch's state-dict API from initialising an optimizer that has no state yet.

    ``_init_optim_state`` returns at once when the optimizer has state or any of its
    parameters has a gradient; otherwise it takes a zero-lr step that creates state.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    lent = None
    if not optimizer.state and params and all(p.grad is None for p in params):
        lent = params[0]
        lent.grad = torch.zeros_like(lent)
    try:
        yield
    finally:
        if lent is not None:
            lent.grad = None


def model_state(wrapper: torch.nn.Module, full: bool = False) -> dict[str, Any]:
    """The wrapper's state dict: sharded tensors under FSDP (``full=False``), plain elsewhere."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(wrapper, options=_options(full))


def optimizer_state(wrapper: torch.nn.Module, optimizer: Any, full: bool = False, initialise: bool = False) -> dict[str, Any]:
    """One optimizer's state keyed by parameter name (see the module docstring's first trap).

    ``initialise=True`` lets torch create the state of an optimizer that has none (a
    zero-learning-rate step on zero gradients; parameters do not move): a load template
    then has tensors of the right shapes for DCP to fill.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    raw = _raw(optimizer)
    if initialise:
        return get_optimizer_state_dict(wrapper, raw, options=_options(full))
    with _without_initialisation(raw):
        return get_optimizer_state_dict(wrapper, raw, options=_options(full))


def has_state(optimizer: Any) -> bool:
    return bool(_raw(optimizer).state)


def save_sharded(directory: str, state: dict[str, Any]) -> None:
    """Every rank writes its shards of ``state`` into ``directory`` (a collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=directory)


def load_sharded(directory: str, template: dict[str, Any]) -> None:
    """Fill ``template`` in place from ``directory``, resharding to the template's layout.

    ``flatten_sharded_tensors=False``: under FSDP1 a rank whose shard holds no element of a
    small parameter has a ``ShardedTensor`` without local shards, which that flattening
    drops; DCP then takes the template for a pre-2.4 checkpoint and fails on its keys.
    FSDP1's tensors are sharded along one dimension only, so there is nothing to flatten.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    distributed = dist.is_available() and dist.is_initialized()
    dcp.load(template, checkpoint_id=directory, planner=DefaultLoadPlanner(flatten_sharded_tensors=False), no_dist=not distributed)


def clear_grads(wrapper: torch.nn.Module) -> None:
    for p in wrapper.parameters():
        p.grad = None


def set_model(wrapper: torch.nn.Module, state: dict[str, Any], full: bool = False) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(wrapper, state, options=_options(full))


def set_optimizer(wrapper: torch.nn.Module, optimizer: Any, state: dict[str, Any], saved_state: bool, full: bool = False) -> None:
    """Load one optimizer; ``saved_state=False``: it had not stepped when saved, so it gets no state."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    raw = _raw(optimizer)
    set_optimizer_state_dict(wrapper, raw, state, options=_options(full))
    if not saved_state:
        raw.state.clear()  # undo the initialisation set_optimizer_state_dict did


def parameter_names(wrapper: torch.nn.Module, optimizer: Any) -> list[list[str]]:
    """Per param group, the state-dict name of each of the optimizer's parameters, in order.

    It is how an optimizer state saved by index (``optimizer.state_dict()``, the single-file
    checkpoints of single-process and DDP runs) is turned into the name-keyed form FSDP loads.
    """
    names = optimizer_state(wrapper, optimizer)["param_groups"]
    return [list(group["params"]) for group in names]


def index_to_named(saved: dict[str, Any], names: Sequence[Sequence[str]]) -> dict[str, Any]:
    """``optimizer.state_dict()`` (keys: parameter indices) as the name-keyed state dict."""
    flat = [name for group in names for name in group]
    groups = []
    for group, group_names in zip(saved["param_groups"], names):
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": list(group_names)})
    state = {flat[int(i)]: value for i, value in saved["state"].items()}
    return {"state": state, "param_groups": groups}


def named_to_index(saved: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`index_to_named` (names numbered in param-group order)."""
    index: dict[str, int] = {}
    groups = []
    for group in saved["param_groups"]:
        ids = []
        for name in group["params"]:
            index.setdefault(name, len(index))
            ids.append(index[name])
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
    return {"state": {index[name]: value for name, value in saved["state"].items()}, "param_groups": groups}


def read_full_state(directory: str, prefixes: Sequence[str] | None = None) -> dict[str, Any]:
    """The whole (or the ``prefixes``-selected part of a) DCP checkpoint in this process's memory.

    For export and for tools: it materialises every selected tensor unsharded, so it is
    never used while training. The result is nested as it was saved.
    """
    from torch.distributed.checkpoint import FileSystemReader

    from .internals import load_dcp_unsharded

    reader = FileSystemReader(directory)
    keys = None
    if prefixes is not None:
        metadata = reader.read_metadata()
        keys = {k for k in metadata.state_dict_metadata if any(k.startswith(p) for p in prefixes)}
    return load_dcp_unsharded(reader, keys)


def saved_keys(directory: str) -> set[str]:
    """The flattened keys a DCP checkpoint holds (from its metadata, nothing else is read)."""
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(directory).read_metadata().state_dict_metadata)


def is_dcp_directory(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".metadata"))


# -- a sharded checkpoint's payload ------------------------------------------------------------
def save_payload(directory: str, module: torch.nn.Module, wrapper: torch.nn.Module, optimizers: Sequence[Any], grads_in_shards: bool = True) -> dict[str, Any]:
    """Write model, optimizers (and carried gradients) into ``directory``; returns their description.

    Every rank calls this (a collective). With ``grads_in_shards`` the gradients an
    ``optimizer_step`` override left un-zeroed are saved like parameters (sharded DTensors
    under FSDP2, full tensors elsewhere), so they reshard on load too.
    """
    state: dict[str, Any] = {
        "model": model_state(wrapper),
        "optimizers": {str(i): optimizer_state(wrapper, opt) for i, opt in enumerate(optimizers)},
    }
    grads = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
    if grads_in_shards and grads:
        state["grads"] = grads
    save_sharded(directory, state)
    return {
        "optimizer_has_state": [has_state(opt) for opt in optimizers],
        "grad_names": sorted(grads) if grads_in_shards else [],
        # global shapes (a DTensor or ShardedTensor reports the unsharded shape), to check a
        # resume against the module before any shard is read
        "state_shapes": {k[len(PREFIX):] if k.startswith(PREFIX) else k: list(v.shape) for k, v in state["model"].items()},
    }


def restore_payload(directory: str, meta: dict[str, Any], module: torch.nn.Module, wrapper: torch.nn.Module, optimizers: Sequence[Any]) -> None:
    """Load what :func:`save_payload` wrote into this run's layout (plain, DDP or FSDP; any world size).

    Templates are built from the live wrapper (sharded tensors under FSDP, full ones
    otherwise) and DCP fills each from the saved shards, resharding as needed; carried
    gradients are loaded into zero tensors shaped like their parameters. Gradients are
    cleared before ``set_optimizer_state_dict`` (it refuses to run with them) and put back last.
    """
    has = list(meta["optimizer_has_state"])
    grad_names = list(meta.get("grad_names", []))
    clear_grads(wrapper)
    params = dict(module.named_parameters())
    template: dict[str, Any] = {
        "model": model_state(wrapper),
        "optimizers": {str(i): optimizer_state(wrapper, opt, initialise=has[i]) for i, opt in enumerate(optimizers)},
    }
    if grad_names:
        template["grads"] = {name: torch.zeros_like(params[name]) for name in grad_names}
    load_sharded(directory, template)
    set_model(wrapper, template["model"])
    for i, opt in enumerate(optimizers):
        set_optimizer(wrapper, opt, template["optimizers"][str(i)], saved_state=has[i])
    for name, grad in template.get("grads", {}).items():
        params[name].grad = grad


"""FSDP (fsdp_version 1 with ``use_orig_params``, and 2) through Accelerate's own ``prepare``.

What differs from DDP, and where it is handled:

* **What it refuses** (:func:`check_fsdp`, each rule with its reason in the message).
* **Clipping**: norms must span every rank's shards (:meth:`FSDPEngine.clip_gradients`).
* **Checkpoints are sharded**: every rank writes its own shards with
  ``torch.distributed.checkpoint`` (:mod:`accel_trainer.sharded_state`); no rank gathers the
  full model or optimizer state. They resume under FSDP1, FSDP2, DDP or one process, on any
  number of ranks (DCP reshards), and single-file checkpoints of DDP runs resume under FSDP.
* **FSDP on CPU** (:func:`cpu_accelerator`): Accelerate offers FSDP only on accelerators, but
  torch's FSDP runs on CPU over gloo, which is how CI proves this engine and how a sharding
  config can be debugged on a laptop. Every override that needs is in that one function.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .. import sharded_state
from ..collectives import any_process, broadcast_
from ..errors import CheckpointError, ConfigurationError
from ..internals import metric_defaults, metric_device, restore_metric_states
from .base import DDP_ALTERNATIVE, Engine, PayloadSource, RunRequest, refuse_deepspeed_payload

_GRADS_DIR = "rank_grads"
#: where a sharded module remembers the wrapper it lives in (see FSDPEngine._unsharded_or_root)
_ROOT_ATTRIBUTE = "_accel_trainer_fsdp_root"


def fsdp_version(plugin: Any) -> int:
    return int(getattr(plugin, "fsdp_version", 1) or 1)


def check_fsdp(request: RunRequest, plugin: Any) -> None:
    """Refuse what FSDP cannot run correctly; return quietly when it can.

    Args:
        request: what the run asks for.
        plugin: ``accelerator.state.fsdp_plugin`` (read: ``fsdp_version``, ``use_orig_params``).

    Raises:
        ConfigurationError: naming what was asked, why FSDP cannot do it, and what to use
            instead. The rules:

            * fsdp_version 1 without ``use_orig_params`` and any optimizer: the optimizers
              are built in ``configure_optimizers`` on the module's parameters, before the
              model is wrapped. FSDP1 then replaces those parameters by ``FlatParameter``s
              and Accelerate 1.15 does not re-point optimizers at them (``prepare_model``
              has no such step), so every optimizer would update tensors the model no
              longer uses: nothing trains, silently. With ``use_orig_params=True`` FSDP1
              keeps the original parameter objects as views into its shards, and the
              optimizers built before wrapping train them.
            * an optimizer that needs a closure: LBFGS treats the parameters as one flat
              vector (dot products, max-norm tests, line search). Under fsdp_version 1
              each rank would compute these over its own shard only, so ranks would take
              different steps; under fsdp_version 2 the parameters are sharded DTensors
              that LBFGS's ``view(-1)`` cannot flatten (torch raises at the first step).
            * fsdp_version 1, several optimizers under automatic optimization, and
              gradient accumulation or an overridden ``optimizer_step``: FSDP1 keeps one
              gradient buffer per flat parameter, and when the loop turns ``requires_grad``
              off for the optimizers not being trained it drops the gradients those
              parameters had accumulated (``FlatParamHandle._use_sharded_grad_views`` sets
              them to None, ``_writeback_orig_params`` then zeroes their slice). Gradients
              kept across another optimizer's turn -- accumulation, or an override that
              skips a step without zeroing -- would be lost. With accumulation 1 and the
              default ``optimizer_step`` every optimizer zeroes its gradients right after
              its step, so nothing is kept and nothing is lost: that case is accepted.
              fsdp_version 2 shards per parameter and re-reads ``requires_grad`` at every
              all-gather, so it keeps each parameter's gradient.
            * fsdp_version 1, several optimizers and ``gradient_clip_val``: FSDP1 computes a
              norm over all shards only for the whole wrapped model (its own
              ``clip_grad_norm_``); for one optimizer's parameters it would be the norm of
              this rank's shards, so ranks would clip by different norms. (With one
              optimizer the whole model is clipped; fsdp_version 2's DTensor norms span
              all shards.)
            * ``gradient_clip_algorithm="value"``: Accelerate's ``clip_grad_value_`` raises
              under FSDP.
            * fsdp_version 2 and no optimizer: Accelerate's FSDP2 ``prepare`` shards the
              model and re-points the optimizers' parameters in one call and refuses a model
              without an optimizer.

            Accepted (both versions): one optimizer; several optimizers, also sharing
            parameters (the shared ones stay trainable for both, as under DDP); manual
            optimization; schedulers, warm-up, ``ReduceLROnPlateau``.
    """
    names = list(request.optimizer_names)
    version = fsdp_version(plugin)
    use_orig_params = bool(getattr(plugin, "use_orig_params", False))
    n_opt = len(names)
    if version == 1 and n_opt and not use_orig_params:
        raise ConfigurationError(
            f"FSDP (fsdp_version: 1) with use_orig_params=False cannot train the optimizers of configure_optimizers "
            f"({names}): they are built on the module's parameters before the model is wrapped, FSDP1 then "
            "replaces those parameters by flattened FlatParameters, and Accelerate does not re-point the "
            "optimizers at them, so every step would update tensors the model no longer uses (nothing trains). "
            "Set fsdp_use_orig_params: true in the accelerate config (as launch/fsdp.yaml does), or fsdp_version: 2."
        )
    if request.needs_closure:
        i = request.needs_closure[0]
        raise ConfigurationError(
            f"Optimizer {i} ({names[i]}) needs a closure, which FSDP cannot run correctly: it treats all parameters "
            "as one flat vector (dot products, gradient max-norm, line search) while each FSDP process holds only a "
            "shard, so with fsdp_version 1 every rank would compute its step from its own shard, and with "
            "fsdp_version 2 the sharded parameters cannot be flattened at all. Launch with "
            f"{DDP_ALTERNATIVE}, where every process holds the whole parameters, or train on one process."
        )
    clip = request.gradient_clip_val
    if clip is not None and request.gradient_clip_algorithm == "value":
        raise ConfigurationError(
            "Trainer(gradient_clip_algorithm='value') is not available under FSDP: Accelerate's clip_grad_value_ "
            "refuses FSDP models. Use gradient_clip_algorithm='norm'."
        )
    if version == 1 and request.automatic_optimization and n_opt > 1:
        kept = []
        if request.gradient_accumulation_steps > 1:
            kept.append(f"gradient_accumulation_steps={request.gradient_accumulation_steps}")
        if request.overrides_optimizer_step:
            kept.append("an overridden optimizer_step (which may skip a step and keep the gradients)")
        if kept:
            reason = " and ".join(kept)
            raise ConfigurationError(
                f"{n_opt} optimizers with {reason} would train wrongly under FSDP fsdp_version 1: FSDP1 keeps one "
                "gradient buffer per flattened block of parameters, and when the loop turns requires_grad off for the "
                "optimizers not being trained, FSDP1 drops the gradients their parameters had accumulated; "
                f"{reason} keeps gradients across another optimizer's turn, so they would be lost silently. Use "
                f"fsdp_version: 2 (per-parameter sharding keeps each parameter's gradient), {DDP_ALTERNATIVE}, or "
                "gradient_accumulation_steps=1 with the default optimizer_step."
            )
        if clip is not None:
            raise ConfigurationError(
                f"Trainer(gradient_clip_val={clip}) with {n_opt} optimizers cannot clip correctly under "
                "FSDP fsdp_version 1: Accelerate computes a norm over all shards only for the whole wrapped model, and "
                "for one optimizer's parameters the norm of this rank's shards only, so ranks would clip by different "
                f"norms. Use fsdp_version: 2 (its norms span all shards), {DDP_ALTERNATIVE}, or gradient_clip_val=None."
            )
    if version == 2 and n_opt == 0:
        raise ConfigurationError(
            "FSDP with fsdp_version: 2 needs an optimizer, and configure_optimizers returned None: Accelerate's FSDP2 "
            "prepare shards the model and re-points the optimizers' parameters in one call, and refuses a model "
            "without an optimizer. Return an optimizer, or use fsdp_version: 1 or DDP for a forward-only run."
        )


class FSDPEngine(Engine):
    """Accelerate's FSDP (version from ``accelerator.state.fsdp_plugin``)."""

    label = "FSDP"
    sharded_checkpoints = True
    forward_is_collective = True

    def variant(self) -> str:
        return f"FSDP{self.version}"

    @property
    def plugin(self) -> Any:
        return getattr(self.accelerator.state, "fsdp_plugin", None)

    @property
    def version(self) -> int:
        return fsdp_version(self.plugin)

    def check(self, request: RunRequest) -> None:
        check_fsdp(request, self.plugin)

    def prepare(self, dispatchers: list, optimizers: list, schedulers: list, train_loader: Any) -> Any:
        dispatcher = self._unsharded_or_root(dispatchers[0])
        with _metric_states_kept(dispatcher, self.version == 2 and bool(getattr(self.plugin, "cpu_ram_efficient_loading", False))):
            prepared = super().prepare([dispatcher], optimizers, schedulers, train_loader)
        self._remember(prepared.wrappers[0])
        return prepared

    def prepare_for_evaluation(self, dispatcher: torch.nn.Module) -> torch.nn.Module:
        root = self._unsharded_or_root(dispatcher)
        if root is not dispatcher:
            return root  # sharded by an earlier fit/validate/test of this module: reuse it as is
        if self.version == 1:
            return self._remember(self.accelerator.prepare(dispatcher))
        params = list(dispatcher.parameters())
        if not params:
            raise ConfigurationError("FSDP cannot shard a module without parameters; evaluate it without --use_fsdp.")
        # Accelerate's FSDP2 prepare shards a model only together with an optimizer (it re-points
        # the optimizer's parameters in the same call); evaluation has none, so it lends one that
        # is never stepped. The model is wrapped exactly as for training (wrapping policy, autocast).
        with _metric_states_kept(dispatcher, bool(getattr(self.plugin, "cpu_ram_efficient_loading", False))):
            wrapper, _ = self.accelerator.prepare(dispatcher, torch.optim.SGD(params, lr=0.0))
        return self._remember(wrapper)

    def _unsharded_or_root(self, dispatcher: torch.nn.Module) -> torch.nn.Module:
        """The FSDP wrapper this module already lives in; else ``dispatcher``, ready to be sharded.

        FSDP shards a module in place (its parameters become shards owned by the wrapper), so a
        module that a previous ``fit``/``validate``/``test`` prepared cannot be wrapped again:
        the same wrapper serves it for its lifetime.
        """
        root = dispatcher.module.__dict__.get(_ROOT_ATTRIBUTE)
        if root is not None:
            return root
        if getattr(self.plugin, "accel_trainer_broadcast_from_rank0", False):
            _broadcast_module_state(dispatcher)
        return dispatcher

    def _remember(self, wrapper: torch.nn.Module) -> torch.nn.Module:
        self._autocast_on_cpu(wrapper)
        user_module = next(m.module for m in wrapper.modules() if type(m).__name__.endswith("_StepDispatcher"))
        user_module.__dict__[_ROOT_ATTRIBUTE] = wrapper  # a plain attribute: never registered as a submodule
        return wrapper

    def _autocast_on_cpu(self, wrapper: torch.nn.Module) -> None:
        """bf16 on CPU under FSDP2: autocast the forward, as Accelerate does for every other engine.

        Accelerate's FSDP2 path casts through FSDP's ``MixedPrecisionPolicy``, which it sets
        only on accelerators; on CPU the run would otherwise silently train in fp32.
        (fsdp_version 1 goes through Accelerate's ``prepare_model``, which autocasts.)
        """
        acc = self.accelerator
        if self.version != 2 or not getattr(self.plugin, "accel_trainer_cpu", False) or not acc.native_amp:
            return
        if getattr(wrapper, "_accel_trainer_autocast", False):
            return
        from accelerate.utils import convert_outputs_to_fp32, get_mixed_precision_context_manager

        autocast = get_mixed_precision_context_manager(acc.native_amp, acc.autocast_handler)
        wrapper.forward = convert_outputs_to_fp32(autocast(wrapper.forward))
        setattr(wrapper, "_accel_trainer_autocast", True)  # noqa: B010 - a plain flag, not a Module attribute

    def clip_gradients(self, optimizer: Any, params: list, wrapped: torch.nn.Module, n_optimizers: int, max_norm: float, algorithm: str) -> None:
        acc = self.accelerator
        if self.version == 1:
            # FSDP1 computes a norm over all shards only for the whole wrapped model's parameters,
            # which Accelerate recognises by their order (several optimizers + clipping is refused).
            acc.clip_grad_norm_(list(wrapped.parameters()), max_norm)
            return
        # FSDP2: gradients are DTensors, so the per-shard norms combine into the global norm.
        # Unscale only this optimizer (Accelerate's clip_grad_norm_ would unscale them all).
        from torch.distributed.tensor import DTensor

        acc.unscale_gradients(optimizer=optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(total, DTensor):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)

    # -- checkpoints ----------------------------------------------------------------------------
    def save_payload(self, directory: str | None, module: torch.nn.Module, wrapper: torch.nn.Module, optimizers: list) -> dict[str, Any]:
        assert directory is not None
        meta = sharded_state.save_payload(directory, module, wrapper, optimizers, grads_in_shards=self.version == 2)
        meta.update(engine="FSDP", fsdp_version=self.version, world_size=self.accelerator.num_processes)
        if self.version == 1:
            meta["rank_grads"] = _save_rank_grads(directory, module, self.accelerator.process_index)
        return meta

    def restore_payload(self, source: PayloadSource, module: torch.nn.Module, wrapper: torch.nn.Module, optimizers: list) -> None:
        refuse_deepspeed_payload(source, "FSDP")
        if source.shards is not None:
            meta = source.checkpoint["sharded"]
            sharded_state.restore_payload(source.shards, meta, module, wrapper, optimizers)
            if meta.get("rank_grads"):
                self._restore_rank_grads(source, module)
            return
        self._restore_from_full(source, module, wrapper, optimizers)

    def payload_file_owner(self, name: str, index: int, world_size: int) -> int:
        """DCP's ``__<rank>_<n>.distcp`` and FSDP1's ``rank-<rank>.pt`` by their writer; ``.metadata`` by rank 0."""
        found = re.search(r"(?:^|/)(?:__(\d+)_\d+\.distcp|rank-(\d+)\.pt)$", name)
        if found:
            return int(found.group(1) or found.group(2)) % world_size
        return 0 if name.endswith(".metadata") else index % world_size

    def _restore_from_full(self, source: PayloadSource, module: torch.nn.Module, wrapper: torch.nn.Module, optimizers: list) -> None:
        """A single-file checkpoint (one process or DDP) put into shards."""
        checkpoint = source.checkpoint
        grads = checkpoint.get("grads", {})
        if grads and self.version == 1:
            raise CheckpointError(
                f"{source.path!r} carries gradients an optimizer_step override left un-zeroed ({sorted(grads)[:5]}), "
                "which cannot be put into FSDP1's flattened gradient shards. Resume it under fsdp_version: 2 or DDP."
            )
        sharded_state.clear_grads(wrapper)
        prefixed = {sharded_state.PREFIX + k: v for k, v in checkpoint["state_dict"].items()}
        sharded_state.set_model(wrapper, prefixed, full=True)
        for opt, saved in zip(optimizers, checkpoint["optimizer_states"]):
            names = sharded_state.parameter_names(wrapper, opt)
            named = sharded_state.index_to_named(saved, names)
            sharded_state.set_optimizer(wrapper, opt, named, saved_state=bool(saved["state"]), full=True)
        if grads:
            from torch.distributed.tensor import DTensor, distribute_tensor

            for name, p in module.named_parameters():
                if name in grads:
                    g = grads[name].to(p.device, p.dtype)
                    p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g

    def _restore_rank_grads(self, source: PayloadSource, module: torch.nn.Module) -> None:
        meta = source.checkpoint["sharded"]
        acc = self.accelerator
        if int(meta.get("world_size", 0)) != acc.num_processes or self.version != 1:
            raise CheckpointError(
                f"{source.path!r} was saved under FSDP1 on {meta.get('world_size')} processes with gradients an "
                "optimizer_step override left un-zeroed; FSDP1 keeps those as per-rank pieces of flattened buffers, so "
                f"they resume only under fsdp_version 1 on {meta.get('world_size')} processes (this run: "
                f"fsdp_version {self.version}, {acc.num_processes} processes)."
            )
        assert source.shards is not None  # carried gradients are only ever saved with sharded state
        path = os.path.join(source.shards, _GRADS_DIR, f"rank-{acc.process_index:05d}.pt")
        local = torch.load(path, map_location="cpu", weights_only=True)
        for name, p in module.named_parameters():
            if name in local:
                p.grad = local[name].to(p.device, p.dtype)


def _save_rank_grads(directory: str, module: torch.nn.Module, rank: int) -> bool:
    """FSDP1's carried gradients: views of this rank's flat-gradient shard, one file per rank.

    They are not DTensors (FSDP1 shards flattened blocks), so DCP cannot reshard them; they
    resume on the same number of FSDP1 processes (checked on restore).
    """
    grads = {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}
    any_rank = any_process(bool(grads))
    if any_rank:
        os.makedirs(os.path.join(directory, _GRADS_DIR), exist_ok=True)
        torch.save(grads, os.path.join(directory, _GRADS_DIR, f"rank-{rank:05d}.pt"))
    return any_rank


@contextlib.contextmanager
def _metric_states_kept(module: torch.nn.Module, active: bool) -> Iterator[None]:
    """Keep torchmetrics metrics usable through FSDP2's ``cpu_ram_efficient_loading``.

    With that flag Accelerate moves the whole model to the ``meta`` device before sharding
    and then reloads only the state dict and the non-persistent buffers; a torchmetrics
    ``Metric`` moves its states (kept outside the state dict) to ``meta`` too, and the first
    ``compute()`` fails ("Tensor.item() cannot be called on meta tensors"). The states and
    their defaults are copied before and put back where they ended up on ``meta``. (This
    reads torchmetrics' ``_defaults``/``_device``, through accel_trainer/internals.py: the only way to restore a metric's states.)
    """
    kept = []
    if active:
        try:
            from torchmetrics import Metric
        except ImportError:  # pragma: no cover - torchmetrics is a dependency
            Metric = ()  # type: ignore[assignment,misc]
        for m in module.modules():
            if isinstance(m, Metric):
                defaults = metric_defaults(m)
                kept.append((m, copy.deepcopy(defaults), {k: copy.deepcopy(getattr(m, k)) for k in defaults}, metric_device(m)))
    yield
    for metric, defaults, states, device in kept:
        if any(_is_meta(v) for v in metric_defaults(metric).values()) or any(_is_meta(getattr(metric, k)) for k in states):
            restore_metric_states(metric, defaults, states, device)


def _is_meta(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_meta
    return isinstance(value, (list, tuple)) and any(_is_meta(v) for v in value)


def _broadcast_module_state(module: torch.nn.Module) -> None:
    """What FSDP1's ``sync_module_states`` does on GPUs: every rank starts from rank 0's weights."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            broadcast_(tensor.data, src=0)


# -- FSDP on CPU -------------------------------------------------------------------------------
def cpu_accelerator(**accelerator_kwargs: Any) -> Any:
    """An ``Accelerator`` that runs FSDP on CPU processes over gloo, as launched.

    Accelerate enables FSDP only for accelerator-backed distributed types
    (``accelerate/state.py``: ``MULTI_CPU`` is not among them), so on CPU it would silently
    train plain DDP. torch's FSDP1 and FSDP2 themselves run on CPU over gloo, and once the
    state says FSDP, Accelerate's real ``prepare`` shards the model. The overrides, all here:

    1. The ``FullyShardedDataParallelPlugin`` is built from the launch's ``FSDP_*``
       environment as Accelerate would, except that under fsdp_version 1
       ``sync_module_states`` (and ``cpu_ram_efficient_loading``, which forces it) would ask
       for a GPU in the plugin's constructor and be refused by torch for CPU modules: when
       asked for, the trainer broadcasts rank 0's parameters and buffers itself before
       wrapping, which is what that flag does. (fsdp_version 2's ``cpu_ram_efficient_loading``
       runs as Accelerate implements it.)
    2. ``fsdp_offload_params`` is refused: it moves parameters to CPU memory, where a CPU run
       already keeps them (and torch's offload paths assume an accelerator).
    3. The accelerator state is switched to ``DistributedType.FSDP`` with that plugin
       (``AcceleratorState`` and ``PartialState``, which other Accelerate utilities read).
    4. fsdp_version 1 needs the device to be plain ``cpu``: Accelerate's ``cpu:0`` differs
       from the ``cpu`` FSDP1 computes as its compute device, and it refuses the mismatch.

    5. Mixed precision is autocast (bf16), as Accelerate does under DDP and FSDP1
       (``FSDPEngine._autocast_on_cpu``): FSDP2's ``MixedPrecisionPolicy``, through which
       Accelerate casts on GPUs, is not applied on CPU, so results equal DDP's.

    Raises:
        ConfigurationError: for ``fsdp_offload_params``, or when the launch has one process.
    """
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    from ..internals import switch_state_to_fsdp

    env = os.environ
    if env.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        raise ConfigurationError(
            "fsdp_offload_params is set, but this FSDP run is on the CPU: offloading moves parameters and optimizer "
            "state from GPU to CPU memory, where a CPU run already keeps them. Drop --fsdp_offload_params (or "
            "fsdp_offload_params: true in the config) for CPU runs; it is a GPU memory saver."
        )
    version = int(env.get("FSDP_VERSION", "1") or 1)
    overrides: dict[str, Any] = {}
    broadcast = False
    if version == 1:
        broadcast = any(env.get(f"FSDP_{k}", "false").lower() == "true" for k in ("SYNC_MODULE_STATES", "CPU_RAM_EFFICIENT_LOADING"))
        overrides = dict(sync_module_states=False, cpu_ram_efficient_loading=False)
    plugin = FullyShardedDataParallelPlugin(**overrides)
    plugin.accel_trainer_broadcast_from_rank0 = broadcast
    plugin.accel_trainer_cpu = True
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin, **accelerator_kwargs)
    if accelerator.num_processes < 2:
        raise ConfigurationError(
            "FSDP was asked for (ACCELERATE_USE_FSDP) on a single CPU process: there is nothing to shard across, and "
            "this run would train as plain single-process. Launch with --num_processes 2 or more, or drop --use_fsdp."
        )
    switch_state_to_fsdp(accelerator, plugin, torch.device("cpu") if version == 1 else None)
    return accelerator


__all__: Sequence[str] = ["FSDPEngine", "check_fsdp", "cpu_accelerator", "fsdp_version"]

"""What each Accelerate engine can run, decided before anything is prepared.

The loop of CONTRACT.md is written once for every engine, but FSDP and DeepSpeed change
what an optimizer, a gradient and a step are. :func:`check_engine_support` refuses, with a
:class:`~accel_trainer.errors.ConfigurationError` raised at the start of ``fit``, every
combination the loop cannot honour on the launched engine, so a run never trains silently
wrong on 64 GPUs. :func:`plan_wrappers` decides how the module is wrapped for DDP. Both are
pure: they take names, numbers and a plugin's settings, never an ``Accelerator``.

The rules were read from Accelerate 1.15 (``accelerate/accelerator.py``: ``prepare``,
``prepare_model``, ``_prepare_fsdp2``, ``_prepare_deepspeed``, ``clip_grad_norm_``;
``accelerate/utils/deepspeed.py``) and torch 2.13 (``torch/distributed/fsdp``); each
docstring below says why a rule exists.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

from .errors import ConfigurationError

DEEPSPEED = "DEEPSPEED"
FSDP = "FSDP"
#: the engines under which the trainer builds its own DDP wrappers (see :func:`plan_wrappers`)
DDP_ENGINES = ("MULTI_GPU", "MULTI_CPU")

_DDP_ALTERNATIVE = "DDP (accelerate launch --config_file launch/multi_gpu.yaml)"
_FSDP_ALTERNATIVE = "FSDP (--config_file launch/fsdp.yaml)"


def engine_name(distributed_type: Any) -> str:
    """``"FSDP"``, ``"DEEPSPEED"``, ``"MULTI_GPU"`` … for a ``DistributedType`` or its name."""
    value = getattr(distributed_type, "value", distributed_type)
    return str(value).rsplit(".", 1)[-1].upper()


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
    """Refuse what ``distributed_type`` cannot run; return quietly when it can.

    Only FSDP and DeepSpeed have rules; every other engine runs the loop as written.

    Args:
        distributed_type: ``accelerator.distributed_type`` (or its name, e.g. ``"FSDP"``).
        optimizer_names: the type name of each optimizer, in ``configure_optimizers`` order.
        needs_closure: indices of the optimizers whose ``step`` needs a closure (LBFGS).
        overrides_optimizer_step: the module overrides ``TrainingModule.optimizer_step``.
        automatic_optimization: the module's ``automatic_optimization``.
        gradient_accumulation_steps, gradient_clip_val, gradient_clip_algorithm: the Trainer's.
        warmup_optimizers: indices of the optimizers a scheduler dict gives ``warmup_steps``.
        fsdp_plugin: ``accelerator.state.fsdp_plugin`` (read: ``fsdp_version``, ``use_orig_params``).
        module_name: the module's class name, for the messages.

    Raises:
        ConfigurationError: naming what was asked, why the engine cannot do it, and what
            to use instead. The rules, each with its reason:

            DeepSpeed (one engine owns one optimizer and steps it inside
            ``accelerator.backward`` at every accumulation boundary; the optimizer handed
            back is a ``DeepSpeedOptimizerWrapper`` whose ``step`` and ``zero_grad`` do
            nothing):

            * more than one optimizer: the engine would never step or toggle the others;
            * an overridden ``optimizer_step`` (automatic optimization): it runs after the
              engine already stepped, so it cannot decide when to step, skip a step or
              change the learning rate of the step;
            * an optimizer that needs a closure: the engine steps without one;
            * ``gradient_clip_val``: the engine clips inside its step with the DeepSpeed
              config's ``gradient_clipping``; the trainer's clipping would come too late;
            * ``warmup_steps``: the warm-up scales the learning rate around
              ``optimizer.step()``, again after the engine's real step.

            FSDP:

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
              kept across another optimizer's turn — accumulation, or an override that
              skips a step without zeroing — would be lost. With accumulation 1 and the
              default ``optimizer_step`` every optimizer zeroes its gradients right after
              its step, so nothing is kept and nothing is lost: that case is accepted.
              fsdp_version 2 shards per parameter and re-reads ``requires_grad`` at every
              all-gather, so it keeps each parameter's gradient.
            * fsdp_version 1, several optimizers and ``gradient_clip_val``: Accelerate's
              ``clip_grad_norm_`` computes the norm over all shards only when handed the
              whole wrapped model's parameters (FSDP's own ``clip_grad_norm_``); for one
              optimizer's parameters it returns the norm of this rank's shards, so ranks
              would clip by different norms. (With one optimizer the trainer hands it the
              whole model; fsdp_version 2's DTensor norms span all shards.)
            * ``gradient_clip_algorithm="value"``: Accelerate's ``clip_grad_value_`` raises
              under FSDP.
            * fsdp_version 2 and no optimizer: Accelerate's FSDP2 ``prepare`` shards the model
              and re-points the optimizers' parameters in one call and refuses a model
              without an optimizer.

            Accepted under FSDP (both versions): one optimizer; several optimizers, also
            sharing parameters (the shared ones stay trainable for both, as under DDP);
            manual optimization; schedulers. The trainer prepares one wrapper, which is
            all that FSDP2's ``prepare`` accepts.

    Example:
        >>> check_engine_support("FSDP", optimizer_names=["Adam", "Adam"], fsdp_plugin=plugin)  # use_orig_params=True
        >>> check_engine_support("DEEPSPEED", optimizer_names=["Adam", "Adam"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        accel_trainer.errors.ConfigurationError: DeepSpeed cannot train 2 optimizers ...
    """
    engine = engine_name(distributed_type)
    if engine == DEEPSPEED:
        _check_deepspeed(
            optimizer_names, needs_closure, overrides_optimizer_step and automatic_optimization,
            gradient_clip_val, warmup_optimizers, module_name,
        )
    elif engine == FSDP:
        _check_fsdp(
            optimizer_names, needs_closure, overrides_optimizer_step, automatic_optimization,
            gradient_accumulation_steps, gradient_clip_val, gradient_clip_algorithm, fsdp_plugin,
        )


def _check_deepspeed(
    names: Sequence[str],
    needs_closure: Sequence[int],
    overrides_optimizer_step: bool,
    gradient_clip_val: float | None,
    warmup_optimizers: Sequence[int],
    module_name: str,
) -> None:
    if len(names) > 1:
        raise ConfigurationError(
            f"DeepSpeed cannot train {len(names)} optimizers (configure_optimizers returned {list(names)}): its "
            "engine owns exactly one optimizer and steps it itself at every accumulation boundary, so the others "
            f"would never be stepped. Train several optimizers with {_DDP_ALTERNATIVE} or {_FSDP_ALTERNATIVE}."
        )
    if needs_closure:
        i = needs_closure[0]
        raise ConfigurationError(
            f"Optimizer {i} ({names[i]}) needs a closure (it re-evaluates the loss during its step), which DeepSpeed "
            "cannot run: the engine steps the optimizer inside backward, without a closure. Launch with "
            f"{_DDP_ALTERNATIVE}, or train on one process."
        )
    if overrides_optimizer_step:
        raise ConfigurationError(
            f"{module_name} overrides optimizer_step, which DeepSpeed cannot honour: the engine takes the real "
            "optimizer step inside backward at every accumulation boundary, before optimizer_step runs (the "
            "optimizer's step() is a no-op there), so an override cannot decide when to step, skip a step or change "
            "the learning rate of a step. For a learning-rate warm-up use a step-interval scheduler, e.g. "
            "{'scheduler': torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / W, total_iters=W - 1), "
            f"'interval': 'step'}}; to keep the override, launch with {_DDP_ALTERNATIVE} or {_FSDP_ALTERNATIVE}."
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
            f"gives the same learning rates as 'warmup_steps': W; or launch with {_DDP_ALTERNATIVE} or "
            f"{_FSDP_ALTERNATIVE}."
        )
    raise ConfigurationError(
        "DeepSpeed is not supported yet: the trainer writes checkpoints/last.ckpt at the end of every epoch from "
        "the global main process, and under ZeRO the optimizer state (stage 1-2) and the weights (stage 3) are "
        "partitioned across ranks, so that file would hold one rank's partition. Launch with "
        f"{_DDP_ALTERNATIVE} or {_FSDP_ALTERNATIVE} (checkpoints hold the full gathered state there)."
    )


def _check_fsdp(
    names: Sequence[str],
    needs_closure: Sequence[int],
    overrides_optimizer_step: bool,
    automatic: bool,
    gradient_accumulation_steps: int,
    gradient_clip_val: float | None,
    gradient_clip_algorithm: str,
    plugin: Any,
) -> None:
    version = int(getattr(plugin, "fsdp_version", 1) or 1)
    use_orig_params = bool(getattr(plugin, "use_orig_params", False))
    n_opt = len(names)
    if version == 1 and n_opt and not use_orig_params:
        raise ConfigurationError(
            f"FSDP (fsdp_version: 1) with use_orig_params=False cannot train the optimizers of configure_optimizers "
            f"({list(names)}): they are built on the module's parameters before the model is wrapped, FSDP1 then "
            "replaces those parameters by flattened FlatParameters, and Accelerate does not re-point the "
            "optimizers at them, so every step would update tensors the model no longer uses (nothing trains). "
            "Set fsdp_use_orig_params: true in the accelerate config (as launch/fsdp.yaml does), or fsdp_version: 2."
        )
    if needs_closure:
        i = needs_closure[0]
        raise ConfigurationError(
            f"Optimizer {i} ({names[i]}) needs a closure, which FSDP cannot run correctly: it treats all parameters "
            "as one flat vector (dot products, gradient max-norm, line search) while each FSDP process holds only a "
            "shard, so with fsdp_version 1 every rank would compute its step from its own shard, and with "
            "fsdp_version 2 the sharded parameters cannot be flattened at all. Launch with "
            f"{_DDP_ALTERNATIVE}, where every process holds the whole parameters, or train on one process."
        )
    if gradient_clip_val is not None and gradient_clip_algorithm == "value":
        raise ConfigurationError(
            f"Trainer(gradient_clip_algorithm='value') is not available under FSDP: Accelerate's clip_grad_value_ "
            "refuses FSDP models. Use gradient_clip_algorithm='norm'."
        )
    if version == 1 and automatic and n_opt > 1:
        kept = []
        if gradient_accumulation_steps > 1:
            kept.append(f"gradient_accumulation_steps={gradient_accumulation_steps}")
        if overrides_optimizer_step:
            kept.append("an overridden optimizer_step (which may skip a step and keep the gradients)")
        if kept:
            reason = " and ".join(kept)
            raise ConfigurationError(
                f"{n_opt} optimizers with {reason} would train wrongly under FSDP fsdp_version 1: FSDP1 keeps one "
                "gradient buffer per flattened block of parameters, and when the loop turns requires_grad off for the "
                "optimizers not being trained, FSDP1 drops the gradients their parameters had accumulated; "
                f"{reason} keeps gradients across another optimizer's turn, so they would be lost silently. Use "
                f"fsdp_version: 2 (per-parameter sharding keeps each parameter's gradient), {_DDP_ALTERNATIVE}, or "
                "gradient_accumulation_steps=1 with the default optimizer_step."
            )
        if gradient_clip_val is not None:
            raise ConfigurationError(
                f"Trainer(gradient_clip_val={gradient_clip_val}) with {n_opt} optimizers cannot clip correctly under "
                "FSDP fsdp_version 1: Accelerate computes a norm over all shards only for the whole wrapped model, and "
                "for one optimizer's parameters the norm of this rank's shards only, so ranks would clip by different "
                f"norms. Use fsdp_version: 2 (its norms span all shards), {_DDP_ALTERNATIVE}, or gradient_clip_val=None."
            )
    if version == 2 and n_opt == 0:
        raise ConfigurationError(
            "FSDP with fsdp_version: 2 needs an optimizer, and configure_optimizers returned None: Accelerate's FSDP2 "
            "prepare shards the model and re-points the optimizers' parameters in one call, and refuses a model "
            "without an optimizer. Return an optimizer, or use fsdp_version: 1 or DDP for a forward-only run."
        )

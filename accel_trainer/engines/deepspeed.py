"""DeepSpeed ZeRO (stages 1, 2, 3) through Accelerate, with the trainer's schedules and exact resume.

How DeepSpeed's model differs from the loop's, and what this module does about it:

* **One engine, one optimizer, stepped inside backward.** At every accumulation boundary
  ``accelerator.backward(loss)`` runs the engine's backward *and* its step (clipping, the
  optimizer step, zeroing); the optimizer handed back is a ``DeepSpeedOptimizerWrapper``
  whose ``step``/``zero_grad`` do nothing. So several optimizers, LBFGS (a closure), an
  ``optimizer_step`` override (it would run after the real step) and clipping by value are
  refused (:func:`check_deepspeed`); the trainer's declarative warm-up is applied around
  that backward instead of around ``optimizer.step()`` (``step_inside_backward``).
* **The trainer's schedulers drive the learning rate.** They are prepared one by one so that
  DeepSpeed never steps them on its own schedule (:meth:`DeepSpeedEngine.prepare`).
* **The trainer's settings reach the DeepSpeed config** before ``deepspeed.initialize``:
  ``gradient_clip_val`` becomes ``gradient_clipping`` (Accelerate would otherwise fill an
  unset ``gradient_clipping`` with 1.0: clipping nobody asked for), and
  ``gradient_accumulation_steps`` its namesake (Accelerate would otherwise take a differing
  config value and warn). A conflict between the two is an error.
* **Checkpoints are the engine's own.** Every rank calls ``engine.save_checkpoint`` into the
  checkpoint directory (ZeRO partitions optimizer state, and at stage 3 the weights); the
  trainer's state file sits beside it. Restoring calls ``engine.load_checkpoint`` with
  ``load_lr_scheduler_states=False`` (the schedulers are the trainer's, in its state file),
  as Lightning's DeepSpeed strategy does. A ZeRO checkpoint resumes under the same stage and
  number of processes; otherwise ``CheckpointError`` says how to export its weights.
* **DeepSpeed on CPU** (CI, debugging): :func:`make_accelerator` joins the processes over
  gloo (Accelerate's DeepSpeed path never takes ``cpu=True``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import CheckpointError, ConfigurationError
from .base import DDP_ALTERNATIVE, FSDP_ALTERNATIVE, Engine, PayloadSource, Prepared, RunRequest

#: where the engine's own checkpoint lives inside a checkpoint directory, and its tag
PAYLOAD_DIR = "deepspeed"
TAG = "checkpoint"
INSTALL_HINT = 'pip install -e ".[deepspeed]" (DeepSpeed built without ops, and transformers, which Accelerate\'s DeepSpeed plugin imports)'


def check_deepspeed(request: RunRequest) -> None:
    """Refuse what DeepSpeed cannot run.

    Raises:
        ConfigurationError: naming what was asked, why, and what to use instead.
    """
    names = list(request.optimizer_names)
    if not names and request.automatic_optimization:
        raise ConfigurationError(
            "DeepSpeed with no optimizer (configure_optimizers returned None): the engine trains exactly one "
            "optimizer, and a forward-only run has nothing for it to do. Return an optimizer, or run without "
            "--use_deepspeed (validate()/test() work under DeepSpeed)."
        )
    if len(names) > 1:
        raise ConfigurationError(
            f"DeepSpeed cannot train {len(names)} optimizers (configure_optimizers returned {names}): its "
            "engine owns exactly one optimizer and steps it itself at every accumulation boundary, so the others "
            f"would never be stepped. Train several optimizers with {DDP_ALTERNATIVE} or {FSDP_ALTERNATIVE}."
        )
    if request.needs_closure:
        i = request.needs_closure[0]
        raise ConfigurationError(
            f"Optimizer {i} ({names[i]}) needs a closure (it re-evaluates the loss during its step), which DeepSpeed "
            "cannot run: the engine steps the optimizer inside backward, without a closure. Launch with "
            f"{DDP_ALTERNATIVE}, or train on one process."
        )
    if request.overrides_optimizer_step and request.automatic_optimization:
        raise ConfigurationError(
            f"{request.module_name} overrides optimizer_step, which DeepSpeed cannot honour: the engine takes the real "
            "optimizer step inside backward at every accumulation boundary, before optimizer_step runs (the "
            "optimizer's step() is a no-op there), so an override cannot decide when to step, skip a step or change "
            "the learning rate of a step. For a learning-rate warm-up use 'warmup_steps' in the scheduler dict "
            "(applied around the engine's step) or a step-interval scheduler; to keep the override, launch with "
            f"{DDP_ALTERNATIVE} or {FSDP_ALTERNATIVE}."
        )
    if request.gradient_clip_val is not None and request.gradient_clip_algorithm == "value":
        raise ConfigurationError(
            f"Trainer(gradient_clip_val={request.gradient_clip_val}, gradient_clip_algorithm='value') is not available "
            "under DeepSpeed: the engine clips inside its own step, by the gradients' global norm only "
            "('gradient_clipping' in its config). Use gradient_clip_algorithm='norm'."
        )


def make_accelerator(cpu: bool, **accelerator_kwargs: Any) -> Any:
    """The ``Accelerator`` for a launch that asked for DeepSpeed.

    Accelerate's DeepSpeed path starts only when ``cpu`` is False (``accelerate/state.py``);
    on a machine without GPUs it would then initialise the process group with a GPU backend,
    so the processes join over gloo (``InitProcessGroupKwargs(backend="gloo")``), and
    DeepSpeed itself falls back to its CPU accelerator. ``cpu=True`` on a machine *with* GPUs
    cannot keep DeepSpeed on the CPU (it places the model on its own accelerator): refused.
    """
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise ConfigurationError(
            f"The launch asked for DeepSpeed (ACCELERATE_USE_DEEPSPEED=true), but the deepspeed package is not "
            f"installed ({err}). Install it with {INSTALL_HINT}, or launch without --use_deepspeed."
        ) from None
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            f"Accelerate's DeepSpeed plugin needs the transformers package, which is not installed. Install both with {INSTALL_HINT}."
        ) from None
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    gpu = torch.cuda.is_available()
    cpu_env = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if (cpu or cpu_env) and gpu:
        raise ConfigurationError(
            f"{'Trainer(cpu=True)' if cpu else 'ACCELERATE_USE_CPU'} under DeepSpeed on a machine with GPUs: DeepSpeed "
            "places the model on its own accelerator and cannot be kept on the CPU. Drop it to train with DeepSpeed on "
            "the GPUs, or launch without --use_deepspeed to train on the CPU."
        )
    handlers = list(accelerator_kwargs.pop("kwargs_handlers", []))
    if not gpu:
        init = next((h for h in handlers if isinstance(h, InitProcessGroupKwargs)), None)
        if init is None:
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
        else:
            init.backend = "gloo"  # keeps its timeout (Trainer(collective_timeout=...))
    # Without GPUs the CPU is where DeepSpeed runs anyway; ACCELERATE_USE_CPU (as set for CPU launches)
    # would make Accelerate drop DeepSpeed altogether, so it is not read here.
    saved = os.environ.pop("ACCELERATE_USE_CPU", None)
    try:
        return Accelerator(cpu=False, kwargs_handlers=handlers, **accelerator_kwargs)
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_CPU"] = saved


class DeepSpeedEngine(Engine):
    """Accelerate's DeepSpeed integration (one model, one optimizer, the trainer's schedulers)."""

    label = "DeepSpeed"
    sharded_checkpoints = True
    step_inside_backward = True
    payload_dir = PAYLOAD_DIR

    @property
    def plugin(self) -> Any:
        return getattr(self.accelerator, "deepspeed_plugin", None)

    @property
    def zero_stage(self) -> int:
        config = self.plugin.deepspeed_config if self.plugin is not None else {}
        return int(config.get("zero_optimization", {}).get("stage", 0) or 0)

    @property
    def forward_is_collective(self) -> bool:  # type: ignore[override]
        return self.zero_stage == 3  # ZeRO-3 gathers partitioned parameters in every forward, as FSDP does

    def variant(self) -> str:
        return f"DeepSpeed ZeRO-{self.zero_stage}"

    def check(self, request: RunRequest) -> None:
        check_deepspeed(request)
        self._request = request

    # -- preparing ------------------------------------------------------------------------------
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
        if plugin is not None and hasattr(self, "_request"):
            self._carry_trainer_settings(plugin.deepspeed_config, self._request)
        self._cast_inputs(dispatchers[0])
        prepared = accelerator.prepare(*dispatchers, *optimizers)
        prepared = list(prepared) if isinstance(prepared, (list, tuple)) else [prepared]
        # Only LRSchedulers are wrapped, as in a plain prepare call; other schedulers pass as given.
        prepared_schedulers = [
            accelerator.prepare_scheduler(s) if isinstance(s, LRScheduler) else s for s in schedulers
        ]
        n = len(dispatchers)
        return Prepared(prepared[:n], prepared[n:], prepared_schedulers)

    def _cast_inputs(self, dispatcher: torch.nn.Module) -> None:
        """Under DeepSpeed's bf16/fp16 the model's weights are half precision and, unlike the other
        engines, nothing autocasts: floating-point batch tensors are cast to that dtype before the
        step (what Lightning's DeepSpeed precision plugin does), or the first matmul fails."""
        config = self.plugin.deepspeed_config if self.plugin is not None else {}
        dtype = torch.bfloat16 if config.get("bf16", {}).get("enabled") else torch.float16 if config.get("fp16", {}).get("enabled") else None
        if dtype is None or getattr(dispatcher, "_accel_trainer_casts", False):
            return
        forward = dispatcher.forward

        def cast(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value.to(dtype)
            if isinstance(value, dict):
                return type(value)((k, cast(v)) for k, v in value.items())
            if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
                return type(value)(cast(v) for v in value)
            return value

        def forward_casting(method: str, *args: Any) -> Any:
            return forward(method, *(cast(a) for a in args))

        dispatcher.forward = forward_casting
        setattr(dispatcher, "_accel_trainer_casts", True)  # noqa: B010 - a plain flag, not a Module attribute

    def _carry_trainer_settings(self, config: dict[str, Any], request: RunRequest) -> None:
        """``gradient_clip_val`` and ``gradient_accumulation_steps`` into the DeepSpeed config."""
        clip = config.get("gradient_clipping", "auto")
        if request.gradient_clip_val is not None:
            if clip not in ("auto", None) and float(clip) != float(request.gradient_clip_val):
                raise ConfigurationError(
                    f"Trainer(gradient_clip_val={request.gradient_clip_val}) conflicts with the DeepSpeed config's "
                    f"gradient_clipping={clip} (from --gradient_clipping or the accelerate config). Set it in one place."
                )
            config["gradient_clipping"] = float(request.gradient_clip_val)
        elif clip in ("auto", None):
            # Accelerate would fill "auto" with 1.0; the trainer clips only when asked, on every engine
            config["gradient_clipping"] = 0.0
        accumulation = config.get("gradient_accumulation_steps", "auto")
        wanted = request.gradient_accumulation_steps
        if accumulation not in ("auto", None) and int(accumulation) != wanted:
            raise ConfigurationError(
                f"Trainer(gradient_accumulation_steps={wanted}) conflicts with the DeepSpeed config's "
                f"gradient_accumulation_steps={accumulation} (from --gradient_accumulation_steps or the accelerate "
                "config). Set it in one place."
            )
        config["gradient_accumulation_steps"] = wanted

    def prepare_for_evaluation(self, dispatcher: torch.nn.Module) -> torch.nn.Module:
        params = [p for p in dispatcher.parameters() if p.requires_grad]
        if not params:
            raise ConfigurationError("DeepSpeed cannot prepare a module without trainable parameters; evaluate it without --use_deepspeed.")
        # deepspeed.initialize builds an engine around a model and an optimizer; evaluation has
        # none, so it lends one that is never stepped (the engine also needs a micro batch size).
        if self.plugin is not None and self.plugin.is_auto("train_micro_batch_size_per_gpu"):
            self.plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
        if self.plugin is not None:
            self.plugin.deepspeed_config.setdefault("gradient_clipping", 0.0)
            if self.plugin.deepspeed_config.get("gradient_clipping") == "auto":
                self.plugin.deepspeed_config["gradient_clipping"] = 0.0
        self._cast_inputs(dispatcher)
        wrapper, _ = self.accelerator.prepare(dispatcher, torch.optim.SGD(params, lr=0.0))
        return wrapper

    def clip_gradients(self, optimizer: Any, params: list, wrapped: torch.nn.Module, n_optimizers: int, max_norm: float, algorithm: str) -> None:
        """Nothing to do: the engine clipped by its config's ``gradient_clipping`` inside its step."""

    # -- checkpoints ----------------------------------------------------------------------------
    def save_payload(self, directory: str | None, module: torch.nn.Module, wrapper: torch.nn.Module, optimizers: list) -> dict[str, Any]:
        assert directory is not None
        # every rank: ZeRO partitions the optimizer state (and, at stage 3, the weights)
        engine: Any = wrapper  # a deepspeed.DeepSpeedEngine
        engine.save_checkpoint(directory, tag=TAG, client_state={}, save_latest=False)
        return {
            "engine": self.label,
            "zero_stage": self.zero_stage,
            "world_size": self.accelerator.num_processes,
            "optimizer_has_state": [True for _ in optimizers],
            "grad_names": [],
            "state_shapes": {k: list(v) for k, v in self.state_shapes(module, wrapper).items()},
            "payload_dir": PAYLOAD_DIR,
        }

    def state_shapes(self, module: torch.nn.Module, wrapper: torch.nn.Module) -> dict[str, tuple[int, ...]]:
        """Full shapes (ZeRO-3 keeps an empty placeholder per parameter and its real shape in ``ds_shape``)."""
        shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in module.named_parameters()}
        shapes.update({name: tuple(b.shape) for name, b in module.named_buffers()})
        return shapes

    def restore_payload(self, source: PayloadSource, module: torch.nn.Module, wrapper: torch.nn.Module, optimizers: list) -> None:
        meta = source.checkpoint.get("sharded", {})
        if meta.get("engine") != self.label:
            written = meta.get("engine") or source.checkpoint.get("engine", "DDP")
            raise CheckpointError(
                f"{source.path!r} was written by {written}; a DeepSpeed run resumes only from a DeepSpeed checkpoint "
                "(ZeRO keeps its optimizer state in its own partitioned format). Resume it under the engine that wrote "
                f"it, or start this DeepSpeed run from its weights: accel-trainer export {source.path} weights.safetensors, "
                "then load them into the module before fit."
            )
        acc = self.accelerator
        saved = (int(meta.get("zero_stage", -1)), int(meta.get("world_size", -1)))
        if saved != (self.zero_stage, acc.num_processes):
            raise CheckpointError(
                f"{source.path!r} is a DeepSpeed ZeRO-{saved[0]} checkpoint of {saved[1]} processes; this run is ZeRO-"
                f"{self.zero_stage} on {acc.num_processes}. DeepSpeed partitions the optimizer state by stage and "
                "process count, so it resumes only with both unchanged. To continue on another setup, export the weights "
                f"(accel-trainer export {source.path} weights.safetensors) and start a new run from them."
            )
        engine: Any = wrapper  # a deepspeed.DeepSpeedEngine
        path, _ = engine.load_checkpoint(
            source.shards, tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False, load_module_strict=True
        )
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {source.shards!r}: the engine's checkpoint files are missing or incomplete.")


def consolidated_weights(payload_dir: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a ZeRO checkpoint (DeepSpeed's own ``zero_to_fp32``), in one process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(payload_dir, tag=TAG)


def is_deepspeed_payload(meta: dict[str, Any]) -> bool:
    return meta.get("engine") == DeepSpeedEngine.label and os.path.basename(str(meta.get("payload_dir", ""))) == PAYLOAD_DIR

"""What a user coming from PyTorch Lightning types first, answered with accel_trainer's equivalent.

``Trainer(devices=2)``, ``Trainer(precision="bf16-mixed")``, ``accumulate_grad_batches=4`` …
are Lightning arguments that the fixed ``Trainer`` signature does not have. Without help they
end in Python's bare ``TypeError``; here each one becomes a :class:`ConfigurationError` that
names what to write instead. An argument that is neither ours nor Lightning's (a typo) stays a
``TypeError`` — loud, with the closest valid names.

The same goes for the module: a Lightning-2 style two-argument ``training_step`` with several
optimizers, or a ``validation_step`` whose ``dataloader_idx`` does not fit the dataloaders,
is refused before training with the fix, instead of a ``TypeError`` deep inside the loop.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable
from typing import Any

from .errors import ConfigurationError

_LAUNCH = (
    "accel_trainer runs one process per device, started by Accelerate: `accelerate launch --multi_gpu "
    "--num_processes {n} train.py` on GPUs, `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes "
    "{n} train.py` on CPUs (or a launch config: launch/*.yaml). A single process uses one GPU when one is "
    "visible; Trainer(cpu=True) forces the CPU"
)
_STRATEGY = (
    "Accelerate picks the strategy from how the script is launched: `accelerate launch --multi_gpu` (DDP), "
    "`--use_fsdp`, `--use_deepspeed`, or a launch config (launch/*.yaml); to set it in code, build an "
    "accelerate.Accelerator(...) and pass it as Trainer(accelerator=...)"
)

#: Lightning (2.x and the 0.7/1.x names the seed's users know) -> what to write here. ``{v}`` is
#: the value received, ``{n}`` the number of devices it implies.
LIGHTNING_TRAINER_ARGUMENTS: dict[str, str] = {
    "devices": _LAUNCH,
    "gpus": _LAUNCH,
    "num_processes": _LAUNCH,
    "tpu_cores": _LAUNCH,
    "ipus": _LAUNCH,
    "hpus": _LAUNCH,
    "auto_select_gpus": "choose GPUs with CUDA_VISIBLE_DEVICES or `accelerate launch --gpu_ids 0,1`",
    "num_nodes": "launch on each machine with `accelerate launch --num_machines N --machine_rank R "
    "--main_process_ip HOST --main_process_port PORT ...` (launch/multi_node.yaml)",
    "strategy": _STRATEGY,
    "distributed_backend": _STRATEGY,
    "plugins": "configure an accelerate.Accelerator(...) and pass it as Trainer(accelerator=...)",
    "sync_batchnorm": "convert the module yourself before fit: module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)",
    "precision": "",  # value-dependent: see precision_equivalent
    "amp_backend": "mixed_precision='bf16' or 'fp16' (Accelerate's native autocast)",
    "amp_level": "mixed_precision='bf16' or 'fp16' (Accelerate's native autocast; there are no apex levels)",
    "use_amp": "mixed_precision='fp16' (GPU) or 'bf16'",
    "accumulate_grad_batches": "gradient_accumulation_steps={v}",
    "logger": "log_with: None (CSV in default_root_dir, the default), 'csv', 'wandb', 'tensorboard', a list of "
    "these, or [] for no logging",
    "enable_checkpointing": "checkpoints/last.ckpt is always written (for an exact resume); add "
    "ModelCheckpoint(...) to callbacks for best-k checkpoints",
    "checkpoint_callback": "pass callbacks=[ModelCheckpoint(...)]; checkpoints/last.ckpt is always written",
    "early_stop_callback": "pass callbacks=[EarlyStopping(monitor='val_loss', ...)]",
    "resume_from_checkpoint": "trainer.fit(module, ckpt_path=PATH) (or ckpt_path='last')",
    "fast_dev_run": "max_steps=1 (or max_epochs=1) with limit_train_batches=1, limit_val_batches=1",
    "overfit_batches": "limit_train_batches=N on an unshuffled DataLoader (there is no overfit mode)",
    "min_epochs": "no equivalent: EarlyStopping stops when its patience runs out",
    "min_steps": "no equivalent: EarlyStopping stops when its patience runs out",
    "min_nb_epochs": "no equivalent: EarlyStopping stops when its patience runs out",
    "max_nb_epochs": "max_epochs={v}",
    "max_time": "no equivalent: use max_steps / max_epochs; a SIGTERM or SIGUSR1 writes checkpoints/last.ckpt "
    "and exits with code 75 (resume with ckpt_path='last')",
    "limit_test_batches": "no equivalent: test() runs every batch; pass a smaller DataLoader (torch.utils.data.Subset)",
    "limit_predict_batches": "no equivalent (there is no predict loop)",
    "test_percent_check": "no equivalent: test() runs every batch; pass a smaller DataLoader (torch.utils.data.Subset)",
    "train_percent_check": "limit_train_batches={v}",
    "val_percent_check": "limit_val_batches={v}",
    "nb_sanity_val_steps": "num_sanity_val_steps={v}",
    "row_log_interval": "log_every_n_steps={v}",
    "log_save_interval": "log_every_n_steps (values are written to the trackers when logged)",
    "flush_logs_every_n_steps": "log_every_n_steps (values are written to the trackers when logged)",
    "default_save_path": "default_root_dir={v!r}",
    "weights_save_path": "default_root_dir={v!r} (checkpoints go to its checkpoints/)",
    "gradient_clip": "gradient_clip_val={v}",
    "track_grad_norm": "no equivalent: compute norms in on_before_optimizer_step and self.log them",
    "terminate_on_nan": "on_nonfinite_loss='raise' (the default) or 'skip'",
    "deterministic": "seed=N, plus torch.use_deterministic_algorithms(True) before fit for deterministic kernels",
    "benchmark": "set torch.backends.cudnn.benchmark yourself before fit",
    "inference_mode": "no equivalent: validation and test run under torch.no_grad()",
    "use_distributed_sampler": "no equivalent: accelerator.prepare shards every dataloader across processes",
    "replace_sampler_ddp": "no equivalent: accelerator.prepare shards every dataloader across processes",
    "reload_dataloaders_every_n_epochs": "no equivalent: dataloaders are prepared once per fit",
    "multiple_trainloader_mode": "no equivalent: fit takes one training dataloader",
    "profiler": "no equivalent: wrap trainer.fit in torch.profiler.profile(...) or profile from a Callback",
    "detect_anomaly": "call torch.autograd.set_detect_anomaly(True) before fit",
    "enable_model_summary": "no equivalent (no summary is printed): print(module)",
    "weights_summary": "no equivalent (no summary is printed): print(module)",
    "progress_bar_refresh_rate": "enable_progress_bar=True/False; ACCEL_TRAINER_PROGRESS=bar|lines|off picks the style",
    "show_progress_bar": "enable_progress_bar={v}",
    "process_position": "no equivalent: enable_progress_bar=True/False",
    "barebones": "enable_progress_bar=False, log_with=[] (the loop has no extra bookkeeping to switch off)",
    "auto_lr_find": "no tuner: try `accel-trainer lr-schedule` to preview schedules, then set the learning rate",
    "auto_scale_batch_size": "no tuner: set the DataLoader's batch_size",
    "move_metrics_to_cpu": "no equivalent: epoch values are reduced on the device and read once per epoch",
    "stochastic_weight_avg": "no equivalent: use torch.optim.swa_utils from a Callback",
    "prepare_data_per_node": "no equivalent: prepare_data() runs on the local main process of every machine",
    "log_gpu_memory": "no equivalent: self.log(torch.cuda.memory_allocated()) yourself",
    "truncated_bptt_steps": "no equivalent: split sequences yourself under manual optimization",
    "model_registry": "no equivalent",
}


def precision_equivalent(value: Any) -> str:
    """What Lightning's ``precision=value`` is here."""
    text = str(value).lower()
    if text in ("16", "16-mixed", "fp16"):
        return "mixed_precision='fp16' (needs a CUDA GPU; on a CPU use mixed_precision='bf16')"
    if text in ("bf16", "bf16-mixed"):
        return "mixed_precision='bf16'"
    if text in ("32", "32-true", "fp32"):
        return "mixed_precision='no' (the default)"
    if text in ("16-true", "bf16-true", "half"):
        return ("no equivalent: weights stay float32 under autocast; mixed_precision='bf16' (or 'fp16' on a GPU) is "
                "the closest")
    if text in ("64", "64-true", "double"):
        return "mixed_precision='no' with module.double() and float64 data"
    return "mixed_precision='no', 'bf16' or 'fp16'"


def _message(name: str, value: Any) -> str:
    if name == "precision":
        fix = precision_equivalent(value)
    else:
        n = value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else "N"
        fix = LIGHTNING_TRAINER_ARGUMENTS[name].format(v=value, n=n)
    return f"Trainer({name}={value!r}) is a PyTorch Lightning argument; here: {fix}."


def refuse_lightning_arguments(init: Callable) -> Callable:
    """Wrap ``Trainer.__init__``: Lightning-only keyword arguments -> ConfigurationError with our equivalent.

    The wrapped signature is unchanged (``functools.wraps``), so ``inspect.signature(Trainer)``
    and the command line still see exactly the contract's arguments.
    """
    allowed = [p for p in inspect.signature(init).parameters if p != "self"]

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        unknown = [k for k in kwargs if k not in allowed]
        if unknown:
            check_unknown_trainer_arguments({k: kwargs[k] for k in unknown}, allowed)
        init(self, *args, **kwargs)

    return __init__


def check_unknown_trainer_arguments(unknown: dict[str, Any], allowed: list[str]) -> None:
    """Raise for keyword arguments the Trainer does not take.

    Raises:
        TypeError: a name that is neither ours nor Lightning's (a typo), with the closest names.
        ConfigurationError: Lightning arguments, each with what to write instead.
    """
    typos = [k for k in unknown if k not in LIGHTNING_TRAINER_ARGUMENTS]
    if typos:
        hints = []
        for k in typos:
            close = difflib.get_close_matches(k, allowed, n=3, cutoff=0.6) or difflib.get_close_matches(
                k, list(LIGHTNING_TRAINER_ARGUMENTS), n=1, cutoff=0.8
            )
            hints.append(f"{k!r}" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""))
        raise TypeError(
            f"Trainer() got unexpected keyword argument(s) {', '.join(hints)}. Its arguments are: {', '.join(allowed)}."
        )
    raise ConfigurationError(" ".join(_message(k, v) for k, v in unknown.items()))


def accelerator_string_message(value: str) -> str:
    """``Trainer(accelerator="gpu")``: Lightning's device name where we take an Accelerator object."""
    text = value.lower()
    if text == "cpu":
        fix = "Trainer(cpu=True)"
    elif text in ("gpu", "cuda", "auto", "mps"):
        fix = "nothing: a visible GPU is used automatically (Trainer(cpu=True) forces the CPU); choose GPUs with CUDA_VISIBLE_DEVICES or accelerate launch"
    else:
        fix = "launch with `accelerate launch` on that hardware (see accelerate config)"
    return (
        f"Trainer(accelerator={value!r}) is not allowed: `accelerator` takes an accelerate.Accelerator object (or "
        f"None), not a device name as in PyTorch Lightning. For {value!r} write {fix}."
    )


# -- the module's step signatures ------------------------------------------------------------
def _positional(fn: Callable) -> tuple[list[inspect.Parameter], bool]:
    """A bound method's positional parameters, and whether it takes ``*args``."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - a C function
        return [], True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional, any(p.kind == p.VAR_POSITIONAL for p in params)


def check_training_step_signature(module: Any, num_optimizers: int, automatic: bool) -> None:
    """``training_step`` must take ``optimizer_idx`` exactly when it is passed (several optimizers).

    Raises:
        ConfigurationError: before training, with the two ways out.
    """
    if not automatic or num_optimizers == 0:
        return
    name = type(module).__name__
    positional, varargs = _positional(module.training_step)
    if varargs:
        return
    if num_optimizers > 1 and len(positional) < 3:
        args = ", ".join(p.name for p in positional)
        raise ConfigurationError(
            f"{name}.training_step({args}) takes no optimizer_idx, but configure_optimizers returned "
            f"{num_optimizers} optimizers. With automatic optimization the trainer calls training_step(batch, "
            "batch_idx, optimizer_idx) once per optimizer and batch (the seed's API, Lightning 1.x): add the "
            "optimizer_idx argument. Or do as Lightning 2 requires for several optimizers: set "
            "self.automatic_optimization = False and step them yourself in training_step(batch, batch_idx) "
            "(self.optimizers(), self.manual_backward(loss))."
        )
    required = [p for p in positional if p.default is p.empty]
    if num_optimizers == 1 and len(required) >= 3:
        raise ConfigurationError(
            f"{name}.training_step requires a third argument ({required[2].name!r}), but with one optimizer the "
            "trainer calls training_step(batch, batch_idx): optimizer_idx is passed only when configure_optimizers "
            f"returns several optimizers. Give it a default ({required[2].name}=0) or remove it."
        )


def check_eval_step_signature(module: Any, step_name: str, num_dataloaders: int) -> None:
    """``validation_step``/``test_step`` and ``dataloader_idx``, as Lightning checks them.

    Raises:
        ConfigurationError: several dataloaders and no third argument to receive ``dataloader_idx``,
            or one dataloader and a third argument without a default.
    """
    fn = getattr(module, step_name, None)
    owner = getattr(type(module), step_name, None)
    from .module import TrainingModule

    if fn is None or owner is getattr(TrainingModule, step_name, None):
        return
    positional, varargs = _positional(fn)
    if varargs:
        return
    name = type(module).__name__
    kind = "validation" if step_name == "validation_step" else "test"
    if num_dataloaders > 1 and len(positional) < 3:
        raise ConfigurationError(
            f"{num_dataloaders} {kind} dataloaders were given, but {name}.{step_name} takes no dataloader_idx: "
            f"add it ({step_name}(self, batch, batch_idx, dataloader_idx=0)); it tells you which dataloader the batch "
            "comes from."
        )
    required = [p for p in positional if p.default is p.empty]
    if num_dataloaders == 1 and len(required) >= 3:
        raise ConfigurationError(
            f"One {kind} dataloader was given, but {name}.{step_name} requires a third argument "
            f"({required[2].name!r}); dataloader_idx is passed only with several dataloaders. Give it a default "
            f"({required[2].name}=0) or remove it."
        )


def check_precision_device(accelerator: Any) -> None:
    """fp16 needs a GPU: on a CPU Accelerate would silently train in float32.

    Raises:
        ConfigurationError: ``mixed_precision="fp16"`` on a process whose device is the CPU.
    """
    if getattr(accelerator, "mixed_precision", "no") == "fp16" and accelerator.device.type == "cpu":
        raise ConfigurationError(
            "Trainer(mixed_precision='fp16') needs a CUDA GPU, but this process runs on the CPU, where Accelerate "
            "would silently train in float32 (fp16 autocast with a gradient scaler is a GPU feature). Use "
            "mixed_precision='bf16', which runs on CPUs, or 'no'. (PyTorch Lightning switches to bf16 with a warning "
            "here; accel_trainer asks you to choose.)"
        )

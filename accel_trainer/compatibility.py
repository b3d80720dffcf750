"""Does a checkpoint fit the run about to resume from it? Checked before anything is restored.

Loading a checkpoint into a run it does not fit used to fail late and obscurely, or not
at all: Adam's state loaded into SGD raised ``KeyError: 'momentum'`` at the first step,
swapped optimizers ``KeyError: 'step'``, another scheduler type ``KeyError: 'lr_lambdas'``,
and Adam's state loaded into AdamW silently. So a checkpoint records what it was taken of
-- the class of every optimizer and scheduler, the parameters of every param group, the
run's configuration -- and :func:`check_fits` compares all of it with the run before a
single tensor is loaded, raising one :class:`~accel_trainer.errors.CheckpointError` that
names every difference and the ways out.

The configuration (:func:`run_identity`): the resolved command-line config when the run
came from ``accel-trainer``, else the module's class and hyperparameters and the Trainer's
arguments. Its fields are of three kinds (README, "Checkpoints and resuming"):

* *operational* (:data:`OPERATIONAL`): where and how the run reports, not what it trains
  (``default_root_dir``, ``log_with``, the progress bar ...): not compared;
* *harmless* (:data:`HARMLESS`): how long and how often (``max_epochs``, ``max_steps``,
  validation and logging intervals, callbacks; ``seed``, which acts only on a fresh start
  since a resume restores every RNG state): a difference is a warning;
* everything else *defines* the run (module, data, optimizer, scheduler, precision,
  accumulation, clipping, ``limit_train_batches`` ...): a difference is an error when resuming ``ckpt_path="last"``
  (re-running a command in a run directory must continue *that* run, not graft another
  configuration onto it), and a warning when the checkpoint was named explicitly
  (``ckpt_path=PATH``: continuing from that state with new settings on purpose).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from .errors import CheckpointError

#: sections every checkpoint holds, and what each is (for messages)
REQUIRED_SECTIONS = {
    "loops": "the training counters",
    "lr_schedulers": "the scheduler states",
    "rank_states": "the RNG states of every rank",
    "callbacks": "the callback states",
}
SINGLE_FILE_SECTIONS = {"state_dict": "the model weights", "optimizer_states": "the optimizer states"}
SHARDED_SECTIONS = {"sharded": "the description of the shards"}

#: configuration fields that say where and how a run reports, not what it trains: never compared
OPERATIONAL = (
    "ckpt_path",
    "resume",
    "weights_from",
    "trainer.default_root_dir",
    "trainer.enable_progress_bar",
    "trainer.log_with",
    "trainer.project_name",
    "trainer.collective_timeout",
    "trainer.check_rank_sync_every_n_steps",
    "trainer.accelerator",
)
#: fields that change how long or how often, not what: a difference is a warning
HARMLESS = (
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.log_every_n_steps",
    "trainer.limit_val_batches",
    "trainer.val_check_interval",
    "trainer.check_val_every_n_epoch",
    "trainer.num_sanity_val_steps",
    "trainer.callbacks",
    "trainer.cpu",
    "trainer.on_nonfinite_loss",
    # the RNG states come from the checkpoint: a seed acts only on a fresh start
    "trainer.seed",
)
#: the Trainer arguments a run started from Python is identified by (besides module class and hparams)
TRAINER_FIELDS = (
    "max_epochs",
    "max_steps",
    "mixed_precision",
    "gradient_accumulation_steps",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "limit_train_batches",
    "limit_val_batches",
    "val_check_interval",
    "check_val_every_n_epoch",
    "log_every_n_steps",
    "seed",
    "on_nonfinite_loss",
)


def _way_out(path: str) -> str:
    return (
        "Ways out: start a new run instead (accel-trainer fit --resume false, or a new --trainer.default_root_dir; "
        "fit(ckpt_path=None) in Python); or start a new run from this checkpoint's weights only, with fresh "
        f"optimizers, schedulers and counters (accel-trainer fit --weights_from {path}; in Python "
        f"module.load_state_dict(accel_trainer.checkpoint.load_weights({path!r})) before fit)."
    )


#: what wrappers insert into parameter names (FSDP1 wraps submodules in place, activation
#: checkpointing, torch.compile): removed, so that names compare across engines
_WRAPPER_PARTS = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def clean_name(name: str) -> str:
    """A parameter's name as the unwrapped module calls it."""
    return _WRAPPER_PARTS.sub("", name)


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _short_class(name: str) -> str:
    return name.rsplit(".", 1)[-1]


# -- what a checkpoint records ---------------------------------------------------------------------
def optimizer_specs(module: Any, optimizers: Sequence[Any]) -> list[dict[str, Any]]:
    """Per optimizer: its class and, per param group, the names of its parameters (in order).

    A parameter the module does not name (an engine's flat buffer) is recorded as None; such
    a group is compared by nothing but its existence (its size depends on the engine).
    """
    names = {id(p): clean_name(n) for n, p in module.named_parameters()} if module is not None else {}
    specs = []
    for opt in optimizers:
        raw = innermost_optimizer(opt)
        groups = [[names.get(id(p)) for p in g["params"]] for g in raw.param_groups]
        specs.append({"class": _qualname(raw), "groups": groups})
    return specs


def innermost_optimizer(optimizer: Any) -> Any:
    """The user's torch optimizer behind the wrappers an engine adds (Accelerate's, DeepSpeed's ...).

    Follows ``.optimizer`` and keeps the deepest ``torch.optim.Optimizer`` found, so that the
    class recorded is the same whichever engine saved or resumes.
    """
    import torch

    from .optim import unwrap_optimizer

    found, current, seen = None, optimizer, set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, torch.optim.Optimizer):
            found = current
        current = getattr(current, "optimizer", None)
    return found if found is not None else unwrap_optimizer(optimizer)


def scheduler_specs(schedulers: Sequence[Any]) -> list[dict[str, Any]]:
    from .optim import unwrap_scheduler

    return [{"class": _qualname(unwrap_scheduler(s))} for s in schedulers]


# -- the checks ------------------------------------------------------------------------------------
def check_sections(checkpoint: dict[str, Any], path: str) -> None:
    """Raise when a section a resume needs is missing (instead of a ``KeyError`` halfway through)."""
    expected = dict(REQUIRED_SECTIONS)
    expected.update(SHARDED_SECTIONS if "sharded" in checkpoint else SINGLE_FILE_SECTIONS)
    missing = [f"{key!r} ({what})" for key, what in expected.items() if key not in checkpoint]
    bad_ranks = not isinstance(checkpoint.get("rank_states", []), list) or any(
        not isinstance(r, dict) or "rng" not in r or "epoch_start" not in r for r in checkpoint.get("rank_states", [])
    )
    if bad_ranks and "rank_states" in checkpoint:
        missing.append("'rank_states' entries with 'rng' and 'epoch_start'")
    loops = checkpoint.get("loops")
    if isinstance(loops, dict):
        absent = [k for k in ("current_epoch", "global_step", "optimizer_steps") if k not in loops]
        if absent:
            missing.append(f"'loops' fields {absent}")
    if missing:
        raise CheckpointError(
            f"Checkpoint {path!r} is incomplete: it has no {', '.join(missing)} (it has {sorted(map(str, checkpoint))}). "
            "It was not written by this version of Trainer.save_checkpoint, or was edited. " + _way_out(path)
        )


def check_fits(
    checkpoint: dict[str, Any],
    path: str,
    *,
    module_name: str,
    shapes: dict[str, tuple[int, ...]],
    optimizers: list[dict[str, Any]],
    schedulers: list[dict[str, Any]],
) -> None:
    """Name everything that differs between a checkpoint and the run about to load it.

    Args:
        checkpoint: the checkpoint (a file's content or a sharded checkpoint's state file).
        path: the checkpoint, for the message.
        module_name: the module's class name.
        shapes: name -> global shape of every tensor of the module's state dict.
        optimizers, schedulers: :func:`optimizer_specs` / :func:`scheduler_specs` of the run.

    Raises:
        CheckpointError: listing every difference, then the ways out.
    """
    check_sections(checkpoint, path)
    problems = _model_problems(saved_shapes(checkpoint), shapes)
    problems += _optimizer_problems(checkpoint, optimizers)
    problems += _scheduler_problems(checkpoint, schedulers)
    if problems:
        raise CheckpointError(f"Checkpoint {path!r} does not fit {module_name}: " + "; ".join(problems) + ". " + _way_out(path))


def saved_shapes(checkpoint: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the saved module (either layout)."""
    if "sharded" in checkpoint:
        return {k: tuple(v) for k, v in checkpoint["sharded"]["state_shapes"].items()}
    return {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}


def _model_problems(saved: dict[str, tuple[int, ...]], current: dict[str, tuple[int, ...]]) -> list[str]:
    problems = []
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    mismatched = sorted(k for k in set(saved) & set(current) if tuple(saved[k]) != tuple(current[k]))
    if missing:
        problems.append(f"parameters missing from the checkpoint: {missing[:10]}")
    if unexpected:
        problems.append(f"parameters in the checkpoint the module does not have: {unexpected[:10]}")
    if mismatched:
        shapes = [f"{k}: saved {tuple(saved[k])} vs module {tuple(current[k])}" for k in mismatched[:10]]
        problems.append(f"shape mismatches: {shapes}")
    return problems


def _saved_optimizers(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """The checkpoint's optimizer specs; for a checkpoint that predates them, group sizes only."""
    if "optimizer_specs" in checkpoint:
        return list(checkpoint["optimizer_specs"])
    if "sharded" in checkpoint:
        return [{"class": None, "groups": None} for _ in checkpoint["sharded"]["optimizer_has_state"]]
    return [  # "?": a parameter of known position but unrecorded name
        {"class": None, "groups": [["?"] * len(g["params"]) for g in state["param_groups"]]}
        for state in checkpoint["optimizer_states"]
    ]


def _optimizer_problems(checkpoint: dict[str, Any], current: list[dict[str, Any]]) -> list[str]:
    saved = _saved_optimizers(checkpoint)
    if len(saved) != len(current):
        return [f"the checkpoint has {len(saved)} optimizer(s), configure_optimizers returned {len(current)}"]
    problems = []
    for i, (was, now) in enumerate(zip(saved, current)):
        if was.get("class") and was["class"] != now["class"]:
            problems.append(
                f"optimizer {i} is a {now['class']} but was a {was['class']} when saved (its state would load into "
                f"the wrong optimizer: {_short_class(was['class'])}'s moments and settings as "
                f"{_short_class(now['class'])}'s)"
            )
            continue
        problems += _group_problems(i, was.get("groups"), now["groups"])
    return problems


def _group_problems(i: int, was: list | None, now: list) -> list[str]:
    if was is None:
        return []
    if len(was) != len(now):
        return [f"optimizer {i} has {len(now)} param group(s), the checkpoint {len(was)}"]
    problems = []
    for g, (saved_names, names) in enumerate(zip(was, now)):
        # None: an engine's flat buffer (FSDP1 without use_orig_params, DeepSpeed): sizes differ by engine
        if None in saved_names or None in names:
            continue
        if len(saved_names) != len(names):
            problems.append(f"optimizer {i} param group {g} holds {len(names)} parameter(s), the checkpoint {len(saved_names)}")
        elif "?" not in saved_names and list(saved_names) != list(names):
            if sorted(saved_names) == sorted(names):
                problems.append(f"optimizer {i} param group {g} holds its parameters in another order than the checkpoint")
            else:
                diff = sorted(set(names) ^ set(saved_names))
                problems.append(
                    f"optimizer {i} param group {g} trains other parameters than in the checkpoint (differing: {diff[:6]})"
                )
    return problems


def _scheduler_problems(checkpoint: dict[str, Any], current: list[dict[str, Any]]) -> list[str]:
    n_saved = len(checkpoint["lr_schedulers"])
    if n_saved != len(current):
        return [f"the checkpoint has {n_saved} scheduler(s), configure_optimizers returned {len(current)}"]
    problems = []
    for i, (was, now) in enumerate(zip(checkpoint.get("scheduler_specs") or [{}] * n_saved, current)):
        if was.get("class") and was["class"] != now["class"]:
            problems.append(f"scheduler {i} is a {now['class']} but was a {was['class']} when saved")
    return problems


# -- the run's configuration -------------------------------------------------------------------------
def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are values)."""
    if isinstance(config, dict):
        out: dict[str, Any] = {}
        for key, value in config.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: _jsonable(config)}


def _jsonable(value: Any) -> Any:
    """Plain data as it is; any other object as its type (a repr may hold a memory address)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    cls = type(value)
    return f"<{cls.__module__}.{cls.__qualname__}>"


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def run_identity(run_config: dict[str, Any] | None, module: Any, trainer_args: dict[str, Any]) -> dict[str, Any]:
    """The fields that identify a run's configuration, flattened (operational fields left out).

    From the resolved command-line config when there is one, else from the module's class,
    its ``hparams`` and the Trainer's arguments (:data:`TRAINER_FIELDS`).
    """
    if run_config:
        fields = flatten(run_config)
    else:
        cls = type(module)
        fields = {"module.class_path": f"{cls.__module__}.{cls.__qualname__}"}
        fields.update(flatten(dict(getattr(module, "hparams", {}) or {}), "module.hparams."))
        fields.update({f"trainer.{k}": _jsonable(trainer_args.get(k)) for k in TRAINER_FIELDS})
    return {k: v for k, v in fields.items() if not _matches(k, OPERATIONAL)}


def fingerprint(identity: dict[str, Any]) -> str:
    """SHA-256 (first 16 hex digits) of the fields that define the run (harmless ones left out)."""
    defining = {k: v for k, v in identity.items() if not _matches(k, HARMLESS)}
    text = json.dumps(defining, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def compare_runs(saved: dict[str, Any] | None, current: dict[str, Any] | None, path: str, implicit: bool) -> list[str]:
    """Check a checkpoint's run record against this run's; returns the warnings to give.

    Raises:
        CheckpointError: when fields that define the run differ and the checkpoint was not
            named explicitly (``ckpt_path="last"``), naming each field and the ways out.
    """
    if not saved or not current or not isinstance(saved.get("identity"), dict):
        return []
    if saved.get("fingerprint") == current.get("fingerprint") and saved["identity"] == current["identity"]:
        return []
    was, now = saved["identity"], current["identity"]
    changed = sorted(k for k in set(was) | set(now) if was.get(k, "<absent>") != now.get(k, "<absent>"))
    defining = [k for k in changed if not _matches(k, HARMLESS)]
    harmless = [k for k in changed if _matches(k, HARMLESS)]

    def show(keys: list[str]) -> str:
        shown = [f"{k}: {_show(was.get(k, '<absent>'))} -> {_show(now.get(k, '<absent>'))}" for k in keys[:8]]
        return "; ".join(shown) + (f"; and {len(keys) - 8} more" if len(keys) > 8 else "")

    run_id = saved.get("id", "?")
    if defining and implicit:
        raise CheckpointError(
            f"Checkpoint {path!r} belongs to run {run_id} of another configuration: {show(defining)}. Resuming it "
            "(ckpt_path='last', what re-running a command in its run directory does) would continue that run with "
            "settings it was not trained with. To start a new run here: accel-trainer fit --resume false (its "
            "checkpoints are then replaced) or a new --trainer.default_root_dir. To continue that run with these "
            f"settings on purpose, name the checkpoint: --ckpt_path {path} (fit(ckpt_path=...)); the differences are "
            "then a warning."
        )
    warnings = []
    if defining:
        warnings.append(
            f"Resuming {path} (run {run_id}) with another configuration, as asked by naming the checkpoint: "
            f"{show(defining)}."
        )
    if harmless:
        warnings.append(f"Resuming run {run_id} with changed settings: {show(harmless)}.")
    return warnings


def _show(value: Any) -> str:
    if value == "<absent>":
        return "(absent)"
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."

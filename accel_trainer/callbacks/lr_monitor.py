"""``LearningRateMonitor``: every optimizer's param-group learning rates into the logs, under Lightning's names."""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter, defaultdict
from typing import Any

from ..errors import ConfigurationError
from ..optim import innermost_optimizer, unwrap_optimizer
from ..plotting import LR_COLUMNS_FILE  # written to the run directory so `accel-trainer plot` finds every LR column
from .base import Callback


def lr_monitor_keys(optimizers: list, scheduler_configs: list) -> list[tuple[int, Any, list[str]]]:
    """Lightning's ``LearningRateMonitor`` names, computed the way Lightning 2 computes them.

    One entry per scheduler config (in ``configure_optimizers`` order), then one per optimizer
    that has no scheduler: ``(optimizer index, scheduler config or None, key per param group)``.

    * the base name is the scheduler's ``name``, else ``lr-{OptimizerClass}``;
    * the n-th unnamed entry of an optimizer class gets ``-{n-1}``: ``lr-Adam``, ``lr-Adam-1`` …
      (optimizers with a scheduler are counted first, then the others);
    * several param groups: ``{base}/pg1``, ``{base}/pg2`` … (or ``{base}/{group name}`` when a
      param group has a ``"name"``; a single named group gives ``{base}/{name}``).

    Raises:
        ConfigurationError: two param groups of one optimizer share a ``"name"``.
    """
    seen_types: defaultdict[type, int] = defaultdict(int)
    with_scheduler: set[int] = set()
    entries: list[tuple[int, Any, list[str]]] = []

    def add(opt_idx: int, base: str, cfg: Any, counted: bool) -> None:
        raw = innermost_optimizer(optimizers[opt_idx])
        cls = type(raw)
        if counted:
            seen_types[cls] += 1
        groups = raw.param_groups
        group_names = [g.get("name", f"pg{i}") for i, g in enumerate(groups, start=1)]
        duplicates = sorted({n for n in group_names if group_names.count(n) > 1})
        if duplicates:
            raise ConfigurationError(
                f"LearningRateMonitor: optimizer {opt_idx} ({cls.__name__}) has several param groups named "
                f"{duplicates}; give each param group a distinct 'name'."
            )
        if cls in seen_types and seen_types[cls] > 1:  # Lightning's _add_prefix (named entries included)
            base = f"{base}-{seen_types[cls] - 1}"
        if len(groups) > 1:
            keys = [f"{base}/{g.get('name', f'pg{i}')}" for i, g in enumerate(groups, start=1)]
        else:
            keys = [f"{base}/{groups[0]['name']}" if groups[0].get("name") else base]
        entries.append((opt_idx, cfg, keys))

    for cfg in scheduler_configs:
        with_scheduler.add(cfg.opt_idx)
        name = cfg.name if cfg.name is not None else f"lr-{type(innermost_optimizer(optimizers[cfg.opt_idx])).__name__}"
        add(cfg.opt_idx, name, cfg, counted=cfg.name is None)
    for i, opt in enumerate(optimizers):
        if i not in with_scheduler:
            add(i, f"lr-{type(innermost_optimizer(opt)).__name__}", None, counted=True)
    return entries


def optimizer_lr_keys(optimizers: list, scheduler_configs: list) -> list[list[str]]:
    """Per optimizer, the keys of its first :func:`lr_monitor_keys` entry (one per param group)."""
    first: dict[int, list[str]] = {}
    for opt_idx, _, keys in lr_monitor_keys(optimizers, scheduler_configs):
        first.setdefault(opt_idx, keys)
    return [first[i] for i in range(len(optimizers))]


class LearningRateMonitor(Callback):
    """Log the learning rate each optimizer will use for its next step (warm-up included).

    Keys are Lightning 2's (:func:`lr_monitor_keys`): ``lr-Adam``; ``lr-Adam`` and ``lr-Adam-1``
    for two Adams; ``lr-Adam/pg1``, ``lr-Adam/pg2`` for param groups; a named scheduler's key
    is its ``name``. ``log_momentum`` adds ``{key}-momentum`` (``betas[0]`` for Adam-like
    optimizers, 0 when there is none), ``log_weight_decay`` adds ``{key}-weight_decay``. The
    values also go to ``trainer.callback_metrics``, as in Lightning.

    Args:
        logging_interval: "step" (every optimizer, every ``log_every_n_steps``), "epoch" (every
            optimizer, at each epoch start), or None: each scheduler at its own interval, an
            optimizer without scheduler at both (Lightning's rule).
        log_momentum: also log the momentum.
        log_weight_decay: also log the weight decay.

    Raises:
        ConfigurationError: a bad ``logging_interval``; two param groups of one optimizer with
            the same ``"name"``.
    """

    def __init__(self, logging_interval: str | None = None, log_momentum: bool = False, log_weight_decay: bool = False) -> None:
        if logging_interval not in (None, "step", "epoch"):
            raise ConfigurationError(
                f"LearningRateMonitor(logging_interval={logging_interval!r}) is not allowed: expected None, 'step' or 'epoch'."
            )
        self.logging_interval = logging_interval
        self.log_momentum = log_momentum
        self.log_weight_decay = log_weight_decay
        #: every key logged (learning rates only), in order
        self.names: list[str] = []
        self.history: list[dict[str, float]] = []
        self._entries: list[tuple[int, Any, list[str]]] = []

    def on_train_start(self, trainer: Any, module: Any) -> None:
        self._entries = lr_monitor_keys(trainer.optimizers, trainer.lr_schedulers)
        self.names = [k for _, _, keys in self._entries for k in keys]
        self._last_logged_step: int | None = None
        self._logged_at: dict[str, int] = {}
        repeated = sorted(k for k, n in Counter(self.names).items() if n > 1)
        if repeated:
            warnings.warn(
                f"LearningRateMonitor: several schedulers share the key(s) {repeated} (their 'name'); each logs over "
                "the other, as in Lightning. Give them distinct names.",
                UserWarning,
                stacklevel=2,
            )
        if self.log_momentum and any(
            "momentum" not in innermost_optimizer(o).defaults and "betas" not in innermost_optimizer(o).defaults
            for o in trainer.optimizers
        ):
            warnings.warn(
                "LearningRateMonitor(log_momentum=True): some optimizers have no momentum; 0 is logged for them.",
                RuntimeWarning,
                stacklevel=2,
            )
        if trainer.is_global_zero:
            self._write_columns(trainer.log_dir)

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        if self.logging_interval != "step":
            self._log(trainer, "epoch" if self.logging_interval is None else "any")

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        if self.logging_interval == "epoch" or trainer.global_step % trainer.log_every_n_steps != 0:
            return
        if self._last_logged_step != trainer.global_step:  # once per step (accumulation repeats steps)
            self._last_logged_step = trainer.global_step
            self._log(trainer, "step" if self.logging_interval is None else "any")

    def current_lrs(self, trainer: Any, interval: str = "any") -> dict[str, float]:
        """``{key: value}`` of the entries due at ``interval`` ("step", "epoch" or "any")."""
        values: dict[str, float] = {}
        for opt_idx, cfg, keys in self._entries:
            if cfg is not None and interval not in (cfg.interval, "any"):
                continue
            optimizer = trainer.optimizers[opt_idx]
            raw = unwrap_optimizer(optimizer)
            lrs = trainer.effective_lrs(opt_idx)
            use_betas = "betas" in innermost_optimizer(optimizer).defaults
            for key, lr, group in zip(keys, lrs, raw.param_groups):
                values[key] = lr
                if self.log_momentum:
                    values[f"{key}-momentum"] = float(group["betas"][0] if use_betas else group.get("momentum", 0))
                if self.log_weight_decay:
                    values[f"{key}-weight_decay"] = float(group.get("weight_decay", 0))
        return values

    def _log(self, trainer: Any, interval: str) -> None:
        step = trainer.global_step
        # an entry logged at the start of this epoch is not logged again by the first batch of the same step
        values = {k: v for k, v in self.current_lrs(trainer, interval).items() if self._logged_at.get(k) != step}
        if not values:
            return
        self._logged_at.update(dict.fromkeys(values, step))
        self.history.append({"step": trainer.global_step, "epoch": trainer.current_epoch, **values})
        import torch

        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
        trainer.log_to_trackers(values)

    def _write_columns(self, log_dir: str) -> None:
        """Record which ``metrics.csv`` columns are learning rates (merged with a previous fit's)."""
        path = os.path.join(log_dir, LR_COLUMNS_FILE)
        columns = {"lr": list(self.names), "momentum": [], "weight_decay": []}
        if self.log_momentum:
            columns["momentum"] = [f"{k}-momentum" for k in self.names]
        if self.log_weight_decay:
            columns["weight_decay"] = [f"{k}-weight_decay" for k in self.names]
        try:
            with open(path) as f:
                old = json.load(f)
            for kind, names in columns.items():
                names[:0] = [n for n in old.get(kind, []) if n not in names]
        except (OSError, ValueError):
            pass
        os.makedirs(log_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(columns, f, indent=2)

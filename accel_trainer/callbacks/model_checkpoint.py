"""``ModelCheckpoint``: keep the best ``save_top_k`` checkpoints by a monitored metric."""

from __future__ import annotations

import math
import os
import re
import warnings
from typing import Any

import torch

from ..checkpoint import LAST_NAME
from ..checkpoint import remove as remove_checkpoint
from ..errors import ConfigurationError
from .base import Callback
from .early_stopping import _acts_after_validation

MODES = ("min", "max")


class ModelCheckpoint(Callback):
    """Save checkpoints during ``fit``.

    When it saves follows Lightning's rule (``trainer.monitor_at_validation_end``):

    * validation runs exactly once per epoch, at its end, or there is no validation: at the
      end of each epoch, after the epoch's schedulers stepped;
    * otherwise (``check_val_every_n_epoch=N``, ``val_check_interval=0.5`` …): at the end of
      every validation run (of the epochs ``every_n_epochs`` selects), in the middle of an
      epoch too. The checkpoint records that this validation ran and what is still due
      after it (a step-interval plateau scheduler), so resuming from it continues exactly.

    Every file it writes resumes exactly (bitwise on CPU). At most one save per
    ``global_step``, as in Lightning. The monitored value is the rank-reduced value, so every
    rank agrees on what is "best". A new checkpoint is complete on disk before any old one is
    removed. ``ModelCheckpoint`` callbacks run after all other callbacks (Lightning's order),
    so the checkpoint holds the other callbacks' state after this check (e.g. EarlyStopping's).

    Args:
        dirpath: where to write (default: ``{default_root_dir}/checkpoints``).
        filename: a format string over ``epoch``, ``step`` and logged metric names (default
            ``"{epoch}-{step}"``); as in Lightning, ``{name}`` is written ``name=<value>``
            (``epoch=3-step=400.ckpt``, ``{val_loss:.2f}`` -> ``val_loss=0.25``) unless
            ``auto_insert_metric_name=False``.
        monitor: metric to rank checkpoints by (None: keep the most recent).
        mode: "min" or "max".
        save_top_k: how many to keep (-1: all, 0: none).
        save_last: also refresh ``last.ckpt`` in ``dirpath`` whenever this callback saves.
        every_n_epochs: save in every N-th epoch (default 1 unless ``every_n_train_steps`` is set).
        every_n_train_steps: save every N ``global_step``s instead.
        auto_insert_metric_name: prefix every ``{name}`` of ``filename`` with ``name=``.
        save_on_train_epoch_end: None (the rule above), True (always once per epoch, after its
            schedulers) or False (always at the end of each validation run), as in Lightning.

    Raises:
        ConfigurationError: for a bad ``mode``, ``save_top_k`` < -1, both intervals set, or
            (when saving) a ``monitor`` that was never logged.
    """

    monitors_metrics = True

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        mode: str = "min",
        save_top_k: int = 1,
        save_last: bool | None = None,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        auto_insert_metric_name: bool = True,
        save_on_train_epoch_end: bool | None = None,
    ) -> None:
        if mode not in MODES:
            raise ConfigurationError(f"ModelCheckpoint(mode={mode!r}) is not allowed: expected one of {list(MODES)}.")
        if isinstance(save_top_k, bool) or not isinstance(save_top_k, int) or save_top_k < -1:
            raise ConfigurationError(f"ModelCheckpoint(save_top_k={save_top_k!r}) is not allowed: expected -1, 0 or a positive int.")
        if every_n_epochs is not None and every_n_train_steps is not None:
            raise ConfigurationError(
                f"ModelCheckpoint(every_n_epochs={every_n_epochs}, every_n_train_steps={every_n_train_steps}): set one of them."
            )
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_train_steps", every_n_train_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigurationError(f"ModelCheckpoint({name}={value!r}) is not allowed: expected a positive int.")
        self.dirpath = os.fspath(dirpath) if dirpath is not None else None
        self.filename = filename or "{epoch}-{step}"
        self.auto_insert_metric_name = auto_insert_metric_name
        self.save_on_train_epoch_end = save_on_train_epoch_end
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k
        self.save_last = save_last
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs if every_n_epochs is not None else (None if every_n_train_steps else 1)
        self.best_k_models: dict[str, float] = {}
        self.best_model_path = ""
        self.best_model_score: float | None = None
        self.last_model_path = ""
        self._recent: list[str] = []
        self._last_global_step_saved = 0  # Lightning's: nothing to save before the first step

    @property
    def state_key(self) -> str:
        return f"ModelCheckpoint{{monitor={self.monitor!r}, mode={self.mode!r}}}"

    def setup(self, trainer: Any, module: Any, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = trainer.checkpoint_dir

    def on_validation_end(self, trainer: Any, module: Any) -> None:
        if _acts_after_validation(trainer, self.save_on_train_epoch_end):
            self._on_check(trainer, epoch=trainer.current_epoch)

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        if self.save_on_train_epoch_end is False or (
            self.save_on_train_epoch_end is None and getattr(trainer, "monitor_at_validation_end", False)
        ):
            return
        # runs after the epoch is counted: current_epoch is the number of completed epochs
        self._on_check(trainer, epoch=trainer.current_epoch - 1)

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0 and not self._saved_at_this_step(trainer):
            self._save(trainer, epoch=trainer.current_epoch)

    def _on_check(self, trainer: Any, epoch: int) -> None:
        """At the end of an epoch or a validation run of ``epoch`` (0-based)."""
        if self._saved_at_this_step(trainer):
            return
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            self._save(trainer, epoch=epoch)
        elif self.save_last:
            self._save_last(trainer)

    def _saved_at_this_step(self, trainer: Any) -> bool:
        return trainer.global_step == self._last_global_step_saved

    # -- saving -------------------------------------------------------------------------------
    def _save(self, trainer: Any, epoch: int) -> None:
        """Save for ``epoch`` (0-based, as in Lightning's file names).

        A save the trainer refuses (non-finite weights: ``save_checkpoint`` returns False)
        changes nothing here: no file is recorded, none is removed.
        """
        self._last_global_step_saved = trainer.global_step
        if self.save_top_k == 0:
            if self.save_last:
                self._save_last(trainer)
            return
        score = self._current_score(trainer)
        path = self._format_path(trainer, epoch)
        if self.monitor is None:
            if _written(trainer.save_checkpoint(path)):
                self._recent.append(path)
                self.best_model_path = path
                keep = self.save_top_k if self.save_top_k > 0 else len(self._recent)
                while len(self._recent) > keep:
                    self._remove(trainer, self._recent.pop(0))
        elif score is not None and self._is_better(score, trainer) and _written(trainer.save_checkpoint(path)):
            self.best_k_models[path] = score
            if self.save_top_k > 0 and len(self.best_k_models) > self.save_top_k:
                worst = self._worst()
                del self.best_k_models[worst]
                if worst != path:
                    self._remove(trainer, worst)
            best = self._best()
            self.best_model_path, self.best_model_score = best, self.best_k_models[best]
        if self.save_last:
            self._save_last(trainer)

    def _save_last(self, trainer: Any) -> None:
        self._last_global_step_saved = trainer.global_step
        path = os.path.join(self._directory(), LAST_NAME)
        if _written(trainer.save_checkpoint(path)):
            self.last_model_path = path

    def _directory(self) -> str:
        """``dirpath``, which ``setup`` fills from the trainer when it was not given."""
        if self.dirpath is None:
            raise RuntimeError("ModelCheckpoint saves only after setup(trainer) chose its directory")
        return self.dirpath

    def _current_score(self, trainer: Any) -> float | None:
        if self.monitor is None:
            return None
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise ConfigurationError(
                f"ModelCheckpoint(monitor={self.monitor!r}) could not find that metric. Logged metrics: "
                f"{sorted(metrics)}. Log it with self.log({self.monitor!r}, ...) or monitor one of these."
            )
        value = metrics[self.monitor]
        return float(value) if isinstance(value, torch.Tensor) else float(value)

    def _is_better(self, score: float | None, trainer: Any = None) -> bool:
        if score is None:
            return False
        if math.isnan(score):
            # never a "best" checkpoint (Lightning ranks a NaN as the worst score; here it is not a candidate)
            if trainer is not None and getattr(trainer, "is_global_zero", True):
                warnings.warn(
                    f"ModelCheckpoint(monitor={self.monitor!r}): the score is NaN at global_step {trainer.global_step}; "
                    "this check saves no top-k checkpoint (a NaN is never among the best).",
                    UserWarning,
                    stacklevel=2,
                )
            return False
        if self.save_top_k == -1 or len(self.best_k_models) < self.save_top_k:
            return True
        worst = self.best_k_models[self._worst()]
        return score < worst if self.mode == "min" else score > worst

    def _worst(self) -> str:
        pick = max if self.mode == "min" else min
        return pick(self.best_k_models, key=self.best_k_models.__getitem__)

    def _best(self) -> str:
        pick = min if self.mode == "min" else max
        return pick(self.best_k_models, key=self.best_k_models.__getitem__)

    def _format_path(self, trainer: Any, epoch: int) -> str:
        values = {"epoch": epoch, "step": trainer.global_step}
        for k, v in trainer.callback_metrics.items():
            values.setdefault(k, float(v))
        name = self._format_name(values, trainer)
        path = os.path.join(self._directory(), name + ".ckpt")
        if path in self.best_k_models or path in self._recent:
            # the same name twice (e.g. a filename without {step}): keep both distinct
            path = os.path.join(self._directory(), f"{name}-v{trainer.global_step}.ckpt")
        return path

    def _format_name(self, values: dict[str, Any], trainer: Any) -> str:
        """Lightning's formatting: ``{name}`` (or ``{name:spec}``) -> ``name=<value>``; names may hold dots or slashes."""
        template = self.filename
        for group in sorted(set(re.findall(r"(\{.*?)[:\}]", template)), key=len, reverse=True):
            key = group[1:]
            if key not in values:
                raise ConfigurationError(
                    f"ModelCheckpoint(filename={self.filename!r}) names {key!r}, which is neither epoch, step nor a "
                    f"logged metric ({sorted(trainer.callback_metrics)})."
                )
            if self.auto_insert_metric_name:
                template = template.replace(group, key + "={" + key)
            template = template.replace(group, "{0[" + key + "]")
        return template.format(values)

    @staticmethod
    def _remove(trainer: Any, path: str) -> None:
        if trainer.is_global_zero:
            remove_checkpoint(path)  # a file, or a sharded checkpoint's directory (FSDP)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "best_model_score": self.best_model_score,
            "best_model_path": self.best_model_path,
            "best_k_models": dict(self.best_k_models),
            "last_model_path": self.last_model_path,
            "recent": list(self._recent),
            "last_global_step_saved": self._last_global_step_saved,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_model_score = state_dict.get("best_model_score")
        self.best_model_path = state_dict.get("best_model_path", "")
        self.best_k_models = {k: float(v) for k, v in state_dict.get("best_k_models", {}).items()}
        self.last_model_path = state_dict.get("last_model_path", "")
        self._recent = list(state_dict.get("recent", []))
        self._last_global_step_saved = int(state_dict.get("last_global_step_saved", 0))


def _written(result: Any) -> bool:
    """``trainer.save_checkpoint``'s answer: False when it refused to write (None from an older trainer)."""
    return result is not False

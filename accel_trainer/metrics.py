"""``self.log`` aggregation: step values, sample-weighted epoch means, cross-rank reduction.

Values stay on their device as tensors during the epoch (no host sync per ``self.log`` call).
A call costs about as much as the one in-place add a hand-written loop would do (see
``benchmarks/overhead.py``): the keys it writes are computed once per name, and the epoch sums
are preallocated accumulators that the calls of a batch update together, in one fused
``torch._foreach_add_`` per batch size (at the end of each batch, or earlier when a name is
logged twice), instead of two new tensors per call.
At the end of an epoch every rank packs its weighted sums and weights into one vector and
reduces it with a single collective, so an epoch value is the sample-weighted mean over the
whole data set across ranks: the same number on every rank, which is what makes plateau,
checkpoint and early-stopping decisions rank-consistent.

With several validation (or test) dataloaders, a name logged while dataloader ``i`` runs is
stored as ``name/dataloader_idx_i`` (``name_epoch/dataloader_idx_i`` …), as in Lightning;
``self.log(..., add_dataloader_idx=False)`` keeps the bare name (one value over every
dataloader that logs it). Validation and test *step* values never reach
``callback_metrics`` (Lightning leaves them out too): only epoch values do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .collectives import all_reduce_
from .errors import ConfigurationError
from .internals import foreach_add_

REDUCE_FX = ("mean", "sum", "max", "min")


def is_metric_object(value: Any) -> bool:
    """Duck-typed ``torchmetrics.Metric`` check (keeps torchmetrics out of the import path)."""
    return hasattr(value, "compute") and hasattr(value, "update") and hasattr(value, "reset") and isinstance(
        value, torch.nn.Module
    )


def extract_batch_size(batch: Any) -> int:
    """Size of the first dimension of the first tensor found in ``batch`` (1 if none)."""
    batch_type = type(batch)
    if (batch_type is tuple or batch_type is list) and batch and type(batch[0]) is torch.Tensor and batch[0].ndim:
        size = batch[0].shape[0]  # the usual (inputs, targets) batch, without the walk below (once per batch)
        if size:
            return size
    if batch_type is torch.Tensor or isinstance(batch, torch.Tensor):  # the exact type first: isinstance is slow here
        return int(batch.shape[0]) if batch.ndim > 0 else 1
    if isinstance(batch, (list, tuple)):
        for item in batch:
            size = extract_batch_size(item)
            if size:
                return size
        return 1
    if isinstance(batch, dict):
        for item in batch.values():
            size = extract_batch_size(item)
            if size:
                return size
        return 1
    return 1


@dataclass(eq=False, slots=True)  # slots: its attributes are read and set for every logged value
class _Entry:
    name: str
    on_step: bool
    on_epoch: bool
    prog_bar: bool
    logger: bool
    sync_dist: bool
    reduce_fx: str
    step_value: Any = None  # latest value (tensor) for step logging
    epoch_sum: Any = None  # weighted sum (mean/sum) or running max/min
    epoch_weight: float = 0.0
    metric: Any = None  # torchmetrics.Metric, computed at epoch end
    is_metric: bool = False
    metric_path: str | None = None  # where the metric lives in the module, for ranks that never logged it
    suffix: str = ""  # "/dataloader_idx_N" when logged while dataloader N of several ran
    dataloaders: set = field(default_factory=set)  # the dataloaders that logged it (empty: an epoch-end hook)
    auto: bool = False  # logged by the trainer from a scalar returned by validation_step/test_step
    pending: int = -1  # the MetricCollector flush generation in which an add to epoch_sum waits
    key: str = field(init=False)  # name + suffix
    step_keys: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.key = self.name + self.suffix
        # the callback_metrics keys a step value goes to (training), computed once
        self.step_keys = (self.name + "_step", self.name) if self.on_epoch else (self.name,)


class MetricCollector:
    """Collects ``self.log`` calls for one stage ("train", "validate" or "test") at a time.

    Args:
        device: where cross-rank reductions happen (the accelerator's device).
        num_processes: world size; 1 skips every collective.
    """

    def __init__(self, device: torch.device, num_processes: int = 1, module: torch.nn.Module | None = None) -> None:
        self.device = device
        self.module = module
        self.num_processes = num_processes
        self._stage = "train"
        self._in_epoch_end = False
        self._discarding = False
        self._dataloader_idx: int | None = None
        # per name, what a training_step call with the same options (the usual case, every step)
        # does: (options, entry, on_step, on_epoch, mean) -- decided by the first such call
        self._fast: dict[str, tuple] = {}
        self._fast_ok = True  # in a training step (not an epoch end, one dataloader, not discarding)
        self._entries: dict[str, dict[str, _Entry]] = {"train": {}, "validate": {}, "test": {}, "sanity": {}}
        self._batch: Any = None
        self._batch_size: int | None = None
        self.callback_metrics: dict[str, torch.Tensor] = {}
        self.progress_bar_metrics: dict[str, Any] = {}
        #: for progress-bar values that are epoch values: the training epoch they were computed in
        self.progress_bar_epochs: dict[str, int] = {}
        #: the training epoch under way (set by the trainer)
        self.epoch = 0
        self.logged_metrics: dict[str, float] = {}
        # epoch-sum additions waiting for flush(): per weight, (accumulators, values)
        self._pending: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._generation = 0

    # -- context set by the trainer ---------------------------------------------------------
    @property
    def stage(self) -> str:
        """"train", "validate", "test" or "sanity": where ``self.log`` calls go."""
        return self._stage

    @stage.setter
    def stage(self, value: str) -> None:
        self._stage = value
        self._context_changed()

    @property
    def in_epoch_end(self) -> bool:
        """True while an epoch-end hook runs (no step there)."""
        return self._in_epoch_end

    @in_epoch_end.setter
    def in_epoch_end(self, value: bool) -> None:
        self._in_epoch_end = value
        self._context_changed()

    @property
    def discarding(self) -> bool:
        """While True, ``self.log`` calls are dropped (filler forward passes, see ``lockstep.py``)."""
        return self._discarding

    @discarding.setter
    def discarding(self, value: bool) -> None:
        self._discarding = value
        self._context_changed()

    @property
    def dataloader_idx(self) -> int | None:
        """The dataloader being evaluated when there are several (None: one, or outside a dataloader)."""
        return self._dataloader_idx

    @dataloader_idx.setter
    def dataloader_idx(self, value: int | None) -> None:
        self._dataloader_idx = value
        self._context_changed()

    def _context_changed(self) -> None:
        self._fast_ok = self._stage == "train" and not self._in_epoch_end and not self._discarding and self._dataloader_idx is None

    def set_batch(self, batch: Any) -> None:
        self._batch = batch
        self._batch_size = None

    def reset_stage(self, stage: str) -> None:
        self.flush()
        self._entries[stage] = {}
        if stage == "train":
            self._fast.clear()  # its entries were this dict's

    def entries(self, stage: str) -> dict[str, _Entry]:
        return self._entries[stage]

    # -- self.log -------------------------------------------------------------------------------
    def log(
        self,
        name: str,
        value: Any,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        prog_bar: bool = False,
        logger: bool = True,
        sync_dist: bool = False,
        reduce_fx: str | Callable = "mean",
        batch_size: int | None = None,
        add_dataloader_idx: bool = True,
    ) -> None:
        # what decides what a call does once its entry exists (logger, sync_dist and prog_bar only
        # matter when the entry is created)
        options = (on_step, on_epoch, reduce_fx, batch_size is None, add_dataloader_idx)
        if self._fast_ok and type(value) is torch.Tensor:
            fast = self._fast.get(name)
            if fast is not None and fast[0] == options and not value.ndim:
                # A training_step call like the one that created this entry: the same decisions
                # (below, in full) without taking them again -- this runs for every value, every step.
                entry = fast[1]
                tensor = value.detach() if value.requires_grad else value
                if fast[2]:  # on_step; no progress bar
                    entry.step_value = tensor
                    metrics = self.callback_metrics
                    for key in entry.step_keys:
                        metrics[key] = tensor
                if fast[3]:  # on_epoch, "mean" or "sum"
                    mean = fast[4]
                    weight = (batch_size if batch_size is not None else (self._batch_size or self._current_batch_size())) if mean else 1
                    acc = entry.epoch_sum
                    if acc is None or entry.pending == self._generation:
                        self._add_to_epoch(entry, tensor, weight)
                    else:
                        group = self._pending.get(weight)
                        if group is None:
                            group = self._pending[weight] = ([], [])
                        group[0].append(acc)
                        group[1].append(tensor)
                        entry.pending = self._generation
                    if mean:
                        entry.epoch_weight += weight
                    else:
                        entry.epoch_weight = 1.0
                return
        if self.discarding:
            return
        if add_dataloader_idx and "/dataloader_idx_" in name:
            raise ConfigurationError(
                f"self.log({name!r}) names a dataloader itself; with add_dataloader_idx=True (the default) the "
                "trainer appends '/dataloader_idx_N' when there are several dataloaders. Log the bare name, or "
                "pass add_dataloader_idx=False to keep yours."
            )
        in_step = not self.in_epoch_end
        if on_step is None or on_epoch is None:
            training_step = in_step and self.stage == "train"
            if on_step is None:
                on_step = training_step
            if on_epoch is None:
                on_epoch = not training_step
        if on_step and not in_step:
            raise ConfigurationError(
                f"self.log({name!r}, on_step=True) was called in an epoch-end hook, where there is no step. "
                "Use on_step=False (the default there)."
            )
        if reduce_fx.__class__ is not str or reduce_fx not in REDUCE_FX:
            reduce_fx = _normalise_reduce_fx(reduce_fx, name)
        entries = self._entries[self.stage]
        dl_idx = self.dataloader_idx
        if dl_idx is None:  # training, one dataloader, epoch-end hooks: the name as given
            entry = entries.get(name)
            if entry is None:
                entry = entries[name] = _Entry(name, on_step, on_epoch, prog_bar, logger, sync_dist, reduce_fx)
        else:
            suffix = f"/dataloader_idx_{dl_idx}" if add_dataloader_idx else ""
            entry = entries.get(name + suffix)
            if entry is None:
                entry = entries[name + suffix] = _Entry(name, on_step, on_epoch, prog_bar, logger, sync_dist, reduce_fx, suffix=suffix)
            entry.dataloaders.add(dl_idx)

        if type(value) is torch.Tensor or isinstance(value, torch.Tensor):  # the exact type first: isinstance is slow on Tensor
            if value.numel() != 1:
                raise ConfigurationError(
                    f"self.log({name!r}, value) needs a scalar; received a tensor of shape {tuple(value.shape)}."
                )
            tensor = value.detach() if value.requires_grad else value
            if tensor.dim():
                tensor = tensor.reshape(())
            if self._fast_ok and type(value) is torch.Tensor and not entry.prog_bar and reduce_fx in ("mean", "sum"):
                self._fast[name] = (options, entry, on_step, on_epoch, reduce_fx == "mean")
        elif is_metric_object(value):
            if entry.metric is not value:
                entry.metric, entry.is_metric = value, True
                entry.metric_path = self._metric_path_of(value)
            cache = getattr(value, "_forward_cache", None)
            if on_step and isinstance(cache, torch.Tensor):
                entry.step_value = cache.detach()
                self._publish_step(entry)
            return
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            tensor = torch.tensor(float(value))
        else:
            raise ConfigurationError(
                f"self.log({name!r}, value) accepts a number, a scalar tensor or a torchmetrics.Metric; "
                f"received {type(value).__name__}."
            )

        if on_step:
            entry.step_value = tensor
            if entry.prog_bar or self.stage != "train":
                self._publish_step(entry)
            else:  # _publish_step's training case, inlined: it runs for every logged value
                metrics = self.callback_metrics
                for key in entry.step_keys:
                    metrics[key] = tensor
        if on_epoch:
            if reduce_fx == "mean":
                weight = batch_size if batch_size is not None else (self._batch_size or self._current_batch_size())
                acc = entry.epoch_sum
                if acc is None or entry.pending == self._generation:
                    self._add_to_epoch(entry, tensor, weight)
                else:  # _add_to_epoch's usual case, inlined
                    group = self._pending.get(weight)
                    if group is None:
                        group = self._pending[weight] = ([], [])
                    group[0].append(acc)
                    group[1].append(tensor)
                    entry.pending = self._generation
                entry.epoch_weight += weight
            elif reduce_fx == "sum":
                self._add_to_epoch(entry, tensor, 1)
                entry.epoch_weight = 1.0
            else:
                if entry.pending == self._generation:
                    self.flush()
                if not tensor.is_floating_point():
                    tensor = tensor.float()
                op = torch.maximum if reduce_fx == "max" else torch.minimum
                entry.epoch_sum = tensor if entry.epoch_sum is None else op(entry.epoch_sum, tensor)
                entry.epoch_weight = 1.0

    def _add_to_epoch(self, entry: _Entry, tensor: torch.Tensor, weight: float) -> None:
        """Queue ``epoch_sum += weight * tensor`` for the next :meth:`flush` (one fused add per batch)."""
        acc = entry.epoch_sum
        if acc is None:
            with torch.inference_mode(False):  # updated in place later, whatever mode the first call ran in
                dtype = torch.promote_types(tensor.dtype, torch.float32)
                acc = entry.epoch_sum = torch.zeros((), dtype=dtype, device=tensor.device)
        elif entry.pending == self._generation:
            self.flush()  # logged twice before a flush: one fused add may not update a tensor twice
        group = self._pending.get(weight)
        if group is None:
            group = self._pending[weight] = ([], [])
        group[0].append(acc)
        group[1].append(tensor)
        entry.pending = self._generation

    @property
    def pending(self) -> bool:
        """Values logged since the last :meth:`flush` wait to be added to their epoch sums."""
        return bool(self._pending)

    def flush(self) -> None:
        """Add the values logged since the last flush into their epoch sums (the trainer calls this after
        every batch; reading an epoch value flushes first)."""
        pending = self._pending
        if not pending:
            return
        self._pending = {}
        self._generation += 1
        for weight, (accs, values) in pending.items():
            try:
                foreach_add_(accs, values, alpha=weight)
            except RuntimeError:  # e.g. a name logged as a number (CPU) and as a GPU tensor
                for acc, value in zip(accs, values):
                    acc.add_(value.to(acc.device), alpha=weight)

    def _current_batch_size(self) -> int:
        if self._batch_size is None:
            self._batch_size = extract_batch_size(self._batch)
        return self._batch_size

    def log_returned(self, name: str, output: Any) -> None:
        """Log a scalar returned by ``validation_step``/``test_step`` as ``name`` (``val_loss``/``test_loss``).

        Only while the step logs nothing of that name itself (per dataloader when there are several).
        """
        if not (isinstance(output, torch.Tensor) and output.numel() == 1):
            return
        suffix = f"/dataloader_idx_{self.dataloader_idx}" if self.dataloader_idx is not None else ""
        entries = self._entries[self.stage]
        entry = entries.get(name + suffix)
        if entry is None or entry.auto:
            self.log(name, output, on_step=False, on_epoch=True)
            entries[name + suffix].auto = True

    def _publish_step(self, entry: _Entry) -> None:
        if entry.prog_bar:
            self.progress_bar_metrics[entry.key] = entry.step_value
            self.progress_bar_epochs.pop(entry.key, None)  # a step value, not an earlier epoch's
        if self.stage != "train":
            return  # validation/test step values are not callback metrics (as in Lightning)
        metrics, value = self.callback_metrics, entry.step_value
        for key in entry.step_keys:  # name_step and name (on_epoch), or name
            metrics[key] = value

    # -- step flush -----------------------------------------------------------------------------
    def step_values_for_loggers(self, stage: str, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """Latest step values of ``stage`` as floats (one host sync for all of them)."""
        names, tensors = [], []
        for entry in self._entries[stage].values():
            if entry.on_step and entry.logger and entry.step_value is not None:
                value = entry.step_value
                if entry.sync_dist and self.num_processes > 1:
                    value = reduce(value.to(self.device))
                names.append((entry.name + "_step" if entry.on_epoch else entry.name) + entry.suffix)
                tensors.append(value)
        if not tensors:
            return {}
        device = tensors[0].device
        if all(t.device == device for t in tensors):  # usually: one stack (it promotes dtypes), one read-back
            values = torch.stack(tensors).to(torch.float64).tolist()
        else:
            values = torch.stack([t.to(self.device, torch.float64) for t in tensors]).tolist()
        return dict(zip(names, values))

    # -- epoch end ------------------------------------------------------------------------------
    def compute_epoch(self, stage: str, gather: Callable[[list], list] | None = None) -> dict[str, float]:
        """Reduce every epoch entry of ``stage`` across ranks; update ``callback_metrics``.

        Every rank must run the same collectives, including a rank that logged nothing (an
        uneven validation shard can leave a rank without a single batch). So ranks first
        exchange what they logged (name, reduction, options, where a torchmetrics object
        lives in the module) and each rank fills in what it lacks before reducing.

        Returns the epoch values, keyed as they are logged (``name`` or ``name_epoch``).
        """
        self.flush()
        entries = self._entries[stage]
        if gather is not None and self.num_processes > 1:
            for meta in gather([self._describe(e) for e in entries.values() if e.on_epoch]):
                key = meta["name"] + meta["suffix"]
                if key not in entries:
                    entries[key] = self._placeholder(meta)
                entries[key].dataloaders.update(meta["dataloaders"])
        names = sorted(n for n, e in entries.items() if e.on_epoch)
        results: dict[str, float] = {}
        plain = [entries[n] for n in names if not entries[n].is_metric]
        metric_entries = [entries[n] for n in names if entries[n].is_metric]

        groups: dict[str, list[_Entry]] = {"sum": [], "max": [], "min": []}
        for e in plain:
            groups["sum" if e.reduce_fx in ("mean", "sum") else e.reduce_fx].append(e)
        if groups["sum"]:
            values = [torch.zeros((), dtype=torch.float64) if e.epoch_sum is None else e.epoch_sum.double().cpu() for e in groups["sum"]]
            weights = torch.tensor([float(e.epoch_weight) for e in groups["sum"]], dtype=torch.float64)
            packed = self._all_reduce(torch.cat([torch.stack(values), weights]).to(self.device), "sum").tolist()
            n = len(groups["sum"])
            for e, total, weight in zip(groups["sum"], packed[:n], packed[n:]):
                if weight:
                    self._publish_epoch(e, total / weight if e.reduce_fx == "mean" else total, results)
        for op, neutral in (("max", -math.inf), ("min", math.inf)):
            if groups[op]:
                values = [torch.tensor(neutral, dtype=torch.float64) if e.epoch_sum is None else e.epoch_sum.double().cpu() for e in groups[op]]
                for e, value in zip(groups[op], self._all_reduce(torch.stack(values).to(self.device), op).tolist()):
                    if math.isfinite(value) or e.epoch_sum is not None:
                        self._publish_epoch(e, value, results)
        for e in metric_entries:
            if e.metric is None:
                continue
            value = float(e.metric.compute())  # torchmetrics syncs its states across ranks itself
            e.metric.reset()
            self._publish_epoch(e, value, results)
        return results

    def results_by_dataloader(self, stage: str, results: dict[str, float], num_dataloaders: int) -> list[dict[str, float]]:
        """``results`` split as Lightning's ``validate``/``test`` return them: one dict per dataloader.

        Dataloader ``i``'s dict holds what was logged while it ran (``name/dataloader_idx_i``, and
        names logged with ``add_dataloader_idx=False``) plus what epoch-end hooks logged.
        """
        if num_dataloaders <= 1:
            return [dict(results)]
        out: list[dict[str, float]] = [{} for _ in range(num_dataloaders)]
        for entry in self._entries[stage].values():
            for key in self._result_keys(entry):
                if key not in results:
                    continue
                for i in sorted(entry.dataloaders) if entry.dataloaders else range(num_dataloaders):
                    out[i][key] = results[key]
        return out

    @staticmethod
    def _result_keys(entry: _Entry) -> list[str]:
        return [entry.name + "_epoch" + entry.suffix if entry.on_step else entry.key]

    def _describe(self, entry: _Entry) -> dict[str, Any]:
        return {
            "name": entry.name, "reduce_fx": entry.reduce_fx, "on_step": entry.on_step, "prog_bar": entry.prog_bar,
            "logger": entry.logger, "is_metric": entry.is_metric, "metric_path": entry.metric_path,
            "suffix": entry.suffix, "dataloaders": sorted(entry.dataloaders),
        }

    def _placeholder(self, meta: dict[str, Any]) -> _Entry:
        """The entry another rank logged and this one did not (it contributes nothing)."""
        entry = _Entry(
            meta["name"], meta["on_step"], True, meta["prog_bar"], meta["logger"], False, meta["reduce_fx"], suffix=meta["suffix"]
        )
        entry.is_metric = meta["is_metric"]
        entry.metric_path = meta["metric_path"]
        if entry.is_metric:
            entry.metric = self._find_metric(meta["metric_path"])
            if entry.metric is None:
                raise ConfigurationError(
                    f"Metric {meta['name']!r} is a torchmetrics object another rank logged, but this rank cannot find "
                    "it: keep torchmetrics objects as attributes of the module so every rank can sync them."
                )
        return entry

    def _metric_path_of(self, metric: Any) -> str | None:
        if self.module is None:
            return None
        for path, sub in self.module.named_modules():
            if sub is metric:
                return path
        return None

    def _find_metric(self, path: str | None) -> Any:
        if path is None or self.module is None:
            return None
        try:
            return self.module.get_submodule(path)
        except AttributeError:
            return None

    def _publish_epoch(self, entry: _Entry, value: float, results: dict[str, float]) -> None:
        tensor = torch.tensor(value)
        self.callback_metrics[entry.key] = tensor
        if entry.on_step:
            self.callback_metrics[entry.name + "_epoch" + entry.suffix] = tensor
        if entry.prog_bar:
            self.progress_bar_metrics[entry.key] = tensor
            self.progress_bar_epochs[entry.key] = self.epoch
        if entry.logger:
            results[self._result_keys(entry)[0]] = value

    def _all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        if self.num_processes == 1:
            return tensor
        return all_reduce_(tensor, op)


def _normalise_reduce_fx(reduce_fx: Any, name: str) -> str:
    if callable(reduce_fx):
        for candidate, fns in (("mean", (torch.mean,)), ("sum", (torch.sum, sum)), ("max", (torch.max, max)), ("min", (torch.min, min))):
            if reduce_fx in fns:
                return candidate
    if reduce_fx in REDUCE_FX:
        return reduce_fx
    raise ConfigurationError(
        f"self.log({name!r}, reduce_fx={reduce_fx!r}) is not supported. Allowed: {list(REDUCE_FX)} "
        "(or torch.mean/sum/max/min)."
    )

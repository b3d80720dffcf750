"""``self.log`` aggregation: step values, sample-weighted epoch means, cross-rank reduction.

Values stay on their device as tensors during the epoch (no host sync per ``self.log`` call).
At the end of an epoch every rank packs its weighted sums and weights into one vector and
reduces it with a single collective, so an epoch value is the sample-weighted mean over the
whole data set across ranks: the same number on every rank, which is what makes plateau,
checkpoint and early-stopping decisions rank-consistent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import ConfigurationError

REDUCE_FX = ("mean", "sum", "max", "min")


def is_metric_object(value: Any) -> bool:
    """Duck-typed ``torchmetrics.Metric`` check (keeps torchmetrics out of the import path)."""
    return hasattr(value, "compute") and hasattr(value, "update") and hasattr(value, "reset") and isinstance(
        value, torch.nn.Module
    )


def extract_batch_size(batch: Any) -> int:
    """Size of the first dimension of the first tensor found in ``batch`` (1 if none)."""
    if isinstance(batch, torch.Tensor):
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


@dataclass
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


class MetricCollector:
    """Collects ``self.log`` calls for one stage ("train", "validate" or "test") at a time.

    Args:
        device: where cross-rank reductions happen (the accelerator's device).
        num_processes: world size; 1 skips every collective.
    """

    def __init__(self, device: torch.device, num_processes: int = 1) -> None:
        self.device = device
        self.num_processes = num_processes
        self.stage = "train"
        self.in_epoch_end = False
        self._entries: dict[str, dict[str, _Entry]] = {"train": {}, "validate": {}, "test": {}, "sanity": {}}
        self._batch: Any = None
        self._batch_size: int | None = None
        self.callback_metrics: dict[str, torch.Tensor] = {}
        self.progress_bar_metrics: dict[str, Any] = {}
        self.logged_metrics: dict[str, float] = {}

    # -- context set by the trainer ---------------------------------------------------------
    def set_batch(self, batch: Any) -> None:
        self._batch = batch
        self._batch_size = None

    def reset_stage(self, stage: str) -> None:
        self._entries[stage] = {}

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
    ) -> None:
        in_step = not self.in_epoch_end
        if on_step is None:
            on_step = in_step and self.stage == "train"
        if on_epoch is None:
            on_epoch = not (in_step and self.stage == "train")
        if on_step and not in_step:
            raise ConfigurationError(
                f"self.log({name!r}, on_step=True) was called in an epoch-end hook, where there is no step. "
                "Use on_step=False (the default there)."
            )
        reduce_fx = _normalise_reduce_fx(reduce_fx, name)
        entries = self._entries[self.stage]
        entry = entries.get(name)
        if entry is None:
            entry = entries[name] = _Entry(name, on_step, on_epoch, prog_bar, logger, sync_dist, reduce_fx)

        if is_metric_object(value):
            entry.metric = value
            cache = getattr(value, "_forward_cache", None)
            if on_step and isinstance(cache, torch.Tensor):
                entry.step_value = cache.detach()
                self._publish_step(entry)
            return

        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ConfigurationError(
                    f"self.log({name!r}, value) needs a scalar; received a tensor of shape {tuple(value.shape)}."
                )
            tensor = value.detach().reshape(())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            tensor = torch.tensor(float(value))
        else:
            raise ConfigurationError(
                f"self.log({name!r}, value) accepts a number, a scalar tensor or a torchmetrics.Metric; "
                f"received {type(value).__name__}."
            )

        if on_step:
            entry.step_value = tensor
            self._publish_step(entry)
        if on_epoch:
            if not tensor.is_floating_point():
                tensor = tensor.float()
            if reduce_fx == "mean":
                weight = batch_size if batch_size is not None else self._current_batch_size()
                contribution = tensor * weight
                entry.epoch_sum = contribution if entry.epoch_sum is None else entry.epoch_sum + contribution
                entry.epoch_weight += weight
            elif reduce_fx == "sum":
                entry.epoch_sum = tensor if entry.epoch_sum is None else entry.epoch_sum + tensor
                entry.epoch_weight = 1.0
            else:
                op = torch.maximum if reduce_fx == "max" else torch.minimum
                entry.epoch_sum = tensor if entry.epoch_sum is None else op(entry.epoch_sum, tensor)
                entry.epoch_weight = 1.0

    def _current_batch_size(self) -> int:
        if self._batch_size is None:
            self._batch_size = extract_batch_size(self._batch)
        return self._batch_size

    def _publish_step(self, entry: _Entry) -> None:
        key = entry.name + "_step" if entry.on_epoch else entry.name
        self.callback_metrics[key] = entry.step_value
        if entry.on_epoch:
            self.callback_metrics[entry.name] = entry.step_value
        if entry.prog_bar:
            self.progress_bar_metrics[entry.name] = entry.step_value

    # -- step flush -----------------------------------------------------------------------------
    def step_values_for_loggers(self, stage: str, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """Latest step values of ``stage`` as floats (one host sync for all of them)."""
        names, tensors = [], []
        for entry in self._entries[stage].values():
            if entry.on_step and entry.logger and entry.step_value is not None:
                value = entry.step_value
                if entry.sync_dist and self.num_processes > 1:
                    value = reduce(value.to(self.device))
                names.append(entry.name + "_step" if entry.on_epoch else entry.name)
                tensors.append(value.to(self.device, torch.float64))
        if not tensors:
            return {}
        values = torch.stack(tensors).tolist()
        return dict(zip(names, values))

    # -- epoch end ------------------------------------------------------------------------------
    def compute_epoch(self, stage: str, gather_names: Callable[[list[str]], list[str]] | None = None) -> dict[str, float]:
        """Reduce every epoch entry of ``stage`` across ranks; update ``callback_metrics``.

        Returns the epoch values, keyed as they are logged (``name`` or ``name_epoch``).
        """
        entries = self._entries[stage]
        names = sorted(n for n, e in entries.items() if e.on_epoch)
        if gather_names is not None and self.num_processes > 1:
            # Every rank must reduce the same vector: take the union of names logged anywhere.
            names = gather_names(names)
        results: dict[str, float] = {}

        plain = [n for n in names if entries.get(n) is None or entries[n].metric is None]
        metric_names = [n for n in names if entries.get(n) is not None and entries[n].metric is not None]

        sums, weights, maxes, mins = [], [], [], []
        for n in plain:
            e = entries.get(n)
            fx = e.reduce_fx if e is not None else "mean"
            empty = e is None or e.epoch_sum is None
            if fx in ("mean", "sum"):
                sums.append(torch.zeros((), dtype=torch.float64) if empty else e.epoch_sum.double().cpu())
                weights.append(0.0 if empty else float(e.epoch_weight))
            elif fx == "max":
                maxes.append(torch.tensor(-math.inf, dtype=torch.float64) if empty else e.epoch_sum.double().cpu())
            else:
                mins.append(torch.tensor(math.inf, dtype=torch.float64) if empty else e.epoch_sum.double().cpu())

        if sums:
            packed = torch.cat([torch.stack(sums), torch.tensor(weights, dtype=torch.float64)]).to(self.device)
            packed = self._all_reduce(packed, "sum")
            sum_values, weight_values = packed[: len(sums)].tolist(), packed[len(sums) :].tolist()
        if maxes:
            max_values = self._all_reduce(torch.stack(maxes).to(self.device), "max").tolist()
        if mins:
            min_values = self._all_reduce(torch.stack(mins).to(self.device), "min").tolist()

        i_sum = i_max = i_min = 0
        for n in plain:
            e = entries.get(n)
            fx = e.reduce_fx if e is not None else "mean"
            if fx in ("mean", "sum"):
                total, weight = sum_values[i_sum], weight_values[i_sum]
                i_sum += 1
                if weight == 0:
                    continue
                value = total / weight if fx == "mean" else total
            elif fx == "max":
                value = max_values[i_max]
                i_max += 1
            else:
                value = min_values[i_min]
                i_min += 1
            if e is not None:
                self._publish_epoch(e, value, results)

        for n in metric_names:
            e = entries[n]
            value = float(e.metric.compute())  # torchmetrics syncs its states across ranks itself
            e.metric.reset()
            self._publish_epoch(e, value, results)
        return results

    def _publish_epoch(self, entry: _Entry, value: float, results: dict[str, float]) -> None:
        tensor = torch.tensor(value)
        self.callback_metrics[entry.name] = tensor
        if entry.on_step:
            self.callback_metrics[entry.name + "_epoch"] = tensor
        if entry.prog_bar:
            self.progress_bar_metrics[entry.name] = tensor
        if entry.logger:
            results[entry.name + "_epoch" if entry.on_step else entry.name] = value

    def _all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        if self.num_processes == 1:
            return tensor
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=ops[op])
        return tensor


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

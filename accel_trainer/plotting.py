"""PNG plots of a finished (or running) run, from the CSV tracker's ``metrics.csv``.

``accel-trainer plot RUN_DIR`` calls :func:`plot_run`. matplotlib is imported lazily (with
the non-interactive Agg backend), so importing accel_trainer never needs it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from typing import Any

METRICS_FILE = "metrics.csv"
#: LearningRateMonitor's record of its columns (a named scheduler's column is just its name).
LR_COLUMNS_FILE = "lr_columns.json"
# Columns of LearningRateMonitor without that record (lr-Adam, lr-Adam-1, lr-Adam/pg2, ...) and
# its momentum / weight-decay twins (lr-Adam-momentum, lr-Adam/pg1-weight_decay, ...).
_LR_COLUMN = re.compile(r"^(lr|lr-.*|lr/.*)$")
_MOMENTUM_COLUMN = re.compile(r"^momentum-.*$|.*-momentum$|.*-weight_decay$")
_STAGE_PREFIX = re.compile(r"^(train|val|valid|validation|test)[_/]")
_REDUCTION_SUFFIX = re.compile(r"[_/](step|epoch)$")
_NOT_METRICS = ("step", "epoch")
_STAGE_ORDER = {"train": 0, "val": 1, "valid": 1, "validation": 1, "test": 2}


class MetricsNotFoundError(FileNotFoundError):
    """The run directory has no ``metrics.csv``."""


class EmptyMetricsError(ValueError):
    """``metrics.csv`` exists but holds nothing to plot."""


def read_metrics(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """The series of a ``metrics.csv``: ``{column: [(step, value), ...]}`` (empty cells skipped).

    Raises:
        MetricsNotFoundError: the file does not exist.
        EmptyMetricsError: it has no ``step`` column or no numeric value.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MetricsNotFoundError(
            f"No {METRICS_FILE} at {path}. It is written by the CSV tracker, i.e. Trainer(log_with=None) (the "
            "default) or a log_with list that includes 'csv'; pass the run's directory (the Trainer's "
            "default_root_dir / trainer.log_dir), e.g. `accel-trainer plot runs/digits_gan`."
        )
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        step = _number(row.get("step"))
        if step is None:
            continue
        for name, cell in row.items():
            if name is None or name == "step":
                continue
            value = _number(cell)
            if value is not None:
                series.setdefault(name, []).append((int(step), value))
    if not any(name not in _NOT_METRICS for name in series):
        raise EmptyMetricsError(
            f"{path} holds no logged values yet ({len(rows)} row(s)). Metrics reach it every "
            "Trainer(log_every_n_steps=...) steps and at the end of each epoch: train a little longer, or log "
            "with self.log(...) in training_step / validation_step."
        )
    return series


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[str]:
    """Write PNGs of a run's logged metrics and learning rates; returns their paths.

    * ``metrics.png``: one panel per metric family (``train_loss``, ``train_loss_epoch`` and
      ``val_loss`` share the ``loss`` panel), value vs global step, with epoch boundaries.
    * ``lr.png``: every optimizer's learning rate vs global step (``LearningRateMonitor``
      columns: those it recorded in ``lr_columns.json``, e.g. a named scheduler's ``my_lr``,
      and any ``lr-*`` column), written when the run logged any.

    Args:
        run_dir: the run directory holding ``metrics.csv`` (``trainer.log_dir``).
        out_dir: where to write (default: ``run_dir/plots``).

    Raises:
        MetricsNotFoundError: no ``metrics.csv`` in ``run_dir`` (a ``FileNotFoundError``).
        EmptyMetricsError: nothing logged in it yet (a ``ValueError``).

    Example:
        >>> plot_run("runs/digits_classifier")                     # doctest: +SKIP
        ['runs/digits_classifier/plots/metrics.png', 'runs/digits_classifier/plots/lr.png']
    """
    run_dir = os.fspath(run_dir)
    series = read_metrics(os.path.join(run_dir, METRICS_FILE))
    out_dir = os.fspath(out_dir) if out_dir is not None else os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    plt = _pyplot()
    title = os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
    epoch_starts = _epoch_starts(series.get("epoch", []))
    written = []

    recorded_lr, recorded_other = _recorded_lr_columns(run_dir)

    def is_lr_related(name: str) -> bool:
        return name in recorded_lr or name in recorded_other or _is_lr(name)

    families = metric_families([n for n in series if n not in _NOT_METRICS and not is_lr_related(n)])
    if families:
        path = os.path.join(out_dir, "metrics.png")
        _plot_families(plt, series, families, epoch_starts, f"{title}: logged metrics", path)
        written.append(path)
    lr_names = sorted(lr_columns(series, run_dir))
    if lr_names:
        path = os.path.join(out_dir, "lr.png")
        _plot_lrs(plt, series, lr_names, epoch_starts, f"{title}: learning rate per optimizer", path)
        written.append(path)
    return written


def lr_columns(names: Any, run_dir: str | os.PathLike | None = None) -> list[str]:
    """The learning-rate columns among ``names``, in order.

    ``LearningRateMonitor`` records its columns in ``{run_dir}/lr_columns.json`` (a named
    scheduler's column has no ``lr`` in its name, and ``lr-Adam-momentum`` is not a learning
    rate); without that record (an older run, or ``run_dir`` not given) the ``lr``/``lr-*``/
    ``lr/*`` columns count, momentum and weight-decay ones excepted. Tools that compare
    learning rates find them through this rather than by exact names.
    """
    recorded_lr, recorded_other = _recorded_lr_columns(os.fspath(run_dir)) if run_dir is not None else (set(), set())

    def is_lr(name: str) -> bool:
        if name in recorded_lr:
            return True
        return name not in recorded_other and bool(_LR_COLUMN.match(name)) and not _MOMENTUM_COLUMN.match(name)

    return [n for n in names if n is not None and is_lr(n)]


def metric_families(names: list[str]) -> dict[str, list[str]]:
    """Group metric names into panels: ``train_loss``/``val_loss``/``train_loss_epoch`` -> ``loss``."""
    families: dict[str, list[str]] = {}
    for name in names:
        families.setdefault(_family(name), []).append(name)
    for members in families.values():
        members.sort(key=lambda n: (_STAGE_ORDER.get(_stage(n), 3), n))
    return dict(sorted(families.items(), key=lambda kv: (kv[0] != "loss", kv[0])))


def _family(name: str) -> str:
    base = _REDUCTION_SUFFIX.sub("", _STAGE_PREFIX.sub("", name))
    return base or name


def _stage(name: str) -> str:
    m = _STAGE_PREFIX.match(name)
    return m.group(1) if m else ""


def _is_lr(name: str) -> bool:
    return bool(_LR_COLUMN.match(name) or _MOMENTUM_COLUMN.match(name))


def _recorded_lr_columns(run_dir: str) -> tuple[set[str], set[str]]:
    """The learning-rate columns, and their momentum / weight-decay twins, that LearningRateMonitor recorded."""
    try:
        with open(os.path.join(run_dir, LR_COLUMNS_FILE)) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return set(), set()
    if not isinstance(recorded, dict):
        return set(), set()
    lrs = {str(n) for n in recorded.get("lr", [])}
    others = {str(n) for kind in ("momentum", "weight_decay") for n in recorded.get(kind, [])}
    return lrs, others


def _number(cell: Any) -> float | None:
    if cell is None or cell == "":
        return None
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _epoch_starts(epoch_series: list[tuple[int, float]]) -> list[tuple[int, int]]:
    """``(global step, epoch)`` where each epoch after the first starts.

    Epoch-end values (validation, ``*_epoch``) are logged at the step where the next epoch
    starts, with the finished epoch's number: the last step seen with epoch ``e - 1`` is
    that boundary (exact whenever anything is logged at epoch end).
    """
    last_step: dict[int, int] = {}
    for step, epoch in epoch_series:
        last_step[int(epoch)] = max(step, last_step.get(int(epoch), step))
    epochs = sorted(last_step)
    return [(last_step[prev], e) for prev, e in zip(epochs, epochs[1:])]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - matplotlib is a dependency
        raise ImportError("Plotting needs matplotlib: `pip install matplotlib`.") from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _draw_epochs(ax: Any, epoch_starts: list[tuple[int, int]]) -> None:
    if not epoch_starts or len(epoch_starts) > 60:  # too many lines would hide the curves
        return
    for i, (step, _) in enumerate(epoch_starts):
        ax.axvline(step, color="0.8", linewidth=0.8, linestyle=":", zorder=0, label="epoch start" if i == 0 else None)


def _plot_families(
    plt: Any, series: dict, families: dict[str, list[str]], epoch_starts: list, title: str, path: str
) -> None:
    n = len(families)
    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False)
    for ax, (family, names) in zip(axes.flat, families.items()):
        for name in names:
            points = series[name]
            steps, values = zip(*points)
            sparse = len(points) <= 60  # epoch-level / validation values: show each point
            ax.plot(steps, values, marker="o" if sparse else None, markersize=3, linewidth=1.4, label=name)
        _draw_epochs(ax, epoch_starts)
        ax.set_title(family)
        ax.set_xlabel("global step")
        ax.set_ylabel(family)
        if family == "loss" and all(v > 0 for name in names for _, v in series[name]):
            lows = [v for name in names for _, v in series[name]]
            if max(lows) / min(lows) > 100:
                ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_lrs(plt: Any, series: dict, names: list[str], epoch_starts: list, title: str, path: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.2))
    values_all: list[float] = []
    for name in names:
        steps, values = zip(*series[name])
        values_all.extend(values)
        ax.plot(
            steps, values, drawstyle="steps-post", marker="." if len(steps) <= 60 else None, linewidth=1.6, label=name
        )
    _draw_epochs(ax, epoch_starts)
    positive = [v for v in values_all if v > 0]
    if positive and len(positive) == len(values_all) and max(positive) / min(positive) > 50:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("global step")
    ax.set_ylabel("learning rate")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

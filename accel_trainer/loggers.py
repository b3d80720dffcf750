"""Experiment trackers: a CSV file by default, or Accelerate's W&B / TensorBoard trackers by name.

``Trainer(log_with=...)`` takes ``None`` (CSV), ``"csv"``, ``"wandb"``, ``"tensorboard"``, an
``accelerate.tracking.GeneralTracker`` instance, or a list of these. Trackers exist on the
main process only (the trainer calls :func:`build_trackers` there); every other rank has an
empty list, so logging calls cost nothing there.

What each tracker writes, under the trainer's ``log_dir``:

* ``csv``: ``metrics.csv`` (``step``, one column per metric, ``epoch``), ``hparams.json``,
  and ``images.csv`` (``step``, ``key``, ``path``) for :func:`log_image`.
* ``wandb``: a W&B run whose ``dir`` is ``log_dir`` (files under ``log_dir/wandb/``), with the
  module's hyperparameters as the run config and metrics under exactly the names given to
  ``self.log``. Without credentials (no ``WANDB_API_KEY``, no ``wandb login``) and with
  ``WANDB_MODE`` unset, the run is logged offline instead of prompting for a key.
* ``tensorboard``: event files under ``log_dir/{project_name}/``.
"""

from __future__ import annotations

import csv
import json
import logging
import netrc
import os
import re
from typing import Any
from urllib.parse import urlsplit

from accelerate.tracking import GeneralTracker, TensorBoardTracker, WandBTracker

from .errors import ConfigurationError

KNOWN_TRACKERS = ("csv", "wandb", "tensorboard")

logger = logging.getLogger("accel_trainer")

_offline_notice_shown = False


class CSVTracker(GeneralTracker):
    """Writes ``metrics.csv`` (one row per logging call) and ``hparams.json`` in ``logging_dir``.

    New metric names add columns; the file is rewritten with the wider header when that
    happens, so it stays loadable by any CSV reader (as Lightning's ``CSVLogger`` does).
    Appends to an existing file, so a resumed run continues the same table; the trainer
    first cuts it back to the rows logged before the checkpoint it resumes from
    (:meth:`truncate`), so no step appears twice. Images sent with :func:`log_image` are
    listed in ``images.csv`` (arrays are first saved as PNGs under ``images/``).

    Attributes:
        rows: data rows in ``metrics.csv`` (those found at ``start`` plus those logged since).
    """

    name = "csv"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike) -> None:
        super().__init__()
        self.run_name = run_name
        self.logging_dir = str(logging_dir)
        self.metrics_path = os.path.join(self.logging_dir, "metrics.csv")
        self.images_path = os.path.join(self.logging_dir, "images.csv")
        self._columns: list[str] = []
        self.rows = 0

    @property
    def tracker(self) -> CSVTracker:
        return self

    def start(self) -> None:
        os.makedirs(self.logging_dir, exist_ok=True)
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path, newline="") as f:
                reader = csv.reader(f)
                self._columns = next(reader, [])
                self.rows = sum(1 for _ in reader)

    def truncate(self, keep_rows: int | None, max_step: int) -> int:
        """Drop the rows logged after a checkpoint; returns how many were dropped.

        Args:
            keep_rows: the number of rows the table had when the checkpoint was written
                (rows are appended in order, so the first ``keep_rows`` are exactly those
                logged before it); None when unknown.
            max_step: the checkpoint's ``global_step``: with ``keep_rows`` unknown, rows at a
                later step are dropped (rows at that very step are kept).
        """
        if not os.path.exists(self.metrics_path):
            return 0
        with open(self.metrics_path, newline="") as f:
            rows = list(csv.DictReader(f))
        if keep_rows is not None and 0 <= keep_rows <= len(rows):
            kept = rows[:keep_rows]
        else:
            kept = [r for r in rows if not _after_step(r.get("step"), max_step)]
        if len(kept) == len(rows):
            return 0
        self._write(self._columns, kept)
        self.rows = len(kept)
        return len(rows) - len(kept)

    def store_init_configuration(self, values: dict, merge: bool = False) -> None:
        """Write ``hparams.json`` (``merge=True`` adds to the keys already there)."""
        os.makedirs(self.logging_dir, exist_ok=True)
        path = os.path.join(self.logging_dir, "hparams.json")
        if merge and os.path.exists(path):
            with open(path) as f:
                values = {**json.load(f), **values}
        with open(path, "w") as f:
            json.dump(values, f, indent=2, default=repr)

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        row = {"step": step, **values}
        known = set(self._columns)
        new = [k for k in row if k not in known]
        if new:
            self._rewrite_with(self._columns + new)
        with open(self.metrics_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._columns).writerow(row)
        self.rows += 1

    def log_image(self, key: str, image: Any, step: int | None = None) -> str:
        """Record ``image`` (a PNG path, or an array saved as one) in ``images.csv``; returns its path."""
        if isinstance(image, (str, os.PathLike)):
            path = os.fspath(image)
        else:
            folder = os.path.join(self.logging_dir, "images", _safe_name(key))
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"step_{step if step is not None else 0:07d}.png")
            _save_png(image, path)
        new_file = not os.path.exists(self.images_path)
        with open(self.images_path, "a", newline="") as f:
            writer = csv.writer(f)
            if new_file:
                writer.writerow(["step", "key", "path"])
            writer.writerow([step, key, path])
        return path

    def _rewrite_with(self, columns: list[str]) -> None:
        rows: list[dict] = []
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path, newline="") as f:
                rows = list(csv.DictReader(f))
        self._write(columns, rows)

    def _write(self, columns: list[str], rows: list[dict]) -> None:
        tmp = self.metrics_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_path)
        self._columns = columns

    def finish(self) -> None:
        pass


def _after_step(cell: Any, step: int) -> bool:
    try:
        return int(float(cell)) > step
    except (TypeError, ValueError):
        return False


class WandbTracker(WandBTracker):
    """Accelerate's ``WandBTracker`` with a run directory, offline fallback and sweep support.

    * The run's ``dir`` is ``logging_dir`` (W&B writes under ``logging_dir/wandb/``).
    * With no W&B credentials and ``WANDB_MODE`` unset, the run goes offline instead of
      prompting for an API key (which would hang a batch job); a one-time message says how
      to upload it later (``wandb sync``).
    * If a run is already active (``wandb.init`` called by the user, or ``wandb.agent`` with a
      function), it is used as is and left open at the end of ``fit``.
    * Under ``wandb agent`` ``wandb.init`` joins the sweep's run. The sweep locks the swept
      config keys; the module's hyperparameters are added around them (a swept key is never
      overwritten, and a mismatch between the swept value and the module's is reported).

    Args:
        run_name: the W&B project (ignored by W&B inside a sweep, which has its own).
        logging_dir: the run's directory.
        **kwargs: passed to ``wandb.init`` (``entity``, ``name``, ``tags``, ``mode``, ...).
    """

    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(run_name, **kwargs)
        self.logging_dir = os.fspath(logging_dir)
        self._owns_run = True

    def start(self) -> None:
        import wandb

        if wandb.run is not None:
            self.run, self._owns_run = wandb.run, False
            return
        os.makedirs(self.logging_dir, exist_ok=True)
        kwargs = dict(self.init_kwargs)
        kwargs.setdefault("dir", self.logging_dir)
        if "mode" not in kwargs and not os.environ.get("WANDB_MODE") and not wandb_credentials_available():
            kwargs["mode"] = "offline"
            _offline_notice(self.logging_dir)
        if not os.environ.get("WANDB_SWEEP_ID"):  # inside a sweep, W&B picks the sweep's project
            kwargs.setdefault("project", self.run_name)
        self.run = wandb.init(**kwargs)

    def store_init_configuration(self, values: dict) -> None:
        config = self.run.config
        locked = set(getattr(config, "_locked", {}) or {})
        # Swept keys may be top-level names (lr) or dotted paths into a nested config (module.init_args.lr).
        ours = {**_flat_scalars(values), **values}
        for key in sorted(locked & set(ours)):
            swept = config.get(key)
            if _comparable(swept) and _comparable(ours[key]) and not _same_value(swept, ours[key]):
                logger.warning(
                    "W&B sweep sets %s=%r but the module's hyperparameter is %r: the swept value did not reach "
                    "the module. Pass sweep parameters to the program as command-line overrides "
                    "(e.g. --module.init_args.%s=...), which is what `wandb agent` does with ${args}.",
                    key,
                    swept,
                    ours[key],
                    key.rsplit(".", 1)[-1],
                )
        # Swept keys are locked by the sweep: skip them rather than have W&B warn and ignore them.
        config.update({k: v for k, v in values.items() if k not in locked}, allow_val_change=True)

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        # Metric names go through untouched, so a sweep's ``metric.name: val_acc`` finds them.
        self.run.log(values, step=step, **kwargs)

    def log_image(self, key: str, image: Any, step: int | None = None, caption: str | None = None) -> None:
        import wandb

        media = wandb.Image(
            os.fspath(image) if isinstance(image, (str, os.PathLike)) else _to_uint8(image), caption=caption
        )
        self.run.log({key: media}, step=step)

    def finish(self) -> None:
        if self._owns_run:
            self.run.finish()


def wandb_credentials_available() -> bool:
    """Whether W&B would find an API key without prompting (environment or ``~/.netrc``)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    try:
        from wandb.sdk.lib.wbauth import read_netrc_auth  # W&B's own lookup (NETRC, ~/.netrc, _netrc)

        return bool(read_netrc_auth(host=host))
    except Exception:  # an internal API that may move, or a malformed key: fall back to a plain lookup
        pass
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(urlsplit(host).netloc) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _offline_notice(logging_dir: str) -> None:
    global _offline_notice_shown
    if _offline_notice_shown:
        return
    _offline_notice_shown = True
    logger.warning(
        "W&B: no credentials found (WANDB_API_KEY, or `wandb login`), so this run is logged offline under "
        "%s. Upload it later with `wandb sync %s`. Set WANDB_MODE=offline to silence this, or "
        "WANDB_MODE=disabled to turn W&B off.",
        os.path.join(logging_dir, "wandb"),
        os.path.join(logging_dir, "wandb", "offline-run-*"),
    )


def normalise_log_with(log_with: Any) -> list[Any]:
    """``None`` -> ``["csv"]``; a name or tracker -> a one-item list; validated."""
    if log_with is None:
        return ["csv"]
    items = list(log_with) if isinstance(log_with, (list, tuple)) else [log_with]
    for item in items:
        if isinstance(item, GeneralTracker):
            continue
        if not isinstance(item, str) or item not in KNOWN_TRACKERS:
            raise ConfigurationError(
                f"Trainer(log_with={log_with!r}): {item!r} is not a known tracker. Allowed: None (CSV), "
                f"{list(KNOWN_TRACKERS)}, a list of these, or an accelerate GeneralTracker instance."
            )
    return items


def build_trackers(log_with: list[Any], project_name: str, log_dir: str, config: dict) -> list[GeneralTracker]:
    """Instantiate and start the trackers, and log ``config`` (call on the main process only).

    Args:
        log_with: tracker names (``"csv"``, ``"wandb"``, ``"tensorboard"``) or ``GeneralTracker`` instances.
        project_name: the W&B project / TensorBoard sub-directory.
        log_dir: the run directory.
        config: the hyperparameters (nested dicts are flattened to dotted keys where a tracker needs it).
    """
    trackers: list[GeneralTracker] = []
    for item in log_with:
        if isinstance(item, GeneralTracker):
            tracker = item
        elif item == "csv":
            tracker = CSVTracker(project_name, log_dir)
        elif item == "wandb":
            tracker = WandbTracker(project_name, log_dir)
        elif item == "tensorboard":
            _require_tensorboard()
            tracker = TensorBoardTracker(project_name, log_dir)
        else:  # normalise_log_with already refused anything else
            raise ConfigurationError(f"Unknown tracker {item!r}; allowed: {list(KNOWN_TRACKERS)}.")
        tracker.start()
        trackers.append(tracker)
    _store_config(trackers, config, merge=False)
    return trackers


def log_hyperparams(trackers: Any, config: dict) -> None:
    """Add ``config`` (e.g. the resolved CLI config) to every tracker's hyperparameters.

    Call it while the trackers run (from ``on_fit_start`` on, e.g. in a callback): W&B gets
    the nested dict as run config (swept keys untouched), TensorBoard flat dotted keys,
    and the CSV tracker merges it into ``hparams.json``.

    Args:
        trackers: a :class:`~accel_trainer.Trainer` (its trackers are used) or a list of trackers.
        config: a possibly nested dict.
    """
    _store_config(_trackers_of(trackers), config, merge=True)


def _store_config(trackers: list, config: dict, merge: bool) -> None:
    for tracker in trackers:
        if isinstance(tracker, WandBTracker):
            tracker.store_init_configuration(_jsonable(config))
        elif isinstance(tracker, CSVTracker):
            tracker.store_init_configuration(config, merge=merge)
        else:  # TensorBoard's hparams accept flat scalars only
            tracker.store_init_configuration(_flat_scalars(config))


def log_image(trainer: Any, key: str, image: Any, step: int | None = None) -> None:
    """Send an image to every tracker of ``trainer`` (a no-op on non-main ranks, which have none).

    W&B gets a ``wandb.Image``, TensorBoard an ``add_image``, and the CSV tracker records the
    path in ``images.csv`` (an array is saved as a PNG under ``log_dir/images/`` first).

    Args:
        trainer: the :class:`~accel_trainer.Trainer` (or a list of trackers).
        key: the image's name, e.g. ``"samples"``.
        image: a path to a PNG file, or an ``H x W`` / ``H x W x C`` (C in 1, 3, 4) array or
            tensor: ``uint8``, or floats in [0, 1].
        step: the step to log at (default: ``trainer.global_step``).

    Example:
        >>> def on_train_epoch_end(self):                          # doctest: +SKIP
        ...     path = save_digit_grid(self.generator, f"{self.trainer.log_dir}/grid_{self.current_epoch}.png")
        ...     log_image(self.trainer, "samples", path)
    """
    trackers = _trackers_of(trainer)
    if not trackers:
        return
    if step is None:
        step = int(getattr(trainer, "global_step", 0) or 0)
    for tracker in trackers:
        if isinstance(tracker, (CSVTracker, WandbTracker)):
            tracker.log_image(key, image, step=step)
        elif isinstance(tracker, WandBTracker):
            import wandb

            tracker.log({key: _wandb_image(wandb, image)}, step=step)
        elif isinstance(tracker, TensorBoardTracker):
            array = _load_image(image)
            tracker.writer.add_image(key, array, global_step=step, dataformats="HW" if array.ndim == 2 else "HWC")
            tracker.writer.flush()
        elif callable(getattr(tracker, "log_images", None)):
            tracker.log_images({key: [_load_image(image)]}, step=step)


def _trackers_of(obj: Any) -> list:
    if isinstance(obj, (list, tuple)):
        return list(obj)
    return list(getattr(obj, "_trackers", None) or [])


def _wandb_image(wandb: Any, image: Any) -> Any:
    return wandb.Image(os.fspath(image) if isinstance(image, (str, os.PathLike)) else _to_uint8(image))


def _require_tensorboard() -> None:
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        raise ConfigurationError(
            "Trainer(log_with='tensorboard') needs the tensorboard package, which is not installed. "
            "Run `pip install tensorboard`, or use log_with='csv' / 'wandb'."
        )


# -- images ---------------------------------------------------------------------------------------
def _to_uint8(image: Any) -> Any:
    """An ``H x W`` or ``H x W x C`` uint8 numpy array from an array/tensor (floats in [0, 1])."""
    import numpy as np

    if hasattr(image, "detach"):  # a torch tensor
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"log_image expects a path to a PNG or an H x W / H x W x C (C in 1, 3, 4) array; received shape "
            f"{tuple(np.shape(image))}. Move the channel axis last (e.g. tensor.permute(1, 2, 0))."
        )
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return array


def _load_image(image: Any) -> Any:
    """A uint8 ``H x W`` or ``H x W x 3`` array from a path or an array."""
    import numpy as np

    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        with Image.open(os.fspath(image)) as img:
            return np.asarray(img.convert("L" if img.mode in ("L", "I", "F", "1") else "RGB"))
    array = _to_uint8(image)
    return array[..., :3] if array.ndim == 3 else array


def _save_png(image: Any, path: str) -> None:
    from PIL import Image

    Image.fromarray(_to_uint8(image)).save(path)


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_") or "image"


# -- config shapes --------------------------------------------------------------------------------
def _jsonable(config: dict) -> dict:
    """Nested dicts/lists kept, scalars kept, anything else as its repr (what W&B stores as config)."""

    def convert(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): convert(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if isinstance(v, (bool, int, float, str)) or v is None:
            return v
        return repr(v)

    return convert(dict(config))


def _flat_scalars(config: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; values that are not bool/int/float/str become strings."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_scalars(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = repr(v) if not isinstance(v, (list, tuple)) else json.dumps(_jsonable({"v": v})["v"])
    return out


def _comparable(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str))


def _same_value(a: Any, b: Any) -> bool:
    try:
        return a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b))
    except Exception:
        return False


class LoggerView:
    """One tracker seen through Lightning's ``Logger`` API: ``self.logger`` / ``trainer.loggers``.

    ``experiment`` is the tracker's own object (``wandb.Run``, TensorBoard's ``SummaryWriter``,
    the CSV tracker), so ``self.logger.experiment.add_image(...)`` works as in Lightning. On a
    rank other than the main one (trackers run on the main process only) every call is a no-op
    and ``experiment`` swallows every call, as Lightning's rank-zero-only loggers do.

    Args:
        tracker: the Accelerate tracker, or ``None`` on a non-main rank.
        trainer: the trainer (for the default ``step`` and the directories).
        name: the tracker's name ("csv", "wandb", "tensorboard" …).
    """

    def __init__(self, tracker: GeneralTracker | None, trainer: Any, name: str) -> None:
        self._tracker = tracker
        self._trainer = trainer
        self.name = name

    @property
    def experiment(self) -> Any:
        return self._tracker.tracker if self._tracker is not None else _DummyExperiment()

    @property
    def save_dir(self) -> str:
        return self._trainer.log_dir

    @property
    def log_dir(self) -> str:
        return self._trainer.log_dir

    @property
    def version(self) -> Any:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Send ``metrics`` (numbers) to this tracker at ``step`` (default: ``trainer.global_step``)."""
        if self._tracker is not None:
            values = {k: float(v) for k, v in metrics.items()}
            self._tracker.log(values, step=self._trainer.global_step if step is None else step)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Add ``params`` (a dict or ``argparse.Namespace``) to this tracker's hyperparameters."""
        if self._tracker is not None:
            log_hyperparams([self._tracker], dict(params) if isinstance(params, dict) else dict(vars(params)))

    def log_image(self, key: str, images: Any, step: int | None = None, **kwargs: Any) -> None:
        """Lightning's ``WandbLogger.log_image(key, images)``: each image through :func:`log_image`."""
        if self._tracker is not None:
            for image in images if isinstance(images, (list, tuple)) else [images]:
                log_image([self._tracker], key, image, step=self._trainer.global_step if step is None else step)

    def finalize(self, status: str = "success") -> None:
        """Nothing to do: the trainer finishes its trackers at the end of the run."""

    def __repr__(self) -> str:
        return f"LoggerView({self.name!r}{'' if self._tracker is not None else ', non-main rank'})"


class _DummyExperiment:
    """Takes any call and does nothing (a non-main rank's ``logger.experiment``)."""

    def _nop(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return self._nop

    def __getitem__(self, idx: Any) -> _DummyExperiment:
        return self

    def __setitem__(self, *args: Any) -> None:
        pass


def tracker_name(item: Any) -> str:
    """``"csv"`` for ``"csv"``, a tracker instance's ``name`` for an instance."""
    return item if isinstance(item, str) else str(getattr(item, "name", type(item).__name__))

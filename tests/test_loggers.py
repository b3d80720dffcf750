"""Trackers: W&B (offline run files read back), TensorBoard (event files read back), CSV, images.

No test needs a network or a W&B account: every W&B run here is offline, and the
offline run file (``{log_dir}/wandb/offline-run-*/run-*.wandb``) is decoded with W&B's own
protobuf messages to check what a later ``wandb sync`` would upload.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import struct

import numpy as np
import pytest
import torch

from accel_trainer import Callback, Trainer
from accel_trainer import loggers
from accel_trainer.callbacks import LearningRateMonitor
from accel_trainer.errors import ConfigurationError
from accel_trainer.loggers import (
    CSVTracker,
    build_trackers,
    log_hyperparams,
    log_image,
    normalise_log_with,
    wandb_credentials_available,
)
from helpers import Regressor, loader


# -- reading W&B's offline run file -------------------------------------------------------------------
def read_wandb_records(path: str) -> list:
    """The records of a ``.wandb`` file (a LevelDB-style log of ``wandb_internal_pb2.Record``s).

    Layout: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of chunks, each
    ``crc32 (4) | length (2, little-endian) | type (1: full, 2: first, 3: middle, 4: last)``.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"not a W&B run file: {data[:7]!r}"
    block, pos, pending, payloads = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the tail of a block too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            payloads.append(pending + chunk)
    records = []
    for raw in payloads:
        record = pb.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def _items(items) -> dict:
    out = {}
    for item in items:
        key = item.key or ".".join(item.nested_key)
        out[key] = json.loads(item.value_json)
    return out


class WandbRun:
    """Config, history rows (by ``_step``) and summary of an offline run, as W&B would sync them."""

    def __init__(self, log_dir: str) -> None:
        import wandb

        # run.finish() may return before W&B's service has flushed the run file; teardown waits for it.
        wandb.teardown()
        files = glob.glob(os.path.join(log_dir, "wandb", "offline-run-*", "run-*.wandb"))
        assert len(files) == 1, files
        self.records = read_wandb_records(files[0])
        self.run = next(r.run for r in self.records if r.WhichOneof("record_type") == "run")
        self.config = {k: v for k, v in _items(self.run.config.update).items() if k != "_wandb"}
        self.history: dict[int, dict] = {}
        self.summary: dict = {}
        for r in self.records:
            kind = r.WhichOneof("record_type")
            if kind == "config":
                self.config.update(_items(r.config.update))
            elif kind == "history":
                row = _items(r.history.item)
                self.history[int(row["_step"])] = {k: v for k, v in row.items() if not k.startswith("_")}
            elif kind == "summary":
                self.summary.update({k: v for k, v in _items(r.summary.update).items() if not k.startswith("_")})


@pytest.fixture
def no_wandb_credentials(tmp_path, monkeypatch):
    """As on a fresh machine: no API key, no ~/.netrc, WANDB_MODE unset, W&B's settings in tmp."""
    for var in (
        "WANDB_API_KEY",
        "WANDB_IDENTITY_TOKEN_FILE",
        "WANDB_MODE",
        "WANDB_SWEEP_ID",
        "WANDB_RUN_ID",
        "WANDB_SWEEP_PARAM_PATH",
        "WANDB_BASE_URL",
        "WANDB_DIR",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(loggers, "_offline_notice_shown", False)
    import wandb

    # W&B reads its environment (mode, sweep variables) once per process, into a singleton.
    wandb.teardown()
    yield
    wandb.teardown()


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class ImageRegressor(Regressor):
    def on_train_epoch_end(self):
        log_image(self.trainer, "samples", np.linspace(0, 1, 48).reshape(4, 4, 3))


# -- W&B ----------------------------------------------------------------------------------------------
def test_wandb_without_credentials_goes_offline_and_logs_config_metrics_lrs_images(
    tmp_path, no_wandb_credentials, caplog
):
    run_dir = str(tmp_path / "run")
    trainer = Trainer(
        max_epochs=2,
        cpu=True,
        enable_progress_bar=False,
        default_root_dir=run_dir,
        log_with=["wandb", "csv"],
        log_every_n_steps=2,
        callbacks=[LearningRateMonitor()],
    )
    with caplog.at_level(logging.WARNING, logger="accel_trainer"):
        trainer.fit(ImageRegressor(lr=0.05), loader(n=64, batch_size=8), loader(n=32, batch_size=8))
    notices = [r.getMessage() for r in caplog.records if "no credentials" in r.getMessage()]
    assert len(notices) == 1 and "wandb sync" in notices[0] and os.path.join(run_dir, "wandb") in notices[0]

    run = WandbRun(run_dir)  # the offline run lives under the trainer's log_dir
    assert run.config["lr"] == 0.05 and run.config["features"] == 4
    # Every row of metrics.csv is in the W&B history at the same step, under the same names.
    csv_rows = _read_csv(os.path.join(run_dir, "metrics.csv"))
    assert csv_rows
    for row in csv_rows:
        logged = run.history[int(row["step"])]
        for name, value in row.items():
            if name != "step" and value != "":
                assert logged[name] == pytest.approx(float(value)), (row["step"], name)
    steps_with_train_loss = sorted(s for s, row in run.history.items() if "train_loss" in row)
    assert steps_with_train_loss == [2, 4, 6, 8, 10, 12, 14, 16]
    assert "lr-SGD" in run.history[0] and run.history[0]["lr-SGD"] == pytest.approx(0.05)
    # sample images at the end of each epoch, as wandb.Image
    image_steps = sorted(s for s, row in run.history.items() if row.get("samples._type") == "image-file")
    assert image_steps == [8, 16]
    media = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "files", run.history[8]["samples.path"]))
    assert len(media) == 1 and run.history[8]["samples.width"] == 4
    # summary = the last values (what a sweep's metric reads)
    assert run.summary["val_loss"] == pytest.approx(float(trainer.callback_metrics["val_loss"]))
    assert run.summary["epoch"] == 1


def test_wandb_sweep_run_keeps_swept_values_and_reports_a_mismatch(tmp_path, no_wandb_credentials, monkeypatch, caplog):
    """What `wandb agent` sets up: its run id, the sweep id and the swept parameters file."""
    params = tmp_path / "sweep-params.yaml"
    params.write_text(
        "wandb_version: 1\nlr:\n  value: 0.02\nbatch_size:\n  value: 16\ntrainer.max_epochs:\n  value: 1\n"
    )
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep123")
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun1")
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(params))
    run_dir = str(tmp_path / "run")
    resolved = {"module": {"init_args": {"lr": 0.05}}, "trainer": {"max_epochs": 1}}

    class LogResolvedConfig(Callback):  # what the CLI does with its resolved config
        def on_fit_start(self, trainer, module):
            log_hyperparams(trainer, resolved)

    trainer = Trainer(
        max_epochs=1,
        cpu=True,
        enable_progress_bar=False,
        default_root_dir=run_dir,
        log_with="wandb",
        log_every_n_steps=2,
        callbacks=[LogResolvedConfig()],
    )
    with caplog.at_level(logging.WARNING, logger="accel_trainer"):
        # lr=0.05 while the sweep chose 0.02: the override did not reach the module
        trainer.fit(Regressor(lr=0.05), loader(n=32, batch_size=8), loader(n=16, batch_size=8))
    run = WandbRun(run_dir)
    assert run.run.run_id == "agentrun1" and run.run.sweep_id == "sweep123"
    assert run.config["lr"] == 0.02 and run.config["batch_size"] == 16  # swept values are never overwritten
    assert run.config["features"] == 4  # our other hyperparameters are added
    assert run.config["module"] == {"init_args": {"lr": 0.05}} and run.config["trainer.max_epochs"] == 1
    mismatches = [r.getMessage() for r in caplog.records if "sweep sets" in r.getMessage()]
    assert len(mismatches) == 1 and "sweep sets lr=0.02" in mismatches[0]  # trainer.max_epochs agrees
    assert not any("no credentials" in r.getMessage() for r in caplog.records)  # WANDB_MODE was set
    assert "val_loss" in run.summary  # the name given to self.log, as a sweep's metric.name


def _fit_on_two_ranks() -> None:
    trainer = Trainer(
        max_epochs=1,
        cpu=True,
        enable_progress_bar=False,
        default_root_dir=os.environ["RUN_DIR_FOR_TEST"],
        log_with=["wandb", "csv"],
        log_every_n_steps=1,
    )
    trainer.fit(ImageRegressor(), loader(n=32, batch_size=4), loader(n=16, batch_size=4))
    assert trainer.world_size == 2
    assert trainer.is_global_zero or not trainer._trackers


def test_only_rank_zero_creates_the_wandb_run(tmp_path, no_wandb_credentials, monkeypatch):
    from distributed.launcher import run_on_ranks

    monkeypatch.setenv("RUN_DIR_FOR_TEST", str(tmp_path / "run"))
    run_on_ranks(_fit_on_two_ranks)
    run = WandbRun(str(tmp_path / "run"))  # asserts there is exactly one run
    assert sorted(s for s, row in run.history.items() if "train_loss" in row) == [1, 2, 3, 4]
    assert len(_read_csv(tmp_path / "run" / "images.csv")) == 1


def test_wandb_credentials_detection(tmp_path, no_wandb_credentials, monkeypatch):
    assert not wandb_credentials_available()
    netrc_path = tmp_path / "netrc"
    netrc_path.write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    netrc_path.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_path))
    assert wandb_credentials_available()
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_API_KEY", "b" * 40)
    assert wandb_credentials_available()


# -- TensorBoard -----------------------------------------------------------------------------------------
def test_tensorboard_scalars_hparams_and_images(trainer_kwargs, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing import event_accumulator as ea

    trainer = Trainer(
        max_epochs=2,
        log_with="tensorboard",
        log_every_n_steps=2,
        project_name="proj",
        callbacks=[LearningRateMonitor()],
        **trainer_kwargs,
    )
    trainer.fit(ImageRegressor(lr=0.05), loader(n=64, batch_size=8), loader(n=32, batch_size=8))
    acc = ea.EventAccumulator(str(tmp_path / "proj"), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train_loss")] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert [e.step for e in acc.Scalars("val_loss")] == [8, 16]
    assert acc.Scalars("val_loss")[-1].value == pytest.approx(float(trainer.callback_metrics["val_loss"]), rel=1e-6)
    assert acc.Scalars("lr-SGD")[0].value == pytest.approx(0.05)
    assert [(e.step, e.width, e.height) for e in acc.Images("samples")] == [(8, 4, 4), (16, 4, 4)]
    hparams = glob.glob(str(tmp_path / "proj" / "*" / "hparams.yml"))
    assert hparams and "lr: 0.05" in open(hparams[0]).read()


def test_tensorboard_missing_is_a_configuration_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith("tensorboard") else real(name, *a)
    )
    with pytest.raises(ConfigurationError, match="pip install tensorboard"):
        build_trackers(["tensorboard"], "p", str(tmp_path), {})


# -- CSV and images ---------------------------------------------------------------------------------------
def test_csv_metrics_hparams_and_images(trainer_kwargs, tmp_path):
    from PIL import Image

    png = tmp_path / "given.png"
    Image.fromarray(np.zeros((3, 5), dtype=np.uint8)).save(png)

    class Both(Regressor):
        def on_train_epoch_end(self):
            log_image(self.trainer, "grid", str(png))
            log_image(self.trainer, "samples", torch.rand(6, 6))

    trainer = Trainer(max_epochs=2, log_every_n_steps=4, callbacks=[LearningRateMonitor()], **trainer_kwargs)
    trainer.fit(Both(lr=0.05), loader(n=64, batch_size=8), loader(n=32, batch_size=8))
    rows = _read_csv(tmp_path / "metrics.csv")
    header = list(rows[0])
    assert header[0] == "step" and {"train_loss", "val_loss", "epoch", "lr-SGD"} <= set(header)
    assert [r["step"] for r in rows if r["train_loss"]] == ["4", "8", "12", "16"]
    assert json.load(open(tmp_path / "hparams.json")) == {"lr": 0.05, "features": 4}
    tracker = CSVTracker("p", str(tmp_path))
    log_hyperparams([tracker], {"trainer": {"max_epochs": 2}})  # merged, not replaced
    assert json.load(open(tmp_path / "hparams.json")) == {"lr": 0.05, "features": 4, "trainer": {"max_epochs": 2}}
    images = _read_csv(tmp_path / "images.csv")
    assert [(r["step"], r["key"]) for r in images] == [
        ("8", "grid"),
        ("8", "samples"),
        ("16", "grid"),
        ("16", "samples"),
    ]
    assert images[0]["path"] == str(png)
    saved = images[1]["path"]
    assert saved.startswith(str(tmp_path / "images" / "samples")) and Image.open(saved).size == (6, 6)


def test_log_image_is_a_no_op_without_trackers_and_checks_shapes(tmp_path):
    class NoTrackers:
        _trackers: list = []
        global_step = 3

    log_image(NoTrackers(), "x", np.zeros((2, 2)))  # non-main ranks: nothing happens
    tracker = CSVTracker("p", str(tmp_path))
    tracker.start()
    with pytest.raises(ValueError, match="channel axis last"):
        log_image([tracker], "bad", np.zeros((3, 8, 8)))
    log_image([tracker], "gray", np.zeros((8, 8, 1)), step=5)
    assert _read_csv(tmp_path / "images.csv")[0]["step"] == "5"


def test_nested_config_is_flattened_for_tensorboard_and_kept_for_wandb():
    config = {"module": {"lr": 0.1, "sizes": [1, 2]}, "seed": None, "act": torch.nn.ReLU()}
    assert loggers._flat_scalars(config) == {
        "module.lr": 0.1,
        "module.sizes": "[1, 2]",
        "seed": "None",
        "act": "ReLU()",
    }
    assert loggers._jsonable(config) == {"module": {"lr": 0.1, "sizes": [1, 2]}, "seed": None, "act": "ReLU()"}


def test_unknown_tracker_names_the_allowed_ones():
    assert normalise_log_with(None) == ["csv"]
    assert normalise_log_with("wandb") == ["wandb"]
    with pytest.raises(ConfigurationError, match=r"'mlflow' is not a known tracker.*'csv', 'wandb', 'tensorboard'"):
        normalise_log_with(["csv", "mlflow"])

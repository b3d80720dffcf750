"""``run_status.json``: how a run ended, readable by scripts whatever launched it.

Exit codes do not survive launchers: under ``accelerate launch`` (torchrun) a preempted job's
workers exit 75 but the launcher exits 1, and Slurm sees only the launcher. So the main
process of ``fit`` also writes the outcome into the run directory, atomically::

    {"status": "preempted", "step": 293, "epoch": 3,
     "checkpoint": "/abs/runs/x/checkpoints/last.ckpt", "signal": "SIGTERM", "exit_code": 75, ...}

``status`` is one of :data:`STATES`:

* ``running``: the run started (its checkpoint, if any, was restored); rewritten at every
  epoch end with the new step. Still ``running`` after the processes are gone means they
  were killed without warning (SIGKILL, out of memory, a lost node).
* ``finished``: ``fit`` returned (``stop_reason`` says why: ``max_epochs``, ``max_steps``,
  ``should_stop``, ``nothing left to do``).
* ``preempted``: a preemption signal or a Ctrl-C; ``checkpoint`` was written at ``step``
  and the same command resumes from it.
* ``failed``: an exception ended the run (``error`` names it); ``checkpoint`` is the newest
  complete one, if any.

Nothing is written before the run really starts: a command refused for a bad config or a
checkpoint that does not fit leaves the previous status (and every other record) as it was.
``accel-trainer status`` prints it; ``launch/slurm.sbatch`` requeues from it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime, timezone
from typing import Any

STATUS_FILE = "run_status.json"
STATES = ("running", "finished", "preempted", "failed")
CHECKPOINT_DIR = "checkpoints"
LAST_NAME = "last.ckpt"


def last_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The run's ``checkpoints/last.ckpt`` when it exists (a file, or a directory for sharded checkpoints)."""
    from .checkpoint import exists

    path = os.path.join(os.fspath(run_dir), CHECKPOINT_DIR, LAST_NAME)
    return path if exists(path) else None


def status_path(run_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(run_dir), STATUS_FILE)


def write_run_status(run_dir: str | os.PathLike, status: str, **fields: Any) -> dict[str, Any]:
    """Write ``run_status.json`` atomically (call on the main process only); returns what was written.

    Args:
        run_dir: the run directory (``trainer.default_root_dir``).
        status: one of :data:`STATES`.
        **fields: ``step``, ``epoch``, ``checkpoint``, ``signal``, ``exit_code``, ``error``,
            ``stop_reason``, ``world_size``, ... (None values are written as null).

    Raises:
        ValueError: ``status`` is not one of :data:`STATES`.
    """
    if status not in STATES:
        raise ValueError(f"run status {status!r} is not one of {list(STATES)}")
    now = time.time()
    record = {
        "status": status,
        **fields,
        "updated": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
        "updated_unix": round(now, 3),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    if os.environ.get("SLURM_JOB_ID"):
        record["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        record["slurm_restart_count"] = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    path = status_path(run_dir)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:  # open() creates the file with the process umask, like any other
        json.dump(record, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return record


def read_run_status(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's status record, or None when it has none (or it cannot be parsed)."""
    try:
        with open(status_path(run_dir)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def describe_error(exc: BaseException) -> str:
    """``TypeName: first line of the message`` (a KeyboardInterrupt says it was a second Ctrl-C)."""
    if isinstance(exc, KeyboardInterrupt):
        return "KeyboardInterrupt: stopped at once (a second Ctrl-C); no checkpoint was written for it"
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__

"""One live run per run directory, and no litter from runs that were killed.

Two runs started in one ``default_root_dir`` used to interleave: both wrote
``checkpoints/last.ckpt`` and ``metrics.csv`` (the files held whichever wrote last), one
deleted the other's best checkpoint, and a later ``ckpt_path="last"`` resumed the other run.
So ``fit`` holds a lock on its run directory while it runs (:class:`RunLock`): the file
``run.lock``, locked with ``flock`` by the global main process and holding the holder's PID,
host, start time and command; it is removed when the run ends. A second ``fit`` in the same directory is refused at once,
naming the holder. The kernel drops the lock when its process dies however it dies (even
SIGKILL), so a lock left by a dead run is recognised as stale and taken over (with a note
naming the dead holder). On a file system without ``flock`` the recorded PID decides: a
lock of a process that no longer runs on this host is stale; one from another host is
honoured (remove the file if that run is really gone).

A run killed during a save leaves its temporaries (``.tmp-*`` files and staging
directories, ``.old-*`` copies of a directory being replaced, ``*.tmp-<pid>`` records):
:func:`clean_stale_temporaries` removes them when the next run starts, under the lock, so
never while another run might still be writing them.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from .errors import ConfigurationError

LOCK_NAME = "run.lock"


class RunDirectoryLocked(ConfigurationError):
    """Another live run holds the run directory's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user's process
    except OSError:
        return False
    return _not_zombie(pid)


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except OSError:
        return True  # no /proc (macOS): a signal-able process counts as alive


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started", "?")
    command = holder.get("command")
    text = f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {started}"
    if command:
        text += f" ({' '.join(map(str, command))[:200]})"
    return text


class RunLock:
    """The lock of one run directory, held by one process for the duration of a ``fit``.

    Args:
        run_dir: the run directory (``trainer.default_root_dir``).
        info: extra fields to record in the lock file (e.g. the run id).

    Example:
        >>> lock = RunLock("runs/x")
        >>> lock.acquire()   # raises RunDirectoryLocked naming the holder when another run is live
        >>> lock.release()
    """

    def __init__(self, run_dir: str | os.PathLike, info: dict[str, Any] | None = None) -> None:
        self.run_dir = os.fspath(run_dir)
        self.path = os.path.join(self.run_dir, LOCK_NAME)
        self.info = dict(info or {})
        self._fd: int | None = None
        self._created_dir = False
        #: set by :meth:`acquire` when it took over a lock left by a dead run
        self.stale_holder: dict[str, Any] | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunDirectoryLocked` naming the live holder."""
        if self._fd is not None:
            return
        self._created_dir = not os.path.isdir(self.run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                previous = self._read(fd)
                if not self._flock(fd, previous):
                    raise RunDirectoryLocked(self._busy_message(previous))
                if not self._still_the_lock_file(fd):
                    os.close(fd)  # a holder removed it while releasing: lock the file that is there now
                    continue
                if previous and previous.get("pid"):
                    self.stale_holder = previous  # a holder that never released: it was killed
                self._write(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return
        raise RunDirectoryLocked(f"Could not lock {self.path}: it keeps being replaced by another process.")

    def release(self) -> None:
        """Drop the lock and remove its file (the run directory is left as the run left it)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.remove(self.path)  # while still holding it: a process waiting on the old file re-checks
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the descriptor releases the flock
        if self._created_dir:
            try:
                os.rmdir(self.run_dir)  # this fit created it and nothing was written: leave no empty directory
            except OSError:
                pass

    def _still_the_lock_file(self, fd: int) -> bool:
        try:
            here, there = os.fstat(fd), os.stat(self.path)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

    def _flock(self, fd: int, previous: dict[str, Any] | None) -> bool:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self._by_pid(previous)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            return self._by_pid(previous)  # no flock on this file system (ENOLCK, EOPNOTSUPP ...)

    @staticmethod
    def _by_pid(previous: dict[str, Any] | None) -> bool:
        """Without flock: free unless a live process on this host (or any process elsewhere) holds it."""
        if not previous or not previous.get("pid"):
            return True
        if previous.get("host") != socket.gethostname():
            return False
        return not _pid_alive(int(previous["pid"]))

    def _busy_message(self, holder: dict[str, Any] | None) -> str:
        who = _describe(holder) if holder else "another process"
        return (
            f"The run directory {self.run_dir!r} is in use by a live run ({who}): two runs in one directory would "
            f"overwrite each other's checkpoints, metrics.csv and run_status.json. Wait for it to finish, stop it, or "
            f"give this run another directory (--trainer.default_root_dir / Trainer(default_root_dir=...)). The lock "
            f"is {self.path}; the operating system releases it when its process ends."
        )

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "started_unix": round(now, 3),
            "command": list(sys.argv),
            **self.info,
        }

    def _write(self, fd: int, record: dict[str, Any] | None = None) -> None:
        data = (json.dumps(record or self._record(), default=str) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    @staticmethod
    def _read(fd: int) -> dict[str, Any] | None:
        try:
            raw = os.pread(fd, 1 << 16, 0)
            record = json.loads(raw.decode() or "null")
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None


def describe_stale(lock: RunLock) -> str | None:
    """One line about a stale lock :meth:`RunLock.acquire` took over, or None."""
    holder = lock.stale_holder
    if not holder:
        return None
    return (
        f"accel_trainer: {lock.path} was left by {_describe(holder)}, which ended without releasing it (it was "
        "killed, or its machine went down): a stale lock, taken over."
    )


# -- stale temporaries ------------------------------------------------------------------------------
#: records written atomically by their own helpers: ``config.yaml.tmp-123``, ``metrics.csv.tmp``
_RECORD_TEMPORARY = re.compile(r".+\.tmp(-\d+)?$")


def clean_stale_temporaries(run_dir: str, checkpoint_dirs: Iterable[str]) -> list[str]:
    """Remove what killed runs left behind; returns the paths removed. Call with the run's lock held.

    In each checkpoint directory: ``.tmp-*`` (a half-written checkpoint file or sharded
    staging directory) and ``.old-*`` (the previous version of a directory checkpoint, put
    aside during a publish) -- after first putting an aside copy back where its checkpoint
    is missing (:func:`accel_trainer.checkpoint.resolve`). In the run directory itself:
    ``*.tmp`` / ``*.tmp-<pid>`` files of its records. Only directories inside ``run_dir``
    are cleaned: a checkpoint directory elsewhere may be shared with other runs.
    """
    from .checkpoint import resolve

    removed: list[str] = []
    root = os.path.realpath(run_dir)
    if os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            path = os.path.join(run_dir, name)
            if _RECORD_TEMPORARY.match(name) and os.path.isfile(path) and name != LOCK_NAME:
                _remove(path, removed)
    seen = set()
    for directory in checkpoint_dirs:
        real = os.path.realpath(directory)
        if real in seen or not os.path.isdir(directory) or not (real == root or real.startswith(root + os.sep)):
            continue
        seen.add(real)
        names = os.listdir(directory)
        for name in names:
            if name.startswith(".old-"):
                original = name[len(".old-"):].rsplit("-", 1)[0]
                resolve(os.path.join(directory, original))  # a publish cut between its two renames
        for name in os.listdir(directory):
            if name.startswith((".tmp-", ".old-")):
                _remove(os.path.join(directory, name), removed)
    return removed


def _remove(path: str, removed: list[str]) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        removed.append(path)
    except OSError:
        pass

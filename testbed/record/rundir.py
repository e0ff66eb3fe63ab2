"""A run directory belongs to one run: an exclusive lock while the run writes, and no silent
re-use of an earlier run's record.

Without it two runs given the same ``--out`` both appended to ``metrics.jsonl`` (steps 0..11
twice, both "ok"), and a later run deleted an earlier run's rows without a word. The lock is
``fcntl.flock`` on ``DIR/run.lock``: the kernel drops it when the holder exits, however it exits
(SIGKILL included), so a crashed run never leaves a directory locked. The file stays (unlinking a
lock file races with the next run opening it); it holds the holder's pid for the message.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from testbed.record.files import EVENTS_FILE, METRICS_FILE, RUN_FILE, TIMING_FILE, RunDirError, read_json

LOCK_FILE = "run.lock"
#: what makes a directory hold a run record (a second run would mix into or delete it)
RECORD_FILES = (RUN_FILE, METRICS_FILE, EVENTS_FILE, TIMING_FILE)


class DirLock:
    """An exclusive lock on a directory, held until ``release()`` or the process ends."""

    def __init__(self, directory: Path, fd: int):
        self.directory, self._fd = directory, fd
        self.replaces: str | None = None  # what an overwrite will delete, for the user to see

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1

    def __enter__(self) -> "DirLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_dir(directory: Path) -> DirLock:
    """Create ``directory`` if needed and lock it, or raise RunDirError (one line, says why)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise RunDirError(directory, "exists and is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as e:  # read-only filesystem, no permission, under /proc, a name too long
        raise RunDirError(directory, f"cannot write there ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise RunDirError(directory, f"in use by another run (pid {holder}); wait for it to end or choose "
                          "another directory") from None
    except OSError as e:
        os.close(fd)
        raise RunDirError(directory, f"cannot be locked ({e.strerror or e})") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except OSError:
        pass  # the pid is only for the message; the lock is what counts
    return DirLock(directory, fd)


def claim_run_dir(directory: Path, overwrite: bool = False) -> DirLock:
    """Lock ``directory`` for one run. An earlier run's record there is refused unless
    ``overwrite`` (then the launcher removes it): its rows must never mix with or silently vanish
    under this run's."""
    lock = lock_dir(directory)
    if any((Path(directory) / name).exists() for name in RECORD_FILES):
        lock.replaces = _describe(Path(directory))
        if not overwrite:
            lock.release()
            raise RunDirError(directory, f"holds an earlier run ({lock.replaces}); pass --overwrite to "
                              "replace it, or choose another directory")
    return lock


def _describe(directory: Path) -> str:
    """``status 'ok', 40 metric row(s)``: what overwriting would delete."""
    try:
        status = f"status {read_json(directory / RUN_FILE)['status']!r}"
    except (OSError, ValueError, KeyError, TypeError):
        status = "no readable run.json"
    try:
        with open(directory / METRICS_FILE, "rb") as f:
            rows = sum(1 for _ in f)
    except OSError:
        rows = 0
    return f"{status}, {rows} metric row(s)"

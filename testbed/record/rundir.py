"""One ownership model for every writer (run, sweep, gate, control runs, the monitor): a directory
belongs to one record, held under an exclusive lock while it is written, and nothing is deleted
that is not that record's own.

Without it two runs given the same ``--out`` both appended to ``metrics.jsonl`` (steps 0..11
twice, both "ok"), a sweep into a finished run hid the run from ``report``, and the gate
``rmtree``'d whatever sat where it meant to write. The lock is ``fcntl.flock`` on
``DIR/run.lock``: the kernel drops it when the holder exits, however it exits (SIGKILL included),
so a crashed run never leaves a directory locked. The file stays (unlinking a lock file races with
the next run opening it); it holds the holder's pid for the message.

What a record is: ``RECORD_FILES`` (a run), ``sweep.json`` (a sweep: its levels are the run
directories it lists) or ``gate.json`` (a gate: the scenario directories it lists). Replacing one
(``--overwrite``) removes exactly those files and directories (``remove_record``), never a file
the record does not name, and never through a link.
"""
from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path
from typing import Any, Callable

from testbed.record.files import (EVENTS_FILE, METRICS_FILE, RUN_FILE, TIMING_FILE, RunDirError, read_json,
                                  read_run, read_sweep)
from testbed.record.safeio import is_link, link_refusal, open_record, unlink_record_file
from testbed.schema.jsonfile import open_regular
from testbed.schema.records import GATE_FILE, SWEEP_FILE, FieldProblem, check_gate, is_segment

LOCK_FILE = "run.lock"
RANKS_DIR = "ranks"
CONTROL_DIR = "control"
REFERENCES_DIR = "_references"  # a gate's metrics_equal_to references: OUT/_references/<name>
#: what makes a directory hold a run record (a second run would mix into or delete it)
RECORD_FILES = (RUN_FILE, METRICS_FILE, EVENTS_FILE, TIMING_FILE)
#: per-rank files a run leaves in ranks/ (error reports, stacks, saved weights)
RANK_FILE_SUFFIXES = (".json", ".stack", ".final.pt")
#: names in a record directory that must never be a link (checked before anything is written)
GUARDED = (*RECORD_FILES, SWEEP_FILE, GATE_FILE, LOCK_FILE, RANKS_DIR, CONTROL_DIR)


class DirLock:
    """An exclusive lock on a directory, held until ``release()`` or the process ends."""

    def __init__(self, directory: Path, fd: int):
        self.directory, self._fd = directory, fd
        self.replaces: str | None = None  # what an overwrite deleted, for the user to see

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
        fd = open_record(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:  # read-only filesystem, no permission, under /proc, a name too long
        raise RunDirError(directory, f"cannot write there ({e.strerror or e})") from None
    if os.fstat(fd).st_nlink != 1:  # a hard link to another file: truncating it would write through
        os.close(fd)
        raise RunDirError(directory / LOCK_FILE, "has other hard links; testbed never writes through one (remove it)")
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


def refuse_links(directory: Path) -> None:
    """RunDirError if a record name in ``directory`` is a symbolic link (planted, or left over)."""
    for name in GUARDED:
        if is_link(Path(directory) / name):
            raise link_refusal(Path(directory) / name)


def record_kind(directory: Path) -> str | None:
    """``"run"``, ``"sweep"``, ``"gate"`` or None: which record ``directory`` holds."""
    directory = Path(directory)
    if os.path.lexists(directory / GATE_FILE):
        return "gate"
    if os.path.lexists(directory / SWEEP_FILE):
        return "sweep"
    if any(os.path.lexists(directory / name) for name in RECORD_FILES):
        return "run"
    return None


Accept = Callable[[str, Path], bool]


def claim_run_dir(directory: Path, overwrite: bool = False, *, accept: Accept | None = None) -> DirLock:
    """Lock ``directory`` for one record. An earlier record there is refused unless ``overwrite``
    (then it is removed here, ``lock.replaces`` says what it was) or ``accept(kind, directory)``
    says it is this writer's own to continue (a sweep resuming, a gate re-using its ``--out``).
    A planted link at a record name is refused either way."""
    directory = Path(directory)
    lock = lock_dir(directory)
    try:
        refuse_links(directory)
        kind = record_kind(directory)
        if kind is None or (accept is not None and not overwrite and accept(kind, directory)):
            return lock
        what = describe(directory, kind)
        if not overwrite:
            raise RunDirError(directory, f"holds {what}; pass --overwrite to replace it, or choose another "
                              "directory")
        lock.replaces = what
        remove_record(directory)
        return lock
    except BaseException:
        lock.release()
        raise


def record_subdir(parent: Path, name: str) -> Path:
    """``parent/name`` as a real directory of the record (created if missing): ``name`` must be one
    path component, and a link or a file there is refused (RunDirError), never written into."""
    if not is_segment(name):
        raise RunDirError(Path(parent) / str(name), "is not a single directory name")
    path = Path(parent) / name
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except OSError as e:
        raise RunDirError(path, f"cannot be created ({e.strerror or e})") from None
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        raise link_refusal(path)
    if not stat.S_ISDIR(mode):
        raise RunDirError(path, "exists and is not a directory")
    return path


def remove_record(directory: Path) -> None:
    """Delete the record in ``directory`` - the files testbed writes there and the sub-records a
    sweep or a gate lists - and nothing else: no link is followed, a foreign file is left alone
    (and keeps its directory), the lock file stays."""
    directory = Path(directory)
    children = _listed_dirs(directory / SWEEP_FILE, "levels", "run_dir") + \
        _listed_dirs(directory / GATE_FILE, "scenarios", None)
    references = _listed_dirs(directory / GATE_FILE, "references", None)
    for name in (*RECORD_FILES, SWEEP_FILE, GATE_FILE):
        unlink_record_file(directory / name)
    _remove_rank_files(directory)
    for parent, names in ((directory, [CONTROL_DIR, *children]), (directory / REFERENCES_DIR, references)):
        for name in names:
            sub = parent / name
            if is_segment(name) and sub.is_dir() and not is_link(sub) and not is_link(parent):
                remove_record(sub)
                unlink_record_file(sub / LOCK_FILE)
                _rmdir_if_empty(sub)
    if references:
        _rmdir_if_empty(directory / REFERENCES_DIR)


def _remove_rank_files(directory: Path) -> None:
    ranks = directory / RANKS_DIR
    if is_link(ranks) or not ranks.is_dir():
        return
    for entry in os.scandir(ranks):
        if entry.name.startswith("rank") and entry.name.endswith(RANK_FILE_SUFFIXES) and not entry.is_dir(
                follow_symlinks=False):
            unlink_record_file(entry.path)
    _rmdir_if_empty(ranks)


def _rmdir_if_empty(path: Path) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass  # not empty (something foreign is there) or gone


def _listed_dirs(path: Path, key: str, field: str | None) -> list[str]:
    """Directory names a sweep.json (levels[].run_dir) or gate.json (scenarios{}, references{}) lists."""
    try:
        record = read_json(path)
        items = record.get(key) or ({} if field is None else [])
        names = [item[field] for item in items] if field else list(items.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return [n for n in names if is_segment(n)]


def describe(directory: Path, kind: str | None = None) -> str:
    """``an earlier run (status 'ok', 40 metric row(s))``: what overwriting would delete."""
    directory = Path(directory)
    kind = kind or record_kind(directory)
    if kind in ("sweep", "gate"):
        name = GATE_FILE if kind == "gate" else SWEEP_FILE
        try:
            if kind == "sweep":
                label = f"of {read_sweep(directory)['scenario']!r}"
            else:
                label = f"of {len(check_gate(read_json(directory / name))['scenarios'])} scenario(s)"
        except (OSError, ValueError, FieldProblem):
            label = f"with an unreadable {name}"
        return f"an earlier {kind} {label}"
    try:
        status = f"status {read_run(directory)['status']!r}"
    except (OSError, ValueError):
        status = "no readable run.json"
    try:
        with os.fdopen(open_regular(directory / METRICS_FILE, max_bytes=None), "rb") as f:
            rows = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        rows = 0
    return f"an earlier run ({status}, {rows} metric row(s))"

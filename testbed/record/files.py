"""The run record on disk: ``metrics.jsonl`` (a line per measured step, flushed as it is written),
``run.json`` (resolved scenario, status, timings, environment; replaced atomically) and
``ranks/`` (per-rank error reports). Nothing completed is lost when a run fails: a JSON-lines
file only ever holds whole lines once a run has ended, and a reader says which lines it skipped.

Writers never follow a symbolic link (``record.safeio``). Readers stream (a 10⁶-line
metrics.jsonl is read line by line, never held whole) and validate against the record's schema
(``schema/records.py``): a malformed document is one ``RecordError`` naming the file and the
field, a malformed line is skipped with a ``RecordWarning`` naming the line and the field."""
from __future__ import annotations

import json
from importlib import metadata
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from testbed.record.safeio import RunDirError, open_record, write_bytes_atomic
from testbed.schema.jsonfile import load_json, open_regular
from testbed.schema.records import FieldProblem, RecordError, check_row, check_run, check_sweep

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
EVENTS_FILE = "events.jsonl"
TIMING_FILE = "timing.jsonl"


class RecordWarning(UserWarning):
    """A record file had lines a reader could not use; the message says which lines and why."""


#: a line longer than this is skipped unread (a 4096-rank pairwise matrix is ~200 MB: not a row we write)
MAX_LINE_BYTES = 64 << 20


def _clean(obj: Any) -> Any:
    """JSON has no NaN/Inf: they become None (the metrics flag them separately)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    """Deterministic, strict JSON (sorted keys, no NaN) so reruns compare byte for byte."""
    return json.dumps(_clean(obj), sort_keys=True, allow_nan=False, default=str)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write to a new temp file in the same directory, fsync, then rename over ``path``; a link at
    ``path`` is refused (``RunDirError``), never written through (``record.safeio``)."""
    text = json.dumps(_clean(obj), indent=2, sort_keys=True, allow_nan=False, default=str) + "\n"
    write_bytes_atomic(Path(path), text.encode("utf-8"))


class JsonlWriter:
    """Append-only JSON-lines file, one unbuffered write per line (a crash loses nothing written).

    A line is written whole or not at all: if a write fails (a full disk: ENOSPC after part of the
    line went out), the file is cut back to its last complete line before the error is raised.
    The file is opened without following a link (a planted one is a ``RunDirError``); ``new=True``
    also refuses a file that already exists (``O_EXCL``).
    """

    def __init__(self, path: Path, *, new: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | (os.O_EXCL if new else 0)
        self._fd = open_record(self.path, flags, 0o666)

    def write(self, row: Mapping[str, Any]) -> None:
        data = (dumps(row) + "\n").encode("utf-8")
        start = os.fstat(self._fd).st_size
        try:
            self._write_all(data)
        except OSError:
            try:
                os.ftruncate(self._fd, start)  # frees space, needs none
            except OSError:
                pass  # the launcher repairs the file when the run ends (repair_jsonl)
            raise

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def repair_jsonl(path: Path) -> int:
    """Cut a torn last line (a writer killed mid-line) so the file holds whole lines only; returns
    the bytes removed. Only for a file no one writes any more (the launcher, after the ranks)."""
    try:
        fd = open_record(path, os.O_RDWR)
    except FileNotFoundError:
        return 0
    with os.fdopen(fd, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end < size:
            f.truncate(end)
        return size - end


Check = Callable[[Any], Any]


def _is_object(row: Any) -> Any:
    return row


def iter_jsonl(path: Path, check: Check = _is_object) -> Iterator[dict[str, Any]]:
    """The rows of a JSON-lines file, read line by line (bounded memory). A line that is not JSON, or
    that ``check`` refuses (a ``FieldProblem``), is skipped; when the iteration ends a
    ``RecordWarning`` names the skipped lines and why: a torn line mid-file must not make a step
    silently disappear from a report or a gate. A missing file has no rows; a file that is not a
    regular file (a directory, a FIFO) is an OSError."""
    path = Path(path)
    try:
        fd = open_regular(path, max_bytes=None)
    except FileNotFoundError:
        return
    skipped: list[str] = []
    number = kept = 0
    with os.fdopen(fd, "rb") as f:
        while line := f.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                skipped.append(f"line {number} (longer than {MAX_LINE_BYTES} bytes)")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, deep nesting
                last = not line.endswith(b"\n")  # no newline after it: the writer never finished it
                skipped.append(f"line {number} ({'incomplete last line' if last else 'not valid JSON'})")
                continue
            if not isinstance(row, dict):
                skipped.append(f"line {number} (not a JSON object)")
                continue
            try:
                row = check(row)
            except FieldProblem as e:
                skipped.append(f"line {number} ({e})")
                continue
            kept += 1
            yield row
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        warnings.warn(RecordWarning(f"{path}: skipped {len(skipped)} of {kept + len(skipped)} line(s): {shown}"),
                      stacklevel=2)


def read_jsonl(path: Path, check: Check = _is_object) -> list[dict[str, Any]]:
    """Every row of ``iter_jsonl`` in a list (for files known to be small: events, a short run)."""
    return list(iter_jsonl(path, check))


def iter_metrics(run_dir: Path) -> Iterator[dict[str, Any]]:
    """The valid metrics rows of a run, streamed (``schema.records.check_row``)."""
    return iter_jsonl(Path(run_dir) / METRICS_FILE, check_row)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return list(iter_metrics(run_dir))


def read_json(path: Path) -> Any:
    """A JSON document: a regular file, bounded, strict (``schema.jsonfile``): OSError / ValueError."""
    return load_json(Path(path))


def read_run(run_dir: Path) -> dict[str, Any]:
    """``run.json``, validated: OSError if unreadable, ``RecordError`` (a ValueError) if malformed."""
    path = Path(run_dir) / RUN_FILE
    return _checked(path, check_run)


def read_sweep(sweep_dir: Path, name: str = "sweep.json") -> dict[str, Any]:
    """``sweep.json``, validated like ``read_run``."""
    return _checked(Path(sweep_dir) / name, check_sweep)


def _checked(path: Path, check: Check) -> dict[str, Any]:
    try:
        record = load_json(path)
    except ValueError as e:  # not UTF-8, not JSON, NaN, nested 200k deep
        raise RecordError.whole(path, str(e)) from None
    try:
        return check(record)
    except FieldProblem as e:
        raise e.at(path) from None


def iter_run_dirs(paths: list[Path]) -> Iterator[Path]:
    """Run directories under the given paths (a path may itself be a run directory)."""
    for p in paths:
        p = Path(p)
        if (p / RUN_FILE).exists():
            yield p
        elif p.is_dir():
            yield from sorted(d.parent for d in p.rglob(RUN_FILE))


def git_sha(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(backend: str, world_size: int, device: str) -> dict[str, Any]:
    """Versions and settings that decide whether two runs are comparable."""
    return {
        "python": platform.python_version(),
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "backend": backend,
        "device": device,
        "world_size": world_size,
        "git_sha": git_sha(Path(__file__).resolve().parent),
        "argv": sys.argv,
    }


def _version(package: str) -> str | None:
    """The loaded module's ``__version__`` (what actually runs), else the installed distribution's."""
    module = sys.modules.get(package)
    if module is not None and hasattr(module, "__version__"):
        return str(module.__version__)
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def default_run_dir(name: str, root: Path = Path("runs")) -> Path:
    """A new directory ``root/<name>-<time>[-n]``; RunDirError if it cannot be made."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if Path(name).name != name or name in (".", ".."):  # the scenario validator refuses these too
        raise RunDirError(root / name, "a scenario name must not leave the runs directory")
    base = root / f"{name}-{stamp}"
    candidate, n = base, 1
    while True:  # mkdir is atomic: two runs started in the same second get different dirs
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")
        except OSError as e:  # read-only, no permission, a name too long
            raise RunDirError(candidate, f"cannot create the run directory ({e.strerror or e})") from None

"""The run record on disk: ``metrics.jsonl`` (a line per measured step, flushed as it is written),
``run.json`` (resolved scenario, status, timings, environment; replaced atomically) and
``ranks/`` (per-rank error reports). Nothing completed is lost when a run fails: a JSON-lines
file only ever holds whole lines once a run has ended, and a reader says which lines it skipped."""
from __future__ import annotations

import json
from importlib import metadata
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
EVENTS_FILE = "events.jsonl"
TIMING_FILE = "timing.jsonl"


def _file_mode() -> int:
    """0o666 minus the umask: what ``open()`` gives, so run.json matches the other files (mkstemp
    alone makes it 0600). Read once at import, where no other thread can be creating files."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()


class RecordWarning(UserWarning):
    """A record file had lines a reader could not use; the message says which lines and why."""


class RunDirError(Exception):
    """A run directory cannot take this run: not creatable or writable, in use by another run,
    or holding an earlier run. One line for the person who chose it (a usage error, exit 2)."""

    def __init__(self, path: Path | str, why: str):
        self.path, self.why = Path(path), why
        super().__init__(f"{path}: {why}")


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
    """Write to a temp file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(_clean(obj), indent=2, sort_keys=True, allow_nan=False, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class JsonlWriter:
    """Append-only JSON-lines file, one unbuffered write per line (a crash loses nothing written).

    A line is written whole or not at all: if a write fails (a full disk: ENOSPC after part of the
    line went out), the file is cut back to its last complete line before the error is raised.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)

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
        with open(path, "r+b") as f:
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
    except FileNotFoundError:
        return 0


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file. Lines that are not a JSON object are skipped with a
    ``RecordWarning`` naming their numbers and why: a torn line mid-file must not make a step
    silently disappear from a report or a gate."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    lines = data.split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            last = number == len(lines)  # no newline after it: the writer never finished it
            skipped.append(f"line {number} ({'incomplete last line' if last else 'not valid JSON'})")
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            skipped.append(f"line {number} (not a JSON object)")
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        warnings.warn(RecordWarning(f"{path}: skipped {len(skipped)} of {len(rows) + len(skipped)} line(s): {shown}"),
                      stacklevel=2)
    return rows


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(Path(run_dir) / METRICS_FILE)


def read_run(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / RUN_FILE).read_text(encoding="utf-8"))


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


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))

"""The run record on disk: ``metrics.jsonl`` (a line per measured step, flushed as it is written),
``run.json`` (resolved scenario, status, timings, environment; replaced atomically) and
``ranks/`` (per-rank error reports). Nothing completed is lost when a run fails."""
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
from pathlib import Path
from typing import Any, Iterator, Mapping

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
EVENTS_FILE = "events.jsonl"


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
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(_clean(obj), indent=2, sort_keys=True, allow_nan=False, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class JsonlWriter:
    """Append-only JSON-lines file, flushed after every line (a crash loses nothing written)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, row: Mapping[str, Any]) -> None:
        self._f.write(dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a torn last line (process killed mid-write) is skipped."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
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
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = root / f"{name}-{stamp}"
    candidate, n = base, 1
    while True:  # mkdir is atomic: two runs started in the same second get different dirs
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))

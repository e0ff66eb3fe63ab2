"""The report's inputs: run directories (``metrics.jsonl``, ``run.json``) and sweep directories
(``sweep.json`` = ``{"scenario", "source", "parameter", "levels": [{"index", "label", "value",
"run_dir" (relative to the sweep dir), "status"}], "comparison"}``, levels taken in ``index`` order;
``comparison`` is the paired comparison against level 0, read defensively by ``ladder.py``).

Every record is read through its schema (``schema/records.py``) and streamed
(``engine.readback``): a hostile or broken input is one ``ReportInputError`` naming the file and
the field, and a run of any length is held as its summary, its verdict and at most
``record.digest.PLOT_POINTS`` rows to draw.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from testbed.engine.readback import digest_run, summary_of, verdict_of
from testbed.record.files import METRICS_FILE, RUN_FILE, read_run, read_sweep
from testbed.schema.records import SWEEP_FILE, printable


class ReportInputError(Exception):
    """An input the report cannot use; one line naming the file (and the field) for the user."""


@dataclass
class RunData:
    """One run as the report sees it: the rows to draw, not every row (``sampling`` says how)."""

    label: str
    run_dir: Path
    rows: list[dict[str, Any]]  # every measured row, or bucket means (record/digest.py)
    status: str
    summary: dict[str, Any]
    level: dict[str, Any] | None = None  # its entry in sweep.json, if it is a sweep level
    verdict: dict[str, Any] = field(default_factory=dict)  # run.json["verdict"] (docs/diagnosis.md)
    last_pairwise: tuple[int, list[list[float | None]]] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    world_size: int | None = None  # from run.json (a scenario's, or a monitor's top-level field)


@dataclass
class SweepData:
    sweep_dir: Path
    scenario: str
    parameter: str
    source: str
    runs: list[RunData] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # levels whose run dir has no metrics
    comparison: dict[str, Any] | None = None  # sweep.json["comparison"] (engine/control.py), if recorded


def _unreadable(path: Path, error: BaseException) -> ReportInputError:
    if isinstance(error, OSError):
        return ReportInputError(f"{path}: cannot be read ({error.strerror or error})")
    return ReportInputError(str(error) if str(error).startswith(str(path)) else f"{path}: {error}")


def load_run(run_dir: Path, label: str | None = None, level: dict[str, Any] | None = None) -> RunData:
    run_dir = Path(run_dir)
    try:
        meta = read_run(run_dir) if (run_dir / RUN_FILE).exists() else {}
    except (OSError, ValueError) as e:
        raise _unreadable(run_dir / RUN_FILE, e) from None
    world_size = (meta.get("scenario") or {}).get("world_size") or meta.get("world_size")  # a monitor's: top-level
    world_size = world_size if isinstance(world_size, int) and not isinstance(world_size, bool) else None
    try:
        digest = digest_run(run_dir, world_size)
    except OSError as e:
        raise _unreadable(run_dir / METRICS_FILE, e) from None
    name = label or (meta.get("scenario") or {}).get("name") or meta.get("name") or run_dir.name  # a monitor's: name
    status = (level or {}).get("status") or meta.get("status", "unknown")
    return RunData(printable(str(name)), run_dir, digest.plot_rows, status, summary_of(digest), level,
                   verdict_of(meta, digest, run_dir), digest.last_pairwise, digest.describe(), world_size)


def load_sweep(sweep_dir: Path) -> SweepData:
    try:
        meta = read_sweep(Path(sweep_dir))
    except (OSError, ValueError) as e:
        raise _unreadable(Path(sweep_dir) / SWEEP_FILE, e) from None
    sweep = SweepData(Path(sweep_dir), printable(meta["scenario"]), printable(meta["parameter"]),
                      printable(str(meta.get("source", ""))), comparison=meta.get("comparison"))
    for level in sorted(meta["levels"], key=lambda lv: lv["index"]):
        run_dir = Path(sweep_dir) / level["run_dir"]
        label = printable(level["label"])
        if (run_dir / METRICS_FILE).exists():
            sweep.runs.append(load_run(run_dir, label, level))
        else:
            sweep.missing.append(f"{label} ({level['status']})")
    return sweep


def load_inputs(paths: Sequence[Path]) -> tuple[list[SweepData], list[RunData]]:
    """Sweep dirs (``sweep.json``) and run dirs (``metrics.jsonl``); anything else is an error."""
    sweeps, runs = [], []
    for p in map(Path, paths):
        if (p / SWEEP_FILE).exists():
            sweeps.append(load_sweep(p))
        elif (p / METRICS_FILE).exists():
            runs.append(load_run(p))
        else:
            raise ReportInputError(f"{p}: neither a run directory ({METRICS_FILE}) nor a sweep directory "
                                   f"({SWEEP_FILE})")
    labels = [r.label for r in runs]
    for r, label in zip(runs, labels):  # two runs of one scenario: tell them apart by the end of their paths that differs
        same = [o.run_dir for o, other in zip(runs, labels) if other == label]
        if len(same) > 1:
            r.label = f"{label} ({printable(distinct_suffix(r.run_dir, same))})"
    return sweeps, runs


def distinct_suffix(path: Path, among: Sequence[Path]) -> str:
    """The shortest end of ``path`` that no other path in ``among`` shares (``A/testbed`` for
    ``A/testbed`` among ``B/testbed``); the whole path if none is shorter."""
    parts = Path(path).resolve().parts
    others = [Path(o).resolve().parts for o in among if Path(o).resolve() != Path(path).resolve()]
    for k in range(1, len(parts) + 1):
        if all(o[-k:] != parts[-k:] for o in others):
            return "/".join(parts[-k:])
    return str(path)

"""The launcher's side of the run record: run.json with status ``running`` before any rank starts,
and, however the run ends, a final run.json (status, reason, steps kept) over whole-line files.

``finish_record`` never raises: it runs in the launcher's ``finally`` (after a signal, a crash or
a full disk), where an exception would replace the real cause and leave ``running`` behind. On a
full disk the atomic rewrite (a second copy next to the first) can fail where an in-place rewrite
still fits, so that is the fallback; if nothing can be written the launcher says so on stderr.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from testbed.diagnose.verdict import verdict_record
from testbed.record.files import (EVENTS_FILE, METRICS_FILE, RUN_FILE, TIMING_FILE, dumps, environment,
                                  read_jsonl, repair_jsonl, write_json_atomic)
from testbed.scenario.spec import Scenario
from testbed.schema import event as E

# What a previous run in the same directory may have left; removed so it cannot mix with this one.
STALE_RECORD = (METRICS_FILE, EVENTS_FILE, TIMING_FILE, "ranks/rank*.json", "ranks/rank*.stack",
                "ranks/rank*.final.pt")
JSONL_FILES = (METRICS_FILE, EVENTS_FILE, TIMING_FILE)
LOW_DISK_BYTES = 1 << 20  # below this much free space a failed run is said to have met a full disk


def start_record(scenario: Scenario, out_dir: Path, backend: str, launcher: str) -> dict[str, Any]:
    """Write run.json with status 'running' before any rank starts (so a killed run still has one)."""
    run = {
        "scenario": scenario.to_dict(),
        "seeds": {"scenario": scenario.seed},
        "status": "running",
        "launcher": launcher,
        "started_at": time.time(),
        "environment": environment(backend, scenario.world_size, scenario.device),
    }
    write_json_atomic(out_dir / RUN_FILE, run)
    return run


def remove_stale_record(out_dir: Path) -> None:
    """A run directory holds one run: rows or error reports of an earlier run there would be
    mixed into this one's (appended metrics, a stale report taken for the root cause)."""
    for pattern in STALE_RECORD:
        for path in out_dir.glob(pattern):
            path.unlink(missing_ok=True)


def finish_record(out_dir: Path, run: dict[str, Any], result: Any) -> None:
    """Final status over whole-line files; also the non-finite events (a run that goes on past a
    NaN is "ok" but must not look clean: ``nonfinite.first`` names the rank and step where it
    began) and ``steps_kept``, the metric rows on disk. Never raises."""
    out_dir = Path(out_dir)
    torn = {}
    for name in JSONL_FILES:  # a rank killed mid-line (SIGKILL, a signal, a full disk) left a torn tail
        try:
            if cut := repair_jsonl(out_dir / name):
                torn[name] = cut
        except OSError:
            continue
    if result.status != "ok" and (note := disk_note(out_dir)):
        result.reason = f"{result.reason} ({note})"
    bad = [e for e in _rows(out_dir / EVENTS_FILE) if e.get(E.EVENT) in E.NONFINITE_EVENTS]
    run.update({
        "status": result.status,
        "reason": result.reason,
        "failed_rank": result.failed_rank,
        "failed_step": result.failed_step,
        "traceback": result.traceback,
        "wall_time_s": result.wall_time_s,
        "rank_reports": result.rank_reports,
        "nonfinite": {"count": len(bad), "first": bad[0] if bad else None},
        "steps_kept": len(_rows(out_dir / METRICS_FILE)),
        "torn_bytes_removed": torn,
        # over the completed steps, also of a failed run (docs/diagnosis.md); a monitored loop's
        # record has no scenario, its world size is top-level
        "verdict": verdict_record(_rows(out_dir / METRICS_FILE),
                                  world_size=run.get("world_size") or run.get("scenario", {}).get("world_size"),
                                  intended=intended_causes(run)),
    })
    _write_final(out_dir / RUN_FILE, run)


def intended_causes(run: dict[str, Any]) -> list[str]:
    """The exact causes the run declares on purpose: the monitor's ``intended`` (``fixed_order``), a
    scenario's ``intended`` (a ``replicate_batch`` baseline)."""
    declared = run.get("intended") or (run.get("scenario") or {}).get("intended") or []
    return [str(c) for c in declared] if isinstance(declared, (list, tuple)) else []


def disk_note(out_dir: Path) -> str:
    """"the run directory's filesystem is full (N bytes free)" when it nearly is, else ""."""
    try:
        free = shutil.disk_usage(out_dir).free
    except OSError:
        return ""
    return f"the run directory's filesystem is full: {free} bytes free" if free < LOW_DISK_BYTES else ""


def _rows(path: Path) -> list[dict[str, Any]]:
    try:
        return read_jsonl(path)
    except OSError:
        return []


def _write_final(path: Path, run: dict[str, Any]) -> None:
    try:
        write_json_atomic(path, run)
        return
    except OSError as e:
        first = e
    # In place: the old run.json's blocks are freed by the truncation and reused. A crash right
    # here could leave it torn; without this fallback a full disk always left "running".
    compact = {k: v for k, v in run.items() if k not in ("rank_reports", "environment")}
    for obj in (run, compact):
        try:
            with open(path, "r+" if path.exists() else "w", encoding="utf-8") as f:
                f.truncate(0)
                f.write(dumps(obj) + "\n")
                f.flush()
                os.fsync(f.fileno())
            return
        except (OSError, ValueError):
            continue
    sys.stderr.write(f"testbed: could not write the final {path} ({first.strerror or first}); "
                     f"status {run.get('status')!r}: {run.get('reason')}\n")

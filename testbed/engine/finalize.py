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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.diagnose.exact import ExactEvidence
from testbed.diagnose.verdict import verdict_record
from testbed.record.files import (EVENTS_FILE, METRICS_FILE, RUN_FILE, TIMING_FILE, dumps, environment,
                                  iter_jsonl, iter_metrics, repair_jsonl, write_json_atomic)
from testbed.record.rundir import RANKS_DIR, record_subdir, refuse_links, remove_record
from testbed.record.safeio import RunDirError, open_record
from testbed.record.sample import RowSample, count_lines, verdict_rows
from testbed.scenario.spec import Scenario
from testbed.schema import event as E

JSONL_FILES = (METRICS_FILE, EVENTS_FILE, TIMING_FILE)
LOW_DISK_BYTES = 1 << 20  # below this much free space a failed run is said to have met a full disk


@dataclass
class Ending:
    """How a run ended, as ``finish_record`` mirrors it into run.json: the launcher's result
    (``runner.RunResult``) and the monitor's ending are both one, so the keys have one owner."""

    status: str  # "ok" | "failed"
    reason: str = ""
    failed_rank: int | None = None
    failed_step: int | None = None
    traceback: str | None = None
    wall_time_s: float = 0.0
    rank_reports: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


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
    mixed into this one's (appended metrics, a stale report taken for the root cause). Removes the
    record's own files only (``record.rundir.remove_record``); a planted link is refused, and
    ``ranks/`` is made a real directory before any rank writes into it."""
    refuse_links(out_dir)
    remove_record(out_dir)
    record_subdir(out_dir, RANKS_DIR)


def finish_record(out_dir: Path, run: dict[str, Any], result: Ending) -> None:
    """Final status over whole-line files; also the non-finite events (a run that goes on past a
    NaN is "ok" but must not look clean: ``nonfinite.first`` names the rank and step where it
    began) and ``steps_kept``, the metric rows on disk. Never raises."""
    out_dir = Path(out_dir)
    torn = {}
    for name in JSONL_FILES:  # a rank killed mid-line (SIGKILL, a signal, a full disk) left a torn tail
        try:
            if cut := repair_jsonl(out_dir / name):
                torn[name] = cut
        except (OSError, RunDirError):  # unreadable, or a link / FIFO planted there: not touched
            continue
    if result.status != "ok" and (note := disk_note(out_dir)):
        result.reason = f"{result.reason} ({note})"
    nonfinite = _nonfinite_events(out_dir / EVENTS_FILE)
    steps_kept, sample, exact_items = verdict_input(out_dir, _world_size(run), intended_causes(run))
    run.update({
        "status": result.status,
        "reason": result.reason,
        "failed_rank": result.failed_rank,
        "failed_step": result.failed_step,
        "traceback": result.traceback,
        "wall_time_s": result.wall_time_s,
        "rank_reports": result.rank_reports,
        "nonfinite": nonfinite,
        "steps_kept": steps_kept,
        "torn_bytes_removed": torn,
        # over the completed steps, also of a failed run (docs/diagnosis.md); bounded (record/sample.py);
        # a monitored loop's record has no scenario, its world size is top-level
        "verdict": verdict_record(sample.rows(), world_size=_world_size(run), intended=intended_causes(run),
                                  exact_items=exact_items),
        "verdict_input": sample.describe(),
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


def _world_size(run: dict[str, Any]) -> int | None:
    """A scenario run's world size, or a monitored loop's (its record has no scenario)."""
    scenario = run.get("scenario")
    return run.get("world_size") or (scenario.get("world_size") if isinstance(scenario, dict) else None)


def verdict_input(out_dir: Path, world_size: int | None,
                  intended: list[str]) -> tuple[int, RowSample, list[Any] | None]:
    """One streaming pass over ``metrics.jsonl``: (valid rows on disk, the verdict's bounded sample of
    them, the exact evidence over every row). The exact rules (data, state, config) compare
    consecutive rows and want the first step a difference shows, so a long record's sample would
    miss them; they see every row here, in bounded memory (``diagnose.exact.ExactEvidence``).
    None when the world size is unknown (the verdict then reads them from the sample)."""
    path = out_dir / METRICS_FILE
    exact = ExactEvidence(world_size, intended) if world_size else None
    try:
        sample = RowSample(count_lines(path), verdict_rows(world_size))
        for index, row in enumerate(iter_metrics(out_dir)):
            sample.add(index, row)
            if exact is not None:
                exact.update(row)
        return sample.seen, sample, exact.items() if exact is not None else None
    except (OSError, RunDirError):
        return 0, RowSample(0), None


def _nonfinite_events(path: Path) -> dict[str, Any]:
    """How many non-finite events, and the first (streamed: a NaN run can log one per step)."""
    count, first = 0, None
    try:
        for event in iter_jsonl(path):
            if event.get(E.EVENT) in E.NONFINITE_EVENTS:
                count += 1
                first = first or event
    except OSError:
        pass
    return {"count": count, "first": first}


def _write_final(path: Path, run: dict[str, Any]) -> None:
    try:
        write_json_atomic(path, run)
        return
    except RunDirError as e:  # a link planted at run.json while the run ran: never written through
        sys.stderr.write(f"testbed: could not write the final {e}; status {run.get('status')!r}: "
                         f"{run.get('reason')}\n")
        return
    except OSError as e:
        first = e
    # A full disk: the atomic copy needs space the old run.json's blocks do not give. Rewrite in
    # place instead, but only with a record that fits in the old file's bytes (padded with spaces,
    # then truncated): the file is never emptied first, so a failure leaves the old record whole
    # (it was a 0-byte run.json before). Smaller records are tried in turn.
    essentials = ("status", "reason", "failed_rank", "failed_step", "wall_time_s", "steps_kept", "scenario",
                  "launcher", "started_at")
    compact = {k: v for k, v in run.items() if k not in ("rank_reports", "environment", "traceback")}
    minimal = {k: run.get(k) for k in essentials if k in run}
    bare = {k: run.get(k) for k in ("status", "reason", "steps_kept")}
    for obj in (run, compact, minimal, bare):
        if _rewrite_in_place(path, (dumps(obj) + "\n").encode("utf-8")):
            return
    sys.stderr.write(f"testbed: could not write the final {path} ({first.strerror or first}); "
                     f"status {run.get('status')!r}: {run.get('reason')}\n")


def _rewrite_in_place(path: Path, data: bytes) -> bool:
    try:
        fd = open_record(path, os.O_RDWR)
    except (OSError, RunDirError):
        return False
    try:
        size = os.fstat(fd).st_size
        if len(data) > size:
            return False
        padded = data[:-1] + b" " * (size - len(data)) + b"\n"  # JSON allows trailing whitespace
        view, offset = memoryview(padded), 0
        while offset < len(padded):
            offset += os.pwrite(fd, view[offset:], offset)
        os.ftruncate(fd, len(padded))
        os.fsync(fd)
        return True
    except (OSError, ValueError):
        return False
    finally:
        os.close(fd)

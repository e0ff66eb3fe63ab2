"""A finished record read back in bounded memory: its summary and verdict, for ``testbed run``'s
closing table, a sweep's level table and ``testbed report``, whatever the number of rows.

One streaming pass (``record.digest.RunDigest``). The summary is ``diagnose.summary.summarize`` of
the rows when the record is short enough to be sampled whole (``record/sample.py``: exact, as
before); for a longer one it is computed on the verdict's sample and the entries a sample would
change - each metric's final / peak / mean, the steps recorded, the flag count - are replaced by
the exact ones from the full pass. The verdict is the one the launcher recorded in run.json; only
a record without one gets it computed here, from the same sample.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from testbed.diagnose.summary import SUMMARY_METRICS, summarize
from testbed.diagnose.verdict import verdict_record
from testbed.engine.finalize import intended_causes, verdict_input
from testbed.record.digest import RunDigest
from testbed.record.files import METRICS_FILE, iter_metrics
from testbed.record.sample import count_lines


def digest_run(run_dir: Path, world_size: int | None = None) -> RunDigest:
    """Stream ``run_dir/metrics.jsonl`` once (OSError if it is not a readable regular file)."""
    digest = RunDigest(count_lines(Path(run_dir) / METRICS_FILE), SUMMARY_METRICS, world_size=world_size)
    for row in iter_metrics(run_dir):
        digest.add(row)
    return digest.finish()


def summary_of(digest: RunDigest) -> dict[str, Any]:
    """``summarize`` over every row (short records) or the sample with the exact entries laid over."""
    summary = summarize(digest.sample.rows())
    if digest.sample.sampled:
        summary.update(digest.exact_summary())
        summary["sampled"] = digest.describe()
    return summary


def verdict_of(run: dict[str, Any], digest: RunDigest, run_dir: Path | None = None) -> dict[str, Any]:
    """The recorded verdict, else one computed from the bounded sample (and, for a sampled record
    in ``run_dir``, the exact evidence of every row: a second streaming pass, as the launcher does)."""
    recorded = run.get("verdict")
    if isinstance(recorded, dict) and "headline" in recorded:
        return recorded
    world_size = (run.get("scenario") or {}).get("world_size") or run.get("world_size")  # a monitor's: top-level
    intended = intended_causes(run)
    exact_items = None
    if digest.sample.sampled and run_dir is not None:
        try:
            exact_items = verdict_input(Path(run_dir), world_size, intended)[2]
        except OSError:
            exact_items = None
    return verdict_record(digest.sample.rows(), world_size=world_size, intended=intended, exact_items=exact_items)

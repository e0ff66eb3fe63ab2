"""Per-run summaries: final and peak values of the dispersion metrics, as a dict and a table."""
from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np

from testbed.diagnose.attribution import attribute
from testbed.diagnose.attribution import describe as describe_outlier

# metric → which direction is "worse" (peak = the worst value seen over the run)
SUMMARY_METRICS: dict[str, str] = {
    "global_loss": "max",
    "loss_std": "max",
    "loss_cv": "max",
    "grad_norm_cv": "max",
    "cos_mean": "min",
    "cos_min": "min",
    "pairwise_cos_mean": "min",
    "noise_scale": "max",
}


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{metric: {final, peak, mean}}`` over the rows that have the metric, plus weight sync
    (first divergent step and rank(s)), the outlier-rank attribution and the flags."""
    out: dict[str, Any] = {"steps_recorded": sum(1 for r in rows if "loss" in r)}
    for key, worse in SUMMARY_METRICS.items():
        recorded = [r[key] for r in rows if key in r]  # None = non-finite or undefined at that step
        values = [v for v in recorded if v is not None]
        if not values:
            continue
        arr = np.asarray(values, dtype=np.float64)
        out[key] = {
            # the last recorded step's value, NaN if it was not finite: an earlier finite value
            # shown as "final" made a run that ended in NaN look healthy
            "final": float(recorded[-1]) if recorded[-1] is not None else float("nan"),
            "peak": float(arr.max() if worse == "max" else arr.min()),
            "mean": float(arr.mean()),
        }
    checks = [r for r in rows if "weights_in_sync" in r]
    if checks:
        bad = [r for r in checks if not r["weights_in_sync"]]
        out["weights_in_sync"] = not bad
        out["first_weight_divergence_step"] = bad[0]["step"] if bad else None
        if bad:
            ranks, reference = diverging_ranks(bad[0].get("weight_checksum", []))
            out["first_weight_divergence_ranks"], out["weight_divergence_reference"] = ranks, reference
    if out["steps_recorded"]:
        out["outlier"] = attribute(rows)
    flags = [dict(f, step=r["step"]) for r in rows for f in r.get("flags", [])]
    out["flags"] = flags[:50]
    out["flag_count"] = len(flags)
    return out


def diverging_ranks(checksums: Sequence[int]) -> tuple[list[int], str]:
    """Ranks whose weight checksum differs from the majority's, and the reference used.

    With no strict majority (e.g. two ranks, or a 2–2 split) no rank can be called the odd one
    out, so rank 0's value is the reference and the ranks that differ from it are named.
    """
    if not checksums:
        return [], "none"
    ranked = Counter(checksums).most_common()
    strict_majority = len(ranked) == 1 or ranked[0][1] > ranked[1][1]
    reference = ranked[0][0] if strict_majority else checksums[0]
    return [r for r, value in enumerate(checksums) if value != reference], \
        "majority" if strict_majority else "rank 0 (no majority)"


def format_table(summary: dict[str, Any]) -> str:
    """A short fixed-width table for the terminal."""
    lines = [f"{'metric':<20}{'final':>12}{'peak':>12}{'mean':>12}"]
    for key in SUMMARY_METRICS:
        if key in summary:
            s = summary[key]
            lines.append(f"{key:<20}{s['final']:>12.4g}{s['peak']:>12.4g}{s['mean']:>12.4g}")
    if "weights_in_sync" in summary:
        first = summary["first_weight_divergence_step"]
        ranks = ", ".join(str(r) for r in summary.get("first_weight_divergence_ranks") or [])
        lines.append(f"{'weights_in_sync':<20}{str(summary['weights_in_sync']):>12}"
                     + (f"   (first divergence at step {first}: rank(s) {ranks} differ from "
                        f"{summary.get('weight_divergence_reference')})" if first is not None else ""))
    if "outlier" in summary:  # the verdict's spike rule, shown per step; the verdict line judges the run
        lines.append(f"{'largest spike':<20}{describe_outlier(summary['outlier'])}")
    if summary.get("flag_count"):
        kinds = sorted({f"{f['kind']}@rank{f['rank']}" for f in summary["flags"]})
        lines.append(f"{'flags':<20}{summary['flag_count']:>12}   {', '.join(kinds[:6])}")
    return "\n".join(lines)

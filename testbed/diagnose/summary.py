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
    checked = [self_check_errors(r) for r in rows if r.get("self_check")]
    if checked:  # metrics.self_check: the measured values against the brute-force oracle
        out["self_check"] = {"steps": len(checked),
                             "max_error": {k: max(c.get(k, 0.0) for c in checked) for k in checked[0]}}
    flags = [dict(f, step=r["step"]) for r in rows for f in r.get("flags", [])]
    out["flags"] = flags[:50]
    out["flag_count"] = len(flags)
    return out


def self_check_errors(row: dict[str, Any]) -> dict[str, float]:
    """Largest deviation of a row's measured values from the brute-force oracle recorded beside them
    (``metrics.self_check``): relative for the norms, absolute for the cosines (bounded by 1, so
    this is relative to their scale; a cosine near 0 has no meaningful relative error). Entries
    that are null on either side (degenerate cases) are skipped."""
    want = row["self_check"]

    def worst(key: str, relative: bool) -> float:
        got, ref = np.asarray(row.get(key), dtype=np.float64), np.asarray(want.get(key), dtype=np.float64)
        ok = np.isfinite(got) & np.isfinite(ref) & ((ref != 0) if relative else True)
        diff = np.abs(got - ref)[ok] / (np.abs(ref[ok]) if relative else 1.0)
        return float(diff.max()) if diff.size else 0.0

    out = {"grad_norm": worst("grad_norm", True), "mean_grad_norm": worst("mean_grad_norm", True),
           "cos_to_mean": worst("cos_to_mean", False)}
    if row.get("pairwise_cos") is not None:
        out["pairwise_cos"] = worst("pairwise_cos", False)
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
    if "self_check" in summary:
        errors = summary["self_check"]["max_error"]
        lines.append(f"{'self_check':<20}{max(errors.values()):>12.2g}   (largest deviation from brute force over "
                     f"{summary['self_check']['steps']} steps: " + ", ".join(f"{k} {v:.1g}" for k, v in errors.items())
                     + "; norms relative, cosines absolute)")
    if summary.get("flag_count"):
        kinds = sorted({f"{f['kind']}@rank{f['rank']}" for f in summary["flags"]})
        lines.append(f"{'flags':<20}{summary['flag_count']:>12}   {', '.join(kinds[:6])}")
    return "\n".join(lines)

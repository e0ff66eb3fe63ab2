"""Per-run summaries: final and peak values of the dispersion metrics, as a dict and a table."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

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
    """``{metric: {final, peak, mean}}`` over the rows that have the metric, plus sync and flags."""
    out: dict[str, Any] = {"steps_recorded": sum(1 for r in rows if "loss" in r)}
    for key, worse in SUMMARY_METRICS.items():
        values = [r[key] for r in rows if r.get(key) is not None]
        if not values:
            continue
        arr = np.asarray(values, dtype=np.float64)
        out[key] = {
            "final": float(arr[-1]),
            "peak": float(arr.max() if worse == "max" else arr.min()),
            "mean": float(arr.mean()),
        }
    checks = [r for r in rows if "weights_in_sync" in r]
    if checks:
        bad = [r["step"] for r in checks if not r["weights_in_sync"]]
        out["weights_in_sync"] = not bad
        out["first_weight_divergence_step"] = bad[0] if bad else None
    flags = [dict(f, step=r["step"]) for r in rows for f in r.get("flags", [])]
    out["flags"] = flags[:50]
    out["flag_count"] = len(flags)
    return out


def format_table(summary: dict[str, Any]) -> str:
    """A short fixed-width table for the terminal."""
    lines = [f"{'metric':<20}{'final':>12}{'peak':>12}{'mean':>12}"]
    for key in SUMMARY_METRICS:
        if key in summary:
            s = summary[key]
            lines.append(f"{key:<20}{s['final']:>12.4g}{s['peak']:>12.4g}{s['mean']:>12.4g}")
    if "weights_in_sync" in summary:
        first = summary["first_weight_divergence_step"]
        lines.append(f"{'weights_in_sync':<20}{str(summary['weights_in_sync']):>12}"
                     + (f"   (first divergence at step {first})" if first is not None else ""))
    if summary.get("flag_count"):
        kinds = sorted({f"{f['kind']}@rank{f['rank']}" for f in summary["flags"]})
        lines.append(f"{'flags':<20}{summary['flag_count']:>12}   {', '.join(kinds[:6])}")
    return "\n".join(lines)

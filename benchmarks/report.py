"""Turn the raw per-round records into the overhead table, the plot and docs/performance.md.

Ratios are taken per round (variant time / plain-DDP time of the same round) and then summarised
by their median and interquartile range: load that drifts between rounds cancels in the ratio.
"""
from __future__ import annotations

import os
import platform
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from benchmarks.variants import ALL_VARIANTS, BASELINE, LABELS, VARIANTS

Key = tuple[int, str, int]  # (world size, model size label, samples per rank)
MB = 1e6
DOC_BEGIN, DOC_END = "<!-- overhead-results:begin -->", "<!-- overhead-results:end -->"


def _quartiles(values: Iterable[float]) -> tuple[float, float, float]:
    q1, med, q3 = np.percentile(np.asarray(list(values), dtype=np.float64), [25, 50, 75])
    return float(med), float(q1), float(q3)


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (world size, model, batch, variant): timing, ratio, memory and traffic."""
    timing: dict[Key, dict[str, dict[int, tuple[float, float]]]] = defaultdict(lambda: defaultdict(dict))
    memory: dict[Key, dict[str, dict[str, Any]]] = defaultdict(dict)
    meta: dict[Key, dict[str, Any]] = {}
    for rec in records:
        key = (rec["world_size"], rec["size"], rec["batch"])
        meta.setdefault(key, {"parameters": rec["parameters"], "loadavg": []})
        meta[key]["loadavg"].append(rec["loadavg_after"][0])
        if rec["mode"] == "time":
            timing[key][rec["variant"]][rec["round"]] = (rec["step_s"], rec["cpu_s"])
        else:
            memory[key][rec["variant"]] = rec
    rows = []
    for key in sorted(set(timing) | set(memory), key=lambda k: (k[0], meta[k]["parameters"], k[2])):
        variants = [v for v in ALL_VARIANTS if v in timing.get(key, {}) or v in memory.get(key, {})]
        for v in variants:
            row: dict[str, Any] = {"world_size": key[0], "size": key[1], "batch": key[2], "variant": v,
                                   "parameters": meta[key]["parameters"],
                                   "loadavg_max": max(meta[key]["loadavg"])}
            row.update(_timing_columns(timing.get(key, {}), v))
            row.update(_memory_columns(memory.get(key, {}), v))
            rows.append(row)
    return rows


def _timing_columns(by_variant: dict[str, dict[int, tuple[float, float]]], v: str) -> dict[str, Any]:
    if v not in by_variant:
        return {}
    times, plain = by_variant[v], by_variant.get(BASELINE.get(v, "plain"), {})  # per round, same baseline
    step_med, step_q1, step_q3 = _quartiles(t[0] for t in times.values())
    out: dict[str, Any] = {"step_ms": step_med * 1e3, "step_ms_iqr": (step_q3 - step_q1) * 1e3,
                           "cpu_ms": _quartiles(t[1] for t in times.values())[0] * 1e3, "rounds": len(times)}
    for name, i in (("ratio", 0), ("cpu_ratio", 1)):
        ratios = [times[r][i] / plain[r][i] for r in times if r in plain and plain[r][i] > 0]
        if ratios:
            med, q1, q3 = _quartiles(ratios)
            out.update({name: med, f"{name}_q1": q1, f"{name}_q3": q3})
    return out


def _memory_columns(by_variant: dict[str, dict[str, Any]], v: str) -> dict[str, Any]:
    if v not in by_variant:
        return {}
    rec, plain = by_variant[v], by_variant.get("plain")
    out: dict[str, Any] = {"peak_rss_mb": max(rec["rss_peak_kb"]) * 1e3 / MB,
                           "sent_mb": rec["traffic"]["sent"] / MB, "received_mb": rec["traffic"]["received"] / MB,
                           "collective_calls": rec["traffic"]["calls"],
                           "peak_resettable": rec["peak_resettable"]}
    if plain is not None:
        # Extra peak per rank: this variant's peak minus plain DDP's on the same rank (same baseline).
        extra = [a - b for a, b in zip(rec["rss_peak_kb"], plain["rss_peak_kb"])]
        out["extra_peak_mb"] = max(extra) * 1e3 / MB
        out["extra_received_mb"] = (rec["traffic"]["received"] - plain["traffic"]["received"]) / MB
        out["bucket_mb"] = max(plain["reducer_buckets"], default=0) / MB
    if v in ("metrics", "pairwise", "idle"):  # the hook all-reduces exactly the reducer's buckets
        out["hook_matches_reducer"] = sorted(rec["hook_all_reduce_calls"]) == sorted(rec["reducer_buckets"])
    if v == "a2a":  # ... or sends exactly them through the all-to-all
        out["hook_matches_reducer"] = sorted(rec.get("hook_all_to_all_calls", [])) == sorted(rec["reducer_buckets"])
    return out


def _fmt(value: Any, spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: one line per variant, grouped by configuration."""
    head = ("| ranks | model (params) | samples/rank | variant | step ms, median [IQR] | × baseline (wall), median [q1–q3] "
            "| × baseline (CPU) | peak RSS MB/rank | extra peak MB/rank | received MB/step/rank | extra received MB "
            "| collectives/step |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ratio = f"{r['ratio']:.3f} [{r['ratio_q1']:.3f}–{r['ratio_q3']:.3f}]" if "ratio" in r else "–"
        cpu = f"{r['cpu_ratio']:.3f} [{r['cpu_ratio_q1']:.3f}–{r['cpu_ratio_q3']:.3f}]" if "cpu_ratio" in r else "–"
        step = f"{r['step_ms']:.1f} [{r['step_ms_iqr']:.1f}]" if "step_ms" in r else "–"
        lines.append(
            f"| {r['world_size']} | {r['size']} ({r['parameters'] / 1e6:.2f}M) | {r['batch']} | {LABELS[r['variant']]} "
            f"| {step} | {ratio} | {cpu} | {_fmt(r.get('peak_rss_mb'), '.0f')} | {_fmt(r.get('extra_peak_mb'), '+.1f')} "
            f"| {_fmt(r.get('received_mb'), '.2f')} | {_fmt(r.get('extra_received_mb'), '+.2f')} "
            f"| {_fmt(r.get('collective_calls'), 'd')} |")
    return "\n".join(lines)


BASELINE_NOTE = ("Baseline of the ratio columns: plain DDP (a), measured in the same round; for (f2): plain FSDP2 (f); "
                 "for (g) and (i): (b). (f) itself is shown against plain DDP.")


def check_targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, each as one line: measured value, target, met or not."""
    by = {(r["world_size"], r["size"], r["batch"], r["variant"]): r for r in rows}
    out = []
    if any(r.get("peak_resettable") is False for r in rows):
        out.append("WARNING: the peak-RSS mark could not be reset (no /proc/self/clear_refs): peaks are "
                   "process-lifetime peaks, so the extra-memory columns are not per variant")
    for v, batch, limit, what in (("metrics", 512, 1.02, "plain DDP"), ("metrics", 64, 1.05, "plain DDP"),
                                  ("a2a", 512, 1.15, "plain DDP"), ("fsdp_metrics", 64, 1.10, "plain FSDP2"),
                                  ("fsdp_metrics", 512, 1.10, "plain FSDP2")):
        r = by.get((2, "11M", batch, v))
        if r and "ratio" in r:
            out.append(f"11M, 2 ranks, {batch} samples/rank: {LABELS[v]} {r['ratio']:.3f}× {what} wall time "
                       f"(IQR {r['ratio_q1']:.3f}–{r['ratio_q3']:.3f}; CPU {r['cpu_ratio']:.3f}×), target ≤ {limit} — "
                       f"{'met' if r['ratio'] <= limit else 'NOT met'}")
    for (w, size, batch, v), r in sorted(by.items()):
        naive = by.get((w, size, batch, "naive"))
        if v == "a2a" and naive and "ratio" in r and "ratio" in naive:
            ok = r["ratio"] < naive["ratio"] and r["cpu_ratio"] < naive["cpu_ratio"]
            out.append(f"{size}, {w} ranks, {batch}/rank: pairwise all-to-all {r['ratio']:.3f}× (CPU {r['cpu_ratio']:.3f}×) "
                       f"vs naive all_gather {naive['ratio']:.3f}× (CPU {naive['cpu_ratio']:.3f}×), target: below — "
                       f"{'met' if ok else 'NOT met'}")
    for (w, size, batch, v), r in sorted(by.items()):
        if v == "metrics" and "extra_peak_mb" in r and "bucket_mb" in r:
            ok = r["extra_peak_mb"] <= r["bucket_mb"]
            out.append(f"{size}, {w} ranks, {batch}/rank: metrics extra peak {r['extra_peak_mb']:+.1f} MB vs one "
                       f"bucket {r['bucket_mb']:.1f} MB — {'met' if ok else 'NOT met'}")
    for (w, size, batch, v), r in sorted(by.items()):
        naive = by.get((w, size, batch, "naive"))
        if v == "a2a" and w >= 4 and naive and "extra_peak_mb" in r and "extra_peak_mb" in naive:
            factor = naive["extra_peak_mb"] / max(r["extra_peak_mb"], 1.0)  # floor: 1 MB (RSS resolution)
            out.append(f"{size}, {w} ranks, {batch}/rank: naive extra peak {naive['extra_peak_mb']:.0f} MB / pairwise "
                       f"{r['extra_peak_mb']:.1f} MB = {factor:.0f}× (target ≥ 10×) — {'met' if factor >= 10 else 'NOT met'}")
    return out


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Overhead vs parameter count: columns = world sizes, rows = wall-time and CPU-time ratio;
    one line per variant × samples per rank, IQR bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted({r["world_size"] for r in rows})
    measures = (("ratio", "wall time / baseline"), ("cpu_ratio", "CPU time / baseline"))
    fig, axes = plt.subplots(len(measures), len(worlds), figsize=(6 * len(worlds), 4.2 * len(measures)),
                             squeeze=False, sharex=True)
    for row_axes, (key, ylabel) in zip(axes, measures):
        for ax, w in zip(row_axes, worlds):
            for v in VARIANTS[1:]:
                for batch, style in zip(sorted({r["batch"] for r in rows}), ("-", "--", ":")):
                    pts = sorted((r["parameters"], r[key], r[f"{key}_q1"], r[f"{key}_q3"]) for r in rows
                                 if r["world_size"] == w and r["variant"] == v and r["batch"] == batch and key in r)
                    if pts:
                        x, y, lo, hi = map(np.asarray, zip(*pts))
                        ax.errorbar(x, y, yerr=[y - lo, hi - y], linestyle=style, marker="o", capsize=3,
                                    label=f"{LABELS[v]}, {batch}/rank")
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_xscale("log")
            ax.set_title(f"{w} gloo ranks, 1 thread each")
            ax.set_ylabel(f"{ylabel} (median, IQR)")
            ax.grid(True, which="both", alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("parameters")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_section(rows: list[dict[str, Any]], command: str, info: dict[str, Any]) -> str:
    """The generated block of docs/performance.md."""
    m = info["machine"]
    load = ", ".join(f"{x:.2f}" for x in info["loadavg_start"]) + " → " + ", ".join(f"{x:.2f}" for x in info["loadavg_end"])
    parts = [
        DOC_BEGIN,
        f"Command: `{command}` (wall time {info['wall_s'] / 60:.1f} min, {info['date']}).",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), torch {m['torch']}, Python {m['python']}, {m['platform']}. "
        f"Load average (1, 5, 15 min) at start → end: {load}; highest 1-min load seen after a configuration: "
        f"{max(r['loadavg_max'] for r in rows):.2f}.",
        "",
        format_table(rows),
        "",
        BASELINE_NOTE,
        "",
        "Targets:",
        "",
        *[f"- {line}" for line in check_targets(rows)],
        "",
        f"![overhead vs parameter count]({info['plot_name']})",
        DOC_END,
    ]
    return "\n".join(parts)


def update_doc(path: Path, section: str) -> None:
    """Replace the generated block of the doc (or append it if the doc has none)."""
    text = path.read_text() if path.exists() else "# Performance\n"
    pattern = re.compile(re.escape(DOC_BEGIN) + ".*?" + re.escape(DOC_END), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)

"""The markdown tables of ``benchmarks/detection.py``'s raw results (a JSONL file): false alarms of the
healthy runs with Clopper–Pearson bounds, the perturbation grid (offline and online), and the online
latency against the floor per world size.

    python benchmarks/detection_table.py benchmarks/results/detection.jsonl > table.md
"""
from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ALPHA = 0.01


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) ≤ k)."""
    if p <= 0:
        return 1.0
    if p >= 1:
        return 1.0 if k >= n else 0.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
            for i in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(x - top) for x in logs))


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper–Pearson) two-sided interval for a binomial proportion k/n, by bisection."""
    if n == 0:
        return 0.0, 1.0
    tail = (1 - confidence) / 2

    def solve(f: Any) -> float:
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) else (lo, mid)
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else solve(lambda p: 1 - binomial_cdf(k - 1, n, p) < tail)
    upper = 1.0 if k == n else solve(lambda p: binomial_cdf(k, n, p) > tail)
    return lower, upper


def floor_steps(n: int, alpha: float = ALPHA) -> int:
    """⌈ln(1/α) / ln N⌉: no rank-exchangeability test can reject in fewer steps."""
    return math.ceil(math.log(1 / alpha) / math.log(n))


def _median(xs: list[float]) -> str:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return "-"
    mid = len(xs) // 2
    return f"{xs[mid]:g}" if len(xs) % 2 else f"{(xs[mid - 1] + xs[mid]) / 2:g}"


def _rate(k: int, n: int) -> str:
    lo, hi = clopper_pearson(k, n)
    return f"{k}/{n} ({100 * k / n:.1f} %, 95 % CI {100 * lo:.1f}–{100 * hi:.1f} %)" if n else "-"


def healthy_table(results: list[dict[str, Any]]) -> list[str]:
    runs = [r for r in results if r.get("healthy") and r.get("ok")]
    failed = sum(1 for r in results if r.get("healthy") and not r.get("ok"))
    offline = sum(r["status"] != "consistent" for r in runs)
    online = sum(r["online_alarm"] is not None for r in runs)
    named = sum(bool(r.get("named", r["ranks"])) or bool(r["online_named"]) for r in runs)
    lines = ["| healthy runs | offline verdict not consistent | online alarm | a rank named (either) |",
             "|---|---|---|---|",
             f"| {len(runs)} | {_rate(offline, len(runs))} | {_rate(online, len(runs))} | {_rate(named, len(runs))} |", ""]
    by_n: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        by_n[r["world_size"]].append(r)
    lines += ["| N | runs | offline alarms | online alarms |", "|---|---|---|---|"]
    for n in sorted(by_n):
        rs = by_n[n]
        lines.append(f"| {n} | {len(rs)} | {sum(r['status'] != 'consistent' for r in rs)} | "
                     f"{sum(r['online_alarm'] is not None for r in rs)} |")
    configs = sorted({r["cell"] for r in runs})
    lines += ["", f"{len(configs)} configurations (model / optimizer / schedule); runs that failed to complete: {failed}."]
    return lines


def grid_table(results: list[dict[str, Any]]) -> list[str]:
    cells: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        if not r.get("healthy") and r.get("ok"):
            cells[r["cell"]].append(r)
    lines = ["right ranks: the verdict's suspects are the perturbed ranks (both for N = 2), or its split has them as "
             "one side; a healthy rank named: by a rank's own evidence offline, or by an online alarm.", "",
             "| cell | N | runs | detected (offline) | right ranks | a healthy rank named | median step detected "
             "offline | online alarm: median steps after onset (floor) | online: median steps to name | alarm before onset |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for cell, rs in sorted(cells.items(), key=lambda kv: (kv[1][0]["world_size"], kv[0])):
        n = rs[0]["world_size"]
        detected = [r for r in rs if r["status"] != "consistent"]
        right = sum(bool(r["right"]) for r in detected)
        wrong = sum(bool(set(r.get("named", r["ranks"])) - set(r["expected"]) or set(r["online_named"]) - set(r["expected"]))
                    for r in rs if n > 2)
        delay = [r["online_alarm"] - r["onset"] + 1 for r in rs if r["online_alarm"] is not None and r["online_alarm"] >= r["onset"]]
        name_delay = [r["online_first_named"] - r["onset"] + 1 for r in rs if r["online_first_named"] is not None]
        early = sum(r["online_alarm"] is not None and r["online_alarm"] < r["onset"] for r in rs)
        lines.append(f"| {cell} | {n} | {len(rs)} | {len(detected)} | {right} | {wrong if n > 2 else '-'} | "
                     f"{_median([r['offline_step'] for r in detected])} | {_median(delay)} ({floor_steps(n)}) | "
                     f"{_median(name_delay)} | {early} |")
    return lines


def latency_table(results: list[dict[str, Any]]) -> list[str]:
    """Online steps from the onset to the alarm, per N, over the cells whose fault is blatant from its
    first step (label noise 0.5, lr ×2, seed desync, shard skew)."""
    blatant = ("label_noise 0.5", "lr x2.0", "seed_desync", "shard_skew")
    by_n: dict[int, list[int]] = defaultdict(list)
    for r in results:
        if not r.get("healthy") and r.get("ok") and r["cell"].startswith(blatant) and r["online_alarm"] is not None:
            by_n[r["world_size"]].append(r["online_alarm"] - r["onset"] + 1)
    lines = ["| N | floor ⌈ln(1/α)/ln N⌉ | runs | median steps to the alarm | 90th percentile |", "|---|---|---|---|---|"]
    for n in sorted(by_n):
        xs = sorted(by_n[n])
        p90 = xs[min(len(xs) - 1, math.ceil(0.9 * len(xs)) - 1)]
        lines.append(f"| {n} | {floor_steps(n)} | {len(xs)} | {_median(xs)} | {p90} |")
    return lines


def read_results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def markdown(results: list[dict[str, Any]]) -> str:
    wall = sum(r.get("wall_s", 0.0) for r in results)
    parts = ["### Healthy runs (false alarms, α = 0.01)", "", *healthy_table(results), "",
             "### Perturbation grid", "", *grid_table(results), "",
             "### Online latency vs the floor (blatant faults)", "", *latency_table(results), "",
             f"{len(results)} runs, {wall / 60:.0f} min of run wall time."]
    return "\n".join(parts)


if __name__ == "__main__":
    print(markdown(read_results(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/detection.jsonl"))))

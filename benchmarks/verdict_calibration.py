"""Calibration and power of the verdict (``testbed.diagnose``) on simulated runs — the numbers in
``docs/diagnosis.md``. Pure numpy, no processes.

    python benchmarks/verdict_calibration.py              # everything (≈ 10 min on 2 busy cores)
    python benchmarks/verdict_calibration.py --runs 200   # quicker, coarser

1. False alarms of the α-controlled part (spike rule off) on healthy runs: 2..16 ranks, 5..200
   steps, normal / Student-t(3) / Cauchy / spiky noise, drift of level and spread, shocks shared
   by all ranks, with and without pairwise matrices (``tests/verdict_streams.py``).
2. The same for the full verdict (spike rule on), by noise law.
3. Power: one rank's loss offset; groups (offset halves, shared gradient component).
4. The online test: false alarms over 1000-step streams; detection latency of an offset.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.diagnose import SequentialTest, diagnose  # noqa: E402
from testbed.diagnose.sequential import log_e_process, scores  # noqa: E402
from tests.verdict_streams import TAILS, Stream  # noqa: E402


def healthy(rng: np.random.Generator, steps: int | None = None) -> Stream:
    """A random healthy recipe; ``steps`` given: that length and no pairwise matrices (online test)."""
    n = int(rng.integers(2, 17))
    length = steps or int(rng.integers(5, 201))
    tails, noise = str(rng.choice(TAILS)), float(10 ** rng.uniform(-3, -0.5))
    drift, shock = float(rng.uniform(0, 3)), float(rng.uniform(0, 1))
    pairwise = 0 if steps else int(rng.choice([0, 0, 1, 5]))
    return Stream(n, length, tails=tails, noise=noise, drift=drift, shock=shock, pairwise_every=pairwise)


def false_alarms(runs: int, spikes: bool) -> None:
    rng = np.random.default_rng(12345)
    rejected = {t: 0 for t in TAILS}
    total = {t: 0 for t in TAILS}
    min_p = []
    for _ in range(runs):
        stream = healthy(rng)
        v = diagnose(stream.rows(int(rng.integers(1 << 31))), transient_threshold=8.0 if spikes else None)
        total[stream.tails] += 1
        rejected[stream.tails] += v.status != "consistent"
        min_p.append(v.min_p)
    p = np.array(min_p)
    print(f"  inconsistent at α = 0.01, by noise law: " + ", ".join(f"{t} {rejected[t]}/{total[t]}" for t in TAILS))
    print(f"  α-family (smallest Holm-adjusted p) ≤ 0.01: {(p <= 0.01).sum()}/{runs}, ≤ 0.05: "
          f"{(p <= 0.05).sum()}/{runs}, ≤ 0.1: {(p <= 0.1).sum()}/{runs}")


def power(seeds: int) -> None:
    print(f"one rank's loss +x %, 40 steps, ≈2 % rank-to-rank loss noise: inconsistent (rank named) of {seeds}")
    for n in (2, 4, 8, 16):
        cells = []
        for offset in (0.01, 0.02, 0.05, 0.10):
            hit = named = 0
            for seed in range(seeds):
                v = diagnose(Stream(n, 40, offset={n - 1: offset}).rows(100 + seed))
                hit += v.status == "inconsistent"
                named += v.ranks == ([0, 1] if n == 2 else [n - 1])
            cells.append(f"+{offset:.0%}: {hit} ({named})")
        print(f"  N={n:2d}: " + ", ".join(cells))
    print(f"groups reported exactly, of {seeds}: half the ranks +5 % loss | halves sharing a gradient component")
    for n in (4, 8, 16):
        half, other = list(range(n // 2)), list(range(n // 2, n))
        a = sum(diagnose(Stream(n, 40, offset={r: 0.05 for r in half}).rows(200 + s)).groups == [half, other]
                for s in range(seeds))
        b = sum(diagnose(Stream(n, 40, pairwise_every=2, grad_groups=(tuple(half), tuple(other))).rows(300 + s)).groups
                == [half, other] for s in range(seeds))
        print(f"  N={n:2d}: {a} | {b}")


def online(runs: int, seeds: int) -> None:
    rng = np.random.default_rng(0)
    sup = []
    for i in range(runs):
        loss, norm, cos = healthy(rng, steps=1000).arrays(i)
        sup.append(log_e_process([scores(np.log(loss)), scores(np.log(norm)), scores(cos)]).max())
    sup_arr = np.array(sup)
    print(f"  false alarms over 1000 steps, of {runs}: " +
          ", ".join(f"α = {a}: {(sup_arr >= np.log(1 / a)).sum()}" for a in (0.01, 0.05, 0.1)))
    print(f"  steps to the alarm (median [min, max] of {seeds}) for one rank's loss +x %, α = 0.01:")
    for n in (2, 4, 8, 16):
        cells = []
        for offset in (0.02, 0.05, 0.10):
            latency = []
            for seed in range(seeds):
                test = SequentialTest(n)
                for row in Stream(n, 400, offset={n - 1: offset}).rows(400 + seed):
                    if test.update(row) is not None:
                        latency.append(row["step"])
                        break
            cells.append(f"+{offset:.0%}: {np.median(latency):g} [{min(latency)}, {max(latency)}]" if latency
                         else f"+{offset:.0%}: none in 400")
        print(f"  N={n:2d}: " + ", ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="healthy runs for the false-alarm rates")
    parser.add_argument("--seeds", type=int, default=20, help="seeds per power cell")
    args = parser.parse_args()
    start = time.perf_counter()
    print(f"1. α-controlled part, {args.runs} healthy runs")
    false_alarms(args.runs, spikes=False)
    print(f"2. full verdict (spike rule on), {args.runs * 2 // 5} healthy runs")
    false_alarms(args.runs * 2 // 5, spikes=True)
    print("3. power")
    power(args.seeds)
    print("4. online test")
    online(max(100, args.runs * 3 // 10), max(5, args.seeds // 2))
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

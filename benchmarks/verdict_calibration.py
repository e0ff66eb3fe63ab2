"""Calibration and power of the verdict and of the online test on simulated runs — the simulation
numbers in ``docs/diagnosis.md``. Pure numpy, no processes.

    python benchmarks/verdict_calibration.py              # everything (≈ 15 min on 2 idle cores)
    python benchmarks/verdict_calibration.py --runs 200 --seeds 10   # quicker, coarser

1. False alarms of the verdict on healthy runs (``tests/verdict_streams.py``: 2..16 ranks, 5..200
   steps, normal / Student-t(3) / Cauchy / spiky noise, drift, shared shocks, pairwise matrices):
   the permutation family alone, and the full verdict (spike test on), by noise law.
2. Offline power: one rank's loss offset; spikes (×3 in a quiet run, ×10, ×100, two ×50).
3. Attribution: a healthy rank named, offline and online, with 1, 2 or half the ranks perturbed.
4. Online: false alarms over 1000-step streams; steps from the onset to the alarm against the
   floor ⌈ln(1/α)/ln N⌉, for effects of 0.5σ … 10σ (σ: one rank's own noise).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.diagnose import diagnose  # noqa: E402
from testbed.diagnose.betting import closed_names, run  # noqa: E402
from tests.verdict_streams import TAILS, Stream  # noqa: E402

ALPHA = 0.01
SIGMA = 0.02 * math.sqrt(0.98)  # one rank's log-loss noise in Stream(noise=0.02)


def healthy(rng: np.random.Generator, steps: int | None = None) -> Stream:
    """A random healthy recipe; ``steps`` given: that length and no pairwise matrices (online test)."""
    n = int(rng.integers(2, 17))
    length = steps or int(rng.integers(5, 201))
    tails, noise = str(rng.choice(TAILS)), float(10 ** rng.uniform(-3, -0.5))
    drift, shock = float(rng.uniform(0, 3)), float(rng.uniform(0, 1))
    pairwise = 0 if steps else int(rng.choice([0, 0, 1, 5]))
    return Stream(n, length, tails=tails, noise=noise, drift=drift, shock=shock, pairwise_every=pairwise)


def arrays(stream: Stream, seeds: range) -> np.ndarray:
    """``[T, B, K, N]``: comparable values of B simulated runs."""
    out = []
    for s in seeds:
        loss, norm, cos = stream.arrays(s)
        out.append(np.stack([np.log(loss), np.log(norm), cos], axis=1))
    return np.stack(out, axis=1)


def false_alarms(runs: int) -> None:
    rng = np.random.default_rng(12345)
    counts = {t: [0, 0, 0] for t in TAILS}  # runs, permutation family, full verdict
    for _ in range(runs):
        stream = healthy(rng)
        rows = stream.rows(int(rng.integers(1 << 31)))
        c = counts[stream.tails]
        c[0] += 1
        c[1] += diagnose(rows, transient_threshold=None).status != "consistent"
        c[2] += diagnose(rows).status != "consistent"
    print("   permutation family (spike test off): " + ", ".join(f"{t} {c[1]}/{c[0]}" for t, c in counts.items()))
    print("   full verdict (spike test on):        " + ", ".join(f"{t} {c[2]}/{c[0]}" for t, c in counts.items()))


def quiet(n: int, steps: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"step": t, "loss": (2.0 * np.exp(0.02 * rng.uniform(-1.7, 1.7, n))).tolist(),
             "grad_norm": ((1 + 0.02 * t) * np.exp(0.05 * rng.uniform(-1.7, 1.7, n))).tolist(),
             "cos_to_mean": (0.5 + 0.03 * rng.uniform(-1.7, 1.7, n)).tolist(), "flags": []} for t in range(steps)]


def power(seeds: int) -> None:
    print(f"   one rank's loss +x %, 40 steps, σ ≈ 2 %: inconsistent (exactly the right rank named) of {seeds}")
    for n in (2, 4, 8, 16):
        cells = []
        for offset in (0.02, 0.05, 0.10):
            vs = [diagnose(Stream(n, 40, offset={n - 1: offset}).rows(100 + s)) for s in range(seeds)]
            cells.append(f"+{offset:.0%}: {sum(v.status == 'inconsistent' for v in vs)} "
                         f"({sum(v.ranks == ([0, 1] if n == 2 else [n - 1]) for v in vs)})")
        print(f"   N={n:2d}: " + ", ".join(cells))
    print(f"   spikes on 4 ranks, 40 steps: confirmed (right rank and step) of {seeds}")
    cases = {"x3, quiet run": lambda s: _spiked(quiet(4, 40, s), [(12, 2, 3.0)]),
             "x10": lambda s: _spiked(Stream(4, 40).rows(s), [(12, 2, 10.0)]),
             "x100": lambda s: _spiked(Stream(4, 40).rows(s), [(12, 2, 100.0)]),
             "two x50 (steps 10, 22; ranks 1, 2)": lambda s: _spiked(Stream(4, 40).rows(s), [(10, 1, 50.0), (22, 2, 50.0)])}
    for label, make in cases.items():
        hits = 0
        for s in range(seeds):
            rows, want = make(200 + s)
            v = diagnose(rows)
            found = {(e.rank, e.effect["peak_step"]) for e in v.evidence if e.kind == "transient" and e.effect["confirmed"]}
            hits += found >= want
        print(f"   {label}: {hits}/{seeds}")


def _spiked(rows: list[dict], spikes: list[tuple[int, int, float]]) -> tuple[list[dict], set[tuple[int, int]]]:
    for step, rank, factor in spikes:
        rows[step]["grad_norm"][rank] *= factor
    return rows, {(rank, step) for step, rank, _ in spikes}


def attribution(seeds: int) -> None:
    print(f"   runs naming a healthy rank (offline verdict | online test), of {seeds}; 60 steps, +5 % loss on the faulty ranks")
    level = math.log(1 / ALPHA)
    for n, faulty in ((4, [3]), (8, [7]), (8, [6, 7]), (8, [0, 1, 2, 3]), (5, [3, 4])):
        stream = Stream(n, 60, offset={r: 0.05 for r in faulty})
        off = sum(bool(set(diagnose(stream.rows(300 + s)).ranks) - set(faulty)) and
                  len(diagnose(stream.rows(300 + s)).ranks) < n for s in range(seeds))
        bets, _ = run(arrays(stream, range(300, 300 + seeds)))
        on = sum(bool(set(closed_names(bets.members, bets.sup_log_e[b] >= level)) - set(faulty)) for b in range(seeds))
        print(f"   {len(faulty)} of {n} faulty {faulty}: {off} | {on}")


def online(runs: int, seeds: int) -> None:
    rng = np.random.default_rng(0)
    sup = []
    while len(sup) < runs:
        stream = healthy(rng, steps=1000)
        _, trace = run(arrays(stream, range(len(sup), len(sup) + 10)), np.ones((1, stream.world_size), dtype=bool))
        sup += trace[:, :, 0].max(axis=0).tolist()
    sup_arr = np.array(sup[:runs])
    print(f"   false alarms over 1000 steps, of {runs}: " +
          ", ".join(f"α = {a}: {(sup_arr >= math.log(1 / a)).sum()}" for a in (0.01, 0.05, 0.1)))
    onset, horizon = 20, 200
    print(f"   steps from the onset (step {onset}) to the alarm, median [90th percentile] of {seeds} runs, "
          f"for one rank's loss shifted by δσ (\"-\": under half alarm within {horizon} steps); α = {ALPHA}")
    print("   N   floor  " + "  ".join(f"δ={d:<5g}" for d in (0.5, 1, 2, 3, 5, 10)))
    for n in (2, 4, 8, 16):
        cells = []
        for delta in (0.5, 1, 2, 3, 5, 10):
            stream = Stream(n, onset + horizon, drift=0.0, offset={n - 1: math.expm1(delta * SIGMA)}, offset_from=onset)
            _, trace = run(arrays(stream, range(500, 500 + seeds)), np.ones((1, n), dtype=bool))
            delays = [int(np.flatnonzero(trace[:, b, 0] >= math.log(1 / ALPHA))[0]) - onset + 1
                      if (trace[:, b, 0] >= math.log(1 / ALPHA)).any() else math.inf for b in range(seeds)]
            ordered = sorted(delays)
            med, p90 = ordered[(len(ordered) - 1) // 2], ordered[math.ceil(0.9 * len(ordered)) - 1]
            cells.append(f"{med:g} [{p90:g}]".replace("inf", f">{horizon}") if math.isfinite(med) else "-")
        floor = math.ceil(math.log(1 / ALPHA) / math.log(n))
        print(f"   {n:<3} {floor:<6} " + "  ".join(f"{c:<7}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="healthy runs for the false-alarm rates")
    parser.add_argument("--seeds", type=int, default=20, help="seeds per power cell")
    args = parser.parse_args()
    start = time.perf_counter()
    print(f"1. false alarms, {args.runs} healthy runs (α = {ALPHA})")
    false_alarms(args.runs)
    print("2. offline power")
    power(args.seeds)
    print("3. attribution")
    attribution(args.seeds)
    print("4. online test")
    online(max(100, args.runs // 2), max(10, args.seeds))
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

"""``testbed report`` on records of the size long runs leave (issue 23: 10⁶ rows did not finish in
560 s and took 4 GB; the target is minutes and < 1 GB).

    python -m benchmarks.report_scale --rows 1000000 --out /tmp/scale            # generate + measure
    python -m benchmarks.report_scale --rows 200000 --out /tmp/scale --no-verdict  # verdict computed by report
    python -m benchmarks.report_scale --rows 2000 --out /tmp/scale --ranks 4      # smoke

Writes ``OUT/run-<rows>/`` (a generated run record: ``--ranks`` ranks, a pairwise matrix every
``--pairwise-every`` steps, a weight check every 10, rank 1 drifting upward after 60 % of the run,
a NaN flag at one step; not committed data), then runs ``testbed report`` on it in a child process
and prints the wall time and the child's peak RSS (``getrusage(RUSAGE_CHILDREN).ru_maxrss``), and
the report's own account of its sampling. ``--no-verdict`` leaves the verdict out of run.json, so
the report computes it (from the bounded sample, ``record/sample.py``). Measure on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def generate(run_dir: Path, rows: int, ranks: int, pairwise_every: int, seed: int = 0) -> int:
    """Write metrics.jsonl; returns its bytes."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    drift_from = int(rows * 0.6)
    with open(run_dir / "metrics.jsonl", "w", encoding="utf-8") as f:
        for step in range(rows):
            f.write(json.dumps(_row(step, ranks, rng, step >= drift_from, pairwise_every)) + "\n")
    return (run_dir / "metrics.jsonl").stat().st_size


def write_run(run_dir: Path, rows: int, ranks: int, with_verdict: bool) -> None:
    run: dict[str, Any] = {"status": "ok", "scenario": {"name": f"scale-{rows}", "world_size": ranks}, "steps_kept": rows}
    if with_verdict:
        run["verdict"] = {"status": "inconsistent", "ranks": [1], "headline": "inconsistent (generated record)",
                          "evidence": [], "steps": rows}
    (run_dir / "run.json").write_text(json.dumps(run))


def _row(step: int, ranks: int, rng: random.Random, drift: bool, pairwise_every: int) -> dict[str, Any]:
    base = 2.0 * math.exp(-step / 2e5) + 0.5
    loss = [base * (1 + 0.02 * rng.gauss(0, 1)) + (0.05 if drift and r == 1 else 0.0) for r in range(ranks)]
    grad = [1.0 + 0.05 * rng.gauss(0, 1) for _ in range(ranks)]
    cos = [min(1.0, 0.9 + 0.02 * rng.gauss(0, 1)) for _ in range(ranks)]
    mean = sum(loss) / ranks
    std = math.sqrt(sum((x - mean) ** 2 for x in loss) / ranks)
    gmean = sum(grad) / ranks
    gstd = math.sqrt(sum((x - gmean) ** 2 for x in grad) / ranks)
    row: dict[str, Any] = {"step": step, "loss": loss, "global_loss": mean, "loss_std": std, "loss_cv": std / mean,
                           "grad_norm": grad, "grad_norm_std": gstd, "grad_norm_cv": gstd / gmean, "cos_to_mean": cos,
                           "cos_mean": sum(cos) / ranks, "cos_min": min(cos), "mean_grad_norm": 0.9 * gmean,
                           "noise_scale": 100.0 + rng.random(), "lr": 1e-4, "flags": []}
    if step == 12345:
        row["flags"] = [{"rank": 2 % ranks, "kind": "nonfinite_loss"}]
        row["loss"][2 % ranks] = None
    if step % 10 == 0:
        row["weight_checksum"] = [123456789] * ranks
        row["weights_in_sync"] = True
    if pairwise_every and step % pairwise_every == 0:
        row["pairwise_cos"] = [[1.0 if i == j else 0.8 for j in range(ranks)] for i in range(ranks)]
        row["pairwise_cos_mean"] = 0.8
    return row


def measure(run_dir: Path, out: Path) -> dict[str, Any]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "testbed", "report", str(run_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - started
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    report = json.loads((out / "report.json").read_text()) if proc.returncode == 0 else {}
    sampled = report.get("runs", [{}])[0].get("summary", {}).get("sampled") if report else None
    return {"exit": proc.returncode, "wall_s": round(wall, 1), "peak_rss_mb": round(peak_mb),
            "sampled": sampled, "stderr_tail": proc.stderr.strip().splitlines()[-3:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--pairwise-every", type=int, default=1000)
    parser.add_argument("--no-verdict", action="store_true", help="run.json without a verdict: the report computes it")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--keep", action="store_true", help="reuse an already generated record of this size")
    args = parser.parse_args(argv)
    run_dir = args.out / f"run-{args.rows}"
    if not (args.keep and (run_dir / "metrics.jsonl").exists()):
        t0 = time.monotonic()
        size = generate(run_dir, args.rows, args.ranks, args.pairwise_every)
        print(f"generated {args.rows} rows, {size / 1e6:.0f} MB in {time.monotonic() - t0:.0f} s -> {run_dir}")
    write_run(run_dir, args.rows, args.ranks, not args.no_verdict)
    result = measure(run_dir, args.out / f"report-{args.rows}")
    print(json.dumps({"rows": args.rows, "ranks": args.ranks, "verdict_recorded": not args.no_verdict, **result},
                     indent=2))
    return 0 if result["exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

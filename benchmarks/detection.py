"""Detection benchmark on REAL multi-process runs — the tables in ``docs/diagnosis.md``.

Runs (``benchmarks/detection_grid.py``): ≥ 200 healthy runs (world sizes 2–8, MLP and transformer
models, SGD / AdamW, constant / linear / cosine schedules, some replicated baselines) and the
perturbation grid (label noise, lr mismatch, gradient spikes, seed desync, partial replication,
shard skew; onsets from the start and later; ≥ 5 seeds per cell). Each is an ordinary ``launch`` of
gloo ranks; then, on its recorded rows:

- offline: ``diagnose`` on the whole record (status, named ranks, groups, since/until) and on
  growing prefixes every ``--every`` steps (the first step it is not consistent);
- online: the rows replayed through ``SequentialTest`` (the monitor's test): the first alarm, the
  first alarm naming ranks, the ranks named, compared with the onset and the floor ⌈ln(1/α)/ln N⌉.

Raw results are appended to a JSONL file as runs finish (``--out``; resumable: runs already there
are skipped), then the markdown tables are printed (``benchmarks/detection_table.py``). The lead's
full run, on a quiet machine (≈ 60–75 min on 2 idle cores):

    python benchmarks/detection.py --out benchmarks/results/detection.jsonl > /tmp/detection-table.md

Smoke run (a few runs of each kind): ``python benchmarks/detection.py --healthy 2 --seeds 1 --limit 3 --out /tmp/d.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.detection_grid import STEPS, Run, healthy_runs, perturbed_runs  # noqa: E402
from benchmarks.detection_table import markdown, read_results  # noqa: E402
from testbed.diagnose import SequentialTest, diagnose  # noqa: E402
from testbed.record.files import read_metrics  # noqa: E402
from testbed.scenario.spec import load_scenario  # noqa: E402

ALPHA = 0.01


def judge(rows: list[dict[str, Any]], run: Run, every: int) -> dict[str, Any]:
    """The offline verdict (whole record and prefixes) and the online test replayed on the rows."""
    def verdict(part: list[dict[str, Any]]) -> Any:
        return diagnose(part, world_size=run.world_size, alpha=ALPHA, replicas_intended=run.replicas_intended)

    v = verdict(rows)
    offline = next((rows[k - 1]["step"] for k in range(every, len(rows) + 1, every)
                    if verdict(rows[:k]).status != "consistent"), None)
    test = SequentialTest(run.world_size, ALPHA)
    for row in rows:
        test.update(row)
    statistical = [a for a in test.alarms if a.kind in ("persistent", "transient")] or test.alarms
    first_named = next((a.step for a in test.alarms if a.ranks), None)
    expected = None if run.expected is None else sorted(run.expected) if run.world_size > 2 else [0, 1]
    split = v.groups is not None and expected is not None and expected in v.groups  # a split: that side is right
    return {"status": v.status, "ranks": v.ranks, "groups": v.groups, "since_step": v.since_step,
            "until_step": v.until_step, "right": expected is not None and (v.ranks == expected or split),
            "named": sorted({e.rank for e in v.evidence if e.rank is not None}),
            "offline_step": offline, "online_alarm": statistical[0].step if statistical else None,
            "online_first_named": first_named, "online_named": sorted({r for a in test.alarms for r in a.ranks}),
            "headline": v.headline()}


def run_one(run: Run, every: int) -> dict[str, Any]:
    from testbed.engine.runner import launch

    scenario = load_scenario(run.base, {**run.overrides, "timeout_s": 600.0})
    out: dict[str, Any] = {"key": run.key, "cell": run.cell, "world_size": run.world_size, "seed": run.seed,
                           "healthy": run.healthy, "expected": list(run.expected or ()), "onset": run.onset}
    with tempfile.TemporaryDirectory(prefix="testbed-detect-") as tmp:
        started = time.monotonic()
        result = launch(scenario, Path(tmp))
        rows = read_metrics(Path(tmp))
        out.update(ok=result.ok and bool(rows), reason=result.reason, wall_s=round(time.monotonic() - started, 1))
    if out["ok"]:
        out.update(judge(rows, run, every))
    return out


def plan(args: argparse.Namespace) -> list[Run]:
    """Healthy and perturbed runs interleaved, so a cut leaves both measured."""
    healthy = healthy_runs(args.healthy, args.steps) if args.only != "grid" else []
    grid = perturbed_runs(args.seeds, args.steps) if args.only != "healthy" else []
    if args.limit:
        healthy, grid = healthy[:args.limit], grid[::max(1, len(grid) // args.limit)][:args.limit]
    todo = []
    for i in range(max(len(healthy), len(grid))):
        todo += healthy[i:i + 1] + grid[i:i + 1]
    return todo


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--healthy", type=int, default=210, help="healthy runs (default 210)")
    p.add_argument("--seeds", type=int, default=5, help="seeds per perturbed cell (default 5)")
    p.add_argument("--steps", type=int, default=STEPS, help=f"steps per run (default {STEPS})")
    p.add_argument("--every", type=int, default=5, help="prefix stride for the offline steps to detect")
    p.add_argument("--only", choices=("healthy", "grid"), help="run only one part")
    p.add_argument("--limit", type=int, default=0, help="at most this many runs of each part (smoke runs)")
    p.add_argument("--budget-min", type=float, default=0.0, help="start no new run after this many minutes (0: none)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/detection.jsonl"), help="raw results (JSONL, resumable)")
    p.add_argument("--table-only", action="store_true", help="print the tables of what --out holds")
    args = p.parse_args(argv)
    done = {r["key"] for r in read_results(args.out)}
    started = time.monotonic()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for run in ([] if args.table_only else plan(args)):
        if run.key in done:
            continue
        if args.budget_min and time.monotonic() - started > 60 * args.budget_min:
            print("budget spent: not starting more runs", file=sys.stderr)
            break
        result = run_one(run, args.every)
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"{run.key}: {result.get('status', result.get('reason'))} {result.get('ranks')} "
              f"online {result.get('online_alarm')} ({result['wall_s']} s)", file=sys.stderr, flush=True)
    print(markdown(read_results(args.out)))


if __name__ == "__main__":
    main()

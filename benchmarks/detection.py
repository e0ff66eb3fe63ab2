"""Detection power of the verdict on REAL multi-process runs — the table in ``docs/diagnosis.md``.

Every cell is a perturbation × strength × world size (× ranks perturbed); every run is an ordinary
``launch`` of a catalog scenario with overrides, judged afterwards:

- detected: ``diagnose(rows).status != "consistent"``;
- right ranks: the verdict's suspects are exactly the perturbed ranks (two ranks: both, since a
  persistent difference between two ranks is not attributable; a split: the smaller group);
- offline steps to detect: the shortest prefix (every ``--every`` steps) the verdict rejects;
- online steps to detect: the first step ``SequentialTest`` raises an alarm.

Healthy runs (the perturbations removed; a ``replicate_batch`` baseline kept) of varied seeds,
models and world sizes give the false-alarm rate. Real runs are slow on a shared 2-core machine,
so results are appended to a JSONL file as they come (``--out``, resumable: finished runs are
skipped) and ``--budget-min`` stops starting new runs; the table says which cells did not run.

    python benchmarks/detection.py                 # the full grid (≥ 50 healthy runs; hours on 2 cores)
    python benchmarks/detection.py --quick         # a reduced grid (one seed per cell, 20 steps)
    python benchmarks/detection.py --table-only --out FILE   # print the table of what FILE holds
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.diagnose import SequentialTest, diagnose  # noqa: E402
from testbed.record.files import read_metrics  # noqa: E402
from testbed.scenario.spec import load_scenario  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent / "scenarios"
MLP, SEED, LM = ROOT / "label_noise.toml", ROOT / "seed_desync_1.toml", ROOT / "dropout_desync.toml"
REPLICATE = {"kind": "replicate_batch", "ranks": "all"}


@dataclass(frozen=True)
class Cell:
    """One row of the table: what is perturbed, how strongly, on which ranks of how many."""

    kind: str  # perturbation kind, or "healthy"
    strength: str  # human label of the strength
    world_size: int
    ranks: tuple[int, ...]
    base: Path
    perturbations: tuple[dict[str, Any], ...]
    model: str = "mlp"

    def key(self, seed: int, steps: int) -> str:
        return f"{self.kind}|{self.strength}|{self.world_size}|{list(self.ranks)}|{self.model}|{seed}|{steps}"


def _cells_for(n: int, quick: bool) -> list[Cell]:
    last = (n - 1,)
    cells = []
    for frac in ((0.1, 0.5) if quick else (0.05, 0.1, 0.2, 0.5)):
        cells.append(Cell("label_noise", f"fraction {frac}", n, last, MLP,
                          ({"kind": "label_noise", "ranks": list(last), "fraction": frac},)))
    for scale in ((1.05, 2.0) if quick else (1.05, 1.2, 1.5, 2.0)):
        cells.append(Cell("lr_mismatch", f"lr x{scale}", n, last, MLP,
                          ({"kind": "lr_mismatch", "ranks": list(last), "start_step": 5, "scale": scale},)))
    for factor in ((10.0, 1000.0) if quick else (1.1, 2.0, 10.0, 100.0, 1000.0)):
        cells.append(Cell("grad_corruption", f"grad x{factor:g} at step 8", n, (1,), MLP,
                          ({"kind": "grad_corruption", "ranks": [1], "start_step": 8, "end_step": 9,
                            "mode": "scale", "factor": factor},)))
    for k in ((1,) if quick else range(1, n // 2 + 1)):
        ranks = tuple(range(n - k, n))
        cells.append(Cell("seed_desync", f"{k} of {n} ranks", n, ranks, SEED,
                          (REPLICATE, {"kind": "seed_desync", "ranks": list(ranks)})))
        if not quick:
            cells.append(Cell("dropout_desync", f"{k} of {n} ranks", n, ranks, LM,
                              (REPLICATE, {"kind": "dropout_desync", "ranks": list(ranks), "offset": 1}), "transformer"))
            cells.append(Cell("shard_skew", f"task 0 only on {k} of {n}", n, ranks, LM,
                              ({"kind": "shard_skew", "ranks": list(ranks), "groups": 6, "keep": [0]},), "transformer"))
    return cells


def grid(quick: bool) -> tuple[list[Cell], list[Cell]]:
    """(perturbed cells, healthy cells) of the full or the reduced grid."""
    sizes = (2, 4) if quick else (2, 4, 8)
    cells = [c for n in sizes for c in _cells_for(n, quick)]
    if quick:  # the reduced grid: strength ladders at 4 ranks, one strong cell of each kind at 2
        cells = [c for c in cells if c.world_size == 4 or c.strength in ("fraction 0.5", "lr x2.0")]
    healthy = [Cell("healthy", "none", n, (), MLP, ()) for n in (sizes if quick else (2, 3, 4, 5, 8))]
    healthy += [Cell("healthy", "replicated", n, (), SEED, (REPLICATE,)) for n in ((4,) if quick else (2, 4, 8))]
    if not quick:
        healthy += [Cell("healthy", "none", n, (), LM, (), "transformer") for n in (2, 4)]
    return cells, healthy


def judge(rows: list[dict[str, Any]], cell: Cell, every: int) -> dict[str, Any]:
    """The verdict of the whole record, and the offline / online steps to detection."""
    v = diagnose(rows, world_size=cell.world_size)
    expected = sorted(cell.ranks) if cell.world_size > 2 or not cell.ranks else [0, 1]
    offline = None
    for k in range(every, len(rows) + 1, every):
        if diagnose(rows[:k], world_size=cell.world_size).status != "consistent":
            offline = rows[k - 1]["step"]
            break
    online = None
    test = SequentialTest(cell.world_size)
    for row in rows:
        if test.update(row) is not None:
            online = row["step"]
            break
    return {"status": v.status, "ranks": v.ranks, "groups": v.groups, "right": sorted(v.ranks) == expected,
            "offline_step": offline, "online_step": online, "headline": v.headline()}


def run_one(cell: Cell, seed: int, steps: int, every: int) -> dict[str, Any]:
    from testbed.engine.runner import launch

    scenario = load_scenario(cell.base, {"world_size": cell.world_size, "steps": steps, "seed": seed,
                                         "perturbations": [dict(p) for p in cell.perturbations],
                                         "expect": {}})
    with tempfile.TemporaryDirectory(prefix="testbed-detect-") as tmp:
        started = time.monotonic()
        result = launch(scenario, Path(tmp))
        rows = read_metrics(Path(tmp))
        out = {"key": cell.key(seed, steps), "ok": result.ok, "reason": result.reason,
               "wall_s": round(time.monotonic() - started, 1)}
    out.update(judge(rows, cell, every) if rows else {"status": "no rows"})
    return out


def table(cells: list[Cell], healthy: list[Cell], results: dict[str, dict[str, Any]], seeds: list[int],
          steps: int, healthy_seeds: list[int]) -> str:
    """Markdown: one line per cell (runs, detected, right ranks, median steps offline / online)."""
    def median(xs: list[int]) -> str:
        xs = sorted(xs)
        return "-" if not xs else f"{xs[len(xs) // 2]:g}" if len(xs) % 2 else f"{(xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2:g}"

    lines = ["| perturbation | strength | N | ranks | model | runs | detected | right ranks | median step offline | median step online |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for cell in cells + healthy:
        done = [results[k] for s in (healthy_seeds if cell.kind == "healthy" else seeds)
                if (k := cell.key(s, steps)) in results]
        if not done:
            lines.append(f"| {cell.kind} | {cell.strength} | {cell.world_size} | {list(cell.ranks)} | {cell.model} "
                         f"| not run | | | | |")
            continue
        det = [r for r in done if r.get("status") not in ("consistent", "no rows")]
        lines.append(f"| {cell.kind} | {cell.strength} | {cell.world_size} | {list(cell.ranks)} | {cell.model} "
                     f"| {len(done)} | {len(det)} | {sum(bool(r.get('right')) for r in det) if cell.ranks else '-'} "
                     f"| {median([r['offline_step'] for r in det if r.get('offline_step') is not None])} "
                     f"| {median([r['online_step'] for r in done if r.get('online_step') is not None])} |")
    runs = [results[k] for c in healthy for s in healthy_seeds if (k := c.key(s, steps)) in results]
    alarms = sum(r.get("status") != "consistent" for r in runs)
    lines.append(f"\nFalse alarms (full verdict, α = 0.01): {alarms} of {len(runs)} healthy runs; "
                 f"online alarms: {sum(r.get('online_step') is not None for r in runs)} of {len(runs)}.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the reduced grid")
    p.add_argument("--seeds", type=int, help="seeds per cell (default: 1 quick, 5 full; healthy cells ×2)")
    p.add_argument("--steps", type=int, help="steps per run (default: 20 quick, 40 full)")
    p.add_argument("--every", type=int, default=5, help="prefix stride for the offline steps to detect")
    p.add_argument("--budget-min", type=float, default=0.0, help="start no new run after this many minutes (0: no limit)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/detection.jsonl"), help="results (JSONL, resumable)")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    seeds = list(range(1, 1 + (args.seeds or (1 if args.quick else 5))))
    healthy_seeds = list(range(1, 1 + 2 * len(seeds)))
    steps = args.steps or (20 if args.quick else 40)
    cells, healthy = grid(args.quick)
    results: dict[str, dict[str, Any]] = {}
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                results[r["key"]] = r
    started = time.monotonic()
    # interleave healthy runs with perturbed cells so a budget cut leaves both kinds measured
    healthy_todo = [(c, s) for s in healthy_seeds for c in healthy]
    cell_todo = [(c, s) for s in seeds for c in cells]
    todo = []
    for i in range(max(len(healthy_todo), len(cell_todo))):
        todo += healthy_todo[i:i + 1] + cell_todo[i:i + 1]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for cell, seed in ([] if args.table_only else todo):
        if cell.key(seed, steps) in results:
            continue
        if args.budget_min and time.monotonic() - started > 60 * args.budget_min:
            print("budget spent: not starting more runs", file=sys.stderr)
            break
        r = run_one(cell, seed, steps, args.every)
        results[r["key"]] = r
        with open(args.out, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"{r['key']}: {r.get('status')} {r.get('ranks')} ({r['wall_s']} s)", file=sys.stderr, flush=True)
    print(table(cells, healthy, results, seeds, steps, healthy_seeds)
          .replace("False alarms", f"Healthy seeds {healthy_seeds}. False alarms"))


if __name__ == "__main__":
    main()

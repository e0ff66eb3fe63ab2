"""Metric overhead side by side with plain DDP and the naive all_gather, measured in one run.

    python benchmarks/overhead.py --quick     # < 3 min on 2 cores: 2 ranks, 1M and 11M, ratio table
    python benchmarks/overhead.py             # full: 1M/11M/50M × 2/4 ranks × 64/512 samples per rank;
                                              # writes docs/performance.md, docs/performance_overhead.png
    python benchmarks/overhead.py --state-check   # the exact channels' cost: 11M, 2 ranks, 64/rank; (g) vs (b)
                                                  # per state check, (i) vs (b) the data ledger per step,
                                                  # (h) attach's defaults vs plain DDP

Per world size two spawned gloo process groups run: a memory run (per-variant peak RSS and
counted bytes per step) and a timing run (variants interleaved round-robin; ratios per round).
See benchmarks/ranks.py for the method and benchmarks/variants.py for what each variant does.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and `testbed` importable
    sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.ranks import run_world  # noqa: E402
from benchmarks.variants import ALL_VARIANTS, LABELS, SIZES, VARIANTS  # noqa: E402
from testbed.scenario.cadence import WEIGHT_CHECK_EVERY  # noqa: E402

QUICK = {"sizes": ["1M", "11M"], "ranks": [2], "batches": [64, 512], "rounds": 3, "block_s": 0.25,
         "memory_sizes": ["11M"], "memory_batches": [64]}
FULL = {"sizes": ["1M", "11M", "50M"], "ranks": [2, 4], "batches": [64, 512], "rounds": 7, "block_s": 0.5,
        "memory_sizes": ["1M", "11M", "50M"], "memory_batches": [64]}  # extra memory does not depend on batch
STATE_CHECK = {"sizes": ["11M"], "ranks": [2], "batches": [64], "rounds": 9, "block_s": 1.0,
               "memory_sizes": [], "memory_batches": [], "variants": ["plain", "metrics", "state", "ledger", "monitor"]}


def make_plan(configs: list[dict[str, Any]], modes: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Everything a rank needs to know (plain data: it crosses the spawn boundary)."""
    return {"configs": configs, "modes": modes, "variants": list(args.variants), "rounds": args.rounds,
            "warmup": args.warmup, "min_steps": args.min_steps, "block_s": args.block_s, "threads": 1,
            "timeout_s": args.timeout, "memory_repeats": 2, "memory_steps": 2}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every world size: memory run, then timing run; returns all raw records."""
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="testbed-bench-") as tmp:
        for world in args.ranks:
            configs = [{"size": s, "batch": b} for s in args.sizes for b in args.batches]
            mem_configs = [c for c in configs if (args.memory_sizes is None or c["size"] in args.memory_sizes)
                           and (args.memory_batches is None or c["batch"] in args.memory_batches)]
            for modes, todo in ((["memory"], mem_configs), (["time"], configs)):
                if not todo or (modes == ["memory"] and args.no_memory):
                    continue
                started = time.monotonic()
                records += run_world(world, make_plan(todo, modes, args), Path(tmp) / f"{world}-{modes[0]}.json")
                print(f"[bench] {world} ranks, {modes[0]} run: {len(todo)} configs in "
                      f"{time.monotonic() - started:.0f} s, load average {os.getloadavg()[0]:.2f}", flush=True)
    return records


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small run (< 3 min on 2 cores); prints the table only")
    p.add_argument("--state-check", action="store_true",
                   help="the cost of the exact channels (11M, 2 ranks, 64/rank; variants plain, metrics, state, "
                        "ledger, monitor): the default state check per check and per step, the data ledger per "
                        "step; prints the table, leaves the docs alone")
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), help="model sizes")
    p.add_argument("--ranks", nargs="+", type=int, help="world sizes")
    p.add_argument("--batches", nargs="+", type=int, help="samples per rank")
    p.add_argument("--variants", nargs="+", choices=ALL_VARIANTS)
    p.add_argument("--rounds", type=int, help="interleaved rounds per config")
    p.add_argument("--block-s", type=float, help="target seconds per timed block (sets steps per block)")
    p.add_argument("--min-steps", type=int, default=1, help="at least this many steps per timed block")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the rounds")
    p.add_argument("--no-memory", action="store_true", help="skip the memory/traffic run")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per spawned run")
    p.add_argument("--json", type=Path, help="write raw records and the summary here")
    p.add_argument("--doc", type=Path, help="update this markdown file (full run default: docs/performance.md)")
    p.add_argument("--plot", type=Path, help="plot path (full run default: docs/performance_overhead.png)")
    p.add_argument("--no-doc", action="store_true", help="print only: leave the doc and the plot alone")
    p.add_argument("--from-json", type=Path, help="re-render table/plot/doc from a --json file of an earlier run")
    args = p.parse_args(argv)
    preset = STATE_CHECK if args.state_check else QUICK if args.quick else FULL
    for name in ("sizes", "ranks", "batches", "rounds", "block_s"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    if args.variants is None:
        args.variants = list(preset.get("variants", VARIANTS))
    if args.state_check:
        args.no_memory, args.no_doc = True, True
    custom_sizes = args.sizes != preset["sizes"] or args.batches != preset["batches"]
    args.memory_sizes = None if custom_sizes else preset["memory_sizes"]
    args.memory_batches = None if custom_sizes else preset["memory_batches"]
    if "plain" not in args.variants:
        p.error("--variants must include plain (every ratio is against it)")
    if not (args.quick or args.no_doc or args.state_check):
        args.doc = args.doc or ROOT / "docs" / "performance.md"
        args.plot = args.plot or ROOT / "docs" / "performance_overhead.png"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:  # same records, same command and machine info as when they were measured
        saved = json.loads(args.from_json.read_text())
        command, info, records = saved["command"], saved["info"], saved["records"]
    else:
        command = shlex.join(["python", "benchmarks/overhead.py", *(sys.argv[1:] if argv is None else argv)])
        info = {"machine": report.machine(), "loadavg_start": list(os.getloadavg()),
                "date": time.strftime("%Y-%m-%d %H:%M %Z")}
        print(f"[bench] {info['machine']['nproc']} CPUs ({info['machine']['cpu']}), torch {info['machine']['torch']}, "
              f"load average {', '.join(f'{x:.2f}' for x in info['loadavg_start'])}", flush=True)
        started = time.monotonic()
        records = run(args)
        info.update(wall_s=time.monotonic() - started, loadavg_end=list(os.getloadavg()))
    rows = report.summarize(records)
    print(report.format_table(rows))
    print(report.BASELINE_NOTE)
    for line in report.check_targets(rows):
        print("  " + line)
    for line in state_check_cost(rows):
        print("  " + line)
    print(f"[bench] load average at end: {', '.join(f'{x:.2f}' for x in info['loadavg_end'])}; "
          f"wall {info['wall_s']:.0f} s")
    if args.json and not args.from_json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command, "info": info, "records": records, "rows": rows}, indent=1))
    if args.plot:
        report.plot(rows, args.plot)
        info["plot_name"] = os.path.relpath(args.plot, (args.doc or args.plot).parent)
    if args.doc:
        info.setdefault("plot_name", "performance_overhead.png")
        report.update_doc(args.doc, report.results_section(rows, command, info))
        print(f"[bench] wrote {args.doc}" + (f" and {args.plot}" if args.plot else ""))
    return 0

def state_check_cost(rows: list[dict[str, Any]]) -> list[str]:
    """The default state check's price: one check = (g) - (b); at the default cadence (step 0, then
    every WEIGHT_CHECK_EVERY steps) its share per step; and attach()'s defaults, all in, vs plain DDP."""
    by = {(r["world_size"], r["size"], r["batch"], r["variant"]): r for r in rows}
    out = []
    for (w, size, batch, v), r in sorted(by.items()):
        metrics, plain = by.get((w, size, batch, "metrics")), by.get((w, size, batch, "plain"))
        if v == "state" and metrics and plain and "step_ms" in r and "step_ms" in metrics and "ratio" in r:
            per_check = r["step_ms"] - metrics["step_ms"]
            per_step = per_check / WEIGHT_CHECK_EVERY
            out.append(f"{size}, {w} ranks, {batch}/rank: one state check {per_check:+.2f} ms (step {r['ratio']:.3f}× "
                       f"of {LABELS['metrics']}, IQR {r['ratio_q1']:.3f}–{r['ratio_q3']:.3f}); at the default "
                       f"cadence (1 step in {WEIGHT_CHECK_EVERY}) {per_step:+.3f} ms per step = "
                       f"{100 * per_step / plain['step_ms']:+.2f} % of a plain DDP step ({plain['step_ms']:.1f} ms)")
        if v == "ledger" and metrics and plain and "step_ms" in r and "step_ms" in metrics and "ratio" in r:
            per_step = r["step_ms"] - metrics["step_ms"]
            out.append(f"{size}, {w} ranks, {batch}/rank: the data ledger {per_step:+.2f} ms per step (step "
                       f"{r['ratio']:.3f}× of {LABELS['metrics']}, IQR {r['ratio_q1']:.3f}–{r['ratio_q3']:.3f}) = "
                       f"{100 * per_step / plain['step_ms']:+.2f} % of a plain DDP step ({plain['step_ms']:.1f} ms)")
        if v == "monitor" and "ratio" in r:
            out.append(f"{size}, {w} ranks, {batch}/rank: {LABELS['monitor']} {r['ratio']:.3f}× plain DDP wall time "
                       f"(IQR {r['ratio_q1']:.3f}–{r['ratio_q3']:.3f}; CPU {r['cpu_ratio']:.3f}×)")
    return out


if __name__ == "__main__":
    sys.exit(main())

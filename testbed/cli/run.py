"""``testbed run [SCENARIO]``: one scenario as a real multi-process DP job, then its summary."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from testbed.cli.common import EXIT_FAILED, EXIT_OK, add_override_arguments, overrides_of
from testbed.diagnose.summary import format_table, summarize
from testbed.engine import launch_plan
from testbed.record.files import EVENTS_FILE, default_run_dir, read_jsonl, read_metrics
from testbed.scenario.spec import load_scenario

#: the embedded default scenario (``testbed run`` with no argument)
DEFAULT_SCENARIO = Path(__file__).resolve().parent.parent / "scenario" / "default.toml"


def cmd_run(args: argparse.Namespace) -> int:
    from testbed.engine.runner import launch

    scenario_path = args.scenario or DEFAULT_SCENARIO
    scenario = load_scenario(scenario_path, overrides_of(args))
    if getattr(args, "dry_run", False):
        return launch_plan.print_plan(scenario, scenario_path, args)
    out_dir = Path(args.out) if args.out else default_run_dir(scenario.name)
    print(f"testbed: running {scenario.name!r}: {scenario.world_size} ranks × {scenario.steps} steps "
          f"({scenario.model.kind} / {scenario.data.kind}, {scenario.optim.kind}) → {out_dir}", flush=True)
    if getattr(args, "launcher", "spawn") == "torchrun":
        result = launch_plan.launch_torchrun(scenario, scenario_path, out_dir, args)
    else:
        result = launch(scenario, out_dir)
    rows = read_metrics(out_dir)
    print(format_table(summarize(rows)))
    if result.ok:
        bad = [e for e in read_jsonl(out_dir / EVENTS_FILE) if str(e.get("event", "")).startswith("nonfinite")]
        if bad:  # on_nonfinite = "continue": the run is complete, but must not look clean
            print(f"WARNING: {len(bad)} non-finite event(s); the first: {bad[0].get('event')} on rank "
                  f"{bad[0].get('rank')} at step {bad[0].get('step')} (see {out_dir}/events.jsonl)", file=sys.stderr)
        if result.reason:
            print(f"note: {result.reason}", file=sys.stderr)
        print(f"ok in {result.wall_time_s:.1f} s; record: {out_dir}/metrics.jsonl, {out_dir}/run.json")
        if getattr(args, "control", False):
            from testbed.engine.control import describe_control, run_control
            print(describe_control(run_control(scenario, out_dir)))
        return EXIT_OK
    print(f"FAILED: {result.reason}", file=sys.stderr)
    if result.traceback:
        print(result.traceback, file=sys.stderr)
    print(f"{len(rows)} completed step(s) kept in {out_dir}/metrics.jsonl", file=sys.stderr)
    return EXIT_FAILED


def add_subcommand(subparsers: Any) -> None:
    run = subparsers.add_parser("run", help="run one scenario as a real multi-process DP job")
    run.add_argument("scenario", type=Path, nargs="?", default=None,
                     help="scenario file (default: the embedded default scenario)")
    run.add_argument("--out", help="run directory (default: runs/<name>-<timestamp>)")
    run.add_argument("--control", action="store_true", help="also run it with its perturbations removed "
                     "(same seeds) into OUT/control and report paired differences with confidence intervals")
    add_override_arguments(run)
    launch_plan.add_arguments(run)
    run.set_defaults(func=cmd_run)

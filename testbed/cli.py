"""Command line: ``testbed run | list``; each subcommand is a small function over the library."""
from __future__ import annotations

import argparse
import importlib
import sys
import tomllib
from pathlib import Path
from typing import Sequence

from testbed import launch_plan
from testbed.record import EVENTS_FILE, default_run_dir, read_jsonl, read_metrics
from testbed.spec import ScenarioError, load_scenario
from testbed.summary import format_table, summarize

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_SCENARIO_DIR = Path("scenarios")
DEFAULT_SCENARIO = Path(__file__).with_name("default.toml")


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {}
    if getattr(args, "steps", None) is not None:
        out["steps"] = args.steps
    if getattr(args, "world_size", None) is not None:
        out["world_size"] = args.world_size
    for item in getattr(args, "set", None) or []:
        key, _, value = item.partition("=")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value  # a bare string
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from testbed.runner import launch

    scenario_path = args.scenario or DEFAULT_SCENARIO
    scenario = load_scenario(scenario_path, _overrides(args))
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
        return EXIT_OK
    print(f"FAILED: {result.reason}", file=sys.stderr)
    if result.traceback:
        print(result.traceback, file=sys.stderr)
    print(f"{len(rows)} completed step(s) kept in {out_dir}/metrics.jsonl", file=sys.stderr)
    return EXIT_FAILED


def scenario_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*.toml") if p.is_file())


def cmd_list(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    files = scenario_files(directory)
    if not files:
        print(f"no scenario files under {directory}", file=sys.stderr)
        return EXIT_USAGE
    width = max(len(str(p.relative_to(directory))) for p in files)
    for path in files:
        try:
            s = load_scenario(path)
            line = f"{s.world_size}r {s.steps:>4}st  {s.description.splitlines()[0] if s.description else ''}"
        except ScenarioError as e:
            line = f"INVALID: {e}"
        print(f"{str(path.relative_to(directory)):<{width}}  {line}")
    return EXIT_OK


# Modules that add their own subcommand: each defines ``add_subcommand(subparsers)`` and sets
# ``func`` on its parser. Add a module here to add a command.
SUBCOMMAND_MODULES: tuple[str, ...] = ("testbed.sweep", "testbed.gate", "testbed.report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="testbed", description="Find silent inconsistency in data-parallel training.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one scenario as a real multi-process DP job")
    run.add_argument("scenario", type=Path, nargs="?", default=None,
                     help="scenario file (default: the embedded default, shuffle desync on 1 of 4 ranks)")
    run.add_argument("--out", help="run directory (default: runs/<name>-<timestamp>)")
    run.add_argument("--steps", type=int)
    run.add_argument("--world-size", type=int)
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override any field, e.g. --set optim.lr=0.01 --set perturbations.0.ranks=[1]")
    launch_plan.add_arguments(run)
    run.set_defaults(func=cmd_run)
    lst = sub.add_parser("list", help="list the scenario catalog")
    lst.add_argument("dir", nargs="?", default=str(DEFAULT_SCENARIO_DIR))
    lst.set_defaults(func=cmd_list)
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).add_subcommand(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ScenarioError as e:
        print(f"testbed: scenario error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("testbed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

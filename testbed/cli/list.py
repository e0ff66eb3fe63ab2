"""``testbed list [DIR]``: the scenario catalog, one line per file (invalid files say why)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from testbed.cli.common import EXIT_OK, EXIT_USAGE
from testbed.scenario.errors import ScenarioError
from testbed.scenario.spec import load_scenario

DEFAULT_SCENARIO_DIR = Path("scenarios")


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


def add_subcommand(subparsers: Any) -> None:
    lst = subparsers.add_parser("list", help="list the scenario catalog")
    lst.add_argument("dir", nargs="?", default=str(DEFAULT_SCENARIO_DIR))
    lst.set_defaults(func=cmd_list)

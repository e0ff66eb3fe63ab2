"""``testbed list [DIR]``: the scenario catalog, one line per file (invalid files say why).

Without DIR: ``./scenarios`` if the working directory has one, and the catalog this install ships
(``testbed.scenario.catalog``), so the list works from any directory. The first column is the name
``testbed run NAME`` accepts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from testbed.cli.common import EXIT_OK, EXIT_USAGE
from testbed.scenario import catalog
from testbed.scenario.errors import ScenarioError
from testbed.scenario.spec import load_scenario


def cmd_list(args: argparse.Namespace) -> int:
    directories = [Path(args.dir)] if args.dir is not None else catalog.search_dirs()
    listed = [(d, catalog.scenario_files(d)) for d in directories]
    if not any(files for _, files in listed):
        where = ", ".join(str(d) for d in directories) or "this install (no ./scenarios, no shipped catalog)"
        print(f"no scenario files under {where}", file=sys.stderr)
        return EXIT_USAGE
    width = max(len(catalog.catalog_name(p, d)) for d, files in listed for p in files)
    shown: set[str] = set()
    for directory, files in listed:
        if len(listed) > 1 and files:
            print(f"# {directory}" + (" (shipped with testbed)" if directory == catalog.shipped_dir() else ""))
        for path in files:
            name = catalog.catalog_name(path, directory)
            print(f"{name:<{width}}  {_describe(path)}{'  (shadowed by ./scenarios)' if name in shown else ''}")
            shown.add(name)
    return EXIT_OK


def _describe(path: Path) -> str:
    try:
        s = load_scenario(path)
    except ScenarioError as e:
        return f"INVALID: {e}"
    return f"{s.world_size}r {s.steps:>4}st  {s.description.splitlines()[0] if s.description else ''}"


def add_subcommand(subparsers: Any) -> None:
    lst = subparsers.add_parser("list", help="list the scenario catalog (./scenarios and the shipped one)")
    lst.add_argument("dir", nargs="?", default=None,
                     help="a folder of scenario files (default: ./scenarios if present, and the shipped catalog)")
    lst.set_defaults(func=cmd_list)

"""``testbed`` — the parser and the dispatch; each subcommand lives in its own module."""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import Any, Sequence

from testbed.cli.common import EXIT_USAGE
from testbed.record.files import RecordWarning
from testbed.scenario.errors import ScenarioError

# Modules that add their own subcommand: each defines ``add_subcommand(subparsers)`` and sets
# ``func`` on its parser. Add a module here to add a command.
SUBCOMMAND_MODULES: tuple[str, ...] = ("testbed.cli.run", "testbed.cli.list", "testbed.cli.sweep",
                                       "testbed.cli.gate", "testbed.cli.report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="testbed", description="Find silent inconsistency in data-parallel training.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).add_subcommand(sub)
    return parser


def _show_record_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                         line: Any = None, _default: Any = warnings.showwarning) -> None:
    """Skipped record lines are one line for the reader, not a Python warning with a source line."""
    if issubclass(category, RecordWarning):
        print(f"testbed: warning: {message}", file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _show_record_warning
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

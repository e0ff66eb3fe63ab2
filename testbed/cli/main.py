"""``testbed`` — the parser and the dispatch; each subcommand lives in its own module."""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import Any, Sequence

from testbed.cli import terminal
from testbed.cli.common import EXIT_FAILED, EXIT_USAGE
from testbed.engine.signals import exit_code
from testbed.record.files import RecordWarning, RunDirError
from testbed.scenario.errors import ScenarioError
from testbed.schema.records import RecordError

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
    """Parse, dispatch, and turn every expected failure into one line and an exit code: 2 for a bad
    scenario, record or directory, 128 + N for signal N, 1 for an output that cannot be written."""
    saved = sys.stdout, sys.stderr
    out, err = terminal.install()
    try:
        return _dispatch(argv)
    finally:
        terminal.finish(out, err)
        sys.stdout, sys.stderr = saved


def _dispatch(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = warnings.showwarning
    warnings.showwarning = _show_record_warning
    try:
        return args.func(args)
    except ScenarioError as e:
        print(f"testbed: scenario error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (RecordError, RunDirError) as e:  # a malformed record file; an unusable or foreign directory
        print(f"testbed {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:  # Ctrl-C (130), SIGTERM (143), SIGHUP (129): records are finalized
        print("testbed: interrupted" + (f" by {e.signame}" if hasattr(e, "signame") else ""), file=sys.stderr)
        return exit_code(e)
    except OSError as e:  # a file the command could not write or read (a full disk, no permission)
        where = f"{e.filename}: " if e.filename else ""
        print(f"testbed {args.command}: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())

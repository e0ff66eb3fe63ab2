"""cli — the ``testbed`` command: argument parsing and one module per subcommand, nothing else.

Each ``cli/<command>.py`` defines ``add_subcommand(subparsers)`` and a ``cmd_<command>(args)`` that
calls the library (engine, gate, report, diagnose) and turns its result into text and an exit code.
May import every other room; no room imports the CLI.
"""
from testbed.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from testbed.cli.main import main

__all__ = ["main", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE"]

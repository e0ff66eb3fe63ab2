"""What every subcommand shares: exit codes, the ``--set`` / ``--steps`` / ``--world-size`` options and
the live-progress options (``--progress-every``, ``--no-progress``)."""
from __future__ import annotations

import argparse
from typing import Any

from testbed.scenario.overrides import parse_overrides

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_override_arguments(parser: Any, set_help: str = "override any field, e.g. --set optim.lr=0.01 "
                           "--set perturbations.0.ranks=[1]") -> None:
    parser.add_argument("--steps", type=int)
    parser.add_argument("--world-size", type=int)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)


def overrides_of(args: argparse.Namespace) -> dict[str, object]:
    """The dotted overrides the command line asked for."""
    return parse_overrides(getattr(args, "set", None), steps=getattr(args, "steps", None),
                           world_size=getattr(args, "world_size", None))


def add_progress_arguments(parser: Any) -> None:
    """Live progress while the ranks run (engine/progress.py): a bar on a terminal, lines elsewhere."""
    parser.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS",
                        help="off a terminal, print a progress line at most this often (default 10)")
    parser.add_argument("--no-progress", action="store_true", help="no live progress")

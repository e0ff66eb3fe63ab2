"""What every subcommand shares: exit codes and the ``--set`` / ``--steps`` / ``--world-size`` options."""
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

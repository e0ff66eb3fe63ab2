"""Kill a launched job whole: torchrun puts every rank in a session of its own.

torch's elastic agent starts each rank with ``start_new_session=True``, so ``killpg`` on the
session we gave torchrun reaches torchrun only; a rank that hangs (a deadlock at exit, a stuck
collective) keeps running and keeps the launcher's output pipe open. :func:`kill_tree` collects
every descendant first (Linux ``/proc``), then kills them and the root, so nothing is left behind.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path


def _parents() -> dict[int, int]:
    """pid → parent pid of every process visible in ``/proc`` (empty where there is no ``/proc``)."""
    out: dict[int, int] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return out
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:  # gone while we looked
            continue
        out[int(entry.name)] = int(text.rsplit(")", 1)[1].split()[1])
    return out


def descendants(root: int) -> list[int]:
    """Every live descendant of ``root`` (children first, then theirs)."""
    parents = _parents()
    found: list[int] = []
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parents.items() if p == pid and c not in found]
        found.extend(children)
        frontier.extend(children)
    return found


def kill_tree(root: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``root``'s session and to every descendant, wherever its session."""
    victims = descendants(root)
    try:
        os.killpg(root, sig)  # root started with start_new_session=True: its own group
    except (ProcessLookupError, PermissionError):
        pass
    for pid in [root, *victims]:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            continue

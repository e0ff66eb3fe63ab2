"""How long the launcher waits for ranks to exit after the last step: as long as they are still
working, not a fixed wall time.

Measured (docs/reliability.md, "Teardown under load"): after the final barrier a rank spends about
1.5 CPU-seconds exiting (the stack dumps show interpreter-exit garbage collection). With 6 ranks
on 2 cores and the machine's other load that took ~38 s of wall time, so the old fixed 10 s
grace killed every rank and noted "did not exit within 10 s" on a run that was fine. Now a rank
that still gains CPU time is waited for (up to ``cap_s``); one that gains none for ``idle_s`` (a
deadlock in a destructor) is killed as before. Without /proc the wait is ``idle_s`` as before.
"""
from __future__ import annotations

import os
import time
from typing import Any

CHECK_S = 0.5  # how often CPU times are read
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process from /proc (Linux), or None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return None


class TeardownWait:
    """Started when every rank has finished its work; ``expired()`` says when to stop waiting."""

    def __init__(self, procs: list[Any], idle_s: float, cap_s: float):
        self.procs, self.idle_s, self.cap_s = procs, idle_s, max(cap_s, idle_s)
        self.started = self.last_busy = self.last_check = time.monotonic()
        self.cpu = {i: cpu_seconds(p.pid) for i, p in enumerate(procs) if p.exitcode is None}

    def expired(self, now: float) -> bool:
        if now - self.last_check >= CHECK_S:
            self.last_check = now
            for i, p in enumerate(self.procs):
                if p.exitcode is not None:
                    continue
                cpu = cpu_seconds(p.pid)
                if cpu is not None and self.cpu.get(i) is not None and cpu > self.cpu[i]:
                    self.last_busy = now  # still exiting (GC, destructors): give it time
                self.cpu[i] = cpu
        return now - self.last_busy > self.idle_s or now - self.started > self.cap_s

    @property
    def waited(self) -> float:
        return time.monotonic() - self.started

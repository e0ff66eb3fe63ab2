"""Two measurements behind docs/reliability.md, on one real ``testbed run`` each (Linux, /proc):

    python -m benchmarks.reliability_probes memory   OUT_DIR [testbed run args...]
    python -m benchmarks.reliability_probes teardown OUT_DIR [--old-grace] [--stacks] [testbed run args...]

``memory``: peak VmRSS and Pss of every rank (sampled every 0.2 s) — the per-rank figure behind
the launcher's memory warning (``testbed/engine/preflight.py``). ``teardown``: for every rank,
how long after the last step's row in timing.jsonl it was last seen alive, and the CPU seconds
it used in that time — why a fixed 10 s exit grace killed 6 ranks on 2 cores
(``testbed/engine/teardown_wait.py``); ``--old-grace`` restores that fixed 10 s rule, ``--stacks``
has every rank dump its Python stack (SIGUSR1) 4 s after the last row, printed at the end. Both
run the CLI in this process and watch its children.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from testbed.engine.proctree import descendants

TICK = os.sysconf("SC_CLK_TCK")


def ranks_of(parent: int) -> list[int]:
    """Live spawned ranks (multiprocessing spawn_main) below ``parent``."""
    out = []
    for pid in descendants(parent):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:  # gone while we looked
            continue
    return out


def _kib(pid: int, file: str, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _cpu(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return None


def watch(mode: str, out: Path, seen: dict[Any, Any], stop: threading.Event, stacks: bool) -> None:
    me, done_at = os.getpid(), None
    timing = out / "timing.jsonl"
    while not stop.is_set():
        now = time.monotonic()
        for pid in ranks_of(me):
            r = seen.setdefault(pid, {})
            if mode == "memory":
                rss, pss = _kib(pid, "status", "VmRSS:"), _kib(pid, "smaps_rollup", "Pss:")
                r["rss"], r["pss"] = max(r.get("rss", 0), rss or 0), max(r.get("pss", 0), pss or 0)
                continue
            cpu = _cpu(pid)
            if done_at is not None and cpu is not None:
                r.setdefault("cpu_at_done", cpu)
                r["last_seen"], r["cpu_last"] = now - done_at, cpu
                if stacks and now - done_at > 4.0 and not r.get("dumped"):
                    r["dumped"] = True
                    os.kill(pid, signal.SIGUSR1)  # faulthandler writes ranks/rankR.stack
        if mode == "teardown" and done_at is None and timing.exists():
            steps = seen.get("steps", 0)
            if sum(1 for _ in timing.open("rb")) >= steps:
                done_at = now
        time.sleep(0.2 if mode == "memory" else 0.05)


def main(argv: list[str]) -> int:
    from testbed.cli.main import main as testbed

    from testbed.engine import runner

    mode, out, args = argv[0], Path(argv[1]), argv[2:]
    stacks = "--stacks" in args
    if "--old-grace" in args:  # the rule before: a fixed GRACE_S after the last step, however busy
        runner.TEARDOWN_MAX_S = runner.GRACE_S
    args = [a for a in args if a not in ("--stacks", "--old-grace")]
    steps = int(args[args.index("--steps") + 1]) if "--steps" in args else 6
    seen: dict[Any, Any] = {"steps": steps}
    stop = threading.Event()
    thread = threading.Thread(target=watch, args=(mode, out, seen, stop, stacks), daemon=True)
    thread.start()
    code = testbed(["run", *args, "--steps", str(steps), "--out", str(out)])
    stop.set()
    thread.join()
    seen.pop("steps")
    for path in sorted((out / "ranks").glob("rank*.stack")) if stacks else []:
        print(f"--- {path.name}\n{path.read_text().strip()}")
    print(f"exit code {code}; {len(os.sched_getaffinity(0))} cores; load average {os.getloadavg()}")
    for pid, r in sorted(seen.items()):
        if mode == "memory":
            print(f"rank pid {pid}: peak VmRSS {r['rss'] // 1024} MB, peak Pss {r['pss'] // 1024} MB")
        elif "last_seen" in r:
            print(f"rank pid {pid}: last seen alive {r['last_seen']:.1f} s after the last row; "
                  f"CPU in that time {r['cpu_last'] - r['cpu_at_done']:.2f} s")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Teardown stress: launch the torchrun jobs whose ranks used to abort at exit, many times, and count.

Issue 17: a rank of a torchrun job died with SIGABRT (``terminate called without an active
exception``) *after* its training loop had finished, so torchrun reported ChildFailedError. This
script launches, under ``torchrun --standalone --nproc-per-node 2`` (a free rendezvous port each
time, every launch bounded by ``--timeout``), each of

- ``ddp``:     ``tests/monitor_scripts.py ddp``     - a user's plain DDP loop + ``testbed.attach``
- ``trainer``: ``tests/monitor_scripts.py trainer`` - a HF ``Trainer`` + ``TestbedCallback``
- ``runner``:  ``-m testbed.worker SCENARIO``        - the testbed's own worker under torchrun

``--runs`` times (round robin, so a burst of load hits all modes alike) and prints, per mode, how
many launches exited 0, how many had a rank abort (exit -6 / SIGABRT / "terminate called" in the
output), other failures and timeouts. Exit code 0 only if every launch exited 0.

The abort is a race (a gloo worker thread waiting for the GIL when finalization begins, see
testbed/engine/teardown.py), rare on a quiet machine. Its precondition is not: ``--probe`` puts a
``sitecustomize`` on the ranks' path whose ``atexit`` handler (registered first, so it runs last,
just before finalization) reports how many gloo worker threads (``pt_gloo_runloop``) are still
alive; the table's ``at-risk`` column counts the ranks that had any. The probe reads ``/proc``,
which releases the GIL and so can itself let a waiting thread finish: take abort counts from runs
without it.

    python -m benchmarks.teardown_stress --runs 20                 # 60 launches
    python -m benchmarks.teardown_stress --runs 10 --modes ddp     # one mode
    python -m benchmarks.teardown_stress --runs 2 --probe          # gloo threads alive at exit?
    python -m benchmarks.teardown_stress --runs 5 --switch-interval 5   # widen the race window

``--switch-interval S`` sets ``sys.setswitchinterval(S)`` in the ranks (same ``sitecustomize``):
a thread waiting for the GIL can then no longer force the main thread to hand it over after the
default 5 ms, it gets it only when the main thread blocks (a collective, I/O). That widens the
race window from milliseconds to "everything after the main thread's last blocking call", so the
abort shows up often on the unfixed code; the fix must hold under it too.

Not part of the test suite (minutes of CPU; tests/test_monitor.py covers one launch per mode).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `testbed` importable
    sys.path.insert(0, str(REPO))

from testbed.engine.proctree import kill_tree  # noqa: E402
MONITOR_SCRIPT = REPO / "tests" / "monitor_scripts.py"
MODES = ("ddp", "trainer", "runner")
ABORT_MARKERS = ("terminate called", "SIGABRT", "exitcode  : -6")
PROBE_MARK = "[teardown-probe]"
PROBE = f"""import atexit, os


def _testbed_teardown_probe():  # registered first, so it runs last
    try:
        tasks = os.listdir("/proc/self/task")
        names = [open(f"/proc/self/task/{{t}}/comm").read().strip() for t in tasks]
    except OSError:
        return
    alive = sum(name == "pt_gloo_runloop" for name in names)
    if alive:
        print(f"{PROBE_MARK} rank {{os.environ.get('RANK')}}: {{alive}} gloo worker thread(s) alive "
              "at interpreter exit", flush=True)


atexit.register(_testbed_teardown_probe)
"""
COUNTERS = {"ok": "ok", "abort": "aborts", "other": "other", "timeout": "timeouts"}


@dataclass
class Tally:
    launches: int = 0
    ok: int = 0
    aborts: int = 0
    other: int = 0
    timeouts: int = 0
    at_risk: int = 0  # ranks with gloo worker threads alive at exit (--probe)
    seconds: list[float] = field(default_factory=list)
    first_bad_log: str | None = None


def prepare(work: Path, modes: tuple[str, ...]) -> dict[str, list[str]]:
    """The torchrun arguments (after ``--nproc-per-node 2``) of each mode; writes the inputs once."""
    from tests.scale_fixtures import hf_raw, write_mlp_scenario
    from testbed.scenario.spec import load_scenario, parse_scenario

    mlp_toml = write_mlp_scenario(work / "mlp")
    args: dict[str, list[str]] = {}
    if "ddp" in modes:
        spec = work / "ddp.json"
        spec.write_text(json.dumps(load_scenario(mlp_toml).to_dict()))
        args["ddp"] = [str(MONITOR_SCRIPT), "ddp", str(spec)]
    if "trainer" in modes:
        from testbed.workloads.tiny_checkpoint import make_tiny_checkpoint

        llama = make_tiny_checkpoint(work / "llama")
        tiny_hf = {"llama": llama, "alpaca": llama / "alpaca.json"}
        spec = work / "trainer.json"
        spec.write_text(json.dumps(parse_scenario(hf_raw(tiny_hf)).to_dict()))
        args["trainer"] = [str(MONITOR_SCRIPT), "trainer", str(spec)]
    if "runner" in modes:
        args["runner"] = ["-m", "testbed.worker", str(mlp_toml), "--out"]
    return args


def launch(torchrun_args: list[str], out: Path, timeout: float,
           site_dir: Path | None = None) -> tuple[int | None, str, float]:
    """One bounded torchrun launch in its own session: (exit code or None on timeout, output, seconds)."""
    env = {**os.environ, "TMPDIR": str(out.parent), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if site_dir is not None:  # our sitecustomize first on the ranks' path
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site_dir), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *torchrun_args, str(out)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)  # torchrun and its ranks (each in a session of its own)
        output, _ = proc.communicate(timeout=60)
        code = None
    return code, output, time.monotonic() - started


def classify(code: int | None, output: str) -> str:
    if code is None:
        return "timeout"
    if any(marker in output for marker in ABORT_MARKERS):
        return "abort"  # counted even if torchrun exited 0 (it never does when a rank aborts)
    return "ok" if code == 0 else "other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="launches per mode")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per launch before it is killed")
    parser.add_argument("--keep", type=Path, help="write each failing launch's output here")
    parser.add_argument("--probe", action="store_true",
                        help="report ranks that reach interpreter exit with gloo worker threads alive")
    parser.add_argument("--switch-interval", type=float, metavar="S",
                        help="sys.setswitchinterval(S) in the ranks (widens the race window)")
    args = parser.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s) {sorted(unknown)}; choose from {MODES}")
    tallies = {m: Tally() for m in modes}
    with tempfile.TemporaryDirectory(prefix="teardown-stress-") as tmp:
        work = Path(tmp)
        mode_args = prepare(work, modes)
        site_dir = None
        if args.probe or args.switch_interval is not None:
            site_dir = work / "site"
            site_dir.mkdir()
            code = PROBE if args.probe else ""
            if args.switch_interval is not None:
                code += f"\nimport sys\nsys.setswitchinterval({args.switch_interval!r})\n"
            (site_dir / "sitecustomize.py").write_text(code)
        for i in range(args.runs):
            for mode in modes:
                out = work / f"{mode}-{i}" / "out"
                out.parent.mkdir(parents=True)
                code, output, seconds = launch(mode_args[mode], out, args.timeout, site_dir)
                kind = classify(code, output)
                risky = output.count(PROBE_MARK)
                t = tallies[mode]
                t.launches += 1
                t.at_risk += risky
                t.seconds.append(seconds)
                counter = COUNTERS[kind]
                setattr(t, counter, getattr(t, counter) + 1)
                note = f"  ({risky} rank(s) with gloo threads alive at exit)" if args.probe else ""
                print(f"[{i + 1}/{args.runs}] {mode:8s} {kind:8s} exit {code} {seconds:6.1f} s{note}", flush=True)
                if kind != "ok" and args.keep is not None:
                    args.keep.mkdir(parents=True, exist_ok=True)
                    (args.keep / f"{mode}-{i}.log").write_text(output)
                if kind != "ok" and t.first_bad_log is None:
                    t.first_bad_log = output[-3000:]
    def row(name: str, t: Tally, median: str = "") -> str:
        risk = f" {t.at_risk:7d}" if args.probe else ""
        return f"{name:8s} {t.launches:8d} {t.ok:4d} {t.aborts:6d} {t.other:5d} {t.timeouts:8d}{risk} {median}"

    risk = f" {'at-risk':>7s}" if args.probe else ""
    print(f"\n{'mode':8s} {'launches':>8s} {'ok':>4s} {'aborts':>6s} {'other':>5s} {'timeouts':>8s}{risk} median s")
    total = Tally()
    for mode, t in tallies.items():
        median = sorted(t.seconds)[len(t.seconds) // 2] if t.seconds else float("nan")
        print(row(mode, t, f"{median:8.1f}"))
        for name in ("launches", "ok", "aborts", "other", "timeouts", "at_risk"):
            setattr(total, name, getattr(total, name) + getattr(t, name))
    print(row("total", total))
    if args.probe:
        print(f"at-risk: ranks (of {2 * total.launches}) that reached interpreter exit with gloo worker threads alive")
    for mode, t in tallies.items():
        if t.first_bad_log is not None:
            print(f"\n--- first failing {mode} launch (last 3000 characters) ---\n{t.first_bad_log}")
    return 0 if total.ok == total.launches else 1


if __name__ == "__main__":
    sys.exit(main())

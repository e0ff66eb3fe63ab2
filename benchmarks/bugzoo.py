"""The bug zoo benchmark: per mistake, detected? right cause? right ranks? steps from its onset to the
online alarm; and false alarms on the healthy twins, over several seeds. The table in docs/bugs.md.

Three sources, each judged the way a user meets it:

1. ``scenarios/bugs/*.toml`` through the runner (``launch``), at ``--seeds`` seeds each (the healthy
   twins at ``--healthy-seeds``): the recorded verdict (``run.json``) against the file's ``[expect]``
   (status, suspects, causes), and the rows replayed through the monitor's built-in alarms
   (``engine/alarms.py``: the runner raises none itself) for the first alarm of the expected kind;
2. ``examples/bugs/ddp_train.py`` under torchrun, every variant, at ``--seeds`` seeds (``--seed``),
   and ``hf_trainer.py`` / ``lightning_train.py`` once: the monitor's own run.json and events.jsonl
   against ``tests/bugzoo_expected.py``;
3. the ledger's rules on simulated DistributedSampler pipelines (``tests/ledger_sim.py``, no
   processes): ``--sim`` random pipelines per mistake and healthy.

Latency: ``alarm step - onset`` (the step the mistake starts to act: the perturbation's start, the
first step of epoch 2 for a repeated order, the step after the first forward for buffers), and
whether it came at the first check after the onset (the state check's cadence: step 0, then every
10 steps; the data channels: every step).

Full run for docs/bugs.md, on a quiet machine (about 20 min on 2 idle cores):

    python benchmarks/bugzoo.py --doc docs/bugs.md

Smoke run (about 2 min): ``python benchmarks/bugzoo.py --seeds 1 --healthy-seeds 1 --sim 5 --only no_set_epoch healthy``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testbed.engine.alarms import BuiltinAlarms  # noqa: E402
from testbed.engine.runner import launch  # noqa: E402
from testbed.gate.checks import verdict_causes  # noqa: E402
from testbed.record.files import read_metrics  # noqa: E402
from testbed.scenario.cadence import Cadence  # noqa: E402
from testbed.scenario.expect import expectations_of  # noqa: E402
from testbed.scenario.spec import Scenario, load_scenario  # noqa: E402
from tests.bugzoo_expected import DDP, HF, LIGHTNING, ONSETS, alarms_of  # noqa: E402
from tests.scale_fixtures import torchrun  # noqa: E402

BUGS = ROOT / "scenarios" / "bugs"
EXACT_KINDS = {"data", "state_differs", "config_differs", "weights_diverged", "nonfinite", "lr_differs"}
ONSET = {  # scenarios/bugs: the step the mistake starts to act (3 ranks, 12 steps per epoch)
    "no_set_epoch": 12, "no_set_epoch_rank2": 12, "broadcast_buffers": 1, "frozen_reinit": 5,
    "unfreeze_after_wrap": 3, "nan_rank": 10,
}
CHANNEL = {"state": ("weights_diverged", "state_differs"), "config": ("config_differs",), "": ("nonfinite",)}
BLIND = ("same_aug_seed",)  # mistakes testbed cannot see (docs/bugs.md): expected consistent, reported apart


def first_check(onset: int, kinds: tuple[str, ...], cadence: Cadence) -> int:
    """The first step at or after ``onset`` whose row can show the mistake (state: a state check)."""
    if not set(kinds) & {"weights_diverged", "state_differs"}:
        return onset
    return next(s for s in range(onset, onset + 10 * max(cadence.weight_check_every, 1) + 1)
                if cadence.plan(s).check_state)


def replay(rows: list[dict[str, Any]], scenario: Scenario) -> list[tuple[str, str | None, int]]:
    """The built-in alarms a monitored job would have raised on these rows."""
    alarms = BuiltinAlarms(scenario.world_size, 0.01, scenario.intended)
    return [(a.kind, a.details.get("cause"), a.step) for row in rows for a in alarms.check(row)]


def judge(name: str, verdict: dict[str, Any], raised: list[tuple[str, str | None, int]], expected: tuple,
          onset: int | None, cadence: Cadence) -> dict[str, Any]:
    """One run against its expectation: (status, ranks, causes); the latency of the matching alarm."""
    status, ranks, causes = expected
    blind = any(b in name for b in BLIND)
    healthy = status == "consistent" and not blind
    out = {"name": name, "healthy": healthy, "blind": blind, "status": verdict.get("status"),
           "ranks": verdict.get("ranks"), "causes": verdict_causes(verdict), "alarms": raised}
    out["detected"] = (verdict.get("status") != "consistent" or bool(raised)) if not healthy else None
    out["right_cause"] = out["causes"] == list(causes)
    out["right_ranks"] = verdict.get("ranks") == list(ranks)
    out["false_alarm"] = bool(raised) or verdict.get("status") != "consistent" if healthy else None
    wanted = [k for c in causes for k in (("data",) if c not in CHANNEL else CHANNEL[c])] or list(CHANNEL[""])
    hit = next((a for a in raised if a[0] in wanted), None)
    if not healthy and onset is not None and hit is not None:
        out["latency"] = hit[2] - onset
        out["after_first_check"] = hit[2] - first_check(onset, tuple(wanted), cadence)
    return out


def run_scenarios(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    results = []
    for path in sorted(BUGS.glob("*.toml")):
        name = path.stem
        base = load_scenario(path)
        exp = expectations_of(base)
        if args.only and not any(o in name for o in args.only) and not name.startswith("healthy"):
            continue
        expected = (exp.verdict, list(exp.suspects or []), list(exp.causes or []))
        seeds = args.healthy_seeds if exp.verdict == "consistent" else args.seeds
        for seed in range(seeds):
            scenario = load_scenario(path, {"seed": seed})
            out = tmp / f"{name}-{seed}"
            result = launch(scenario, out)
            verdict = json.loads((out / "run.json").read_text()).get("verdict", {})
            rows = read_metrics(out)
            onset = ONSET.get(name, 0)
            r = judge(f"scenarios/bugs/{name}", verdict, replay(rows, scenario), expected, onset,
                      scenario.metrics.cadence)
            results.append({**r, "source": "runner", "seed": seed, "ok": result.ok})
            print(f"[bugzoo] {name} seed {seed}: {r['status']} {r['ranks']} {r['causes']}", flush=True)
    return results


def run_scripts(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    results = []
    plan = [("ddp_train.py", DDP, range(args.seeds)), ("hf_trainer.py", HF, [None]),
            ("lightning_train.py", LIGHTNING, [None])]
    for script, table, seeds in plan:
        variants = [v for v in table if not args.only or any(o in v for o in args.only) or v in ("none", "bn")]
        for seed in seeds:
            out = tmp / f"{script}-{seed}"
            extra = ["--seed", str(seed)] if seed is not None else []
            code, log = torchrun([str(ROOT / "examples" / "bugs" / script), "--bug", ",".join(variants),
                                  "--out", str(out), *extra], tmp, nproc=3, timeout=args.timeout)
            if code != 0:
                print(log[-3000:], file=sys.stderr)
                raise SystemExit(f"{script} failed (exit {code})")
            for variant in variants:
                status, ranks, causes, _ = table[variant]
                verdict = json.loads((out / variant / "run.json").read_text())["verdict"]
                r = judge(f"examples/bugs/{script} --bug {variant}", verdict, alarms_of(out / variant),
                          (status, ranks, causes), ONSETS.get(variant), Cadence())
                results.append({**r, "source": "script", "seed": seed or 0, "ok": True})
            print(f"[bugzoo] {script} seed {seed}: {len(variants)} variants", flush=True)
    return results


def run_simulated(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ledger's rules on random pipelines: 3-8 ranks, 8-16 steps per epoch, batch 4-32."""
    import random

    from testbed.diagnose.data import data_findings
    from tests.ledger_sim import Pipeline

    cases = {"healthy": ({}, [], []), "sampler seed (1 rank)": ("own", ["overlap"], "one"),
             "no set_epoch": ({"no_set_epoch": True}, ["epoch_repeat"], []),
             "no sampler": ({"unsharded": True}, ["replicated"], []),
             "healthy, 2 % duplicated samples": ({"duplicates": 0.02}, [], [])}
    results = []
    for label, (change, causes, ranks) in cases.items():
        for i in range(args.sim):
            rnd = random.Random(i)
            w, b, per = rnd.randint(3, 8), rnd.choice([4, 8, 16, 32]), rnd.randint(8, 16)
            kw = dict(world_size=w, size=w * per * b + rnd.randint(0, 7), batch=b, seed=i,
                      drop_last=rnd.random() < 0.5)
            off = [rnd.randrange(w)]
            kw.update({"own_seed_ranks": tuple(off)} if change == "own" else change)
            p = Pipeline(**kw)
            found = data_findings(p.rows(3 * p.steps_per_epoch()), w)
            got_causes = sorted({f.cause for f in found})
            want_ranks = off if ranks == "one" else []
            results.append({"name": f"simulated: {label}", "source": "simulated", "healthy": not causes,
                            "detected": bool(found) if causes else None, "right_cause": got_causes == causes,
                            "right_ranks": all(f.ranks == want_ranks for f in found),
                            "false_alarm": bool(found) if not causes else None,
                            "latency": (found[0].detected - found[0].step) if found and causes else None,
                            "seed": i, "ok": True})
    return results


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| mistake (source) | runs | detected | right cause | right ranks | steps onset → alarm (median, max) "
            "| at the first check after onset | healthy twin: runs with a false alarm |",
            "|---|---|---|---|---|---|---|---|"]
    names = list(dict.fromkeys(r["name"] for r in results))
    for name in names:
        rs = [r for r in results if r["name"] == name]
        n = len(rs)
        if rs[0].get("blind"):
            rows.append(f"| {name} | {n} | {sum(bool(r['detected']) for r in rs)}/{n} (cannot be seen: docs/bugs.md) "
                        f"| – | – | – | – | – |")
            continue
        if rs[0]["healthy"]:
            fa = sum(bool(r["false_alarm"]) for r in rs)
            rows.append(f"| {name} | {n} | – | {sum(r['right_cause'] for r in rs)}/{n} | – | – | – | {fa}/{n} |")
            continue
        lat = sorted(r["latency"] for r in rs if r.get("latency") is not None)
        first = [r["after_first_check"] for r in rs if r.get("after_first_check") is not None]
        lat_text = f"{lat[len(lat) // 2]}, {lat[-1]}" if lat else "no alarm"
        first_text = f"{sum(x == 0 for x in first)}/{len(first)}" if first else "–"
        rows.append(f"| {name} | {n} | {sum(bool(r['detected']) for r in rs)}/{n} | "
                    f"{sum(r['right_cause'] for r in rs)}/{n} | {sum(r['right_ranks'] for r in rs)}/{n} | "
                    f"{lat_text} | {first_text} | – |")
    return "\n".join(rows)


def update_doc(doc: Path, text: str) -> None:
    begin, end = "<!-- bugzoo:begin -->", "<!-- bugzoo:end -->"
    content = doc.read_text()
    new = f"{begin}\n{text}\n{end}"
    content = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: new, content, flags=re.S) \
        if begin in content else content + "\n" + new + "\n"
    doc.write_text(content)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds per mistake (runner scenarios, the DDP script)")
    p.add_argument("--healthy-seeds", type=int, default=8, help="seeds per healthy twin scenario")
    p.add_argument("--sim", type=int, default=100, help="simulated pipelines per case")
    p.add_argument("--only", nargs="+", help="only names containing one of these (healthy twins always run)")
    p.add_argument("--skip", nargs="+", default=[], choices=["runner", "scripts", "simulated"])
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per torchrun launch")
    p.add_argument("--json", type=Path, help="write the raw results here")
    p.add_argument("--doc", type=Path, help="replace the table between the bugzoo markers of this file")
    args = p.parse_args(argv)
    started, load = time.monotonic(), os.getloadavg()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="testbed-bugzoo-") as tmp:
        if "simulated" not in args.skip:
            results += run_simulated(args)
        if "runner" not in args.skip:
            results += run_scenarios(args, Path(tmp))
        if "scripts" not in args.skip:
            results += run_scripts(args, Path(tmp))
    wall, end_load = time.monotonic() - started, os.getloadavg()
    note = (f"`{' '.join(['python', 'benchmarks/bugzoo.py', *(sys.argv[1:] if argv is None else argv)])}`: "
            f"{time.strftime('%Y-%m-%d')}, wall {wall:.0f} s, load average {load[0]:.1f} at start, "
            f"{end_load[0]:.1f} at end ({os.cpu_count()} CPUs)")
    text = table(results) + "\n\n" + note
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"note": note, "results": results}, indent=1, default=str))
    if args.doc:
        update_doc(args.doc, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared pieces of the attack tests (tests/test_attacks*.py, docs/reliability.md "Attacked again"):
a launcher stand-in that writes a real record without processes, hostile record files, scenarios."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from testbed.engine import runner
from testbed.engine.finalize import finish_record, remove_stale_record, start_record
from testbed.record.files import JsonlWriter, write_json_atomic
from testbed.record.rundir import claim_run_dir
from tests.helpers import tiny
from tests.scenario_files import to_toml


def row(step: int, ranks: int = 2, **extra: Any) -> dict[str, Any]:
    """A plausible metrics row (two ranks, consistent) for fake records."""
    loss = [1.0 + 0.01 * step + 0.001 * r for r in range(ranks)]
    base = {"step": step, "loss": loss, "global_loss": sum(loss) / ranks, "loss_std": 0.0005, "loss_cv": 0.0005,
            "grad_norm": [0.5 + 0.001 * r for r in range(ranks)], "grad_norm_std": 0.0005, "grad_norm_cv": 0.001,
            "cos_to_mean": [0.99] * ranks, "cos_mean": 0.99, "cos_min": 0.99, "mean_grad_norm": 0.49,
            "flags": [], "weights_in_sync": True, "weight_checksum": [7] * ranks}
    return base | extra


def fake_launch(scenario: Any, out_dir: Path, overwrite: bool = False, claim: Any = None) -> runner.RunResult:
    """What ``runner.launch`` does to the run directory (claim, stale files, run.json, rows, final
    run.json), without a process: the ownership rules are the real ones."""
    out_dir = Path(out_dir)
    lock = claim or claim_run_dir(out_dir, overwrite)
    try:
        remove_stale_record(out_dir)
        run = start_record(scenario, out_dir, "gloo", "fake")
        writer = JsonlWriter(out_dir / "metrics.jsonl")
        for step in range(scenario.steps):
            writer.write(row(step, scenario.world_size))
        writer.close()
        result = runner.RunResult("ok", wall_time_s=0.01)
        finish_record(out_dir, run, result)
        return result
    finally:
        if claim is None:
            lock.release()


def scenario_file(path: Path, **changes: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(tiny(**changes)), encoding="utf-8")
    return path


def sweep_file(path: Path, name: str = "tiny", labels: list[str] | None = None) -> Path:
    raw = tiny(name=name, perturbations=[{"kind": "seed_desync", "ranks": []}])
    raw["sweep"] = {"parameter": "perturbations.0.ranks", "values": [[], [1]]}
    if labels is not None:
        raw["sweep"]["labels"] = labels
    path.write_text(to_toml(raw), encoding="utf-8")
    return path


def run_record(directory: Path, name: str = "foreign", rows: int = 3, status: str = "ok") -> Path:
    """A finished run record (as a user's earlier run) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(row(s)) + "\n" for s in range(rows)))
    write_json_atomic(directory / "run.json", {"status": status, "scenario": {"name": name, "world_size": 2},
                                               "steps_kept": rows})
    return directory


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}

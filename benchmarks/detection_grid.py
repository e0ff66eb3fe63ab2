"""What ``benchmarks/detection.py`` runs: ≥ 200 healthy runs across world sizes, models, optimizers and
schedules, and the perturbation grid (≥ 5 seeds per cell). Every entry is a catalog scenario with
overrides, so each run is an ordinary ``launch`` of real gloo ranks.

Sizes are chosen so the whole grid runs in about an hour on 2 idle cores: 50 steps, small models,
world sizes weighted towards the small ones (a run costs about 2 s per rank to start).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent / "scenarios"
MLP_BASE, SEED_BASE, LM_BASE = ROOT / "label_noise.toml", ROOT / "seed_desync_1.toml", ROOT / "dropout_desync.toml"
REPLICATE = {"kind": "replicate_batch", "ranks": "all"}
STEPS = 50
HEALTHY_SIZES = (2, 2, 3, 3, 4, 4, 5, 6, 8)  # drawn uniformly: every size 2–8 but 7, small ones more often
SMALL_LM = {"kind": "transformer", "d_model": 32, "layers": 1, "heads": 2, "dropout": 0.1}
SMALL_TEXT = {"kind": "alpaca_synthetic", "batch_size": 4, "size": 1024, "seq_len": 128}


@dataclass(frozen=True)
class Run:
    """One run: its key (stable: the JSONL is resumed by it), the scenario base and overrides, and
    what the verdict should say (``expected`` ranks; None for a healthy run; ``onset``: the step the
    fault starts, for the online latency)."""

    key: str
    cell: str
    world_size: int
    seed: int
    base: Path
    overrides: dict[str, Any] = field(hash=False)
    expected: tuple[int, ...] | None = None
    onset: int = 0
    replicas_intended: bool | None = None

    @property
    def healthy(self) -> bool:
        return self.expected is None


def _healthy_config(rng: np.random.Generator) -> tuple[str, Path, dict[str, Any], bool]:
    """A random healthy configuration: model, optimizer, schedule (and sometimes a replicated baseline)."""
    schedule = {"schedule": str(rng.choice(["constant", "linear", "cosine"]))}
    if schedule["schedule"] != "constant":
        schedule["warmup_ratio"] = 0.1
    if rng.random() < 0.15:  # the small transformer on alpaca-style text
        optim = {"kind": "adamw", "lr": 0.003, **schedule}
        return f"lm/adamw/{schedule['schedule']}", LM_BASE, {"model": SMALL_LM, "data": SMALL_TEXT, "optim": optim,
                                                              "perturbations": []}, False
    hidden, depth = int(rng.choice([32, 64])), int(rng.choice([1, 2]))
    model = {"kind": "mlp", "hidden": hidden, "depth": depth, "dropout": float(rng.choice([0.0, 0.1]))}
    if rng.random() < 0.5:
        optim = {"kind": "sgd", "lr": 0.05, "momentum": float(rng.choice([0.0, 0.9])), **schedule}
    else:
        optim = {"kind": "adamw", "lr": 0.003, **schedule}
    replicated = bool(rng.random() < 0.1)
    perturbations = [REPLICATE] if replicated else []
    label = f"mlp{hidden}x{depth}/{optim['kind']}/{schedule['schedule']}" + ("/replicated" if replicated else "")
    return label, MLP_BASE, {"model": model, "optim": optim, "perturbations": perturbations}, replicated


def healthy_runs(count: int, steps: int = STEPS) -> list[Run]:
    """``count`` healthy runs, each a distinct configuration and seed (deterministic)."""
    rng = np.random.default_rng(20240531)
    out = []
    for i in range(count):
        n = int(rng.choice(HEALTHY_SIZES))
        label, base, overrides, replicated = _healthy_config(rng)
        seed = 1000 + i
        out.append(Run(f"healthy|{label}|{n}|{seed}|{steps}", f"healthy {label}", n, seed, base,
                       {"world_size": n, "steps": steps, "seed": seed, "expect": {}, **overrides},
                       replicas_intended=True if replicated else None))
    return out


def _cells() -> list[tuple[str, int, Path, list[dict[str, Any]], tuple[int, ...], int, bool | None, dict[str, Any]]]:
    """(cell, N, base, perturbations, expected ranks, onset, replicas intended, extra overrides)."""
    cells = []
    for n, frac in itertools.product((2, 4, 8), (0.1, 0.3, 0.5)):
        cells.append((f"label_noise {frac} on 1 of {n}", n, MLP_BASE,
                      [{"kind": "label_noise", "ranks": [n - 1], "fraction": frac}], (n - 1,), 0, None, {}))
    for n in (2, 4, 8):
        cells.append((f"label_noise 0.5 on 1 of {n} from step 20", n, MLP_BASE,
                      [{"kind": "label_noise", "ranks": [n - 1], "fraction": 0.5, "start_step": 20}], (n - 1,), 20, None, {}))
    for n, scale in itertools.product((2, 4, 8), (1.05, 2.0)):
        cells.append((f"lr x{scale} on 1 of {n} from step 5", n, MLP_BASE,
                      [{"kind": "lr_mismatch", "ranks": [n - 1], "start_step": 5, "scale": scale}], (n - 1,), 5, None, {}))
    for n, factor in itertools.product((4, 8), (3.0, 50.0)):
        cells.append((f"grad x{factor:g} on rank 1 of {n} at step 15", n, MLP_BASE,
                      [{"kind": "grad_corruption", "ranks": [1], "start_step": 15, "end_step": 16, "mode": "scale",
                        "factor": factor}], (1,), 15, None, {}))
    cells.append(("grad x50 on ranks 1 and 2 of 4 at steps 10 and 22", 4, MLP_BASE,
                  [{"kind": "grad_corruption", "ranks": [1], "start_step": 10, "end_step": 11, "mode": "scale", "factor": 50.0},
                   {"kind": "grad_corruption", "ranks": [2], "start_step": 22, "end_step": 23, "mode": "scale", "factor": 50.0}],
                  (1, 2), 10, None, {}))
    for n, k in ((4, 1), (8, 1), (4, 2)):
        ranks = list(range(n - k, n))
        cells.append((f"seed_desync {k} of {n} (replicated batches)", n, SEED_BASE,
                      [REPLICATE, {"kind": "seed_desync", "ranks": ranks}], tuple(ranks), 0, True, {}))
    # the data ledger names the ranks that read another rank's batches (issue 22): 1 and 2
    cells.append(("ranks 1, 2 read rank 0's batches (of 5)", 5, MLP_BASE,
                  [{"kind": "replicate_batch", "ranks": [1, 2]}], (1, 2), 0, None, {}))
    cells.append(("shard_skew task 0 on 2 of 4 (transformer)", 4, LM_BASE,
                  [{"kind": "shard_skew", "ranks": [2, 3], "groups": 6, "keep": [0]}], (2, 3), 0, None,
                  {"model": SMALL_LM, "data": SMALL_TEXT}))
    return cells


def perturbed_runs(seeds: int, steps: int = STEPS) -> list[Run]:
    """Every cell of the grid × ``seeds`` seeds."""
    out = []
    for cell, n, base, perturbations, expected, onset, intended, extra in _cells():
        for seed in range(1, seeds + 1):
            out.append(Run(f"{cell}|{n}|{seed}|{steps}", cell, n, seed, base,
                           {"world_size": n, "steps": steps, "seed": seed, "expect": {}, "perturbations": perturbations,
                            **extra}, expected, onset, intended))
    return out

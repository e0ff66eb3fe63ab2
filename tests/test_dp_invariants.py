"""Invariants of data parallelism itself, on real multi-process gloo jobs (small and bounded).

Hypothesis draws the layout (world size 2..4, per-rank batch, which ranks are perturbed) with
very few examples, because every example is a real job of a few seconds. Shrinking is off for
the same reason: a failing example is reported as drawn (re-run it with the printed blob).
``TESTBED_PROCESS_EXAMPLES`` raises the count for a longer local soak.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

from testbed.workloads.data import ShardedSampler
from testbed.metrics.step import brute_force
from testbed.perturb.perturbations import derive_seed
from testbed.scenario.tables import DATASETS, MODELS, OPTIMIZERS
from testbed.scenario.spec import Scenario, parse_scenario
from testbed.engine.worker import make_plan, seed_everything
from tests.helpers import run, tiny

PROCESS_EXAMPLES = int(os.environ.get("TESTBED_PROCESS_EXAMPLES", "2"))
process_settings = settings(max_examples=PROCESS_EXAMPLES, deadline=None,
                            phases=[Phase.explicit, Phase.reuse, Phase.generate])

# Hidden 512 puts ~270k parameters in two DDP buckets (first bucket cap 1 MiB), so every
# bucket-summed metric is checked across a bucket boundary; still milliseconds per step.
TWO_BUCKET_MLP = {"kind": "mlp", "hidden": 512, "depth": 2, "dropout": 0.0}
OPTIMIZERS_UNDER_TEST = {
    "sgd": {"kind": "sgd", "lr": 0.1, "momentum": 0.9},
    "adamw": {"kind": "adamw", "lr": 0.001},
}


@st.composite
def layouts(draw: st.DrawFn, min_world: int = 2, max_world: int = 4, min_perturbed: int = 0) -> tuple[int, int, list[int]]:
    """(world size, per-rank batch, sorted perturbed ranks)."""
    n = draw(st.integers(min_world, max_world))
    b = draw(st.integers(2, 8))
    ranks = draw(st.sets(st.integers(0, n - 1), min_size=min_perturbed))
    return n, b, sorted(ranks)


def launch_ok(raw: dict[str, Any], out: Path) -> tuple[list[dict[str, Any]], Scenario]:
    result, rows, scenario = run(raw, out)
    assert result.ok, result.reason + "\n" + (result.traceback or "")
    assert [r["step"] for r in rows] == list(range(scenario.steps))
    return rows, scenario


def saved_weights(out: Path, world_size: int) -> list[dict[str, torch.Tensor]]:
    return [torch.load(out / "ranks" / f"rank{r}.final.pt") for r in range(world_size)]


def assert_ranks_identical(out: Path, rows: list[dict[str, Any]], world_size: int) -> None:
    """Every step's checksum agrees, and the final tensors are equal bit for bit on every rank."""
    assert all(r["weights_in_sync"] and len(set(r["weight_checksum"])) == 1 for r in rows)
    weights = saved_weights(out, world_size)
    for other in weights[1:]:
        assert other.keys() == weights[0].keys()
        assert all(torch.equal(other[k], weights[0][k]) for k in weights[0])


# ---- the in-process reference ------------------------------------------------------------------


def reference_run(s: Scenario) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """One process, batch N·b: the rank batches of each step concatenated, one optimizer step.

    Built only from testbed's own pieces (registries, make_plan, ShardedSampler, the init seed),
    so it differs from the DP job in exactly one respect: there is no data parallelism. Also
    returns, per step, each rank's loss and the brute-force metrics of the per-rank gradients at
    the reference weights — an oracle for the hook's production path (no self-check copies).
    """
    assert s.grad_accum == 1 and s.model.params.get("dropout", 0.0) == 0.0
    dataset = DATASETS.get(s.data.kind)(s.seed, **s.data.params)
    seed_everything(derive_seed("init", s.seed))
    model = MODELS.get(s.model.kind)(dataset, **s.model.params)
    optimizer = OPTIMIZERS.get(s.optim.kind)(model.parameters(), **s.optim.params)
    sampler = ShardedSampler(dataset.size, s.world_size, s.batch_size)
    per_step = []
    for step in range(s.steps):
        plans = [make_plan(s, r, step) for r in range(s.world_size)]
        assert all(not p.batch_transforms and not p.grad_transforms and p.lr_scale == 1.0 for p in plans)
        batches = [dataset.batch(sampler.indices(step, p)) for p in plans]
        losses, grads = [], []
        for batch in batches:  # each rank's local gradient, for the metric oracle
            model.zero_grad(set_to_none=True)
            loss = model(**batch)
            loss.backward()
            losses.append(loss.item())
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double().numpy())
        per_step.append({"loss": losses, **brute_force(np.stack(grads))})
        big = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        optimizer.zero_grad(set_to_none=True)
        model(**big).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, per_step


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ---- the invariants ----------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS_UNDER_TEST))
@process_settings
@example(layout=(2, 4, []))
@given(layout=layouts())
def test_dp_equals_one_process_with_the_large_batch(optimizer: str, layout: tuple[int, int, list[int]],
                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    """N ranks × batch b ≡ one process × batch N·b (weights within 1e-5 relative after k steps),
    even when some ranks read shuffle-desynced shards: DP averages whatever the ranks read.
    The recorded per-rank metrics of that job match brute force on the reference's gradients."""
    n, b, desynced = layout
    out = tmp_path_factory.mktemp(f"equiv-{optimizer}")
    raw = tiny(world_size=n, steps=3, model=TWO_BUCKET_MLP, optim=OPTIMIZERS_UNDER_TEST[optimizer],
               data={"batch_size": b, "size": 64},  # 64 samples: epochs wrap and shards pad within 3 steps
               metrics={"weight_check_every": 1, "save_weights": True},
               perturbations=[{"kind": "shuffle_desync", "ranks": desynced}] if desynced else [])
    rows, scenario = launch_ok(raw, out)
    assert_ranks_identical(out, rows, n)
    ref_weights, ref_steps = reference_run(scenario)
    dp_weights = saved_weights(out, n)[0]
    assert dp_weights.keys() == ref_weights.keys()
    for name, tensor in ref_weights.items():
        assert relative_error(dp_weights[name], tensor) <= 1e-5, name
    for row, ref in zip(rows, ref_steps):
        np.testing.assert_allclose(row["loss"], ref["loss"], rtol=1e-5)
        np.testing.assert_allclose(row["grad_norm"], ref["grad_norm"], rtol=1e-5)
        np.testing.assert_allclose(row["cos_to_mean"], ref["cos_to_mean"], rtol=0, atol=1e-5)
        assert row["mean_grad_norm"] == pytest.approx(ref["mean_grad_norm"], rel=1e-5)


@pytest.mark.timeout(120)
def test_same_scenario_twice_gives_byte_identical_metrics(tmp_path: Path) -> None:
    """CPU, same seed: the record is a pure function of the scenario (perturbed, dropout on)."""
    raw = tiny(steps=4, model={"kind": "mlp", "hidden": 16, "depth": 1, "dropout": 0.3},
               metrics={"weight_check_every": 1, "pairwise_every": 2},
               perturbations=[{"kind": "seed_desync", "ranks": [1]}, {"kind": "shuffle_desync", "ranks": [0]}])
    first, second = tmp_path / "a", tmp_path / "b"
    rows, _ = launch_ok(raw, first)
    launch_ok(raw, second)
    assert (first / "metrics.jsonl").read_bytes() == (second / "metrics.jsonl").read_bytes()
    assert all(r["loss_std"] > 0 for r in rows)  # not trivially equal: the ranks do disagree


@pytest.mark.timeout(300)
@process_settings
@example(layout=(3, 4, []), dropout=0.3, optimizer="adamw")
@given(layout=layouts(), dropout=st.sampled_from([0.0, 0.3]), optimizer=st.sampled_from(sorted(OPTIMIZERS_UNDER_TEST)))
def test_replicated_batch_has_zero_dispersion_and_cosine_one(layout: tuple[int, int, list[int]], dropout: float,
                                                             optimizer: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Same batch and same seeds on every rank → bit-identical local gradients, at every step."""
    n, b, _ = layout
    raw = tiny(world_size=n, steps=3, data={"batch_size": b},
               model={"kind": "mlp", "hidden": 16, "depth": 1, "dropout": dropout},
               optim=OPTIMIZERS_UNDER_TEST[optimizer], perturbations=[{"kind": "replicate_batch", "ranks": "all"}])
    rows, _ = launch_ok(raw, tmp_path_factory.mktemp("replicated"))
    for row in rows:
        assert row["loss_std"] == 0.0 and row["grad_norm_std"] == 0.0 and row["flags"] == []
        assert len(set(row["loss"])) == 1 and len(set(row["grad_norm"])) == 1
        assert all(abs(c - 1.0) <= 1e-6 for c in row["cos_to_mean"])
        assert row["weights_in_sync"]


@pytest.mark.timeout(300)
@process_settings
@example(layout=(2, 4, [1]))
@given(layout=layouts(min_perturbed=1))
def test_seed_desync_with_dropout_is_visible_on_every_step(layout: tuple[int, int, list[int]],
                                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    """Replicated batch + dropout: only the seeds differ, so loss dispersion > 0 is the perturbation
    itself, on every step; the all-reduce still keeps the weights identical."""
    n, b, ranks = layout
    raw = tiny(world_size=n, steps=3, data={"batch_size": b},
               model={"kind": "mlp", "hidden": 16, "depth": 1, "dropout": 0.3},
               perturbations=[{"kind": "replicate_batch", "ranks": "all"}, {"kind": "seed_desync", "ranks": ranks}])
    rows, _ = launch_ok(raw, tmp_path_factory.mktemp("seed-desync"))
    assert all(r["loss_std"] > 0 and r["grad_norm_std"] > 0 for r in rows)
    assert all(r["cos_min"] < 1.0 for r in rows)
    assert all(r["weights_in_sync"] for r in rows)


@pytest.mark.timeout(300)
@process_settings
@example(layout=(2, 4, [1]))
@given(layout=layouts(min_perturbed=1))
def test_shuffle_desync_leaves_weights_in_sync(layout: tuple[int, int, list[int]],
                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    """Desynced shards change what is averaged, never that it is averaged: identical weights."""
    n, b, ranks = layout
    out = tmp_path_factory.mktemp("shuffle-desync")
    raw = tiny(world_size=n, steps=3, data={"batch_size": b},
               model={"kind": "mlp", "hidden": 16, "depth": 1, "dropout": 0.2},
               optim=OPTIMIZERS_UNDER_TEST["sgd"], metrics={"weight_check_every": 1, "save_weights": True},
               perturbations=[{"kind": "shuffle_desync", "ranks": ranks}])
    rows, scenario = launch_ok(raw, out)
    assert_ranks_identical(out, rows, n)
    # ...and the perturbation really did change what the desynced ranks read
    sampler = ShardedSampler(scenario.data.params["size"], n, b)
    control = parse_scenario(tiny(world_size=n, data={"batch_size": b}))
    for r in ranks:
        assert not torch.equal(sampler.indices(0, make_plan(scenario, r, 0)), sampler.indices(0, make_plan(control, r, 0)))

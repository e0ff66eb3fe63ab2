"""The wider perturbation catalog: each kind's effect on a StepPlan / batch / gradient bucket
(cheap, no processes), then a few real runs for the properties only a run can show: a straggler
changes timing and nothing else, an lr mismatch breaks weight sync at its first step, and a
gradient corruption shows at the right rank and step."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from testbed.workloads.data import ShardedSampler, synthetic_classification
from testbed.perturb.perturbations import StepPlan
from testbed.record.files import read_jsonl
from testbed.scenario.tables import PERTURBATIONS
from testbed.scenario.spec import parse_scenario
from testbed.workloads.textdata import alpaca_synthetic
from testbed.engine.worker import make_plan
from tests.helpers import run, tiny

NEW_KINDS = ("shard_skew", "label_noise", "dropout_desync", "straggler", "grad_corruption", "lr_mismatch",
             "precision_mismatch")


def plan(rank: int = 1, step: int = 5, world_size: int = 4, seed: int = 0) -> StepPlan:
    return StepPlan.synced(rank, world_size, step, seed)


def apply(kind: str, p: StepPlan, **params: object) -> StepPlan:
    PERTURBATIONS.get(kind)(p, **params)
    return p


def changed_fields(p: StepPlan) -> set[str]:
    """Names of the plan fields that differ from the synced plan of the same rank and step."""
    ref = plan(p.rank, p.step, p.world_size, p.seed)
    return {f.name for f in dataclasses.fields(p) if getattr(p, f.name) != getattr(ref, f.name)}


def test_every_new_kind_is_registered_with_a_docstring() -> None:
    for kind in NEW_KINDS:
        assert kind in PERTURBATIONS
        assert PERTURBATIONS.get(kind).__doc__


# ---- shard_skew ------------------------------------------------------------------------------

def test_shard_skew_keeps_the_rank_inside_its_groups_on_real_data() -> None:
    ds = alpaca_synthetic(0, size=600)
    sampler = ShardedSampler(ds.size, 4, 16)
    p = apply("shard_skew", plan(rank=3), groups=ds.info["groups"], keep=[0, 3])
    tasks = ds.info["tasks"]
    for step in range(12):
        idx = sampler.indices(step, p)
        assert {tasks[i % 6] for i in idx.tolist()} <= {"add", "sentiment"}
    assert changed_fields(p) == {"index_transforms"}  # data order, seeds, lr untouched


@given(size=st.integers(12, 500), groups=st.integers(1, 12), data=st.data())
def test_shard_skew_maps_any_index_into_kept_groups_within_the_dataset(size: int, groups: int, data: st.DataObject) -> None:
    keep = data.draw(st.lists(st.integers(0, groups - 1), min_size=1, max_size=groups))
    idx = torch.tensor(data.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=64)))
    p = apply("shard_skew", plan(), groups=groups, keep=keep)
    out = p.index_transforms[0](idx)
    assert bool(((out >= 0) & (out < size)).all())
    assert set((out % groups).tolist()) <= set(keep)
    kept = torch.isin(idx % groups, torch.tensor(keep))
    assert torch.equal(out[kept], idx[kept])  # indices already in a kept group are not moved


def test_shard_skew_rejects_groups_outside_the_range() -> None:
    with pytest.raises(ValueError, match="keep"):
        apply("shard_skew", plan(), groups=6, keep=[6])


# ---- label_noise -----------------------------------------------------------------------------

def test_label_noise_redraws_only_loss_bearing_targets_from_the_batch() -> None:
    ds = alpaca_synthetic(0, size=64)
    batch = ds.batch(torch.arange(32))
    original = {k: v.clone() for k, v in batch.items()}
    p = apply("label_noise", plan(), fraction=0.5)
    noisy = p.batch_transforms[0](batch, p.generator("batch", 0))
    assert all(torch.equal(batch[k], original[k]) for k in batch)  # the input batch is not mutated
    mask = batch["loss_mask"]
    assert torch.equal(noisy["targets"][~mask], batch["targets"][~mask])
    changed = (noisy["targets"] != batch["targets"]) & mask
    assert 0.2 < changed.sum().item() / mask.sum().item() < 0.6  # ~0.5 redrawn, some land on the original
    assert set(noisy["targets"][mask].tolist()) <= set(batch["targets"][mask].tolist())
    again = p.batch_transforms[0](batch, p.generator("batch", 0))
    assert torch.equal(again["targets"], noisy["targets"])  # deterministic per rank and step
    assert torch.equal(noisy["input_ids"], batch["input_ids"])


def test_label_noise_on_class_labels_and_its_extremes() -> None:
    ds = synthetic_classification(0, size=512, classes=8)
    batch = ds.batch(torch.arange(512))
    p = apply("label_noise", plan(), fraction=1.0)
    noisy = p.batch_transforms[0](batch, p.generator("batch", 0))
    assert (noisy["targets"] != batch["targets"]).float().mean() > 0.7  # 8 classes: ~7/8 differ
    assert torch.equal(noisy["inputs"], batch["inputs"])
    none = apply("label_noise", plan(), fraction=0.0)
    assert torch.equal(none.batch_transforms[0](batch, none.generator())["targets"], batch["targets"])
    with pytest.raises(ValueError):
        apply("label_noise", plan(), fraction=1.5)


# ---- dropout_desync vs seed_desync -----------------------------------------------------------

def test_dropout_desync_reuses_the_shared_stream_of_a_later_step() -> None:
    drifted = [apply("dropout_desync", plan(rank=r, step=7), offset=1) for r in (2, 3)]
    assert drifted[0].rng_seed == drifted[1].rng_seed == plan(rank=0, step=8).rng_seed
    assert drifted[0].rng_seed != plan(rank=0, step=7).rng_seed
    assert changed_fields(drifted[0]) == {"rng_seed"}  # data untouched
    private = [apply("seed_desync", plan(rank=r, step=7)) for r in (2, 3)]
    assert private[0].rng_seed != private[1].rng_seed  # seed_desync: a private stream per rank
    with pytest.raises(ValueError):
        apply("dropout_desync", plan(), offset=0)


# ---- timing, optimizer and precision ---------------------------------------------------------

def test_straggler_lr_and_precision_mismatch_change_only_their_field() -> None:
    assert changed_fields(apply("straggler", plan(), delay_s=0.3)) == {"delay_s"}
    assert apply("straggler", plan(), delay_s=0.3).delay_s == 0.3
    lr = apply("lr_mismatch", plan(), scale=0.5)
    assert changed_fields(lr) == {"lr_scale"} and lr.lr_scale == 0.5
    bf16 = apply("precision_mismatch", plan())
    assert changed_fields(bf16) == {"autocast_dtype"} and bf16.autocast_dtype is torch.bfloat16
    assert apply("precision_mismatch", plan(), dtype="float16").autocast_dtype is torch.float16


# ---- grad_corruption -------------------------------------------------------------------------

def bucket(n: int = 1000, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=dtype) * 1e-3


def corrupt(mode: str, buckets: list[torch.Tensor], **params: object) -> list[torch.Tensor]:
    p = apply("grad_corruption", plan(), mode=mode, **params)
    g = p.generator("grad")
    out = [b.clone() for b in buckets]
    for b in out:
        for transform in p.grad_transforms:
            transform(b, g)
    return out


def test_grad_corruption_scale_and_noise() -> None:
    b = bucket()
    (scaled,) = corrupt("scale", [b], factor=100.0)
    assert torch.allclose(scaled, b * 100.0)
    (noisy,) = corrupt("noise", [b], factor=10.0)
    rms = b.norm() / b.numel() ** 0.5
    assert 5.0 < ((noisy - b).std() / rms).item() < 15.0  # std = factor x the bucket's RMS


@pytest.mark.parametrize("dtype, bit", [(torch.float32, 30), (torch.float32, 31), (torch.float64, 62),
                                        (torch.bfloat16, 14)])
def test_grad_corruption_bitflip_flips_one_bit_of_one_element_of_the_first_bucket(dtype: torch.dtype, bit: int) -> None:
    first, second = bucket(dtype=dtype), bucket(dtype=dtype)
    out = corrupt("bitflip", [first, second], bit=bit)
    assert torch.equal(out[1], second)  # one event per step: later buckets untouched
    diff = (out[0] != first).nonzero().flatten()
    assert diff.numel() == 1
    ints = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}[dtype]
    i = diff.item()
    xor = out[0].view(ints)[i].item() ^ first.view(ints)[i].item()
    assert xor == (1 << bit) or xor == -(1 << bit)  # exactly that bit (the sign bit reads negative)
    if bit == 31:
        assert out[0][i].item() == -first[i].item()
    with pytest.raises(ValueError, match="bit"):
        corrupt("bitflip", [bucket()], bit=32)


def test_perturbation_windows_pick_the_rank_and_step() -> None:
    scenario = parse_scenario(tiny(world_size=4, steps=20, perturbations=[
        {"kind": "grad_corruption", "ranks": [2], "start_step": 12, "end_step": 13, "factor": 50.0}]))
    hits = {(r, s) for r in range(4) for s in range(20) if make_plan(scenario, r, s).grad_transforms}
    assert hits == {(2, 12)}


# ---- real runs -------------------------------------------------------------------------------

@pytest.mark.timeout(180)
def test_straggler_changes_timing_only(tmp_path) -> None:
    raw = tiny(steps=4)
    _, control_rows, _ = run(raw, tmp_path / "control")
    result, rows, _ = run(tiny(steps=4, perturbations=[{"kind": "straggler", "ranks": [1], "delay_s": 0.3}]),
                          tmp_path / "straggler")
    assert result.ok
    assert len(rows) == 4 and rows == control_rows  # every metric of every step, exactly
    slow = [r["seconds"] for r in read_jsonl(tmp_path / "straggler" / "timing.jsonl")]
    assert len(slow) == 4 and min(slow) >= 0.3  # rank 0 waits for rank 1 in the all-reduce


@pytest.mark.timeout(120)
def test_lr_mismatch_breaks_weight_sync_at_its_first_step(tmp_path) -> None:
    result, rows, _ = run(tiny(steps=5, perturbations=[{"kind": "lr_mismatch", "ranks": [1], "start_step": 2,
                                                        "scale": 3.0}]), tmp_path)
    assert result.ok
    assert [r["weights_in_sync"] for r in rows] == [True, True, False, False, False]


@pytest.mark.timeout(120)
def test_grad_corruption_shows_at_the_right_rank_and_step(tmp_path) -> None:
    # AdamW bounds the step the corrupted mean gradient causes, so the steps after it stay normal.
    result, rows, _ = run(tiny(world_size=3, steps=5, optim={"kind": "adamw", "lr": 0.01}, perturbations=[
        {"kind": "grad_corruption", "ranks": [2], "start_step": 3, "end_step": 4, "factor": 1000.0}]), tmp_path)
    assert result.ok
    norms = {r["step"]: r["grad_norm"] for r in rows}
    for step, n in norms.items():
        ratio = n[2] / max(n[0], n[1])
        assert (ratio > 100.0) if step == 3 else (ratio < 10.0), (step, n)
    assert rows[3]["cos_to_mean"][2] > 0.99 > max(rows[3]["cos_to_mean"][:2])  # the mean is rank 2's gradient

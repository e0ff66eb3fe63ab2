"""The data ledger without processes (issue 22): the device fingerprints, the payload and the ledger,
and the data rules on a simulated DistributedSampler pipeline (tests/ledger_sim.py) - a disjoint
partition never yields ``overlap`` / ``replicated``, a shuffled order never ``epoch_repeat``, and each
real mistake gives its cause with the right ranks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.diagnose.data import DataFindings, culprits, data_findings
from testbed.metrics.fingerprint import Fingerprinter, flatten_inputs, mix64, mix64_int
from testbed.metrics.ledger import HEADER, SENTINEL, DataLedger, payload
from tests.ledger_sim import Pipeline

CPU = torch.device("cpu")


def findings(p: Pipeline, epochs: int = 3) -> list[tuple[str, list[int]]]:
    return [(f.cause, f.ranks) for f in data_findings(p.rows(epochs * p.steps_per_epoch()), p.world_size)]


# ---- fingerprints ----------------------------------------------------------------------------
def test_mix64_is_the_python_reference_and_a_bijection_on_a_sample():
    x = torch.tensor([0, 1, -1, 2**62, -(2**63)], dtype=torch.int64)
    assert mix64(x).tolist() == [mix64_int(int(v)) for v in x]
    many = mix64(torch.arange(100_000, dtype=torch.int64))
    assert torch.unique(many).numel() == 100_000


def test_a_sample_has_one_fingerprint_however_it_is_padded_batched_or_ordered():
    """HF-style kwargs: right or left padding under an attention mask, another batch composition,
    another position in the batch - the same fingerprint; a one-token change - another."""
    f = Fingerprinter()
    ids = torch.randint(3, 100, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    base = f.fingerprints((), {"input_ids": ids, "attention_mask": mask, "labels": ids})
    pad = torch.full((4, 3), 0)
    right = f.fingerprints((), {"input_ids": torch.cat([ids, pad], 1), "labels": torch.cat([ids, pad - 100], 1),
                                "attention_mask": torch.cat([mask, pad], 1)})
    left = f.fingerprints((), {"input_ids": torch.cat([pad + 5, ids], 1), "labels": torch.cat([pad - 100, ids], 1),
                               "attention_mask": torch.cat([pad, mask], 1)})
    order = [2, 0, 3, 1]
    shuffled = f.fingerprints((), {"input_ids": ids[order], "attention_mask": mask[order], "labels": ids[order]})
    assert base.tolist() == right.tolist() == left.tolist()
    assert shuffled.tolist() == base[order].tolist()
    changed = ids.clone()
    changed[1, 3] += 1
    other = f.fingerprints((), {"input_ids": changed, "attention_mask": mask, "labels": ids})
    assert (other != base).tolist() == [False, True, False, False]


def test_inputs_of_every_shape_and_dtype_are_fingerprinted_and_distinct():
    f = Fingerprinter()
    batch = ({"pixel_values": torch.randn(64, 3, 8, 8).half(), "mask": torch.rand(64, 8) > 0.5,
              "y": torch.arange(64)}, 7)  # a Lightning (batch, batch_idx) with a dict batch
    out = f.fingerprints(batch, {"num_items_in_batch": torch.tensor(12)})
    assert out.shape == (64,) and torch.unique(out).numel() == 64
    assert [k for k, _ in flatten_inputs(batch, {"scale": 2.0})] == ["arg0.pixel_values", "arg0.mask", "arg0.y"]
    assert f.fingerprints((3,), {"x": torch.tensor(1.0)}) is None  # no batch dimension: nothing to read


def test_ten_thousand_random_samples_never_collide():
    f = Fingerprinter()
    x = torch.randint(0, 50, (10_000, 12))  # small alphabet: many samples share long prefixes
    x = torch.unique(x, dim=0)
    assert torch.unique(f.fingerprints((x,), {})).numel() == x.shape[0]


# ---- payload and ledger ----------------------------------------------------------------------
def test_payload_is_fixed_size_sorted_distinct_and_sampled():
    fps = mix64(torch.tensor([5, 3, 5, 9, 1], dtype=torch.int64))
    out = payload(fps, 0, 8, CPU)
    assert out.shape == (HEADER + 8,) and out[0] == 5 and out[2] == 4 and out[3] == 4
    kept = out[HEADER:HEADER + 4].tolist()
    assert kept == sorted(set(fps.tolist())) and out[HEADER + 4:].eq(SENTINEL).all()
    assert payload(fps, 0, 8, CPU)[1] != payload(fps.flip(0), 0, 8, CPU)[1]  # the digest sees the order
    sampled = payload(mix64(torch.arange(1000)), 3, 512, CPU)
    kept = sampled[HEADER:HEADER + int(sampled[3])]
    assert 60 < int(sampled[2]) < 200 and (kept & 7).eq(0).all()
    assert payload(None, 0, 4, CPU)[:HEADER].eq(0).all()


def test_the_ledger_level_rises_with_the_batch_and_the_memory_stays_bounded():
    ledger = DataLedger(2, samples=16, capacity=200)
    for step in range(40):
        table = np.stack([payload(mix64(torch.arange(256) + 256 * (2 * step + r)), ledger.level, 16, CPU).numpy()
                          for r in range(2)])
        fields = ledger.update(table)
    assert ledger.level >= 4 and len(ledger.entries) <= 200
    assert fields["data_samples"] == [256, 256] and not fields.get("data_pairs")


# ---- the data rules on simulated pipelines ---------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(world=st.integers(2, 5), per_rank=st.integers(3, 12), batch=st.sampled_from([1, 2, 4, 8, 16]),
       seed=st.integers(0, 10**6), drop_last=st.booleans(), extra=st.integers(0, 7))
def test_a_disjoint_partition_shuffled_every_epoch_yields_no_data_cause(world, per_rank, batch, seed, drop_last, extra):
    """DistributedSampler with set_epoch, any world size, batch, leftover, padding: nothing found."""
    p = Pipeline(world_size=world, size=world * per_rank * batch + extra, batch=batch, seed=seed, drop_last=drop_last)
    assert findings(p, epochs=3) == []


@settings(max_examples=15, deadline=None)
@given(world=st.integers(2, 4), per_rank=st.integers(4, 10), batch=st.sampled_from([2, 8]), seed=st.integers(0, 10**6))
def test_an_order_that_repeats_is_found_job_wide_and_declared_it_does_not_count(world, per_rank, batch, seed):
    p = Pipeline(world_size=world, size=world * per_rank * batch, batch=batch, seed=seed, no_set_epoch=True)
    rows = p.rows(3 * p.steps_per_epoch())
    (f,) = data_findings(rows, world)
    assert (f.cause, f.ranks, f.step, f.effect["period"]) == ("epoch_repeat", [], per_rank, per_rank)
    (declared,) = data_findings(rows, world, intended=["epoch_repeat"])
    assert declared.intended


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case,expected", [
    (dict(own_seed_ranks=(1,)), [("overlap", [1])]),
    (dict(world_size=4, size=384, own_seed_ranks=(2,)), [("overlap", [2])]),
    (dict(world_size=8, size=2048, own_seed_ranks=(3, 5), batch=16), [("overlap", [3, 5])]),
    (dict(own_seed_ranks=(0, 1, 2)), [("overlap", [])]),
    (dict(world_size=2, own_seed_ranks=(1,)), [("overlap", [])]),
    (dict(unsharded=True), [("replicated", [])]),
    (dict(world_size=5, size=400, copies={1: 0, 2: 0}), [("replicated", [1, 2])]),
    (dict(world_size=4, size=384, copies={2: 0, 3: 1}), [("replicated", [2, 3])]),
    (dict(no_set_epoch_ranks=(2,)), [("epoch_repeat", [2])]),
    (dict(shuffle=False), [("epoch_repeat", [])]),
    (dict(size=1000, duplicates=0.05), []),
], ids=["seed-1of3", "seed-1of4", "seed-2of8", "seed-all", "seed-2ranks", "unsharded", "copies-1-2-of-5",
        "local-rank", "no-set-epoch-rank2", "shuffle-false", "dataset-duplicates"])
def test_each_mistake_gives_its_cause_and_ranks(case, expected, seed):
    assert findings(Pipeline(seed=seed, **case)) == expected


def test_overlap_is_found_inside_the_first_epoch_and_the_batch_size_one_repeat_needs_eight_samples():
    p = Pipeline(own_seed_ranks=(1,))
    (f,) = data_findings(p.rows(3 * p.steps_per_epoch()), 3)
    assert f.detected < p.steps_per_epoch()  # inside the first epoch
    q = Pipeline(size=30, batch=1, no_set_epoch=True)
    (g,) = data_findings(q.rows(30), 3)
    assert (g.step, g.detected) == (10, 17)


def test_rows_without_the_ledger_and_odd_rows_give_nothing():
    tracker = DataFindings(3)
    for row in [{"step": 0, "loss": [1, 2, 3]}, {"step": "x"}, {"step": 1, "data_digest": [1, 2], "data_samples": [8]},
                {"step": 2, "data_reads": [1, 1, 1]}]:
        assert tracker.update(row) == []


def test_culprits_are_the_unique_smallest_cover_of_the_overlapping_pairs():
    assert culprits(3, [(0, 1), (1, 2)]) == [1]
    assert culprits(3, [(0, 1), (1, 2), (0, 2)]) == []
    assert culprits(2, [(0, 1)]) == []
    assert culprits(4, [(0, 2), (0, 3), (1, 2), (1, 3)]) == []  # two samplers of two ranks: not attributable
    assert culprits(8, [(3, r) for r in range(8) if r != 3] + [(5, r) for r in range(8) if r not in (3, 5)]) == [3, 5]

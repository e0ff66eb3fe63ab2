"""Held-back checks of the statistics (issue 24, "Must show"): cases the verdict and the online test
got wrong before — two spikes on two ranks, a ×3 spike in a quiet run, partial replication, an
onset reported early, an effect that ended, effects measured against a faulty rank, half the ranks
perturbed, heavy-tailed healthy runs — and an online label-noise onset in a real 4-rank run.

Pure numpy on simulated rows except the last (two short real runs, one module-scoped fixture)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from testbed.diagnose import SequentialTest, diagnose
from testbed.diagnose.attribution import METRICS
from testbed.engine.runner import launch
from testbed.record.files import read_metrics
from testbed.scenario.spec import load_scenario

from tests.test_verdict import binomial_bound
from tests.verdict_streams import Stream

ALPHA = 0.01
SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"


def quiet_rows(n: int, steps: int, seed: int) -> list[dict]:
    """A quiet run: light-tailed (uniform) rank-to-rank noise, its robust z stay below ≈ 3."""
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(steps):
        loss = 2.0 * np.exp(0.02 * rng.uniform(-1.7, 1.7, n))
        norm = (1 + 0.02 * t) * np.exp(0.05 * rng.uniform(-1.7, 1.7, n))
        cos = 0.5 + 0.03 * rng.uniform(-1.7, 1.7, n)
        rows.append({"step": t, "loss": loss.tolist(), "grad_norm": norm.tolist(), "cos_to_mean": cos.tolist(),
                     "flags": []})
    return rows


@pytest.mark.parametrize("seed", [6, 7, 8])
def test_two_x50_spikes_on_two_ranks_are_both_found(seed):
    """×50 gradients on rank 1 at step 10 and rank 2 at step 22: each is tested against the
    healthy tail, not against the other — both confirmed; the prefix that found rank 1 is not
    withdrawn by the full record."""
    rows = Stream(4, 40).rows(seed)
    rows[10]["grad_norm"][1] *= 50
    rows[22]["grad_norm"][2] *= 50
    v = diagnose(rows)
    assert (v.status, v.ranks, v.since_step, v.until_step) == ("inconsistent", [1, 2], 10, 23)
    spikes = {(e.rank, e.effect["peak_step"]): e for e in v.evidence if e.metric == "grad_norm"}
    assert set(spikes) == {(1, 10), (2, 22)} and all(e.effect["confirmed"] and e.p_value <= ALPHA for e in spikes.values())
    assert diagnose(rows[:16]).ranks == [1]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_x3_spike_in_a_quiet_run_is_found(seed):
    """A ×3 gradient on rank 2 at step 12 of a quiet run: robust z ≥ 10 against ≤ 3 elsewhere."""
    rows = quiet_rows(4, 40, seed)
    rows[12]["grad_norm"][2] *= 3
    v = diagnose(rows)
    assert (v.status, v.ranks, v.since_step) == ("inconsistent", [2], 12)
    (e,) = v.evidence
    assert e.effect["value"] >= 10 and e.effect["reference"] <= 3.5 and e.effect["confirmed"]


def replicate(rows: list[dict], copies: dict[int, int]) -> list[dict]:
    """``copies[r] = s``: rank r reads rank s's batches (its values are s's, bit for bit)."""
    for row in rows:
        for key in METRICS:
            for r, s in copies.items():
                row[key][r] = row[key][s]
    return rows


def test_partial_replication_does_not_blame_the_independent_ranks():
    """Ranks 1 and 2 read rank 0's batches (of 5): the three are bit-identical, which ranks that read
    their own data never are — the anomaly is the replication, not the independent ranks 3 and 4.
    Which of 0, 1, 2 read its own data is not decidable: no rank is named, the groups are reported.
    With replication declared intended (a replicate_batch baseline) the ranks apart are the fault;
    a replicating minority (ranks 3 and 4 identical) is named."""
    rows = replicate(Stream(5, 30).rows(1), {1: 0, 2: 0})
    v = diagnose(rows)
    assert (v.status, v.ranks, v.groups) == ("inconsistent", [], [[0, 1, 2], [3, 4]])
    assert "bit-identical on ranks 0, 1, 2" in v.headline() and "not decidable" in v.headline()
    assert diagnose(rows, replicas_intended=True).ranks == [3, 4]
    test = SequentialTest(5, ALPHA)
    alarms = [a for a in map(test.update, rows) if a is not None]
    assert alarms and all(3 not in a.ranks and 4 not in a.ranks for a in alarms)
    minority = diagnose(replicate(Stream(5, 30).rows(2), {4: 3}))
    assert (minority.status, minority.ranks) == ("inconsistent", [3, 4])


def test_onset_is_not_reported_early():
    """Rank 1's loss +10 % (≈ 5σ) from step 30 of 60: the onset at 30 (±2), its support interval
    holds 30, and the effect lasts (no until_step)."""
    for seed in range(5):
        v = diagnose(Stream(4, 60, offset={1: 0.10}, offset_from=30, drift=0.0).rows(seed))
        (e,) = [e for e in v.evidence if e.metric == "loss"]
        assert v.ranks == [1] and 28 <= v.since_step <= 32, v.headline()
        lo, hi = e.effect["since_range"]
        assert lo <= 30 <= hi and e.effect["until_step"] is None and v.until_step is None


def test_an_effect_that_ended_reports_until_step():
    """Rank 1's loss +15 % on steps 5–19 of 50 (a perturbation with end_step 20): since ≈ 5,
    until ≈ 20 (the first step without it), not "37/49 steps" with no end."""
    for seed in range(5):
        v = diagnose(Stream(4, 50, offset={1: 0.15}, offset_from=5, offset_to=20, drift=0.0).rows(seed))
        (e,) = [e for e in v.evidence if e.metric == "loss"]
        assert v.ranks == [1] and abs(v.since_step - 5) <= 2 and abs(v.until_step - 20) <= 2, v.headline()
        assert e.effect["of"] == e.effect["until_step"] - e.effect["since_step"] and e.effect["steps"] >= e.effect["of"] - 2


def test_effects_are_measured_against_the_healthy_ranks():
    """Three ranks, rank 1's loss +20 %: ranks 0 and 2 are not named "below the other ranks", and
    rank 1's effect is its distance from them (not diluted by itself)."""
    for seed in range(5):
        v = diagnose(Stream(3, 40, offset={1: 0.20}).rows(seed))
        assert v.ranks == [1], v.headline()
        loss = next(e for e in v.evidence if e.metric == "loss")
        assert loss.effect["value"] == pytest.approx(0.20, abs=0.03) and "healthy ranks 0,2" in loss.effect["unit"]


def test_half_the_ranks_perturbed_never_names_a_healthy_rank():
    """Ranks 0–3 of 8 with the same +5 % loss: no prefix of 20 … 40 steps names a healthy rank; the
    full record reports the split."""
    rows = Stream(8, 40, offset={r: 0.05 for r in range(4)}).rows(3)
    for k in range(20, 41, 5):
        v = diagnose(rows[:k])
        named = {e.rank for e in v.evidence if e.rank is not None}
        assert named <= {0, 1, 2, 3}, (k, v.headline())
    assert diagnose(rows).groups == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_one_weak_rank_of_eight_names_no_other_rank():
    """Rank 7's loss +3 % (≈ 1.5σ) on 8 ranks: whatever is found names no other rank."""
    for seed in range(6):
        v = diagnose(Stream(8, 40, offset={7: 0.03}).rows(seed))
        assert set(v.ranks) <= {7}, v.headline()


def test_cauchy_tailed_healthy_streams():
    """200 healthy runs with Cauchy rank-to-rank noise (2–8 ranks, 20–100 steps, drift, shared
    shocks) through the full verdict (spike test on): at most 4 called inconsistent (2 %)."""
    rng = np.random.default_rng(2024)
    alarms = 0
    for i in range(200):
        stream = Stream(int(rng.integers(2, 9)), int(rng.integers(20, 101)), tails="cauchy",
                        drift=float(rng.uniform(0, 2)), shock=float(rng.uniform(0, 0.5)))
        alarms += diagnose(stream.rows(i)).status != "consistent"
    assert alarms <= 4 and alarms <= binomial_bound(200, 0.02)


# --------------------------------------------------------------------------- a real 4-rank run

@pytest.fixture(scope="module")
def onset_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """label_noise (half of rank 3's labels) from step 20 of 40 on 4 real gloo ranks, and its healthy
    twin (the same seed, no perturbation)."""
    out = {}
    for name, perturbations in (("noisy", [{"kind": "label_noise", "ranks": [3], "fraction": 0.5, "start_step": 20}]),
                                ("healthy", [])):
        scenario = load_scenario(SCENARIOS / "label_noise.toml", {"steps": 40, "seed": 7, "expect": {},
                                                                  "perturbations": perturbations, "timeout_s": 300.0})
        run_dir = tmp_path_factory.mktemp(name)
        result = launch(scenario, run_dir)
        assert result.ok, result.reason
        out[name] = read_metrics(run_dir)
    return out


@pytest.mark.timeout(600)
def test_online_label_noise_onset_is_named_soon_after_it_starts(onset_runs):
    """Replayed through the online test: no alarm before step 20; an alarm naming rank 3 by step 35;
    the healthy twin raises none. The offline verdict names rank 3 from about step 20."""
    test = SequentialTest(4, ALPHA)
    for row in onset_runs["noisy"]:
        test.update(row)
    assert test.alarms and min(a.step for a in test.alarms) >= 20
    naming = [a for a in test.alarms if a.ranks == (3,)]
    assert naming and naming[0].step <= 35 and all(set(a.ranks) <= {3} for a in test.alarms)
    healthy = SequentialTest(4, ALPHA)
    assert all(healthy.update(row) is None for row in onset_runs["healthy"])
    v = diagnose(onset_runs["noisy"], world_size=4)
    assert v.ranks == [3] and 17 <= v.since_step <= 23, v.headline()
    assert diagnose(onset_runs["healthy"], world_size=4).status == "consistent"

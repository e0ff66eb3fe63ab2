"""The online test (``testbed.diagnose.sequential`` on ``testbed.diagnose.betting``): every bet is fair
under relabeling (the martingale property, checked exactly over all permutations); over long healthy
streams the alarm fires in at most α of runs (Ville's inequality); a blatant fault alarms within
about twice the floor ⌈ln(1/α)/ln N⌉ after it starts; closed testing never names a healthy rank
when half the ranks are perturbed alike; the exact rules fire at once. Pure: no processes."""
from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from testbed.diagnose import SequentialTest
from testbed.diagnose.betting import EXPERTS, RankBets, closed_names, run, subsets

from tests.test_verdict import binomial_bound
from tests.verdict_streams import TAILS, Stream

ALPHA = 0.01
LEVEL = math.log(1 / ALPHA)

long_streams = st.builds(
    Stream, world_size=st.integers(2, 16), steps=st.just(500), tails=st.sampled_from(TAILS),
    noise=st.floats(1e-3, 0.3), drift=st.floats(0.0, 3.0), shock=st.floats(0.0, 1.0))


def stream_array(stream: Stream, seed: int) -> np.ndarray:
    """``[T, K, N]``: a simulated run's comparable values (log loss, log grad norm, cosine)."""
    loss, norm, cos = stream.arrays(seed)
    return np.stack([np.log(loss), np.log(norm), cos], axis=1)


def streams_array(stream: Stream, seeds: range) -> np.ndarray:
    return np.stack([stream_array(stream, s) for s in seeds], axis=1)  # [T, B, K, N]


@settings(max_examples=25, derandomize=True, database=None, deadline=None)
@given(n=st.integers(2, 5), before=st.integers(0, 30), tails=st.sampled_from(TAILS), seed=st.integers(0, 2**16),
       offset=st.floats(0.0, 0.5))
def test_every_bet_is_fair_under_relabeling(n, before, tails, seed, offset):
    """The martingale property, exactly: after any history (here with an offset rank, which the
    bets have learned from), the mean over every relabeling of a set A of the step's factor
    ``e_{A,r,k}`` is 1 for every tested set, rank in it and expert."""
    x = stream_array(Stream(n, before + 1, tails=tails, offset={n - 1: offset}), seed)
    bets = RankBets(n, 3)
    for t in range(before):
        bets.step(x[t])
    for a, row in enumerate(bets.members):
        ranks = np.flatnonzero(row)
        mean = np.zeros((n, len(EXPERTS)))
        perms = list(itertools.permutations(ranks))
        for perm in perms:
            relabeled = x[before].copy()
            relabeled[:, ranks] = x[before][:, list(perm)]
            trial = copy.deepcopy(bets)
            trial.step(relabeled)
            mean += np.exp(trial.log_w - bets.log_w)[0, a] / len(perms)
        assert mean[ranks] == pytest.approx(np.ones((ranks.size, len(EXPERTS))), abs=1e-9)


def test_false_alarm_rate_over_long_streams():
    """Hypothesis draws 10 healthy recipes (2..16 ranks, heavy tails, drift, shared shocks), each run
    20 times for 500 steps: sup_t E(t) ≥ 1/α in at most α of the 200 runs (binomial margin),
    checked at α = 0.01 and 0.1."""
    sup: list[float] = []

    @settings(max_examples=10, derandomize=True, database=None, deadline=None, phases=[Phase.generate])
    @given(stream=long_streams)
    def simulate(stream: Stream) -> None:
        n = stream.world_size
        _, trace = run(streams_array(stream, range(20)), np.ones((1, n), dtype=bool))
        sup.extend(trace[:, :, 0].max(axis=0).tolist())

    simulate()
    assert len(sup) == 200
    for alpha in (0.01, 0.1):
        alarms = sum(s >= math.log(1 / alpha) for s in sup)
        assert alarms <= binomial_bound(len(sup), alpha), (alpha, alarms, len(sup))


def test_healthy_ranks_are_named_rarely():
    """Closed testing on healthy streams (3..8 ranks, normal and Cauchy noise, 300 steps): some rank
    named at α = 0.1 in at most α of 120 runs (binomial margin)."""
    named = runs = 0
    for n, tails in itertools.product((3, 5, 8), ("normal", "cauchy")):
        bets, _ = run(streams_array(Stream(n, 300, tails=tails, drift=1.0), range(20)))
        named += sum(bool(closed_names(bets.members, bets.sup_log_e[b] >= math.log(10))) for b in range(20))
        runs += 20
    assert named <= binomial_bound(runs, 0.1), named


def test_update_matches_the_batch_process():
    stream = Stream(5, 120, tails="t3", drift=2.0, shock=0.5)
    test = SequentialTest(5)
    online = []
    for row in stream.rows(0):
        test.update(row)
        online.append(math.log(test.e_value))
    _, trace = run(stream_array(stream, 0))
    assert online == pytest.approx(trace[:, 0].tolist(), abs=1e-9)


def floor(n: int) -> int:
    return math.ceil(math.log(1 / ALPHA) / math.log(n))


@pytest.mark.parametrize("n", [2, 4, 8])
def test_blatant_fault_alarms_within_twice_the_floor(n):
    """One rank's loss 5σ off (σ: a rank's own noise) from step 20, 20 runs: no alarm before the
    onset; median steps from the onset to the alarm (onset step counted) ≤ 2 × the floor + 1,
    90th percentile ≤ 4 × the floor (N = 2: floor 7; 4: 4; 8: 3)."""
    onset, sigma = 20, 0.02 * math.sqrt(0.98)
    stream = Stream(n, 60, drift=0.0, offset={n - 1: math.exp(5 * sigma) - 1}, offset_from=onset)
    _, trace = run(streams_array(stream, range(300, 320)), np.ones((1, n), dtype=bool))
    delays = []
    for b in range(20):
        hit = np.flatnonzero(trace[:, b, 0] >= LEVEL)
        assert hit.size and hit[0] >= onset
        delays.append(int(hit[0]) - onset + 1)
    assert np.median(delays) <= 2 * floor(n) + 1 and np.percentile(delays, 90) <= 4 * floor(n), delays


@pytest.mark.parametrize("world_size", [4, 8])
def test_offset_is_caught_fast_and_named(world_size):
    """+10 % loss on the last rank from the start (≈ 5σ of the rank-to-rank noise): the alarm within
    12 steps, the rank named (closed testing) within 20, and never another rank."""
    rank = world_size - 1
    for seed in range(5):
        test = SequentialTest(world_size, ALPHA)
        for row in Stream(world_size, 60, offset={rank: 0.10}).rows(seed):
            test.update(row)
        first, last = test.alarms[0], test.alarms[-1]
        assert first.kind == "persistent" and first.step < 12 and first.e_value >= 1 / ALPHA
        assert (last.rank, last.ranks, last.metric) == (rank, (rank,), "loss") and last.step < 20
        assert all(set(a.ranks) <= {rank} for a in test.alarms)


def test_an_alarm_that_cannot_name_yet_says_so():
    test = SequentialTest(4, ALPHA)
    for row in Stream(4, 40, offset={3: 0.10}).rows(1):
        test.update(row)
    first = test.alarms[0]
    assert first.ranks == () and first.rank is None and first.suspect == 3  # the alarm came first ...
    assert "not attributable yet (leading suspect: rank 3)" in first.describe()
    assert test.named == [3] and test.alarms[-1].ranks == (3,)  # ... closed testing named rank 3 later


def test_half_the_ranks_perturbed_alike_names_nobody():
    """Ranks 0–3 of 8 with the same +10 % loss: each half is exchangeable within itself, so closed
    testing (sets of ≥ 4 ranks) cannot tell which half is healthy and names nobody — while the
    alarm fires. With 2 of 8 perturbed, only those two are ever named."""
    half = Stream(8, 80, offset={r: 0.10 for r in range(4)})
    bets, trace = run(streams_array(half, range(10)))
    assert (trace[:, :, 0].max(axis=0) >= LEVEL).all()
    assert all(closed_names(bets.members, bets.sup_log_e[b] >= LEVEL) == [] for b in range(10))
    two = Stream(8, 80, offset={2: 0.10, 5: -0.10})
    bets, _ = run(streams_array(two, range(10)))
    assert all(set(closed_names(bets.members, bets.sup_log_e[b] >= LEVEL)) <= {2, 5} for b in range(10))


def test_two_ranks_alarm_names_both():
    test = SequentialTest(2, ALPHA)
    alarm = next(a for a in map(test.update, Stream(2, 200, offset={1: 0.10}).rows(1)) if a is not None)
    assert (alarm.rank, alarm.ranks) == (None, (0, 1))
    assert "ranks 0, 1" in alarm.describe()


def test_healthy_stream_stays_quiet():
    test = SequentialTest(4, ALPHA)
    assert all(test.update(row) is None for row in Stream(4, 500, tails="cauchy", drift=3.0).rows(2))
    assert test.alarms == []


def test_sets_tested():
    assert subsets(2).tolist() == [[True, True]]
    assert subsets(4).shape == (11, 4)  # all 4, the four triples, the six pairs
    assert subsets(8).shape == (163, 8)  # sets of ≥ 4 ranks
    assert subsets(16).shape == (137, 16) and subsets(16).sum(axis=1).min() == 14  # at most 2 faulty assumed


def test_exact_rules():
    rows = Stream(4, 20).rows(3)
    for row in rows:
        row["loss"] = [row["loss"][0]] * 4  # replicated batches: bit-identical losses
    rows[5]["loss"][2] += 1e-6
    rows[8]["weights_in_sync"], rows[8]["weight_checksum"] = False, [1, 1, 1, 2]
    rows[9]["flags"] = [{"rank": 1, "kind": "nonfinite_grad"}]
    rows[9]["grad_norm"][1] = None
    test = SequentialTest(4, ALPHA)
    alarms = {row["step"]: test.update(row) for row in rows}
    assert (alarms[5].kind, alarms[5].rank, alarms[5].metric) == ("transient", 2, "loss")
    assert (alarms[8].kind, alarms[8].rank) == ("divergence", 3)
    assert (alarms[9].kind, alarms[9].rank, alarms[9].metric) == ("nonfinite", 1, "grad_norm")
    assert all(math.isinf(a.e_value) for a in test.alarms)
    assert [a.step for a in test.alarms] == [5, 8, 9]


def test_ranks_apart_from_replicas_raise_an_exact_alarm():
    """Identical batches on ranks 0–2, rank 3 different from the start (seed_desync_1)."""
    rows = Stream(4, 10).rows(4)
    for row in rows:
        for key in ("loss", "grad_norm", "cos_to_mean"):
            row[key][1] = row[key][2] = row[key][0]
    test = SequentialTest(4, ALPHA)
    first = next((row["step"], a) for row in rows if (a := test.update(row)) is not None)
    assert first[0] == 1 and (first[1].kind, first[1].rank, first[1].metric) == ("persistent", 3, "loss")
    assert math.isinf(first[1].e_value)

"""Property tests of the pure metric math (``testbed.metrics.step.step``), no processes.

The per-rank scalars are produced exactly as the comm hook produces them: bucket by bucket
through ``BucketAccumulator``, against a mean summed in the working dtype like an all-reduce.
The oracles are independent: ``metrics.brute_force`` (direct numpy formulas on full gradients,
float64) and ``statistics.pstdev``. Tolerances come from ``strategies`` and are derived from the
dtype's epsilon, the vector length and the conditioning of the mean — never a magic constant.
"""
from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from testbed.metrics import step as metrics
from testbed.record.files import dumps
from tests.strategies import (GradCase, cosine_tolerance, dot_tolerance, gradient_cases,
                              identical_gradient_cases, nonfinite, partitions, rank_losses, world_sizes)

# ---- the hook's arithmetic, replayed in one process ------------------------------------------


def allreduce_mean(grads: np.ndarray) -> torch.Tensor:
    """ḡ as the hook gets it: SUM over ranks in the working dtype, then divide by N."""
    t = torch.from_numpy(grads)
    total = t[0].clone()
    for r in range(1, t.shape[0]):
        total += t[r]
    return total / t.shape[0]


def accumulate(case: GradCase, buckets: list[slice], with_gram: bool = False) -> list[metrics.BucketAccumulator]:
    """One accumulator per rank, fed bucket by bucket (each rank's Gram is the same; rank 0's)."""
    # Each rank's gradient in its own allocation, like a rank's bucket: a SIMD dot's rounding depends
    # on memory alignment, so two ranks reading rows of one array could round identical data apart.
    local = [torch.from_numpy(g).clone() for g in case.grads]
    t, mean = torch.from_numpy(case.grads), allreduce_mean(case.grads)
    accs = [metrics.BucketAccumulator(case.world_size, with_gram=with_gram) for _ in range(case.world_size)]
    for sl in buckets:
        for r, acc in enumerate(accs):
            acc.add_pairs([local[r][sl]], [mean[sl]])  # what the hook calls once the mean is back
        if with_gram:
            accs[0].add_gram(t[:, sl])
    return accs


def hook_row(case: GradCase, losses: list[float], buckets: list[slice]) -> metrics.Row:
    accs = accumulate(case, buckets)
    return metrics.step_metrics(losses, [a.sq_norm.item() for a in accs], [a.dot_with_mean.item() for a in accs])


def exact_scalars(case: GradCase) -> tuple[list[float], list[float]]:
    """``‖g_i‖²`` and ``g_i·ḡ`` in float64 from the float64 mean (consistent inputs)."""
    g = case.grads.astype(np.float64)
    mean = g.mean(axis=0)
    return [float(x @ x) for x in g], [float(x @ mean) for x in g]


def assert_no_silent_numbers(row: metrics.Row) -> None:
    """Every number in the row is finite or None, and the row is strict JSON."""
    def walk(x: object) -> None:
        if isinstance(x, float):
            assert math.isfinite(x), row
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    walk(row)
    dumps(row)  # raises on NaN / Inf


def flag_set(row: metrics.Row) -> set[tuple[int | None, str]]:
    return {(f["rank"], f["kind"]) for f in row["flags"]}


# ---- agreement with the oracle, and the unit interval --------------------------------------


@given(case=gradient_cases(), data=st.data())
def test_bucketed_metrics_match_brute_force(case: GradCase, data: st.DataObject) -> None:
    losses = data.draw(rank_losses(case.world_size))
    row = hook_row(case, losses, data.draw(partitions(case.dim)))
    oracle = metrics.brute_force(case.grads.astype(np.float64))
    tol = cosine_tolerance(case)
    norm_tol = 2 * case.dim * float(np.finfo(case.dtype).eps)
    assume(tol < 0.1)  # ranks that cancel almost exactly have no meaningful cosine to compare
    assert row["flags"] == []
    np.testing.assert_allclose(row["grad_norm"], oracle["grad_norm"], rtol=norm_tol)
    np.testing.assert_allclose(row["cos_to_mean"], oracle["cos_to_mean"], rtol=0, atol=tol)
    assert row["mean_grad_norm"] == pytest.approx(oracle["mean_grad_norm"], rel=tol)
    assert row["cos_mean"] == pytest.approx(float(np.mean(row["cos_to_mean"])), rel=1e-12)
    assert row["cos_min"] == min(row["cos_to_mean"])
    assert row["grad_norm_std"] == pytest.approx(statistics.pstdev(oracle["grad_norm"]),
                                                 abs=norm_tol * max(oracle["grad_norm"]) + 1e-300)
    assert row["loss_std"] == pytest.approx(statistics.pstdev(losses), abs=1e-12 * max(map(abs, losses)))
    assert_no_silent_numbers(row)


@given(case=gradient_cases(world_size=world_sizes(1, 8)), exps=st.lists(st.integers(-8, 8), min_size=3, max_size=3))
def test_cosines_stay_in_unit_interval_even_for_parallel_ranks(case: GradCase, exps: list[int]) -> None:
    """Exactly (anti-)parallel ranks are where round-off pushes a cosine past ±1; it is clamped."""
    g0 = case.grads[0]
    extra = np.stack([g0 * case.dtype.type(2.0**exps[0]), g0 * case.dtype.type(2.0**exps[1]),
                      -g0 * case.dtype.type(2.0**exps[2])])
    wide = GradCase(np.concatenate([case.grads, extra]), case.shapes)
    row = hook_row(wide, [0.0] * wide.world_size, [slice(0, wide.dim)])
    pair = metrics.pairwise_cosine(accumulate(wide, [slice(0, wide.dim)], with_gram=True)[0].gram.numpy())
    values = [c for c in row["cos_to_mean"] if c is not None] + [c for r in pair for c in r if c is not None]
    assert all(-1.0 <= c <= 1.0 for c in values)
    assert pair[0][wide.world_size - 3] == pytest.approx(1.0, abs=1e-6)
    assert pair[0][wide.world_size - 1] == pytest.approx(-1.0, abs=1e-6)


@given(case=gradient_cases(), data=st.data())
def test_dispersion_is_a_nonnegative_population_std(case: GradCase, data: st.DataObject) -> None:
    losses = data.draw(rank_losses(case.world_size))
    sq, dots = exact_scalars(case)
    row = metrics.step_metrics(losses, sq, dots)
    assert row["loss_std"] >= 0.0 and row["grad_norm_std"] >= 0.0
    assert row["loss_std"] == pytest.approx(statistics.pstdev(losses), abs=1e-12 * max(map(abs, losses)))
    if row["loss_cv"] is None:  # only for a zero mean with a non-zero spread, and then flagged
        assert (None, "zero_mean_loss") in flag_set(row) and row["loss_std"] > 0
    else:
        assert row["loss_cv"] >= 0.0
    assert row["grad_norm_cv"] >= 0.0


# ---- invariances ------------------------------------------------------------------------------


@given(case=gradient_cases(world_size=world_sizes(2, 16)), data=st.data())
def test_pairwise_cosine_ignores_positive_scaling_of_one_rank(case: GradCase, data: st.DataObject) -> None:
    """Scaling g_r by 2^k is exact in floating point, so the cosines must not move at all."""
    r = data.draw(st.integers(0, case.world_size - 1))
    k = data.draw(st.integers(-8, 8).filter(bool))
    scaled = case.grads.copy()
    scaled[r] *= case.dtype.type(2.0**k)
    whole = [slice(0, case.dim)]
    before = metrics.pairwise_cosine(accumulate(case, whole, with_gram=True)[0].gram.numpy())
    after = metrics.pairwise_cosine(accumulate(GradCase(scaled, case.shapes), whole, with_gram=True)[0].gram.numpy())
    assert after == before


@given(case=gradient_cases(), k=st.integers(-8, 8), c=st.floats(1e-3, 1e3), data=st.data())
def test_cosine_and_cv_ignore_a_common_positive_scale(case: GradCase, k: int, c: float, data: st.DataObject) -> None:
    """Scaling every rank by 2^k changes nothing but the norms (bit for bit); any c > 0 within rounding."""
    buckets = data.draw(partitions(case.dim))
    losses = [1.0] * case.world_size
    base = hook_row(case, losses, buckets)
    exact = hook_row(GradCase(case.grads * case.dtype.type(2.0**k), case.shapes), losses, buckets)
    assert exact["cos_to_mean"] == base["cos_to_mean"] and exact["grad_norm_cv"] == base["grad_norm_cv"]
    assert exact["grad_norm"] == [n * 2.0**k for n in base["grad_norm"]]
    g64 = GradCase(case.grads.astype(np.float64), case.shapes)
    tol = cosine_tolerance(g64)
    assume(tol < 0.1)
    rounded = hook_row(GradCase(g64.grads * c, case.shapes), losses, buckets)
    np.testing.assert_allclose(rounded["cos_to_mean"], hook_row(g64, losses, buckets)["cos_to_mean"], atol=2 * tol)


@given(case=gradient_cases(), data=st.data())
def test_permuting_ranks_permutes_lists_and_keeps_aggregates(case: GradCase, data: st.DataObject) -> None:
    """Rank order is a labelling: lists follow the permutation, aggregates move only by summation-order
    rounding (bounded via the conditioning ``Σ‖g_i‖ / ‖ḡ‖`` and the loss scale)."""
    n = case.world_size
    perm = data.draw(st.permutations(range(n)))
    losses = data.draw(rank_losses(n))
    sq, dots = exact_scalars(case)
    row = metrics.step_metrics(losses, sq, dots)
    prow = metrics.step_metrics([losses[p] for p in perm], [sq[p] for p in perm], [dots[p] for p in perm])
    g = case.grads.astype(np.float64)
    cond = float(np.linalg.norm(g, axis=1).sum() / np.linalg.norm(g.mean(axis=0)))
    assume(cond < 1e8)
    eps = float(np.finfo(np.float64).eps)
    tol, loss_scale = 8 * eps * (cond + n), max(1.0, *map(abs, losses))
    for key in ("loss", "grad_norm"):
        assert prow[key] == [row[key][p] for p in perm]
    np.testing.assert_allclose(prow["cos_to_mean"], [row["cos_to_mean"][p] for p in perm], rtol=0, atol=tol)
    for key in ("cos_mean", "cos_min"):
        assert prow[key] == pytest.approx(row[key], rel=0, abs=tol)
    assert prow["mean_grad_norm"] == pytest.approx(row["mean_grad_norm"], rel=tol)
    for key in ("global_loss", "loss_std"):
        assert prow[key] == pytest.approx(row[key], rel=0, abs=8 * n * eps * loss_scale)
    for key in ("grad_norm_std", "grad_norm_cv"):
        assert prow[key] == pytest.approx(row[key], rel=1e-12, abs=8 * n * eps * max(row["grad_norm"]))
    if abs(row["global_loss"]) > 1e-6 * loss_scale:  # a CV near a zero mean is ill-conditioned by nature
        assert prow["loss_cv"] == pytest.approx(row["loss_cv"], rel=1e-9)
    gram = accumulate(case, [slice(0, case.dim)], with_gram=True)[0].gram.numpy()
    pair, ppair = metrics.pairwise_cosine(gram), metrics.pairwise_cosine(gram[np.ix_(perm, perm)])
    assert ppair == [[pair[i][j] for j in perm] for i in perm]


@given(case=identical_gradient_cases(), loss=st.floats(-1e4, 1e4, allow_subnormal=False))
def test_identical_ranks_give_zero_dispersion_and_cosine_one(case: GradCase, loss: float) -> None:
    """Spread is exactly 0. The cosine is 1 within the rounding of the float dot products (≤ 2·D·eps):
    even with ḡ == g bit for bit, ``g·g`` and ``g·ḡ`` may be summed in different orders (SIMD paths
    depend on memory alignment), so "exactly 1" would be a false promise."""
    n = case.world_size
    row = hook_row(case, [loss] * n, [slice(0, case.dim)])
    assert row["loss_std"] == 0.0 and row["grad_norm_std"] == 0.0  # exactly, not "small"
    assert row["loss_cv"] == 0.0 and row["grad_norm_cv"] == 0.0 and row["flags"] == []
    tol = 2 * case.dim * float(np.finfo(case.dtype).eps) + 1e-12
    assert all(abs(c - 1.0) <= tol for c in row["cos_to_mean"])
    pair = metrics.pairwise_cosine(accumulate(case, [slice(0, case.dim)], with_gram=True)[0].gram.numpy())
    assert all(abs(c - 1.0) <= tol for r in pair for c in r)
    terms = metrics.noise_scale_terms([row["grad_norm"][0] ** 2] * n, row["mean_grad_norm"] ** 2, 8)
    if n == 1:
        assert terms is None
    else:
        g2, tr_sigma = terms
        assert g2 == pytest.approx(row["grad_norm"][0] ** 2, rel=4 * tol)
        assert abs(tr_sigma) <= 4 * 8 * tol * row["grad_norm"][0] ** 2  # no noise without disagreement


# ---- buckets -----------------------------------------------------------------------------------


@given(case=gradient_cases(), data=st.data())
def test_any_bucket_partition_equals_the_whole_vector(case: GradCase, data: st.DataObject) -> None:
    """Bucket sums (``add_pairs``, the hook's call), per-parameter pieces (the hook's no-copy path:
    each ``param.grad`` against its view into the mean) and the one-shot ``add_local``/``add_dot``
    all land within float rounding of the exact whole-vector values."""
    buckets = data.draw(partitions(case.dim))
    parts = accumulate(case, buckets, with_gram=True)
    mean = allreduce_mean(case.grads).numpy()
    mean_params = GradCase(mean[None, :], case.shapes).params(0)
    for r in range(case.world_size):
        g = case.grads[r]
        per_param, whole = metrics.BucketAccumulator(), metrics.BucketAccumulator()
        per_param.add_pairs([torch.from_numpy(p.copy()) for p in case.params(r)],
                            [torch.from_numpy(m.copy()) for m in mean_params])
        whole.add_local(torch.from_numpy(g.copy()))
        whole.add_dot(torch.from_numpy(g.copy()), torch.from_numpy(mean))
        exact_sq = math.fsum(float(x) * float(x) for x in g)
        exact_dot = math.fsum(float(x) * float(y) for x, y in zip(g, mean))
        for acc in (parts[r], per_param, whole):
            assert abs(acc.sq_norm.item() - exact_sq) <= dot_tolerance(g, g)
            assert abs(acc.dot_with_mean.item() - exact_dot) <= dot_tolerance(g, mean)
    exact_gram = case.grads.astype(np.float64) @ case.grads.astype(np.float64).T
    bound = np.array([[dot_tolerance(a, b) for b in case.grads] for a in case.grads])
    assert (np.abs(parts[0].gram.numpy() - exact_gram) <= bound + 1e-300).all()


# ---- degenerate cases (module docstring of testbed.metrics.step) -----------------------------------


@given(case=gradient_cases(world_size=world_sizes(2, 16)), data=st.data())
def test_zero_gradient_rank_has_no_cosine_and_is_flagged(case: GradCase, data: st.DataObject) -> None:
    zero = data.draw(st.sets(st.integers(0, case.world_size - 1), min_size=1))
    grads = case.grads.copy()
    grads[sorted(zero)] = 0
    zcase = GradCase(grads, case.shapes)
    row = hook_row(zcase, [1.0] * case.world_size, [slice(0, case.dim)])
    assert_no_silent_numbers(row)
    for r in zero:
        assert row["grad_norm"][r] == 0.0 and row["cos_to_mean"][r] is None
    if len(zero) == case.world_size or not allreduce_mean(grads).any():
        assert (None, "zero_mean_grad") in flag_set(row)
        assert row["cos_to_mean"] == [None] * case.world_size and row["cos_mean"] is None
        return
    assert {(r, "zero_grad") for r in zero} <= flag_set(row)
    defined = [c for r, c in enumerate(row["cos_to_mean"]) if r not in zero]
    assert None not in defined
    assert row["cos_mean"] == pytest.approx(float(np.mean(defined))) and row["cos_min"] == min(defined)
    pair = metrics.pairwise_cosine(accumulate(zcase, [slice(0, case.dim)], with_gram=True)[0].gram.numpy())
    assert all(pair[r][j] is None and pair[j][r] is None for r in zero for j in range(case.world_size))


@given(case=gradient_cases(world_size=st.just(1)), loss=st.floats(-1e4, 1e4))
def test_world_size_one_is_defined(case: GradCase, loss: float) -> None:
    """One rank: no spread (std 0, CV 0), the mean gradient is the local one (cosine 1)."""
    row = hook_row(case, [loss], [slice(0, case.dim)])
    assert row["loss_std"] == 0.0 and row["loss_cv"] == 0.0 and row["grad_norm_std"] == 0.0
    assert row["cos_to_mean"][0] == pytest.approx(1.0, abs=1e-12) and row["flags"] == []
    assert metrics.noise_scale_terms([row["grad_norm"][0] ** 2], row["mean_grad_norm"] ** 2, 4) is None
    assert metrics.mean_offdiagonal([[1.0]]) is None


@given(case=gradient_cases(world_size=world_sizes(1, 16)), bad=nonfinite(), data=st.data())
def test_nonfinite_loss_is_flagged_never_a_number(case: GradCase, bad: float, data: st.DataObject) -> None:
    n = case.world_size
    ranks = data.draw(st.sets(st.integers(0, n - 1), min_size=1))
    losses = [bad if r in ranks else 1.0 + r for r in range(n)]
    row = hook_row(case, losses, [slice(0, case.dim)])
    assert_no_silent_numbers(row)
    assert {(r, "nonfinite_loss") for r in ranks} <= flag_set(row)
    assert row["global_loss"] is None and row["loss_std"] is None and row["loss_cv"] is None
    assert [row["loss"][r] for r in ranks] == [None] * len(ranks)
    clean = hook_row(case, [1.0] * n, [slice(0, case.dim)])
    for key in ("grad_norm", "cos_to_mean", "grad_norm_std", "cos_mean"):  # the gradient side is untouched
        assert row[key] == clean[key]


@given(case=gradient_cases(), bad=nonfinite(), data=st.data())
def test_nonfinite_gradient_is_flagged_never_a_number(case: GradCase, bad: float, data: st.DataObject) -> None:
    r, k = data.draw(st.integers(0, case.world_size - 1)), data.draw(st.integers(0, case.dim - 1))
    grads = case.grads.copy()
    grads[r, k] = bad
    row = hook_row(GradCase(grads, case.shapes), [1.0] * case.world_size, data.draw(partitions(case.dim)))
    assert_no_silent_numbers(row)
    assert (r, "nonfinite_grad") in flag_set(row)
    assert row["grad_norm"][r] is None and row["cos_to_mean"] == [None] * case.world_size
    assert row["grad_norm_std"] is None and row["grad_norm_cv"] is None and row["cos_mean"] is None
    assert row["global_loss"] == pytest.approx(1.0)  # the loss side is still fine


@given(case=gradient_cases(dtype=st.just(np.float32)))
def test_float32_overflow_of_squares_is_flagged_not_silent(case: GradCase) -> None:
    """Entries near 2^100 are finite in float32 but their squares are not: flagged, never wrong."""
    huge = GradCase(case.grads / np.float32(2.0**20) * np.float32(2.0**100), case.shapes)
    assume(np.isfinite(huge.grads).all() and np.abs(huge.grads).max() >= 2.0**64)
    row = hook_row(huge, [1.0] * huge.world_size, [slice(0, huge.dim)])
    assert_no_silent_numbers(row)
    if not any(kind == "nonfinite_grad" for _, kind in flag_set(row)):  # the squares happened to fit
        np.testing.assert_allclose(row["grad_norm"], metrics.brute_force(huge.grads.astype(np.float64))["grad_norm"],
                                   rtol=2 * huge.dim * float(np.finfo(np.float32).eps))


@given(case=gradient_cases(world_size=st.just(1)), data=st.data())
def test_cancelling_ranks_and_zero_mean_loss_are_flagged(case: GradCase, data: st.DataObject) -> None:
    g = case.grads[0]
    loss = data.draw(st.floats(1e-3, 1e3))
    row = hook_row(GradCase(np.stack([g, -g]), case.shapes), [loss, -loss], [slice(0, case.dim)])
    assert {(None, "zero_mean_grad"), (None, "zero_mean_loss")} <= flag_set(row)
    assert row["cos_to_mean"] == [None, None] and row["loss_cv"] is None and row["loss_std"] == loss
    assert metrics.step_metrics([0.0, 0.0], [1.0, 1.0], [1.0, 1.0])["loss_cv"] == 0.0  # no spread → CV 0


# ---- pairwise cosine and the noise scale ------------------------------------------------------


@given(case=gradient_cases(), data=st.data())
def test_pairwise_cosine_matches_brute_force_and_the_gram_identity(case: GradCase, data: st.DataObject) -> None:
    tol = cosine_tolerance(case)
    assume(tol < 0.1)
    buckets = data.draw(partitions(case.dim))
    gram = accumulate(case, buckets, with_gram=True)[0].gram.numpy()
    pair = metrics.pairwise_cosine(gram)
    oracle = metrics.brute_force(case.grads.astype(np.float64))["pairwise_cos"]
    np.testing.assert_allclose(np.array(pair, dtype=np.float64), oracle, atol=tol)
    assert all(pair[i][j] == pair[j][i] for i in range(case.world_size) for j in range(case.world_size))
    n = case.world_size
    off = [oracle[i][j] for i in range(n) for j in range(n) if i != j]
    assert metrics.mean_offdiagonal(pair) == (pytest.approx(float(np.mean(off)), abs=tol) if off else None)
    # METRICS.md: Σ_ij g_i·g_j = N²‖ḡ‖² ties the Gram path to the per-rank dot path.
    row = hook_row(case, [0.0] * n, buckets)
    scale = float(np.linalg.norm(case.grads.astype(np.float64), axis=1).sum()) ** 2
    assert abs(gram.sum() - n * n * row["mean_grad_norm"] ** 2) <= tol * scale


@given(case=gradient_cases(world_size=world_sizes(2, 16)), b=st.integers(1, 512))
def test_noise_variance_estimate_is_nonnegative(case: GradCase, b: int) -> None:
    """mean_i ‖g_i‖² ≥ ‖ḡ‖² (Jensen), so tr(Σ) ≥ 0 whatever the gradients; and |G|² ≤ mean_i ‖g_i‖²."""
    sq, dots = exact_scalars(case)
    mean_sq = float(np.mean(dots))
    g2, tr_sigma = metrics.noise_scale_terms(sq, mean_sq, b)
    slack = 1e-12 * max(sq) * case.world_size * b
    assert tr_sigma >= -slack and g2 <= max(sq) + slack
    assert metrics.noise_scale_terms(sq[:-1] + [math.nan], mean_sq, b) is None


def test_noise_scale_terms_are_unbiased() -> None:
    """Per-sample gradients ~ N(G, σ²I): E[|G|² estimate] = |G|², E[tr(Σ) estimate] = Dσ² (McCandlish A.1)."""
    rng = np.random.default_rng(0)
    n, b, d, sigma, trials = 4, 8, 16, 0.5, 4000
    true_g = rng.normal(size=d) * 0.2
    samples = true_g + sigma * rng.normal(size=(trials, n, b, d))
    g = samples.mean(axis=2)  # [trials, N, D]: each rank's batch-mean gradient
    sq = (g**2).sum(axis=2)
    mean_sq = (g.mean(axis=1) ** 2).sum(axis=1)
    terms = np.array([metrics.noise_scale_terms(sq[t], mean_sq[t], b) for t in range(trials)])
    for est, truth in ((terms[:, 0], float(true_g @ true_g)), (terms[:, 1], d * sigma**2)):
        stderr = est.std() / math.sqrt(trials)
        assert abs(est.mean() - truth) < 5 * stderr, (est.mean(), truth, stderr)


@given(terms=st.lists(st.none() | st.tuples(st.floats(1e-3, 1e3), st.floats(0, 1e3)), max_size=12),
       decay=st.floats(0, 0.99))
def test_noise_scale_ema_averages_numerator_and_denominator_separately(terms, decay: float) -> None:
    ema = metrics.NoiseScaleEMA(decay)
    g2 = tr = None
    for t in terms:
        value = ema.update(t)
        if t is not None:
            g2 = t[0] if g2 is None else decay * g2 + (1 - decay) * t[0]
            tr = t[1] if tr is None else decay * tr + (1 - decay) * t[1]
        assert value == (None if g2 is None else pytest.approx(tr / g2, rel=1e-9))

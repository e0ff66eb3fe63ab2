"""Group structure: do the ranks split into two groups that agree within and differ between?

Some faults are not one rank but a *subset*: ranks 0–1 and 2–3 with different dropout seeds, two
data pipelines, two node types. Naming one rank would then be arbitrary; the verdict reports the
split — and only when a test says the split is real.

Similarity between ranks i and j, from the rows:

- with ``pairwise_cos`` (the exact N×N gradient-cosine matrix, every k steps): the mean over steps
  of the matrix with its off-diagonal entries standardized per step (minus their mean, over their
  std), so that steps weigh equally whatever the cosine level of the phase of training;
- otherwise: the Pearson correlation, over steps (and metrics), of the ranks' standardized
  deviations from the step's median (``exchangeability.standardize``: loss, grad norm, cosine to
  the mean) — ranks that see the same data or the same dropout masks move together. Centred over
  time, so a rank's constant offset does not enter: offsets are the step-down test's business,
  and a group of ranks it names with the same offset is reported as a split by the verdict.

Statistic: the best split of the ranks into two groups of at least 2 (so that a single outlier
rank, the step-down test's case, does not pass for a group) by the contrast
``mean similarity within groups − mean similarity between groups``. The search follows the leading
eigenvector of the double-centred similarity matrix (the spectral ordering that separates two
blocks) and tries every cut of that ordering; a single outlier gives contrast ≈ 0 for every split
of this kind (its negative similarities fall equally within and between).

p-value: the same computation on random relabelings of the ranks (under the null the step's
vector of deviations, and its cosine matrix with rows and columns permuted together, are
exchangeable), Besag–Clifford Monte Carlo as in ``exchangeability``. Every metric at a step is
relabeled with the same permutation, so correlations between metrics at a step are kept. For
speed, runs of consecutive steps share one relabeling (at most ``BLOCKS`` runs): relabelings that
are constant on blocks form a subgroup of the per-step ones, so the test stays exact; it loses a
little power against the per-step version, not validity. (The statistic needs only the per-step
N×N matrices summed over a block, so a draw costs ``BLOCKS · N²``, not ``T · N · K``.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from testbed.diagnose.exchangeability import monte_carlo_p, onset

MIN_RANKS = 4  # two groups of at least two
MIN_STEPS = 3
CHUNK_ELEMENTS = 2_000_000  # relabeled copies are made this many numbers at a time (memory bound)
BLOCKS = 64  # steps are relabeled in at most this many runs of consecutive steps (module doc)


@dataclass(frozen=True)
class GroupResult:
    """The best split, its contrast and permutation p-value; ``within`` / ``between``: the mean
    similarity (``unit``) inside the groups and across them, for the text."""

    groups: list[list[int]]
    contrast: float
    p_value: float
    draws: int
    source: str  # "pairwise_cos" | "deviations"
    within: float
    between: float
    unit: str
    since_step: int | None  # where the split's per-step contrast starts (``exchangeability.onset``)


def deviation_features(tables: Sequence[tuple[Sequence[int], np.ndarray]]) -> np.ndarray:
    """``[T, N, K]``: per step, each metric's standardized deviations (K metrics), aligned on the
    union of steps; 0 where a metric was not measured at a step."""
    tables = [(list(steps), u) for steps, u in tables if len(steps)]
    if not tables:
        return np.zeros((0, 0, 0))
    all_steps = sorted({s for steps, _ in tables for s in steps})
    where = {s: t for t, s in enumerate(all_steps)}
    n = tables[0][1].shape[1]
    out = np.zeros((len(all_steps), n, len(tables)))
    for k, (steps, u) in enumerate(tables):
        out[[where[s] for s in steps], :, k] = u
    return out


def pairwise_features(rows: Sequence[dict[str, Any]], n: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(standardized, raw) ``[T, N, N]`` cosine matrices of the steps that carry a complete finite
    ``pairwise_cos``, and those steps; diagonals 0. A step whose off-diagonal entries are all equal
    is left out."""
    std, raw, steps = [], [], []
    off = ~np.eye(n, dtype=bool)
    for row in rows:
        matrix = row.get("pairwise_cos")
        if not isinstance(matrix, list) or len(matrix) != n:
            continue
        try:
            m = np.array([[np.nan if v is None else float(v) for v in line] for line in matrix])
        except (TypeError, ValueError):
            continue
        if m.shape != (n, n) or not np.isfinite(m[off]).all():
            continue
        values = m[off]
        spread = values.std()
        if spread <= 0:
            continue
        z = np.where(off, (m - values.mean()) / spread, 0.0)
        std.append((z + z.T) / 2)
        raw.append(np.where(off, m, 0.0))
        steps.append(row["step"])
    if not std:
        return np.zeros((0, n, n)), np.zeros((0, n, n)), []
    return np.asarray(std), np.asarray(raw), steps


def normalize(gram: np.ndarray) -> np.ndarray:
    """``[..., N, N]`` Gram matrix → correlation (uncentred: deviations are already centred per
    step); 0 for a rank with no variation."""
    d = np.sqrt(np.clip(np.diagonal(gram, axis1=-2, axis2=-1), 0, None))
    outer = d[..., :, None] * d[..., None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(outer > 0, gram / outer, 0.0)


def best_split(similarity: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For ``[..., N, N]`` similarity matrices: (best contrast [...], spectral order [..., N],
    cut [...]) — group A is ``order[:cut]``. Module doc."""
    n = similarity.shape[-1]
    off = similarity * (1 - np.eye(n))
    centred = (off - off.mean(axis=-1, keepdims=True) - off.mean(axis=-2, keepdims=True)
               + off.mean(axis=(-2, -1), keepdims=True))
    _, vectors = np.linalg.eigh((centred + np.swapaxes(centred, -1, -2)) / 2)
    order = np.argsort(vectors[..., -1], axis=-1, kind="stable")
    rows = np.take_along_axis(off, order[..., :, None], axis=-2)
    s = np.take_along_axis(rows, order[..., None, :], axis=-1)
    c = np.cumsum(np.cumsum(s, axis=-1), axis=-2)
    cuts = np.arange(2, n - 1)  # both groups ≥ 2
    total = c[..., n - 1, n - 1]
    s_aa = c[..., cuts - 1, cuts - 1]
    s_ab = c[..., cuts - 1, n - 1] - s_aa
    s_bb = total[..., None] - s_aa - 2 * s_ab
    n_within = cuts * (cuts - 1) + (n - cuts) * (n - cuts - 1)
    contrast = (s_aa + s_bb) / n_within - s_ab / (cuts * (n - cuts))
    best = np.argmax(contrast, axis=-1)
    return np.take_along_axis(contrast, best[..., None], axis=-1)[..., 0], order, cuts[best]


def blocks(per_step: np.ndarray, count: int = BLOCKS) -> np.ndarray:
    """Sums of ``per_step [T, ...]`` over at most ``count`` runs of consecutive steps."""
    parts = np.array_split(np.arange(per_step.shape[0]), min(count, per_step.shape[0]))
    return np.stack([per_step[p].sum(axis=0) for p in parts])


def relabeled_square(matrices: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """``[k, N, N]``: ``Σ_b P_b A_b P_bᵀ`` for blocks ``A_b [B, N, N]`` and permutations ``perm [k, B, N]``."""
    k, count, n = perm.shape
    index = (np.arange(count)[None, :, None, None] * n * n + perm[:, :, :, None] * n + perm[:, :, None, :])
    return np.take(matrices.reshape(-1), index).sum(axis=1)


def relabeled_vectors(vectors: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """``[k, N, K]``: ``Σ_b P_b v_b`` for blocks ``v_b [B, N, K]``."""
    return np.take_along_axis(vectors[None], perm[..., None], axis=2).sum(axis=1)


def group_test(*, deviations: tuple[np.ndarray, list[int]] | None = None,
               pairwise: tuple[np.ndarray, np.ndarray, list[int]] | None = None,
               rng: np.random.Generator, max_draws: int) -> GroupResult | None:
    """The split test on pairwise cosines when given (≥ ``MIN_STEPS`` matrices), else on the
    deviation features ``([T, N, K], steps)``; None when there are fewer than ``MIN_RANKS`` ranks
    or ``MIN_STEPS`` steps."""
    if pairwise is not None and pairwise[0].shape[0] >= MIN_STEPS:
        per_step, raw, steps, source = pairwise[0], pairwise[1], pairwise[2], "pairwise_cos"
        unit = "mean pairwise gradient cosine"
        vectors = None
    elif deviations is not None and deviations[0].shape[0] >= MIN_STEPS:
        features, steps = deviations
        per_step, raw, source = np.einsum("tik,tjk->tij", features, features), None, "deviations"
        unit = "correlation of standardized deviations"
        vectors = blocks(features)
    else:
        return None
    t_count, n = per_step.shape[:2]
    if n < MIN_RANKS:
        return None

    def similar(gram: np.ndarray, sums: np.ndarray | None) -> np.ndarray:
        if sums is None:
            return gram  # summed standardized cosines
        return normalize(gram - np.einsum("...ik,...jk->...ij", sums, sums) / t_count)  # Pearson, over steps

    similarity = similar(per_step.sum(axis=0), None if vectors is None else vectors.sum(axis=0))
    contrast, order, cut = best_split(similarity)
    observed = float(contrast)
    threshold = observed - 1e-9 * max(1.0, abs(observed))
    data = blocks(per_step)
    chunk = max(1, CHUNK_ELEMENTS // data.size)

    def draw(k: int) -> np.ndarray:
        out = []
        for i in range(0, k, chunk):
            perm = np.argsort(rng.random((min(chunk, k - i), data.shape[0], n)), axis=2)
            sums = None if vectors is None else relabeled_vectors(vectors, perm)
            out.append(best_split(similar(relabeled_square(data, perm), sums))[0])
        return np.concatenate(out)
    p, draws = monte_carlo_p(draw, threshold, max_draws)
    a, b = sorted(order[:cut].tolist()), sorted(order[cut:].tolist())
    groups = sorted([a, b], key=lambda g: g[0])
    within, between = _within_between(raw.mean(axis=0) if raw is not None else similarity, groups)
    contrast_series = np.array([np.subtract(*_within_between(m, groups)) for m in per_step])
    since = steps[onset(contrast_series)] if len(steps) == len(contrast_series) else None
    return GroupResult(groups, observed, p, draws, source, within, between, unit, since)


def _within_between(matrix: np.ndarray, groups: list[list[int]]) -> tuple[float, float]:
    label = np.empty(matrix.shape[0], dtype=int)
    for g, members in enumerate(groups):
        label[members] = g
    same = label[:, None] == label[None, :]
    off = ~np.eye(matrix.shape[0], dtype=bool)
    return float(matrix[same & off].mean()), float(matrix[~same].mean())

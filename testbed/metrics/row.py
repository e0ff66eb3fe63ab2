"""One step's row from every rank's gathered scalars: the pure half of the step's one all-gather.

``engine/gather.py`` all-gathers each rank's named scalars (and its share of the Gram matrix);
``build_row`` derives the row every rank then holds: the per-rank metrics (``metrics.step``), the
noise scale, the pairwise matrix, the learning rates and the state check. A new per-rank field is
one more entry in the gathered table and one more line here.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from testbed.metrics.state import NO_CHECKSUM, buffer_fields, state_fields
from testbed.metrics.step import (NoiseScaleEMA, gram_scalars, mean_offdiagonal, noise_scale_terms,
                                  pairwise_cosine, step_metrics)
from testbed.schema import row as R
from testbed.schema.row import Row

# The names of the per-rank scalars in the step's all-gather (engine/step_path.py fills them).
LOCAL_LOSS, SQ_NORM, DOT_WITH_MEAN, LOCAL_LR, CHECKSUM = "loss", "sq_norm", "dot_with_mean", "lr", "checksum"
BUFFERS, SIZES, LEDGER = "buffer_checksum", "state_tensors", "ledger"  # buffer checksum, tensor counts, data ledger


def build_row(step: int, fields: Mapping[str, Sequence[float] | np.ndarray], gram: np.ndarray | None, *,
              measure: bool, pairwise: bool, batch_size: int | None, noise: NoiseScaleEMA,
              sharded: bool = False) -> Row:
    """The row of ``step`` from ``fields`` (name → one value per rank) and the summed Gram shares.

    ``measure``: add the per-rank metrics (needs LOCAL_LOSS, SQ_NORM, DOT_WITH_MEAN; buckets of the
    all-to-all path contribute through ``gram``). ``pairwise``: add the cosine matrix (every bucket
    took the all-to-all path, so ``gram`` is the whole G). ``batch_size`` (samples per rank per
    optimizer step) enables the noise scale. LOCAL_LR, CHECKSUM and BUFFERS (when every rank has one)
    are used when present."""
    row: Row = {R.STEP: step}  # type: ignore[misc]
    if measure:
        sq_norms = np.asarray(fields[SQ_NORM], dtype=np.float64)
        dots = np.asarray(fields[DOT_WITH_MEAN], dtype=np.float64)
        if gram is not None:  # buckets of the all-to-all path: their part of ‖g_i‖² and g_i·ḡ from G
            gram_sq, gram_dots = gram_scalars(gram)
            sq_norms, dots = sq_norms + gram_sq, dots + gram_dots
        row.update(step_metrics(fields[LOCAL_LOSS], sq_norms, dots))
        _add_noise_scale(row, sq_norms, batch_size, noise)
    if pairwise and gram is not None:
        matrix = pairwise_cosine(gram)
        row[R.PAIRWISE_COS] = matrix  # type: ignore[literal-required]
        row[R.PAIRWISE_COS_MEAN] = mean_offdiagonal(matrix)  # type: ignore[literal-required]
    if LOCAL_LR in fields:
        row.update(lr_fields(fields[LOCAL_LR]))
    if CHECKSUM in fields:
        row.update(state_fields(fields[CHECKSUM], sharded=sharded))
    if BUFFERS in fields and NO_CHECKSUM not in [int(x) for x in fields[BUFFERS]]:
        row.update(buffer_fields(fields[BUFFERS]))
    return row


def _add_noise_scale(row: Row, sq_norms: np.ndarray, batch_size: int | None, noise: NoiseScaleEMA) -> None:
    if not batch_size:
        row[R.NOISE_SCALE] = None  # type: ignore[literal-required]
        return
    mean_norm = row.get(R.MEAN_GRAD_NORM)
    terms = noise_scale_terms(sq_norms, mean_norm**2, batch_size) if mean_norm is not None else None
    value = noise.update(terms)
    row[R.NOISE_SCALE] = value  # type: ignore[literal-required]
    if value is None:  # EMA |G|² <= 0, or no estimate yet (docs/metrics.md)
        row[R.FLAGS].append({R.FLAG_RANK: None, R.FLAG_KIND: R.NOISE_SCALE_UNDEFINED})  # type: ignore[literal-required,misc]


def lr_fields(lrs: Sequence[float] | np.ndarray) -> Row:
    """``lr``: the learning rate every rank stepped with; when they differ, ``lr`` is None and
    ``lr_by_rank`` lists them (NaN = a rank that reported none). Nothing when no rank reported one."""
    values = [float(x) for x in lrs]
    known = [v for v in values if not math.isnan(v)]
    if not known:
        return {}  # type: ignore[typeddict-item]
    if len(known) == len(values) and len(set(known)) == 1:
        return {R.LR: known[0]}  # type: ignore[misc]
    return {R.LR: None, R.LR_BY_RANK: [None if math.isnan(v) else v for v in values]}  # type: ignore[misc]

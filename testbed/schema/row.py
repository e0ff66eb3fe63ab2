"""One metrics row (a line of ``metrics.jsonl``; what ``monitor.step`` returns): its keys and types.

The contract is ``shared/METRICS.md`` and ``docs/metrics.md``. Writers build rows with these
constants, readers read them with these constants; ``Row`` documents the types. Every field but
``step`` is optional: an unmeasured step that only checked the weights holds ``step`` and the
weight fields, and any metric can be ``None`` (JSON null) in a degenerate case (see ``flags``).
"""
from __future__ import annotations

from typing import Any, TypedDict

STEP = "step"
LOSS = "loss"
GLOBAL_LOSS = "global_loss"
LOSS_STD = "loss_std"
LOSS_CV = "loss_cv"
GRAD_NORM = "grad_norm"
GRAD_NORM_STD = "grad_norm_std"
GRAD_NORM_CV = "grad_norm_cv"
MEAN_GRAD_NORM = "mean_grad_norm"
COS_TO_MEAN = "cos_to_mean"
COS_MEAN = "cos_mean"
COS_MIN = "cos_min"
FLAGS = "flags"
NOISE_SCALE = "noise_scale"
PAIRWISE_COS = "pairwise_cos"
PAIRWISE_COS_MEAN = "pairwise_cos_mean"
WEIGHT_CHECKSUM = "weight_checksum"
WEIGHTS_IN_SYNC = "weights_in_sync"
LR = "lr"  # the step's learning rate when every rank used the same one, else None (see LR_BY_RANK)
LR_BY_RANK = "lr_by_rank"  # every rank's learning rate, present only on steps where they differ
FINAL_CHECK = "final_check"  # true on the state-check-only row ``close()`` adds after the last step
SELF_CHECK = "self_check"
GLOBAL_STEP = "global_step"  # a framework's own step counter (HF Trainer, Lightning), when it has one

# The state check beyond the trainable parameters (metrics/state.py; docs/metrics.md, "State check")
BUFFER_CHECKSUM = "buffer_checksum"  # every rank's buffer checksum, taken where DDP has just synced them
BUFFERS_IN_SYNC = "buffers_in_sync"
STATE_DIFFERS = "state_differs"  # [{"kind": "parameter" | "buffer", "tensor", "frozen", "ranks", "differing"}]
# The data ledger (metrics/ledger.py): what each rank's model consumed since the last exchange
DATA_SAMPLES = "data_samples"  # samples per rank (0: no training forward)
DATA_DIGEST = "data_digest"  # per rank, an order-sensitive digest of those samples (None: no samples)
DATA_READS = "data_reads"  # per rank, sampled (ledgered) distinct samples, while the first pass lasts
DATA_REREADS = "data_rereads"  # per rank, of those, samples read before (any rank) in the first pass
DATA_SELF = "data_self"  # per rank, of the re-reads, samples the rank itself had read before
DATA_PAIRS = "data_pairs"  # [[r, s, count]]: r read count samples that rank s had read (r != s)
DATA_LEVEL = "data_level"  # the ledger's sampling level: it keeps fingerprints with level low bits zero
DATA_BOUNDARY = "data_boundary"  # true when this step's reads look like an epoch's boundary (metrics/ledger.py)
DATA_PASS_END = "data_pass_end"  # true at the step the first pass over the data ended (re-reads dominate)
DATA_TRUNCATED = "data_truncated"  # true when a rank's sampled samples exceeded the payload (some dropped)
DATA_COVERAGE = "data_coverage"  # runner only: {"epoch", "size", "read", "expected"} at a sampler epoch's end
# Per-rank settings that differ (first row only; metrics/config.py): [{"key", "values": [per rank]}]
CONFIG_DIFFERS = "config_differs"

# A flag: {"rank": r | None, "kind": one of FLAG_KINDS}
FLAG_RANK = "rank"
FLAG_KIND = "kind"
NONFINITE_LOSS = "nonfinite_loss"
NONFINITE_GRAD = "nonfinite_grad"
ZERO_GRAD = "zero_grad"
ZERO_MEAN_GRAD = "zero_mean_grad"
ZERO_MEAN_LOSS = "zero_mean_loss"
ZERO_MEAN_GRAD_NORM = "zero_mean_grad_norm"
NOISE_SCALE_UNDEFINED = "noise_scale_undefined"
FLAG_KINDS = (NONFINITE_LOSS, NONFINITE_GRAD, ZERO_GRAD, ZERO_MEAN_GRAD, ZERO_MEAN_LOSS, ZERO_MEAN_GRAD_NORM,
              NOISE_SCALE_UNDEFINED)


#: a row's per-rank lists (one entry per rank)
PER_RANK = (LOSS, GRAD_NORM, COS_TO_MEAN)


class Flag(TypedDict):
    rank: int | None
    kind: str


class Row(TypedDict, total=False):
    """The types behind the keys above (``total=False``: only ``step`` is always present)."""

    step: int
    loss: list[float | None]
    global_loss: float | None
    loss_std: float | None
    loss_cv: float | None
    grad_norm: list[float | None]
    grad_norm_std: float | None
    grad_norm_cv: float | None
    mean_grad_norm: float | None
    cos_to_mean: list[float | None]
    cos_mean: float | None
    cos_min: float | None
    flags: list[Flag]
    noise_scale: float | None
    pairwise_cos: list[list[float | None]]
    pairwise_cos_mean: float | None
    weight_checksum: list[int]
    weights_in_sync: bool
    lr: float | None
    lr_by_rank: list[float | None]
    final_check: bool
    self_check: dict[str, Any]
    global_step: int
    buffer_checksum: list[int]
    buffers_in_sync: bool
    state_differs: list[dict[str, Any]]
    data_samples: list[int]
    data_digest: list[int | None]
    data_reads: list[int]
    data_rereads: list[int]
    data_self: list[int]
    data_pairs: list[list[int]]
    data_level: int
    data_boundary: bool
    data_pass_end: bool
    data_truncated: bool
    data_coverage: dict[str, int]
    config_differs: list[dict[str, Any]]

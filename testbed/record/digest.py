"""One streaming pass over a run's ``metrics.jsonl`` that keeps what the summary, the figures and the
verdict need, in memory bounded whatever the record's length.

``testbed report`` on a 10⁶-line metrics.jsonl (584 MB) did not finish in 560 s and took 4 GB: it
held every row as a dict, several times over. A ``RunDigest`` keeps:

- exact statistics of every summary metric (final, peak, mean: running sums), the weight checks
  (count, first failure), the flags (count, the first ``FLAGS_KEPT``) and the last pairwise matrix;
- the rows to draw (``plot_rows``): every measured row when there are at most ``PLOT_POINTS``;
  otherwise consecutive measured rows are merged in buckets of ``stride = ceil(lines /
  PLOT_POINTS)``: a bucket's row is at its first step and holds the mean of each metric (and of each
  rank's values) over the bucket's finite values - a one-step spike is averaged into its bucket
  (the summary's peak and the detector lines in the figures stay exact);
- the verdict's bounded sample (``record/sample.py``).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from testbed.record.sample import RowSample, verdict_rows
from testbed.schema import row as R
from testbed.schema.records import ROW_LISTS, ROW_NUMBERS

PLOT_POINTS = 2000
FLAGS_KEPT = 50


class _Bucket:
    """Sums and counts of the finite values of consecutive measured rows."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.rows = 0
        self.sums: dict[str, list[float]] = {}
        self.counts: dict[str, list[int]] = {}

    def add(self, row: Mapping[str, Any]) -> None:
        if self.step is None:
            self.step = row[R.STEP]
        self.rows += 1
        for key in ROW_NUMBERS:
            self._add(key, [row.get(key)])
        for key in ROW_LISTS:
            if isinstance(row.get(key), list):
                self._add(key, row[key])

    def _add(self, key: str, values: list[Any]) -> None:
        sums = self.sums.setdefault(key, [0.0] * len(values))
        counts = self.counts.setdefault(key, [0] * len(values))
        if len(sums) < len(values):  # a row with more ranks than the first (should not happen; keep going)
            sums.extend([0.0] * (len(values) - len(sums)))
            counts.extend([0] * (len(values) - len(counts)))
        for i, v in enumerate(values):
            if v is not None:
                sums[i] += v
                counts[i] += 1

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {R.STEP: self.step, "bucket_rows": self.rows}
        for key, sums in self.sums.items():
            means = [s / c if c else None for s, c in zip(sums, self.counts[key])]
            if key in ROW_LISTS:
                out[key] = means
            elif means[0] is not None:
                out[key] = means[0]
        return out


class RunDigest:
    """Feed every valid row with ``add(row)`` (``record.files.iter_metrics``), then ``finish()``."""

    def __init__(self, total_lines: int, metrics: Mapping[str, str], plot_points: int | None = None,
                 world_size: int | None = None):
        self.metrics = dict(metrics)  # metric -> "max" | "min": which way is worse (its peak)
        self.stride = max(1, math.ceil(total_lines / (plot_points or PLOT_POINTS)))
        self.sample = RowSample(total_lines, verdict_rows(world_size))
        self.stats: dict[str, list[Any]] = {}  # metric -> [count, sum, peak, last recorded value]
        self.steps_recorded = 0
        self.weight_checks = 0
        self.first_divergence: dict[str, Any] | None = None
        self.flags: list[dict[str, Any]] = []
        self.flag_count = 0
        self.last_pairwise: tuple[int, list[list[float | None]]] | None = None
        self.plot_rows: list[dict[str, Any]] = []
        self._bucket = _Bucket()
        self._index = 0

    def add(self, row: dict[str, Any]) -> None:
        self.sample.add(self._index, row)
        self._index += 1
        for key, worse in self.metrics.items():
            if key in row:
                self._stat(key, row[key], worse)
        if R.WEIGHTS_IN_SYNC in row:
            self.weight_checks += 1
            if row[R.WEIGHTS_IN_SYNC] is False and self.first_divergence is None:
                self.first_divergence = {R.STEP: row[R.STEP], R.WEIGHT_CHECKSUM: row.get(R.WEIGHT_CHECKSUM, [])}
        for flag in row.get(R.FLAGS, ()):
            self.flag_count += 1
            if len(self.flags) < FLAGS_KEPT:
                self.flags.append(dict(flag, step=row[R.STEP]))
        if row.get(R.PAIRWISE_COS):
            self.last_pairwise = (row[R.STEP], row[R.PAIRWISE_COS])
        if isinstance(row.get(R.LOSS), list):
            self.steps_recorded += 1
            self._plot(row)

    def _stat(self, key: str, value: Any, worse: str) -> None:
        stat = self.stats.setdefault(key, [0, 0.0, None, None])
        stat[3] = value
        if value is None:
            return
        stat[0] += 1
        stat[1] += value
        if stat[2] is None or (value > stat[2] if worse == "max" else value < stat[2]):
            stat[2] = value

    def _plot(self, row: dict[str, Any]) -> None:
        if self.stride == 1:
            self.plot_rows.append(row)
            return
        self._bucket.add(row)
        if self._bucket.rows >= self.stride:
            self.plot_rows.append(self._bucket.row())
            self._bucket = _Bucket()

    def finish(self) -> "RunDigest":
        if self._bucket.rows:
            self.plot_rows.append(self._bucket.row())
            self._bucket = _Bucket()
        return self

    def exact_summary(self) -> dict[str, Any]:
        """The summary entries computed over every row: ``{metric: {final, peak, mean}}``,
        ``steps_recorded``, the flags (the first ``FLAGS_KEPT``) and their count."""
        out: dict[str, Any] = {"steps_recorded": self.steps_recorded}
        for key, (count, total, peak, last) in self.stats.items():
            if count:
                out[key] = {"final": float(last) if last is not None else float("nan"), "peak": float(peak),
                            "mean": total / count}
        out["flags"], out["flag_count"] = self.flags, self.flag_count
        return out

    def describe(self) -> dict[str, Any]:
        """How the figures and the verdict saw the record (shown in the report)."""
        return {"rows": self.sample.seen, "plot_points": len(self.plot_rows), "plot_stride": self.stride,
                "verdict_input": self.sample.describe()}

"""The bounded set of rows the verdict is computed from, for records of any length.

``diagnose`` takes the rows of a run as a list; a 1B-model run of a few days at ``every = 1`` has
10⁵–10⁶ of them (584 MB of JSON for 10⁶ rows of 8 ranks: 4 GB as Python dicts). So the
launcher's ``finish_record`` and ``testbed report`` stream ``metrics.jsonl`` once and hand
``verdict_record(rows, world_size=...)`` at most ``VERDICT_ROWS`` rows:

- a record of at most ``limit = verdict_rows(world_size)`` lines: every row (the verdict is exact,
  as before);
- a longer one: every k-th line, ``k = ceil(lines / limit)`` (a systematic sample over the whole
  run: the persistent-difference tests still see every phase of it, with fewer steps), plus every
  row that carries a flag or a failed weight check (up to ``NOTABLE_ROWS``: NaN and divergence
  evidence is exact, never sampled away), in step order.

The limit is a budget of rows × ranks, because that is what the verdict's memory and time grow
with: measured with ``diagnose.verdict.verdict_record`` on generated 8-rank rows
(``benchmarks/report_scale.py``'s rows; 2 cores, under load): 2000 rows 3.5 s / 187 MB peak,
5000 rows 7.6 s / 406 MB, 15000 rows 31.6 s / 1139 MB. ``VERDICT_CELLS = 40000`` keeps it near
5000 rows at 8 ranks (20000 at 2).

What a sample cannot see: a one-step spike on a line that is not sampled (the transient rule), and
``since_step`` is only as fine as k. ``describe()`` goes into run.json (``verdict_input``) so a
reader knows which case it is.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from testbed.schema import row as R
from testbed.schema.jsonfile import open_regular

VERDICT_CELLS = 40_000  # rows × ranks handed to the verdict (see the module doc for the measurement)
MIN_VERDICT_ROWS = 500
NOTABLE_ROWS = 1_000


def verdict_rows(world_size: int | None) -> int:
    """How many rows the verdict of a ``world_size``-rank record is given (8 ranks if unknown)."""
    ranks = world_size if isinstance(world_size, int) and world_size > 0 else 8
    return max(MIN_VERDICT_ROWS, VERDICT_CELLS // ranks)


def count_lines(path: Path) -> int:
    """Lines in a file (a last line without a newline counts), read in 1 MiB blocks; 0 if absent."""
    try:
        fd = open_regular(path, max_bytes=None)
    except FileNotFoundError:
        return 0
    count, last = 0, b"\n"
    with os.fdopen(fd, "rb") as f:
        while block := f.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


class RowSample:
    """Collects the verdict's rows in one pass: ``add(index, row)`` for every line (``index`` is
    the line's position, 0-based), then ``rows()``."""

    def __init__(self, total_lines: int, limit: int | None = None, notable_limit: int = NOTABLE_ROWS):
        limit = verdict_rows(None) if limit is None else limit
        self.total = total_lines
        self.every = max(1, math.ceil(total_lines / limit)) if limit > 0 else 1
        self.notable_limit = notable_limit
        self._kept: list[tuple[int, dict[str, Any]]] = []
        self.notable = 0
        self.seen = 0

    def add(self, index: int, row: dict[str, Any]) -> None:
        self.seen += 1
        if index % self.every == 0:
            self._kept.append((index, row))
        elif self.notable < self.notable_limit and (row.get(R.FLAGS) or row.get(R.WEIGHTS_IN_SYNC) is False):
            self.notable += 1
            self._kept.append((index, row))

    def rows(self) -> list[dict[str, Any]]:
        return [row for _, row in sorted(self._kept, key=lambda item: item[0])]

    @property
    def sampled(self) -> bool:
        return self.every > 1

    def describe(self) -> dict[str, Any]:
        """``{"rows": used, "of": valid rows read, "every": k, "notable": extra rows}`` (run.json)."""
        return {"rows": len(self._kept), "of": self.seen, "every": self.every, "notable": self.notable}

"""One schema per record: what ``run.json``, a metrics row, ``sweep.json``, ``gate.json`` and a gate
baseline must hold, checked by the readers so that a hostile or broken file is one line naming the
file and the field - never a traceback far from it (``report`` on ``"scenario": "x"`` was an
AttributeError, on ``"step": null`` a TypeError inside matplotlib).

Hand-written on purpose: the records are small, the checks are a few lines each, and the bottom
room stays stdlib-only and cheap to import. Only the fields readers rely on are checked; other
keys are kept as they are (a newer writer may add some).
"""
from __future__ import annotations

import math
import sys
from typing import Any, Mapping

from testbed.schema import row as R

#: the record files beside a run's own (record/files.py names those)
SWEEP_FILE = "sweep.json"
GATE_FILE = "gate.json"
RUN_STATUSES = ("running", "ok", "failed")
#: per-rank lists of a row, and its scalar numbers (finite or null)
ROW_LISTS = (R.LOSS, R.GRAD_NORM, R.COS_TO_MEAN)
ROW_NUMBERS = (R.GLOBAL_LOSS, R.LOSS_STD, R.LOSS_CV, R.GRAD_NORM_STD, R.GRAD_NORM_CV, R.MEAN_GRAD_NORM, R.COS_MEAN,
               R.COS_MIN, R.NOISE_SCALE, R.PAIRWISE_COS_MEAN, R.LR)
BASELINE_FORMAT = "testbed-baseline/1"
FAIL_IF = ("either", "higher", "lower")


class RecordError(ValueError):
    """A record file is malformed: which file, which field, what was expected (one line)."""

    def __init__(self, file: Any, field: str, expected: str, got: Any = ...):
        self.file, self.field, self.expected = str(file), field, expected
        msg = f"{printable(str(file))}: field '{printable(field)}': expected {expected}"
        if got is not ...:
            msg += f", got {short(got)}"
        super().__init__(msg)

    @classmethod
    def whole(cls, file: Any, why: str) -> "RecordError":
        """The file as a whole is no record (not UTF-8, not JSON, nested too deep)."""
        error = cls(file, "<file>", why)
        error.args = (f"{printable(str(file))}: {printable(why)}",)
        return error

    def __str__(self) -> str:
        return str(self.args[0])


class FieldProblem(ValueError):
    """A field of a record is wrong; the reader adds the file (``RecordError``) or the line."""

    def __init__(self, field: str, expected: str, got: Any = ...):
        self.field, self.expected, self.got = field, expected, got
        super().__init__(f"field '{printable(field)}': expected {expected}"
                         + (f", got {short(got)}" if got is not ... else ""))

    def at(self, file: Any) -> RecordError:
        return RecordError(file, self.field, self.expected, self.got)


def printable(text: str) -> str:
    """One line, no terminal control sequences: what is not printable is shown escaped."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def short(value: Any, limit: int = 80) -> str:
    text = printable(repr(value))
    return text[:limit] + "..." if len(text) > limit else text


def is_number(v: Any) -> bool:
    """A finite number a float can hold (a 400-digit integer is not: it overflowed float math)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return abs(v) <= sys.float_info.max if isinstance(v, int) else math.isfinite(v)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _object(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise FieldProblem(field, "a JSON object", value)
    return value


def _optional(record: Mapping[str, Any], key: str, ok: Any, expected: str, prefix: str = "") -> None:
    if key in record and record[key] is not None and not ok(record[key]):
        raise FieldProblem(prefix + key, expected, record[key])


def is_segment(name: Any) -> bool:
    """One relative path component that stays where it is put (no separator, not '.' or '..')."""
    return isinstance(name, str) and 0 < len(name) <= 255 and name not in (".", "..") \
        and not any(c in name for c in "/\\\0")


# ---- run.json -------------------------------------------------------------------------------------

def check_run(record: Any) -> dict[str, Any]:
    """A run record (``run.json``): the fields the CLI, the report and the gate read."""
    record = _object(record, "<top>")
    if not isinstance(record.get("status"), str):  # RUN_STATUSES are the launcher's; a writer may add one
        raise FieldProblem("status", "a string (" + ", ".join(map(repr, RUN_STATUSES)) + ")", record.get("status"))
    scenario = _object(record.get("scenario", {}), "scenario")
    _optional(scenario, "name", lambda v: isinstance(v, str), "a string", "scenario.")
    _optional(scenario, "world_size", lambda v: is_int(v) and v >= 1, "an integer >= 1", "scenario.")
    for key in ("reason", "traceback"):
        _optional(record, key, lambda v: isinstance(v, str), "a string or null")
    for key in ("steps_kept", "failed_rank", "failed_step"):
        _optional(record, key, lambda v: is_int(v) and v >= -1, "an integer or null")
    _optional(record, "wall_time_s", is_number, "a number or null")
    for key in ("verdict", "control", "nonfinite", "verdict_input"):
        _optional(record, key, lambda v: isinstance(v, dict), "an object or null")
    verdict = record.get("verdict")
    if isinstance(verdict, dict):
        _optional(verdict, "headline", lambda v: isinstance(v, str), "a string", "verdict.")
        _optional(verdict, "status", lambda v: isinstance(v, str), "a string", "verdict.")
    return record


# ---- a metrics row --------------------------------------------------------------------------------

def _numbers_or_null(values: Any) -> bool:
    return isinstance(values, list) and all(v is None or is_number(v) for v in values)


def check_row(row: Any) -> dict[str, Any]:
    """One line of ``metrics.jsonl`` (``schema/row.py``); FieldProblem names the first bad field."""
    if not isinstance(row, dict):
        raise FieldProblem("<line>", "a JSON object", row)
    if not is_int(row.get(R.STEP)) or row[R.STEP] < 0:
        raise FieldProblem(R.STEP, "an integer >= 0", row.get(R.STEP))
    ranks = None
    for key in ROW_LISTS:
        if key in row:
            if not _numbers_or_null(row[key]):
                raise FieldProblem(key, "a list of numbers or nulls (one per rank)", row[key])
            if ranks is not None and len(row[key]) != ranks:
                raise FieldProblem(key, f"{ranks} values (one per rank, as '{R.LOSS}')", row[key])
            ranks = len(row[key])
    for key in ROW_NUMBERS:
        if key in row and row[key] is not None and not is_number(row[key]):
            raise FieldProblem(key, "a finite number or null", row[key])
    _check_flags(row.get(R.FLAGS, []), ranks)
    if R.PAIRWISE_COS in row and row[R.PAIRWISE_COS] is not None:
        _check_matrix(row[R.PAIRWISE_COS], ranks)
    if R.WEIGHT_CHECKSUM in row and not (isinstance(row[R.WEIGHT_CHECKSUM], list)
                                         and all(is_int(v) for v in row[R.WEIGHT_CHECKSUM])):
        raise FieldProblem(R.WEIGHT_CHECKSUM, "a list of integers", row[R.WEIGHT_CHECKSUM])
    if R.WEIGHTS_IN_SYNC in row and not isinstance(row[R.WEIGHTS_IN_SYNC], bool):
        raise FieldProblem(R.WEIGHTS_IN_SYNC, "true or false", row[R.WEIGHTS_IN_SYNC])
    _optional(row, R.SELF_CHECK, lambda v: isinstance(v, dict), "an object")
    _optional(row, R.GLOBAL_STEP, is_int, "an integer")
    return row


def _check_flags(flags: Any, ranks: int | None) -> None:
    if not isinstance(flags, list):
        raise FieldProblem(R.FLAGS, "a list of {\"rank\", \"kind\"} objects", flags)
    for i, flag in enumerate(flags):
        rank = flag.get(R.FLAG_RANK) if isinstance(flag, dict) else ...
        if not isinstance(flag, dict) or not isinstance(flag.get(R.FLAG_KIND), str) \
                or not (rank is None or (is_int(rank) and 0 <= rank < (ranks if ranks is not None else 1 << 31))):
            raise FieldProblem(f"{R.FLAGS}[{i}]", "an object with a 'kind' string and a 'rank' in range or null", flag)


def _check_matrix(matrix: Any, ranks: int | None) -> None:
    n = len(matrix) if isinstance(matrix, list) else -1
    square = n >= 0 and all(_numbers_or_null(line) and len(line) == n for line in matrix)
    if not square or (ranks is not None and n != ranks):
        size = f"{ranks}×{ranks}" if ranks is not None else "N×N"
        raise FieldProblem(R.PAIRWISE_COS, f"a {size} matrix of numbers or nulls", matrix)


# ---- sweep.json -----------------------------------------------------------------------------------

def check_sweep(record: Any) -> dict[str, Any]:
    """A sweep record: ``{"scenario", "source", "parameter", "levels": [{"index", "label", "value",
    "run_dir" (one path component inside the sweep directory), "status"}]}``."""
    record = _object(record, "<top>")
    for key in ("scenario", "parameter"):
        if not isinstance(record.get(key), str):
            raise FieldProblem(key, "a string", record.get(key))
    _optional(record, "source", lambda v: isinstance(v, str), "a string")
    levels = record.get("levels")
    if not isinstance(levels, list):
        raise FieldProblem("levels", "a list of level objects", levels)
    seen: set[int] = set()
    for i, level in enumerate(levels):
        where = f"levels[{i}]."
        _object(level, f"levels[{i}]")
        if not is_int(level.get("index")) or level["index"] < 0 or level["index"] in seen:
            raise FieldProblem(where + "index", "a distinct integer >= 0", level.get("index"))
        seen.add(level["index"])
        if not is_segment(level.get("run_dir")):
            raise FieldProblem(where + "run_dir", "a directory name inside the sweep directory", level.get("run_dir"))
        for key in ("label", "status"):
            if not isinstance(level.get(key), str):
                raise FieldProblem(where + key, "a string", level.get(key))
    _optional(record, "comparison", lambda v: isinstance(v, dict), "an object")
    return record


# ---- gate.json ------------------------------------------------------------------------------------

GATE_STATUSES = ("running", "passed", "failed", "stopped")


def check_gate(record: Any) -> dict[str, Any]:
    """The gate's record in its ``--out``: its status and the scenarios' run directories."""
    record = _object(record, "<top>")
    if record.get("status") not in GATE_STATUSES:
        raise FieldProblem("status", "one of " + ", ".join(map(repr, GATE_STATUSES)), record.get("status"))
    scenarios = record.get("scenarios")
    if not isinstance(scenarios, dict) or not all(is_segment(v) for v in scenarios.values()):
        raise FieldProblem("scenarios", "an object of scenario name -> directory name", scenarios)
    return record


# ---- a gate baseline ------------------------------------------------------------------------------

def check_baseline(record: Any) -> dict[str, Any]:
    """``{"format": "testbed-baseline/1", "tolerances": {...}, "scenarios": {name: {"source",
    "values": {key: finite number | bool}, "tolerances": {...}}}}`` (gate/baseline.py)."""
    record = _object(record, "<top>")
    if record.get("format") != BASELINE_FORMAT:
        raise FieldProblem("format", repr(BASELINE_FORMAT), record.get("format"))
    scenarios = _object(record.get("scenarios"), "scenarios")
    check_tolerances(record.get("tolerances", {}), "tolerances")
    for name, entry in scenarios.items():
        where = f"scenarios.{name}"
        entry = _object(entry, where)
        values = _object(entry.get("values"), where + ".values")
        check_tolerances(entry.get("tolerances", {}), where + ".tolerances")
        _optional(entry, "source", lambda v: isinstance(v, str), "a string", where + ".")
        for key, value in values.items():
            if not (isinstance(value, bool) or is_number(value)):
                raise FieldProblem(f"{where}.values.{key}", "a finite number or true/false", value)
    return record


def check_tolerances(table: Any, where: str) -> None:
    table = _object(table, where)
    for key, tol in table.items():
        ok = isinstance(tol, dict) and set(tol) <= {"abs", "rel", "fail_if"} \
            and tol.get("fail_if", "either") in FAIL_IF \
            and all(is_number(tol.get(k, 0)) and tol.get(k, 0) >= 0 for k in ("abs", "rel"))
        if not ok:
            raise FieldProblem(f"{where}.{key}", "{\"abs\": a finite number >= 0, \"rel\": a finite number >= 0, "
                               f"\"fail_if\": one of {', '.join(FAIL_IF)}}}", tol)

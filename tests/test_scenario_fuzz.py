"""Fuzzing the scenario validator: whatever a scenario file holds, the user gets exactly one clean
``ScenarioError`` naming the file and the field, or a scenario that really is valid — never a
traceback, a hang or a memory blow-up. Pure parsing, no processes.

Two sources of input: random TOML documents (written to a file and read through
``load_scenario``, so the TOML layer is fuzzed too) and mutations of the valid scenarios shipped
in ``scenarios/`` (wrong types, unknown keys, unknown kinds, ranks out of range, world_size < 2,
negative or huge numbers, unicode, nested junk). A few cases also go through the real CLI.
"""
from __future__ import annotations

import copy
import datetime
import json
import math
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from testbed.cli.run import DEFAULT_SCENARIO
from testbed.scenario.tables import PERTURBATIONS
from testbed.scenario.bounds import FLOAT32_MAX
from testbed.scenario.readers import MAX_NAME
from testbed.scenario.spec import _TOP_KEYS, Scenario, ScenarioError, load_scenario, parse_scenario
from tests.helpers import TINY

ROOT = Path(__file__).resolve().parents[1]


def _valid_docs() -> list[dict[str, Any]]:
    """Seeds for mutation: every scenario in the repository that validates (plus TINY)."""
    docs = [copy.deepcopy(TINY)]
    for path in [DEFAULT_SCENARIO, *sorted((ROOT / "scenarios").rglob("*.toml"))]:
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
            parse_scenario(doc, source=str(path))
        except (tomllib.TOMLDecodeError, ScenarioError):
            continue
        docs.append(doc)
    return docs


VALID_DOCS = _valid_docs()
SOURCE = "fuzzed.toml"
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- values TOML can hold, and a writer for them (tomllib only reads) -----------------------

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)  # no lone surrogates
huge_ints = st.sampled_from([-(2**63), -(2**31), -1, 0, 1, 2, 3, 2**31, 2**53 + 1, 2**63 - 1])
scalars = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**63 - 1), huge_ints,
    st.floats(allow_nan=True, allow_infinity=True), text,
    st.sampled_from(["all", "none", "mlp", "sgd", "synthetic", "crash", "hang", "nan", "gloo", "é∂ℵ🙂"]),
    st.datetimes(min_value=datetime.datetime(1, 1, 1)), st.dates(),
)
junk = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)), max_leaves=12)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return toml_key(v)
    if isinstance(v, (datetime.date, datetime.datetime)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_key(s: str) -> str:
    """A TOML basic string (JSON escapes are TOML escapes; DEL must be escaped too)."""
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_document(doc: dict[str, Any]) -> str:
    return "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in doc.items())


# ---- mutations of valid scenarios -------------------------------------------------------------


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key/index path inside a document."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in items:
        out.append(prefix + (key,))
        out.extend(paths(child, prefix + (key,)))
    return out


def container(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        doc = doc[key]
    return doc


TARGETED = {  # fields with rules beyond their type, and values that break those rules
    ("world_size",): st.one_of(st.integers(-5, 2), huge_ints),
    ("steps",): st.one_of(st.integers(-5, 1), huge_ints),
    ("timeout_s",): st.one_of(st.floats(), huge_ints),
    ("stall_timeout_s",): st.one_of(st.floats(), huge_ints),
    ("data", "batch_size"): st.one_of(st.integers(-3, 1), huge_ints),
    ("metrics", "every"): st.integers(-3, 2),
    ("metrics", "noise_scale_ema"): st.floats(),
    ("on_nonfinite",): st.sampled_from(["stop", "continue", "STOP", "", "halt"]),
    ("model", "kind"): st.one_of(text, st.just("mlp")),
    ("optim", "lr"): st.one_of(st.floats(), huge_ints),
    ("data", "size"): st.one_of(st.integers(-3, 300), huge_ints),
    ("name",): st.one_of(text, st.sampled_from(["..", ".", "../x", "a/b", "a\\b", "n" * 129])),
}


@st.composite
def perturbation(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.one_of(st.sampled_from(PERTURBATIONS.names()), text))
    entry: dict[str, Any] = {"kind": kind}
    if draw(st.booleans()):
        entry["ranks"] = draw(st.one_of(
            st.lists(st.one_of(st.integers(-3, 9), huge_ints), max_size=4), st.floats(-1, 2),
            st.sampled_from(["all", "none", "some"]), junk))
    for key in ("start_step", "end_step"):
        if draw(st.booleans()):
            entry[key] = draw(st.one_of(st.integers(-3, 50), huge_ints, junk))
    if kind in PERTURBATIONS and draw(st.booleans()):
        params = list(PERTURBATIONS.params(kind)) or ["bogus"]
        entry[draw(st.sampled_from(params))] = draw(junk)
    return entry


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    doc = copy.deepcopy(draw(st.sampled_from(VALID_DOCS)))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "delete", "unknown", "targeted", "perturbation", "junk_table"]))
        every = paths(doc)
        if op == "set" and every:
            path = draw(st.sampled_from(every))
            container(doc, path)[path[-1]] = draw(junk)
        elif op == "delete" and every:
            path = draw(st.sampled_from(every))
            del container(doc, path)[path[-1]]
        elif op == "unknown":
            tables = [()] + [p for p in every if isinstance(container(doc, p + (0,)), dict)]
            table = container(doc, draw(st.sampled_from(tables)) + ("",))
            table[draw(text)] = draw(junk)
        elif op == "targeted":
            path, values = draw(st.sampled_from(list(TARGETED.items())))
            parent = doc.get(path[0]) if len(path) == 2 else doc
            if isinstance(parent, dict):
                parent[path[-1]] = draw(values)
        elif op == "perturbation":
            doc.setdefault("perturbations", [])
            if isinstance(doc["perturbations"], list):
                doc["perturbations"].append(draw(perturbation()))
        else:
            doc[draw(st.sampled_from(["model", "data", "optim", "metrics", "perturbations", "expect"]))] = draw(junk)
    return doc


# ---- the property -----------------------------------------------------------------------------


def check_clean(call: Any, source: str, doc: dict[str, Any] | None) -> Scenario | None:
    """``call()`` returns a valid scenario or raises one clean ScenarioError; nothing else."""
    try:
        scenario = call()
    except ScenarioError as e:
        message = str(e)
        assert type(e) is ScenarioError
        assert e.file == source and message.startswith(f"{source}: field '"), message
        assert isinstance(e.field, str) and "\n" not in message and "\r" not in message, message
        known = set(_TOP_KEYS) | {"<file>"} | {str(k) for k in doc or {}}
        assert any(e.field == k or e.field.startswith((f"{k}.", f"{k}[")) for k in known), (e.field, message)
        event(f"ScenarioError in {e.field.split('.')[0].split('[')[0][:20]!r}")
        return None
    event("valid scenario")
    assert_valid(scenario)
    return scenario


def assert_valid(s: Scenario) -> None:
    """What a scenario that passed validation must satisfy (else the validator let junk through)."""
    assert 2 <= s.world_size and 1 <= s.steps and s.batch_size >= 1
    assert math.isfinite(s.timeout_s) and s.timeout_s > 0 and math.isfinite(s.stall_timeout_s)
    assert s.on_nonfinite in ("continue", "stop")
    for p in s.perturbations:
        assert p.kind in PERTURBATIONS
        assert all(0 <= r < s.world_size for r in p.ranks) and len(set(p.ranks)) == len(p.ranks)
        assert 0 <= p.start_step < s.steps and (p.end_step is None or p.end_step > p.start_step)
    for params in (s.model.params, s.data.params, s.optim.params, *(p.params for p in s.perturbations)):
        assert all(math.isfinite(v) and abs(v) <= FLOAT32_MAX for v in params.values() if isinstance(v, float))
    assert s.optim.kind not in ("sgd", "adamw") or s.optim.params["lr"] > 0
    assert s.name.strip() and "/" not in s.name and s.name not in (".", "..") and len(s.name) <= MAX_NAME
    size = s.data.params.get("size")
    assert size is None or -(-size // s.world_size) >= s.batch_size  # every rank gets a full batch
    assert Scenario.from_dict(s.to_dict()) == s
    json.dumps(s.to_dict(), default=str)  # run.json can hold it


@pytest.fixture(scope="module")
def scratch() -> Any:
    with tempfile.TemporaryDirectory(prefix="testbed-fuzz-") as d:
        yield Path(d)


@FUZZ
@given(doc=mutated())
def test_mutated_scenarios_fail_cleanly(doc: dict[str, Any]) -> None:
    check_clean(lambda: parse_scenario(doc, source=SOURCE), SOURCE, doc)


@FUZZ
@given(doc=st.one_of(st.dictionaries(st.one_of(text, st.sampled_from(sorted(_TOP_KEYS))), junk, max_size=8),
                     mutated()))
def test_random_toml_files_fail_cleanly(scratch: Path, doc: dict[str, Any]) -> None:
    path = scratch / "fuzzed.toml"
    path.write_text(toml_document(doc), encoding="utf-8")
    assert tomllib.loads(path.read_text(encoding="utf-8")) == doc or _has_nan(doc)  # the writer is right
    check_clean(lambda: load_scenario(path), str(path), doc)


@FUZZ
@given(blob=st.one_of(st.binary(max_size=64), text.map(lambda t: t.encode("utf-8")),
                      st.sampled_from([b"[[perturbations]]\nkind = 1\n", b"name = \n", b"\xff\xfe", b"a = [1, {"])))
def test_arbitrary_bytes_fail_cleanly(scratch: Path, blob: bytes) -> None:
    path = scratch / "bytes.toml"
    path.write_bytes(blob)
    check_clean(lambda: load_scenario(path), str(path), None)


def _has_nan(doc: Any) -> bool:
    if isinstance(doc, float):
        return math.isnan(doc)
    values = doc.values() if isinstance(doc, dict) else doc if isinstance(doc, list) else []
    return any(_has_nan(v) for v in values)


# ---- the cases a person meets, by name ----------------------------------------------------------


@pytest.mark.parametrize(("change", "field"), [
    ({"world_size": 1}, "world_size"),
    ({"steps": -3}, "steps"),
    ({"world_size": 2**62}, "world_size"),
    ({"timeout_s": 1e300}, "timeout_s"),
    ({"bogus": 1}, "bogus"),
    ({"model": {"kind": "mlp", "hidden": "wide"}}, "model.hidden"),
    ({"perturbations": [{"kind": "no_such_kind"}]}, "perturbations[0].kind"),
    ({"perturbations": [{"kind": "crash", "ranks": [2]}]}, "perturbations[0].ranks"),
    ({"perturbations": [{"kind": "crash", "start_step": 99}]}, "perturbations[0].start_step"),
    ({"perturbations": [{"kind": "exit", "signal": "SIGWHAT"}]}, "perturbations[0].signal"),
    ({"perturbations": {"kind": "crash"}}, "perturbations"),
])
def test_named_mistakes(change: dict[str, Any], field: str) -> None:
    doc = {**copy.deepcopy(TINY), **change}
    with pytest.raises(ScenarioError) as info:
        parse_scenario(doc, source=SOURCE)
    assert info.value.field == field and info.value.file == SOURCE


def test_unreadable_paths_and_bad_overrides(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(toml_document(TINY), encoding="utf-8")
    listed = tmp_path / "listed.toml"
    listed.write_text(toml_document({**TINY, "perturbations": [{"kind": "crash"}]}), encoding="utf-8")
    for path, overrides in [(tmp_path, None), (tmp_path / "missing.toml", None),
                            (listed, {"perturbations.3.ranks": [1]}), (listed, {"perturbations.x.ranks": [1]}),
                            (good, {"name.first": "x"}), (good, {"model.hidden.x": 1}), (good, {"perturbations.x": 1})]:
        with pytest.raises(ScenarioError) as info:
            load_scenario(path, overrides)
        assert info.value.file == str(path) and info.value.field


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("content", "args", "needle"), [
    ('name = "x"\nworld_size = 1\n', [], "world_size"),
    ("name = [unclosed\n", [], "<file>"),
    (toml_document({**TINY, "perturbations": [{"kind": "crash", "ranks": [5]}]}), [], "perturbations[0].ranks"),
    (toml_document({**TINY, "perturbations": [{"kind": "crash"}]}), ["--set", "perturbations.3.ranks=[1]"],
     "perturbations.3.ranks"),
])
def test_cli_reports_one_line_and_exit_2(tmp_path: Path, content: str, args: list[str], needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content, encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "testbed", "run", str(path), "--out", str(tmp_path / "out"), *args],
                          capture_output=True, text=True, timeout=110, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(path) in lines[0] and needle in lines[0], lines[0]
    assert not (tmp_path / "out").exists()  # nothing was launched

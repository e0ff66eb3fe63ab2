"""A wrong scenario file gets one clear error: the file, the dotted field, what was expected.

Example-based: each case edits one line of a valid file written to disk and read through
``load_scenario`` (as a user would), then checks the message a human reads. The fuzz test
(tests/test_scenario_fuzz.py) covers arbitrary inputs; this file pins the wording of the common ones.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from testbed import cli
from testbed.scenario.spec import ScenarioError, load_scenario

VALID = """\
name = "t"
description = "a valid scenario"
world_size = 2
steps = 3
seed = 0

[model]
kind = "mlp"
hidden = 8

[data]
kind = "synthetic"
batch_size = 4
size = 64

[optim]
kind = "sgd"
lr = 0.1

[metrics]
every = 1

[[perturbations]]
kind = "shuffle_desync"
ranks = [1]
"""

# (old text, new text, field named in the error, words of "expected")
CASES = [
    ('name = "t"\n', "", "name", "(required)"),
    ("world_size = 2", "world_size = 1", "world_size", "integer >= 2"),
    ("steps = 3", 'steps = "three"', "steps", "integer"),
    ("steps = 3", "steps = 0", "steps", "expected an integer"),
    ("seed = 0", "seed = 0\ncolour = 1", "colour", "no such field"),
    ('seed = 0', 'seed = 0\nbackend = "mpi"', "backend", "one of 'auto', 'gloo'"),
    ('kind = "mlp"', 'kind = "resnet"', "model.kind", "'mlp'"),
    ("hidden = 8", "hidden = 8.5", "model.hidden", "integer"),
    ("hidden = 8", "hiden = 8", "model.hiden", "a parameter of model kind 'mlp'"),
    ("batch_size = 4", "batch_size = 0", "data.batch_size", ">= 1"),
    ("batch_size = 4\n", "", "data.batch_size", "(required)"),
    ("lr = 0.1\n", "", "optim.lr", "(required by 'sgd')"),
    ("every = 1", "every = 0", "metrics.every", ">= 1"),
    ("every = 1", "weight_check_every = -1", "metrics.weight_check_every", ">= 0"),
    ('kind = "shuffle_desync"', 'kind = "desync"', "perturbations[0].kind", "one of"),
    ("ranks = [1]", "ranks = [2]", "perturbations[0].ranks", "ranks in 0..1"),
    ("ranks = [1]", "ranks = [1, 1]", "perturbations[0].ranks", "distinct ranks"),
    ("ranks = [1]", "ranks = 1.5", "perturbations[0].ranks", "fraction in [0, 1]"),
    ("ranks = [1]", "ranks = [1]\nstart_step = 2\nend_step = 2", "perturbations[0].end_step", "> start_step"),
    ("ranks = [1]", "ranks = [1]\nsalt = \"x\"", "perturbations[0].salt", "integer"),
    ("every = 1", 'every = 1\n[parallel]\nkind = "zero3"', "parallel.kind", "one of 'ddp', 'fsdp2'"),
    ("every = 1", 'every = 1\n[parallel]\nkind = "fsdp2"\nreshard = true', "parallel.reshard", "no such field"),
    ("every = 1", 'every = 1\n[parallel]\nkind = "fsdp2"\nreshard_after_forward = 1', "parallel.reshard_after_forward",
     "boolean"),
    ("every = 1", "every = 1\n[parallel]\nreshard_after_forward = false", "parallel.reshard_after_forward",
     "kind = 'fsdp2'"),
    ("every = 1", 'every = 1\n[parallel]\nkind = "fsdp2"\n[expect]\nweights_in_sync = false', "expect.weights_in_sync",
     "no replicas"),
]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_base_file_is_valid(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, VALID))
    assert (s.world_size, s.batch_size, s.perturbations[0].ranks) == (2, 4, (1,))


@pytest.mark.parametrize("old, new, field, expected", CASES, ids=[c[2] + ":" + c[1][:14] for c in CASES])
def test_error_names_file_field_and_expectation(tmp_path: Path, old: str, new: str, field: str, expected: str) -> None:
    assert old in VALID
    path = write(tmp_path, VALID.replace(old, new, 1))
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    err = info.value
    assert (err.file, err.field) == (str(path), field)
    assert str(path) in str(err) and f"field '{field}'" in str(err) and expected in str(err), str(err)


@pytest.mark.parametrize("content, field, expected", [
    (None, "<file>", "an existing scenario file"),
    ("name = [", "<file>", "valid TOML"),
])
def test_unreadable_files_name_the_file(tmp_path: Path, content: str | None, field: str, expected: str) -> None:
    path = tmp_path / "broken.toml"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert info.value.field == field and str(path) in str(info.value) and expected in str(info.value)


def test_parallel_defaults_to_ddp_and_fsdp2_round_trips(tmp_path: Path) -> None:
    assert load_scenario(write(tmp_path, VALID)).parallel.kind == "ddp"
    s = load_scenario(write(tmp_path, VALID), {"parallel.kind": "fsdp2", "parallel.reshard_after_forward": False})
    assert (s.parallel.kind, s.parallel.reshard_after_forward) == ("fsdp2", False)
    assert type(s).from_dict(s.to_dict()) == s


def test_overrides_are_validated_like_the_file(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"field 'world_size': expected an integer >= 2"):
        load_scenario(write(tmp_path, VALID), {"world_size": 1})


def test_cli_prints_the_error_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad file never launches a rank: the user sees one line naming file and field."""
    path = write(tmp_path, VALID.replace("world_size = 2", "world_size = 1"))
    assert cli.main(["run", str(path), "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "world_size" in err and ">= 2" in err
    assert not (tmp_path / "never").exists()

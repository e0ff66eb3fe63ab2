"""The attack campaign of issue 23, one test per row of docs/reliability.md ("Attacked again"):
confinement (names, links, foreign records), ownership (a sweep into a run, --overwrite --control),
refusals before launch, hostile record files, outputs that cannot be written, terminal output.

No rank starts here: a refusal happens before any process, and where a record must be written the
launcher is replaced by ``attack_fixtures.fake_launch`` (the real claim / record code, no process).
Runs with real ranks: tests/test_attacks_runs.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed import cli
from testbed.cli.common import EXIT_OK, EXIT_USAGE
from testbed.engine import runner
from tests.attack_fixtures import fake_launch, files_under, run_record, scenario_file, sweep_file
from tests.helpers import TINY
from tests.scenario_files import to_toml


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = cli.main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err), err
    return code, err


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "launch", fake_launch)


# ---- 1. confinement: names ----------------------------------------------------------------------

@settings(max_examples=300)
@given(st.lists(st.text(min_size=1, max_size=40), min_size=2, max_size=2, unique=True))
def test_names_become_distinct_safe_path_segments(names: list[str]) -> None:
    from testbed.record.names import segment

    a, b = (segment(n) for n in names)
    for s in (a, b):
        assert s not in (".", "..") and "/" not in s and "\\" not in s and "\0" not in s and 0 < len(s) < 120
        assert not s.startswith((".", "-"))
    assert a != b


def test_a_name_made_of_dots_stays_inside_the_gate_out(tmp_path: Path, fake: None,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``-..-`` slugged to ``..``: the gate rmtree'd the directory above --out (with a [sweep]) or
    replaced a run record there (without). Run twice with --update-baseline."""
    from testbed.gate.gate import slug as segment

    parent = tmp_path / "parent"
    run_record(parent / "keep")  # everything that was in the parent must survive
    (parent / "notes.txt").write_text("mine")
    run_record(parent, name="users-own-run")  # a run record right in the parent
    before = {p: p.read_bytes() for p in parent.rglob("*") if p.is_file()}
    sweep = sweep_file(tmp_path / "s.toml", name="-..-")
    plain = scenario_file(tmp_path / "p.toml", name="..-")
    out = parent / "gateout"
    for _ in range(2):
        code, err = _main(capsys, "gate", str(sweep), str(plain), "--baseline", str(tmp_path / "b.json"),
                          "--update-baseline", "--out", str(out))
        assert code == EXIT_OK, err
    assert {p: p.read_bytes() for p in parent.rglob("*") if p.is_file() and out not in p.parents} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(["gate.json", "run.lock", segment("-..-"), segment("..-")])
    assert json.loads((out / segment("-..-") / "sweep.json").read_text())["scenario"] == "-..-"


def test_names_that_slugged_alike_keep_their_own_records(tmp_path: Path, fake: None,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from testbed.gate.gate import slug as segment

    a, b = scenario_file(tmp_path / "a.toml", name="a b", steps=3), scenario_file(tmp_path / "b.toml", name="a-b")
    code, err = _main(capsys, "gate", str(a), str(b), "--baseline", str(tmp_path / "b.json"), "--update-baseline",
                      "--out", str(tmp_path / "g"))
    assert code == EXIT_OK, err
    names = {json.loads((tmp_path / "g" / segment(n) / "run.json").read_text())["scenario"]["name"]: n
             for n in ("a b", "a-b")}
    assert names == {"a b": "a b", "a-b": "a-b"} and segment("a b") != segment("a-b")
    assert len((tmp_path / "g" / segment("a b") / "metrics.jsonl").read_text().splitlines()) == 3


def test_names_differing_only_in_case_are_refused_by_the_gate(tmp_path: Path, fake: None,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """On a case-insensitive filesystem (macOS, Windows) ``A`` and ``a`` would share a directory."""
    a, b = scenario_file(tmp_path / "a.toml", name="Tiny"), scenario_file(tmp_path / "b.toml", name="tiny")
    code, err = _main(capsys, "gate", str(a), str(b), "--baseline", str(tmp_path / "b.json"), "--update-baseline",
                      "--out", str(tmp_path / "g"))
    assert code == EXIT_USAGE and "differ in more than letter case" in err[-1] and not (tmp_path / "g").exists(), err


# ---- 1. confinement: planted links --------------------------------------------------------------

LINKS = ["run.lock", "metrics.jsonl", "run.json", "events.jsonl", "ranks", "control", "sweep.json"]


@pytest.mark.parametrize("name", LINKS)
@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-victim", "dangling"])
def test_a_planted_link_is_refused_and_never_written_through(tmp_path: Path, fake: None, name: str,
                                                             dangling: bool, capsys: pytest.CaptureFixture[str]) -> None:
    victim = tmp_path / "victim"
    if not dangling:
        victim.mkdir() if name in ("ranks", "control") else victim.write_text("precious\n")
        if victim.is_dir():
            (victim / "rank0.json").write_text("precious\n")
    run_dir = tmp_path / "D"
    run_dir.mkdir()
    (run_dir / name).symlink_to(victim)
    code, err = _main(capsys, "run", str(scenario_file(tmp_path / "s.toml")), "--out", str(run_dir))
    assert code == EXIT_USAGE and len(err) == 1 and "is a symbolic link" in err[0] and name in err[0], err
    if dangling:
        assert not victim.exists()
    elif victim.is_dir():
        assert [p.name for p in victim.iterdir()] == ["rank0.json"] and (victim / "rank0.json").read_text() == "precious\n"
    else:
        assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in run_dir.iterdir()) == sorted({name, "run.lock"})


def test_a_hard_linked_lock_file_is_refused_not_truncated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "D").mkdir()
    os.link(victim, tmp_path / "D" / "run.lock")
    code, err = _main(capsys, "run", str(scenario_file(tmp_path / "s.toml")), "--out", str(tmp_path / "D"))
    assert code == EXIT_USAGE and "hard links" in err[0] and victim.read_text() == "precious\n", err


def test_the_record_writers_never_follow_a_link(tmp_path: Path) -> None:
    """The writers themselves (the monitor and the ranks use them directly): O_NOFOLLOW / O_EXCL."""
    from testbed.record.files import JsonlWriter, RunDirError, write_json_atomic

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    for name in ("m.jsonl", "run.json"):
        (tmp_path / name).symlink_to(victim)
    with pytest.raises(RunDirError, match="symbolic link"):
        JsonlWriter(tmp_path / "m.jsonl")
    with pytest.raises(RunDirError, match="symbolic link"):
        write_json_atomic(tmp_path / "run.json", {"status": "ok"})
    (tmp_path / "new.jsonl").write_text("")
    with pytest.raises(FileExistsError):
        JsonlWriter(tmp_path / "new.jsonl", new=True)
    os.mkfifo(tmp_path / "fifo.jsonl")
    with pytest.raises(RunDirError, match="not a regular file"):
        JsonlWriter(tmp_path / "fifo.jsonl")  # and it did not block waiting for a reader
    assert victim.read_text() == "precious\n"


# ---- 1/3. ownership: foreign records, a sweep into a run, a run into a sweep --------------------

def test_a_sweep_never_deletes_a_foreign_record_where_a_level_goes(tmp_path: Path, fake: None,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "S"
    run_record(out / "level-01-1", name="somebody-else")
    code, err = _main(capsys, "sweep", str(sweep_file(tmp_path / "s.toml")), "--out", str(out))
    assert code == EXIT_USAGE and "holds a record that is not level '1' of this sweep" in err[-1], err
    assert json.loads((out / "level-01-1" / "run.json").read_text())["scenario"]["name"] == "somebody-else"
    assert not (out / "level-00-none" / "run.json").exists()  # refused before any level ran


@pytest.mark.parametrize("where", ["level", "inside-level", "gate-scenario", "inside-gate-scenario"])
def test_a_link_where_a_sweep_level_or_gate_scenario_goes_is_refused(tmp_path: Path, fake: None, where: str,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "elsewhere").mkdir()
    out = tmp_path / "OUT"
    sub = out / ("level-00-none" if where.endswith("level") else "tiny")
    if where.startswith("inside"):
        sub.mkdir(parents=True)
        (sub / "metrics.jsonl").symlink_to(tmp_path / "elsewhere" / "rows")
    else:
        out.mkdir()
        sub.symlink_to(tmp_path / "elsewhere")
    argv = (["sweep", str(sweep_file(tmp_path / "s.toml")), "--out", str(out)] if where.endswith("level") else
            ["gate", str(scenario_file(tmp_path / "t.toml")), "--baseline", str(tmp_path / "b.json"),
             "--update-baseline", "--out", str(out)])
    code, err = _main(capsys, *argv)
    assert code == EXIT_USAGE and "symbolic link" in err[-1] and not any((tmp_path / "elsewhere").iterdir()), err


@pytest.mark.parametrize("command", ["sweep-into-run", "run-into-sweep", "sweep-into-other-sweep"])
def test_a_finished_record_is_not_hidden_without_overwrite(tmp_path: Path, fake: None, command: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "D"
    if command == "sweep-into-run":
        run_record(out)
        argv = ["sweep", str(sweep_file(tmp_path / "s.toml")), "--out", str(out)]
    else:
        assert cli.main(["sweep", str(sweep_file(tmp_path / "s.toml", name="first")), "--out", str(out)]) == EXIT_OK
        capsys.readouterr()
        argv = (["run", str(scenario_file(tmp_path / "r.toml")), "--out", str(out)] if command == "run-into-sweep"
                else ["sweep", str(sweep_file(tmp_path / "t.toml", name="second")), "--out", str(out)])
    before = files_under(out) | {"run.lock"}  # a refused claim leaves (at most) the lock file
    code, err = _main(capsys, *argv)
    assert code == EXIT_USAGE and len(err) == 1 and "holds an earlier" in err[0] and "--overwrite" in err[0], err
    assert files_under(out) == before
    code, err = _main(capsys, *argv, "--overwrite")  # replaced: the old record is gone, nothing else
    assert code == EXIT_OK, err
    assert not (command == "run-into-sweep" and (out / "sweep.json").exists())


def test_overwrite_with_control_replaces_the_old_control(tmp_path: Path, fake: None,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = scenario_file(tmp_path / "s.toml", perturbations=[{"kind": "seed_desync", "ranks": [1]}])
    out = tmp_path / "D"
    assert cli.main(["run", str(path), "--out", str(out), "--control"]) == EXIT_OK
    capsys.readouterr()
    (out / "control" / "mine.txt").write_text("not testbed's")  # a foreign file keeps its directory
    code, err = _main(capsys, "run", str(path), "--out", str(out), "--control", "--overwrite", "--steps", "3")
    assert code == EXIT_OK, err
    assert json.loads((out / "run.json").read_text())["control"]["status"] == "ok"
    assert len((out / "control" / "metrics.jsonl").read_text().splitlines()) == 3
    assert (out / "control" / "mine.txt").read_text() == "not testbed's"


def test_the_gate_refuses_an_out_it_cannot_write_and_a_foreign_scenario_dir(
        tmp_path: Path, fake: None, capsys: pytest.CaptureFixture[str]) -> None:
    path = scenario_file(tmp_path / "s.toml")
    code, err = _main(capsys, "gate", str(path), "--baseline", str(tmp_path / "b.json"), "--update-baseline",
                      "--out", "/proc/testbed-gate")
    assert code == EXIT_USAGE and err[-1].startswith("testbed gate: --out /proc/testbed-gate: cannot write there"), err
    run_record(tmp_path / "g" / "tiny", name="not-tiny")
    code, err = _main(capsys, "gate", str(path), "--baseline", str(tmp_path / "b.json"), "--update-baseline",
                      "--out", str(tmp_path / "g"))
    assert code == EXIT_USAGE and "holds a run record of 'not-tiny', not of scenario 'tiny'" in err[-1], err


# ---- 6. refused before launch (they reached the ranks) ----------------------------------------------

def _doc(**changes: Any) -> str:
    return to_toml({**TINY, **changes})


TOKENS = {"kind": "alpaca_synthetic", "batch_size": 2, "size": 64}
TOO_LATE: dict[str, tuple[str, list[str], str]] = {
    "mlp-on-tokens": (_doc(data=TOKENS), [], "'model.kind'"),
    "transformer-on-features": (_doc(model={"kind": "transformer", "d_model": 16, "heads": 2}), [], "'model.kind'"),
    "hf-on-features": (_doc(model={"kind": "hf", "path": "/nonexistent"}), [], "'model.kind'"),
    "seq-len-1": (_doc(model={"kind": "transformer", "d_model": 16, "heads": 2}, data={**TOKENS, "seq_len": 1}), [],
                  "'data.seq_len'"),
    "unknown-task": (_doc(model={"kind": "transformer", "d_model": 16, "heads": 2},
                          data={**TOKENS, "tasks": ["add", "nosuchtask"]}), [], "'data.tasks'"),
    "shard-skew-groups-0": (_doc(perturbations=[{"kind": "shard_skew", "groups": 0, "keep": [0]}]), [],
                            "'perturbations[0].groups'"),
    "shard-skew-keep-out-of-range": (_doc(perturbations=[{"kind": "shard_skew", "groups": 2, "keep": [5]}]), [],
                                     "'perturbations[0].keep'"),
    "dropout-desync-offset-0": (_doc(perturbations=[{"kind": "dropout_desync", "offset": 0}]), [],
                                "'perturbations[0].offset'"),
    "label-noise-nokey": (_doc(perturbations=[{"kind": "label_noise", "key": "nokey"}]), [], "'perturbations[0].key'"),
    "data-size-1e10": (_doc(), ["--set", "data.size=10000000000"], "'data.size'"),
    "hidden-1e9": (_doc(), ["--set", "model.hidden=1000000000"], "'model.hidden'"),
    "threads-2-to-the-40": (_doc(threads_per_rank=2**40), [], "'threads_per_rank'"),
    "set-negative-index": (_doc(perturbations=[{"kind": "seed_desync", "ranks": [1]}]),
                           ["--set", "perturbations.-1.ranks=[0]"], "'perturbations.-1.ranks'"),
}


@pytest.mark.parametrize(("text", "args", "needle"), TOO_LATE.values(), ids=TOO_LATE.keys())
def test_refused_before_any_process_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                           args: list[str], needle: str) -> None:
    (tmp_path / "bad.toml").write_text(text, encoding="utf-8")
    code, err = _main(capsys, "run", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "out"), *args)
    assert code == EXIT_USAGE and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("what", ["missing", "a-file", "no-config", "data-missing"])
def test_an_hf_path_that_is_no_checkpoint_is_refused_before_launch(tmp_path: Path, what: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ckpt"
    if what == "a-file":
        path.write_text("{}")
    elif what in ("no-config", "data-missing"):
        path.mkdir()
    if what == "data-missing":
        (path / "config.json").write_text("{}")
    records = tmp_path / ("nonexistent.json" if what == "data-missing" else "alpaca.json")
    if what != "data-missing":
        records.write_text("[]")
    data = {"kind": "alpaca", "batch_size": 2, "path": str(records), "tokenizer": str(tmp_path)}
    (tmp_path / "bad.toml").write_text(_doc(model={"kind": "hf", "path": str(path)}, data=data), encoding="utf-8")
    code, err = _main(capsys, "run", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "out"))
    needle = "'data.path'" if what == "data-missing" else "'model.path'"
    assert code == EXIT_USAGE and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_fifo_or_a_device_as_scenario_is_refused_without_hanging(tmp_path: Path, kind: str) -> None:
    path = "/dev/zero" if kind == "dev-zero" else str(tmp_path / "s.toml")
    if kind == "fifo":
        os.mkfifo(path)
    proc = subprocess.run([sys.executable, "-m", "testbed", "run", path], capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_USAGE and proc.stderr.count("\n") == 1, proc.stderr
    assert "not a regular file" in proc.stderr and "Traceback" not in proc.stderr


# ---- 6. unclear messages -------------------------------------------------------------------------

def test_unicode_labels_name_their_levels_and_a_label_wins_over_an_index(tmp_path: Path) -> None:
    from testbed.engine.sweep import load_levels
    from testbed.scenario.sweep import select_levels

    _, levels = load_levels(sweep_file(tmp_path / "a.toml", labels=["α", "β"]))
    assert [lv.run_dir for lv in levels] == ["level-00", "level-01"]
    _, levels = load_levels(sweep_file(tmp_path / "b.toml", labels=["1", "0"]))
    assert [lv.label for lv in select_levels(levels, ["1"], "f")] == ["1"]  # not both
    assert [lv.index for lv in select_levels(levels, ["0,1"], "f")] == [0, 1]

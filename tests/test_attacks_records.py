"""Issue 23, hostile record files and outputs that cannot be written (docs/reliability.md, "Attacked
again"): every reader validates (one line naming the file and the field, exit 2), every writer
fails whole (no 0-byte file, one line), the terminal gets no control sequence, a closed stdout does
not change the exit status. No rank starts here."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from testbed import cli
from testbed.cli import report as report_cli
from testbed.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from testbed.engine import runner
from testbed.record.files import RecordWarning
from testbed.report.html import load_inputs
from tests.attack_fixtures import fake_launch, row, run_record, scenario_file, sweep_file


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = cli.main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err), err
    return code, err


def _tables_only(paths: list[Path], out: Path) -> dict[str, Any]:
    """The report's real readers without drawing (matplotlib is the slow part)."""
    load_inputs(paths)
    return {"sweeps": [], "runs": [], "figures": []}


DEEP = "[" * 200_000 + "]" * 200_000
RUN_JSON: dict[str, tuple[bytes, str]] = {  # run.json content → what the one line must say
    "garbage": (b"\x00garbage{", "not valid JSON"),
    "a-list": (b"[1, 2]", "field '<top>': expected a JSON object"),
    "200k-deep": (DEEP.encode(), "nested more than"),
    "not-utf8": (b'{"status": "ok", "x": "\xff\xfe"}', "not UTF-8"),
    "scenario-a-string": (b'{"status": "ok", "scenario": "x"}', "field 'scenario': expected a JSON object"),
    "status-a-number": (b'{"status": 3}', "field 'status'"),
    "verdict-a-list": (b'{"status": "ok", "verdict": [1]}', "field 'verdict'"),
}


@pytest.mark.parametrize(("content", "needle"), RUN_JSON.values(), ids=RUN_JSON.keys())
def test_report_on_a_hostile_run_json_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes,
                                                   needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(report_cli, "write_report", _tables_only)
    run_record(tmp_path / "D")
    (tmp_path / "D" / "run.json").write_bytes(content)
    code, err = _main(capsys, "report", str(tmp_path / "D"))
    assert code == EXIT_USAGE and len(err) == 1 and needle in err[0] and "run.json" in err[0], err


BAD_ROWS: dict[str, tuple[dict[str, Any], str]] = {  # a row → the field its warning names
    "string-for-a-number": (row(1, loss_cv="abc"), "'loss_cv'"),
    "string-in-a-rank-list": (row(1, loss=["a", 1.0]), "'loss'"),
    "ragged-pairwise": (row(1, pairwise_cos=[[1.0, 0.5], [0.5]]), "'pairwise_cos'"),
    "pairwise-wrong-size": (row(1, pairwise_cos=[[1.0]]), "'pairwise_cos'"),
    "flags-a-string": (row(1, flags="nan"), "'flags'"),
    "flag-rank-out-of-range": (row(1, flags=[{"rank": 9, "kind": "zero_grad"}]), "'flags[0]'"),
    "step-null": ({**row(1), "step": None}, "'step'"),
    "lists-of-different-length": (row(1, grad_norm=[1.0, 2.0, 3.0]), "'grad_norm'"),
    "huge-number": (row(1, loss_cv=10**400), "'loss_cv'"),
    "nan": (row(1, loss_cv=float("nan")), "'loss_cv'"),
}


@pytest.mark.parametrize(("bad", "field"), BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_a_malformed_row_is_skipped_with_a_warning_naming_the_line_and_field(
        tmp_path: Path, bad: dict[str, Any], field: str, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = run_record(tmp_path / "D", rows=3)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines[1] = json.dumps(bad)
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    code, err = _main(capsys, "report", str(run_dir), "--out", str(tmp_path / "rep"))
    assert code == EXIT_OK, err
    assert any("skipped 1 of 3 line(s): line 2 (field " + field in line for line in err), err
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["runs"][0]["summary"]["steps_recorded"] == 2


@pytest.mark.parametrize("kind", ["directory", "fifo", "dev-zero"])
def test_metrics_that_are_no_regular_file_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(report_cli, "write_report", _tables_only)
    run_dir = run_record(tmp_path / "D")
    (run_dir / "metrics.jsonl").unlink()
    {"directory": lambda p: p.mkdir(), "fifo": os.mkfifo,
     "dev-zero": lambda p: p.symlink_to("/dev/zero")}[kind](run_dir / "metrics.jsonl")
    code, err = _main(capsys, "report", str(run_dir))
    assert code == EXIT_USAGE and len(err) == 1 and "metrics.jsonl: cannot be read" in err[0], err


def test_a_sweep_json_cannot_send_the_report_outside_the_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(report_cli, "write_report", _tables_only)
    run_record(tmp_path / "outside")
    (tmp_path / "S").mkdir()
    (tmp_path / "S" / "sweep.json").write_text(json.dumps({"scenario": "x", "parameter": "p", "levels": [
        {"index": 0, "label": "a", "run_dir": "../outside", "status": "ok"}]}))
    code, err = _main(capsys, "report", str(tmp_path / "S"))
    assert code == EXIT_USAGE and "field 'levels[0].run_dir': expected a directory name inside" in err[0], err


@pytest.mark.timeout(120)
def test_names_matplotlib_would_read_as_math_are_drawn_as_text(tmp_path: Path, fake: None,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "S"
    assert cli.main(["sweep", str(sweep_file(tmp_path / "s.toml", name="a$^$b", labels=["$x^$", "_{"])),
                     "--out", str(out)]) == EXIT_OK
    code, err = _main(capsys, "report", str(out), "--out", str(tmp_path / "rep"))
    assert code == EXIT_OK, err
    assert len(json.loads((tmp_path / "rep" / "report.json").read_text())["figures"]) == 3


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "launch", fake_launch)


# ---- baselines, sweep records, report outputs -----------------------------------------------------

BASELINES: dict[str, tuple[str, str]] = {
    "400-digit-number": ('{"format": "testbed-baseline/1", "scenarios": {"tiny": {"values": {"loss_cv.mean": 1'
                         + "0" * 400 + "}}}}", "scenarios.tiny.values.loss_cv.mean"),
    "200k-nesting": (DEEP, "nested more than"),
    "abs-infinity": ('{"format": "testbed-baseline/1", "tolerances": {"loss_cv": {"abs": Infinity}}, "scenarios": {}}',
                     "tolerances.loss_cv"),
    "rel-nan": ('{"format": "testbed-baseline/1", "scenarios": {"tiny": {"values": {}, "tolerances": '
                '{"x": {"rel": NaN}}}}}', "scenarios.tiny.tolerances.x"),
    "not-utf8": ('{"format": "\udcff"}', "not UTF-8"),
}


@pytest.mark.parametrize(("text", "needle"), BASELINES.values(), ids=BASELINES.keys())
def test_a_hostile_baseline_is_refused_before_anything_runs(tmp_path: Path, text: str, needle: str, fake: None,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "b.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    code, err = _main(capsys, "gate", str(scenario_file(tmp_path / "s.toml")), "--baseline", str(tmp_path / "b.json"),
                      "--out", str(tmp_path / "g"))
    assert code == EXIT_USAGE and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("option", ["--junit", "--markdown"])
def test_an_unwritable_report_file_is_refused_before_the_gate_runs(tmp_path: Path, option: str, fake: None,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _main(capsys, "gate", str(scenario_file(tmp_path / "s.toml")), "--baseline", str(tmp_path / "b.json"),
                      "--update-baseline", option, "/proc/testbed/x.xml", "--out", str(tmp_path / "g"))
    assert code == EXIT_USAGE and err == [f"testbed gate: {option} /proc/testbed/x.xml: cannot be written "
                                          "(No such file or directory)"], err
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("content", ["garbage{", "[]", '{"scenario": "tiny", "levels": "x"}'])
def test_resuming_a_sweep_with_a_hostile_sweep_json_is_one_line(tmp_path: Path, content: str, fake: None,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "S").mkdir()
    (tmp_path / "S" / "sweep.json").write_text(content)
    code, err = _main(capsys, "sweep", str(sweep_file(tmp_path / "s.toml")), "--out", str(tmp_path / "S"))
    assert code == EXIT_USAGE and len(err) == 1 and "holds an earlier sweep with an unreadable sweep.json" in err[0]
    assert (tmp_path / "S" / "sweep.json").read_text() == content


def _full_disk(monkeypatch: pytest.MonkeyPatch, name_part: str) -> None:
    from testbed.record import safeio

    real = safeio._write_all

    def write(fd: int, data: bytes, name: str) -> None:
        if name_part in name:
            os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data, name)

    monkeypatch.setattr(safeio, "_write_all", write)


def test_a_full_disk_during_a_sweep_is_one_line_and_keeps_the_levels(tmp_path: Path, fake: None,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "S"
    assert cli.main(["sweep", str(sweep_file(tmp_path / "s.toml")), "--out", str(out), "--levels", "0"]) == EXIT_OK
    capsys.readouterr()
    before = (out / "sweep.json").read_bytes()
    _full_disk(monkeypatch, "sweep.json")
    code, err = _main(capsys, "sweep", str(sweep_file(tmp_path / "s.toml")), "--out", str(out))
    assert code == EXIT_FAILED and err[-1].startswith("testbed sweep: cannot write the sweep record (No space left"), err
    assert (out / "sweep.json").read_bytes() == before  # the old record, whole; no temp file left
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []
    assert json.loads((out / "level-00-none" / "run.json").read_text())["status"] == "ok"


def test_a_full_disk_during_the_report_leaves_no_empty_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = run_record(tmp_path / "D", rows=4)
    _full_disk(monkeypatch, ".png")
    code, err = _main(capsys, "report", str(run_dir), "--out", str(tmp_path / "rep"))
    assert code == EXIT_FAILED and len(err) == 1 and "No space left on device" in err[0], err
    assert not list((tmp_path / "rep").glob("*.png*"))


def test_a_full_disk_at_the_final_run_json_never_leaves_it_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from testbed.engine.finalize import finish_record, start_record
    from testbed.scenario.spec import parse_scenario
    from tests.helpers import TINY

    run = start_record(parse_scenario(TINY), tmp_path, "gloo", "spawn")
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row(0)) + "\n")
    _full_disk(monkeypatch, "run.json")  # the atomic copy fails: the in-place fallback must fit the old bytes
    finish_record(tmp_path, run, runner.RunResult("failed", "rank 0 failed: disk full"))
    final = json.loads((tmp_path / "run.json").read_text())
    assert (final["status"], final["steps_kept"]) == ("failed", 1)


# ---- terminal output ------------------------------------------------------------------------------

def test_control_sequences_in_a_description_never_reach_the_terminal(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    scenario_file(tmp_path / "cat" / "x.toml", description="\x1b]0;owned\x07\x1b[2Jclean\u202eevil\r")
    assert cli.main(["list", str(tmp_path / "cat")]) == EXIT_OK
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out and "\r" not in out
    assert "\\x1b]0;owned\\x07\\x1b[2Jclean\\u202eevil" in out


def test_the_progress_bar_keeps_its_own_cursor_control_behind_the_safe_stream() -> None:
    import io

    from testbed.cli.terminal import SafeStream
    from testbed.engine.progress import ProgressDisplay, Snapshot

    sink = io.StringIO()
    stream = SafeStream(sink)
    display = ProgressDisplay(10, stream=stream, tty=True, label="level 1/2 'a'")
    display.update(Snapshot(steps_done=3))
    display.close()
    stream.write("reason: \x1b[31mred\n")
    assert "\r" in sink.getvalue() and "3/10" in sink.getvalue()  # the bar redraws in place
    assert "\x1b[31m" not in sink.getvalue() and "\\x1b[31mred" in sink.getvalue()  # user text escaped


@pytest.mark.parametrize("sink", ["dev-full", "closed-pipe"])
def test_an_output_that_cannot_be_written_does_not_change_the_exit_status(tmp_path: Path, sink: str) -> None:
    for i in range(300):  # more than a pipe buffer of output
        scenario_file(tmp_path / "cat" / f"s{i:03d}.toml", name=f"s{i}")
    cmd = [sys.executable, "-m", "testbed", "list", str(tmp_path / "cat")]
    if sink == "dev-full":
        with open("/dev/full", "w") as full:
            proc = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
        assert proc.stderr == "testbed: could not write the output (No space left on device)\n"
    else:
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline()  # `| head -1`
        child.stdout.close()
        proc = subprocess.CompletedProcess(cmd, child.wait(timeout=120), "", child.stderr.read())  # type: ignore[union-attr]
        assert proc.stderr == ""
    assert proc.returncode == EXIT_OK


def test_readers_warn_once_per_file_and_never_hold_a_long_line(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from testbed.record import files

    monkeypatch.setattr(files, "MAX_LINE_BYTES", 4096)  # 64 MiB in use: the same code path, smaller
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(json.dumps(row(0)).encode() + b"\n" + b"x" * (files.MAX_LINE_BYTES + 10) + b"\n"
                     + json.dumps(row(2)).encode() + b"\n")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert [r["step"] for r in files.iter_metrics(tmp_path)] == [0, 2]
    assert [str(w.message) for w in seen if issubclass(w.category, RecordWarning)] == [
        f"{path}: skipped 1 of 3 line(s): line 2 (longer than {files.MAX_LINE_BYTES} bytes)"]


# ---- 5. the report streams: bounded rows for the figures and the verdict, exact summary ----------

def test_a_long_record_is_drawn_from_buckets_and_judged_from_a_bounded_sample(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The 10⁶-row path at a small scale (the limits shrunk: the same code): the summary stays
    exact, at most PLOT_POINTS rows are drawn, the verdict sees a bounded systematic sample plus
    every flagged row. The full size: benchmarks/report_scale.py (docs/reliability.md)."""
    import random

    from benchmarks.report_scale import _row, write_run
    from testbed.record import digest as digest_module
    from testbed.record import sample as sample_module
    from testbed.report.load import load_run

    monkeypatch.setattr(digest_module, "PLOT_POINTS", 50)
    monkeypatch.setattr(sample_module, "VERDICT_CELLS", 400)  # 100 rows at 4 ranks
    monkeypatch.setattr(sample_module, "MIN_VERDICT_ROWS", 10)
    rng, n = random.Random(1), 1000
    rows = [_row(s, 4, rng, s > 600, 100) for s in range(n)]
    rows[777]["flags"] = [{"rank": 3, "kind": "nonfinite_grad"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_run(tmp_path, n, 4, with_verdict=False)
    run = load_run(tmp_path)
    losses = [r["loss_cv"] for r in rows]
    assert run.summary["loss_cv"]["mean"] == pytest.approx(sum(losses) / n, rel=1e-12)
    assert run.summary["loss_cv"]["peak"] == max(losses) and run.summary["steps_recorded"] == n
    assert run.summary["flag_count"] == 1 and run.last_pairwise is not None and run.last_pairwise[0] == 900
    assert len(run.rows) <= 50 and run.rows[0]["bucket_rows"] == 20
    assert run.rows[1]["loss_cv"] == pytest.approx(sum(losses[20:40]) / 20)
    sampled = run.sampling["verdict_input"]
    assert (sampled["every"], sampled["rows"], sampled["notable"], sampled["of"]) == (10, 101, 1, n)  # + row 777
    assert run.verdict["status"] in ("consistent", "inconsistent", "diverged")

"""The drop-in monitor where users already are: every Python snippet of README.md and docs/monitor.md
run as written on 2 gloo ranks under torchrun (tests/ecosystem_scripts.py binds the names a snippet
leaves free), zero-gradient steps included, and checked against what the model itself computed;
the Trainer's logs reaching TensorBoard; a classifier's loss; the Lightning callback; Accelerate."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from testbed.cli.main import main as cli_main
from testbed.engine.proctree import kill_tree
from testbed.record.files import read_jsonl, read_metrics
from tests.doc_snippets import snippets
from tests.scale_fixtures import REPO, _shared

SCRIPT = str(Path(__file__).with_name("ecosystem_scripts.py"))
LAUNCH_TIMEOUT_S = 480  # measured 41-76 s per launch on 2 shared, loaded cores


def _launch(modes: str, tmp_path: Path, **env: str) -> Path:
    """``torchrun --standalone`` (a free rendezvous port) with 2 ranks, bounded; the output directory."""
    out = tmp_path / "out"
    full_env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", SCRIPT, modes,
           str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)  # torchrun and its ranks (each in a session of its own)
        log, _ = proc.communicate(timeout=60)
        pytest.fail(f"torchrun {modes} did not finish in {LAUNCH_TIMEOUT_S} s:\n{log[-6000:]}")
    assert proc.returncode == 0, log[-6000:]
    (out / "torchrun.log").write_text(log)
    return out


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    """The measured rows (not the state check ``close()`` adds after the last step)."""
    return [r for r in read_metrics(run_dir) if not r.get("final_check")]


def _assert_finalized(run_dir: Path, client: str) -> dict[str, Any]:
    """The monitor left a finished run record: run.json ok, with the verdict over every row."""
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "ok" and run["client"] == client and run["world_size"] == 2, run.get("reason")
    assert run["steps_kept"] == len(read_metrics(run_dir)) and run["verdict"]["headline"], run
    assert len(run["ranks"]) == 2 and run["launcher"]["kind"] in ("torchrun", "accelerate")
    return run


def _assert_report_renders(run_dirs: list[Path], out: Path) -> None:
    """``testbed report`` on the records, all at once (same names: told apart by their paths)."""
    assert cli_main(["report", *map(str, run_dirs), "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert len(set(json.loads((out / "report.json").read_text())["runs"][i]["label"]
                   for i in range(len(run_dirs)))) == len(run_dirs)
    assert "verdict" in page.lower()


@pytest.fixture(scope="session")
def loops_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One launch for the plain-loop, FSDP2, Accelerate and Lightning snippets (shared by two tests, once
    per session across xdist workers): a launch costs 40-75 s here, mostly start-up."""
    def make(root: Path) -> str:
        root.mkdir(parents=True, exist_ok=True)
        return str(_launch("plain,fsdp2,accelerate,lightning", root, ACCELERATE_USE_CPU="true"))  # accelerate on CPU

    return Path(_shared(tmp_path_factory, "ecosystem_loops", make))


def _blocks(kind: str) -> list[dict[str, str]]:
    return [b for b in snippets() if b["kind"] == kind]


def _expected(block_dir: Path) -> list[dict[str, Any]]:
    return [json.loads((block_dir / f"expected_rank{r}.json").read_text()) for r in (0, 1)]


def _assert_losses(rows: list[dict[str, Any]], expected: list[dict[str, Any]], rtol: float = 1e-6) -> None:
    """Each row's per-rank loss is the mean of that rank's model losses over the step's forwards."""
    per_step = len(expected[0]["losses"]) // len(rows)
    assert per_step >= 1 and all(len(e["losses"]) == per_step * len(rows) for e in expected)
    for k, row in enumerate(rows):
        want = [float(np.mean(e["losses"][k * per_step:(k + 1) * per_step])) for e in expected]
        np.testing.assert_allclose(row["loss"], want, rtol=rtol, atol=1e-12, err_msg=f"step {row['step']}")


def _scalar_tags(log_dir: Path) -> set[str]:
    """Every scalar tag in the TensorBoard event files under ``log_dir`` (sub-runs included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for run in {p.parent for p in log_dir.rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(run))
        acc.Reload()
        tags |= {f"{run.relative_to(log_dir)}:{t}" if run != log_dir else t for t in acc.Tags()["scalars"]}
    return tags


def test_every_documented_snippet_has_a_harness() -> None:
    found = snippets()
    assert [b["id"] for b in found if b["kind"] == "unknown"] == []
    assert {b["kind"] for b in found} == {"plain", "fsdp2", "accelerate", "trainer", "lightning"}
    assert any(b["doc"] == "README.md" for b in found)


@pytest.mark.timeout(600)
def test_plain_loop_fsdp2_and_accelerate_snippets_run_as_written(loops_run: Path, tmp_path: Path) -> None:
    out = loops_run
    assert _blocks("fsdp2")
    records = []
    for block in _blocks("plain") + _blocks("fsdp2") + _blocks("accelerate"):
        d = out / block["id"]
        records.append(d / "runs" / "mine")
        _assert_finalized(records[-1], "attach")
        rows = _rows(d / "runs" / "mine")
        assert [r["step"] for r in rows] == list(range(len(rows))) and rows, block["id"]
        _assert_losses(rows, _expected(d))
        if len(rows) == 6:  # one forward per step: the first two steps have zero gradients
            assert rows[0]["cos_min"] is None and {"rank": None, "kind": "zero_mean_grad"} in rows[0]["flags"]
            assert rows[1]["cos_to_mean"][1] is None and {"rank": 1, "kind": "zero_grad"} in rows[1]["flags"]
            assert rows[1]["cos_min"] == rows[1]["cos_to_mean"][0]
    tb_block = next(b for b in _blocks("plain") if "tensorboard=" in b["code"])
    mine = out / tb_block["id"] / "runs" / "mine"
    tags = _scalar_tags(mine / "tb")
    assert {"testbed/cos_min", "testbed/global_loss", "testbed/alarm/my_check",
            "testbed_cos_to_mean_rank0:testbed/cos_to_mean", "testbed_cos_to_mean_rank1:testbed/cos_to_mean",
            "testbed_loss_rank1:testbed/loss"} <= tags, sorted(tags)
    alarms = [e for e in read_jsonl(mine / "events.jsonl") if e["event"] == "alarm"]
    assert [(e["kind"], e["step"]) for e in alarms] == [("my_check", 5)]
    _assert_report_renders(records, tmp_path / "report")


@pytest.mark.timeout(600)
def test_trainer_snippet_classifier_loss_global_step_and_tensorboard(tmp_path: Path) -> None:
    """The Trainer snippet with a random BertForSequenceClassification, gradient accumulation 2 and
    ``report_to="tensorboard"``; then a GPT-2 run with another callback making its own forwards."""
    out = _launch("trainer,gpt2", tmp_path)
    (block,) = _blocks("trainer")
    d = out / block["id"]
    rows = _rows(d / "runs" / "mine")
    assert [(r["step"], r["global_step"]) for r in rows] == [(0, 1), (1, 2), (2, 3)]
    assert [("weights_in_sync" in r) for r in rows] == [True, False, True]  # step 0, and the last (max_steps)
    _assert_losses(rows, _expected(d))  # the classifier's own mean loss, not x num_items / shifted count
    _assert_finalized(d / "runs" / "mine", "hf_trainer")
    _assert_report_renders([d / "runs" / "mine"], tmp_path / "report")
    log = (out / "torchrun.log").read_text()
    assert "'train/loss'" in log or "'loss'" in log  # the Trainer's console still prints its own logs ...
    assert "'testbed/" not in log  # ... but not ~16 testbed values per step (logging_steps=1)
    tags = _scalar_tags(d / "trainer" / "runs")
    tags = {t.split(":", 1)[-1] for t in tags}
    assert {"train/testbed/cos_min", "train/testbed/global_loss", "train/testbed/cos_to_mean/rank0",
            "train/testbed/loss/rank1", "train/testbed/grad_norm/rank0", "train/loss"} <= tags, sorted(tags)

    gpt2 = out / "gpt2"
    rows = _rows(gpt2 / "runs")
    assert [r["global_step"] for r in rows] == [1, 2, 3]
    expected = _expected(gpt2)
    assert all(e["rogue_forwards"] == 3 for e in expected)  # the other callback's forwards ran, uncounted
    _assert_losses(rows, expected)  # the token mean over the shifted labels


@pytest.mark.timeout(600)
def test_lightning_callback_snippet(loops_run: Path, tmp_path: Path) -> None:
    out = loops_run
    (block,) = _blocks("lightning")
    d = out / block["id"]
    rows = _rows(d / "runs" / "mine")
    assert [(r["step"], r["global_step"]) for r in rows] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    _assert_finalized(d / "runs" / "mine", "lightning")
    _assert_report_renders([d / "runs" / "mine"], tmp_path / "report")
    _assert_losses(rows, _expected(d), rtol=1e-12)  # accumulate_grad_batches=2: Lightning's /2 undone
    assert all(r["noise_scale"] is not None or r["flags"] for r in rows)
    tags = {t.split(":", 1)[-1] for t in _scalar_tags(d / "lightning_logs")}
    assert {"testbed/cos_min", "testbed/cos_to_mean/rank0", "testbed/cos_to_mean/rank1", "testbed/loss/rank0"} <= tags

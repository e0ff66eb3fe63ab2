"""The bug zoo through the drop-in monitor and the runner (issue 22, Must show): real training scripts
- plain DDP, the Hugging Face Trainer, Lightning (``examples/bugs/``) - each mistake and its healthy
twins, 3 ranks under torchrun with default settings, several per launch; each run.json's verdict
has the right cause and the right ranks (none for a job-wide cause), the exact channels alarm at the
first check after the onset, the healthy twins never alarm. Two of ``scenarios/bugs/`` through the
runner, judged by their own ``[expect]`` tables.

The launches are module-scoped: one torchrun per script runs all of its variants in turn."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.engine.runner import launch
from testbed.gate.checks import RunData, evaluate, verdict_causes
from testbed.scenario.expect import expectations_of
from testbed.scenario.spec import load_scenario
from tests.bugzoo_expected import DDP, HF, LIGHTNING, alarm_mismatch
from tests.scale_fixtures import REPO, torchrun

EXAMPLES = REPO / "examples" / "bugs"

def _zoo(script: str, variants: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp(script.split(".")[0])
    out = tmp / "runs"
    code, log = torchrun([str(EXAMPLES / script), "--bug", ",".join(variants), "--out", str(out)], tmp, nproc=3)
    assert code == 0, log[-6000:]
    return out


@pytest.fixture(scope="module")
def ddp_zoo(tmp_path_factory):
    return _zoo("ddp_train.py", DDP, tmp_path_factory)


@pytest.fixture(scope="module")
def hf_zoo(tmp_path_factory):
    return _zoo("hf_trainer.py", HF, tmp_path_factory)


@pytest.fixture(scope="module")
def lightning_zoo(tmp_path_factory):
    return _zoo("lightning_train.py", LIGHTNING, tmp_path_factory)


def check(out: Path, table: dict) -> None:
    """Every variant's record against the table (all variants checked, all mismatches reported)."""
    wrong = []
    for variant, (status, ranks, causes, alarms) in table.items():
        run = json.loads((out / variant / "run.json").read_text())
        v = run["verdict"]
        got = (run["status"], v["status"], v["ranks"], verdict_causes(v))
        if got != ("ok", status, ranks, causes):
            wrong.append(f"{variant}: {got} - {v['headline']}")
        mismatch = alarm_mismatch(out / variant, alarms)
        if mismatch:
            wrong.append(f"{variant}: {mismatch}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.timeout(300)
def test_plain_ddp_mistakes_are_named_with_their_cause(ddp_zoo):
    check(ddp_zoo, DDP)


@pytest.mark.timeout(300)
def test_hf_trainer_mistakes_are_named_with_their_cause(hf_zoo):
    check(hf_zoo, HF)


@pytest.mark.timeout(300)
def test_lightning_mistakes_are_named_with_their_cause(lightning_zoo):
    check(lightning_zoo, LIGHTNING)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["copies", "sampler_seed"])
def test_scenario_runner_bugs_meet_their_expect_tables(name, tmp_path):
    """Ranks 1-2 reading rank 0's batches of 5 (the issue's case: the statistics blamed ranks 3 and 4)
    and a rank's sampler with another seed, through the runner, judged by their [expect] tables."""
    scenario = load_scenario(REPO / "scenarios" / "bugs" / f"{name}.toml")
    result = launch(scenario, tmp_path)
    assert result.ok, result.reason
    failed = [f.message for f in evaluate(expectations_of(scenario), RunData.load(tmp_path)) if not f.passed]
    assert not failed, failed

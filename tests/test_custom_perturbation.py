"""User-defined perturbations, end to end, from docs/writing-scenarios.md as written:

- the throwaway package on that page (entry point in group ``testbed.perturbations``) is really
  built and installed (pip, no network, into a directory of tmp_path put on PYTHONPATH instead of
  the shared environment), then the page's commands run and the testbed discovers the kind in the
  launcher and in every rank of a real 2-rank run;
- the page's in-repo variant (the ``@PERTURBATIONS.register`` decorator) runs in real ranks too.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.record.files import read_metrics

DOC = Path(__file__).resolve().parents[1] / "docs" / "writing-scenarios.md"
BLOCK = r"<!-- {tag} -->\s*```\w*\n(.*?)```"


def doc_blocks(tag: str) -> list[tuple[str, str]]:
    """``(argument, code)`` of every fenced block preceded by ``<!-- tag: argument -->``."""
    text = DOC.read_text(encoding="utf-8")
    return re.findall(r"<!-- " + tag + r":\s*(\S+) -->\s*```\w*\n(.*?)```", text, flags=re.S)


def doc_commands() -> list[str]:
    (block,) = re.findall(BLOCK.format(tag="run"), DOC.read_text(encoding="utf-8"), flags=re.S)
    return [line for line in block.splitlines() if line.strip()]


def env_with(site: Path | None) -> dict[str, str]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PYTHONPATH", None)
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return env


def sh(command: str, cwd: Path, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(420)
def test_doc_example_package_is_discovered_and_runs(tmp_path: Path) -> None:
    files = doc_blocks("file")
    assert {name for name, _ in files} == {"testbed-unnormalized/pyproject.toml",
                                           "testbed-unnormalized/testbed_unnormalized.py", "unnormalized_inputs.toml"}
    for name, code in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(code, encoding="utf-8")
    site = tmp_path / "site"

    unknown = sh("testbed run unnormalized_inputs.toml", tmp_path, env_with(None))
    assert unknown.returncode == 2 and "field 'perturbations[0].kind'" in unknown.stderr

    for command in doc_commands():
        if command.startswith("pip install"):  # into tmp_path, not the shared environment, no network
            args = shlex.split(command)[2:]
            command = shlex.join([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                                  "--no-build-isolation", "--no-index", "--target", str(site), *args])
        done = sh(command, tmp_path, env_with(site))
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    assert list(site.glob("testbed_unnormalized-*.dist-info/entry_points.txt"))

    run = json.loads((tmp_path / "runs" / "unnormalized" / "run.json").read_text())
    assert run["status"] == "ok" and run["scenario"]["perturbations"][0]["kind"] == "unnormalized_inputs"
    assert run["scenario"]["perturbations"][0]["params"] == {"scale": 4.0}

    def mean_grad_cv(run_dir: str) -> float:
        rows = read_metrics(tmp_path / "runs" / run_dir)
        return sum(r["grad_norm_cv"] for r in rows) / len(rows)

    assert mean_grad_cv("unnormalized") > 0.2 > 2 * mean_grad_cv("control")  # the kind really ran, on rank 1
    baseline = json.loads((tmp_path / "unnormalized-baseline.json").read_text())
    assert baseline["scenarios"]["unnormalized_inputs"]["values"]["weights_in_sync"] is True
    junit = (tmp_path / "runs" / "gate.xml").read_text()
    assert 'name="unnormalized_inputs"' in junit and "<failure" not in junit


@pytest.mark.timeout(300)
def test_doc_in_repo_decorator_registers_in_real_ranks(tmp_path: Path) -> None:
    """The decorated module from the page, at the top level of a script the ranks re-import."""
    (module_path, code), = doc_blocks("in-repo")
    assert module_path == "testbed/perturb/unnormalized.py" and '@PERTURBATIONS.register("unnormalized_inputs")' in code
    (scenario_name, scenario), = [(n, c) for n, c in doc_blocks("file") if n.endswith(".toml") and "[expect]" in c]
    (tmp_path / scenario_name).write_text(scenario, encoding="utf-8")
    script = tmp_path / "in_repo_demo.py"
    script.write_text(code + '''

if __name__ == "__main__":
    import json
    from pathlib import Path

    from testbed.scenario.expect import expectations_of
    from testbed.gate.checks import RunData, evaluate
    from testbed.engine.runner import launch
    from testbed.scenario.spec import load_scenario

    scenario = load_scenario("unnormalized_inputs.toml")
    launch(scenario, Path("out"))
    findings = evaluate(expectations_of(scenario), RunData.load(Path("out")))
    print(json.dumps({f.check: f.passed for f in findings}))
''', encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env_with(None), capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    checks = json.loads(done.stdout.strip().splitlines()[-1])
    assert checks == {"min_grad_norm_cv": True, "max_cos_mean": True, "no_nonfinite": True, "weights_in_sync": True}

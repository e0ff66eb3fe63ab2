"""The scenario catalog in every install (issue 18): a wheel in a fresh venv lists and runs it by name
from an empty directory; names resolve with the user's own files first."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from testbed.cli import main as cli_main
from testbed.scenario import catalog
from testbed.scenario.errors import ScenarioError

REPO = Path(__file__).resolve().parents[1]
SOURCE_IGNORE = shutil.ignore_patterns(".git", ".venv", ".ci-venv", "runs", "build", "dist", "*.egg-info",
                                       "__pycache__", ".pytest_cache", ".hypothesis")


def _catalog_names() -> set[str]:
    source = REPO / "scenarios"
    return {catalog.catalog_name(p, source) for p in catalog.scenario_files(source)}


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project built as a wheel (from a copy of the tree: the build writes build/ beside the
    sources) and installed without dependencies into a fresh venv that borrows this interpreter's
    site-packages for torch & co through a .pth line — never this checkout's testbed."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    shutil.copytree(REPO, source, ignore=SOURCE_IGNORE)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                           str(source), "-w", str(root / "dist")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True, timeout=60).stdout.strip())
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next((root / "dist").glob("testbed-*.whl"))
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                           "--quiet", "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return venv


def _in_empty_dir(venv: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([str(venv / "bin" / "testbed"), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)


def test_wheel_lists_the_whole_catalog_and_runs_a_scenario_by_name(wheel_venv: Path, tmp_path: Path) -> None:
    listed = _in_empty_dir(wheel_venv, tmp_path, "list")
    assert listed.returncode == 0, listed.stderr
    names = {line.split()[0] for line in listed.stdout.splitlines() if line and not line.startswith("#")}
    assert names == _catalog_names()
    assert "INVALID" not in listed.stdout
    done = _in_empty_dir(wheel_venv, tmp_path, "run", "seed_ladder", "--steps", "2", "--out", "ladder",
                         "--no-progress")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    run = json.loads((tmp_path / "ladder" / "run.json").read_text())
    assert run["status"] == "ok" and run["scenario"]["name"] == "seed_ladder"
    assert str(wheel_venv) in run["environment"]["argv"][0]  # the wheel's console script ran, not this checkout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ladder"]  # nothing written beside --out


def test_names_resolve_local_files_first_then_the_shipped_catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    shipped = catalog.shipped_dir()
    assert shipped is not None and catalog.resolve("faults/crash") == shipped / "faults" / "crash.toml"
    assert catalog.resolve("fault_crash") == shipped / "faults" / "crash.toml"  # by the file's name field
    assert catalog.resolve("openpangu-control") == shipped / "openpangu" / "control.toml"
    (tmp_path / "scenarios").mkdir()
    mine = tmp_path / "scenarios" / "control.toml"
    mine.write_text((REPO / "scenarios" / "control_4rank.toml").read_text())
    assert catalog.resolve("control") == Path("scenarios") / "control.toml"  # the user's own file wins
    assert catalog.resolve("straggler") == shipped / "straggler.toml"
    with pytest.raises(ScenarioError, match="did you mean seed_ladder"):
        catalog.resolve("seed_ladre")


def test_list_without_a_folder_shows_local_and_shipped_with_shadowing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scenarios").mkdir()
    (tmp_path / "scenarios" / "control.toml").write_text((REPO / "scenarios" / "control_4rank.toml").read_text())
    assert cli_main(["list"]) == 0
    out = capsys.readouterr().out
    assert "# scenarios\n" in out and "(shipped with testbed)" in out
    shipped_part = out.split("(shipped with testbed)\n", 1)[1]
    shipped_control = [line for line in shipped_part.splitlines() if line.split()[0] == "control"]
    assert len(shipped_control) == 1 and shipped_control[0].endswith("(shadowed by ./scenarios)")
    local_part = out.split("(shipped with testbed)\n", 1)[0]
    assert "shadowed" not in local_part


def test_catalog_names_are_unambiguous() -> None:
    """A file's ``name`` field is unique, and never another file's catalog path name (which wins)."""
    source = REPO / "scenarios"
    files = catalog.scenario_files(source)
    declared = {p: catalog._declared_name(p) for p in files}
    assert len(set(declared.values())) == len(files), "two catalog files declare the same name"
    for path, name in declared.items():
        others = {catalog.catalog_name(p, source) for p in files if p != path}
        assert name not in others, f"{path}: name {name!r} is another file's catalog name"

"""pytest plugin: scenario files as test items, checked against their ``[expect]`` tables.

Opt-in, so a project's ordinary ``pytest`` never runs scenarios by accident::

    pytest scenarios/ --testbed                       # every scenario file under scenarios/
    pytest scenarios/ --testbed -n 2 -m testbed       # in parallel (pytest-xdist); the marker selects them
    pytest scenarios/ --testbed --testbed-baseline baselines/catalog.json   # also compare with a baseline

A ``*.toml`` file is collected when it parses to a table with ``world_size`` and ``model`` (or does
not parse at all: a broken scenario file is a failing test, not a silently skipped one); one whose
``device`` is not present here (an NPU scenario on a CPU machine) is skipped with the reason. Each item
runs its scenario for real into pytest's temporary directory — exactly what ``testbed gate`` does
for one scenario — and fails with the gate's table of what failed, where and by how much.
Registered through the ``pytest11`` entry point; importing it costs nothing (no torch).
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest

MARKER = "testbed"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("testbed", "testbed scenario files")
    group.addoption("--testbed", action="store_true", default=False,
                    help="collect testbed scenario *.toml files as tests and check their [expect] tables")
    group.addoption("--testbed-baseline", metavar="FILE", default=None,
                    help="also compare each scenario with this `testbed gate` baseline JSON")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: a testbed scenario file run as a test (--testbed)")


def _read(path: Path) -> str:
    """A regular file only (a FIFO named x.toml must not block collection), bounded in size."""
    from testbed.scenario.readers import MAX_FILE_BYTES
    from testbed.schema.jsonfile import read_document

    return read_document(path, MAX_FILE_BYTES).decode("utf-8")


def looks_like_scenario(path: Path) -> bool:
    try:
        raw = tomllib.loads(_read(path))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return True  # broken: collect it so that the error is reported
    except OSError:
        return False
    return "world_size" in raw and "model" in raw


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix == ".toml" and parent.config.getoption("testbed") and looks_like_scenario(file_path):
        return ScenarioFile.from_parent(parent, path=file_path)
    return None


class ScenarioFile(pytest.File):
    """One scenario file → one item named after the scenario."""

    def collect(self) -> Iterator[pytest.Item]:
        try:
            name = tomllib.loads(_read(self.path)).get("name")
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError):
            name = None
        yield ScenarioItem.from_parent(self, name=name if isinstance(name, str) and name.strip() else self.path.stem)


class ScenarioCheckFailed(Exception):
    """The scenario ran (or could not be read) and some expectation failed; the text says which."""


class ScenarioItem(pytest.Item):
    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_marker(MARKER)

    def runtest(self) -> None:
        from testbed.gate import baseline as baselines
        from testbed.engine.device import DeviceError, resolve_device_type
        from testbed.gate.gate import gate, slug
        from testbed.gate.outputs import text
        from testbed.record.files import RunDirError
        from testbed.scenario.spec import ScenarioError, load_scenario

        try:
            scenario = load_scenario(self.path)
            try:
                resolve_device_type(scenario.device)
            except DeviceError as e:
                pytest.skip(f"scenario {scenario.name}: {e}")
            option = self.config.getoption("testbed_baseline")
            data = baselines.load(Path(option)) if option else None
            out = self.config._tmp_path_factory.mktemp(slug(scenario.name), numbered=True)
            outcome = gate([scenario], out, data, log=lambda line: None)[0]
        except (ScenarioError, baselines.BaselineError, RunDirError) as e:
            raise ScenarioCheckFailed(str(e)) from None
        if not outcome.passed:
            raise ScenarioCheckFailed(text([outcome]))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, ScenarioCheckFailed):
            from testbed.schema.records import printable

            text = "\n".join(printable(line) for line in str(excinfo.value).splitlines())  # no terminal control
            return f"scenario {printable(self.name)} ({self.path}):\n{text}"
        return super().repr_failure(excinfo, style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"scenario {self.name}"

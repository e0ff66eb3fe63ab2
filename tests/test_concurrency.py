"""Runs at the same time never clash: each gets its own store port (TCPStore on port 0) and its
own run directory (atomic mkdir), and run.json is replaced atomically, so a reader polling it
while a run writes never sees a torn file."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from testbed import cli
from testbed.cli.common import EXIT_OK
from testbed.record.files import RUN_FILE, default_run_dir, read_metrics, write_json_atomic
from tests.test_scenario_fuzz import toml_document
from tests.helpers import tiny
from tests.test_faults import ChildWatcher, assert_no_survivors


class JsonPoller:
    """Reads every ``run.json`` under a directory as fast as it can, keeping what it saw."""

    def __init__(self, root: Path):
        self.root = root
        self.reads = 0
        self.statuses: set[str] = set()
        self.torn: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            for path in self.root.rglob(RUN_FILE):
                try:
                    text = path.read_text(encoding="utf-8")
                except FileNotFoundError:
                    continue
                try:
                    self.statuses.add(json.loads(text)["status"])
                except (ValueError, KeyError) as e:
                    self.torn.append(f"{path}: {e}: {text[:80]!r}")
                self.reads += 1

    def __enter__(self) -> "JsonPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def test_default_run_dir_is_unique_under_contention(tmp_path: Path) -> None:
    threads, calls = 8, 16
    start = threading.Barrier(threads)
    made: list[Path] = []
    lock = threading.Lock()

    def work() -> None:
        start.wait()
        for _ in range(calls):
            d = default_run_dir("same-name", root=tmp_path)
            with lock:
                made.append(d)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert len(made) == threads * calls == len(set(made))
    assert all(d.is_dir() and not any(d.iterdir()) for d in made)


def test_write_json_atomic_is_never_seen_torn(tmp_path: Path) -> None:
    path = tmp_path / RUN_FILE
    payloads = [{"status": s, "blob": [s] * 20000} for s in ("running", "ok")]  # ~200 kB each
    write_json_atomic(path, payloads[0])
    with JsonPoller(tmp_path) as poller:
        for i in range(200):
            write_json_atomic(path, payloads[i % 2])
        time.sleep(0.05)
    assert poller.torn == [] and poller.reads > 0 and poller.statuses == {"running", "ok"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [RUN_FILE]  # no temp file left


@pytest.mark.timeout(180)
def test_two_runs_at_once_get_their_own_ports_and_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(toml_document(tiny(steps=4, stall_timeout_s=30.0)), encoding="utf-8")
    ports: list[int] = []
    real_store = dist.TCPStore

    def recording_store(*args: Any, **kwargs: Any) -> Any:
        store = real_store(*args, **kwargs)
        ports.append(store.port)
        return store

    monkeypatch.setattr(dist, "TCPStore", recording_store)  # the launcher's (parent-side) store
    monkeypatch.chdir(tmp_path)  # default run dirs go to ./runs, both named after the scenario
    codes: list[int] = []
    start = threading.Barrier(2)

    def one_run() -> None:
        start.wait()
        codes.append(cli.main(["run", str(scenario)]))

    with ChildWatcher() as watch, JsonPoller(tmp_path / "runs") as poller:
        pool = [threading.Thread(target=one_run) for _ in range(2)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    capsys.readouterr()
    assert codes == [EXIT_OK, EXIT_OK]
    assert len(ports) == 2 and ports[0] != ports[1] and 0 not in ports
    run_dirs = sorted((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 2
    for d in run_dirs:
        assert json.loads((d / RUN_FILE).read_text())["status"] == "ok"
        assert [r["step"] for r in read_metrics(d)] == [0, 1, 2, 3]  # no rows from the other run
    assert poller.torn == [] and poller.reads > 0 and "running" in poller.statuses
    assert_no_survivors(watch, 4)

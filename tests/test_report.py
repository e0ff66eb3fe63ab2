"""``testbed report``: PNGs and one self-contained HTML page from real tiny runs and a sweep dir."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from testbed.report import figures
from testbed.cli import main
from testbed.report.html import SweepData, level_axis

from tests.helpers import run, tiny

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sweep.json (levels deliberately out of order, one never run) over two real tiny runs."""
    root = tmp_path_factory.mktemp("sweep")
    levels = [(1, "1", [1], "level-01-1", [{"kind": "seed_desync", "ranks": [1]}]),
              (0, "none", [], "level-00-none", [])]
    for index, label, value, run_dir, perturbations in levels:
        raw = tiny(steps=6, model={"kind": "mlp", "hidden": 16, "depth": 1, "dropout": 0.3},
                   metrics={"pairwise_every": 2}, perturbations=perturbations)
        result, rows, _ = run(raw, root / run_dir)
        assert result.ok and len(rows) == 6
    entries = [{"index": i, "label": lab, "value": v, "run_dir": d, "status": "ok"} for i, lab, v, d, _ in levels]
    entries.append({"index": 2, "label": "0-1", "value": [0, 1], "run_dir": "level-02-0-1", "status": "failed"})
    (root / "sweep.json").write_text(json.dumps({"scenario": "tiny_ladder", "source": "<test>",
                                                 "parameter": "perturbations.0.ranks", "levels": entries}))
    return root


@pytest.mark.timeout(240)
def test_report_writes_pngs_and_self_contained_html(sweep_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(sweep_dir), str(sweep_dir / "level-01-1"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("level"):].splitlines()
    assert table[1].startswith("none") and table[2].startswith("1 ")  # levels in index order
    record = json.loads((out / "report.json").read_text())
    assert [lv["label"] for lv in record["sweeps"][0]["levels"]] == ["none", "1"]
    assert record["sweeps"][0]["missing"] == ["0-1 (failed)"]
    expected = {"tiny_ladder_rank_losses.png", "tiny_ladder_dispersion_vs_step.png",
                "tiny_ladder_dispersion_vs_level.png", "tiny_ladder_pairwise.png",
                "runs_rank_losses.png", "runs_dispersion_vs_step.png", "runs_pairwise.png"}
    assert set(record["figures"]) == expected
    for name in expected:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
    page = (out / "index.html").read_text()
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(sources) == len(expected) and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "weights in sync" in page and "outlier:" in page and "levels without a record: 0-1 (failed)" in page
    level_none = next(lv for lv in record["sweeps"][0]["levels"] if lv["label"] == "none")
    assert level_none["loss_cv"] is not None and 0 < level_none["cos_mean"] <= 1


def test_report_rejects_a_directory_without_records(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a run directory" in capsys.readouterr().err


def test_rank_list_levels_are_placed_by_rank_count():
    runs = [type("R", (), {"label": lab, "level": {"index": i, "value": v}})()
            for i, (lab, v) in enumerate([("none", []), ("3", [3]), ("2-3", [2, 3]), ("0-1-2-3", [0, 1, 2, 3])])]
    sweep = SweepData(Path("."), "s", "perturbations.0.ranks", "", runs=runs)  # type: ignore[arg-type]
    positions, ticks, xlabel = level_axis(sweep)
    assert positions == [0.0, 1.0, 2.0, 4.0] and ticks[3] == "4\n(0-1-2-3)" and "number of ranks" in xlabel


@pytest.mark.parametrize("values, scale", [([1e-4, 1e-2, 0.5], "log"), ([0.4, 0.6, 0.9], "linear"),
                                           ([0.0, 1e-3, 1.0], "log")])
def test_axis_goes_logarithmic_when_values_span_decades(values, scale):
    ax = Figure().subplots()
    figures._maybe_log(ax, np.asarray(values), "loss CV")
    assert ax.get_yscale() == scale
    notes = " ".join(t.get_text() for t in ax.texts)
    assert ("values ≤ 0 not drawn" in notes) == (0.0 in values)

"""``testbed report`` as a user sees it: one real short run (label noise on rank 3 of 4) and one tiny
real sweep (a 3-level seed ladder on replicated batches, 4 ranks), reported once and then checked
as files, as matplotlib drew them (every text inside its figure) and in a real headless browser
(the page's own layout, and a screenshot compared with it). Pure checks of the parts (every kind
of evidence, the ladder's numbers, a long record) need no run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.figure import Figure

from testbed.cli import main
from testbed.report import plotting
from testbed.report.deviations import deviation_maps
from testbed.report.explain import explanation, findings
from testbed.report.html import SweepData, level_axis, write_report
from testbed.report.ladder import ladder_of
from testbed.report.load import load_run, load_sweep
from testbed.report.sections import level_table, run_card

from tests.browser import image_problems, measure, screenshot
from tests.helpers import run, tiny
from tests.scale_fixtures import _shared
from tests.scenario_files import to_toml

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WIDTH = 1300  # the browser window: the page's max width


def _make(root: Path) -> dict[str, Any]:
    """The real records and their report (once per session, shared by xdist workers)."""
    raw = tiny(name="label_noise_tiny", world_size=4, steps=20,
               model={"kind": "mlp", "hidden": 32, "depth": 1, "dropout": 0.0},
               data={"kind": "synthetic", "batch_size": 32, "size": 2048, "features": 16, "classes": 8},
               optim={"kind": "adamw", "lr": 0.003}, metrics={"weight_check_every": 4, "pairwise_every": 4},
               perturbations=[{"kind": "label_noise", "ranks": [3], "fraction": 1.0}])
    result, _, _ = run(raw, root / "run")
    assert result.ok, result.reason
    ladder = tiny(name="tiny_ladder", world_size=4, steps=6,
                  model={"kind": "mlp", "hidden": 16, "depth": 1, "dropout": 0.3},
                  metrics={"pairwise_every": 2, "weight_check_every": 2},
                  perturbations=[{"kind": "replicate_batch", "ranks": "all"}, {"kind": "seed_desync", "ranks": []}])
    ladder["sweep"] = {"parameter": "perturbations.1.ranks", "values": [[], [3], [2, 3]], "labels": ["none", "3", "2-3"]}
    (root / "ladder.toml").write_text(to_toml(ladder))
    assert main(["sweep", str(root / "ladder.toml"), "--out", str(root / "sweep"), "--no-progress"]) == 0
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", plotting.LayoutWarning)
        record = write_report([root / "sweep", root / "run"], root / "report")
    return {"root": str(root), "record": record,
            "layout": [str(w.message) for w in seen if issubclass(w.category, plotting.LayoutWarning)]}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    shared = _shared(tmp_path_factory, "report_inputs", _make)
    return {**shared, "root": Path(shared["root"])}


@pytest.fixture(scope="module")
def seen(made: dict[str, Any]) -> dict[str, Any]:
    """The page as a real browser lays it out, and its screenshot (one window as tall as the page)."""
    page = made["root"] / "report" / "index.html"
    layout = measure(page, WIDTH)
    shot = screenshot(page, made["root"] / f"shot-{os.getpid()}.png", WIDTH, layout["height"])
    return {"layout": layout, "shot": shot}


@pytest.mark.timeout(600)
def test_report_writes_the_figures_and_one_self_contained_page(made: dict[str, Any]) -> None:
    out, record = made["root"] / "report", made["record"]
    assert [lv["label"] for lv in record["sweeps"][0]["levels"]] == ["none", "3", "2-3"]
    expected = {"tiny_ladder_ladder.png", "tiny_ladder_rank_losses.png", "tiny_ladder_dispersion_vs_step.png",
                "tiny_ladder_pairwise.png", "label_noise_tiny_evidence.png", "runs_rank_losses.png",
                "runs_dispersion_vs_step.png", "runs_pairwise.png"}
    assert expected <= set(record["figures"]), record["figures"]
    for name in record["figures"]:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
    page = (out / "index.html").read_text()
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(sources) == len(record["figures"]) and all(s.startswith("data:image/png;base64,") for s in sources)
    verdict = json.loads((made["root"] / "run" / "run.json").read_text())["verdict"]
    assert verdict["status"] == "inconsistent" and verdict["ranks"] == [3]
    assert f"<p class='verdict bad'>{explanation(verdict)}</p>" in page  # the recorded words, once
    assert "each level against level 0 (none), paired per step" in page.lower()


@pytest.mark.timeout(600)
def test_every_text_of_every_figure_lies_inside_its_figure(made: dict[str, Any]) -> None:
    """matplotlib's own account (``plotting.save`` checks each figure it writes): no legend, title,
    tick label or annotation beyond the figure's edge, no raw mathtext on a log axis."""
    assert made["layout"] == []


def test_the_layout_check_finds_a_legend_wider_than_its_figure(tmp_path: Path) -> None:
    fig = Figure(figsize=(3, 2), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], label="global loss (mean of ranks)")
    ax.set_yscale("log")
    fig.legend(loc="outside lower center", ncols=1, labels=["a label far wider than a three-inch figure " * 2])
    with pytest.warns(plotting.LayoutWarning, match="legend .* reaches beyond the figure"):
        plotting.save(fig, tmp_path / "wide.png")


@pytest.mark.timeout(600)
def test_the_evidence_figure_shows_the_verdicts_rank_and_span(made: dict[str, Any]) -> None:
    run_data = load_run(made["root"] / "run")
    maps = {m.metric: m for m in deviation_maps(run_data.rows, run_data.world_size)}
    assert set(maps) == {"loss", "grad_norm", "cos_to_mean"}
    for m in maps.values():
        assert m.u.shape == (20, 4) and np.abs(m.u).max() <= 3.0 and m.replicas is None
    assert int(np.argmax(maps["loss"].sums)) == 3 and int(np.argmin(maps["cos_to_mean"].sums)) == 3
    found = findings(run_data.verdict)
    assert found and all(f.ranks == (3,) and f.counts for f in found)
    assert {f.metric for f in found} <= {"loss", "grad_norm", "cos_to_mean"}


@pytest.mark.timeout(600)
def test_the_ladder_has_the_sweeps_paired_cis_and_trend(made: dict[str, Any]) -> None:
    sweep = load_sweep(made["root"] / "sweep")
    recorded = ladder_of(sweep)
    assert recorded is not None and recorded.source == "recorded by the sweep"
    assert recorded.trend["cos_mean"]["direction"] == "decreasing" and recorded.trend["loss_cv"]["direction"] == \
        "increasing"
    sweep.comparison = None  # an older sweep: the report computes the same comparison from the rows
    computed = ladder_of(sweep)
    assert computed is not None and computed.source.startswith("computed by the report from every recorded row")
    for metric, levels in recorded.paired.items():
        assert levels[0] is None and all(p is not None and p.ci is not None for p in levels[1:])
        for a, b in zip(levels[1:], computed.paired[metric][1:]):
            assert a.mean == pytest.approx(b.mean) and a.ci == pytest.approx(b.ci)
        assert recorded.trend[metric]["p"] == pytest.approx(computed.trend[metric]["p"])
    assert all(p.mean > 0 for p in recorded.paired["loss_cv"][1:])  # desynced seeds: loss CV above level 0's


@pytest.mark.timeout(600)
def test_a_hostile_comparison_is_left_out_not_trusted(made: dict[str, Any], tmp_path: Path) -> None:
    from testbed.report.ladder import ladder_figure

    sweep = load_sweep(made["root"] / "sweep")
    sweep.comparison = {"per_level": {"3": {"loss_cv": {"mean": "1e9", "ci": [0.1]}, "cos_mean": {"mean": float("nan")}},
                                      "2-3": {"loss_cv": {"mean": 0.5, "ci": [0.4, None], "p_value": "?"}}},
                        "trend": {"loss_cv": {"rho": "+1", "p": None, "direction": "<sideways>"}, "cos_mean": [1]}}
    ladder = ladder_of(sweep)
    assert ladder is not None and ladder.paired["loss_cv"][1] is None and ladder.paired["cos_mean"][1] is None
    both = ladder.paired["loss_cv"][2]
    assert both is not None and (both.mean, both.ci, both.p_value) == (0.5, None, None)
    assert "cos_mean" not in ladder.trend
    positions, ticks, xlabel = level_axis(sweep)
    with warnings.catch_warnings():
        warnings.simplefilter("error", plotting.LayoutWarning)
        ladder_figure(ladder, positions, ticks, xlabel, tmp_path / "ladder.png", "hostile")


@pytest.mark.timeout(600)
def test_levels_are_taken_in_index_order_and_missing_ones_named(made: dict[str, Any], tmp_path: Path) -> None:
    copy = tmp_path / "sweep"
    shutil.copytree(made["root"] / "sweep", copy)
    meta = json.loads((copy / "sweep.json").read_text())
    meta["levels"] = meta["levels"][::-1] + [{"index": 3, "label": "late", "value": [0, 1, 2], "run_dir": "level-03",
                                              "status": "failed"}]
    (copy / "sweep.json").write_text(json.dumps(meta))
    sweep = load_sweep(copy)
    assert [e["label"] for e in level_table(sweep)] == ["none", "3", "2-3"] and sweep.missing == ["late (failed)"]


# ---- in a real browser ----------------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_the_page_lays_out_inside_the_window_in_a_real_browser(seen: dict[str, Any]) -> None:
    layout = seen["layout"]
    assert layout["viewport"] == WIDTH and layout["problems"] == []


@pytest.mark.timeout(600)
def test_each_run_says_one_thing_and_no_z_is_absurd(made: dict[str, Any], seen: dict[str, Any]) -> None:
    """Per run one explanation line, the recorded verdict's; nothing beside it judges the run again
    (the old page printed "outlier: none above |z|=8" under INCONSISTENT), and no z-value from a
    spread of zero (bit-identical ranks gave z=-4.75e+10)."""
    blocks = seen["layout"]["blocks"]
    assert len(blocks) == 4  # three levels and the run
    for block in blocks:
        assert len(block["verdicts"]) == 1, block
        assert not re.search(r"\boutlier\b|none above \|z\|", block["text"]), block["text"]
    run_block = next(b for b in blocks if b["title"] == "label_noise_tiny")
    verdict = json.loads((made["root"] / "run" / "run.json").read_text())["verdict"]
    assert run_block["verdicts"] == [explanation(verdict)]
    z_values = [float(z) for z in re.findall(r"\bz\s*=\s*([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)", seen["layout"]["text"])]
    assert all(abs(z) < 1e3 for z in z_values), z_values


@pytest.mark.timeout(600)
def test_the_screenshot_shows_every_figure_where_the_page_puts_it_uncut(made: dict[str, Any],
                                                                        seen: dict[str, Any]) -> None:
    layout, shot = seen["layout"], seen["shot"]
    assert shot.shape[:2] == (layout["height"], WIDTH)
    assert len(layout["images"]) == len(made["record"]["figures"])
    assert all(img["natural_w"] > 0 and img["w"] > 300 for img in layout["images"])
    assert image_problems(shot, layout["images"]) == []


def test_without_chromium_the_browser_tests_fail_saying_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import tests.browser as browser

    monkeypatch.delenv("TESTBED_CHROMIUM", raising=False)
    monkeypatch.setattr(browser.shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y --no-install-recommends chromium"):
        browser.chromium()


# ---- the parts, without a run ---------------------------------------------------------------------

HOSTILE = "<script>alert(1)</script>.running_mean"
EVERY_KIND = {"status": "inconsistent", "ranks": [2], "since_step": 3, "until_step": None, "alpha": 0.01, "steps": 12,
              "headline": "INCONSISTENT — rank 2: <b>not bold</b>", "notes": [HOSTILE], "evidence": [
                  {"metric": "loss", "rank": 2, "kind": "persistent", "p_value": 0.002, "effect": {
                      "value": 0.1, "unit": "relative (rank vs the healthy ranks 0,1,3)", "since_step": 3, "steps": 9,
                      "of": 12}},
                  {"metric": "grad_norm", "rank": 1, "kind": "transient", "p_value": 0.5, "effect": {
                      "value": 9.5, "unit": "robust z (peak)", "peak_step": 5, "reference": 4.0, "confirmed": False,
                      "since_step": 5, "until_step": 6, "steps": 1, "of": 12}},
                  {"metric": "loss", "rank": 0, "kind": "nonfinite", "p_value": None,
                   "effect": {"value": 2, "unit": "steps with a non-finite value", "since_step": 7}},
                  {"kind": "data", "cause": "replicated", "ranks": [1, 2], "step": 4, "metric": "data", "p_value": None,
                   "effect": {"classes": [[0, 1, 2]], "since_step": 4}},
                  {"kind": "state", "tensor": HOSTILE, "ranks": [3], "step": 8, "metric": "buffers", "p_value": None,
                   "effect": {"since_step": 8}},
                  {"kind": "config", "key": "lr", "values": [0.1, 0.1, 0.2, 0.1], "ranks": [2], "step": 0,
                   "metric": "config", "p_value": None, "effect": {"since_step": 0}},
                  {"kind": "data", "cause": "epoch_repeat", "ranks": [], "step": 6, "effect": {"intended": True}},
                  {"kind": "from_the_future", "metric": "x", "novel": [1, 2]},
                  {"kind": "persistent", "effect": "not a dict"},
                  "not an object",
                  {"metric": "loss", "group": [[0, 1], [2, 3]], "kind": "persistent", "p_value": 0.0, "effect": {
                      "value": 2, "unit": "ranks with bit-identical values (reading the same batches: impossible for "
                      "ranks that read their own)", "since_step": 0, "steps": 12, "of": 12, "replicated": True,
                      "attributable": False}}]}


def test_every_kind_of_evidence_is_a_finding_and_a_mark(tmp_path: Path) -> None:
    found = findings(EVERY_KIND)
    lines = [f.line() for f in found]
    assert len(found) == 11 and lines[0].startswith("[1] rank 2: loss +10 % (rank vs the healthy ranks 0,1,3)")
    assert "unconfirmed" in lines[1] and not found[1].counts and (found[1].step, found[1].metric) == (5, "grad_norm")
    assert "non-finite loss from step 7" in lines[2] and found[2].certainty == "exact"
    assert (found[3].subject, found[3].ranks, found[3].step, found[3].metric) == ("ranks 1, 2", (1, 2), 4, None)
    assert "data, replicated" in lines[3] and f"state: {HOSTILE} differs" in lines[4]
    assert "config: lr differs: rank 0 = 0.1, rank 1 = 0.1, rank 2 = 0.2" in lines[5]
    assert found[6].subject == "all ranks" and not found[6].counts and "declared intended" in lines[6]
    assert "novel=[1, 2]" in lines[7] and lines[9].startswith("[10] item:")
    assert found[10].ranks == (0, 1) and "loss bit-identical on ranks 0, 1 from step 0" in lines[10]
    rows = [{"step": s, "loss": [1.0 + 0.01 * ((s * 7 + r * 3) % 5) + (0.2 if r == 2 and s >= 3 else 0)
                                 for r in range(4)],
             "grad_norm": [1.0 + 0.02 * ((s + r) % 3) for r in range(4)],
             "cos_to_mean": [0.9 - 0.01 * ((s * r) % 4) for r in range(4)]} for s in range(12)]
    from testbed.report.evidence_figure import evidence_figure

    with warnings.catch_warnings():
        warnings.simplefilter("error", plotting.LayoutWarning)
        assert evidence_figure("every kind", EVERY_KIND, deviation_maps(rows), found, tmp_path / "e.png")
    run_data = type("R", (), {"label": "<i>run</i>", "run_dir": Path("x"), "status": "ok", "verdict": EVERY_KIND,
                              "sampling": {}, "summary": {"steps_recorded": 12}})()
    card = run_card(run_data, tmp_path / "e.png")  # type: ignore[arg-type]
    assert "<script>" not in card and "<b>not bold" not in card and "&lt;script&gt;" in card
    assert card.count("class='verdict") == 1


@pytest.mark.timeout(240)
def test_a_long_record_is_drawn_from_the_digests_buckets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The evidence figure of a long record: at most PLOT_POINTS columns (bucket means), the drifting
    rank still the one that stands out."""
    import random

    from benchmarks.report_scale import _row, write_run
    from testbed.record import digest as digest_module
    from testbed.report.html import evidence_png

    monkeypatch.setattr(digest_module, "PLOT_POINTS", 50)
    rng = random.Random(3)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(_row(s, 4, rng, s > 500, 100)) + "\n"
                                                    for s in range(1000)))
    write_run(tmp_path, 1000, 4, with_verdict=True)
    run_data = load_run(tmp_path)
    maps = deviation_maps(run_data.rows, run_data.world_size)
    assert all(m.u.shape == (50, 4) for m in maps) and int(np.argmax(maps[0].sums)) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", plotting.LayoutWarning)
        assert evidence_png(run_data, tmp_path / "long.png") is not None


def test_report_rejects_a_directory_without_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a run directory" in capsys.readouterr().err


def test_rank_list_levels_are_placed_by_rank_count() -> None:
    runs = [type("R", (), {"label": lab, "level": {"index": i, "value": v}})()
            for i, (lab, v) in enumerate([("none", []), ("3", [3]), ("2-3", [2, 3]), ("0-1-2-3", [0, 1, 2, 3])])]
    sweep = SweepData(Path("."), "s", "perturbations.0.ranks", "", runs=runs)  # type: ignore[arg-type]
    positions, ticks, xlabel = level_axis(sweep)
    assert positions == [0.0, 1.0, 2.0, 4.0] and ticks[3] == "4\n(0-1-2-3)" and "number of ranks" in xlabel


@pytest.mark.parametrize("values, scale", [([1e-4, 1e-2, 0.5], "log"), ([0.4, 0.6, 0.9], "linear"),
                                           ([0.0, 1e-3, 1.0], "log")])
def test_axis_goes_logarithmic_when_values_span_decades(values: list[float], scale: str) -> None:
    ax = Figure().subplots()
    plotting.maybe_log(ax, np.asarray(values), "loss CV")
    assert ax.get_yscale() == scale
    notes = " ".join(t.get_text() for t in ax.texts)
    assert ("values ≤ 0 not drawn" in notes) == (0.0 in values)
    if scale == "log":  # plain tick labels: mathtext is off in the report's figures
        assert ax.yaxis.get_major_formatter()(0.01, 0) == "0.01"

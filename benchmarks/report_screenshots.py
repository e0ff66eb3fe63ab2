"""The screenshots in docs/report.md, from real runs, taken the way the tests see the report.

    python -m benchmarks.report_screenshots --out /tmp/report-shots            # runs + reports + docs/*.png
    python -m benchmarks.report_screenshots --out /tmp/report-shots --ladder-steps 4   # smoke (faster)

1. ``testbed run label_noise`` (the catalog's: half of rank 3's labels redrawn, 4 ranks, 40 steps)
   and ``testbed sweep seed_ladder --steps N`` (seed desync on 0..4 of 4 ranks over replicated
   batches, the catalog's ladder; ``--ladder-steps``, default 10) into ``--out`` (kept: a rerun reuses
   finished records; ``--fresh`` starts over);
2. ``testbed report`` of each;
3. headless chromium (``tests/browser.py``, the flags a closed network needs) measures each page,
   takes a screenshot of it, and crops: the run's verdict, findings and evidence figure
   (``docs/report_run.png``); the sweep's level table, ladder figure and ladder table
   (``docs/report_sweep.png``); the first inconsistent level's card with its evidence figure
   (``docs/report_level.png``). Each is scaled to ``--width`` pixels and palette-quantized to stay
   small (the sizes are printed).

Needs chromium (``apt-get install -y --no-install-recommends chromium``). About 2-3 minutes on 2
idle cores (the ladder's 5 levels dominate).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
RUN_TIMEOUT_S = 1800


def testbed(*args: str) -> None:
    """``testbed ARGS`` in a child process (bounded), its output passed through."""
    command = [sys.executable, "-m", "testbed", *args]
    print("$", " ".join(["testbed", *args]), flush=True)
    subprocess.run(command, check=True, timeout=RUN_TIMEOUT_S)


def records(out: Path, ladder_steps: int) -> tuple[Path, Path]:
    run_dir, sweep_dir = out / "label_noise", out / "seed_ladder"
    if not (run_dir / "run.json").exists():
        testbed("run", "label_noise", "--out", str(run_dir), "--no-progress")
    testbed("sweep", "seed_ladder", "--steps", str(ladder_steps), "--out", str(sweep_dir), "--no-progress")
    for directory in (run_dir, sweep_dir):
        testbed("report", str(directory), "--out", str(directory / "report"))
    return run_dir / "report" / "index.html", sweep_dir / "report" / "index.html"


def shoot(page: Path, width: int) -> tuple[Any, dict[str, Any]]:
    """The page's screenshot (a PIL image) and the browser's measurements of it."""
    from PIL import Image

    from tests.browser import measure, screenshot

    layout = measure(page, width)
    assert not layout["problems"], layout["problems"]
    shot = screenshot(page, page.with_name("screenshot.png"), width, layout["height"])
    return Image.fromarray(shot), layout


def image(layout: dict[str, Any], suffix: str) -> dict[str, Any]:
    return next(img for img in layout["images"] if img["alt"].endswith(suffix))


def save(picture: Any, box: tuple[float, float, float, float], path: Path, width: int) -> None:
    from PIL import Image

    crop = picture.crop(tuple(int(round(v)) for v in box))
    height = round(crop.height * width / crop.width)
    small = crop.resize((width, height), Image.LANCZOS).convert("P", palette=Image.ADAPTIVE, colors=128)
    small.save(path, optimize=True)
    print(f"{path.relative_to(REPO)}: {width}×{height} px, {path.stat().st_size / 1024:.0f} KB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where the runs and their reports go")
    parser.add_argument("--ladder-steps", type=int, default=10)
    parser.add_argument("--width", type=int, default=1000, help="width of the saved screenshots in pixels")
    parser.add_argument("--fresh", action="store_true", help="remove --out first")
    args = parser.parse_args()
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    run_page, sweep_page = records(args.out, args.ladder_steps)
    page_width = 1300

    picture, layout = shoot(run_page, page_width)
    evidence = image(layout, "_evidence.png")
    save(picture, (0, 0, page_width, evidence["y"] + evidence["h"] + 2), DOCS / "report_run.png", args.width)

    picture, layout = shoot(sweep_page, page_width)
    after = image(layout, "_rank_losses.png")  # the ladder figure and its table end above it
    save(picture, (0, 0, page_width, after["y"] - 40), DOCS / "report_sweep.png", args.width)
    level = next((img for img in layout["images"] if img["alt"].endswith("_evidence.png")), None)
    if level is not None:  # the card (from its heading) of the first level with an evidence figure
        top = max(b["y"] for b in layout["blocks"] if b["y"] < level["y"]) - 16
        save(picture, (0, top, page_width, level["y"] + level["h"] + 2), DOCS / "report_level.png", args.width)


if __name__ == "__main__":
    main()

"""A real headless browser for the report's tests: Debian's ``chromium``, started bounded, with the
flags a closed network needs, on a copy of the page with a measuring script injected.

``measure(page)`` loads the page and returns what the browser laid out: every heading, paragraph,
list item, table, figure and image with its box, the problems it found (an element wider than its
container or the viewport, text overflowing its own box, an image not decoded or distorted), each
run's verdict lines and the text of each run's block. ``screenshot(page, ...)`` takes the picture;
``image_problems`` compares it with the boxes (is every figure drawn where the page says, and is
anything cut off at its edge?).

Missing chromium is a failure, never a skip: CI installs it (``.ci/run``), and a check that
silently does not run is no check.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL = "apt-get install -y --no-install-recommends chromium"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--force-device-scale-factor=1")
TIMEOUT_S = 120  # one page load; measured 1-3 s on the 2-core machine under load
INK = 170  # a pixel with a channel below this is drawn content, not the white background

MEASURE = r"""<script>
window.addEventListener('load', () => {
  const vw = document.documentElement.clientWidth, problems = [], images = [];
  const name = el => el.tagName.toLowerCase() + (el.className ? '.' + el.className : '') + ' "' +
    (el.alt || el.textContent || '').trim().slice(0, 60) + '"';
  for (const el of document.querySelectorAll('h1,h2,h3,p,li,table,figure,img,figcaption,section,div.scroll,td,th')) {
    const r = el.getBoundingClientRect(), c = el.parentElement.getBoundingClientRect();
    if (r.width === 0 && r.height === 0) continue;
    if (r.right > vw + 1 || r.left < -1) problems.push(name(el) + ' leaves the viewport');
    if (!['td', 'th'].includes(el.tagName.toLowerCase()) && (r.right > c.right + 1 || r.left < c.left - 1))
      problems.push(name(el) + ' is wider than its container');
    if (el.scrollWidth > el.clientWidth + 1 && el.tagName.toLowerCase() !== 'section')
      problems.push(name(el) + ' has text overflowing its box');
  }
  for (const img of document.images) {
    const r = img.getBoundingClientRect();
    if (!img.complete || img.naturalWidth === 0) problems.push(name(img) + ' was not decoded');
    else if (Math.abs(r.width / r.height - img.naturalWidth / img.naturalHeight) > 0.02)
      problems.push(name(img) + ' is distorted');
    images.push({alt: img.alt, x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height,
                 natural_w: img.naturalWidth, natural_h: img.naturalHeight});
  }
  const blocks = [];
  for (const h of document.querySelectorAll('h3')) {
    let text = '', el = h.nextElementSibling;
    while (el && !['H2', 'H3'].includes(el.tagName)) { text += el.innerText + '\n'; el = el.nextElementSibling; }
    blocks.push({title: h.innerText, text: text, y: h.getBoundingClientRect().top + scrollY,
                 verdicts: h.parentElement.tagName === 'SECTION'
                   ? [...h.parentElement.querySelectorAll('.verdict')].map(v => v.innerText) : []});
  }
  const out = document.createElement('pre');
  out.id = 'testbed-layout';
  out.textContent = JSON.stringify({viewport: vw, height: document.documentElement.scrollHeight,
    problems: problems, images: images, blocks: blocks, text: document.body.innerText});
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str:
    """The browser's path; a test failure saying how to install it when there is none."""
    found = os.environ.get("TESTBED_CHROMIUM") or next((p for p in map(shutil.which, NAMES) if p), None)
    if not found:
        pytest.fail(f"no chromium on PATH ({', '.join(NAMES)}): the report's browser checks need a real browser. "
                    f"Install it with `{INSTALL}` (CI's .ci/run does), or set TESTBED_CHROMIUM to its path.")
    return found


def run_chromium(*args: str) -> str:
    """Run headless chromium with a fresh profile; its stdout. Bounded: the whole process group is
    killed at TIMEOUT_S, and after every run (no helper process outlives the call)."""
    profile = tempfile.mkdtemp(prefix="testbed-chromium-")
    command = [chromium(), *FLAGS, f"--user-data-dir={profile}", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        proc.communicate()
        raise AssertionError(f"chromium did not finish within {TIMEOUT_S} s: {' '.join(command)}") from None
    finally:
        _kill_group(proc.pid)
        shutil.rmtree(profile, ignore_errors=True)
    if proc.returncode != 0:
        raise AssertionError(f"chromium exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
    return out.decode("utf-8", errors="replace")


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def measure(page: Path, width: int = 1300, height: int = 1000) -> dict[str, Any]:
    """Load a copy of ``page`` with ``MEASURE`` injected; what the browser measured (module doc)."""
    source = Path(page).read_text(encoding="utf-8")
    probe = Path(page).with_name(f".measure-{os.getpid()}-{Path(page).name}")
    probe.write_text(source.replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    try:
        dom = run_chromium(f"--window-size={width},{height}", "--virtual-time-budget=10000", "--dump-dom",
                           probe.as_uri())
    finally:
        probe.unlink()
    found = re.search(r'<pre id="testbed-layout">(.*?)</pre>', dom, re.S)
    assert found, "the measuring script wrote nothing: " + dom[-1000:]
    return json.loads(html.unescape(found.group(1)))


def screenshot(page: Path, out: Path, width: int, height: int) -> np.ndarray:
    """The page as the browser draws it in a ``width`` × ``height`` window, as an RGB array."""
    from PIL import Image

    run_chromium(f"--window-size={width},{height}", "--virtual-time-budget=10000", f"--screenshot={out}",
                 Path(page).as_uri())
    with Image.open(out) as picture:
        return np.asarray(picture.convert("RGB"))


def image_problems(shot: np.ndarray, images: list[dict[str, Any]], band: int = 2) -> list[str]:
    """Each figure's region of the screenshot must hold a drawing (not blank) and have nothing drawn
    in the ``band`` pixels along its edges: a figure's own margin is white, so ink there is
    something cut off at the figure's edge (the clipped legend)."""
    problems = []
    for img in images:
        x0, y0 = int(np.ceil(img["x"])), int(np.ceil(img["y"]))
        x1, y1 = int(np.floor(img["x"] + img["w"])), int(np.floor(img["y"] + img["h"]))
        if y1 > shot.shape[0] or x1 > shot.shape[1]:
            problems.append(f"{img['alt']}: outside the screenshot")
            continue
        region = shot[y0:y1, x0:x1].min(axis=2)
        if (region < INK).mean() < 0.005:
            problems.append(f"{img['alt']}: blank where the page places it")
        edges = {"left": region[:, :band], "right": region[:, -band:], "top": region[:band, :],
                 "bottom": region[-band:, :]}
        for side, strip in edges.items():
            ink = int((strip < INK).sum())
            if ink > 2:
                problems.append(f"{img['alt']}: {ink} drawn pixel(s) at its {side} edge (cut off)")
    return problems

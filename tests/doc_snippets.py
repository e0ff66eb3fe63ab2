"""The Python snippets of README.md and docs/monitor.md, as written, and which harness runs each.

A snippet leaves the user's objects free (``model``, ``loader``, ``optimizer``, ``args``, ...);
tests/ecosystem_scripts.py binds them for its kind and executes the snippet's text unchanged.
"""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = (REPO / "README.md", REPO / "docs" / "monitor.md")
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def kind_of(code: str) -> str:
    """The harness that can run this snippet ("unknown" fails the coverage test)."""
    if "TestbedCallback(" in code:
        return "trainer"
    if "TestbedLightningCallback" in code:
        return "lightning"
    if "fully_shard(" in code:
        return "fsdp2"
    if "Accelerator(" in code:
        return "accelerate"
    if "testbed.attach(" in code:
        return "plain"
    return "unknown"


def snippets() -> list[dict[str, str]]:
    """``[{"id", "doc", "kind", "code"}]`` in document order; ids are ``<doc>-<n>``."""
    out = []
    for doc in DOCS:
        for n, match in enumerate(_BLOCK.finditer(doc.read_text(encoding="utf-8"))):
            code = match.group(1)
            out.append({"id": f"{doc.stem}-{n}", "doc": str(doc.relative_to(REPO)), "kind": kind_of(code), "code": code})
    return out

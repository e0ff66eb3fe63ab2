"""Names that become directory names: a scenario's, a sweep level's, a gate's.

Found by attack (issue 23): the gate slugged a scenario named ``-..-`` to ``..`` and wrote (and,
for a sweep, ``rmtree``'d) the directory above its ``--out``; ``a b`` and ``a-b`` slugged alike,
so one scenario's record replaced the other's. ``segment`` is one safe path component and
injective: a name made only of ``[A-Za-z0-9._-]`` (not starting with ``.`` or ``-``) is kept as
it is; any other name becomes its cleaned form plus ``+`` and a hash of the original. A kept name
never contains ``+``, so the two kinds cannot collide, and two different unsafe names collide only
if their 48-bit hashes do.
"""
from __future__ import annotations

import hashlib
import re

_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
MAX_KEPT = 100  # longer names are shortened (and hashed): a directory name stays well under 255 bytes


def segment(name: str) -> str:
    """``name`` as one path component: itself when already safe, else ``<cleaned>+<hash>``."""
    if _SAFE.fullmatch(name) and len(name) <= MAX_KEPT:
        return name
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")[:60] or "x"
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{cleaned}+{digest}"

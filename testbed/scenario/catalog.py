"""The scenario catalog in every install, and scenarios named instead of given as paths.

The top-level ``scenarios/`` folder of the repository is the catalog's source of truth. A wheel
carries a copy as package data (``testbed/catalog/``, made by ``setup.py``'s build step); a source
checkout (an editable install) reads ``scenarios/`` in place. A name is found in this order, so a
user's own files always win over the shipped ones:

1. an existing path (``scenarios/control.toml``, ``my.toml``);
2. ``./scenarios/`` of the working directory, then the shipped catalog: by relative path without
   ``.toml`` (``control``, ``faults/crash``, ``openpangu/control``), then by the scenario's
   ``name`` field (``fault_crash``, ``openpangu-control``).
"""
from __future__ import annotations

import difflib
import tomllib
from pathlib import Path

from testbed.scenario.errors import ScenarioError

LOCAL_DIR = Path("scenarios")
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # testbed/


def shipped_dir() -> Path | None:
    """The catalog this install carries: ``testbed/catalog`` in a wheel, the repository's
    ``scenarios/`` in a source checkout; None if neither is there."""
    packaged = _PACKAGE_ROOT / "catalog"
    if packaged.is_dir():
        return packaged
    checkout = _PACKAGE_ROOT.parent / "scenarios"
    if checkout.is_dir() and (_PACKAGE_ROOT.parent / "pyproject.toml").is_file():
        return checkout
    return None


def search_dirs() -> list[Path]:
    """Where names are looked up, first match wins: ``./scenarios``, then the shipped catalog."""
    dirs = [LOCAL_DIR] if LOCAL_DIR.is_dir() else []
    shipped = shipped_dir()
    if shipped is not None and not any(_same(shipped, d) for d in dirs):
        dirs.append(shipped)
    return dirs


def scenario_files(directory: Path) -> list[Path]:
    """Every ``*.toml`` file under ``directory`` (sorted; the catalog's layout is one level of folders)."""
    return sorted(p for p in Path(directory).rglob("*.toml") if p.is_file())


def catalog_name(path: Path, directory: Path) -> str:
    """``faults/crash`` for ``<directory>/faults/crash.toml``: what ``testbed run`` accepts."""
    return path.relative_to(directory).with_suffix("").as_posix()


def resolve(item: str | Path) -> Path:
    """The scenario file ``item`` means: an existing path, else a catalog name (see the module
    docstring). Raises ScenarioError naming the closest names when nothing matches."""
    path = Path(item)
    if path.exists() or path.suffix == ".toml" or len(path.parts) > 2:
        return path  # a path: load_scenario reports a missing or unreadable file itself
    text = str(item)
    names: list[str] = []
    for directory in search_dirs():
        files = scenario_files(directory)
        for f in files:
            if catalog_name(f, directory) == text:
                return f
        for f in files:
            if _declared_name(f) == text:
                return f
        names += [catalog_name(f, directory) for f in files]
    close = difflib.get_close_matches(text, sorted(set(names)), n=3)
    where = ", ".join(str(d) for d in search_dirs()) or "no catalog in this install"
    hint = f"; did you mean {', '.join(close)}?" if close else " (`testbed list` shows the catalog)"
    raise ScenarioError(text, "<file>", f"an existing scenario file or a catalog name (looked in {where}){hint}")


def _declared_name(path: Path) -> str | None:
    """The file's ``name`` field, without validating the rest (a broken file is reported when run)."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    name = raw.get("name")
    return name if isinstance(name, str) else None


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False

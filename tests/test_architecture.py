"""The package layout is the architecture: rooms, one-way dependencies, no cycles, pure rooms pure.

``lint-imports`` checks the contracts in pyproject.toml (layers; no torch in diagnose / record /
scenario); the rest is checked here on the real import graph (grimp, import-linter's engine).
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "testbed"
ROOMS = {"scenario", "perturb", "workloads", "metrics", "diagnose", "engine", "record", "report", "gate",
         "integrations", "cli", "schema"}
TOP_LEVEL_ALLOWED = {"__init__.py", "__main__.py", "worker.py", "tiny_checkpoint.py"}  # the last two: `python -m` names


def test_lint_imports_contracts_are_kept() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "import-linter is part of the test extra"
    done = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_top_level_holds_only_rooms_and_entry_points() -> None:
    files = {p.name for p in PACKAGE.iterdir() if p.is_file() and p.suffix == ".py"}
    assert files <= TOP_LEVEL_ALLOWED, sorted(files - TOP_LEVEL_ALLOWED)
    dirs = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert dirs == ROOMS
    for room in ROOMS:
        doc = ast.get_docstring(ast.parse((PACKAGE / room / "__init__.py").read_text()))
        assert doc and doc.startswith(room), f"testbed/{room}/__init__.py must say what lives there"


def test_no_import_cycle_among_testbed_modules() -> None:
    graph = grimp.build_graph("testbed", exclude_type_checking_imports=True)  # annotations only: no runtime cycle
    modules = sorted(m for m in graph.modules if m.startswith("testbed"))
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.find_modules_directly_imported_by(m)):
            if not n.startswith("testbed"):
                continue
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = 2

    for m in modules:
        if m not in state:
            visit(m, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles[:5])


def test_no_room_but_the_engine_and_integrations_talks_to_other_ranks() -> None:
    """torch.distributed is the engine's (and the drop-in monitor's) business alone."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        room = path.relative_to(PACKAGE).parts[0]
        if room in ("engine", "integrations"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_no_module_is_over_about_400_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 420}
    assert not long, long

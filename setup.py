"""Ships the scenario catalog inside the package: the top-level ``scenarios/`` folder (the source of
truth, edited in the repository) is copied to ``testbed/catalog/`` when a wheel is built, so
``testbed list`` and ``testbed run NAME`` work in any install (``testbed/scenario/catalog.py``). An
editable install reads ``scenarios/`` in place. Everything else is declared in pyproject.toml."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CATALOG_SOURCE = Path(__file__).resolve().parent / "scenarios"
CATALOG_PATTERNS = ("*.toml", "*.md")


class BuildWithCatalog(build_py):
    """``build_py`` plus a copy of ``scenarios/**/{*.toml,*.md}`` into ``testbed/catalog/``."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / "testbed" / "catalog"
        for pattern in CATALOG_PATTERNS:
            for source in sorted(CATALOG_SOURCE.rglob(pattern)):
                dest = target / source.relative_to(CATALOG_SOURCE)
                self.mkpath(str(dest.parent))
                self.copy_file(str(source), str(dest))


setup(cmdclass={"build_py": BuildWithCatalog})

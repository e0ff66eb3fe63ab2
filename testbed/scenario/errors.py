"""``ScenarioError``: a scenario is wrong — which file, which field, what was expected.

The one exception every room may raise about a scenario; it lives alone so that the validators
(spec, expect, sweep, overrides) can share it without importing each other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


class ScenarioError(ValueError):
    """A scenario file is wrong: says which file, which field, what was expected."""

    def __init__(self, file: str | Path, field: str, expected: str, got: Any = ...):
        self.file, self.field, self.expected = str(file), field, expected
        msg = f"{one_line(str(file))}: field '{one_line(field) or '(empty key)'}': expected {one_line(expected)}"
        if got is not ...:
            text = repr(got)
            msg += f", got {text[:80] + '...' if len(text) > 80 else text}"
        super().__init__(msg)


def one_line(text: str) -> str:
    """Error messages are one line: control characters in a key or path are shown escaped."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")

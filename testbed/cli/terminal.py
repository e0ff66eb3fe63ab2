"""The CLI's stdout and stderr: safe to print user-controlled text to, safe to lose.

Found by attack (issue 23): a scenario ``description`` holding ``\\x1b]0;...\\x07`` or
``\\x1b[2J`` was printed raw by ``testbed list`` (it retitled or cleared the terminal); with stdout
on ``/dev/full`` or piped to ``head -1`` a finished run ended in a traceback and exit 1.

``SafeStream`` wraps a text stream: every write has its control characters shown escaped
(``\\x1b`` as the four characters ``\\x1b``; newlines and tabs kept), whoever produced the text
- a scenario name, a description, a rank's exception message, a path. A write or flush that fails
(EPIPE, ENOSPC, EIO) marks the stream broken, points its descriptor at /dev/null (so the
interpreter's final flush cannot fail again) and is otherwise ignored: the exit status stays the
run's. ``terminal`` is the same stream without the escaping, for the progress bar's own cursor
movements (its text is sanitized where it is made).
"""
from __future__ import annotations

import errno
import io
import os
import sys
from typing import Any, TextIO

_KEEP = {"\n", "\t"}
_BIDI = [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F]  # can reorder what a line shows
_TABLE = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)] if chr(c) not in _KEEP}
_TABLE.update({c: f"\\u{c:04x}" for c in _BIDI})


def sanitize(text: str) -> str:
    """``text`` with every control character (but newline and tab) and bidi override escaped."""
    return text.translate(_TABLE)


class SafeStream(io.TextIOBase):
    """A text stream that escapes control characters and survives a closed or full output."""

    def __init__(self, stream: TextIO, escape: bool = True):
        self._stream = stream
        self._escape = escape
        self.broken: OSError | None = None
        self.terminal: SafeStream = self if not escape else SafeStream(stream, escape=False)
        if escape:
            self.terminal._shared = self  # one broken state for both views
        self._shared: SafeStream = self

    @property
    def state(self) -> "SafeStream":
        return self._shared

    def write(self, text: str) -> int:
        if self.state.broken is None:
            try:
                self._stream.write(sanitize(text) if self._escape else text)
            except OSError as e:
                self._break(e)
        return len(text)

    def flush(self) -> None:
        if self.state.broken is None:
            try:
                self._stream.flush()
            except OSError as e:
                self._break(e)

    def _break(self, error: OSError) -> None:
        self.state.broken = error
        try:  # the buffered rest goes nowhere: the final flush at exit must not fail again
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        except (OSError, ValueError, io.UnsupportedOperation):
            pass

    def isatty(self) -> bool:
        try:
            return self._stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return self._stream.fileno()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def install() -> tuple[SafeStream, SafeStream]:
    """Replace sys.stdout / sys.stderr with SafeStreams; returns them (``restore`` undoes it)."""
    out = sys.stdout if isinstance(sys.stdout, SafeStream) else SafeStream(sys.stdout)
    err = sys.stderr if isinstance(sys.stderr, SafeStream) else SafeStream(sys.stderr)
    sys.stdout, sys.stderr = out, err
    return out, err


def finish(stdout: SafeStream, stderr: SafeStream) -> None:
    """Flush both; say once on stderr if stdout could not be written (a closed pipe is no news)."""
    stdout.flush()
    stderr.flush()
    broken = stdout.state.broken
    if broken is not None and broken.errno != errno.EPIPE:
        stderr.write(f"testbed: could not write the output ({broken.strerror or broken})\n")
        stderr.flush()

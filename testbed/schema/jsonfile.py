"""Reading a file a hostile or broken one cannot hurt: a regular file only, a bounded size, strict
UTF-8, and JSON without unbounded nesting (the schemas refuse NaN, Infinity and huge numbers).

Why: ``testbed report`` on a FIFO named ``run.json`` blocked forever, on ``/dev/zero`` it ended in
``MemoryError``, a 200k-deep ``[[[...`` was a RecursionError traceback, a baseline tolerance of
``Infinity`` made the gate pass anything and a 400-digit number an ``OverflowError`` after the
scenarios had run. Every error here is an ``OSError`` (the file cannot be read as a document:
``strerror`` says why) or a ``ValueError`` (its content is not strict JSON), one line each.
"""
from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

MAX_DOCUMENT_BYTES = 64 << 20  # run.json, sweep.json, a baseline, a scenario: far below this
MAX_DEPTH = 64  # no record nests deeper than a few levels


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | Path, max_bytes: int | None = MAX_DOCUMENT_BYTES) -> int:
    """A read-only descriptor of ``path`` if it is a regular file (of at most ``max_bytes``).

    ``O_NONBLOCK``: opening a FIFO must not wait for a writer; it is refused by ``fstat`` next.
    A directory raises ``IsADirectoryError``; other non-regular files an ``OSError`` naming the kind.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"{_kind(mode)}, not a regular file", str(path))
        size = os.fstat(fd).st_size
        if max_bytes is not None and size > max_bytes:
            raise OSError(errno.EFBIG, f"{size} bytes, more than the {max_bytes} a document may have", str(path))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_document(path: str | Path, max_bytes: int = MAX_DOCUMENT_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (OSError otherwise, one line)."""
    fd = open_regular(path, max_bytes)
    try:
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > max_bytes:  # it grew while being read
                raise OSError(errno.EFBIG, f"more than the {max_bytes} bytes a document may have", str(path))
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def parse_json(data: bytes | str) -> Any:
    """JSON from UTF-8, nested at most MAX_DEPTH levels; ValueError with a short reason otherwise.

    NaN, Infinity and huge numbers parse (to a float or an int): the record's schema
    (``schema.records``) refuses them in the field where they matter, naming it.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 (byte {e.start})") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise ValueError(f"not valid JSON ({str(e).splitlines()[0][:100]})") from None
    check_depth(value)
    return value


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """ValueError if ``value`` nests deeper than ``limit`` (iteratively: nothing to overflow)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise ValueError(f"nested more than {limit} levels deep")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def load_json(path: str | Path, max_bytes: int = MAX_DOCUMENT_BYTES) -> Any:
    """``parse_json(read_document(path))``: OSError (unreadable) or ValueError (not strict JSON)."""
    return parse_json(read_document(path, max_bytes))

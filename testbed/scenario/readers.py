"""Scenario checks that need no dataclass: reading the TOML file, nesting depth, the run name,
rank sets and dataset sizes. Kept apart from ``spec`` so that module stays the schema.
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Mapping

from testbed.scenario.errors import ScenarioError
from testbed.scenario.registry import Registry
from testbed.schema.jsonfile import read_document

# The default run directory is runs/<name>-<time>: a name is one path component (no separator, not
# "." or "..") of at most MAX_NAME characters, so the directory stays under runs/ and its name
# (with the 16-character time stamp) fits the 255-byte limit of common filesystems.
MAX_NAME, MAX_NAME_BYTES = 128, 200
# No scenario field nests deeper than a few levels; a deeper document is refused before the
# parser or the validator recurses into it (a 500-deep array was a 3,000-line RecursionError).
MAX_DEPTH = 32
MAX_FILE_BYTES = 16 << 20  # a scenario file is a few kB; a 300000-character name is 300 kB


def read_toml(path: Path) -> dict[str, Any]:
    """The file's TOML table (a UTF-8 byte-order mark is accepted), or one ScenarioError.

    A regular file of at most ``MAX_FILE_BYTES`` only: a FIFO used to block forever and
    ``/dev/zero`` to end in MemoryError (``schema.jsonfile.read_document``)."""
    try:
        text = read_document(path, MAX_FILE_BYTES).decode("utf-8-sig")
    except FileNotFoundError:
        raise ScenarioError(path, "<file>", "an existing scenario file") from None
    except OSError as e:  # a directory, a FIFO, a device, too large, no permission, an I/O error
        raise ScenarioError(path, "<file>", f"a readable scenario file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ScenarioError(path, "<file>", f"valid TOML ({e})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(path, "<file>", f"valid TOML ({e})") from None
    except RecursionError:
        raise ScenarioError(path, "<file>", f"TOML nested at most {MAX_DEPTH} levels deep") from None


def resolve_ranks(value: Any, world_size: int, source: str, where: str) -> tuple[int, ...]:
    """``ranks`` may be a list of ranks, a fraction of the world size, or ``"all"``/``"none"``.

    A fraction f perturbs round(f·N) ranks counted down from the highest rank, so rank 0 stays
    unperturbed (the reference) until every rank is.
    """
    if value == "all":
        return tuple(range(world_size))
    if value == "none":
        return ()
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ScenarioError(source, where, "a fraction in [0, 1]", value)
        k = round(value * world_size)
        return tuple(range(world_size - k, world_size))
    if isinstance(value, list) and all(isinstance(r, int) and not isinstance(r, bool) for r in value):
        bad = [r for r in value if not 0 <= r < world_size]
        if bad:
            raise ScenarioError(source, where, f"ranks in 0..{world_size - 1} (world_size {world_size})", value)
        if len(set(value)) != len(value):
            raise ScenarioError(source, where, "distinct ranks", value)
        return tuple(sorted(value))
    raise ScenarioError(source, where, 'a list of ranks, a fraction in [0, 1], "all" or "none"', value)


def check_depth(raw: Mapping[str, Any], source: str) -> None:
    """Refuse a document nested deeper than MAX_DEPTH (iteratively: no recursion to overflow)."""
    stack: list[tuple[Any, int, str]] = [(v, 1, str(k)) for k, v in raw.items()]
    while stack:
        node, depth, top = stack.pop()
        if depth > MAX_DEPTH:
            raise ScenarioError(source, top, f"a value nested at most {MAX_DEPTH} levels deep")
        children = node.values() if isinstance(node, Mapping) else node if isinstance(node, list) else ()
        stack.extend((c, depth + 1, top) for c in children)


def check_name(name: str, source: str) -> str:
    """The name becomes the directory runs/<name>-<time>: one safe path component, not too long."""
    if not name.strip():
        raise ScenarioError(source, "name", "a non-empty string", name)
    if len(name) > MAX_NAME or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ScenarioError(source, "name", f"at most {MAX_NAME} characters and {MAX_NAME_BYTES} UTF-8 bytes "
                            f"(it names the run directory; this one has {len(name)} characters)", name)
    if name in (".", "..") or any(c in name for c in "/\\") or not name.isprintable():
        raise ScenarioError(source, "name", "a name without '/', '\\' or control characters, not '.' or '..' "
                            "(it names the run directory under runs/)", name)
    return name


def check_data_size(data: Any, registry: Registry, world_size: int, batch_size: int, source: str) -> None:
    """A dataset kind with a ``size`` must give every rank one full batch per epoch (the sampler's
    rule: ceil(size / world_size) >= batch_size), else every rank fails at start-up."""
    schema = registry.params(data.kind)
    if "size" not in schema:
        return
    size = data.params.get("size", schema["size"].default)
    if isinstance(size, int) and -(-size // world_size) < batch_size:
        need = world_size * (batch_size - 1) + 1
        raise ScenarioError(source, "data.size", f"at least {need} samples ({world_size} ranks × data.batch_size "
                            f"{batch_size}: one full batch per rank)", size)

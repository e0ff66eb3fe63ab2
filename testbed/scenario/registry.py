"""Named registries of pluggable pieces (models, datasets, optimizers, perturbations).

Each entry is a plain function whose keyword-only parameters *are* its scenario schema: the
scenario validator reads names, defaults and type annotations from the signature, so adding a
kind never means editing a separate schema. Third-party entries arrive through entry points.
"""
from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from importlib import metadata
from typing import Annotated, Any, Callable, Literal, Mapping, Union

from testbed.scenario.bounds import Bounds

_MISSING = object()
#: ``check(params) -> (parameter, expected) | None``: a rule across parameters (e.g. nesterov needs
#: momentum > 0), run by the validator on the resolved parameters (defaults filled in).
Check = Callable[[Mapping[str, Any]], "tuple[str, str] | None"]


@dataclass(frozen=True)
class Param:
    """One keyword parameter of a registered function, as the validator sees it."""

    name: str
    annotation: Any
    default: Any = _MISSING

    @property
    def required(self) -> bool:
        return self.default is _MISSING


class Registry:
    """A name → function table with a decorator, lazy entry-point discovery and schemas."""

    def __init__(self, what: str, entry_point_group: str | None = None, skip_args: int = 0):
        self.what = what
        self.entry_point_group = entry_point_group
        self.skip_args = skip_args  # leading positional args supplied by the testbed itself
        self._entries: dict[str, Callable[..., Any]] = {}
        self._checks: dict[str, Check] = {}
        self._entry_points_loaded = False

    def register(self, name: str, check: Check | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@PERTURBATIONS.register("my_kind")``; ``check`` validates across parameters."""

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries and self._entries[name] is not fn:
                raise ValueError(f"{self.what} kind {name!r} is already registered")
            self._entries[name] = fn
            if check is not None:
                self._checks[name] = check
            return fn

        return decorate

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        if not self.entry_point_group:
            return
        # The built-in kinds arrive the way third-party ones do (testbed's own entry points in
        # pyproject.toml name the modules that register them), so this room imports nothing above
        # it. Built-ins load first: a third-party kind never shadows one.
        eps = sorted(metadata.entry_points(group=self.entry_point_group),
                     key=lambda ep: not ep.value.startswith("testbed."))
        for ep in eps:
            if ep.name in self._entries:
                continue
            obj = ep.load()  # a function, or a module whose import registers itself
            if callable(obj) and not inspect.ismodule(obj):
                self._entries[ep.name] = obj

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._entries

    def get(self, name: str) -> Callable[..., Any]:
        self._load_entry_points()
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.what} kind {name!r}; known: {', '.join(self.names())}") from None

    def check(self, name: str, params: Mapping[str, Any]) -> tuple[str, str] | None:
        """The kind's rule across its parameters: ``(parameter, expected)`` if broken, else None."""
        self._load_entry_points()
        rule = self._checks.get(name)
        return rule(params) if rule is not None else None

    def params(self, name: str) -> dict[str, Param]:
        """The keyword parameters of entry ``name`` (its scenario schema)."""
        fn = self.get(name)
        hints = typing.get_type_hints(fn, include_extras=True)  # keep Annotated[..., Bounds(...)]
        out: dict[str, Param] = {}
        for i, (pname, p) in enumerate(inspect.signature(fn).parameters.items()):
            if i < self.skip_args or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            default = _MISSING if p.default is p.empty else p.default
            out[pname] = Param(pname, hints.get(pname, Any), default)
        return out


def coerce(value: Any, annotation: Any) -> Any:
    """Return ``value`` converted to ``annotation`` or raise TypeError with what was expected.

    Supports the annotations scenario parameters use: bool, int, float, str, Literal, Optional /
    unions, list[X], tuple[X, ...], dict and Any. TOML ints are accepted where floats are expected.
    """
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:  # a type with Bounds: the type first, then every bound
        value = coerce(value, args[0])
        if not all(b.holds(value) for b in args[1:] if isinstance(b, Bounds)):
            raise TypeError(describe(annotation))
        return value
    if origin is Literal:
        if value in args:
            return value
        raise TypeError("one of " + ", ".join(repr(a) for a in args))
    if origin is Union or (origin is not None and origin.__name__ == "UnionType"):
        for arg in args:
            try:
                return coerce(value, arg)
            except TypeError:
                continue
        raise TypeError(" or ".join(describe(a) for a in args))
    if annotation is type(None):
        if value is None:
            return None
        raise TypeError("nothing (None)")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TypeError("a boolean (true/false)")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError("an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError("a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise TypeError("a string")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError(describe(annotation))
        inner = args[0] if args else Any
        try:
            items = [coerce(v, inner) for v in value]
        except TypeError:
            raise TypeError(describe(annotation)) from None
        return items if origin is list else tuple(items)
    if annotation is dict or origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise TypeError("a table")
    if isinstance(annotation, type) and isinstance(value, annotation):
        return value
    raise TypeError(describe(annotation))


def describe(annotation: Any) -> str:
    """Human wording of an annotation, for error messages."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", type(None): "none"}
    if annotation in names:
        return names[annotation]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        bounds = [b.describe() for b in args[1:] if isinstance(b, Bounds)]
        return " ".join([describe(args[0]), " and ".join(b for b in bounds if b)]).strip()
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {describe(args[0]) if args else 'values'}"
    if origin is Union or (origin is not None and origin.__name__ == "UnionType"):
        return " or ".join(describe(a) for a in args)
    return getattr(annotation, "__name__", str(annotation))

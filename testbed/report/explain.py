"""The verdict as the report states it: one explanation line per run, and one finding per evidence
item, whatever its kind.

The explanation line is the verdict's headline (``run.json["verdict"]["headline"]``, the same words
``testbed run`` prints); nothing beside it judges the run again (the page used to add the per-step
attribution's "outlier: none above |z|=8" under an INCONSISTENT verdict). Each evidence item
(``docs/diagnosis.md``) becomes a ``Finding``: who, what, when, how sure, plus where the evidence
figure marks it. Kinds this module does not know (a newer writer's) are shown as their fields in
text, so a record with them still renders; the exact kinds ``data``, ``state`` and ``config`` carry
``ranks`` and ``step`` and are marked on the figure like the others.

A record is user data: every field is read defensively (a malformed item becomes a line of text,
never an exception), and the HTML escapes every string (``html.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from testbed.diagnose.attribution import METRICS
from testbed.diagnose.text import LABELS

EXACT_KINDS = ("data", "state", "config", "divergence", "nonfinite")
DATA_CAUSES = {"replicated": "ranks read the same samples", "overlap": "ranks' samples overlap",
               "epoch_repeat": "an epoch repeats an earlier epoch's order", "uncovered": "samples never read"}
SKIPPED_FIELDS = {"kind", "metric", "rank", "group", "ranks", "step", "p_value", "effect", "since_step"}


@dataclass(frozen=True)
class Finding:
    """One evidence item in words and where the evidence figure marks it."""

    number: int
    kind: str
    subject: str  # "rank 3", "groups {0, 1} | {2, 3}", "all ranks", "no rank named"
    text: str  # what was found, when
    certainty: str  # "p = 0.0034", "exact", "unconfirmed", ...
    ranks: tuple[int, ...] = ()  # ranks the figure marks
    metric: str | None = None  # the figure's panel (a per-rank metric), None: every panel
    step: int | None = None  # a point in time (a spike's peak, a non-finite value, an exact cause)
    since: int | None = None
    until: int | None = None  # exclusive
    counts: bool = True  # whether it makes the run inconsistent

    def line(self) -> str:
        return f"[{self.number}] {self.subject}: {self.text} ({self.certainty})"


def explanation(verdict: Mapping[str, Any]) -> str:
    """The one line that explains the run: the verdict's headline, or its status if it has none."""
    headline = verdict.get("headline")
    if isinstance(headline, str) and headline.strip():
        return headline
    return str(verdict.get("status") or "no verdict recorded")


def findings(verdict: Mapping[str, Any]) -> list[Finding]:
    """Every evidence item of ``verdict``, numbered from 1 in the recorded order."""
    items = verdict.get("evidence") if isinstance(verdict.get("evidence"), list) else []
    return [finding(k + 1, item) for k, item in enumerate(items)]


def finding(number: int, item: Any) -> Finding:
    if not isinstance(item, Mapping):
        return Finding(number, "unknown", "item", _scalar(item), "not understood", counts=False)
    kind = str(item.get("kind", "unknown"))
    effect = item.get("effect") if isinstance(item.get("effect"), Mapping) else {}
    try:
        return _known(number, kind, item, effect)
    except (KeyError, TypeError, ValueError, IndexError):  # a malformed item of a known kind: its fields
        return Finding(number, kind, _who(item, effect)[0], _fields(item, effect), _certainty(kind, item, effect))


def _known(number: int, kind: str, item: Mapping[str, Any], effect: Mapping[str, Any]) -> Finding:
    subject, ranks = _who(item, effect)
    metric = item.get("metric") if item.get("metric") in METRICS else None
    since, until = _int(effect.get("since_step")), _int(effect.get("until_step"))
    counts = not (kind == "transient" and effect.get("confirmed") is False) and not effect.get("intended")
    base = dict(number=number, kind=kind, subject=subject, certainty=_certainty(kind, item, effect), ranks=ranks,
                metric=metric, since=since, until=until, counts=counts)
    label = LABELS.get(str(item.get("metric")), str(item.get("metric", "")))
    if kind == "persistent":
        if _replicas_item(effect) and isinstance(item.get("group"), list) and item["group"]:
            base["ranks"] = tuple(r for r in item["group"][0] if isinstance(r, int))  # the identical ranks
        return Finding(text=_persistent(label, effect, base["ranks"]), **base)
    if kind == "transient":
        peak = _int(effect.get("peak_step"))
        return Finding(text=_transient(label, effect), step=peak if peak is not None else since, **base)
    if kind == "nonfinite":
        return Finding(text=f"non-finite {label} from step {since} ({effect.get('value')} step(s) flagged)",
                       step=since, **base)
    if kind == "divergence":
        last = effect.get("last_in_sync")
        text = f"weights differ from the others' at step {since}" + (f" (last in sync at step {last})"
                                                                     if last is not None else "")
        return Finding(text=text, step=since, **{**base, "metric": None})
    if kind in ("data", "state", "config"):
        step = _int(item.get("step"))
        return Finding(text=_exact(kind, item, effect), step=step, **{**base, "metric": None,
                                                                     "since": since if since is not None else step})
    return Finding(text=_fields(item, effect), step=_int(item.get("step")), **{**base, "metric": metric})


def _replicas_item(f: Mapping[str, Any]) -> bool:
    """Ranks that should read their own data and are bit-identical (``replicas.py``)."""
    return bool(f.get("replicated")) and str(f.get("unit", "")).startswith("ranks with bit-identical")


def _persistent(label: str, f: Mapping[str, Any], ranks: Sequence[int]) -> str:
    span = _span(f)
    if _replicas_item(f):
        return f"{label} bit-identical on {ranks_text(ranks)}{span}: they read the same batches"
    if f.get("replicated") and str(f.get("unit", "")).startswith("classes of bit-identical"):
        return f"{label} bit-identical within each group, different between{span}"
    if "within" in f and "between" in f:
        return f"{label}: {float(f['within']):.2g} within vs {float(f['between']):.2g} between the groups{span}"
    amount = _amount(f)
    if f.get("attributable") is False:
        return (f"{label} differs between ranks, attributable to none at α (largest: rank {f.get('leading_rank')}, "
                f"{amount}){span}")
    reference = _inside(str(f.get("unit", "")))
    return f"{label} {amount}" + (f" ({reference})" if reference else "") + span


def _transient(label: str, f: Mapping[str, Any]) -> str:
    if f.get("replicated"):
        return (f"{label} left its bit-identical replicas at step {f.get('since_step')} ({f.get('steps')} step(s); "
                f"largest difference {float(f['value']):.3g})")
    more = f", {f['steps']} steps" if isinstance(f.get("steps"), int) and f["steps"] > 1 else ""
    reference = f"; healthy values ≤ {float(f['reference']):.2g}" if _number(f.get("reference")) is not None else ""
    return f"{label} spike at step {f.get('peak_step')} (robust z = {float(f['value']):+.3g}{more}{reference})"


def _exact(kind: str, item: Mapping[str, Any], f: Mapping[str, Any]) -> str:
    step = item.get("step")
    if kind == "data":
        cause = str(item.get("cause", "?"))
        text = f"data, {cause}: {DATA_CAUSES.get(cause, 'see the record')} (from step {step})"
    elif kind == "state":
        tensor = item.get("tensor") or item.get("metric") or "state"
        text = f"state: {tensor} differs between ranks (from step {step})"
    else:
        values = item.get("values") if isinstance(item.get("values"), list) else []
        shown = ", ".join(f"rank {r} = {_scalar(v)}" for r, v in enumerate(values[:8]))
        more = f", … ({len(values)} ranks)" if len(values) > 8 else ""
        text = f"config: {item.get('key')} differs" + (f": {shown}{more}" if shown else "")
    extra = _fields({}, {k: v for k, v in f.items() if k not in ("since_step", "intended", "detected_step")})
    intended = "; declared intended: not counted" if f.get("intended") else ""
    return text + (f"; {extra}" if extra else "") + intended


def _who(item: Mapping[str, Any], f: Mapping[str, Any]) -> tuple[str, tuple[int, ...]]:
    """The subject in words and the ranks the figure marks (the verdict's suspects of the item)."""
    if isinstance(item.get("rank"), int):
        return f"rank {item['rank']}", (item["rank"],)
    if isinstance(item.get("ranks"), list):
        ranks = tuple(r for r in item["ranks"] if isinstance(r, int))
        return (ranks_text(ranks) if ranks else "all ranks"), ranks
    group = item.get("group")
    if not isinstance(group, list) or not all(isinstance(g, list) for g in group):
        return "ranks", ()
    if f.get("attributable") is False and not f.get("replicated"):
        return "no rank named", ()
    groups = [[r for r in g if isinstance(r, int)] for g in group]
    if all(len(g) == 1 for g in groups):
        subject = ranks_text(tuple(g[0] for g in groups))
    else:
        subject = "groups " + " | ".join("{" + ", ".join(map(str, g)) + "}" for g in groups)
    sizes = sorted({len(g) for g in groups})
    marked = [r for g in groups for r in g if len(sizes) == 1 or len(g) == sizes[0]]
    return subject, tuple(marked)


def ranks_text(ranks: Sequence[int]) -> str:
    ranks = sorted(ranks)
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return "ranks " + ", ".join(map(str, ranks))


def _certainty(kind: str, item: Mapping[str, Any], f: Mapping[str, Any]) -> str:
    p = _number(item.get("p_value"))
    if kind == "transient" and f.get("confirmed") is False:
        return "unconfirmed: within the run's own tail" + (f", p = {p:.2g}" if p is not None else "")
    if kind in EXACT_KINDS or f.get("replicated") or p == 0.0:
        return "exact"
    if p is None:
        return "no p-value"
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def _amount(f: Mapping[str, Any]) -> str:
    value = _number(f.get("value"))
    unit = str(f.get("unit", ""))
    if value is None:
        return "?"
    if unit.startswith("relative"):
        return f"{value * 100:+.3g} %"
    return f"{value:+.3g}" if unit.startswith("difference") else f"{value:.3g} {unit}"


def _span(f: Mapping[str, Any]) -> str:
    since, until = f.get("since_step"), f.get("until_step")
    when = ""
    if since is not None:
        when = f" from step {since}" + (f" until step {until}" if until is not None else "")
    if isinstance(f.get("steps"), int) and isinstance(f.get("of"), int):
        when += f", on {f['steps']}/{f['of']} steps"
    return when


def _inside(unit: str) -> str:
    """``relative (rank vs the healthy ranks 0,1,2)`` → ``rank vs the healthy ranks 0,1,2``."""
    return unit[unit.find("(") + 1:unit.rfind(")")] if "(" in unit and unit.endswith(")") else ""


def _fields(item: Mapping[str, Any], effect: Mapping[str, Any]) -> str:
    """The scalar fields of an item and its effect, ``key=value`` (a kind this module does not know)."""
    pairs = [(k, v) for k, v in item.items() if k not in SKIPPED_FIELDS]
    pairs += [(k, v) for k, v in effect.items()]
    return ", ".join(f"{k}={_scalar(v)}" for k, v in pairs[:12])


def _scalar(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 80 else text[:79] + "…"


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None

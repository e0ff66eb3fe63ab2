"""The verdict in plain words: one line that opens the CLI summary.

``INCONSISTENT — rank 3: loss 11 % above the other ranks on 40/40 steps (p < 0.001); …``,
``consistent — no rank differs from the others beyond chance (α = 0.01, 40 steps)``,
``DIVERGED — rank 3's weights left the others at step 10 (last in sync at step 0)``.
Kept apart from the analysis so the wording can change without touching the statistics.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from testbed.diagnose.causes import cause_phrase
from testbed.diagnose.evidence import EXACT_KINDS, counts

if TYPE_CHECKING:
    from testbed.diagnose.evidence import Evidence
    from testbed.diagnose.verdict import Verdict

LABELS = {"loss": "loss", "grad_norm": "grad norm", "cos_to_mean": "cosine to mean",
          "pairwise_cos": "gradient cosine", "deviations": "deviations"}
MAX_SUBJECTS = 3


def headline(v: "Verdict") -> str:
    if v.status == "consistent":
        if v.world_size < 2:
            return f"consistent — world size {v.world_size}: nothing to compare ({v.steps} steps)"
        if v.steps == 0:
            return "consistent — no steps recorded"
        text = f"consistent — no rank differs from the others beyond chance (α = {v.alpha:g}, {v.steps} steps)"
        spikes = [e for e in v.evidence if e.kind not in EXACT_KINDS]  # only unconfirmed spikes can be left
        if spikes:
            text += "; unconfirmed spikes, within the run's own tail: " + _subjects(spikes, v)
        intended = sorted({str((e.details or {}).get("cause")) for e in v.evidence if e.kind in EXACT_KINDS})
        if intended:
            text += "; found as declared on purpose: " + ", ".join(intended)
        return text
    causes = [e for e in v.evidence if e.kind in EXACT_KINDS and counts(e)]
    if v.status == "diverged":
        div = [e for e in v.evidence if e.kind == "divergence"]
        text = "DIVERGED — " + _divergence(div)
        tensor = next((e for e in causes if e.kind == "state" and e.metric == "parameters"), None)
        if tensor is not None:
            text += "; " + cause_phrase(tensor, v.world_size)
        others = [cause_phrase(e, v.world_size, _explained(e, causes)) for e in causes if e is not tensor]
        rest = [e for e in v.evidence if e.kind not in ("divergence", *EXACT_KINDS) and counts(e)]
        return text + "".join("; " + p for p in others) + ("; also " + _subjects(rest, v) if rest else "")
    counted = [e for e in v.evidence if counts(e) and e.kind not in EXACT_KINDS]
    if causes:
        text = "INCONSISTENT — " + "; ".join(cause_phrase(e, v.world_size, _explained(e, causes)) for e in causes)
        return text + ("; also " + _subjects(counted, v) if counted else "")
    text = "INCONSISTENT — " + _subjects(counted, v)
    if v.world_size == 2 and any(e.kind == "persistent" for e in counted):
        text += " — with 2 ranks the difference cannot be attributed to either without a control run"
    unconfirmed = len(v.evidence) - len(counted)
    if unconfirmed:
        text += f" (+{unconfirmed} unconfirmed spike(s) within the run's own tail)"
    return text


def _explained(e: "Evidence", causes: list["Evidence"]) -> bool:
    """Unread samples are explained by ranks that overlap or replicate (the advice is theirs)."""
    cause = (e.details or {}).get("cause")
    return cause == "uncovered" and any((c.details or {}).get("cause") in ("overlap", "replicated", "epoch_repeat")
                                        for c in causes)


def _subjects(evidence: list["Evidence"], v: "Verdict") -> str:
    """``subject: phrase, phrase; subject: …`` — phrases that differ only in the metric are merged
    (``loss, grad norm and cosine to mean differ …``)."""
    by: dict[Any, dict[str, list[str]]] = {}
    for e in sorted(evidence, key=lambda e: e.group is None):  # splits first
        key = e.rank if e.rank is not None else tuple(tuple(g) for g in e.group or [])
        if e.effect.get("attributable") is False and not e.effect.get("replicated"):
            key = "unattributed"
        label, tail = _phrase(e, v)
        by.setdefault(key, {}).setdefault(tail, []).append(label)
    parts = [f"{_subject(key)}: " + ", ".join(f"{_and(labels)} {tail}".strip() for tail, labels in tails.items())
             for key, tails in list(by.items())[:MAX_SUBJECTS]]
    if len(by) > MAX_SUBJECTS:
        parts.append(f"+{len(by) - MAX_SUBJECTS} more")
    return "; ".join(parts)


def _and(labels: list[str]) -> str:
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def _subject(key: Any) -> str:
    if key == "unattributed":
        return "no rank named"
    if isinstance(key, int):
        return f"rank {key}"
    if all(len(g) == 1 for g in key):
        return "ranks " + " and ".join(str(g[0]) for g in key)
    return "groups " + " | ".join("{" + ", ".join(map(str, g)) + "}" for g in key)


def _p(p: float | None) -> str:
    if p is None:
        return ""
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def _phrase(e: "Evidence", v: "Verdict") -> tuple[str, str]:
    """(metric label, the rest of the phrase)."""
    f = e.effect
    label = LABELS.get(e.metric, e.metric)
    since = f.get("since_step")
    if e.kind == "nonfinite":
        return f"non-finite {label}", f"at step {since}" + (f" ({f['value']} steps)" if f["value"] > 1 else "")
    if f.get("replicated"):
        if e.group is not None and str(f.get("unit", "")).startswith("ranks with bit-identical"):
            who = ", ".join(map(str, e.group[0]))
            tail = "" if f.get("attributable") else "; which of them read their own data is not decidable"
            return label, (f"bit-identical on ranks {who} on {f['steps']}/{f['of']} steps: they read the same "
                           f"batches (exact){tail}")
        if e.group is not None and any(len(g) > 1 for g in e.group):
            return label, f"bit-identical within each group, different between, on {f['steps']}/{f['of']} steps (exact)"
        if f["unit"].startswith(("relative", "difference")):
            amount = f"{abs(f['value']) * 100:.3g} %" if f["unit"].startswith("relative") else f"{abs(f['value']):.3g}"
            word = "above" if f["value"] > 0 else "below"
            return label, f"{amount} {word} the (bit-identical) other ranks on {f['steps']}/{f['of']} steps (exact)"
        more = f" and at {f['steps'] - 1} more step(s)" if f["steps"] > 1 else ""
        return label, f"left its bit-identical replicas at step {since}{more} (exact: impossible for replicas)"
    if e.kind == "transient":
        more = f", {f['steps']} steps" if f["steps"] > 1 else ""
        p = f"; {_p(e.p_value)}" if e.p_value is not None else "; too short a run to judge"
        return label, (f"spike at step {f['peak_step']} (robust z = {f['value']:+.3g}{more}; "
                       f"healthy values ≤ {f['reference']:.2g}{p}, tail test)")
    if f.get("attributable") is False:
        value = f["value"]
        amount = f"{abs(value) * 100:.3g} %" if f["unit"].startswith("relative") else f"{abs(value):.3g}"
        word = "above" if value > 0 else "below"
        return label, (f"differs between ranks, attributable to none at α (largest: rank {f['leading_rank']}, "
                       f"{amount} {word} the others) ({_p(e.p_value)})")
    if e.metric in ("pairwise_cos", "deviations"):
        return label, f"{f['within']:.2g} within vs {f['between']:.2g} between the groups ({_p(e.p_value)})"
    value = f["value"]
    amount = f"{abs(value) * 100:.3g} %" if f["unit"].startswith("relative") else f"{abs(value):.3g}"
    span = f" on {f['steps']}/{f['of']} steps" + (f" from step {since}" if f["of"] < v.steps else "")
    if e.group is not None:
        a, b = (", ".join(map(str, g)) for g in e.group)
        if value < 0:  # say it the way round that reads as "higher"
            a, b = b, a
            amount = f"{(1 / (1 + value) - 1) * 100:.3g} %" if f["unit"].startswith("relative") else amount
        return label, f"{amount} higher on rank(s) {a} than on {b}{span} ({_p(e.p_value)})"
    word = "above" if value > 0 else "below"
    return label, f"{amount} {word} the other ranks{span} ({_p(e.p_value)})"


def _divergence(div: list["Evidence"]) -> str:
    f = div[0].effect
    last = f" (last in sync at step {f['last_in_sync']})" if f.get("last_in_sync") is not None else ""
    if div[0].rank is not None:
        ranks = [e.rank for e in div]
        who = f"rank {ranks[0]}'s" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks)) + "'"
        return f"{who} weights left the others at step {f['since_step']}{last}"
    groups = " | ".join("{" + ", ".join(map(str, g)) + "}" for g in div[0].group or [])
    return f"the ranks' weights split into {groups} at step {f['since_step']}{last} (no majority: not attributable)"


def verdict_cell(verdict: dict[str, Any]) -> str:
    """``inconsistent [3]`` / ``consistent`` / ``inconsistent groups [0, 1] | [2, 3]`` — a table cell."""
    status = str(verdict.get("status", "unknown"))
    if verdict.get("groups"):
        return f"{status} groups " + " | ".join(str(g) for g in verdict["groups"])
    return f"{status} {verdict['ranks']}" if verdict.get("ranks") else status

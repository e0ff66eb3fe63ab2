"""Rules across tables: does the model read what the dataset gives, does a perturbation name a key
the batches carry. Refused with the file and the field before any process starts (issue 23: ``mlp``
over ``alpaca_synthetic``, ``transformer`` or ``hf`` over ``synthetic`` and ``label_noise key =
"nokey"`` each failed inside every rank).

A registered function declares its keys as attributes (a kind without them is not checked):
a dataset's ``batch_keys`` are the keys of its batches; a model's ``batch_keys`` the ones its
``forward`` reads; a perturbation's ``batch_key_params`` name its parameters that must be one of
the dataset's keys.
"""
from __future__ import annotations

from typing import Any, Sequence

from testbed.scenario.errors import ScenarioError


def _keys(registry: Any, kind: str, attribute: str = "batch_keys") -> tuple[str, ...] | None:
    keys = getattr(registry.get(kind), attribute, None)
    return tuple(keys) if keys is not None else None


def check_batch_keys(model: Any, data: Any, perturbations: Sequence[Any], source: str) -> None:
    """ScenarioError if ``model`` reads a key ``data``'s batches lack, or a perturbation names one."""
    from testbed.scenario.tables import DATASETS, MODELS, PERTURBATIONS

    given = _keys(DATASETS, data.kind)
    if given is None:
        return
    needed = _keys(MODELS, model.kind)
    missing = [k for k in needed or () if k not in given]
    if missing:
        readers = [m for m in MODELS.names() if set(_keys(MODELS, m) or ("?",)) <= set(given)]
        raise ScenarioError(source, "model.kind", f"a model that reads the batches of [data] kind {data.kind!r} "
                            f"(they carry {', '.join(given)}; {model.kind!r} reads {', '.join(needed or ())}"
                            + (f"; models that fit: {', '.join(readers)}" if readers else "") + ")", model.kind)
    for i, p in enumerate(perturbations):
        for param in _keys(PERTURBATIONS, p.kind, "batch_key_params") or ():
            value = p.params.get(param, PERTURBATIONS.params(p.kind)[param].default)
            if value not in given:
                raise ScenarioError(source, f"perturbations[{i}].{param}", f"a key of the batches of [data] kind "
                                    f"{data.kind!r}: one of {', '.join(given)}", value)

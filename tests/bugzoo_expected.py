"""What testbed must say about each variant of the bug zoo's real scripts (``examples/bugs/``): the
verdict's status, its ranks, its exact causes and the online alarms with their steps. Shared by
``tests/test_bugzoo.py`` and ``benchmarks/bugzoo.py``.

Steps (3 ranks): ``ddp_train.py`` and ``lightning_train.py`` read 192 samples in batches of 8 - 8
steps per epoch; the state check runs at step 0 and every 10 steps (steps 0, 9, 19).
"""
from __future__ import annotations

import json
from pathlib import Path

#: variant -> (verdict status, ranks, exact causes, [(alarm kind, cause or None, step)])
DDP = {
    "none": ("consistent", [], [], []),
    "bn": ("consistent", [], [], []),
    "accum": ("consistent", [], [], []),
    "aug": ("consistent", [], [], []),
    "fixed_order": ("consistent", [], [], []),
    "no_set_epoch": ("inconsistent", [], ["epoch_repeat"], [("data", "epoch_repeat", 8)]),
    "shuffle_false": ("inconsistent", [], ["epoch_repeat"], [("data", "epoch_repeat", 8)]),
    "sampler_seed": ("inconsistent", [], ["overlap"], [("data", "overlap", None)]),
    "no_sampler": ("inconsistent", [], ["replicated"], [("data", "replicated", 0)]),
    "bn_no_broadcast": ("inconsistent", [], ["state"], [("state_differs", None, 9)]),
    "ckpt_rank0": ("diverged", [0], ["state"], [("weights_diverged", None, 0)]),
    "frozen_reinit": ("diverged", [2], ["state"], [("weights_diverged", None, 9)]),
    "nan_rank": ("inconsistent", [1], [], [("nonfinite", None, 10)]),
    "same_aug_seed": ("consistent", [], [], []),  # the blind spot docs/bugs.md states: no signal separates it
}
HF = {
    "none": ("consistent", [], [], []),
    "bn": ("consistent", [], [], []),
    "own_loader": ("inconsistent", [], ["replicated"], [("data", "replicated", 0)]),
    "no_broadcast_buffers": ("inconsistent", [], ["state"], [("state_differs", None, 9)]),
    "rank0_checkpoint": ("diverged", [0], ["state"], [("weights_diverged", None, 0)]),
}
LIGHTNING = {
    "none": ("consistent", [], [], []),
    "bn": ("consistent", [], [], []),
    "shuffle_false": ("consistent", [], [], []),  # the loader shows shuffle=False: declared by the callback
    "seed_rank": ("inconsistent", [], ["config", "overlap"], [("config_differs", None, 0), ("data", "overlap", None)]),
    "iterable": ("inconsistent", [], ["epoch_repeat", "replicated"], [("data", "replicated", 0),
                                                                      ("data", "epoch_repeat", 24)]),
    "bn_no_broadcast": ("inconsistent", [], ["state"], [("state_differs", None, 9)]),
    "frozen_reinit": ("diverged", [2], ["state"], [("weights_diverged", None, 9)]),
}



ONSETS = {  # the step each script's mistake starts to act (the alarm's latency is measured from here)
    "no_set_epoch": 8, "shuffle_false": 8, "sampler_seed": 0, "no_sampler": 0, "bn_no_broadcast": 1,
    "ckpt_rank0": 0, "frozen_reinit": 8, "nan_rank": 10, "own_loader": 0, "no_broadcast_buffers": 1,
    "rank0_checkpoint": 0, "seed_rank": 0, "iterable": 0,
}


def alarms_of(run_dir: Path) -> list[tuple[str, str | None, int]]:
    """(kind, cause, step) of every alarm in a record's events.jsonl."""
    events = run_dir / "events.jsonl"
    lines = events.read_text().splitlines() if events.exists() else []
    return [(e["kind"], e.get("cause"), e["step"]) for e in map(json.loads, lines) if e.get("event") == "alarm"]


def alarm_mismatch(run_dir: Path, expected: list[tuple[str, str | None, int | None]]) -> str:
    """"" when the record's alarms are the expected ones (kinds and causes in order; steps where given)."""
    raised = alarms_of(run_dir)
    same = [(k, c) for k, c, _ in raised] == [(k, c) for k, c, _ in expected] and all(
        s is None or s == got for (_, _, s), (_, _, got) in zip(expected, raised))
    return "" if same else f"alarms {raised}, expected {expected}"

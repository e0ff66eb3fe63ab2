"""record — the run directory on disk: ``run.json`` (atomic), ``metrics.jsonl`` (flushed, whole lines),
``events.jsonl``, rank reports, and the readers of all of them.

Imports: the standard library only.
"""

"""diagnose — pure analysis of recorded rows: attribution and the verdict; imports numpy and the standard library only, never torch.

``diagnose(rows)`` gives the run's ``Verdict`` (consistent / inconsistent / diverged, with the ranks,
groups, first step and p-valued evidence; ``METRICS.md``, "The verdict"). ``SequentialTest`` is the
online counterpart: an anytime-valid test fed one row at a time.
"""
from __future__ import annotations

from testbed.diagnose.sequential import Alarm, SequentialTest
from testbed.diagnose.verdict import Evidence, Verdict, diagnose

__all__ = ["Alarm", "Evidence", "SequentialTest", "Verdict", "diagnose"]

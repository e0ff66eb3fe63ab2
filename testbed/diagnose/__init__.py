"""diagnose — pure analysis of recorded rows: summaries, outlier attribution, and the verdict.

``diagnose(rows)`` gives the run's ``Verdict`` (consistent / inconsistent / diverged, with the ranks,
groups, first step and p-valued evidence; ``METRICS.md``, "The verdict"). ``SequentialTest`` is the
online counterpart: an anytime-valid test fed one row at a time.

Imports: numpy and the standard library only (no torch), so every judgement can be tested on
simulated streams without processes.
"""
from __future__ import annotations

from testbed.diagnose.sequential import Alarm, SequentialTest
from testbed.diagnose.verdict import Evidence, Verdict, diagnose, verdict_record

__all__ = ["Alarm", "Evidence", "SequentialTest", "Verdict", "diagnose", "verdict_record"]

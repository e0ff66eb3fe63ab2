"""diagnose — pure analysis of recorded rows: summaries, outlier attribution, and the verdict.

Imports: numpy and the standard library only (no torch), so every judgement can be tested on
simulated streams without processes.
"""

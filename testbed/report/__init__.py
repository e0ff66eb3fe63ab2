"""report — figures and the self-contained HTML page made from run and sweep directories.

Imports: record, diagnose, matplotlib (lazily).
"""

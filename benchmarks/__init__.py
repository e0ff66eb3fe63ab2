"""Benchmarks (not part of the timed test suite): ``python benchmarks/overhead.py --quick``."""

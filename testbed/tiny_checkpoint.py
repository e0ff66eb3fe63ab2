"""``python -m testbed.tiny_checkpoint DIR [--pangu]`` — the stable name of the tiny-checkpoint tool.

The code lives in :mod:`testbed.workloads.tiny_checkpoint`.
"""
from testbed.workloads.tiny_checkpoint import main

if __name__ == "__main__":
    raise SystemExit(main())

"""``torchrun --nproc-per-node N -m testbed.worker SCENARIO --out DIR`` — the stable launch name.

The rank's code lives in :mod:`testbed.engine.worker`; this alias keeps the documented command
(and every launch plan already printed) working.
"""
from testbed.engine.torchrun import main

if __name__ == "__main__":
    raise SystemExit(main())

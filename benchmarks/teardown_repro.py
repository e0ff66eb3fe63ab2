"""Deterministic reproduction of issue 17: a gloo rank aborts at interpreter exit with "terminate
called without an active exception" (SIGABRT) after its work is done. Not part of the test suite.

    torchrun --standalone --nproc-per-node 2 benchmarks/teardown_repro.py            # rank 0 aborts
    torchrun --standalone --nproc-per-node 2 benchmarks/teardown_repro.py --release  # exits cleanly

What the race needs, forced here (testbed/engine/teardown.py has the whole story):
1. a gloo worker thread drops the last reference to a finished work launched inside ``backward()``
   (as DDP's and the testbed hook's all-reduces are): the work's captured thread-local state holds a
   Python object, so the thread waits for the GIL - here rank 1 joins the all-reduce 0.5 s late;
2. the main thread keeps the GIL until finalization has begun - here a switch interval of 1000 s
   and 1 s of pure Python (in a real job: the few ms between the last collective and exit); the
   tensors are globals, as in a script (freeing a tensor earlier can release the GIL, and the
   waiting thread would then finish in time);
3. the process group outlives the script and is destroyed in the final garbage collection, whose
   destructor releases the GIL: the waiting thread takes it from a finalizing interpreter, Python
   ends it with ``pthread_exit`` inside a C++ destructor, and ``std::terminate`` aborts the process.
``--release`` calls ``testbed.engine.teardown.release_gloo()`` at the end of the script (what
``testbed.attach``'s exit handler and the testbed's worker do), which joins the thread while the
interpreter is alive.
"""
from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist


def main() -> None:
    global TENSOR, LEAF  # module globals, as in a script: freed only during finalization
    dist.init_process_group("gloo")
    TENSOR = torch.ones(4)
    if dist.get_rank() == 1:
        time.sleep(0.5)
        dist.all_reduce(TENSOR)
        time.sleep(2.0)  # stay alive until rank 0 has exited
    else:
        LEAF = torch.ones(3, requires_grad=True)
        LEAF.register_hook(lambda grad: (dist.all_reduce(TENSOR, async_op=True), grad)[1])  # Work not kept
        (LEAF * 2).sum().backward()
        sys.setswitchinterval(1000.0)
        sum(i * i for i in range(10_000_000))  # about 1 s holding the GIL while the all-reduce finishes
    if "--release" in sys.argv[1:]:
        from testbed.engine import teardown

        teardown.release_gloo()


TENSOR = LEAF = None
if __name__ == "__main__":
    main()

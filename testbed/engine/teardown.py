"""Clean exit for gloo jobs: join gloo's worker threads while the interpreter is still fully alive.

Why (issue 17; measured with torch 2.13 CPU, Python 3.11, see docs/reliability.md):

1. Every ``ProcessGroupGloo`` work captures the caller's thread-local state. Works launched inside
   ``backward()`` (DDP's bucket all-reduces, the testbed comm hook's) hold a Python object there
   (``torch.autograd.graph._engine_run_backward`` stashes a ``contextvars`` context in TLS), and
   output tensors created in Python hold their Python objects. A gloo worker thread
   (``pt_gloo_runloop``) that drops the last reference to a finished work must take the GIL.
2. The process group outlives ``destroy_process_group()``: DDP's constructor imports
   ``torch.distributed.nn.functional`` lazily (through ``torch.distributed._shard``), whose
   collectives take ``group=group.WORLD`` as a default argument, so after ``init_process_group``
   those defaults keep the default group alive; a DDP model still referenced at exit keeps it alive
   through its reducer too. The group, with its worker threads, is then destroyed in the
   interpreter's final garbage collection, and its destructor releases the GIL.
3. If a worker thread was already waiting for the GIL (step 1) when finalization began, it gets the
   GIL at that moment, Python 3.11 ends it with ``pthread_exit`` inside a C++ destructor
   (``~ThreadLocalState``, noexcept), and the C++ runtime calls ``std::terminate``: "terminate called
   without an active exception", SIGABRT, after the training loop had finished.

A second failure of the same chain, a deadlock rather than an abort: a ``c10d::Reducer`` is a
pybind11 object freed *with the GIL held*. If it held the last reference to its gloo group (the
script called ``destroy_process_group()``, then the DDP model went out of scope, e.g. when the
training function returned), ``~ProcessGroupGloo`` joins the worker threads while holding the GIL,
and a worker still dropping its last finished work (step 1) waits for the GIL forever. Seen as
3 hung ranks over 14 runs of ``tests/test_monitor.py`` (one rank stuck in ``std::thread::join`` under
``Reducer::~Reducer``). Python ``ProcessGroup`` objects release the GIL in their destructor, so
:func:`register` keeps a Python reference to the attached model's gloo group: the reducer is then
never the last owner, and the group is destroyed by :func:`at_exit`, GIL released.

:func:`release_gloo` removes condition 2: it destroys the gloo process groups and drops every
reference it knows of (the default group, the reducers of the given DDP models, the stale
defaults of ``torch.distributed.nn.functional``), dropping a Python ``ProcessGroup`` last, so that
the group's destructor (which releases the GIL) joins the worker threads now; a thread waiting for
the GIL gets it from a live interpreter and finishes normally. ``testbed.attach`` registers
:func:`at_exit` with ``atexit`` (which runs before finalization), so a user's script needs nothing;
the testbed's own worker calls :func:`release_gloo` after its final barrier.

Scope: gloo only (the default group's backend is checked); NCCL / HCCL groups are left to the
caller's ``destroy_process_group()``. A process group the caller still references itself (a
``dist.new_group`` kept in a global, a DDP model the testbed was not attached to) is not destroyed
early: drop those references, or destroy the group, before the script ends (docs/monitor.md).
"""
from __future__ import annotations

import atexit
import itertools
import gc
import sys
import types
import weakref
from pathlib import Path
from typing import Any, Iterable

import torch.distributed as dist

# Thread names torch / gloo give their threads (Linux): the group's workers and the TCP event loop.
GLOO_THREAD_NAMES = ("pt_gloo_runloop", "gloo_tcp_loop")

_attached: "weakref.WeakSet[Any]" = weakref.WeakSet()  # DDP models the monitor was attached to
# Their Monitors (their hook state may hold a group), by attach order: at exit every rank closes them
# in the same order, so their close() barriers meet (a WeakSet's order differs between processes,
# and each rank then waited out the check-in deadline in another monitor's barrier).
_monitors: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_attach_order = itertools.count()
_held_groups: list[Any] = []  # gloo groups of attached models, held so no C++ reducer is their last owner
_registered = False


def gloo_threads() -> list[str] | None:
    """Names of this process's live gloo threads (Linux ``/proc``); None where that cannot be read."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    names = []
    for task in tasks.iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:  # the thread ended while we looked
            continue
        if name in GLOO_THREAD_NAMES:
            names.append(name)
    return names


def register(ddp_model: Any, monitor: Any) -> None:
    """Remember ``ddp_model`` and its monitor (weakly); make sure :func:`at_exit` runs at exit."""
    global _registered
    _attached.add(ddp_model)
    _monitors[next(_attach_order)] = monitor
    group = getattr(ddp_model, "process_group", None)  # DDP's; FSDP2 keeps its groups in Python objects
    if group is not None and _is_gloo(group) and all(g is not group for g in _held_groups):
        _held_groups.append(group)
    if not _registered:
        atexit.register(at_exit)
        _registered = True


def at_exit() -> None:
    """The ``atexit`` handler: end the monitors still open - as failed when an exception ended the
    script (the interpreter sets ``sys.last_value`` before it runs ``atexit``), else as closed - then
    :func:`release_gloo` for every attached DDP model still alive."""
    try:
        failure = getattr(sys, "last_value", None)
        for _, monitor in sorted(_monitors.items(), key=lambda item: item[0]):
            if isinstance(failure, BaseException):
                monitor.fail(failure)
            else:
                monitor.close()
            monitor.state.process_group = None  # an explicit group passed to attach()
        release_gloo(list(_attached))
    except Exception as e:  # noqa: BLE001 - never turn a finished job's exit into a traceback
        sys.stderr.write(f"[testbed] teardown at exit: {type(e).__name__}: {e}\n")


def release_gloo(ddp_models: Iterable[Any] = ()) -> None:
    """Destroy the gloo process groups now and join their worker threads (see the module docstring).

    Call it when no collective is in flight (after the last one completed): joining waits for
    queued work. Does nothing to a default group of another backend. The DDP models lose their
    reducer (they cannot run another backward): use it at the very end.
    """
    groups: list[Any] = _held_groups[:]  # Python ProcessGroup objects, released last (their destructor drops the GIL)
    _held_groups.clear()
    if dist.is_initialized():
        if dist.get_backend() != "gloo":
            return
        groups.extend(_registered_groups())
        dist.destroy_process_group()
    for ddp in ddp_models:
        groups.extend(_detach_reducer(ddp))
    groups.extend(_drop_stale_default_groups())
    gc.collect()  # cycles that still reference a model: freed while `groups` keeps every group alive
    groups.clear()  # the last references: the groups are destroyed here, their threads joined


def _is_gloo(group: Any) -> bool:
    """Whether ``group`` is a live gloo group (False where torch no longer knows it)."""
    try:
        return dist.get_backend(group) == "gloo"
    except (RuntimeError, ValueError):
        return False


def _registered_groups() -> list[Any]:
    """Every process group torch knows of (the default one and ``new_group``s)."""
    world = getattr(dist.distributed_c10d, "_world", None)
    known = list(getattr(world, "pg_map", {}) or {})
    default = dist.group.WORLD
    return known + ([default] if default is not None else [])


def _detach_reducer(ddp: Any) -> list[Any]:
    """Drop the DDP model's reducer (and the logger holding it): they hold its process group in C++.
    Returns the model's Python process group, which the caller releases after the reducer."""
    state = getattr(ddp, "__dict__", {})
    group = state.get("process_group")
    for name in ("logger", "reducer"):
        state.pop(name, None)
    if group is not None:
        state["process_group"] = None
    return [group] if group is not None else []


def _drop_stale_default_groups() -> list[Any]:
    """``torch.distributed.nn.functional`` evaluates ``group=group.WORLD`` when first imported; DDP
    imports it after ``init_process_group``, so its defaults keep the (destroyed) default group alive.
    Once no group is initialized, reset them to None - what they are when the module is imported
    before ``init_process_group`` (None means the default group). Returns the groups removed."""
    module = sys.modules.get("torch.distributed.nn.functional")
    if module is None or dist.is_initialized():
        return []
    removed: list[Any] = []
    for fn in list(vars(module).values()):
        if not isinstance(fn, types.FunctionType) or not fn.__defaults__:
            continue
        stale = [d for d in fn.__defaults__ if isinstance(d, dist.ProcessGroup)]
        if stale:
            removed.extend(stale)
            fn.__defaults__ = tuple(None if isinstance(d, dist.ProcessGroup) else d for d in fn.__defaults__)
    return removed

"""Stop signals end a monitored script with a finalized record, then behave as they did before.

Python's default SIGTERM / SIGHUP kill the process without running ``atexit``: torchrun stopping a
job (a peer failed, Ctrl-C on the launcher, a scheduler's preemption) left the monitor's
``run.json`` at ``running``. While a monitor is open, SIGTERM, SIGINT and SIGHUP first finalize
every open monitor (status ``failed``, "stopped by SIGTERM at step k"; its peers learn of it through
the store), then the handlers that were there before are put back and the signal is passed on: a
handler the script installed is called, the default action happens (SIGTERM and SIGHUP end the
process by the signal, SIGINT raises KeyboardInterrupt). A signal the script ignores (``nohup``:
SIGHUP is SIG_IGN) stays ignored and finalizes nothing. Handlers can only be set from the main
thread; a monitor attached elsewhere relies on ``atexit`` alone.

An exception escaping the training loop needs nothing here: the interpreter sets ``sys.last_value``
before it runs the ``atexit`` handlers, and ``engine.teardown.at_exit`` closes the open monitors
as failed with that exception.
"""
from __future__ import annotations

import os
import signal
import threading
import weakref
from types import FrameType
from typing import Any, Callable

STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, n))

_open: "weakref.WeakSet[Any]" = weakref.WeakSet()  # monitors with a ``stopped(signame)`` method
_previous: dict[int, Callable[..., Any] | int | None] = {}
_handling = False


def watch(monitor: Any) -> None:
    """Finalize ``monitor`` on a stop signal (installs the handlers while any monitor is open)."""
    _open.add(monitor)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in STOP_SIGNALS:
        current = signal.getsignal(sig)
        if current is _on_signal or current == signal.SIG_IGN or current is None:
            continue  # ours already; ignored on purpose; or set from C (left alone)
        _previous[sig] = current
        signal.signal(sig, _on_signal)


def unwatch(monitor: Any) -> None:
    """``monitor`` is closed; the last one to close puts the previous handlers back."""
    _open.discard(monitor)
    if not len(_open):
        restore()


def restore() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, handler in list(_previous.items()):
        if signal.getsignal(sig) is _on_signal:
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        del _previous[sig]


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _handling
    if _handling:
        return  # a second signal while the record is written: the record comes first
    _handling = True
    previous = _previous.get(signum, signal.SIG_DFL)
    try:
        name = signal.Signals(signum).name
        for monitor in list(_open):
            monitor.stopped(name)
    finally:
        restore()
        _handling = False
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        os.kill(os.getpid(), signum)  # the default action, now that the handler is back

"""Signals that end the launcher end it like Ctrl-C: the run is finalized, not abandoned.

SIGTERM (``timeout``, CI cancellation, a scheduler) and SIGHUP (a closed terminal) used to kill
the launcher outright: exit -15, nothing printed, ``run.json`` left ``running`` and the ranks only
reaped by their parent-death signal. Inside :class:`StopOnSignals` they raise
:class:`LauncherStopped` in the main thread instead, so the launcher's ``finally`` kills the
ranks, repairs the record and writes the final status. During that cleanup further signals (a
second Ctrl-C, ``timeout``'s repeat) are noted, not obeyed: the record must be finished.

Launchers in other threads (the gate runs ``--jobs`` scenarios in a thread pool) cannot receive a
signal; the main thread's handler also *requests a stop* (``request_stop``), which every launcher
polls (``check_stop``) while it watches its ranks, and a sweep between its levels: so SIGTERM or
Ctrl-C to ``testbed gate`` stops the scenarios in flight within a poll and each finalizes its
record. The request lasts until the outermost ``StopOnSignals`` ends (or ``clear_stop``).
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Callable

#: the signals that stop the launcher (SIGINT already raises KeyboardInterrupt)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_requested: list[int] = []  # the signal a stop was requested by (process-wide; see the module doc)
_depth = [0]  # nested StopOnSignals in the main thread


def request_stop(signum: int) -> None:
    """Ask every launcher in this process to stop as if it had received ``signum``."""
    if not _requested:
        _requested.append(int(signum))


def stop_requested() -> int | None:
    return _requested[0] if _requested else None


def check_stop() -> None:
    """Raise ``LauncherStopped`` (or KeyboardInterrupt for SIGINT) if a stop was requested."""
    if _requested:
        if _requested[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise LauncherStopped(_requested[0])


def clear_stop() -> None:
    _requested.clear()


def exit_code(exc: BaseException) -> int:
    """The conventional exit status of a run stopped by ``exc``: 128 + the signal (130 for Ctrl-C)."""
    return 128 + (exc.signum if isinstance(exc, LauncherStopped) else int(signal.SIGINT))


class LauncherStopped(KeyboardInterrupt):
    """A stop signal reached the launcher; a KeyboardInterrupt so every Ctrl-C path handles it."""

    def __init__(self, signum: int):
        self.signum = signum
        self.signame = signal.Signals(signum).name
        super().__init__(f"{self.signame} received")


class StopOnSignals:
    """While active (main thread only; elsewhere it does nothing), SIGTERM/SIGHUP raise
    LauncherStopped; ``hold()`` then turns every stop signal, SIGINT too, into a note."""

    def __init__(self) -> None:
        self.noted: list[int] = []
        self._previous: dict[int, Callable[..., Any] | int | None] = {}

    def __enter__(self) -> "StopOnSignals":
        if threading.current_thread() is threading.main_thread():
            _depth[0] += 1
            for sig in (*STOP_SIGNALS, signal.SIGINT):
                self._previous[sig] = signal.getsignal(sig)
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._raise)
        return self

    def hold(self) -> None:
        for sig in self._previous:
            signal.signal(sig, self._note)

    def __exit__(self, *exc: Any) -> None:
        if not self._previous:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        _depth[0] -= 1
        if _depth[0] == 0:
            clear_stop()

    def _raise(self, signum: int, frame: FrameType | None) -> None:
        request_stop(signum)
        raise LauncherStopped(signum)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.noted.append(signum)

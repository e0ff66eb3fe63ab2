"""The monitor's check-in: before its collective, every rank says it reached the step - or the job
ends with an error that names the ranks that did not, instead of hanging.

A rank that stops calling ``monitor.step`` while the others go on (the "log on rank 0 only"
mistake, a loop that ends early on one rank, a hang) used to leave every rank waiting in the step's
all-gather until killed. Before that collective each rank now writes ``s<step>/r<rank>`` into the
job's c10d store (the default group's: TCPStore under torchrun, any backend) and waits for every
rank's key, polling with ``check`` (no blocking call, so a signal is handled at once). It stops:

- at once when a peer ended (closed its monitor, failed, was stopped by a signal): its end marker
  says which rank, where and why (``RankEnded``);
- within about a second when a peer began the backward pass of a later step without calling
  ``step`` (its comm hook leaves a marker; ``SkippedStep``);
- when the ranks planned different work for the step - measured or not, pairwise, state check, a
  different payload - so their collectives would not match (``CadenceMismatch``), before any
  collective is issued;
- at the deadline (``MissingRanks``): ``timeout_s`` if given, else ``max(floor_s, factor x the
  median interval between this rank's check-ins)``.

No collective is ever issued unless every rank checked in for it, so an error leaves no collective
half-done and the process can exit cleanly. Cost per checked-in step: a set, a check or a few, a
multi_get and a delete (``benchmarks/overhead.py --state-check`` measures it with the rest).
"""
from __future__ import annotations

import json
import statistics
import time
from collections import deque
from typing import Any, Callable, Sequence

import torch.distributed as dist

FLOOR_S = 60.0  # the shortest default deadline
FACTOR = 20.0  # x the median step interval
EVENTS_EVERY_S = 0.5  # how often a waiting rank looks at its peers' end / skip markers
MAX_POLL_S = 0.05  # longest sleep between two checks of the awaited keys


class CheckInError(RuntimeError):
    """The ranks cannot go on together; the message names the ranks, the step and why (one line)."""

    def __init__(self, message: str, ranks: Sequence[int] = ()):
        super().__init__(message)
        self.ranks = list(ranks)


class MissingRanks(CheckInError):
    """Some ranks did not reach the step before the deadline."""


class RankEnded(CheckInError):
    """A peer closed its monitor, failed or was stopped while this rank waited for it."""


class SkippedStep(CheckInError):
    """A peer began a later step's backward without calling ``monitor.step`` for this one."""


class CadenceMismatch(CheckInError):
    """The ranks planned different collectives for the same step."""


class CheckIn:
    """One monitor's check-ins on ``store`` under ``prefix`` (the same on every rank)."""

    def __init__(self, store: Any, prefix: str, rank: int, world_size: int, *, timeout_s: float | None = None,
                 floor_s: float = FLOOR_S, factor: float = FACTOR):
        self.store, self.prefix, self.rank, self.world_size = store, prefix, rank, world_size
        self.timeout_s, self.floor_s, self.factor = timeout_s, floor_s, factor
        self._intervals: deque[float] = deque(maxlen=50)
        self._last_arrival: float | None = None
        self._own_keys: list[str] = []
        self._events_seen = 0

    # ---- the step barrier ------------------------------------------------------------------
    def deadline_s(self) -> float:
        """Seconds a rank waits for its peers at a step (module doc)."""
        if self.timeout_s is not None:
            return self.timeout_s
        median = statistics.median(self._intervals) if self._intervals else 0.0
        return max(self.floor_s, self.factor * median)

    def arrive(self, step: int, plan: str, backwards: int) -> None:
        """Block until every rank reached ``step`` with the same ``plan``; else raise a CheckInError.
        ``backwards``: the synchronising backward passes this rank ran in the step."""
        now = time.monotonic()
        if self._last_arrival is not None:
            self._intervals.append(now - self._last_arrival)
        self._last_arrival = now
        keys = [self._key(f"s{step}", r) for r in range(self.world_size)]
        self._set(keys[self.rank], plan)
        self._events_seen = -1  # look at every marker once per wait, however old
        self._wait(keys, f"step {step}", lambda: self._fatal_events(step, backwards))
        plans = [v.decode() for v in self.store.multi_get(keys)]
        if len(set(plans)) > 1:
            groups = {p: [r for r, q in enumerate(plans) if q == p] for p in plans}
            what = "; ".join(f"ranks {rs}: {describe_plan(p)}" for p, rs in groups.items())
            raise CadenceMismatch(f"testbed monitor: the ranks planned different collectives for step {step} "
                                  f"({what}); attach the monitor with the same options on every rank",
                                  [r for r, p in enumerate(plans) if p != plans[0]])
        self._forget_own_keys()
        self._own_keys = [keys[self.rank]]
        self._last_arrival = time.monotonic()

    def mark_extra_backward(self, step: int, backwards: int) -> None:
        """This rank begins its synchronising backward number ``backwards`` (>= 2) without having
        called ``step`` for ``step``: a peer waiting there with fewer learns it was skipped."""
        self._set(self._key("skip", self.rank), json.dumps({"step": step, "backwards": backwards}))
        self.store.add(self._key("events"), 1)

    def end(self, kind: str, what: str, step: int | None = None, error: str | None = None) -> None:
        """This rank's monitor ends. ``kind``: ``closed`` | ``failed`` | ``stopped``; ``what``: the
        words (``closed its monitor after step 9``). Peers waiting for it stop at once. Never raises
        (it runs while a job ends)."""
        try:
            marker = {"rank": self.rank, "kind": kind, "what": what, "step": step, "error": error}
            self._set(self._key("end", self.rank), json.dumps(marker))
            self.store.add(self._key("events"), 1)
        except Exception:  # noqa: BLE001 - the store may be gone with the launcher
            pass

    def close_barrier(self, last_step: int | None) -> list[int]:
        """``close()`` on every rank: [] once all ranks are closing (the final state check may run),
        else the ranks that failed, were stopped or never came (no final check then)."""
        after = f" after step {last_step}" if last_step is not None else " before its first step"
        self.end("closed", f"closed its monitor{after}", last_step)  # first: a peer still stepping stops now
        keys = [self._key("close", r) for r in range(self.world_size)]
        self._set(keys[self.rank], "1")

        def others_ended() -> None:
            gone = [m["rank"] for m in self.ended_peers() if m.get("kind") != "closed"]
            if gone:
                raise RankEnded("peers ended", gone)

        try:
            self._wait(keys, "close()", others_ended)
        except CheckInError as e:
            return e.ranks or [-1]
        return []

    def ended_peers(self, exclude: Sequence[int] = ()) -> list[dict[str, Any]]:
        """The end markers of the other ranks (non-blocking; [] when the store is unreachable)."""
        try:
            return [m for r in range(self.world_size) if r != self.rank and r not in exclude
                    for m in [self._marker("end", r)] if m is not None]
        except Exception:  # noqa: BLE001
            return []

    # ---- one-off exchanges (attach) ---------------------------------------------------------
    def publish(self, name: str, value: str) -> None:
        self._set(self._key(name, self.rank), value)

    def collect(self, name: str, what: str) -> list[str]:
        """Every rank's ``publish(name, ...)`` value, in rank order (waits up to the deadline)."""
        keys = [self._key(name, r) for r in range(self.world_size)]
        self._wait(keys, what, lambda: None)
        return [v.decode() for v in self.store.multi_get(keys)]

    def announce(self, name: str, value: str) -> None:
        """Rank 0's decision, for every rank (``hear``)."""
        self._set(self._key(name), value)

    def hear(self, name: str, what: str) -> str:
        key = self._key(name)
        self._wait([key], what, lambda: None, who=[0])
        return self.store.get(key).decode()

    # ---- internals -------------------------------------------------------------------------
    def _key(self, name: str, rank: int | None = None) -> str:
        return f"{self.prefix}/{name}" + (f"/r{rank}" if rank is not None else "")

    def _set(self, key: str, value: str) -> None:
        self.store.set(key, value)

    def _marker(self, name: str, rank: int) -> dict[str, Any] | None:
        key = self._key(name, rank)
        return json.loads(self.store.get(key)) if self.store.check([key]) else None

    def _wait(self, keys: list[str], what: str, events: Callable[[], None], who: Sequence[int] | None = None) -> None:
        """Poll until every key exists: short sleeps (a signal is handled between them), the peers'
        markers every EVENTS_EVERY_S, MissingRanks at the deadline."""
        started = time.monotonic()
        deadline = started + self.deadline_s()
        pause, next_events = 0.0005, started + EVENTS_EVERY_S
        while not self.store.check(keys):
            now = time.monotonic()
            if now >= next_events:
                events()
                next_events = now + EVENTS_EVERY_S
            if now >= deadline:
                missing = [r for r, k in zip(who or range(len(keys)), keys) if not self.store.check([k])]
                waiting = [r for r in range(self.world_size) if r not in missing]
                advice = ("call monitor.step on every rank, every step (a rank that is only slower - a checkpoint "
                          "saved on one rank - needs attach(step_timeout_s=...))" if what.startswith("step") else
                          "call testbed.attach on every rank, with the same options")
                raise MissingRanks(f"testbed monitor: rank(s) {missing} did not reach {what} within "
                                   f"{now - started:.1f} s while rank(s) {waiting} did: {advice}", missing)
            time.sleep(pause)
            pause = min(pause * 2, MAX_POLL_S)

    def _fatal_events(self, step: int, backwards: int) -> None:
        """Raise if a peer ended, or skipped ``step`` (a later backward than this rank's)."""
        count = self.store.add(self._key("events"), 0)
        if count == self._events_seen:
            return
        self._events_seen = count
        for r in range(self.world_size):
            if r == self.rank or self.store.check([self._key(f"s{step}", r)]):
                continue  # arrived: whatever it did next is not this step's business
            ended = self._marker("end", r)
            if ended is not None:
                error = f": {ended['error']}" if ended.get("error") else ""
                raise RankEnded(f"testbed monitor: rank {r} {ended['what']}{error} - while rank {self.rank} waits "
                                f"at step {step} (the ranks must call monitor.step equally often)", [r])
            skip = self._marker("skip", r)
            if skip is not None and skip["step"] == step and skip["backwards"] > backwards:
                raise SkippedStep(f"testbed monitor: rank {r} did not call monitor.step for step {step}: it began "
                                  f"the next backward pass without it (call monitor.step on every rank, e.g. not "
                                  f"only under `if rank == 0`)", [r])

    def _forget_own_keys(self) -> None:
        for key in self._own_keys:
            self.store.delete_key(key)
        self._own_keys = []


def describe_plan(plan: str) -> str:
    """``measure, no pairwise, state check, 5 values`` from a plan string (``StepPath.plan_of``)."""
    try:
        fields = dict(part.split("=", 1) for part in plan.split(","))
    except ValueError:
        return plan
    return ", ".join(f"{k} {v}" for k, v in fields.items())


def default_store(group: dist.ProcessGroup | None) -> Any | None:
    """The c10d store the default group was created with (any backend), or None where torch does
    not expose it."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a private accessor: absent or failing means no check-in
        return None

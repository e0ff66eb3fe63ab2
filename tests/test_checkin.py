"""The monitor's check-in (engine/checkin.py) on a real c10d store, ranks as threads: a rank that never
comes is named at the deadline, one that ended or skipped a step is named at once, ranks that plan
different collectives are stopped before any collective, and a signal is handled while waiting."""
from __future__ import annotations

import signal
import threading
import time
from typing import Any, Callable

import pytest
import torch.distributed as dist

from testbed.engine.checkin import CadenceMismatch, CheckIn, MissingRanks, RankEnded, SkippedStep

PLAN = "measure=yes,pairwise=no,state check=no,gram shares=no,values=4"


def _ranks(n: int = 2, **kwargs: Any) -> list[CheckIn]:
    store = dist.HashStore()
    return [CheckIn(store, "t", r, n, **kwargs) for r in range(n)]


def _in_thread(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run ``fn`` beside the test; ``out["error"]`` / ``out["value"]`` once ``out["thread"]`` joined."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    out["thread"] = threading.Thread(target=run, daemon=True)
    out["thread"].start()
    return out


def test_ranks_that_arrive_pass_and_clean_up_their_keys() -> None:
    a, b = _ranks()
    for step in range(3):
        other = _in_thread(lambda: b.arrive(step, PLAN, 1))
        a.arrive(step, PLAN, 1)
        other["thread"].join(10)
        assert "error" not in other
    assert not a.store.check(["t/s0/r0"]) and not a.store.check(["t/s1/r1"])  # earlier steps' keys deleted


def test_a_rank_that_never_comes_is_named_at_the_deadline() -> None:
    a, _ = _ranks(timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(MissingRanks, match=r"rank\(s\) \[1\] did not reach step 4 within 0\.\d s while rank\(s\) \[0\]") as e:
        a.arrive(4, PLAN, 1)
    assert e.value.ranks == [1] and 0.3 <= time.monotonic() - started < 5


def test_the_default_deadline_follows_the_step_time_with_a_floor() -> None:
    a, _ = _ranks()
    assert a.deadline_s() == 60.0  # nothing observed yet: the floor
    a._intervals.extend([0.5, 9.0, 8.0])  # 20 x the median step interval
    assert a.deadline_s() == 160.0
    assert CheckIn(dist.HashStore(), "t", 0, 2, timeout_s=5.0).deadline_s() == 5.0


def test_a_peer_that_closed_or_failed_stops_the_wait_at_once() -> None:
    a, b = _ranks(timeout_s=60.0)
    b.end("failed", "failed at step 3", 3, "ValueError: boom")
    started = time.monotonic()
    with pytest.raises(RankEnded, match="rank 1 failed at step 3: ValueError: boom - while rank 0 waits at step 3"):
        a.arrive(3, PLAN, 1)
    assert time.monotonic() - started < 5  # not the 60 s deadline


def test_a_peer_that_ran_a_later_backward_without_step_is_named_at_once() -> None:
    """The "log on rank 0 only" mistake: rank 1's comm hook saw its second synchronising backward
    of step 2 without ``step`` in between, while rank 0 waits at step 2 after one."""
    a, b = _ranks(timeout_s=60.0)
    b.mark_extra_backward(2, 2)
    with pytest.raises(SkippedStep, match="rank 1 did not call monitor.step for step 2") as e:
        a.arrive(2, PLAN, 1)
    assert e.value.ranks == [1]


def test_accumulating_with_synchronising_backwards_is_not_a_skipped_step() -> None:
    """Two synchronising backwards per optimizer step on every rank (accumulation without no_sync):
    the marker says 2, the waiting rank ran 2 too, so it waits for the peer's check-in."""
    a, b = _ranks(timeout_s=60.0)
    b.mark_extra_backward(2, 2)

    def late() -> None:
        time.sleep(1.2)  # after the waiting rank has looked at the markers
        b.arrive(2, PLAN, 2)

    other = _in_thread(late)
    a.arrive(2, PLAN, 2)
    other["thread"].join(10)
    assert "error" not in other


def test_ranks_with_different_plans_stop_before_any_collective() -> None:
    a, b = _ranks(timeout_s=10.0)
    other = _in_thread(lambda: b.arrive(0, PLAN.replace("state check=no", "state check=yes"), 1))
    with pytest.raises(CadenceMismatch, match=r"ranks \[0\]: measure yes, pairwise no, state check no.*ranks \[1\]: "
                                              r"measure yes, pairwise no, state check yes"):
        a.arrive(0, PLAN, 1)
    other["thread"].join(10)
    assert isinstance(other.get("error"), CadenceMismatch)


def test_close_barrier_waits_for_closing_peers_and_gives_up_on_failed_ones() -> None:
    a, b = _ranks(timeout_s=30.0)
    other = _in_thread(lambda: b.close_barrier(5))
    assert a.close_barrier(5) == []
    other["thread"].join(10)
    assert other["value"] == []
    a, b = _ranks(timeout_s=30.0)
    b.end("failed", "failed at step 5", 5, "RuntimeError: x")
    assert a.close_barrier(5) == [1]


def test_a_signal_is_handled_while_waiting() -> None:
    """The wait polls (no blocking store call): a stop signal's Python handler runs at once, so a
    monitored job stopped while it waits for a peer still finalizes its record."""
    a, _ = _ranks(timeout_s=60.0)

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("stopped")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            a.arrive(0, PLAN, 1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 5

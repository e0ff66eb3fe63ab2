"""Fault perturbations: break one rank on purpose, to test the testbed itself.

A testbed that is flaky under failure is worse than none, so these kinds exist to prove that a
crashed, killed, hung or numerically broken rank ends the run cleanly, with a report naming the
rank and step, and with every completed step kept (see docs/reliability.md).

When a fault fires: every fault uses the ordinary perturbation window (``ranks``, ``start_step``,
``end_step``) and has no step parameter of its own. ``crash``, ``exit`` and ``hang`` fire at the
*first* active step, i.e. at ``start_step`` (the rank never runs another). ``nonfinite`` fires at
*every* active step: write ``start_step = k, end_step = k + 1`` to poison step k only.

``crash``, ``exit`` and ``hang`` act at the very start of the step (``StepPlan.before_step``),
after the rank has marked the step as started, so the error report and the launcher's progress
counters both name step k.
"""
from __future__ import annotations

import os
import resource
import signal as _signal
import time
from typing import Literal

import torch

from testbed.perturb.perturbations import Batch, StepPlan
from testbed.scenario.tables import PERTURBATIONS

SIGNALS = ("none", "SIGKILL", "SIGSEGV", "SIGABRT", "SIGTERM", "SIGBUS", "SIGFPE")
NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


class InjectedFault(RuntimeError):
    """Raised by the ``crash`` fault, so a report says plainly that the failure was injected."""


@PERTURBATIONS.register("crash")
def crash(plan: StepPlan, *, message: str = "injected crash") -> None:
    """The rank raises :class:`InjectedFault` at the start of the step (a Python-level failure
    with a traceback, like a bug in user code or an out-of-memory error)."""
    rank, step = plan.rank, plan.step

    def fail() -> None:
        raise InjectedFault(f"{message} (fault 'crash' on rank {rank} at step {step})")

    plan.before_step.append(fail)


@PERTURBATIONS.register("exit")
def exit_hard(plan: StepPlan, *, code: int = 3, signal: Literal[SIGNALS] = "none") -> None:  # type: ignore[valid-type]
    """The rank dies without a word: ``os._exit(code)``, or, if ``signal`` is set, that signal
    sent to itself (``SIGKILL`` = the OOM killer, ``SIGSEGV`` = a native crash). No Python
    cleanup runs and no error report is written, as with a real hard crash. Core dumps are
    switched off for the rank first, so a ``SIGSEGV`` leaves no core file behind."""

    def die() -> None:
        if signal == "none":
            os._exit(code)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.kill(os.getpid(), getattr(_signal, signal))
        time.sleep(60)  # the signal arrives asynchronously; never fall back into training
        os._exit(code)

    plan.before_step.append(die)


@PERTURBATIONS.register("hang")
def hang(plan: StepPlan) -> None:
    """The rank sleeps forever at the start of the step (a deadlock, a stuck filesystem, a peer
    that never joins the collective). Only the launcher's ``stall_timeout_s`` ends the run."""

    def sleep_forever() -> None:
        while True:
            time.sleep(3600)

    plan.before_step.append(sleep_forever)


@PERTURBATIONS.register("nonfinite")
def nonfinite(plan: StepPlan, *, value: Literal["nan", "inf", "-inf"] = "nan",
              target: Literal["grad", "loss"] = "grad") -> None:
    """Poison the rank's step with NaN or ±Inf.

    ``target = "grad"``: the first element of each local gradient bucket is set to ``value``
    before the all-reduce (the loss stays finite; the averaged gradient, hence every rank's
    weights, become non-finite). ``target = "loss"``: the first sample of the first
    floating-point input tensor is set to ``value``, so the local loss (and gradient) become
    non-finite; datasets with integer-only inputs (token ids) cannot do this — use "grad".
    """
    bad = NONFINITE[value]
    if target == "grad":
        def poison_grad(bucket: torch.Tensor, _gen: torch.Generator) -> None:
            bucket.view(-1)[0] = bad

        plan.grad_transforms.append(poison_grad)
        return

    def poison_loss(batch: Batch, _gen: torch.Generator) -> Batch:
        for key, tensor in batch.items():
            if tensor.is_floating_point():
                poisoned = tensor.clone()
                poisoned[0] = bad
                return {**batch, key: poisoned}
        raise ValueError(f"fault 'nonfinite' with target 'loss' needs a floating-point input tensor; "
                         f"this batch has {sorted(batch)} with no float tensor (use target = 'grad')")

    plan.batch_transforms.append(poison_loss)

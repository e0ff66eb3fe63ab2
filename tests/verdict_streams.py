"""Simulated per-rank metric streams for the verdict's tests: healthy (exchangeable) runs with the
things real training does to them — drift of level and of spread, shocks shared by every rank at
a step, heavy tails — and the faults the verdict must find (a rank offset, two groups, a spike).

A healthy stream draws every rank's noise from the same law at each step, independently of the
rank label; that is all the null hypothesis asks. Nothing here imports the testbed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

TAILS = ("normal", "t3", "cauchy", "spiky")


@dataclass(frozen=True)
class Stream:
    """One simulated run's recipe; ``rows(seed)`` builds its metrics rows."""

    world_size: int
    steps: int
    tails: str = "normal"
    noise: float = 0.02  # per-rank relative noise (σ of log loss)
    drift: float = 1.0  # loss falls by this factor (log) over the run; the spread grows by e^drift
    shock: float = 0.0  # σ of a per-step shock shared by all ranks (log scale)
    pairwise_every: int = 0  # N×N cosine matrix every k steps (0: none)
    offset: dict[int, float] = field(default_factory=dict)  # rank -> relative loss offset
    offset_from: int = 0
    offset_to: int | None = None  # the offset ends here (exclusive; None: it lasts)
    norm_offset: dict[int, float] = field(default_factory=dict)  # rank -> relative grad-norm offset
    grad_groups: tuple[tuple[int, ...], ...] = ()  # ranks sharing a gradient component (pairwise_cos)

    def rows(self, seed: int) -> list[dict[str, Any]]:
        rng = np.random.default_rng(seed)
        loss, norm, cos = self._arrays(rng)
        out = []
        for t in range(self.steps):
            row: dict[str, Any] = {"step": t, "loss": loss[t].tolist(), "grad_norm": norm[t].tolist(),
                                   "cos_to_mean": cos[t].tolist(), "flags": []}
            if self.pairwise_every and t % self.pairwise_every == 0:
                row["pairwise_cos"] = self._pairwise(rng)
            out.append(row)
        return out

    def arrays(self, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(loss, grad_norm, cos_to_mean), each ``[steps, world_size]``: the rows' values, fast."""
        return self._arrays(np.random.default_rng(seed))

    def _arrays(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n, t_count = self.world_size, self.steps
        frac = (np.arange(t_count) / max(1, t_count - 1))[:, None]
        spread = self.noise * np.exp(self.drift * frac)  # the spread drifts with the level
        shock = self.shock * rng.standard_normal((3, t_count, 1))
        e_loss, e_norm, e_cos = (self._noise(rng, (t_count, n)) for _ in range(3))
        common = rng.standard_normal((t_count, n))  # a rank's loss and grad norm move together
        log_loss = np.log(2.0) - self.drift * frac + shock[0] + spread * (0.7 * e_loss + 0.7 * common)
        log_norm = np.log1p(frac) + shock[1] + 2.5 * spread * (0.7 * e_norm + 0.7 * common)
        loss, norm = np.exp(np.clip(log_loss, -300, 300)), np.exp(np.clip(log_norm, -300, 300))
        cos = np.clip(0.5 + 0.1 * shock[2] + 0.03 * e_cos, -1, 1)
        for r, rel in self.offset.items():
            loss[self.offset_from:self.offset_to, r] *= 1 + rel
        for r, rel in self.norm_offset.items():
            norm[:, r] *= 1 + rel
        return loss, norm, cos

    def _noise(self, rng: np.random.Generator, n: tuple[int, int]) -> np.ndarray:
        if self.tails == "t3":
            return rng.standard_t(3, n) / np.sqrt(3)
        if self.tails == "cauchy":
            return rng.standard_cauchy(n)
        if self.tails == "spiky":  # mostly normal, now and then a 20σ excursion on some rank
            return rng.standard_normal(n) + 20 * (rng.random(n) < 0.01) * rng.choice([-1.0, 1.0], n)
        return rng.standard_normal(n)

    def _pairwise(self, rng: np.random.Generator) -> list[list[float]]:
        n, dim = self.world_size, 64
        grads = rng.standard_normal(dim) + rng.standard_normal((n, dim))  # shared signal + own noise
        for group in self.grad_groups:
            grads[list(group)] += 1.5 * rng.standard_normal(dim)  # a component only this group sees
        unit = grads / np.linalg.norm(grads, axis=1, keepdims=True)
        return (unit @ unit.T).tolist()

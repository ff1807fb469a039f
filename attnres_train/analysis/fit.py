"""Scaling-law fits ``L = A·C^(−α)`` and compute advantages, as in the AttnRes paper's §5.1.

Why a log-space least-squares line: ``log L = log A − α·log C`` is linear, so an ordinary least-squares line
through ``(log C, log L)`` gives ``A`` and ``α`` in closed form, recovers them exactly from noise-free
points, and needs nothing beyond numpy. Compute is measured in PFLOP/s-days (1e15 FLOP/s for a day), the
paper's unit, so fitted ``A`` values are comparable to its 1.891 / 1.870 / 1.865.

Compute advantage of a variant over a reference at budget ``C``: the variant reaches ``L_v = A_v·C^(−α_v)``;
the reference needs ``C_ref = (A_ref / L_v)^(1/α_ref)`` to get there; the advantage is ``C_ref / C``. The
paper's numbers (baseline 1.891·C^−0.057, Block 1.870·C^−0.058, C = 5.6) give 1.25×.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

SECONDS_PER_DAY = 86400.0
PFLOPS = 1e15


def pflops_days(flops: float) -> float:
    """FLOPs → PFLOP/s-days (the paper's compute unit)."""
    return float(flops) / (PFLOPS * SECONDS_PER_DAY)


@dataclass(frozen=True)
class PowerLaw:
    """``L(C) = A·C^(−alpha)``; ``r2`` is the coefficient of determination in log space, ``n`` the points."""

    A: float
    alpha: float
    r2: float = 1.0
    n: int = 0

    def loss(self, compute):
        """Predicted loss at ``compute`` (scalar or array, same unit as the fit)."""
        return self.A * np.power(compute, -self.alpha)

    def compute_for(self, loss: float) -> float:
        """Compute at which this law reaches ``loss`` (inverse of :meth:`loss`)."""
        if self.alpha <= 0:
            raise ValueError(f"alpha={self.alpha:g}: the loss does not fall with compute, so it has no inverse")
        if loss <= 0:
            raise ValueError(f"loss must be positive, got {loss!r}")
        return (self.A / loss) ** (1.0 / self.alpha)

    def describe(self) -> str:
        return f"{self.A:.4g}·C^(−{self.alpha:.4g})"


MIN_FIT_POINTS = 3


def fit_power_law(compute: Sequence[float], loss: Sequence[float], min_points: int = MIN_FIT_POINTS) -> PowerLaw:
    """Least-squares fit of ``log L = log A − α·log C``; needs ≥ ``min_points`` distinct positive compute values.

    The default is 3: a line through 2 points always fits them exactly (R² = 1), which says nothing about
    whether the loss follows a power law, and the extrapolated advantage then rests on two noisy numbers.
    """
    c = np.asarray(compute, dtype=np.float64)
    y = np.asarray(loss, dtype=np.float64)
    if c.shape != y.shape or c.ndim != 1:
        raise ValueError(f"compute and loss must be 1-D and of equal length, got {c.shape} and {y.shape}")
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(y))) or np.any(c <= 0) or np.any(y <= 0):
        raise ValueError("compute and loss must be finite and positive")
    if len(np.unique(c)) < max(2, min_points):
        raise ValueError(
            f"a power-law fit needs at least {max(2, min_points)} distinct compute values (sizes), got "
            f"{len(np.unique(c))}" + (" (a line through 2 points always has R² = 1)" if len(np.unique(c)) == 2 else "")
        )
    x, ly = np.log(c), np.log(y)
    xm, ym = x.mean(), ly.mean()
    slope = float(((x - xm) * (ly - ym)).sum() / ((x - xm) ** 2).sum())
    intercept = float(ym - slope * xm)
    resid = ly - (intercept + slope * x)
    total = float(((ly - ym) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / total if total > 0 else 1.0
    return PowerLaw(A=math.exp(intercept), alpha=-slope, r2=r2, n=int(len(c)))


def compute_advantage(reference: PowerLaw, variant: PowerLaw, budget: float) -> float:
    """How many times more compute ``reference`` needs to match ``variant``'s loss at ``budget``.

    ``= (A_ref / (A_v·budget^(−α_v)))^(1/α_ref) / budget``; > 1 means the variant is ahead.
    """
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget!r}")
    return reference.compute_for(float(variant.loss(budget))) / budget

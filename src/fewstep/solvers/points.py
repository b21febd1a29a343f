"""Points of a noise schedule: ``(t, alpha, sigma, lambda)`` of one time as float64 Python numbers.

The lowest layer of the solver framework: the registries (:mod:`fewstep.solvers.registry`), the
coefficients (:mod:`fewstep.solvers.coefficients`) and the compiler all read steps' ends as points.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..schedules import NoiseSchedule

__all__ = ["Point", "point", "points"]


class Point:
    """``(t, alpha, sigma, lambda)`` of one time, float64 Python numbers."""

    __slots__ = ("t", "alpha", "sigma", "lam")

    def __init__(self, t: float, alpha: float, sigma: float, lam: float) -> None:
        self.t, self.alpha, self.sigma, self.lam = t, alpha, sigma, lam

    def __repr__(self) -> str:
        return f"Point(t={self.t:.6g}, lambda={self.lam:.6g})"


def point(schedule: NoiseSchedule, t: float) -> Point:
    """The point of ``schedule`` at time ``t``."""
    a, s, lam = schedule.coefficients(float(t))
    return Point(float(t), float(a), float(s), float(lam))


def points(schedule: NoiseSchedule, times: Sequence[float]) -> list[Point]:
    """:func:`point` at many times in one vectorised schedule evaluation."""
    a, s, lam = (c.tolist() for c in schedule.coefficients(torch.tensor([float(t) for t in times], dtype=torch.float64)))
    return [Point(float(t), ai, si, li) for t, ai, si, li in zip(times, a, s, lam)]

"""Consistency-model multistep sampling (LCM): predict x0, re-noise it to the next level, repeat."""

from __future__ import annotations

from typing import Any

from ...schedules import NoiseSchedule
from ...timesteps import time_grid
from ..plan import SolverSchedule
from ..strategy import Step
from .building import check_eta, check_nfe, finish, register_preset

__all__ = ["lcm"]


@register_preset("lcm")
def lcm(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, renoise: float = 1.0, **grid: Any) -> SolverSchedule:
    """Consistency-model multistep sampling (Song et al. 2023; Luo et al. 2023, LCM): predict x0,
    re-noise it to the next level with fresh noise (the ``renoise`` noise rule, fraction ``renoise`` of
    the variance), repeat; the last step returns x0. Meant for consistency-distilled models;
    stochastic (needs a seed). Default grid on DiscreteVP: diffusers' trailing spacing."""
    n = check_nfe(nfe, 1, "lcm")
    nu = check_eta(renoise, "lcm", 1.0)
    times = time_grid(sched, n, spacing, **grid)
    steps = [Step(order=1, prediction="data", noise="renoise" if nu > 0 else "none", eta=nu)] * (n - 1) + [Step(order=1, prediction="data")]
    return finish("lcm", sched, times, steps)

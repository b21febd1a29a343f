"""EDM / k-diffusion presets in the VE variable (Karras et al. 2022): Euler, Heun and EDM's
stochastic Heun (``edm_sde``); ``s_churn > 0`` adds EDM's churn to Euler and Heun."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ...errors import SolverError
from ...schedules import NoiseSchedule
from ...timesteps import time_grid
from ..plan import SolverSchedule
from ..points import point
from ..strategy import Step
from .building import check_nfe, finish, pure_start, register_preset

__all__ = ["euler", "heun", "edm_sde"]


def _check_churn(name: str, s_churn: Any, s_tmin: Any, s_tmax: Any, s_noise: Any) -> tuple[float, float, float, float]:
    vals = []
    for what, v in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_tmax", s_tmax), ("s_noise", s_noise)):
        if not isinstance(v, (int, float, np.floating, np.integer)) or isinstance(v, bool) or not float(v) >= 0.0 or (what != "s_tmax" and math.isinf(float(v))):
            raise SolverError(f"preset {name!r}: {what} must be a number >= 0{'' if what == 's_tmax' else ' (finite)'}, got {v!r}")
        vals.append(float(v))
    return vals[0], vals[1], vals[2], vals[3]


def _churned(name: str, sched: NoiseSchedule, times: np.ndarray, steps: list[Step], s_churn: Any, s_tmin: Any, s_tmax: Any, s_noise: Any) -> SolverSchedule:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2; k-diffusion ``s_churn``): step ``i``
    first raises the VE noise level ``sigma_i`` (= sigma/alpha) by ``1 + gamma``, ``gamma =
    min(s_churn / N, sqrt(2) - 1)`` for ``s_tmin <= sigma_i <= s_tmax`` (else 0), with fresh noise
    scaled by ``s_noise`` (``Step.churn``; the compiler draws it from its own Brownian channel)."""
    churn, tmin, tmax, snoise = _check_churn(name, s_churn, s_tmin, s_tmax, s_noise)
    meta: dict[str, Any] = {}
    if churn > 0.0:
        gamma = min(churn / len(steps), math.sqrt(2.0) - 1.0)
        levels = [p.sigma / p.alpha if p.alpha > 0 else math.inf for p in (point(sched, float(t)) for t in times[:-1])]
        steps = [st.with_(churn=gamma, churn_noise=snoise) if tmin <= lv <= tmax else st for st, lv in zip(steps, levels)]
        meta = {"s_churn": churn, "s_tmin": tmin, "s_tmax": tmax if math.isfinite(tmax) else None, "s_noise": snoise}
    return finish(name, sched, times, steps, **meta)


@register_preset("euler")
def euler(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0, **grid: Any) -> SolverSchedule:
    """Euler in the VE variable (Karras et al. 2022 / k-diffusion): ``dx/dsigma = eps``; identical to
    noise-prediction DDIM. ``s_churn > 0``: EDM's stochastic Euler (``s_tmin``, ``s_tmax``, ``s_noise``
    as k-diffusion's ``sample_euler``). Default grid: :func:`fewstep.default_spacing`."""
    n = check_nfe(nfe, 1, "euler")
    times = time_grid(sched, n, spacing, **grid)
    return _churned("euler", sched, times, [Step(order=1, prediction="noise")] * n, s_churn, s_tmin, s_tmax, s_noise)


def _heun_steps(name: str, nfe: int, sched: NoiseSchedule, spacing: Any, grid: dict[str, Any]) -> tuple[np.ndarray, list[Step]]:
    n_eval = check_nfe(nfe, 1, name)
    lead = 1 if pure_start(sched, spacing, grid) else 0  # leave alpha = 0 with one Euler (DDIM) step
    n_heun = max(0, (n_eval - lead - 1) // 2)
    n_euler = n_eval - lead - 2 * n_heun
    times = time_grid(sched, lead + n_heun + n_euler, spacing, **grid)
    h = Step(order=2, prediction="noise", method="singlestep", stages=(1.0,), variant="bh2")
    euler1 = Step(order=1, prediction="noise")
    return times, [euler1] * lead + [h] * n_heun + [euler1] * n_euler


@register_preset("heun")
def heun(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0, **grid: Any) -> SolverSchedule:
    """Heun's second-order method in the VE variable (Karras et al. 2022, EDM Algorithm 1): 2 NFE per
    step, Euler on the last step into sigma = 0. An even NFE ends with two Euler steps.
    ``s_churn > 0``: EDM's stochastic Heun (Algorithm 2; k-diffusion ``sample_heun``)."""
    times, steps = _heun_steps("heun", nfe, sched, spacing, grid)
    return _churned("heun", sched, times, steps, s_churn, s_tmin, s_tmax, s_noise)


@register_preset("edm_sde")
def edm_sde(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, s_churn: float = 40.0, s_tmin: float = 0.05, s_tmax: float = 50.0, s_noise: float = 1.003, **grid: Any) -> SolverSchedule:
    """EDM's stochastic Heun sampler (Karras et al. 2022, Algorithm 2) with the settings of EDM's
    ImageNet-64 release (``S_churn=40, S_min=0.05, S_max=50, S_noise=1.003``): :func:`heun` with churn."""
    times, steps = _heun_steps("edm_sde", nfe, sched, spacing, grid)
    return _churned("edm_sde", sched, times, steps, s_churn, s_tmin, s_tmax, s_noise)

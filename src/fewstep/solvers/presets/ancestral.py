"""Ancestral and SDE presets: DDPM and Euler ancestral (first-order steps drawing part of the next
variance afresh), DPM-Solver++(2M) / (3M) SDE (multistep on the ``sde`` noise rule) and DPM-Solver++
SDE (singlestep, Brownian-correlated stage and step noise)."""

from __future__ import annotations

from typing import Any, Sequence

from ...errors import SolverError
from ...schedules import NoiseSchedule
from ..plan import SolverSchedule
from .building import ancestral_steps, check_eta, multistep, register_preset, singlestep

__all__ = ["ddpm", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_sde"]


@register_preset("ddpm")
def ddpm(nfe: int, sched: NoiseSchedule, *, spacing: str | Sequence[float] | None = None, eta: float = 1.0, **grid: Any) -> SolverSchedule:
    """DDPM ancestral sampling (Ho et al. 2020): each step samples the posterior
    ``q(x_t | x_s, x0)`` with ``x0`` predicted (variance "fixed_small"; over skipped steps the posterior
    of the jump, as diffusers' DDPMScheduler). Equal to DDIM with eta = 1."""
    return ancestral_steps("ddpm", nfe, sched, "data", eta, spacing, grid)


@register_preset("euler_ancestral")
def euler_ancestral(nfe: int, sched: NoiseSchedule, *, spacing: str | Sequence[float] | None = None, eta: float = 1.0, **grid: Any) -> SolverSchedule:
    """Euler ancestral (k-diffusion ``sample_euler_ancestral``; diffusers EulerAncestralDiscrete):
    an Euler step in sigma/alpha to ``sigma_down``, then ``sigma_up`` of fresh noise,
    ``sigma_up = min(sigma_t, eta sigma_t sqrt(1 - sigma_t^2 / sigma_s^2))`` in the VE variable. The
    same update as DDIM's eta, read from the noise prediction."""
    return ancestral_steps("euler_ancestral", nfe, sched, "noise", eta, spacing, grid)


@register_preset("dpmpp_2m_sde")
def dpmpp_2m_sde(nfe: int, sched: NoiseSchedule, *, eta: float = 1.0, spacing: Any = None, solver_type: str = "midpoint", lower_order_final: bool | None = None, **grid: Any) -> SolverSchedule:
    """DPM-Solver++(2M) SDE (Lu et al. 2022b; diffusers ``sde-dpmsolver++``, k-diffusion
    ``sample_dpmpp_2m_sde``): the 2M multistep update on the ``sde`` noise rule, kernel rate 1 + eta
    and ``sigma_t sqrt(1 - e^(-2 eta h))`` fresh noise per step; the last step is x0."""
    variant = {"midpoint": "bh2", "heun": "phi"}.get(solver_type)
    if variant is None:
        raise SolverError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    return multistep("dpmpp_2m_sde", nfe, sched, order=2, prediction="data", variant=variant, spacing=spacing, lower_order_final=lower_order_final,
                     final_order=1, noise="sde", eta=check_eta(eta, "dpmpp_2m_sde"), **grid)


@register_preset("dpmpp_3m_sde")
def dpmpp_3m_sde(nfe: int, sched: NoiseSchedule, *, eta: float = 1.0, spacing: Any = None, weights: str = "exact", lower_order_final: bool | None = None, **grid: Any) -> SolverSchedule:
    """DPM-Solver++(3M) SDE (k-diffusion ``sample_dpmpp_3m_sde``): multistep order 3 on the ``sde``
    noise rule. ``weights="published"`` halves the second-difference weight as k-diffusion does (see
    :func:`dpmpp_3m`)."""
    if weights not in ("exact", "published"):
        raise SolverError(f"weights must be 'exact' or 'published', got {weights!r}")
    return multistep("dpmpp_3m_sde", nfe, sched, order=3, prediction="data", variant="phi" if weights == "exact" else "dpm3m", warmup_variant="phi",
                     spacing=spacing, lower_order_final=lower_order_final, final_order=1, noise="sde", eta=check_eta(eta, "dpmpp_3m_sde"), **grid)


@register_preset("dpmpp_sde")
def dpmpp_sde(nfe: int, sched: NoiseSchedule, *, eta: float = 1.0, r: float = 0.5, spacing: Any = None, **grid: Any) -> SolverSchedule:
    """DPM-Solver++ SDE (k-diffusion ``sample_dpmpp_sde``): singlestep order 2 with a stage at the
    fraction ``r`` of the step in log-SNR, both the stage and the step ancestral (DDIM-eta) updates
    whose noise is the Brownian increment over ``[s, s_r]`` and over ``[s, t]`` (correlated, as a
    Brownian tree gives); the final update reads ``(1 - 1/(2r)) x0_s + 1/(2r) x0_r`` (bh2 weights)."""
    eta = check_eta(eta, "dpmpp_sde")
    if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0.0 < float(r) < 1.0:
        raise SolverError(f"preset 'dpmpp_sde': r must be in (0, 1), got {r!r}")
    plan = singlestep("dpmpp_sde", nfe, sched, order=2, prediction="data", variant="bh2", spacing=spacing, stages={2: (float(r),)}, **grid)
    rule = "ancestral" if eta > 0 else "none"
    steps = tuple(st.with_(noise=rule, eta=eta) if st.order == 2 else st for st in plan.steps)
    return plan.replace(steps=steps, meta={**plan.meta, "eta": eta})

"""Exponential-integrator multistep presets: DDIM (DPM-Solver-1), DPM-Solver++(2M) / (3M), UniPC
and DEIS. Each step integrates a polynomial interpolant of the prediction exactly against the
exponential kernel (:func:`~fewstep.solvers.presets.building.multistep`)."""

from __future__ import annotations

from typing import Any, Sequence

from ...errors import SolverError
from ...schedules import NoiseSchedule
from ..plan import SolverSchedule
from .building import ancestral_steps, multistep, register_preset

__all__ = ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "deis"]


@register_preset("ddim")
def ddim(nfe: int, sched: NoiseSchedule, *, spacing: str | Sequence[float] | None = None, prediction: str = "data", eta: float = 0.0, **grid: Any) -> SolverSchedule:
    """DDIM (Song et al. 2021) = DPM-Solver-1 = DPM-Solver++-1: the first-order exponential integrator.

    Data and noise prediction give the same update at first order; ``prediction`` only picks which
    model output is read (they differ by rounding, and by thresholding when it is on). ``eta > 0``
    draws DDIM's ``sigma_eta = eta sigma_t sqrt(1 - e^(-2h))`` of fresh noise per step (eta = 1: DDPM).
    """
    return ancestral_steps("ddim", nfe, sched, prediction, eta, spacing, grid)


@register_preset("dpmpp_2m")
def dpmpp_2m(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, solver_type: str = "midpoint", lower_order_final: bool | None = None, warmup: str = "lower_order", final_order: int | None = None, **grid: Any) -> SolverSchedule:
    """DPM-Solver++(2M) (Lu et al. 2022b): data prediction, multistep order 2. ``solver_type``
    ``midpoint`` (diffusers' default, UniPC bh2 weights) or ``heun`` (exact phi_2 weights)."""
    variant = {"midpoint": "bh2", "heun": "phi"}.get(solver_type)
    if variant is None:
        raise SolverError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    return multistep("dpmpp_2m", nfe, sched, order=2, prediction="data", variant=variant, spacing=spacing, lower_order_final=lower_order_final, warmup=warmup, final_order=final_order, **grid)


@register_preset("dpmpp_3m")
def dpmpp_3m(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, solver_type: str = "midpoint", lower_order_final: bool | None = None, weights: str = "exact", warmup: str = "lower_order", final_order: int | None = None, **grid: Any) -> SolverSchedule:
    """DPM-Solver++(3M): data prediction, multistep order 3 (order-2 warm-up with ``solver_type`` weights).

    ``weights="exact"`` (default) integrates the quadratic interpolant exactly (third order).
    ``weights="published"`` uses the coefficients of the DPM-Solver++ paper and diffusers, whose
    second-difference weight is half the exact one; measured on the oracle that makes the method
    second order (see the README)."""
    warm = {"midpoint": "bh2", "heun": "phi"}.get(solver_type)
    if warm is None:
        raise SolverError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    if weights not in ("exact", "published"):
        raise SolverError(f"weights must be 'exact' or 'published', got {weights!r}")
    variant = "phi" if weights == "exact" else "dpm3m"
    return multistep("dpmpp_3m", nfe, sched, order=3, prediction="data", variant=variant, warmup_variant=warm, spacing=spacing, lower_order_final=lower_order_final, warmup=warmup, final_order=final_order, **grid)


@register_preset("unipc")
def unipc(nfe: int, sched: NoiseSchedule, *, order: int = 3, variant: str = "bh2", corrector: bool = True, prediction: str = "data", spacing: Any = None, lower_order_final: bool | None = None, warmup: str = "lower_order", final_order: int | None = None, **grid: Any) -> SolverSchedule:
    """UniPC (Zhao et al. 2023): multistep UniP predictor + UniC corrector re-using the next evaluation.
    ``variant`` bh1 (B(h) = h) or bh2 (B(h) = e^h - 1); ``corrector=False`` gives UniP alone."""
    if variant not in ("bh1", "bh2"):
        raise SolverError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    return multistep("unipc", nfe, sched, order=order, prediction=prediction, variant=variant, corrector=corrector, spacing=spacing, lower_order_final=lower_order_final, warmup=warmup, final_order=final_order, **grid)


@register_preset("deis")
def deis(nfe: int, sched: NoiseSchedule, *, order: int = 3, interp: str = "t", spacing: Any = None, lower_order_final: bool | None = None, warmup: str = "lower_order", final_order: int | None = None, **grid: Any) -> SolverSchedule:
    """DEIS tAB (Zhang & Chen 2023): noise prediction, multistep, the eps interpolant a polynomial in
    the model time t integrated exactly against the exponential kernel. ``interp="lambda"`` is
    diffusers' DEISMultistepScheduler (polynomial in log sigma/alpha)."""
    return multistep("deis", nfe, sched, order=order, prediction="noise", variant="phi", interp=interp, spacing=spacing, lower_order_final=lower_order_final, warmup=warmup, final_order=final_order, **grid)

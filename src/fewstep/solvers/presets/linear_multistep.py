"""Linear multistep presets: PNDM / PLMS (fixed Adams-Bashforth weights on eps after a trapezoidal
first step), iPNDM (Adams-Bashforth in sigma/alpha, uniform-step weights) and LMS (Adams with the
real step sizes in sigma/alpha)."""

from __future__ import annotations

from typing import Any

from ...schedules import NoiseSchedule
from ...timesteps import time_grid
from ..plan import SolverSchedule
from ..strategy import Step
from .building import check_nfe, finish, multistep, pure_start, register_preset

__all__ = ["lms", "ipndm", "pndm"]


@register_preset("lms")
def lms(nfe: int, sched: NoiseSchedule, *, order: int = 4, spacing: Any = None, lower_order_final: bool = False, warmup: str = "lower_order", final_order: int | None = None, **grid: Any) -> SolverSchedule:
    """Linear multistep (k-diffusion / diffusers LMS): the eps interpolant a polynomial in sigma/alpha,
    integrated exactly (Adams-Bashforth with real step sizes in the VE variable)."""
    return multistep("lms", nfe, sched, order=order, prediction="noise", variant="phi", interp="flat", spacing=spacing, lower_order_final=lower_order_final, warmup=warmup, final_order=order if final_order is None else final_order, **grid)


@register_preset("ipndm")
def ipndm(nfe: int, sched: NoiseSchedule, *, order: int = 4, spacing: Any = None, warmup: str = "lower_order", **grid: Any) -> SolverSchedule:
    """iPNDM (Zhang & Chen 2023; k-diffusion ``sample_ipndm``): Euler in sigma/alpha with fixed
    Adams-Bashforth weights of order up to 4 (uniform-step assumption), lower order on warm-up."""
    return multistep("ipndm", nfe, sched, order=order, prediction="noise", variant="adams", uniform_nodes=True, spacing=spacing, lower_order_final=False, warmup=warmup, final_order=order, **grid)


@register_preset("pndm")
def pndm(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, **grid: Any) -> SolverSchedule:
    """PLMS (Liu et al. 2022; diffusers PNDM with ``skip_prk_steps``): a trapezoidal first step
    (2 NFE), then Adams-Bashforth 2, 3, 4 on eps with fixed weights, each plugged into the DDIM update."""
    n_eval = check_nfe(nfe, 3, "pndm")
    pure = pure_start(sched, spacing, grid)
    n = n_eval if pure else n_eval - 1  # leaving alpha = 0 the first step is DDIM (1 NFE), else trapezoidal (2 NFE)
    times = time_grid(sched, n, spacing, **grid)
    first = Step(order=1, prediction="noise") if pure else Step(order=2, prediction="noise", method="singlestep", stages=(1.0,), variant="adams")
    steps = [first]
    for i in range(1, n):  # Adams weights stay finite into sigma = 0, so the last step keeps its order
        steps.append(Step(order=min(4, i + 1), prediction="noise", variant="adams", uniform_nodes=True))
    return finish("pndm", sched, times, steps)


register_preset("plms")(pndm)  # the same sampler under diffusers' other name

"""SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion
Models"; diffusers' SASolverScheduler): a stochastic Adams predictor and corrector on the ``sde``
noise rule with ``eta = tau(t)^2``.

Registered as a preset only: the predictor is a multistep data-prediction step integrating the
Lagrange interpolant in log-SNR against the kernel of rate ``1 + tau^2``, the corrector a UniC-style
corrector through the new evaluation that re-uses the predictor's Brownian increment, and the
second-order weights are ``W_1 = (1 + tau^2) alpha_t h / 2`` (the ``bh1`` variant: what diffusers'
``stochastic_adams_bashforth_update`` / ``..._moulton_update`` compute at order 2; exact weights
from order 3).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ...errors import SolverError
from ...schedules import DiscreteVP, NoiseSchedule
from ..plan import SolverSchedule
from .building import check_eta, check_int, multistep, register_preset

__all__ = ["sa_solver", "tau_function"]


def tau_function(sched: NoiseSchedule, tau: float, window: Sequence[float] | None) -> Callable[[float], float]:
    """``eta(t) = tau^2`` for model times inside ``window`` (inclusive), else 0. Default window: the
    middle 60% of the time domain (diffusers: timesteps 200..800 of 1000)."""
    if window is None:
        top = float(sched.t_max) + (1.0 if isinstance(sched, DiscreteVP) else 0.0)
        window = (0.2 * top, 0.8 * top)
    if len(window) != 2 or not float(window[0]) <= float(window[1]):
        raise SolverError(f"preset 'sa_solver': tau_window must be (t_low, t_high) with t_low <= t_high, got {window!r}")
    lo, hi = float(window[0]), float(window[1])
    return lambda t: tau * tau if lo <= t <= hi else 0.0


@register_preset("sa_solver")
def sa_solver(nfe: int, sched: NoiseSchedule, *, order: int = 2, corrector_order: int = 2, tau: float = 1.0,
              tau_window: Sequence[float] | None = None, corrector: bool = True, spacing: Any = None,
              lower_order_final: bool = True, **grid: Any) -> SolverSchedule:
    """SA-Solver: predictor of ``order`` (1-3), corrector through ``corrector_order`` nodes (1-3; 1 =
    none), stochasticity ``tau`` inside ``tau_window`` (model times) and 0 outside (module docstring)."""
    check_int("order", order, 1, 3, "sa_solver")
    check_int("corrector_order", corrector_order, 1, 3, "sa_solver")
    tau = check_eta(tau, "sa_solver")
    eta = tau_function(sched, tau, tau_window)
    plan = multistep("sa_solver", nfe, sched, order=order, prediction="data", variant="bh1", spacing=spacing,
                     lower_order_final=lower_order_final, corrector=corrector and corrector_order >= 2,
                     corrector_order=corrector_order, final_order=1, noise="sde", eta=eta, **grid)
    plan.meta.update(tau=tau, tau_window=list(tau_window) if tau_window is not None else None)
    return plan

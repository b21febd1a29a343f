"""Reference solutions of the probability-flow ODE, with a self-reported convergence check.

Any schedule is the flow-matching schedule in disguise: with ``z = x / (alpha + sigma)`` and
``rho = sigma / (alpha + sigma)``, ``z = (1 - rho) x0 + rho eps`` and the ODE is

    dz / drho = eps_hat(x, t) - x0_hat(x, t),   x = (alpha_t + sigma_t) z,   t = t(lambda = log((1 - rho) / rho))

which is smooth on the closed interval rho in [0, 1] (pure noise to data). It is solved with
SciPy's DOP853 (8th-order Dormand-Prince) at tight tolerances in float64. Ending at the clean
time (sigma = 0), the solve stops at ``lambda_stop`` and takes the model's x0 prediction there;
for smooth data densities the remaining error is O(e^(-2 lambda_stop)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .models import Model

__all__ = ["reference_solution", "ReferenceCheck", "check_reference", "check_fine_reference"]


def _rho(sched, t: float) -> float:  # type: ignore[no-untyped-def]
    a, s, _ = sched.coefficients(float(t))
    return float(s / (a + s))


def reference_solution(
    model: Model,
    x_T: torch.Tensor,
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    lambda_stop: float | None = None,
) -> torch.Tensor:
    """Solve the probability-flow ODE from ``x_T`` at ``t_start`` to ``t_end`` (default: max time to sigma = 0).

    ``lambda_stop`` (default 16, i.e. sigma/alpha ~ 1e-7) is where a solve to the clean time switches
    to the model's x0 prediction; pass the log-SNR of the smallest trained time for a network that
    is not valid closer to the data.
    """
    from scipy.integrate import solve_ivp

    sched = model.schedule
    t0 = sched.t_max if t_start is None else float(t_start)
    t1 = sched.t_clean if t_end is None else float(t_end)
    to_clean = t1 == sched.t_clean
    if to_clean:
        lam_stop = 16.0 if lambda_stop is None else float(lambda_stop)
        t1_solve = float(sched.t_of_lambda(lam_stop))
    else:
        t1_solve = t1
    shape, dtype = x_T.shape, x_T.dtype
    a0, s0, _ = (float(v) for v in sched.coefficients(t0))
    z0 = (x_T.to(torch.float64) / (a0 + s0)).reshape(-1).cpu().numpy()
    rho0, rho1 = _rho(sched, t0), _rho(sched, t1_solve)
    nb = shape[0]

    def rhs(rho: float, z: np.ndarray) -> np.ndarray:
        rho = min(max(rho, 1e-300), 1.0)
        lam = math.log1p(-rho) - math.log(rho) if rho < 1.0 else -math.inf
        t = float(sched.t_of_lambda(lam))
        a, s, _ = (float(v) for v in sched.coefficients(t))
        x = torch.from_numpy(z).reshape(shape) * (a + s)
        p = model.predict(x.to(dtype), torch.full((nb,), t, dtype=torch.float64))
        return (p.eps.to(torch.float64) - p.x0.to(torch.float64)).reshape(-1).numpy()

    sol = solve_ivp(rhs, (rho0, rho1), z0, method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    z1 = torch.from_numpy(sol.y[:, -1]).reshape(shape)
    a1, s1, _ = (float(v) for v in sched.coefficients(t1_solve))
    x1 = z1 * (a1 + s1)
    if to_clean:
        x1 = model.predict(x1.to(dtype), torch.full((nb,), t1_solve, dtype=torch.float64)).x0.to(torch.float64)
    return x1.to(dtype)


@dataclass
class ReferenceCheck:
    """Self-reported accuracy: the change of the solution from a coarser solve (DOP853 at 100x the
    tolerance, or a fine solver at half the NFE)."""

    solution: torch.Tensor
    max_abs_change: float
    rms_change: float
    rtol: float
    method: str = "DOP853"


def check_reference(model: Model, x_T: torch.Tensor, *, rtol: float = 1e-10, **kwargs: float) -> ReferenceCheck:
    """Solve at ``rtol`` and at ``rtol / 100``; report the difference (the reference's own error bar)."""
    coarse = reference_solution(model, x_T, rtol=rtol, atol=rtol, **kwargs)
    fine = reference_solution(model, x_T, rtol=rtol / 100, atol=rtol / 100, **kwargs)
    return _checked(fine, coarse, rtol / 100, f"DOP853 (rtol {rtol / 100:g})")


def _checked(fine: torch.Tensor, coarse: torch.Tensor, rtol: float, method: str) -> ReferenceCheck:
    diff = coarse.to(torch.float64) - fine.to(torch.float64)
    return ReferenceCheck(fine, float(diff.abs().max()), float(diff.pow(2).mean().sqrt()), rtol, method)


def check_fine_reference(model: Model, x_T: torch.Tensor, *, nfe: int = 400, solver: str = "unipc", spacing: str | None = None) -> ReferenceCheck:
    """A very fine exponential integrator (for networks, whose rough vector field makes adaptive
    DOP853 take tiny steps): ``solver`` at ``nfe`` and at ``nfe / 2``; the change is the error bar.
    ``spacing`` defaults to uniform log-SNR, or uniform t where the start is pure noise (lambda = -inf,
    e.g. flow matching from t = 1)."""
    from .sample import sample

    if spacing is None:
        start = float(model.schedule.lambda_(float(model.schedule.t_max)))
        spacing = "uniform_lambda" if math.isfinite(start) else "uniform_t"

    opts = {"spacing": spacing, "lower_order_final": False}
    coarse = sample(model, x_T, solver, nfe=nfe // 2, **opts)
    fine = sample(model, x_T, solver, nfe=nfe, **opts)
    return _checked(fine, coarse, float("nan"), f"{solver} at NFE {nfe} ({spacing})")

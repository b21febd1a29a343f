"""ER-SDE (Cui et al. 2023, "Elucidating the solution space of extended reverse-time SDE for
diffusion models"): the ``er_sde`` noise rule and its preset.

In the VE variable ``s = sigma/alpha`` the extended reverse SDE with noise scale function ``f``
gives the exact update (data prediction)::

    x_t / alpha_t = (f(s_t)/f(s_s)) x_s / alpha_s + f(s_t) int_{s_t}^{s_s} f'(s)/f(s)^2 x0(s) ds
                    + sqrt(s_t^2 - s_s^2 (f(s_t)/f(s_s))^2) z

``f(s) = s`` is the ODE (DDIM), ``f(s) = s^2`` ancestral sampling (eta = 1), and the paper's
recommended ``f(s) = s (e^(s^0.3) + 10)``; here ``f(s) = s (e^(s^0.3) + 10)^eta`` (ComfyUI's
parameterisation: eta = 0 the ODE, 1 the paper's function). In log-SNR the x0 kernel is
``K(lambda) = alpha_t f(s_t) s f'(s) / f(s)^2`` (``s = e^-lambda``); its moments against the
interpolant are computed by Gauss-Legendre quadrature (:func:`~fewstep.solvers.coefficients.kernel_moments`;
the reference implementation sums 100-200 rectangles).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ...errors import SolverError
from ...schedules import NoiseSchedule
from ..coefficients import kernel_moments
from ..points import Point
from ..plan import SolverSchedule
from ..registry import NoiseRule, StepTerms, register_noise_rule
from .building import check_eta, check_int, multistep, register_preset

__all__ = ["ErSdeRule", "er_sde", "scale_function"]


def scale_function(s: np.ndarray | float, eta: float) -> np.ndarray | float:
    """``f(s) = s (e^(s^0.3) + 10)^eta``."""
    return s * (np.exp(np.power(s, 0.3)) + 10.0) ** eta


def _scale_derivative(s: np.ndarray, eta: float) -> np.ndarray:
    g = np.exp(np.power(s, 0.3)) + 10.0
    return g**eta + s * eta * g ** (eta - 1.0) * np.exp(np.power(s, 0.3)) * 0.3 * np.power(s, -0.7)


class ErSdeRule(NoiseRule):
    """The ER-SDE noise rule with ``f(s) = s (e^(s^0.3) + 10)^eta`` (module docstring); data prediction."""

    name = "er_sde"
    predictions = ("data",)

    def terms(self, prediction: str, interp: str, schedule: NoiseSchedule, s: Point, t: Point, eta: float, n: int) -> StepTerms:
        if s.sigma <= 0.0:
            raise SolverError(f"a data-prediction step cannot start at sigma = 0 ({s})")
        s_t = t.sigma / t.alpha if t.alpha > 0.0 else math.inf
        s_s = s.sigma / s.alpha if s.alpha > 0.0 else math.inf
        f_t = float(scale_function(s_t, eta)) if math.isfinite(s_t) else math.inf
        ratio = 0.0 if (t.sigma == 0.0 or math.isinf(s_s)) else f_t / float(scale_function(s_s, eta))
        a = ratio * t.alpha / s.alpha if s.alpha > 0.0 else 0.0
        w0 = t.alpha * (1.0 - ratio)
        var = s_t * s_t - (s_s * ratio) ** 2 if math.isfinite(s_s) else s_t * s_t
        noise = t.alpha * math.sqrt(max(var, 0.0)) if t.sigma > 0.0 else 0.0

        def kernel(lams: np.ndarray) -> np.ndarray:
            sv = np.exp(-lams)
            return t.alpha * f_t * sv * _scale_derivative(sv, eta) / scale_function(sv, eta) ** 2

        return StepTerms(a, kernel_moments(interp, prediction, schedule, s, t, w0, n, kernel), noise)


register_noise_rule(ErSdeRule())


@register_preset("er_sde")
def er_sde(nfe: int, sched: NoiseSchedule, *, order: int = 3, eta: float = 1.0, interp: str = "sigma", spacing: Any = None,
           lower_order_final: bool | None = None, **grid: Any) -> SolverSchedule:
    """ER-SDE-Solver: multistep data prediction of ``order`` (1-3, warm-up at lower order), the x0
    interpolant a polynomial in ``interp`` (the paper's Taylor expansion is in sigma/alpha),
    integrated against the ER-SDE kernel; the last step into sigma = 0 returns x0."""
    check_int("order", order, 1, 3, "er_sde")
    return multistep("er_sde", nfe, sched, order=order, prediction="data", variant="phi", interp=interp, spacing=spacing,
                     lower_order_final=lower_order_final, final_order=1, noise="er_sde", eta=check_eta(eta, "er_sde"), **grid)

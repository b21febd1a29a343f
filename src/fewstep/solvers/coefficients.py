"""Coefficients of one exponential-integrator update (one copy of the maths for every solver).

For a step from s to t with nodes ``(tau_j, m_j)`` (``tau_0 = 0`` is the start), the prediction is
interpolated as ``P(tau) = sum_k c_k tau^k`` and integrated exactly against the kernel::

    x_t = a x_s + sum_k W_k c_k = a x_s + sum_j w_j m_j,   w = V^{-T} W,  V_jk = tau_j^k

    data  (interp lambda): a = sigma_t / sigma_s,  W_k =  alpha_t h k! phi_(k+1)(-h)
    noise (interp lambda): a = alpha_t / alpha_s,  W_k = -sigma_t h k! phi_(k+1)(h)

with ``h = lambda_t - lambda_s`` (Lu et al. 2022, DPM-Solver / DPM-Solver++). ``W_0`` is written
as ``alpha_t - sigma_t alpha_s / sigma_s`` (data) and ``sigma_t - alpha_t sigma_s / alpha_s`` (noise)
so that steps into sigma = 0 and out of alpha = 0 stay finite. Variants change ``W``:
UniPC's ``B(h)`` (Zhao et al. 2023) for a single difference term, DPM-Solver++(3M)'s ``W_k / k!``,
Adams' flat weights ``W_0 / (k + 1)``. Everything is float64.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

from ..errors import SolverError
from ..schedules import NoiseSchedule
from .phi import phis
from .points import Point, point, points
from .registry import StepTerms, noise_rule, weight_variant

__all__ = ["Point", "point", "points", "coordinate", "node_weights", "node_positions", "step_terms",
           "exponential_moments", "kernel_moments", "base_terms"]

_GAUSS_NODES = 48
#: an end at sigma = 0 or alpha = 0 maps a semi-infinite log-SNR range onto the interval; where t(lambda)
#: is only piecewise smooth (DiscreteVP: kinks at integer t, crowded near the end) more nodes keep the
#: weights accurate to ~1e-7 relative
_GAUSS_NODES_INFINITE_END = 256


@lru_cache(maxsize=8)
def _gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * (x + 1.0), 0.5 * w  # on [0, 1]


def coordinate(interp: str, prediction: str, p: Point) -> float:
    """The interpolation variable at a point (``inf`` where it is unbounded).

    ``lambda``: the half log-SNR; ``t``: the model's time; ``flat``: the variable in which the
    kernel is flat (``e^lambda = alpha/sigma`` for data, ``e^-lambda = sigma/alpha`` for noise);
    ``sigma``: the variance-exploding noise level ``sigma/alpha = e^-lambda``, finite at sigma = 0;
    ``rho``: ``sigma / (alpha + sigma)``, in [0, 1] and finite at both ends (pure noise and data).
    """
    if interp == "lambda":
        return p.lam
    if interp == "t":
        return p.t
    if interp == "rho":
        return p.sigma / (p.alpha + p.sigma)
    if interp == "sigma" or (interp == "flat" and prediction == "noise"):
        return p.sigma / p.alpha if p.alpha > 0.0 else math.inf
    return p.alpha / p.sigma if p.sigma > 0.0 else math.inf  # flat, data


def _coordinate_of_lambda(interp: str, prediction: str, schedule: NoiseSchedule, lams: np.ndarray) -> np.ndarray:
    """:func:`coordinate` at many log-SNRs (finite inputs)."""
    if interp == "lambda":
        return lams
    if interp == "t":
        return schedule.t_of_lambda(torch.from_numpy(lams)).numpy()
    if interp == "rho":
        return 0.5 * (1.0 - np.tanh(0.5 * lams))  # sigmoid(-lambda), stable at both ends
    if interp == "sigma" or (interp == "flat" and prediction == "noise"):
        return np.exp(-lams)
    return np.exp(lams)


def node_positions(interp: str, prediction: str, schedule: NoiseSchedule, s: Point, t: Point, nodes: list[Point]) -> list[float]:
    """``tau_j = (u(node_j) - u(s)) / (u(t) - u(s))`` in the interpolation variable u."""
    us = coordinate(interp, prediction, s)
    ut = coordinate(interp, prediction, t)
    span = ut - us
    coords = [coordinate(interp, prediction, n) for n in nodes]
    if not (math.isfinite(span) and span != 0.0 and all(math.isfinite(c) for c in coords)):
        # an infinite step (out of alpha = 0 or into sigma = 0 in a variable unbounded there) can only use its own end points
        if all(n is s or n is t or n.t in (s.t, t.t) for n in nodes):
            return [0.0 if n.t == s.t else 1.0 for n in nodes]
        raise SolverError(
            f"cannot place interpolation nodes on the step {s} -> {t} with nodes at {[n.t for n in nodes]}: "
            f"the interpolation variable {interp!r} is infinite at a node or an end (alpha = 0 or sigma = 0). "
            "Interpolate in 'sigma' or 'flat' (finite at sigma = 0), 'rho' or 't' (finite at both ends), or use order 1 there"
        )
    return [(c - us) / span for c in coords]


def base_terms(prediction: str, s: Point, t: Point) -> tuple[float, float]:
    """``(a, W_0)``: the first-order (DDIM) transfer coefficient and weight."""
    if prediction == "data":
        if s.sigma <= 0.0:
            raise SolverError(f"a data-prediction step cannot start at sigma = 0 ({s})")
        return t.sigma / s.sigma, t.alpha - t.sigma * s.alpha / s.sigma
    if s.alpha <= 0.0:
        raise SolverError(f"a noise-prediction step cannot start at alpha = 0 ({s}); use data prediction")
    return t.alpha / s.alpha, t.sigma - t.alpha * s.sigma / s.alpha


def _quadrature_weights(prediction: str, interp: str, schedule: NoiseSchedule, s: Point, t: Point, w0: float, n: int, rate: float = 1.0) -> list[float]:
    """``W_k = int K(lambda) tau(lambda)^k dlambda`` by Gauss-Legendre quadrature, for interpolation
    variables without a closed form. The kernel is ``K = alpha_t r e^(r (lambda - lambda_t))`` (data;
    ``r = 1 + eta`` for the stochastic family, 1 for the ODE) or ``-sigma_t e^(lambda_t - lambda)``
    (noise). Infinite ends change variable so that the interval is finite: into sigma = 0 the data
    kernel tends to a point mass at the end (``W_k = alpha_t tau(end)^k = alpha_t``: extrapolation of
    x0 to sigma = 0) and the noise kernel integrates in ``e^-lambda``; out of alpha = 0 the data kernel
    integrates in ``e^(r lambda)``."""
    us, ut = coordinate(interp, prediction, s), coordinate(interp, prediction, t)
    if not (math.isfinite(us) and math.isfinite(ut)) or us == ut:
        return [w0] + [math.inf] * (n - 1)
    q, wq = _gauss_legendre(_GAUSS_NODES if math.isfinite(s.lam) and math.isfinite(t.lam) else _GAUSS_NODES_INFINITE_END)
    span = ut - us
    if math.isfinite(s.lam) and math.isfinite(t.lam):
        h = t.lam - s.lam
        lams = s.lam + q * h
        kern = t.alpha * rate * np.exp(rate * (lams - t.lam)) if prediction == "data" else -t.sigma * np.exp(t.lam - lams)
        scale = h
    elif math.isfinite(s.lam) and prediction == "data":  # into sigma = 0: a point mass at the end
        return [w0] * n
    elif math.isfinite(s.lam):  # into sigma = 0, noise: -alpha_t int_0^{e^-lambda_s} tau^k d(e^-lambda)
        u_s = math.exp(-s.lam)
        with np.errstate(divide="ignore"):
            lams = -np.log(q * u_s)
        kern = np.full_like(q, -t.alpha)
        scale = u_s
    elif math.isfinite(t.lam) and prediction == "data":  # out of alpha = 0: alpha_t e^(-r lambda_t) int_0^{e^(r lambda_t)} tau^k d(e^(r lambda))
        w_t = math.exp(rate * t.lam)
        lams = np.log(q * w_t) / rate
        kern = np.full_like(q, t.alpha / w_t)
        scale = w_t
    else:
        return [w0] + [math.inf] * (n - 1)
    taus = (_coordinate_of_lambda(interp, prediction, schedule, lams) - us) / span
    return [w0] + [float(scale * np.sum(wq * kern * taus**k)) for k in range(1, n)]


def exponential_moments(prediction: str, interp: str, schedule: NoiseSchedule, s: Point, t: Point, w0: float, n: int, rate: float = 1.0) -> list[float]:
    """Exact kernel integrals ``W_k`` of ``tau^k``, k = 0..n-1, for the exponential kernel of rate
    ``r`` (data: ``alpha_t r e^(-r (lambda_t - lambda))``, whose lambda-polynomial moments are
    ``alpha_t (r h) k! phi_(k+1)(-r h)``; noise: the ODE's kernel, ``-sigma_t h k! phi_(k+1)(h)``)."""
    if n == 1:
        return [w0]
    if interp == "flat" and rate == 1.0:  # exact in the kernel-flat variable, finite even into sigma = 0 (noise form)
        return [w0 / (k + 1) for k in range(n)]
    if interp == "lambda":
        h = t.lam - s.lam
        if not math.isfinite(h):
            return [w0] + [math.inf] * (n - 1)  # only a variant with finite weights (bh2, adams) can use it
        if prediction == "data":
            ph = phis(-rate * h, n)
            return [w0] + [t.alpha * rate * h * math.factorial(k) * ph[k] for k in range(1, n)]
        ph = phis(h, n)
        return [w0] + [-t.sigma * h * math.factorial(k) * ph[k] for k in range(1, n)]
    return _quadrature_weights(prediction, interp, schedule, s, t, w0, n, rate)


def kernel_moments(interp: str, prediction: str, schedule: NoiseSchedule, s: Point, t: Point, w0: float, n: int,
                   kernel: Callable[[np.ndarray], np.ndarray]) -> list[float]:
    """``W_k = int_{lambda_s}^{lambda_t} K(lambda) tau(lambda)^k dlambda`` for a kernel given as a
    vectorised function of lambda (Gauss-Legendre; finite log-SNR ends), ``W_0`` given in closed form."""
    if n == 1:
        return [w0]
    us, ut = coordinate(interp, prediction, s), coordinate(interp, prediction, t)
    if not (math.isfinite(s.lam) and math.isfinite(t.lam) and math.isfinite(us) and math.isfinite(ut)) or us == ut:
        return [w0] + [math.inf] * (n - 1)
    q, wq = _gauss_legendre(_GAUSS_NODES)
    h = t.lam - s.lam
    lams = s.lam + q * h
    taus = (_coordinate_of_lambda(interp, prediction, schedule, lams) - us) / (ut - us)
    kern = kernel(lams)
    return [w0] + [float(h * np.sum(wq * kern * taus**k)) for k in range(1, n)]


def step_terms(prediction: str, interp: str, variant: str, schedule: NoiseSchedule, s: Point, t: Point, n: int,
               noise: str = "none", eta: float = 0.0) -> StepTerms:
    """The noise rule's terms of a step with ``n`` interpolation nodes, its moments replaced by the
    weight variant's (:mod:`fewstep.solvers.registry`)."""
    terms = noise_rule(noise).terms(prediction, interp, schedule, s, t, eta, n)
    moments = weight_variant(variant)(terms, prediction, s, t, list(terms.moments)) if n > 1 else list(terms.moments)
    return StepTerms(terms.a, moments, terms.noise, terms.rate)


def node_weights(
    prediction: str,
    interp: str,
    variant: str,
    schedule: NoiseSchedule,
    s: Point,
    t: Point,
    taus: list[float],
    noise: str = "none",
    eta: float = 0.0,
) -> tuple[float, list[float], float]:
    """``(a, [w_j], c)``: ``x_t = a x_s + sum_j w_j m_j + c z``, the moments ``W = V^T w`` matched on
    the nodes ``taus`` (``V_jk = tau_j^k``)."""
    n = len(taus)
    terms = step_terms(prediction, interp, variant, schedule, s, t, n, noise, eta)
    big_w = terms.moments
    if not all(math.isfinite(v) for v in big_w):
        raise SolverError(
            f"a step with {n} interpolation nodes from {s} to {t} spans an infinite log-SNR interval; only "
            "order 1 can step out of alpha = 0 or into sigma = 0 (use a lower order on the first / last step)"
        )
    if n == 1:
        return terms.a, [big_w[0]], terms.noise
    vander = np.vander(np.asarray(taus, dtype=np.float64), n, increasing=True)
    if abs(np.linalg.det(vander)) < 1e-14:
        raise SolverError(f"interpolation nodes {taus} coincide; the step cannot use them")
    w = np.linalg.solve(vander.T, np.asarray(big_w, dtype=np.float64))
    if not np.all(np.isfinite(w)):
        raise SolverError(f"non-finite update weights on the step {s} -> {t}")
    return terms.a, [float(v) for v in w], terms.noise

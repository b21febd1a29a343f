"""Zero-call optimised time grids ("DMN"): the time-step optimisation of Xue, Liu, Chen, Zhang, Hu,
Xie and Li, "Accelerating Diffusion Sampling with Optimized Time Steps" (CVPR 2024, arXiv:2402.17376;
their code: github.com/scxue/DM-NonUniform), written anew here.

The grid is chosen from the noise schedule alone, before any model call, for the multistep
data-prediction solver it is meant for (DPM-Solver++(kM), UniPC's predictor of order ``k``). Over a
part of the solve with log-SNR points ``lambda_0 < ... < lambda_m`` (``lambda = log(alpha/sigma)``)
the exact solution of the diffusion ODE in data prediction is

    x_m = (sigma_m / sigma_0) x_0 + sigma_m int_{lambda_0}^{lambda_m} e^lambda x_theta(lambda) dlambda,

and the solver replaces ``x_theta`` on step ``i`` (``[lambda_i, lambda_{i+1}]``) by the polynomial in
``lambda`` through its ``k_i`` newest data predictions ``lambda_i, lambda_{i-1}, ...``, integrated
exactly against ``e^lambda``: step ``i`` adds ``sum_j C_ij x_theta(lambda_j)`` with the exponential-
integrator coefficients

    C_ij = int_{lambda_i}^{lambda_{i+1}} e^lambda l_ij(lambda) dlambda                        (1)

(``l_ij`` the Lagrange basis polynomial of node ``j`` among step ``i``'s nodes). The basis sums to one,
so the part of ``x_theta`` that does not move is integrated exactly; what the coefficients do to the
rest, the deviations of the data predictions, is bounded as in the paper by assuming each deviation
bounded by a function of its noise level, ``|d_j| <= sigma_j^2 / alpha_j`` (``alpha``, ``sigma`` of
the variance-preserving schedule with log-SNR ``lambda_j``). The grid minimises that bound,

    E(lambda_1, ..., lambda_{m-1}) = sum_i sum_{j in step i} (sigma_j^2 / alpha_j) |C_ij|      (2)

over the inner points with the ends fixed, subject to ``lambda_{i+1} - lambda_i >= h_min`` (2% of
the mean step), by the constrained trust-region method (SciPy's ``trust-constr``) from the
uniform-lambda grid, as the paper does.

Where this departs from the paper's objective: the paper's code sums each node's coefficients over
the steps that read it before taking the absolute value (``sum_j w_j |sum_i C_ij|``), except for the
first three steps at small NFE, whose terms it keeps per step. Summed so, a node's positive weight
(as the newest node) and negative weights (as an older node extrapolated from) cancel; on the
Gaussian-mixture oracles that objective had many local minima (trust-constr and SLSQP from the same
start stopped at values 6-23x apart) and its grids lost to uniform lambda in 16 of 56 cases (2 of 16
with every step summed per node, at NFE 5), while (2), the
bound taken step by step, is smooth (the weights' signs are fixed, ``(-1)^(i-j)``), has one minimum
that both optimisers find, and its grids beat uniform lambda in 55 of the 56 cases measured
(docs/time-grids.md).

Computed: with ``h`` the step and ``I_ij = C_ij e^{-lambda_{i+1}}`` (closed forms in
:func:`dmn_step_weights`, from the kernel moments ``A_p(h) = int_0^h e^{u - h} u^p du``), each term is
``sigma_j |e^{lambda_{i+1} - lambda_j} I_ij|`` since ``(sigma_j / alpha_j) e^{lambda_j} = 1``: finite for
every finite log-SNR. The step orders follow fewstep's multistep presets: warm-up
``k_i = min(k, i + 1)`` and, below 15 steps, the lower order at the end (:func:`dmn_step_orders`).
The result depends only on the log-SNR at the two ends, the number of steps and the orders, so it is
cached and mapped to any schedule's time by ``t_of_lambda``. It costs no model call and a fraction
of a second for up to 20 steps.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch

from .errors import ScheduleError
from .schedules import NoiseSchedule

__all__ = ["DMN_ORDERS", "dmn_step_orders", "dmn_step_weights", "dmn_objective", "dmn_lambdas", "dmn_grid", "default_dmn_order"]

#: solver orders the objective is written for (the number of data predictions a step interpolates)
DMN_ORDERS = (1, 2, 3)
#: below this many steps fewstep's multistep presets lower the order of the last steps (``lower_order_final``)
_LOWER_ORDER_FINAL_BELOW = 15
#: default ``order`` of the presets the default rule may name (:func:`fewstep.defaults.default_solver`);
#: kept here because :mod:`fewstep.solvers` builds on this module's importer (:mod:`fewstep.timesteps`)
_PRESET_ORDERS = {"unipc": 3, "dpmpp_2m": 2, "dpmpp_3m": 3, "deis": 3, "ddim": 1, "lms": 4, "ipndm": 4}
#: the smallest step allowed, as a fraction of the mean step
_MIN_STEP_FRACTION = 0.02
#: step sizes from which the kernel moments use their recurrence (quadrature below)
_RECURRENCE_FROM = 2.0


def default_dmn_order(sched: NoiseSchedule, n: int) -> int:
    """The order of the solver that ``fewstep.sample`` runs by default for ``n`` steps on ``sched``
    (:func:`fewstep.defaults.default_solver`: UniPC of order 2 at low NFE, 3 above), capped to
    :data:`DMN_ORDERS`."""
    from .defaults import default_solver

    preset, options = default_solver(sched, int(n))
    order = int(options.get("order", _PRESET_ORDERS.get(preset, 2)))
    return max(min(order, DMN_ORDERS[-1]), DMN_ORDERS[0])


def dmn_step_orders(m: int, order: int, *, prior: int = 0, after: int = 0, lower_order_final: bool | None = None) -> tuple[int, ...]:
    """Interpolation orders of the ``m`` steps of an optimised segment within a multistep solve that
    takes ``prior`` steps before it and ``after`` after it (1: the step into the clean time): the
    warm-up ``min(order, i + 1)`` counted within the segment (earlier nodes are not in lambda), and
    ``min(., steps left)`` when ``lower_order_final`` (default: fewer than 15 steps in all), as
    :func:`fewstep.solvers.presets.building.multistep_orders`."""
    if order not in DMN_ORDERS:
        raise ScheduleError(f"the dmn spacing supports solver orders {DMN_ORDERS}, got {order!r}")
    total = prior + m + after
    lof = total < _LOWER_ORDER_FINAL_BELOW if lower_order_final is None else lower_order_final
    out = []
    for i in range(m):
        k = min(order, i + 1)
        if lof:
            k = min(k, total - (prior + i))
        out.append(max(k, 1))
    return tuple(out)


_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(12)
_GAUSS_NODES, _GAUSS_WEIGHTS = 0.5 * (_GAUSS_NODES + 1.0), 0.5 * _GAUSS_WEIGHTS  # on [0, 1]
_GAUSS_POWERS = np.stack([_GAUSS_NODES**p for p in range(3)], axis=1)  # (nodes, 3)


def _kernel_moments(h: np.ndarray) -> np.ndarray:
    """``A_p(h) = int_0^h e^{u - h} u^p du = h^{p+1} int_0^1 e^{-h (1 - s)} s^p ds`` for ``p = 0, 1, 2``,
    shape ``(3, len(h))``. For ``h >= 2`` the recurrence ``A_0 = 1 - e^{-h}``, ``A_p = h^p - p A_{p-1}``
    (integration by parts) is stable; below it cancels, and the integral over ``s`` (of an entire
    function) is taken by 12-point Gauss-Legendre quadrature, exact to rounding there."""
    small = h < _RECURRENCE_FROM
    hs = np.where(small, h, 0.0)
    quad = ((np.exp(-hs[:, None] * (1.0 - _GAUSS_NODES[None, :])) * _GAUSS_WEIGHTS[None, :]) @ _GAUSS_POWERS).T  # (3, S)
    quad *= np.stack([hs, hs * hs, hs * hs * hs])
    a0 = -np.expm1(-h)
    a1 = h - a0
    a2 = h * h - 2.0 * a1
    return np.where(small, quad, np.stack([a0, a1, a2]))


def dmn_step_weights(lams: np.ndarray, orders: tuple[int, ...] | np.ndarray) -> np.ndarray:
    """The solver's weights of (1) on each step's nodes, ``W[i, l] = C_{i, i-l} e^{-lambda_{i-l}}`` for
    the steps ``i`` of the grid ``lams`` (increasing log-SNR, ``len(orders) + 1`` points) and their
    interpolation ``orders`` (``l < orders[i]``; 0 beyond), shape ``(m, 3)``. With ``h`` the step,
    ``a``, ``b`` the two before it and ``A_p = A_p(h)``:

        order 1:  I_0 = A_0
        order 2:  I_0 = A_0 + A_1 / a,  I_1 = -A_1 / a
        order 3:  I_0 = A_0 + ((2a + b) A_1 + A_2) / (a (a + b)),  I_1 = -((a + b) A_1 + A_2) / (a b),
                  I_2 = (a A_1 + A_2) / (b (a + b))

    (the Lagrange basis in ``u = lambda - lambda_i`` integrated against ``e^{u - h}``), and
    ``W[i, l] = e^{lambda_{i+1} - lambda_{i-l}} I_l``: finite for every finite log-SNR, of sign ``(-1)^l``."""
    lams = np.asarray(lams, dtype=np.float64)
    ords = np.asarray(orders)
    h = np.diff(lams)
    m = h.size
    if ords.shape != (m,) or np.any(ords < 1) or np.any(ords > 3) or np.any(ords > np.arange(1, m + 1)):
        raise ScheduleError(f"step orders {ords.tolist()} do not fit {m} steps (1..3, at most the nodes available)")
    a0, a1, a2 = _kernel_moments(h)
    a = np.concatenate([[1.0], h[:-1]])  # the step before (unused where the order is 1)
    b = np.concatenate([[1.0, 1.0], h[:-2]])[:m]
    o2, o3 = ords == 2, ords == 3
    w = np.zeros((m, 3))
    w[:, 0] = np.where(o3, a0 + ((2 * a + b) * a1 + a2) / (a * (a + b)), np.where(o2, a0 + a1 / a, a0))
    w[:, 1] = np.where(o3, -((a + b) * a1 + a2) / (a * b), np.where(o2, -a1 / a, 0.0))
    w[:, 2] = np.where(o3, (a * a1 + a2) / (b * (a + b)), 0.0)
    w[:, 0] *= np.exp(h)
    w[:, 1] *= np.exp(h + a)
    w[:, 2] *= np.exp(h + a + b)
    return w


def dmn_objective(lams: np.ndarray, orders: tuple[int, ...] | np.ndarray) -> float:
    """The bound (2), ``sum_i sum_j (sigma_j^2 / alpha_j) |C_ij|``, computed as
    ``sum_i sum_l sigma_{i-l} |W[i, l]|`` (:func:`dmn_step_weights`) with ``sigma_j = 1 / sqrt(1 +
    e^{2 lambda_j})`` (variance preserving, so that ``(sigma_j / alpha_j) e^{lambda_j} = 1``)."""
    lams = np.asarray(lams, dtype=np.float64)
    w = dmn_step_weights(lams, orders)
    sig = np.exp(-0.5 * np.logaddexp(0.0, 2.0 * lams))
    m = w.shape[0]
    idx = np.arange(m)[:, None] - np.arange(3)[None, :]
    return float(np.sum(sig[np.maximum(idx, 0)] * np.abs(w)))


@functools.lru_cache(maxsize=256)
def _optimise(lam0: float, lam1: float, orders: tuple[int, ...]) -> tuple[float, ...]:
    m = len(orders)
    init = np.linspace(lam0, lam1, m + 1)
    if m == 1:
        return tuple(init.tolist())
    from scipy.optimize import LinearConstraint, minimize

    h_min = _MIN_STEP_FRACTION * (lam1 - lam0) / m
    # lambda_{i+1} - lambda_i >= h_min for i = 0..m-1, over the inner points x = lambda_1..lambda_{m-1}
    a = np.zeros((m, m - 1))
    lb = np.full(m, h_min)
    for i in range(m):
        if i < m - 1:
            a[i, i] = 1.0
        if i > 0:
            a[i, i - 1] = -1.0
    lb[0] += lam0
    lb[-1] -= lam1
    constraint = LinearConstraint(a, lb, np.inf)

    scale = dmn_objective(init, orders)  # the start's value: the optimiser sees relative values

    def objective(x: np.ndarray) -> float:
        return dmn_objective(np.concatenate([[lam0], x, [lam1]]), orders) / scale

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trust-constr's notes on delta_grad == 0 near convergence
        res = minimize(objective, init[1:-1], method="trust-constr", constraints=[constraint], options={"maxiter": 1000})
    lams = np.concatenate([[lam0], res.x, [lam1]])
    start, found = objective(init[1:-1]), objective(res.x)
    if not (np.all(np.isfinite(lams)) and np.all(np.diff(lams) > 0.5 * h_min) and math.isfinite(found)):
        raise ScheduleError(f"the dmn step optimisation failed for {m} steps on lambda [{lam0:.4g}, {lam1:.4g}] "
                            f"(orders {orders}): {res.message}")
    if found > start:  # never worse than its start, the uniform-lambda grid
        raise ScheduleError(f"the dmn step optimisation did not improve on uniform lambda for {m} steps on "
                            f"lambda [{lam0:.4g}, {lam1:.4g}] (orders {orders}): {found:.6g} > {start:.6g} (relative)")
    return tuple(lams.tolist())


def dmn_lambdas(lam_start: float, lam_end: float, orders: tuple[int, ...]) -> np.ndarray:
    """The optimised log-SNR points (increasing, ``len(orders) + 1`` of them, from ``lam_start`` to
    ``lam_end`` exactly) for steps of the given interpolation ``orders``; cached."""
    lam_start, lam_end = float(lam_start), float(lam_end)
    if not (math.isfinite(lam_start) and math.isfinite(lam_end)) or not lam_end > lam_start:
        raise ScheduleError(f"the dmn spacing needs finite log-SNR ends with lam_end > lam_start, got {lam_start}, {lam_end}")
    orders = tuple(int(k) for k in orders)
    if not orders or any(k not in DMN_ORDERS for k in orders):
        raise ScheduleError(f"the dmn spacing needs step orders in {DMN_ORDERS}, got {orders}")
    return np.array(_optimise(lam_start, lam_end, orders))


def dmn_grid(sched: NoiseSchedule, n: int, t0: float, t1: float, *, order: int, prior: int = 0, after: int = 0) -> np.ndarray:
    """``n + 1`` times from ``t0`` to ``t1`` (both with a finite log-SNR) whose log-SNR points minimise
    (2) for a multistep solver of ``order`` (its step orders: :func:`dmn_step_orders` with ``prior``
    steps before and ``after`` steps after this segment)."""
    l0, l1 = float(sched.lambda_(t0)), float(sched.lambda_(t1))
    if not (math.isfinite(l0) and math.isfinite(l1)):
        raise ScheduleError(f"the dmn spacing needs finite log-SNR at both ends, got lambda({t0})={l0}, lambda({t1})={l1}")
    lams = dmn_lambdas(l0, l1, dmn_step_orders(n, order, prior=prior, after=after))
    ts = sched.t_of_lambda(torch.from_numpy(lams)).numpy()
    ts[0], ts[-1] = t0, t1
    if not np.all(np.diff(ts) < 0):
        raise ScheduleError(f"the dmn log-SNR points {np.round(lams, 4).tolist()} do not map to decreasing times on {sched!r}: "
                            "the schedule's t(lambda) does not resolve them")
    return ts

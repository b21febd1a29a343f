"""Empirical model statistics (EMS) of DPM-Solver-v3 (Zheng, Lu, Chen & Zhu 2023), computed on a model.

On a grid of half log-SNRs ``lambda_j`` (uniform, ``n_times`` points from the noisy end to the clean
end) and per data dimension, with ``x`` distributed as the model's own marginal at ``lambda_j``:

* ``l = E[ diag(sigma grad_x eps(x)) ]``: the diagonal linear coefficient minimising the Frobenius norm
  of the Jacobian of ``N = sigma eps - l x`` (the part left non-linear). The diagonal comes from one
  Rademacher Jacobian-vector product per sample (``E_v[v * (J v)] = diag J``), forward-mode AD
  (:mod:`torch.autograd.forward_ad`).
* ``s, b``: the least-squares slope and intercept of ``f'`` on ``f`` per dimension,
  ``s = Cov(f, f') / Var(f)``, ``b = E f' - s E f``, with ``f = (sigma eps - l x) / alpha`` and ``f'`` its
  total derivative in lambda along the ODE trajectory, ``f' = -x0' - (1 - l) e^-lambda eps - l' x / alpha``
  (as ``f = -x0 + (1 - l) x / alpha`` and ``(x / alpha)' = -e^-lambda eps``), ``l'`` the central
  difference of ``l`` on the grid smoothed by a moving average of +-5 points (the reference
  implementation's ``l_d``). ``x0'``, the data prediction's derivative along the trajectory, is by
  default the central difference between the trajectory's neighbouring grid points
  (``derivative="secant"``); ``derivative="jvp"`` takes it at the point by a second JVP with tangent
  ``(dx/dlambda, dt/dlambda)`` (docs/mathematics.md, section 14, says why the secant is the default).

Samples: by default the model's own ODE trajectories from ``n_samples`` keyed noises, integrated through
the grid points (DPM-Solver++(3M) with exact weights on the statistics grid itself; the evaluations
it needs are the JVPs' primal outputs, so the trajectories cost no extra model call); with ``data=``
(samples of x0), the forward process ``x = alpha x0 + sigma z`` at each point, as the reference's
statistics script does with training data (there only the JVP derivative applies). Cost:
``n_samples * n_times`` JVPs (each a model evaluation with a tangent), twice that with the JVP
derivative, reported in ``cost``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD

from .errors import ArgumentError, ModelOutputError, ShapeError
from .executor import PlanRunner
from .identity import model_key
from .models import Model, prediction_coefficients
from .noise import initial_noise
from .solvers.compile import compile_plan
from .solvers.ems import ModelStatistics, StatisticsError
from .solvers.plan import schedule_fingerprint
from .solvers.presets import preset

__all__ = ["model_statistics", "ModelStatistics", "StatisticsError", "DEFAULT_N_SAMPLES", "DEFAULT_N_TIMES", "SMOOTH_WINDOW",
           "NOISY_LAMBDA"]

#: the reference's settings for CIFAR-10 (EDM at NFE < 10): 1024 samples, 1200 intervals of log-SNR
DEFAULT_N_SAMPLES = 1024
DEFAULT_N_TIMES = 1201
#: half-width of the moving average smoothing the derivative of l (the reference's ``window = 5``)
SMOOTH_WINDOW = 5
#: where the statistics start when the schedule's largest time is pure noise (alpha = 0, flow matching)
NOISY_LAMBDA = -8.0
#: relative step of the central differences giving the schedule's derivatives in lambda
_FD_STEP = 1e-5


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class _Point:
    """The schedule at one grid point, and the derivatives in lambda the JVPs need (float64 numbers)."""

    def __init__(self, model: Model, lam: float, lo: float, hi: float) -> None:
        sched, kind = model.schedule, model.prediction

        t_lo, t_hi = sorted((float(sched.t_clean), float(sched.t_max)))

        def at(v: float) -> tuple[float, ...]:
            t = min(max(float(sched.t_of_lambda(torch.tensor(v, dtype=torch.float64))), t_lo), t_hi)  # rounding past the ends
            a, s, _ = (float(c) for c in sched.coefficients(t))
            return (t, a, s, math.log(a), *(float(c) for c in prediction_coefficients(kind, a, s)))

        d = _FD_STEP * max(1.0, abs(lam))
        # central differences; one-sided (second order) at the ends of the grid, where the schedule may stop
        if lam - d < lo:
            f0, f1, f2 = at(lam), at(lam + d), at(lam + 2 * d)
            der = [(-3 * a + 4 * b - c) / (2 * d) for a, b, c in zip(f0, f1, f2)]
        elif lam + d > hi:
            f0, f1, f2 = at(lam), at(lam - d), at(lam - 2 * d)
            der = [(3 * a - 4 * b + c) / (2 * d) for a, b, c in zip(f0, f1, f2)]
        else:
            f0, fp, fm = at(lam), at(lam + d), at(lam - d)
            der = [(b - c) / (2 * d) for b, c in zip(fp, fm)]
        self.lam = lam
        self.t, self.alpha, self.sigma = f0[0], f0[1], f0[2]
        self.pe, self.qe = f0[6], f0[7]  # eps = pe x + qe out
        self.dt, self.dlog_alpha, self.dpe, self.dqe = der[0], der[3], der[6], der[7]


class _Counter:
    def __init__(self) -> None:
        self.calls = self.rows = self.jvp_rows = 0


def _jvp(model: Model, counter: _Counter, x: torch.Tensor, tin: torch.Tensor, vx: torch.Tensor, vt: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F, dF)``: the model function's raw output at ``(x, tin)`` and its derivative along ``(vx, vt)``."""
    with fwAD.dual_level():
        out = model.fn(fwAD.make_dual(x, vx), fwAD.make_dual(tin, vt) if vt is not None else tin)
        if not isinstance(out, torch.Tensor):
            raise ModelOutputError(f"model {model.name!r} returned {type(out).__name__}, expected a torch.Tensor")
        primal, tangent = fwAD.unpack_dual(out)
    counter.calls += 1
    counter.rows += x.shape[0]
    counter.jvp_rows += x.shape[0]
    model.calls += 1
    model.evaluations += x.shape[0]
    if primal.shape != x.shape:
        raise ModelOutputError(f"model {model.name!r} returned shape {tuple(primal.shape)} for input shape {tuple(x.shape)}")
    if tangent is None:  # the output does not depend on the inputs
        tangent = torch.zeros_like(primal)
    if not (bool(torch.isfinite(primal).all()) and bool(torch.isfinite(tangent).all())):
        raise ModelOutputError(f"model {model.name!r} returned NaN/Inf (or a NaN/Inf derivative) at t = {float(tin.reshape(-1)[0]):.6g}")
    return primal.to(x.dtype), tangent.to(x.dtype)


class _Moments:
    """Per grid point, over the samples: ``l`` and the centred moments that give ``s`` and ``b`` once
    ``l'`` is known. With ``a = f = u1 - l u2`` and ``f' = c - l' u2`` (``c = u3 + l u1``), the point's
    samples are buffered until all are in, so that ``l`` is known and the moments are taken centred
    (``x / alpha`` is large at high noise: raw moments would cancel)."""

    NAMES = ("l", "a", "c", "u2", "aa", "ac", "au2", "scale")

    def __init__(self, n_times: int, dim: int) -> None:
        self.out = {k: np.zeros((n_times, dim)) for k in self.NAMES}
        self.parts: list[tuple[torch.Tensor, ...]] = []
        self.held: dict[int, tuple[torch.Tensor, ...]] = {}

    def add(self, l_part: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor, u3: torch.Tensor | None) -> None:
        self.parts.append(tuple(v.reshape(v.shape[0], -1).to(torch.float64) for v in (l_part, u1, u2, u3) if v is not None))

    def close(self, j: int) -> None:
        """All samples of grid point ``j`` are in (``u3`` from the JVP): reduce them."""
        lp, u1, u2, u3 = (torch.cat(vs) for vs in zip(*self.parts))
        self.parts = []
        self._reduce(j, lp, u1, u2, u3)

    def hold(self, j: int) -> None:
        """All samples of trajectory point ``j`` are in (no ``u3`` yet): keep them for the secant."""
        self.held[j] = tuple(torch.cat(vs) for vs in zip(*self.parts))
        self.parts = []

    def close_secant(self, j: int, lambdas: np.ndarray) -> None:
        """Reduce held point ``j`` with ``u3 = d u1 / d lambda`` along each trajectory, taken as
        ``-x0' - u1``: on the ODE ``u2' = -u1``, so ``u1' = (u1 - u2)' - u1`` and ``u2 - u1 = x0``, the
        data prediction, whose derivative is the central difference over the neighbours (one-sided at
        the ends of the grid). ``x0`` is of the data's size at every noise level, where ``u1`` and
        ``u2`` grow as ``e^-lambda``: differencing it keeps the truncation error small at high noise."""
        lo, hi = (j - 1 if j - 1 in self.held else j), (j + 1 if j + 1 in self.held else j)
        x0 = {k: self.held[k][2] - self.held[k][1] for k in (lo, hi)}
        u3 = -(x0[hi] - x0[lo]) / float(lambdas[hi] - lambdas[lo]) - self.held[j][1]
        self._reduce(j, *self.held[j], u3)
        self.held.pop(j - 1, None)

    def _reduce(self, j: int, lp: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor, u3: torch.Tensor) -> None:
        l = lp.mean(0)
        a = u1 - l * u2
        c = u3 + l * u1
        mean = {"a": a.mean(0), "c": c.mean(0), "u2": u2.mean(0)}
        da, dc, du = a - mean["a"], c - mean["c"], u2 - mean["u2"]
        vals = {"l": l, **mean, "aa": (da * da).mean(0), "ac": (da * dc).mean(0), "au2": (da * du).mean(0),
                "scale": (u1 * u1).mean(0) + (u2 * u2).mean(0)}
        for k, v in vals.items():
            self.out[k][j] = v.cpu().numpy()


def _smoothed_derivative(l: np.ndarray, lambdas: np.ndarray, window: int) -> np.ndarray:
    """``dl/dlambda`` on the grid: central differences (one-sided at the ends), then the mean over
    +-``window`` points (fewer at the ends), as the reference's ``compute_l_d``."""
    d = np.gradient(l, lambdas, axis=0, edge_order=1)
    if window <= 0:
        return d
    n = l.shape[0]
    cum = np.concatenate([np.zeros((1, l.shape[1])), np.cumsum(d, axis=0)])
    lo = np.clip(np.arange(n) - window, 0, n)
    hi = np.clip(np.arange(n) + window + 1, 0, n)
    return (cum[hi] - cum[lo]) / (hi - lo)[:, None]


def model_statistics(
    model: Model,
    *,
    n_samples: int = DEFAULT_N_SAMPLES,
    n_times: int = DEFAULT_N_TIMES,
    seed: int = 0,
    t_start: float | None = None,
    t_end: float | None = None,
    data: torch.Tensor | None = None,
    sample_shape: Sequence[int] | None = None,
    batch_size: int = 256,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    smooth: int = SMOOTH_WINDOW,
    derivative: str | None = None,
    progress: bool = False,
) -> ModelStatistics:
    """DPM-Solver-v3's empirical model statistics ``l, s, b`` of ``model`` (module docstring), on
    ``n_times`` log-SNRs uniform from ``t_start`` (default: the schedule's largest time, or lambda =
    -8 where that is pure noise) to ``t_end`` (default: its smallest noisy time ``t_min``), estimated from
    ``n_samples`` ODE trajectories of keyed noises (``seed``) or, with ``data`` (x0 samples, shape
    ``(N, *sample_shape)``), from its forward process. ``batch_size``: samples per model call;
    ``dtype`` / ``device``: of the samples the model sees (default: float32, or ``data``'s; the
    model's device is the caller's business, as in :func:`fewstep.sample`). ``smooth``: half-width of
    the moving average of ``dl/dlambda``. ``derivative``: how ``f'`` is taken along the ODE: ``"secant"``
    (the default on trajectories: the data prediction's central difference between the neighbouring
    grid points of each trajectory, one JVP per sample and point) or ``"jvp"`` (the tangent of a second
    JVP: the derivative at the point itself; the only choice with ``data``). The secant sees the
    model at the scale the solver's steps do; the JVP also sees how the network wiggles between
    nearby times (a sinusoidal time embedding's fastest features), which on the bundled 8x8 network
    swamped ``s`` (docs/mathematics.md). The result records the model's
    :func:`~fewstep.identity.model_key`, the schedule, the settings and the cost (model calls,
    evaluations, JVPs, wall time); ``fewstep.sample(model, x_T, "dpm_solver_v3", nfe=N, statistics=stats)``
    uses it, for this model only."""
    if not isinstance(model, Model):
        raise ArgumentError(f"model must be a fewstep.Model, got {type(model).__name__}")
    if model.threshold is not None:
        raise ArgumentError("DPM-Solver-v3 statistics need the model's own prediction: wrap it without threshold= (thresholding is not affine)")
    n_samples = _positive_int("n_samples", n_samples, 2)
    n_times = _positive_int("n_times", n_times, 2)
    batch_size = _positive_int("batch_size", batch_size)
    smooth = _positive_int("smooth", smooth, 0)
    if derivative is None:
        derivative = "jvp" if data is not None else "secant"
    if derivative not in ("secant", "jvp"):
        raise ArgumentError(f"derivative must be 'secant' or 'jvp', got {derivative!r}")
    if derivative == "secant" and data is not None:
        raise ArgumentError("derivative='secant' needs the model's own trajectories: with data= (independent forward-process "
                            "samples at each log-SNR) the derivative along the ODE is the JVP's (derivative='jvp')")
    secant = derivative == "secant"
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ArgumentError(f"seed must be an integer, got {seed!r}")
    sched = model.schedule
    if data is not None:
        if not isinstance(data, torch.Tensor) or data.ndim < 2 or data.shape[0] < 2 or not data.dtype.is_floating_point:
            raise ShapeError(f"data must be a floating-point tensor of x0 samples shaped (N >= 2, *sample_shape), got {getattr(data, 'shape', type(data).__name__)}")
        shape = tuple(data.shape[1:])
        n_samples = min(n_samples, data.shape[0])
    else:
        shape = tuple(sample_shape) if sample_shape is not None else tuple(model.sample_shape or ())
    if sample_shape is not None and tuple(sample_shape) != shape:
        raise ShapeError(f"sample_shape {tuple(sample_shape)} does not match data of shape {tuple(data.shape)}")  # type: ignore[union-attr]
    if model.sample_shape is not None and tuple(model.sample_shape) != shape:
        raise ShapeError(f"model {model.name!r} takes samples of shape {tuple(model.sample_shape)}, not {shape}")
    if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ShapeError(f"the model has no sample_shape: pass sample_shape= (the shape of one sample), got {shape!r}")
    work = dtype or (data.dtype if data is not None else torch.float32)
    if work not in (torch.float32, torch.float64):
        raise ArgumentError(f"dtype must be torch.float32 or torch.float64, got {work}")
    dev = torch.device(device) if device is not None else (data.device if data is not None else torch.device("cpu"))

    # the log-SNR grid
    def lam_of(t: float) -> float:
        return float(sched.lambda_(torch.tensor(float(t), dtype=torch.float64)))

    t0 = float(sched.t_max if t_start is None else t_start)
    lam_lo = lam_of(t0)
    if not math.isfinite(lam_lo):
        if t_start is not None:
            raise ArgumentError(f"t_start = {t0} is pure noise (alpha = 0): the statistics need a finite log-SNR; pass a smaller t_start")
        lam_lo = NOISY_LAMBDA
    lam_hi = lam_of(float(sched.t_min if t_end is None else t_end))
    if not (math.isfinite(lam_hi) and lam_hi > lam_lo):
        raise ArgumentError(f"the statistics need t_start > t_end with finite log-SNRs, got lambda {lam_lo:.6g} -> {lam_hi:.6g}")
    lambdas = np.linspace(lam_lo, lam_hi, n_times)
    grid = [_Point(model, float(v), lam_lo, lam_hi) for v in lambdas]
    times = [p.t for p in grid]
    if not all(a > b for a, b in zip(times, times[1:])):
        raise ArgumentError("the statistics grid's times are not strictly decreasing (the schedule cannot resolve this many log-SNRs)")

    dim = math.prod(shape)
    acc = _Moments(n_times, dim)
    counter = _Counter()
    gen = torch.Generator().manual_seed(int(seed))
    clock = time.perf_counter()
    edm = model.prediction == "edm"

    def visit(j: int, x: torch.Tensor) -> torch.Tensor:
        """The JVP(s) at grid point j for the rows ``x``; accumulates; returns the raw output."""
        p = grid[j]
        b = x.shape[0]
        v = (torch.randint(0, 2, x.shape, generator=gen, dtype=torch.int64) * 2 - 1).to(device=x.device, dtype=x.dtype)
        xin = x * (1.0 / p.alpha) if edm else x
        tval = p.sigma / p.alpha if edm else p.t
        tin = torch.full((b,), tval, dtype=x.dtype, device=x.device)
        out, jv = _jvp(model, counter, xin, tin, v * (1.0 / p.alpha) if edm else v, None)
        eps = p.pe * x + p.qe * out
        l_part = p.sigma * v * (p.pe * v + p.qe * jv)  # sigma v * (J_eps v)
        e = math.exp(-p.lam)
        if secant:  # f' from the neighbouring points of the trajectory, once they are in (close_secant)
            acc.add(l_part, e * eps, x * (1.0 / p.alpha), None)
            return out
        dx = p.dlog_alpha * x - p.sigma * eps  # dx/dlambda on the ODE
        if edm:  # (x / alpha)' and (sigma / alpha)' = -e^-lambda
            _, dout = _jvp(model, counter, xin, tin, dx * (1.0 / p.alpha) - x * (p.dlog_alpha / p.alpha), torch.full_like(tin, -math.exp(-p.lam)))
        else:
            _, dout = _jvp(model, counter, xin, tin, dx, torch.full_like(tin, p.dt))
        deps = p.dpe * x + p.pe * dx + p.dqe * out + p.qe * dout
        acc.add(l_part, e * eps, x * (1.0 / p.alpha), e * (deps - eps))
        return out

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_times, desc="statistics", unit="lambda", leave=False)
    with torch.no_grad():
        chunks = [slice(i, min(n_samples, i + batch_size)) for i in range(0, n_samples, batch_size)]
        if data is None:
            x_T = initial_noise(sched, (n_samples, *shape), int(seed), t_start=times[0], dtype=work, device=dev)
            ends = [*times, float(sched.t_clean)] if times[-1] > float(sched.t_clean) else times
            # the trajectories through the grid: the multistep solver evaluates exactly at its points
            plan = preset("dpmpp_3m", len(ends) - 1, sched, spacing=ends, lower_order_final=False)
            compiled = compile_plan(plan, sched)
            runners = [PlanRunner(model, x_T[c], compiled) for c in chunks]
            for j in range(n_times):
                for r in runners:
                    op = r.request()
                    assert op is not None and abs(op.t - times[j]) <= 1e-9 * max(1.0, abs(times[j]))
                    r.answer(visit(j, r.pending_input))
                if secant:
                    acc.hold(j)
                    if j >= 1:
                        acc.close_secant(j - 1, lambdas)
                else:
                    acc.close(j)
                if bar is not None:
                    bar.update(1)
            if secant:
                acc.close_secant(n_times - 1, lambdas)
        else:
            x0 = data[:n_samples].to(device=dev, dtype=work)
            for j in range(n_times):
                p = grid[j]
                for c in chunks:
                    z = torch.randn(x0[c].shape, generator=gen, dtype=torch.float64).to(device=dev, dtype=work)
                    visit(j, p.alpha * x0[c] + p.sigma * z)
                acc.close(j)
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - clock

    m = acc.out
    l = m["l"]
    l_d = _smoothed_derivative(l, lambdas, smooth)
    # f = a, f' = c - l' u2: s = Cov(f, f') / Var(f), b = E f' - s E f (no spread in f: s = 0)
    var = m["aa"]
    ok = var > 1e-20 * m["scale"]  # a spread below 1e-10 of the terms f is computed from is rounding
    s = np.where(ok, (m["ac"] - l_d * m["au2"]) / np.where(ok, var, 1.0), 0.0)
    b = (m["c"] - l_d * m["u2"]) - s * m["a"]
    settings = {"n_samples": n_samples, "n_times": n_times, "seed": int(seed), "lambda_start": lam_lo, "lambda_end": lam_hi,
                "t_start": times[0], "t_end": times[-1], "samples": "data" if data is not None else "trajectories",
                "trajectory_solver": None if data is not None else "dpmpp_3m (exact) on the statistics grid",
                "batch_size": batch_size, "dtype": str(work).replace("torch.", ""), "smooth": smooth, "estimator": "rademacher jvp",
                "derivative": derivative}
    cost = {"model_calls": counter.calls, "model_evaluations": counter.rows, "jvps": counter.jvp_rows, "wall_s": round(wall, 3),
            "device": str(dev)}
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).reshape(n_times, *shape)  # noqa: E731
    return ModelStatistics(torch.from_numpy(lambdas), to_t(l), to_t(s), to_t(b), model=model_key(model),
                           schedule=schedule_fingerprint(sched), settings=settings, cost=cost)

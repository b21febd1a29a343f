"""Time grids (DESIGN 1.4): plain functions returning ``n + 1`` strictly decreasing times (float64)
from ``t_start`` to ``t_end`` in the schedule's own time variable.

When ``t_end`` is the schedule's clean time (sigma = 0, the default), spacings defined by noise
levels (``uniform_lambda``, ``karras``) cannot reach it: they place ``n`` points on
``[t_start, t_noisy_end]`` (default the schedule's ``t_min``) and append the clean time, as
k-diffusion appends sigma = 0 and diffusers a final zero sigma. Spacings defined in time
(``uniform_t``, ``quadratic``) reach it directly. ``leading`` / ``trailing`` / ``linspace``
reproduce diffusers' integer timesteps for :class:`~fewstep.DiscreteVP`. ``dmn`` (and ``dmn1`` ..
``dmn3``) are noise-level grids optimised for a multistep solver's order from the schedule alone
(Xue et al. 2024; :mod:`fewstep.optimized_steps`).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import ScheduleError
from .optimized_steps import default_dmn_order, dmn_grid
from .schedules import DiscreteVP, FlowMatching, NoiseSchedule

__all__ = ["time_grid", "SPACINGS", "DMN_SPACINGS", "validate_grid", "default_spacing"]


def _check_n(n: int) -> None:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ScheduleError(f"the number of steps must be an integer >= 1, got {n!r}")


def _uniform_t(sched: NoiseSchedule, n: int, t0: float, t1: float, **_: float) -> np.ndarray:
    """Uniform in t; for a shifted flow schedule uniform in the unshifted time ``u`` with
    ``t = shift u / (1 + (shift - 1) u)`` (SD3), between the unshifted images of ``t0`` and ``t1``
    (so the grid starts at ``t0`` and ends at ``t1`` whatever the shift)."""
    if isinstance(sched, FlowMatching) and sched.shift != 1.0:
        u0, u1 = (float(sched.unshift_times(torch.tensor(v, dtype=torch.float64))) for v in (t0, t1))
        ts = sched.shift_times(torch.from_numpy(np.linspace(u0, u1, n + 1))).numpy()
        ts[0], ts[-1] = t0, t1
        return ts
    return np.linspace(t0, t1, n + 1)


def _quadratic(sched: NoiseSchedule, n: int, t0: float, t1: float, **_: float) -> np.ndarray:
    """Time-quadratic (DPM-Solver's ``time_quadratic``) in the normalised time ``t - t_clean``."""
    c = sched.t_clean
    u = np.linspace(math.sqrt(t0 - c), math.sqrt(t1 - c), n + 1)
    ts = c + u * u
    ts[0], ts[-1] = t0, t1
    return ts


def _lambda_range(sched: NoiseSchedule, t0: float, t1: float) -> tuple[float, float]:
    l0, l1 = float(sched.lambda_(t0)), float(sched.lambda_(t1))
    if not (math.isfinite(l0) and math.isfinite(l1)):
        raise ScheduleError(f"noise-level spacings need finite log-SNR at both ends, got lambda({t0})={l0}, lambda({t1})={l1}")
    return l0, l1


def _uniform_lambda(sched: NoiseSchedule, n: int, t0: float, t1: float, **_: float) -> np.ndarray:
    l0, l1 = _lambda_range(sched, t0, t1)
    ts = sched.t_of_lambda(torch.linspace(l0, l1, n + 1, dtype=torch.float64)).numpy()
    ts[0], ts[-1] = t0, t1
    return ts


def _karras(sched: NoiseSchedule, n: int, t0: float, t1: float, rho: float = 7.0, **_: float) -> np.ndarray:
    """Karras et al. (2022): ``sigma_i^(1/rho)`` uniform, with sigma = sigma_t / alpha_t = e^-lambda."""
    l0, l1 = _lambda_range(sched, t0, t1)
    smax, smin = math.exp(-l0), math.exp(-l1)
    ramp = np.linspace(0.0, 1.0, n + 1)
    sig = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    ts = sched.t_of_lambda(torch.from_numpy(-np.log(sig))).numpy()
    ts[0], ts[-1] = t0, t1
    return ts


def _logistic(sched: NoiseSchedule, n: int, t0: float, t1: float, t_noisy_end: float | None = None,
              logistic_center: float = 0.0, logistic_scale: float = 1.4, **_: float) -> np.ndarray:
    """Log-SNR points whose density is logistic, ``lambda = c + s logit(u)`` with ``u`` uniform:
    dense where the noise level ``sigma / alpha`` is near ``e^-c`` (1 by default: the data scale of
    models trained on unit-variance data), sparse towards pure noise and towards the data. With
    ``c = 0, s = 1`` it is the uniform flow-time grid (``u = 1 - sigma / (alpha + sigma)``), so it is
    one grid for every schedule family: the points depend on noise levels, not on how a schedule
    parameterises time. ``u`` runs uniformly from the start's quantile to the end's; towards the
    clean end (lambda = +inf) the ``n - 1`` noisy points stop at ``t_noisy_end`` at the latest
    (default: the schedule's smallest noisy time) and the clean time follows. A flow schedule's
    ``shift`` moves the centre to ``c - log(shift)``, as it moves the uniform-t grid."""
    c, s = logistic_center, logistic_scale
    if isinstance(sched, FlowMatching):  # the SD3 shift moves the grid's centre: lambda -> lambda - log(shift)
        c -= math.log(sched.shift)

    def quantile(lam: float) -> float:
        return 0.0 if lam == -math.inf else 1.0 if lam == math.inf else 1.0 / (1.0 + math.exp(-(lam - c) / s))

    u0 = quantile(float(sched.lambda_(t0)))
    l1 = float(sched.lambda_(t1))
    if math.isfinite(l1):
        u = np.linspace(u0, quantile(l1), n + 1)[1:-1]
    else:
        tn = sched.t_min if t_noisy_end is None else float(t_noisy_end)
        if not t1 < tn < t0:
            raise ScheduleError(f"t_noisy_end={tn} must lie strictly between the clean end {t1} and the start {t0}")
        step = min((1.0 - u0) / n, (quantile(float(sched.lambda_(tn))) - u0) / max(n - 1, 1))
        u = u0 + step * np.arange(1, n)
    lam = c + s * np.log(u / (1.0 - u))
    inner = sched.t_of_lambda(torch.from_numpy(lam)).numpy() if len(lam) else np.zeros(0)
    return np.concatenate([[t0], inner, [t1]])


def _dmn(sched: NoiseSchedule, n: int, t0: float, t1: float, *, order: int, prior: int = 0, after: int = 0, **_: float) -> np.ndarray:
    """Log-SNR points optimised for a multistep solver of ``order`` (Xue et al. 2024: the bound on
    the solver's error from bounded data predictions, minimised from the noise schedule alone; see
    :mod:`fewstep.optimized_steps`), on ``[t0, t1]`` with finite log-SNR at both ends; ``prior`` /
    ``after`` steps of the solve lie before / after this part (the pure-noise and clean steps)."""
    return dmn_grid(sched, n, t0, t1, order=order, prior=prior, after=after)


#: the dmn spacings -> the solver order each is optimised for (``None``: the order of the solver that
#: ``fewstep.sample`` runs by default for that many steps, :func:`fewstep.optimized_steps.default_dmn_order`)
DMN_SPACINGS: dict[str, int | None] = {"dmn": None, "dmn1": 1, "dmn2": 2, "dmn3": 3}


def _discrete(sched: NoiseSchedule, what: str) -> DiscreteVP:
    if not isinstance(sched, DiscreteVP):
        raise ScheduleError(f"the {what!r} spacing is defined for DiscreteVP schedules only, not {sched!r}")
    return sched


def _leading_multistep(sched: NoiseSchedule, n: int, t0: float, t1: float, steps_offset: int = 0, **_: float) -> np.ndarray:
    """diffusers' multistep schedulers' ``leading`` (DPMSolverMultistep, UniPC, DEIS, ...):
    ``arange(n + 1) * (N // (n + 1))`` reversed, the last (0) dropped, then the clean time; e.g.
    830, 664, 498, 332, 166 for n = 5 (DDIM's ``leading`` is 800, 600, ..., 0)."""
    s = _discrete(sched, "leading_multistep")
    ratio = s.num_train_timesteps // (n + 1)
    if ratio < 1:
        raise ScheduleError(f"leading_multistep spacing needs n < {s.num_train_timesteps}, got {n}")
    ts = (np.arange(n + 1)[::-1][:-1] * ratio + steps_offset).astype(np.float64)
    return np.append(ts, s.t_clean)


def _leading(sched: NoiseSchedule, n: int, t0: float, t1: float, steps_offset: int = 0, **_: float) -> np.ndarray:
    """diffusers ``leading``: ``arange(n) * (N // n) + offset``, reversed, then the clean time."""
    s = _discrete(sched, "leading")
    ratio = s.num_train_timesteps // n
    if ratio < 1:
        raise ScheduleError(f"leading spacing needs n <= {s.num_train_timesteps}, got {n}")
    ts = (np.arange(n)[::-1] * ratio + steps_offset).astype(np.float64)
    return np.append(ts, s.t_clean)


def _trailing(sched: NoiseSchedule, n: int, t0: float, t1: float, **_: float) -> np.ndarray:
    """diffusers ``trailing``: ``round(arange(N, 0, -N / n)) - 1``, then the clean time."""
    s = _discrete(sched, "trailing")
    ts = np.round(np.arange(s.num_train_timesteps, 0, -s.num_train_timesteps / n)).astype(np.float64) - 1
    return np.append(ts[:n], s.t_clean)


def _linspace(sched: NoiseSchedule, n: int, t0: float, t1: float, **_: float) -> np.ndarray:
    """diffusers ``linspace``: ``linspace(0, N - 1, n).round()``, reversed, then the clean time."""
    s = _discrete(sched, "linspace")
    ts = np.linspace(0, s.num_train_timesteps - 1, n).round()[::-1].astype(np.float64)
    return np.append(ts, s.t_clean)


Spacing = Callable[..., np.ndarray]
#: name -> (function, kind): "time" spacings reach the clean time, "noise" ones append it, "logistic" is
#: defined on noise levels with both ends handled in :func:`_logistic`, "dmn" are noise spacings optimised
#: for a solver order (:data:`DMN_SPACINGS`), "discrete" are diffusers integer grids
SPACINGS: dict[str, tuple[Spacing, str]] = {
    "uniform_t": (_uniform_t, "time"),
    "quadratic": (_quadratic, "time"),
    "uniform_lambda": (_uniform_lambda, "noise"),
    "logsnr": (_uniform_lambda, "noise"),
    "karras": (_karras, "noise"),
    "logistic": (_logistic, "logistic"),
    **{name: (_dmn, "dmn") for name in DMN_SPACINGS},
    "leading": (_leading, "discrete"),
    "leading_multistep": (_leading_multistep, "discrete"),
    "trailing": (_trailing, "discrete"),
    "linspace": (_linspace, "discrete"),
}


def default_spacing(sched: NoiseSchedule, preset: str | None = None) -> str:
    """The grid used when none is named (:func:`fewstep.defaults.default_spacing`); ``time_grid``
    uses it with its own option defaults, presets also take the rule's grid options."""
    from .defaults import default_spacing as chosen

    return chosen(sched, preset)


def _discrete_grid(sched: NoiseSchedule, n: int, fn: Spacing, name: str, t_start: float | None, t_end: float | None, steps_offset: int) -> np.ndarray:
    """diffusers' integer spacings fix their own first time; ``t_end`` replaces the final clean time."""
    if t_start is not None:
        raise ScheduleError(f"the {name!r} spacing fixes its own first time; pass explicit times to start at {t_start}")
    ts = fn(sched, n, 0.0, 0.0, steps_offset=steps_offset)
    if t_end is not None:
        if not float(t_end) < ts[-2]:
            raise ScheduleError(f"t_end={t_end} must lie below the last {name!r} timestep {ts[-2]}")
        ts[-1] = float(t_end)
    return validate_grid(sched, ts)


def validate_grid(sched: NoiseSchedule, times: Sequence[float] | np.ndarray | torch.Tensor) -> np.ndarray:
    """Check a grid (finite, strictly decreasing, inside the schedule's domain) and return it as float64."""
    ts = np.asarray(torch.as_tensor(times, dtype=torch.float64).cpu().numpy(), dtype=np.float64).reshape(-1)
    if ts.size < 2:
        raise ScheduleError(f"a time grid needs at least 2 points, got {ts.size}")
    if not np.all(np.isfinite(ts)):
        raise ScheduleError(f"time grid has non-finite entries: {ts.tolist()[:8]}")
    if np.any(np.diff(ts) >= 0):
        i = int(np.argmax(np.diff(ts) >= 0))
        raise ScheduleError(f"time grid must be strictly decreasing (from noise to data); t[{i}]={ts[i]} <= t[{i + 1}]={ts[i + 1]}")
    sched.check_times(torch.from_numpy(ts), what="time grid entries")
    return ts


def _noise_level_grid(sched: NoiseSchedule, n: int, fn: Spacing, t0: float, t1: float, t_noisy_start: float | None,
                      t_noisy_end: float | None, rho: float) -> np.ndarray:
    """A spacing defined by noise levels between ends where the log-SNR may be infinite: ``n`` points on
    ``[t_start, t_noisy_end]`` and then the clean time (as k-diffusion appends sigma = 0), and
    symmetrically the pure-noise time (alpha = 0, e.g. flow matching at t = 1) and then points on
    ``[t_noisy_start, ...]``. ``t_noisy_start`` defaults to the time whose log-SNR is minus that of
    the schedule's smallest noisy time (``1 - t_min`` for flow matching)."""
    clean = t1 == sched.t_clean or float(sched.sigma(t1)) == 0.0
    pure = float(sched.alpha(t0)) == 0.0
    tp, tn = t0, t1
    if pure:
        tp = float(sched.t_of_lambda(-float(sched.lambda_(sched.t_min)))) if t_noisy_start is None else float(t_noisy_start)
        if not t1 < tp < t0:
            raise ScheduleError(f"t_noisy_start={tp} must lie strictly between t_end={t1} and the pure-noise start {t0}")
    if clean:
        tn = sched.t_min if t_noisy_end is None else float(t_noisy_end)
        if not t1 < tn < tp:
            raise ScheduleError(f"t_noisy_end={tn} must lie strictly between the clean end {t1} and {tp}")
    inner = n - int(pure) - int(clean)
    if n == 1:
        return np.array([t0, t1])
    if inner <= 0:  # n = 2 from pure noise to the data: one point, the spacing's midpoint
        return np.array([t0, fn(sched, 2, tp, tn, rho=rho)[1], t1])
    pts = fn(sched, inner, tp, tn, rho=rho)
    return np.concatenate([[t0]] * pure + [pts] + [[t1]] * clean)


def _number(name: str, value: object, *, positive: bool = False) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool) or not math.isfinite(float(value)):
        raise ScheduleError(f"{name} must be a finite number, got {value!r}")
    if positive and not float(value) > 0:
        raise ScheduleError(f"{name} must be > 0, got {value!r}")
    return float(value)


def time_grid(
    sched: NoiseSchedule,
    n: int,
    spacing: str | Sequence[float] | None = None,
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    t_noisy_start: float | None = None,
    t_noisy_end: float | None = None,
    rho: float = 7.0,
    steps_offset: int = 0,
    logistic_center: float | None = None,
    logistic_scale: float | None = None,
) -> np.ndarray:
    """``n + 1`` times for ``n`` steps. ``spacing`` is a name from :data:`SPACINGS` or an explicit list.
    ``logistic_center`` / ``logistic_scale`` default to the schedule family's measured values
    (:func:`fewstep.defaults.default_grid`: 0 and 1.4, on flow matching 0.6 and 1.1)."""
    _check_n(n)
    from .defaults import default_grid

    family_grid = default_grid(sched)[1]
    logistic_center = float(_number("logistic_center", family_grid.get("logistic_center", 0.0) if logistic_center is None else logistic_center))  # type: ignore[arg-type]
    logistic_scale = float(_number("logistic_scale", family_grid.get("logistic_scale", 1.4) if logistic_scale is None else logistic_scale, positive=True))  # type: ignore[arg-type]
    t_start, t_end = _number("t_start", t_start), _number("t_end", t_end)
    t_noisy_start, t_noisy_end = _number("t_noisy_start", t_noisy_start), _number("t_noisy_end", t_noisy_end)
    rho = float(_number("rho", rho, positive=True))  # type: ignore[arg-type]
    if not isinstance(steps_offset, (int, np.integer)) or isinstance(steps_offset, bool):
        raise ScheduleError(f"steps_offset must be an integer, got {steps_offset!r}")
    if spacing is not None and not isinstance(spacing, str):
        ts = validate_grid(sched, spacing)
        if ts.size != n + 1:
            raise ScheduleError(f"an explicit grid for {n} steps needs {n + 1} times, got {ts.size}")
        return ts
    name = spacing or default_spacing(sched)
    if name not in SPACINGS:
        raise ScheduleError(f"unknown time spacing {name!r}; known: {sorted(SPACINGS)}")
    fn, kind = SPACINGS[name]
    if kind == "discrete":
        return _discrete_grid(sched, n, fn, name, t_start, t_end, steps_offset)
    t0 = sched.t_max if t_start is None else t_start
    t1 = sched.t_clean if t_end is None else t_end
    if not t0 > t1:
        raise ScheduleError(f"t_start ({t0}) must be larger than t_end ({t1})")
    sched.check_times(torch.tensor([t0, t1], dtype=torch.float64), what="t_start/t_end")
    if kind == "noise":
        ts = _noise_level_grid(sched, n, fn, t0, t1, t_noisy_start, t_noisy_end, rho)
    elif kind == "dmn":  # a noise spacing told the solver's order and the steps around its part
        order = DMN_SPACINGS[name] or default_dmn_order(sched, n)
        pure, clean = float(sched.alpha(t0)) == 0.0, t1 == sched.t_clean or float(sched.sigma(t1)) == 0.0
        part = functools.partial(fn, order=order, prior=int(pure), after=int(clean))
        ts = _noise_level_grid(sched, n, part, t0, t1, t_noisy_start, t_noisy_end, rho)
    elif kind == "logistic":
        ts = fn(sched, n, t0, t1, t_noisy_end=t_noisy_end, logistic_center=logistic_center, logistic_scale=logistic_scale)
    else:
        ts = fn(sched, n, t0, t1, rho=rho, steps_offset=steps_offset)
    return validate_grid(sched, ts)

"""What a preset is built from: the preset registry and the public building helpers.

A preset decides the per-step strategies (warm-up at low order, lower order at the end) and the
default time spacing; the maths lives only in :mod:`fewstep.solvers.coefficients`. A sampler family
is one module of :mod:`fewstep.solvers.presets` that builds its presets from these helpers
(:func:`multistep`, :func:`singlestep`, :func:`ancestral_steps`, :func:`finish`, the argument checks)
and registers them with :func:`register_preset`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from ...errors import SolverError
from ...schedules import NoiseSchedule
from ...timesteps import time_grid
from ..coefficients import coordinate
from ..plan import SolverSchedule, schedule_fingerprint
from ..points import Point, point
from ..strategy import Step

__all__ = [
    "PresetFn", "PRESETS", "GRID_OPTIONS", "DEFAULT_FINAL_ORDER", "register_preset", "preset_names",
    "check_int", "check_nfe", "check_eta", "finish", "pure_noise_start", "ends_clean", "start_time", "pure_start",
    "ancestral_steps", "multistep_orders", "multistep", "into_clean", "finite_from_pure_noise",
    "singlestep_orders", "singlestep",
]

PresetFn = Callable[..., SolverSchedule]
#: order of the multistep presets' step into sigma = 0 (1 = DDIM's final denoising step); measured in
#: benchmarks/reports/defaults.md, documented in docs/mathematics.md
DEFAULT_FINAL_ORDER = 2
#: every registered preset by name (:func:`register_preset`)
PRESETS: dict[str, PresetFn] = {}
#: options every preset accepts (forwarded to :func:`fewstep.time_grid`; ``data_dim``, the number of
#: values per sample, and ``model_prediction``, the model's parameterisation, only choose the default
#: grid: :func:`fewstep.defaults.default_grid`)
GRID_OPTIONS = ("spacing", "t_start", "t_end", "t_noisy_start", "t_noisy_end", "rho", "steps_offset", "logistic_center", "logistic_scale",
                "data_dim", "model_prediction")


def register_preset(name: str) -> Callable[[PresetFn], PresetFn]:
    """Register a preset builder ``fn(nfe, sched, *, options..., **grid) -> SolverSchedule`` under
    ``name`` (decorator); its keyword-only parameters are its options (:func:`fewstep.preset_options`)."""

    def deco(fn: PresetFn) -> PresetFn:
        PRESETS[name] = fn
        return fn

    return deco


def preset_names() -> list[str]:
    """The registered presets' names, sorted."""
    return sorted(PRESETS)


def check_int(what: str, value: Any, lo: int, hi: int, name: str) -> int:
    """``value`` as an int in ``lo..hi``, else a :class:`~fewstep.SolverError` naming preset ``name``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not lo <= value <= hi:
        raise SolverError(f"preset {name!r}: {what} must be an integer in {lo}..{hi}, got {value!r}")
    return int(value)


def check_nfe(nfe: Any, minimum: int, name: str) -> int:
    """``nfe`` as an int of at least ``minimum``, else a :class:`~fewstep.SolverError`."""
    if not isinstance(nfe, (int, np.integer)) or isinstance(nfe, bool):
        raise SolverError(f"nfe must be an integer, got {nfe!r}")
    if nfe < minimum:
        raise SolverError(f"preset {name!r} needs nfe >= {minimum}, got {nfe}")
    return int(nfe)


def pure_noise_start(sched: NoiseSchedule, times: np.ndarray) -> bool:
    """Does the grid start where alpha = 0 (flow matching at t = 1)? Then only a first-order data
    step can leave it."""
    return float(sched.alpha(float(times[0]))) == 0.0


def finish(name: str, sched: NoiseSchedule, times: np.ndarray, steps: list[Step], **meta: Any) -> SolverSchedule:
    """The preset's :class:`SolverSchedule` on ``times`` (a first-order noise-prediction first step
    out of pure noise becomes its data-prediction form), ``meta`` recorded with the preset's name."""
    if pure_noise_start(sched, times) and steps[0].order == 1 and steps[0].prediction == "noise":
        # the same DDIM update, defined at alpha = 0 (a corrector, with its variant, is kept)
        first = steps[0].with_(prediction="data") if steps[0].corrector else Step(order=1, prediction="data", noise=steps[0].noise, eta=steps[0].eta)
        steps = [first] + list(steps[1:])
    return SolverSchedule(
        times=tuple(float(t) for t in times), steps=tuple(steps), name=name, schedule=schedule_fingerprint(sched), meta={"preset": name, **meta}
    )


def check_eta(eta: Any, name: str, hi: float = math.inf) -> float:
    """``eta`` as a float in ``[0, hi]``, else a :class:`~fewstep.SolverError` naming preset ``name``."""
    if not isinstance(eta, (int, float, np.floating, np.integer)) or isinstance(eta, bool) or not 0.0 <= float(eta) <= hi or math.isinf(float(eta)):
        raise SolverError(f"preset {name!r}: eta must be a number in [0, {hi:g}], got {eta!r}")
    return float(eta)


def ends_clean(sched: NoiseSchedule, times: np.ndarray) -> bool:
    """Does the grid end at the schedule's clean end (sigma = 0)?"""
    return float(times[-1]) == float(sched.t_clean)


def start_time(sched: NoiseSchedule, spacing: Any, grid: dict[str, Any]) -> float:
    """The first time of the grid a preset will build (before building it)."""
    if spacing is not None and not isinstance(spacing, str):
        return float(np.asarray(spacing, dtype=np.float64).reshape(-1)[0])
    if isinstance(spacing, str) and spacing in ("leading", "trailing", "linspace", "leading_multistep"):
        return float(sched.t_max)  # below t_max for some n, but never pure noise (DiscreteVP only)
    return float(grid.get("t_start", sched.t_max))


def pure_start(sched: NoiseSchedule, spacing: Any, grid: dict[str, Any]) -> bool:
    """Does the grid start where alpha = 0 (flow matching at t = 1)?"""
    return float(sched.alpha(start_time(sched, spacing, grid))) == 0.0


def ancestral_steps(name: str, nfe: int, sched: NoiseSchedule, prediction: str, eta: float, spacing: Any, grid: dict[str, Any]) -> SolverSchedule:
    """First-order steps drawing ``nu = min(1, eta^2 (1 - e^(-2h)))`` of the next variance afresh
    (the ``ancestral`` noise rule); eta = 0 is DDIM."""
    n = check_nfe(nfe, 1, name)
    eta = check_eta(eta, name)
    times = time_grid(sched, n, spacing, **grid)
    step = Step(order=1, prediction=prediction, noise="ancestral" if eta > 0 else "none", eta=eta)  # type: ignore[arg-type]
    return finish(name, sched, times, [step] * n, eta=eta)


def multistep_orders(n: int, order: int, lower_order_final: bool, clean_end: bool, final_order: int) -> list[int]:
    """Warm-up (order i + 1 on step i), optional lower order on the last steps, and ``final_order``
    on the step into sigma = 0 (capped by the history it can read)."""
    orders = []
    for i in range(n):
        o = min(order, i + 1)
        if clean_end and i == n - 1:
            o = min(o, final_order)
        elif lower_order_final:
            o = min(o, n - i)
        orders.append(o)
    return orders


def into_clean(step: Step) -> Step:
    """The strategy of a multistep step into sigma = 0 (lambda = +inf) of order >= 2. An interpolant
    in lambda cannot reach that end; this step integrates the noise prediction, interpolated through
    the same nodes as a polynomial in the VE noise level ``sigma / alpha`` (the variable in which the
    kernel is flat: ``x_0 / alpha_0 = x_s / alpha_s - int_0^{sigma_s/alpha_s} eps d(sigma/alpha)``),
    exactly: the last step of LMS. Measured better than extrapolating x0 to sigma = 0 in any
    variable (benchmarks/reports/defaults.md). Fixed-weight Adams steps (iPNDM, PNDM) are finite
    there already and keep their form."""
    if step.order == 1 or step.uniform_nodes:
        return step
    return Step(order=step.order, prediction="noise", interp="flat", variant="phi", history=step.history)


def finite_from_pure_noise(step: Step, pure: Point) -> Step:
    """The strategy of a step that reads the pure-noise start (alpha = 0, lambda = -inf) as a node: an
    interpolation variable infinite there (lambda, sigma / alpha) is replaced by ``rho = sigma / (alpha
    + sigma)``, finite at both ends (for flow matching rho = t), with exact weights; the recorded
    order is the order computed."""
    if math.isfinite(coordinate(step.interp, step.prediction, pure)):
        return step
    return step.with_(interp="rho", variant="phi", history=step.history, corrector=step.corrector)


def multistep(
    name: str, nfe: int, sched: NoiseSchedule, *, order: int, prediction: str, variant: str, spacing: Any,
    lower_order_final: bool | None, interp: str = "lambda", corrector: bool = False,
    warmup_variant: str | None = None, uniform_nodes: bool = False, warmup: str = "lower_order",
    final_order: int | None = None, noise: str = "none", eta: float = 0.0, corrector_order: int | None = None,
    **grid: Any,
) -> SolverSchedule:
    """A multistep preset. ``warmup``: ``lower_order`` (order i + 1 on step i, as diffusers does; the
    first step's O(h^2) local error then caps the global order at 2) or ``singlestep`` (the first
    ``order - 1`` steps are singlestep steps of the full order, costing ``order`` NFE each, so the
    whole solve has the nominal order; not from pure noise, where the first step is DDIM).
    ``final_order``: the order of the step into sigma = 0 (see :func:`into_clean`; 1 = DDIM's
    final denoising step, as diffusers' multistep schedulers take)."""
    check_int("order", order, 1, 4, name)
    if warmup not in ("lower_order", "singlestep"):
        raise SolverError(f"preset {name!r}: warmup must be 'lower_order' or 'singlestep', got {warmup!r}")
    final_order = DEFAULT_FINAL_ORDER if final_order is None else check_int("final_order", final_order, 1, 4, name)
    pure = pure_start(sched, spacing, grid)
    n_warm = order - 1 if (warmup == "singlestep" and not pure) else 0
    n = check_nfe(nfe, 1 + n_warm * order, name) - n_warm * (order - 1)
    times = time_grid(sched, n, spacing, **grid)
    ends = ends_clean(sched, times)
    lof = (n < 15) if lower_order_final is None else lower_order_final
    orders = multistep_orders(n, order, lof, ends, final_order)
    pure_point = point(sched, float(times[0]))
    steps = []
    for i, o in enumerate(orders):
        c_nodes = o + 1 if corrector_order is None else min(corrector_order, i + 2, o + 1, n - i + 1)
        c = c_nodes if (corrector and i < n - 1 and c_nodes >= 2 and not (pure and i == 0 and variant != "bh2")) else 0
        e = float(eta(float(times[i]))) if callable(eta) else eta
        st_noise = noise if e > 0.0 else "none"
        if i < n_warm:
            steps.append(Step(order=order, prediction=prediction, method="singlestep", variant="phi", interp=interp, noise=st_noise, eta=e))  # type: ignore[arg-type]
            continue
        v = warmup_variant if (warmup_variant and o < order) else variant
        st = Step(order=o, prediction=prediction, variant=v, interp=interp, corrector=c, uniform_nodes=uniform_nodes, noise=st_noise, eta=e)  # type: ignore[arg-type]
        if ends and i == n - 1:
            st = into_clean(st) if st_noise == "none" else Step(order=1, prediction="data", noise=st_noise, eta=e)
        if pure and i > 0 and not uniform_nodes and (st.depth >= i or (st.corrector and st.corrector - 2 >= i)):
            st = finite_from_pure_noise(st, pure_point)
        steps.append(st)
    meta: dict[str, Any] = {"eta": None if callable(eta) else eta} if noise != "none" else {}
    return finish(name, sched, times, steps, order=order, variant=variant, warmup=warmup, final_order=final_order, **meta)


def singlestep_orders(nfe: int, order: int, clean_end: bool) -> list[int]:
    """DPM-Solver's split of an NFE budget into singlestep orders (Lu et al. 2022, Sec. 3.4),
    keeping an order-1 last step into sigma = 0."""
    budget = nfe - 1 if clean_end else nfe
    orders: list[int] = []
    if budget > 0:
        k = budget // order
        rem = budget % order
        if order == 3 and rem == 0 and k >= 1:
            orders = [3] * (k - 1) + [2, 1]
        else:
            orders = [order] * k + ([rem] if rem else [])
    if clean_end:
        orders.append(1)
    return orders


def singlestep(name: str, nfe: int, sched: NoiseSchedule, *, order: int, prediction: str, variant: str, spacing: Any, stages: dict[int, tuple[float, ...]] | None = None, final_nodes: dict[int, tuple[int, ...]] | None = None, stage_variant: str | None = None, **grid: Any) -> SolverSchedule:
    """A singlestep preset: the NFE budget split into steps of ``order`` (:func:`singlestep_orders`;
    from pure noise a DDIM step first), ``stages`` / ``final_nodes`` per order overriding the defaults."""
    n_eval = check_nfe(nfe, 1, name)
    t_end = grid.get("t_end")
    ends = t_end is None or float(t_end) == float(sched.t_clean)
    pure = pure_start(sched, spacing, grid)
    # from pure noise the first step is DDIM (1 NFE); the rest of the budget is split as usual
    orders = [1] + (singlestep_orders(n_eval - 1, order, ends) if n_eval > 1 else []) if pure else singlestep_orders(n_eval, order, ends)
    times = time_grid(sched, len(orders), spacing, **grid)
    steps = []
    for o in orders:
        if o == 1:
            steps.append(Step(order=1, prediction=prediction))  # type: ignore[arg-type]
            continue
        kw: dict[str, Any] = {}
        if stages and o in stages:
            kw["stages"] = stages[o]
        if final_nodes and o in final_nodes:
            kw["final_nodes"] = final_nodes[o]
        steps.append(Step(order=o, prediction=prediction, method="singlestep", variant=variant, stage_variant=stage_variant, **kw))  # type: ignore[arg-type]
    return finish(name, sched, times, steps, order=order)

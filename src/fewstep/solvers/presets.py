"""Named samplers as presets: each builds a :class:`SolverSchedule` from the shared :class:`Step`.

A preset decides the per-step strategies (warm-up at low order, lower order at the end) and the
default time spacing; the maths lives only in :mod:`fewstep.solvers.coefficients`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Sequence

import numpy as np

from ..defaults import default_grid
from ..errors import ArgumentError, SolverError
from ..schedules import NoiseSchedule
from ..timesteps import time_grid
from .coefficients import Point, coordinate, point
from .plan import SolverSchedule, schedule_fingerprint
from .strategy import Step

__all__ = ["preset", "PRESETS", "register_preset", "preset_names"]

PresetFn = Callable[..., SolverSchedule]
#: order of the multistep presets' step into sigma = 0 (1 = DDIM's final denoising step); measured in
#: benchmarks/reports/defaults.md, documented in docs/mathematics.md
DEFAULT_FINAL_ORDER = 2
PRESETS: dict[str, PresetFn] = {}


def register_preset(name: str) -> Callable[[PresetFn], PresetFn]:
    def deco(fn: PresetFn) -> PresetFn:
        PRESETS[name] = fn
        return fn

    return deco


def preset_names() -> list[str]:
    return sorted(PRESETS)


def _check_int(what: str, value: Any, lo: int, hi: int, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not lo <= value <= hi:
        raise SolverError(f"preset {name!r}: {what} must be an integer in {lo}..{hi}, got {value!r}")
    return int(value)


def _check_nfe(nfe: Any, minimum: int, name: str) -> int:
    if not isinstance(nfe, (int, np.integer)) or isinstance(nfe, bool):
        raise SolverError(f"nfe must be an integer, got {nfe!r}")
    if nfe < minimum:
        raise SolverError(f"preset {name!r} needs nfe >= {minimum}, got {nfe}")
    return int(nfe)


def _pure_noise_start(sched: NoiseSchedule, times: np.ndarray) -> bool:
    """Does the grid start where alpha = 0 (flow matching at t = 1)? Then only a first-order data
    step can leave it."""
    return float(sched.alpha(float(times[0]))) == 0.0


def _finish(name: str, sched: NoiseSchedule, times: np.ndarray, steps: list[Step], **meta: Any) -> SolverSchedule:
    if _pure_noise_start(sched, times) and steps[0].order == 1 and steps[0].prediction == "noise":
        # the same DDIM update, defined at alpha = 0 (a corrector, with its variant, is kept)
        first = steps[0].with_(prediction="data") if steps[0].corrector else Step(order=1, prediction="data", noise=steps[0].noise, eta=steps[0].eta)
        steps = [first] + list(steps[1:])
    return SolverSchedule(
        times=tuple(float(t) for t in times), steps=tuple(steps), name=name, schedule=schedule_fingerprint(sched), meta={"preset": name, **meta}
    )


def _check_eta(eta: Any, name: str, hi: float = math.inf) -> float:
    if not isinstance(eta, (int, float, np.floating, np.integer)) or isinstance(eta, bool) or not 0.0 <= float(eta) <= hi or math.isinf(float(eta)):
        raise SolverError(f"preset {name!r}: eta must be a number in [0, {hi:g}], got {eta!r}")
    return float(eta)


def _ancestral_steps(name: str, nfe: int, sched: NoiseSchedule, prediction: str, eta: float, spacing: Any, grid: dict[str, Any]) -> SolverSchedule:
    """First-order steps drawing ``nu = min(1, eta^2 (1 - e^(-2h)))`` of the next variance afresh
    (the ``ancestral`` noise rule); eta = 0 is DDIM."""
    n = _check_nfe(nfe, 1, name)
    eta = _check_eta(eta, name)
    times = time_grid(sched, n, spacing, **grid)
    step = Step(order=1, prediction=prediction, noise="ancestral" if eta > 0 else "none", eta=eta)  # type: ignore[arg-type]
    return _finish(name, sched, times, [step] * n, eta=eta)


@register_preset("ddim")
def ddim(nfe: int, sched: NoiseSchedule, *, spacing: str | Sequence[float] | None = None, prediction: str = "data", eta: float = 0.0, **grid: Any) -> SolverSchedule:
    """DDIM (Song et al. 2021) = DPM-Solver-1 = DPM-Solver++-1: the first-order exponential integrator.

    Data and noise prediction give the same update at first order; ``prediction`` only picks which
    model output is read (they differ by rounding, and by thresholding when it is on). ``eta > 0``
    draws DDIM's ``sigma_eta = eta sigma_t sqrt(1 - e^(-2h))`` of fresh noise per step (eta = 1: DDPM).
    """
    return _ancestral_steps("ddim", nfe, sched, prediction, eta, spacing, grid)


@register_preset("ddpm")
def ddpm(nfe: int, sched: NoiseSchedule, *, spacing: str | Sequence[float] | None = None, eta: float = 1.0, **grid: Any) -> SolverSchedule:
    """DDPM ancestral sampling (Ho et al. 2020): each step samples the posterior
    ``q(x_t | x_s, x0)`` with ``x0`` predicted (variance "fixed_small"; over skipped steps the posterior
    of the jump, as diffusers' DDPMScheduler). Equal to DDIM with eta = 1."""
    return _ancestral_steps("ddpm", nfe, sched, "data", eta, spacing, grid)


@register_preset("euler_ancestral")
def euler_ancestral(nfe: int, sched: NoiseSchedule, *, spacing: str | Sequence[float] | None = None, eta: float = 1.0, **grid: Any) -> SolverSchedule:
    """Euler ancestral (k-diffusion ``sample_euler_ancestral``; diffusers EulerAncestralDiscrete):
    an Euler step in sigma/alpha to ``sigma_down``, then ``sigma_up`` of fresh noise,
    ``sigma_up = min(sigma_t, eta sigma_t sqrt(1 - sigma_t^2 / sigma_s^2))`` in the VE variable. The
    same update as DDIM's eta, read from the noise prediction."""
    return _ancestral_steps("euler_ancestral", nfe, sched, "noise", eta, spacing, grid)



def _ends_clean(sched: NoiseSchedule, times: np.ndarray) -> bool:
    return float(times[-1]) == float(sched.t_clean)


def _multistep_orders(n: int, order: int, lower_order_final: bool, ends_clean: bool, final_order: int) -> list[int]:
    """Warm-up (order i + 1 on step i), optional lower order on the last steps, and ``final_order``
    on the step into sigma = 0 (capped by the history it can read)."""
    orders = []
    for i in range(n):
        o = min(order, i + 1)
        if ends_clean and i == n - 1:
            o = min(o, final_order)
        elif lower_order_final:
            o = min(o, n - i)
        orders.append(o)
    return orders


def _start_time(sched: NoiseSchedule, spacing: Any, grid: dict[str, Any]) -> float:
    """The first time of the grid a preset will build (before building it)."""
    if spacing is not None and not isinstance(spacing, str):
        return float(np.asarray(spacing, dtype=np.float64).reshape(-1)[0])
    if isinstance(spacing, str) and spacing in ("leading", "trailing", "linspace", "leading_multistep"):
        return float(sched.t_max)  # below t_max for some n, but never pure noise (DiscreteVP only)
    return float(grid.get("t_start", sched.t_max))


def _pure_start(sched: NoiseSchedule, spacing: Any, grid: dict[str, Any]) -> bool:
    """Does the grid start where alpha = 0 (flow matching at t = 1)?"""
    return float(sched.alpha(_start_time(sched, spacing, grid))) == 0.0


def _into_clean(step: Step) -> Step:
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


def _finite_from_pure_noise(step: Step, pure: Point) -> Step:
    """The strategy of a step that reads the pure-noise start (alpha = 0, lambda = -inf) as a node: an
    interpolation variable infinite there (lambda, sigma / alpha) is replaced by ``rho = sigma / (alpha
    + sigma)``, finite at both ends (for flow matching rho = t), with exact weights; the recorded
    order is the order computed."""
    if math.isfinite(coordinate(step.interp, step.prediction, pure)):
        return step
    return step.with_(interp="rho", variant="phi", history=step.history, corrector=step.corrector)


def _multistep(
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
    ``final_order``: the order of the step into sigma = 0 (see :func:`_into_clean`; 1 = DDIM's
    final denoising step, as diffusers' multistep schedulers take)."""
    _check_int("order", order, 1, 4, name)
    if warmup not in ("lower_order", "singlestep"):
        raise SolverError(f"preset {name!r}: warmup must be 'lower_order' or 'singlestep', got {warmup!r}")
    final_order = DEFAULT_FINAL_ORDER if final_order is None else _check_int("final_order", final_order, 1, 4, name)
    pure = _pure_start(sched, spacing, grid)
    n_warm = order - 1 if (warmup == "singlestep" and not pure) else 0
    n = _check_nfe(nfe, 1 + n_warm * order, name) - n_warm * (order - 1)
    times = time_grid(sched, n, spacing, **grid)
    ends = _ends_clean(sched, times)
    lof = (n < 15) if lower_order_final is None else lower_order_final
    orders = _multistep_orders(n, order, lof, ends, final_order)
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
            st = _into_clean(st) if st_noise == "none" else Step(order=1, prediction="data", noise=st_noise, eta=e)
        if pure and i > 0 and not uniform_nodes and (st.depth >= i or (st.corrector and st.corrector - 2 >= i)):
            st = _finite_from_pure_noise(st, pure_point)
        steps.append(st)
    meta: dict[str, Any] = {"eta": None if callable(eta) else eta} if noise != "none" else {}
    return _finish(name, sched, times, steps, order=order, variant=variant, warmup=warmup, final_order=final_order, **meta)


@register_preset("dpmpp_2m")
def dpmpp_2m(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, solver_type: str = "midpoint", lower_order_final: bool | None = None, warmup: str = "lower_order", final_order: int | None = None, **grid: Any) -> SolverSchedule:
    """DPM-Solver++(2M) (Lu et al. 2022b): data prediction, multistep order 2. ``solver_type``
    ``midpoint`` (diffusers' default, UniPC bh2 weights) or ``heun`` (exact phi_2 weights)."""
    variant = {"midpoint": "bh2", "heun": "phi"}.get(solver_type)
    if variant is None:
        raise SolverError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    return _multistep("dpmpp_2m", nfe, sched, order=2, prediction="data", variant=variant, spacing=spacing, lower_order_final=lower_order_final, warmup=warmup, final_order=final_order, **grid)


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
    return _multistep("dpmpp_3m", nfe, sched, order=3, prediction="data", variant=variant, warmup_variant=warm, spacing=spacing, lower_order_final=lower_order_final, warmup=warmup, final_order=final_order, **grid)


@register_preset("dpmpp_2m_sde")
def dpmpp_2m_sde(nfe: int, sched: NoiseSchedule, *, eta: float = 1.0, spacing: Any = None, solver_type: str = "midpoint", lower_order_final: bool | None = None, **grid: Any) -> SolverSchedule:
    """DPM-Solver++(2M) SDE (Lu et al. 2022b; diffusers ``sde-dpmsolver++``, k-diffusion
    ``sample_dpmpp_2m_sde``): the 2M multistep update on the ``sde`` noise rule, kernel rate 1 + eta
    and ``sigma_t sqrt(1 - e^(-2 eta h))`` fresh noise per step; the last step is x0."""
    variant = {"midpoint": "bh2", "heun": "phi"}.get(solver_type)
    if variant is None:
        raise SolverError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    return _multistep("dpmpp_2m_sde", nfe, sched, order=2, prediction="data", variant=variant, spacing=spacing, lower_order_final=lower_order_final,
                      final_order=1, noise="sde", eta=_check_eta(eta, "dpmpp_2m_sde"), **grid)


@register_preset("dpmpp_3m_sde")
def dpmpp_3m_sde(nfe: int, sched: NoiseSchedule, *, eta: float = 1.0, spacing: Any = None, weights: str = "exact", lower_order_final: bool | None = None, **grid: Any) -> SolverSchedule:
    """DPM-Solver++(3M) SDE (k-diffusion ``sample_dpmpp_3m_sde``): multistep order 3 on the ``sde``
    noise rule. ``weights="published"`` halves the second-difference weight as k-diffusion does (see
    :func:`dpmpp_3m`)."""
    if weights not in ("exact", "published"):
        raise SolverError(f"weights must be 'exact' or 'published', got {weights!r}")
    return _multistep("dpmpp_3m_sde", nfe, sched, order=3, prediction="data", variant="phi" if weights == "exact" else "dpm3m", warmup_variant="phi",
                      spacing=spacing, lower_order_final=lower_order_final, final_order=1, noise="sde", eta=_check_eta(eta, "dpmpp_3m_sde"), **grid)


@register_preset("unipc")
def unipc(nfe: int, sched: NoiseSchedule, *, order: int = 3, variant: str = "bh2", corrector: bool = True, prediction: str = "data", spacing: Any = None, lower_order_final: bool | None = None, warmup: str = "lower_order", final_order: int | None = None, **grid: Any) -> SolverSchedule:
    """UniPC (Zhao et al. 2023): multistep UniP predictor + UniC corrector re-using the next evaluation.
    ``variant`` bh1 (B(h) = h) or bh2 (B(h) = e^h - 1); ``corrector=False`` gives UniP alone."""
    if variant not in ("bh1", "bh2"):
        raise SolverError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    return _multistep("unipc", nfe, sched, order=order, prediction=prediction, variant=variant, corrector=corrector, spacing=spacing, lower_order_final=lower_order_final, warmup=warmup, final_order=final_order, **grid)


@register_preset("deis")
def deis(nfe: int, sched: NoiseSchedule, *, order: int = 3, interp: str = "t", spacing: Any = None, lower_order_final: bool | None = None, warmup: str = "lower_order", final_order: int | None = None, **grid: Any) -> SolverSchedule:
    """DEIS tAB (Zhang & Chen 2023): noise prediction, multistep, the eps interpolant a polynomial in
    the model time t integrated exactly against the exponential kernel. ``interp="lambda"`` is
    diffusers' DEISMultistepScheduler (polynomial in log sigma/alpha)."""
    return _multistep("deis", nfe, sched, order=order, prediction="noise", variant="phi", interp=interp, spacing=spacing, lower_order_final=lower_order_final, warmup=warmup, final_order=final_order, **grid)


@register_preset("lms")
def lms(nfe: int, sched: NoiseSchedule, *, order: int = 4, spacing: Any = None, lower_order_final: bool = False, warmup: str = "lower_order", final_order: int | None = None, **grid: Any) -> SolverSchedule:
    """Linear multistep (k-diffusion / diffusers LMS): the eps interpolant a polynomial in sigma/alpha,
    integrated exactly (Adams-Bashforth with real step sizes in the VE variable)."""
    return _multistep("lms", nfe, sched, order=order, prediction="noise", variant="phi", interp="flat", spacing=spacing, lower_order_final=lower_order_final, warmup=warmup, final_order=order if final_order is None else final_order, **grid)


@register_preset("ipndm")
def ipndm(nfe: int, sched: NoiseSchedule, *, order: int = 4, spacing: Any = None, warmup: str = "lower_order", **grid: Any) -> SolverSchedule:
    """iPNDM (Zhang & Chen 2023; k-diffusion ``sample_ipndm``): Euler in sigma/alpha with fixed
    Adams-Bashforth weights of order up to 4 (uniform-step assumption), lower order on warm-up."""
    return _multistep("ipndm", nfe, sched, order=order, prediction="noise", variant="adams", uniform_nodes=True, spacing=spacing, lower_order_final=False, warmup=warmup, final_order=order, **grid)


def _check_churn(name: str, s_churn: Any, s_tmin: Any, s_tmax: Any, s_noise: Any) -> tuple[float, float, float, float]:
    vals = []
    for what, v in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_tmax", s_tmax), ("s_noise", s_noise)):
        if not isinstance(v, (int, float, np.floating, np.integer)) or isinstance(v, bool) or not float(v) >= 0.0 or (what != "s_tmax" and math.isinf(float(v))):
            raise SolverError(f"preset {name!r}: {what} must be a number >= 0{'' if what == 's_tmax' else ' (finite)'}, got {v!r}")
        vals.append(float(v))
    return vals[0], vals[1], vals[2], vals[3]


def _churned(name: str, sched: NoiseSchedule, times: np.ndarray, steps: list[Step], s_churn: Any, s_tmin: Any, s_tmax: Any, s_noise: Any) -> SolverSchedule:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2; k-diffusion ``s_churn``): step ``i``
    first raises the VE noise level ``sigma_i`` (= sigma/alpha) by ``1 + gamma``, ``gamma =
    min(s_churn / N, sqrt(2) - 1)`` for ``s_tmin <= sigma_i <= s_tmax`` (else 0), with fresh noise
    scaled by ``s_noise`` (``Step.churn``; the compiler draws it from its own Brownian channel)."""
    churn, tmin, tmax, snoise = _check_churn(name, s_churn, s_tmin, s_tmax, s_noise)
    meta: dict[str, Any] = {}
    if churn > 0.0:
        gamma = min(churn / len(steps), math.sqrt(2.0) - 1.0)
        levels = [p.sigma / p.alpha if p.alpha > 0 else math.inf for p in (point(sched, float(t)) for t in times[:-1])]
        steps = [st.with_(churn=gamma, churn_noise=snoise) if tmin <= lv <= tmax else st for st, lv in zip(steps, levels)]
        meta = {"s_churn": churn, "s_tmin": tmin, "s_tmax": tmax if math.isfinite(tmax) else None, "s_noise": snoise}
    return _finish(name, sched, times, steps, **meta)


@register_preset("euler")
def euler(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0, **grid: Any) -> SolverSchedule:
    """Euler in the VE variable (Karras et al. 2022 / k-diffusion): ``dx/dsigma = eps``; identical to
    noise-prediction DDIM. ``s_churn > 0``: EDM's stochastic Euler (``s_tmin``, ``s_tmax``, ``s_noise``
    as k-diffusion's ``sample_euler``). Default grid: :func:`fewstep.default_spacing`."""
    n = _check_nfe(nfe, 1, "euler")
    times = time_grid(sched, n, spacing, **grid)
    return _churned("euler", sched, times, [Step(order=1, prediction="noise")] * n, s_churn, s_tmin, s_tmax, s_noise)


def _heun_steps(name: str, nfe: int, sched: NoiseSchedule, spacing: Any, grid: dict[str, Any]) -> tuple[np.ndarray, list[Step]]:
    n_eval = _check_nfe(nfe, 1, name)
    lead = 1 if _pure_start(sched, spacing, grid) else 0  # leave alpha = 0 with one Euler (DDIM) step
    n_heun = max(0, (n_eval - lead - 1) // 2)
    n_euler = n_eval - lead - 2 * n_heun
    times = time_grid(sched, lead + n_heun + n_euler, spacing, **grid)
    h = Step(order=2, prediction="noise", method="singlestep", stages=(1.0,), variant="bh2")
    euler1 = Step(order=1, prediction="noise")
    return times, [euler1] * lead + [h] * n_heun + [euler1] * n_euler


@register_preset("heun")
def heun(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0, **grid: Any) -> SolverSchedule:
    """Heun's second-order method in the VE variable (Karras et al. 2022, EDM Algorithm 1): 2 NFE per
    step, Euler on the last step into sigma = 0. An even NFE ends with two Euler steps.
    ``s_churn > 0``: EDM's stochastic Heun (Algorithm 2; k-diffusion ``sample_heun``)."""
    times, steps = _heun_steps("heun", nfe, sched, spacing, grid)
    return _churned("heun", sched, times, steps, s_churn, s_tmin, s_tmax, s_noise)


@register_preset("edm_sde")
def edm_sde(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, s_churn: float = 40.0, s_tmin: float = 0.05, s_tmax: float = 50.0, s_noise: float = 1.003, **grid: Any) -> SolverSchedule:
    """EDM's stochastic Heun sampler (Karras et al. 2022, Algorithm 2) with the settings of EDM's
    ImageNet-64 release (``S_churn=40, S_min=0.05, S_max=50, S_noise=1.003``): :func:`heun` with churn."""
    times, steps = _heun_steps("edm_sde", nfe, sched, spacing, grid)
    return _churned("edm_sde", sched, times, steps, s_churn, s_tmin, s_tmax, s_noise)


@register_preset("pndm")
def pndm(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, **grid: Any) -> SolverSchedule:
    """PLMS (Liu et al. 2022; diffusers PNDM with ``skip_prk_steps``): a trapezoidal first step
    (2 NFE), then Adams-Bashforth 2, 3, 4 on eps with fixed weights, each plugged into the DDIM update."""
    n_eval = _check_nfe(nfe, 3, "pndm")
    pure = _pure_start(sched, spacing, grid)
    n = n_eval if pure else n_eval - 1  # leaving alpha = 0 the first step is DDIM (1 NFE), else trapezoidal (2 NFE)
    times = time_grid(sched, n, spacing, **grid)
    first = Step(order=1, prediction="noise") if pure else Step(order=2, prediction="noise", method="singlestep", stages=(1.0,), variant="adams")
    steps = [first]
    for i in range(1, n):  # Adams weights stay finite into sigma = 0, so the last step keeps its order
        steps.append(Step(order=min(4, i + 1), prediction="noise", variant="adams", uniform_nodes=True))
    return _finish("pndm", sched, times, steps)


PRESETS["plms"] = pndm


def _singlestep_orders(nfe: int, order: int, ends_clean: bool) -> list[int]:
    """DPM-Solver's split of an NFE budget into singlestep orders (Lu et al. 2022, Sec. 3.4),
    keeping an order-1 last step into sigma = 0."""
    budget = nfe - 1 if ends_clean else nfe
    orders: list[int] = []
    if budget > 0:
        k = budget // order
        rem = budget % order
        if order == 3 and rem == 0 and k >= 1:
            orders = [3] * (k - 1) + [2, 1]
        else:
            orders = [order] * k + ([rem] if rem else [])
    if ends_clean:
        orders.append(1)
    return orders


def _singlestep(name: str, nfe: int, sched: NoiseSchedule, *, order: int, prediction: str, variant: str, spacing: Any, stages: dict[int, tuple[float, ...]] | None = None, final_nodes: dict[int, tuple[int, ...]] | None = None, stage_variant: str | None = None, **grid: Any) -> SolverSchedule:
    n_eval = _check_nfe(nfe, 1, name)
    t_end = grid.get("t_end")
    ends = t_end is None or float(t_end) == float(sched.t_clean)
    pure = _pure_start(sched, spacing, grid)
    # from pure noise the first step is DDIM (1 NFE); the rest of the budget is split as usual
    orders = [1] + (_singlestep_orders(n_eval - 1, order, ends) if n_eval > 1 else []) if pure else _singlestep_orders(n_eval, order, ends)
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
    return _finish(name, sched, times, steps, order=order)


def _dpm_solver(order: int) -> PresetFn:
    def build(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, **grid: Any) -> SolverSchedule:
        # DPM-Solver-2: r1 = 1/2; DPM-Solver-3: r1 = 1/3, r2 = 2/3 and a final step through {0, r2} only
        return _singlestep(f"dpm_solver_{order}", nfe, sched, order=order, prediction="noise", variant="phi", spacing=spacing, final_nodes={3: (0, 2)}, **grid)

    build.__doc__ = f"DPM-Solver-{order} (Lu et al. 2022): noise prediction, singlestep order {order}."
    return build


for _k in (1, 2, 3):
    PRESETS[f"dpm_solver_{_k}"] = _dpm_solver(_k)


@register_preset("dpmpp_2s")
def dpmpp_2s(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, **grid: Any) -> SolverSchedule:
    """DPM-Solver++(2S) (Lu et al. 2022b): data prediction, singlestep order 2 with r = 1/2."""
    return _singlestep("dpmpp_2s", nfe, sched, order=2, prediction="data", variant="bh2", spacing=spacing, **grid)


@register_preset("dpmpp_sde")
def dpmpp_sde(nfe: int, sched: NoiseSchedule, *, eta: float = 1.0, r: float = 0.5, spacing: Any = None, **grid: Any) -> SolverSchedule:
    """DPM-Solver++ SDE (k-diffusion ``sample_dpmpp_sde``): singlestep order 2 with a stage at the
    fraction ``r`` of the step in log-SNR, both the stage and the step ancestral (DDIM-eta) updates
    whose noise is the Brownian increment over ``[s, s_r]`` and over ``[s, t]`` (correlated, as a
    Brownian tree gives); the final update reads ``(1 - 1/(2r)) x0_s + 1/(2r) x0_r`` (bh2 weights)."""
    eta = _check_eta(eta, "dpmpp_sde")
    if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0.0 < float(r) < 1.0:
        raise SolverError(f"preset 'dpmpp_sde': r must be in (0, 1), got {r!r}")
    plan = _singlestep("dpmpp_sde", nfe, sched, order=2, prediction="data", variant="bh2", spacing=spacing, stages={2: (float(r),)}, **grid)
    rule = "ancestral" if eta > 0 else "none"
    steps = tuple(st.with_(noise=rule, eta=eta) if st.order == 2 else st for st in plan.steps)
    return plan.replace(steps=steps, meta={**plan.meta, "eta": eta})


@register_preset("lcm")
def lcm(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, renoise: float = 1.0, **grid: Any) -> SolverSchedule:
    """Consistency-model multistep sampling (Song et al. 2023; Luo et al. 2023, LCM): predict x0,
    re-noise it to the next level with fresh noise (the ``renoise`` noise rule, fraction ``renoise`` of
    the variance), repeat; the last step returns x0. Meant for consistency-distilled models;
    stochastic (needs a seed). Default grid on DiscreteVP: diffusers' trailing spacing."""
    n = _check_nfe(nfe, 1, "lcm")
    nu = _check_eta(renoise, "lcm", 1.0)
    times = time_grid(sched, n, spacing, **grid)
    steps = [Step(order=1, prediction="data", noise="renoise" if nu > 0 else "none", eta=nu)] * (n - 1) + [Step(order=1, prediction="data")]
    return _finish("lcm", sched, times, steps)


#: options every preset accepts (forwarded to :func:`fewstep.time_grid`; ``data_dim``, the number of
#: values per sample, only moves the default grid: :func:`fewstep.defaults.default_grid`)
GRID_OPTIONS = ("spacing", "t_start", "t_end", "t_noisy_start", "t_noisy_end", "rho", "steps_offset", "logistic_center", "logistic_scale",
                "data_dim")


from . import er_sde as _er_sde, sa_solver as _sa_solver  # noqa: E402,F401  (solver families registering their presets)


def preset_options(name: str) -> list[str]:
    """The keyword options of a preset: its own and the grid options."""
    if name not in PRESETS:
        raise SolverError(f"unknown solver preset {name!r}; known: {preset_names()}")
    own = [p.name for p in inspect.signature(PRESETS[name]).parameters.values()
           if p.kind is inspect.Parameter.KEYWORD_ONLY]
    return sorted(set(own) | set(GRID_OPTIONS))


def preset(name: str, nfe: int, sched: NoiseSchedule, **options: Any) -> SolverSchedule:
    """Build the named preset for ``nfe`` model evaluations on the noise schedule ``sched``.

    Options: ``spacing`` (a name from :data:`fewstep.timesteps.SPACINGS` or explicit times; default
    :func:`fewstep.default_spacing` of the preset and schedule), ``t_start``, ``t_end``,
    ``t_noisy_start``, ``t_noisy_end``, ``rho``, ``data_dim`` (values per sample: moves the default
    logistic grid, :class:`fewstep.defaults.DefaultRule`; :func:`fewstep.sample` passes it), and
    preset-specific ones (:func:`preset_options`).
    """
    if not isinstance(name, str):
        raise ArgumentError(f"a preset name must be a string, got {type(name).__name__}")
    if not isinstance(sched, NoiseSchedule):
        raise ArgumentError(f"sched must be a fewstep NoiseSchedule, got {type(sched).__name__}")
    valid = preset_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ArgumentError(f"unknown option(s) {unknown} for preset {name!r}; valid options: {valid}")
    data_dim = options.pop("data_dim", None)
    if data_dim is not None and (not isinstance(data_dim, int) or isinstance(data_dim, bool) or data_dim < 1):
        raise ArgumentError(f"data_dim must be a positive integer (values per sample), got {data_dim!r}")
    if options.get("spacing") is None:
        options["spacing"], grid_defaults = default_grid(sched, name, data_dim)
        for key, value in grid_defaults.items():
            options.setdefault(key, value)
    plan = PRESETS[name](nfe, sched, **options)
    if data_dim is not None:
        options["data_dim"] = data_dim
    sp = options["spacing"]
    plan.meta["spacing"] = sp if isinstance(sp, str) else "explicit"
    grid = {k: options[k] for k in GRID_OPTIONS if k != "spacing" and k in options}
    if grid:
        plan.meta["grid"] = grid
    return plan

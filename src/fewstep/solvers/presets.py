"""Named samplers as presets: each builds a :class:`SolverSchedule` from the shared :class:`Step`.

A preset decides the per-step strategies (warm-up at low order, lower order at the end) and the
default time spacing; the maths lives only in :mod:`fewstep.solvers.coefficients`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from ..errors import SolverError
from ..schedules import NoiseSchedule
from ..timesteps import time_grid
from .plan import SolverSchedule, schedule_fingerprint
from .strategy import Step

__all__ = ["preset", "PRESETS", "register_preset", "preset_names"]

PresetFn = Callable[..., SolverSchedule]
PRESETS: dict[str, PresetFn] = {}


def register_preset(name: str) -> Callable[[PresetFn], PresetFn]:
    def deco(fn: PresetFn) -> PresetFn:
        PRESETS[name] = fn
        return fn

    return deco


def preset_names() -> list[str]:
    return sorted(PRESETS)


def _grid(sched: NoiseSchedule, n: int, spacing: str | Sequence[float] | None, default: str | None, **kw: Any) -> np.ndarray:
    return time_grid(sched, n, spacing if spacing is not None else default, **kw)


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
        steps = [Step(order=1, prediction="data")] + list(steps[1:])  # the same DDIM update, defined at alpha = 0
    return SolverSchedule(
        times=tuple(float(t) for t in times), steps=tuple(steps), name=name, schedule=schedule_fingerprint(sched), meta={"preset": name, **meta}
    )


@register_preset("ddim")
def ddim(nfe: int, sched: NoiseSchedule, *, spacing: str | Sequence[float] | None = None, prediction: str = "data", **grid: Any) -> SolverSchedule:
    """DDIM (Song et al. 2021) = DPM-Solver-1 = DPM-Solver++-1: the first-order exponential integrator.

    Data and noise prediction give the same update at first order; ``prediction`` only picks which
    model output is read (they differ by rounding, and by thresholding when it is on).
    """
    n = _check_nfe(nfe, 1, "ddim")
    times = _grid(sched, n, spacing, None, **grid)
    return _finish("ddim", sched, times, [Step(order=1, prediction=prediction)] * n)  # type: ignore[arg-type]



def _ends_clean(sched: NoiseSchedule, times: np.ndarray) -> bool:
    return float(times[-1]) == float(sched.t_clean)


def _multistep_orders(n: int, order: int, lower_order_final: bool, ends_clean: bool) -> list[int]:
    """Warm-up (order i + 1 on step i), optional lower order on the last steps, order 1 into sigma = 0
    (pass ``ends_clean=False`` for steps whose weights stay finite there: flat kernels, Adams)."""
    orders = []
    for i in range(n):
        o = min(order, i + 1)
        if lower_order_final:
            o = min(o, n - i)
        if ends_clean and i == n - 1:
            o = 1
        orders.append(o)
    return orders


def _multistep(
    name: str, nfe: int, sched: NoiseSchedule, *, order: int, prediction: str, variant: str, spacing: Any,
    default_spacing: str | None, lower_order_final: bool | None, interp: str = "lambda", corrector: bool = False,
    warmup_variant: str | None = None, uniform_nodes: bool = False, warmup: str = "lower_order", **grid: Any,
) -> SolverSchedule:
    """A multistep preset. ``warmup``: ``lower_order`` (order i + 1 on step i, as diffusers does; the
    first step's O(h^2) local error then caps the global order at 2) or ``singlestep`` (the first
    ``order - 1`` steps are singlestep steps of the full order, costing ``order`` NFE each, so the
    whole solve has the nominal order)."""
    if not isinstance(order, int) or isinstance(order, bool) or not 1 <= order <= 4:
        raise SolverError(f"preset {name!r}: order must be 1..4, got {order!r}")
    if warmup not in ("lower_order", "singlestep"):
        raise SolverError(f"warmup must be 'lower_order' or 'singlestep', got {warmup!r}")
    n_warm = order - 1 if warmup == "singlestep" else 0
    n = _check_nfe(nfe, 1 + n_warm * order, name) - n_warm * (order - 1)
    times = _grid(sched, n, spacing, default_spacing, **grid)
    ends = _ends_clean(sched, times)
    lof = (n < 15) if lower_order_final is None else lower_order_final
    finite_into_clean = variant == "adams" or (interp == "flat" and prediction == "noise")
    orders = _multistep_orders(n, order, lof, ends and not finite_into_clean)
    pure = _pure_noise_start(sched, times)
    if pure:
        n_warm = 0  # a singlestep step cannot leave alpha = 0; the first step is DDIM
    steps = []
    for i, o in enumerate(orders):
        c = (o + 1) if (corrector and i < n - 1 and not (pure and i == 0 and variant != "bh2")) else 0
        if i < n_warm and not (ends and i == n - 1):
            steps.append(Step(order=order, prediction=prediction, method="singlestep", variant="phi", interp=interp))  # type: ignore[arg-type]
            continue
        if i < n_warm:
            c = 0
        v = warmup_variant if (warmup_variant and o < order) else variant
        steps.append(Step(order=o, prediction=prediction, variant=v, interp=interp, corrector=c, uniform_nodes=uniform_nodes))  # type: ignore[arg-type]
    return _finish(name, sched, times, steps, order=order, variant=variant, warmup=warmup)


@register_preset("dpmpp_2m")
def dpmpp_2m(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, solver_type: str = "midpoint", lower_order_final: bool | None = None, warmup: str = "lower_order", **grid: Any) -> SolverSchedule:
    """DPM-Solver++(2M) (Lu et al. 2022b): data prediction, multistep order 2. ``solver_type``
    ``midpoint`` (diffusers' default, UniPC bh2 weights) or ``heun`` (exact phi_2 weights)."""
    variant = {"midpoint": "bh2", "heun": "phi"}.get(solver_type)
    if variant is None:
        raise SolverError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    return _multistep("dpmpp_2m", nfe, sched, order=2, prediction="data", variant=variant, spacing=spacing, default_spacing=None, lower_order_final=lower_order_final, warmup=warmup, **grid)


@register_preset("dpmpp_3m")
def dpmpp_3m(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, solver_type: str = "midpoint", lower_order_final: bool | None = None, weights: str = "exact", warmup: str = "lower_order", **grid: Any) -> SolverSchedule:
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
    return _multistep("dpmpp_3m", nfe, sched, order=3, prediction="data", variant=variant, warmup_variant=warm, spacing=spacing, default_spacing=None, lower_order_final=lower_order_final, warmup=warmup, **grid)


@register_preset("unipc")
def unipc(nfe: int, sched: NoiseSchedule, *, order: int = 3, variant: str = "bh2", corrector: bool = True, prediction: str = "data", spacing: Any = None, lower_order_final: bool | None = None, warmup: str = "lower_order", **grid: Any) -> SolverSchedule:
    """UniPC (Zhao et al. 2023): multistep UniP predictor + UniC corrector re-using the next evaluation.
    ``variant`` bh1 (B(h) = h) or bh2 (B(h) = e^h - 1); ``corrector=False`` gives UniP alone."""
    if variant not in ("bh1", "bh2"):
        raise SolverError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    return _multistep("unipc", nfe, sched, order=order, prediction=prediction, variant=variant, corrector=corrector, spacing=spacing, default_spacing=None, lower_order_final=lower_order_final, warmup=warmup, **grid)


@register_preset("deis")
def deis(nfe: int, sched: NoiseSchedule, *, order: int = 3, interp: str = "t", spacing: Any = None, lower_order_final: bool | None = None, warmup: str = "lower_order", **grid: Any) -> SolverSchedule:
    """DEIS tAB (Zhang & Chen 2023): noise prediction, multistep, the eps interpolant a polynomial in
    the model time t integrated exactly against the exponential kernel. ``interp="lambda"`` is
    diffusers' DEISMultistepScheduler (polynomial in log sigma/alpha)."""
    return _multistep("deis", nfe, sched, order=order, prediction="noise", variant="phi", interp=interp, spacing=spacing, default_spacing=None, lower_order_final=lower_order_final, warmup=warmup, **grid)


@register_preset("lms")
def lms(nfe: int, sched: NoiseSchedule, *, order: int = 4, spacing: Any = None, lower_order_final: bool = False, warmup: str = "lower_order", **grid: Any) -> SolverSchedule:
    """Linear multistep (k-diffusion / diffusers LMS): the eps interpolant a polynomial in sigma/alpha,
    integrated exactly (Adams-Bashforth with real step sizes in the VE variable)."""
    return _multistep("lms", nfe, sched, order=order, prediction="noise", variant="phi", interp="flat", spacing=spacing, default_spacing=None, lower_order_final=lower_order_final, warmup=warmup, **grid)


@register_preset("ipndm")
def ipndm(nfe: int, sched: NoiseSchedule, *, order: int = 4, spacing: Any = None, warmup: str = "lower_order", **grid: Any) -> SolverSchedule:
    """iPNDM (Zhang & Chen 2023; k-diffusion ``sample_ipndm``): Euler in sigma/alpha with fixed
    Adams-Bashforth weights of order up to 4 (uniform-step assumption), lower order on warm-up."""
    return _multistep("ipndm", nfe, sched, order=order, prediction="noise", variant="adams", uniform_nodes=True, spacing=spacing, default_spacing=None, lower_order_final=False, warmup=warmup, **grid)


@register_preset("euler")
def euler(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, **grid: Any) -> SolverSchedule:
    """Euler in the VE variable (Karras et al. 2022 / k-diffusion): ``dx/dsigma = eps``; identical to
    noise-prediction DDIM. Default grid: Karras spacing."""
    n = _check_nfe(nfe, 1, "euler")
    times = _grid(sched, n, spacing, "karras" if _finite_start(sched, grid) else None, **grid)
    return _finish("euler", sched, times, [Step(order=1, prediction="noise")] * n)


def _finite_start(sched: NoiseSchedule, grid: dict[str, Any]) -> bool:
    t0 = grid.get("t_start", sched.t_max)
    return float(sched.alpha(float(t0))) > 0.0


@register_preset("heun")
def heun(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, **grid: Any) -> SolverSchedule:
    """Heun's second-order method in the VE variable (Karras et al. 2022, EDM Algorithm 1): 2 NFE per
    step, Euler on the last step into sigma = 0. An even NFE ends with two Euler steps."""
    n_eval = _check_nfe(nfe, 1, "heun")
    lead = 0 if _finite_start(sched, grid) else 1  # leave alpha = 0 with one Euler (DDIM) step
    n_heun = max(0, (n_eval - lead - 1) // 2)
    n_euler = n_eval - lead - 2 * n_heun
    times = _grid(sched, lead + n_heun + n_euler, spacing, "karras" if not lead else None, **grid)
    h = Step(order=2, prediction="noise", method="singlestep", stages=(1.0,), variant="bh2")
    euler1 = Step(order=1, prediction="noise")
    return _finish("heun", sched, times, [euler1] * lead + [h] * n_heun + [euler1] * n_euler)


@register_preset("pndm")
def pndm(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, **grid: Any) -> SolverSchedule:
    """PLMS (Liu et al. 2022; diffusers PNDM with ``skip_prk_steps``): a trapezoidal first step
    (2 NFE), then Adams-Bashforth 2, 3, 4 on eps with fixed weights, each plugged into the DDIM update."""
    n_eval = _check_nfe(nfe, 3, "pndm")
    pure = not _finite_start(sched, grid)
    n = n_eval if pure else n_eval - 1  # leaving alpha = 0 the first step is DDIM (1 NFE), else trapezoidal (2 NFE)
    times = _grid(sched, n, spacing, None, **grid)
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
    pure = not _finite_start(sched, grid)
    orders = ([1] if pure else []) + _singlestep_orders(n_eval - (1 if pure else 0), order, ends)
    times = _grid(sched, len(orders), spacing, None if pure else "uniform_lambda", **grid)
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

    build.__doc__ = f"DPM-Solver-{order} (Lu et al. 2022): noise prediction, singlestep order {order}, uniform log-SNR steps."
    return build


for _k in (1, 2, 3):
    PRESETS[f"dpm_solver_{_k}"] = _dpm_solver(_k)


@register_preset("dpmpp_2s")
def dpmpp_2s(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, **grid: Any) -> SolverSchedule:
    """DPM-Solver++(2S) (Lu et al. 2022b): data prediction, singlestep order 2 with r = 1/2."""
    return _singlestep("dpmpp_2s", nfe, sched, order=2, prediction="data", variant="bh2", spacing=spacing, **grid)


@register_preset("lcm")
def lcm(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, renoise: float = 1.0, **grid: Any) -> SolverSchedule:
    """Consistency-model multistep sampling (Song et al. 2023; Luo et al. 2023, LCM): predict x0,
    re-noise it to the next level with fresh noise, repeat; the last step returns x0. Meant for
    consistency-distilled models; stochastic (needs a seed). Default grid: diffusers' trailing
    spacing for DiscreteVP."""
    n = _check_nfe(nfe, 1, "lcm")
    from ..schedules import DiscreteVP

    times = _grid(sched, n, spacing, "trailing" if isinstance(sched, DiscreteVP) else None, **grid)
    steps = [Step(order=1, prediction="data", renoise=renoise)] * (n - 1) + [Step(order=1, prediction="data")]
    return _finish("lcm", sched, times, steps)


def preset(name: str, nfe: int, sched: NoiseSchedule, **options: Any) -> SolverSchedule:
    """Build the named preset for ``nfe`` model evaluations on the noise schedule ``sched``.

    Options: ``spacing`` (a name from :data:`fewstep.timesteps.SPACINGS` or explicit times),
    ``t_start``, ``t_end``, ``t_noisy_end``, ``rho``, and preset-specific ones.
    """
    if name not in PRESETS:
        raise SolverError(f"unknown solver preset {name!r}; known: {preset_names()}")
    return PRESETS[name](nfe, sched, **options)

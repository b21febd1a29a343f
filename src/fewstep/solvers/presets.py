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


def _finish(name: str, sched: NoiseSchedule, times: np.ndarray, steps: list[Step], **meta: Any) -> SolverSchedule:
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


def preset(name: str, nfe: int, sched: NoiseSchedule, **options: Any) -> SolverSchedule:
    """Build the named preset for ``nfe`` model evaluations on the noise schedule ``sched``.

    Options: ``spacing`` (a name from :data:`fewstep.timesteps.SPACINGS` or explicit times),
    ``t_start``, ``t_end``, ``t_noisy_end``, ``rho``, and preset-specific ones.
    """
    if name not in PRESETS:
        raise SolverError(f"unknown solver preset {name!r}; known: {preset_names()}")
    return PRESETS[name](nfe, sched, **options)

"""``fewstep.fit_gits``: a time grid for one model and NFE from a few fine teacher solves, by dynamic
programming over the teacher trajectories' stored model outputs (GITS: Chen et al., ICML 2024; the
mathematics is in :mod:`fewstep.teacher`).

Cost: ``n_calibration x teacher_nfe`` sample-evaluations (the teacher solves; the dynamic programme
calls no model). The result is a plan of any multistep preset on that grid, saved and loaded like any
other; a budgeted :func:`fewstep.search` computes the order-1 grid from its references at no cost
and screens it among its seeds.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from .defaults import default_call
from .errors import ArgumentError, ShapeError
from .models import Model
from .noise import initial_noise
from .teacher import gits_times, teacher_solve
from .schedule_search.objective import _fine_plan
from .solvers.plan import SolverSchedule
from .solvers.presets import preset

__all__ = ["fit_gits"]

#: grid options of the default call that the explicit GITS grid replaces
_GRID_OPTIONS = ("spacing", "logistic_center", "logistic_scale", "t_start", "rho")


def fit_gits(model: Model, nfe: int, solver: str | None = None, calibration: torch.Tensor | None = None, *,
             n_calibration: int = 64, seed: int = 0, teacher_nfe: int | None = None, t_start: float | None = None,
             order: int = 1, dtype: torch.dtype | None = None, max_rows: int = 4096, **options: Any) -> SolverSchedule:
    """The plan of ``solver`` (a multistep preset; default: the default call's solver for this model
    and NFE) at ``nfe`` evaluations on the grid of least summed first-order local error along fine
    teacher solves (UniPC at ``teacher_nfe``, default ``max(48, 8 nfe)``, from ``t_start``) of
    ``calibration`` noises (default ``n_calibration`` keyed noises of ``seed``, shape
    ``model.sample_shape``); ``order``: the local misses summed, of first-order steps (1, the paper's)
    or of second-order multistep ones (2). ``options`` go to the preset. ``meta["gits"]`` records the teacher, the
    noises and the model evaluations spent."""
    if not isinstance(model, Model):
        raise ArgumentError(f"model must be a fewstep.Model, got {type(model).__name__}")
    if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
        raise ArgumentError(f"nfe must be a positive integer, got {nfe!r}")
    teacher_nfe = max(48, 8 * nfe) if teacher_nfe is None else teacher_nfe
    if not isinstance(teacher_nfe, int) or isinstance(teacher_nfe, bool) or teacher_nfe <= nfe:
        raise ArgumentError(f"teacher_nfe must be an integer above nfe ({nfe}), got {teacher_nfe!r}")
    if order not in (1, 2):
        raise ArgumentError(f"order must be 1 or 2, got {order!r}")
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise ArgumentError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if calibration is None:
        if not isinstance(n_calibration, int) or isinstance(n_calibration, bool) or n_calibration < 1:
            raise ArgumentError(f"n_calibration must be a positive integer, got {n_calibration!r}")
        if model.sample_shape is None:
            raise ShapeError(f"model {model.name!r} has no sample_shape: pass calibration= (noises of shape (B, ...))")
        x = initial_noise(model.schedule, (n_calibration, *model.sample_shape), int(seed), t_start=t_start, dtype=dtype or torch.float32)
    else:
        if not isinstance(calibration, torch.Tensor) or calibration.ndim < 2 or not calibration.dtype.is_floating_point:
            raise ShapeError(f"calibration must be a floating-point tensor of noises shaped (B, ...), got {getattr(calibration, 'shape', type(calibration).__name__)}")
        x = calibration.to(dtype=dtype or calibration.dtype)
    name, opts = (solver, {}) if solver is not None else default_call(model.schedule, nfe, math.prod(x.shape[1:]), model.prediction)
    opts = {k: v for k, v in opts.items() if k not in _GRID_OPTIONS}
    trial = preset(name, nfe, model.schedule, **{**opts, **options})  # the preset and its options, checked before any model call
    if trial.nfe != nfe or trial.n_steps != nfe:
        raise ArgumentError(f"{name!r} takes {trial.nfe} evaluations in {trial.n_steps} steps at nfe={nfe}: fit_gits needs a multistep "
                            "preset (one evaluation per step)")
    t0, e0 = time.perf_counter(), model.evaluations
    _, teacher = teacher_solve(model, x, _fine_plan(model, x, teacher_nfe, t_start), max_rows=max_rows, order2=order == 2)
    times = gits_times(teacher, nfe, order)
    plan = preset(name, nfe, model.schedule, spacing=list(times), **{**opts, **options})
    meta = {"teacher": f"unipc at NFE {teacher_nfe}", "order": order, "noises": int(x.shape[0]), "model_evaluations": model.evaluations - e0,
            "wall_s": round(time.perf_counter() - t0, 3)}
    return plan.replace(name=f"gits-{name}-nfe{nfe}", meta={**(plan.meta if isinstance(plan.meta, dict) else {}), "gits": meta})


"""IIA, improved integration approximation (Zhang, Niwa & Kleijn, "On Accelerating Diffusion-Based
Sampling Processes via Improved Integration Approximation", ICLR 2024, arXiv 2304.11328).

IIA keeps a solver's steps and adds to each step's update a few terms whose coefficients are fitted,
once per model, grid and NFE, by least squares: on calibration samples, the coarse step's result should
match a fine integration (many small steps of a solver). The paper's form for DDIM ("IIA-DDIM",
conventional sampling) adds the differences of the two most recent data and noise predictions,

    x_(i+1) = DDIM(x_i) + c_x0 (x0_i - x0_(i-1)) + c_eps (eps_i - eps_(i-1)),

``x0_i, eps_i`` the model's predictions at step ``i``'s start (nothing on the first step, which has no
previous one). Here the same terms correct any deterministic base solver: DPM-Solver++(2M), whose
second-order term is itself a multiple of ``x0_i - x0_(i-1)`` (so ``c_x0`` re-fits that weight, and
IIA-DPM-Solver++(2M) spans the same updates as IIA-DDIM), UniPC (the terms go to the corrected state,
the step's result), singlestep solvers, DEIS, ... With ``differences=k`` the terms extend to the ``k``
most recent consecutive differences of each prediction (``x0_(i-1) - x0_(i-2)``, ...), an extension of
ours. The coefficients are a validated per-step record of the plan (:attr:`fewstep.Step.correction`)
that the compiler turns into more terms of the step's combination (:mod:`fewstep.solvers.compile`),
so a fitted plan samples, saves, loads and runs in every executor like any other.

The fit (:func:`fit_iia`) runs the plan on the calibration samples along its own trajectory (each
step's result corrected as soon as its coefficients are known, so later steps see the corrected states,
as the fitted plan will), and for each step ``i >= 1`` minimises over the whole batch

    || target_(i+1) - base_(i+1) - sum_f c_f f ||^2,

``base`` the step's uncorrected result, ``f`` the difference features (minimum-norm least squares on the
normal equations where they are singular). The target is, with ``target="step"`` (the paper's, the
default), the fine solution of the step from the plan's own state ``x_i``; with ``target="trajectory"``
(ours) the fine solution of the whole path from the calibration noise, so that a step also absorbs the
error earlier steps left. Fine solutions are ``substeps`` steps of the preset ``fine`` (default UniPC)
per coarse step, on a grid uniform in log-SNR.

Cost: ``B * (plan.nfe + substeps * fitted intervals)`` model evaluations for ``B`` calibration samples
(``n - 1`` intervals with the step target, all ``n`` with the trajectory target), recorded in the
fitted plan's ``meta["iia"]`` with the settings and, per step, the squared distance to the target
before and after the correction.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .errors import ArgumentError, ScheduleError, ShapeError, SolverError
from .executor import PlanRunner, run_plan
from .models import Model, prediction_coefficients
from .noise import initial_noise
from .solvers.compile import CompiledPlan, compile_plan
from .solvers.plan import SolverSchedule
from .solvers.presets import preset
from .solvers.strategy import MAX_CORRECTION_DIFFERENCES

__all__ = ["fit_iia", "DEFAULT_SUBSTEPS", "DEFAULT_FINE", "TARGETS"]

#: fine sub-steps per coarse step of the fit's target
DEFAULT_SUBSTEPS = 8
#: the solver of the fine target
DEFAULT_FINE = "unipc"
#: what a step's result is fitted to: the fine solution of the step from the plan's state (the paper's),
#: or the fine solution of the whole path from the calibration noise
TARGETS = ("step", "trajectory")


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ArgumentError(f"{name} must be an integer >= {minimum}, got {value!r:.60}")
    return int(value)


def _fine_plan(fine: str, substeps: int, model: Model, t0: float, t1: float) -> CompiledPlan:
    """``substeps`` steps of the preset ``fine`` from ``t0`` to ``t1`` (uniform in log-SNR; uniform in t
    where the log-SNR grid cannot be placed, e.g. a last step from the schedule's smallest noisy time)."""
    try:
        plan = preset(fine, substeps, model.schedule, spacing="uniform_lambda", t_start=t0, t_end=t1)
    except ScheduleError:
        plan = preset(fine, substeps, model.schedule, spacing="uniform_t", t_start=t0, t_end=t1)
    if plan.stochastic:
        raise ArgumentError(f"the fine solver must be deterministic; preset {fine!r} draws noise")
    return compile_plan(plan, model.schedule)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.sum(a.to(torch.float64) * b.to(torch.float64)))


def fit_iia(
    model: Model,
    plan: SolverSchedule,
    calibration: torch.Tensor | None = None,
    *,
    n_calibration: int = 64,
    seed: int = 0,
    substeps: int = DEFAULT_SUBSTEPS,
    fine: str = DEFAULT_FINE,
    target: str = "step",
    differences: int = 1,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> SolverSchedule:
    """Fit IIA corrections (module docstring) to the deterministic solver schedule ``plan`` for
    ``model`` and return the corrected plan (named ``iia-<name>``; existing corrections are re-fitted).

    ``calibration``: the calibration noises ``x_T`` (shape ``(B, ...)``, scaled to the marginal at
    ``plan.times[0]``); default ``n_calibration`` keyed noises of ``seed``
    (:func:`fewstep.initial_noise`, shape ``model.sample_shape``, ``dtype`` default float32, on
    ``device``). ``substeps``: fine steps per coarse step of the target, of the preset ``fine``.
    ``target``: ``"step"`` (the paper's: the fine solution of the step from the plan's own state) or
    ``"trajectory"`` (the fine solution of the whole path from the calibration noise, so the fit also
    absorbs the error earlier steps left). ``differences``: consecutive differences per prediction
    (1: the paper's ``x0_i - x0_(i-1)`` and ``eps_i - eps_(i-1)``; up to
    :data:`~fewstep.solvers.strategy.MAX_CORRECTION_DIFFERENCES`, fewer where the plan has fewer
    previous steps). The result's ``meta["iia"]`` records the settings, the model evaluations the fit
    cost (sample rows: ``model_evaluations``, of which ``fine_evaluations`` went to the targets) and,
    per fitted step, the mean squared distance to the target before and after the correction."""
    if not isinstance(model, Model):
        raise ArgumentError(f"model must be a fewstep.Model, got {type(model).__name__}")
    if not isinstance(plan, SolverSchedule):
        raise ArgumentError(f"plan must be a fewstep.SolverSchedule (e.g. fewstep.preset(name, nfe, schedule)), got {type(plan).__name__}")
    if plan.stochastic:
        raise ArgumentError(f"IIA fits deterministic solver schedules; {plan.name!r} draws fresh noise")
    substeps = _positive_int("substeps", substeps, 2)
    differences = _positive_int("differences", differences)
    if differences > MAX_CORRECTION_DIFFERENCES:
        raise ArgumentError(f"differences must be at most {MAX_CORRECTION_DIFFERENCES}, got {differences}")
    if target not in TARGETS:
        raise ArgumentError(f"target must be one of {TARGETS}, got {target!r:.60}")
    if not isinstance(fine, str):
        raise ArgumentError(f"fine must be a preset name, got {type(fine).__name__}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ArgumentError(f"seed must be an integer, got {seed!r:.60}")
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise ArgumentError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    sched = model.schedule
    base = plan.replace(steps=tuple(st if st.correction is None else st.with_(correction=None) for st in plan.steps))
    compiled = compile_plan(base, sched)  # checks the plan against the model's noise schedule
    if calibration is None:
        n_calibration = _positive_int("n_calibration", n_calibration)
        if model.sample_shape is None:
            raise ShapeError(f"model {model.name!r} has no sample_shape: pass calibration= (noises of shape (B, ...))")
        x_T = initial_noise(sched, (n_calibration, *model.sample_shape), int(seed), t_start=plan.times[0],
                            dtype=dtype or torch.float32, device=device)
    else:
        if not isinstance(calibration, torch.Tensor) or calibration.ndim < 2 or calibration.shape[0] < 1 or not calibration.dtype.is_floating_point:
            raise ShapeError(f"calibration must be a floating-point tensor of noises shaped (B, ...), got {getattr(calibration, 'shape', type(calibration).__name__)}")
        x_T = calibration.to(dtype=dtype or calibration.dtype, device=device or calibration.device)
    if model.sample_shape is not None and tuple(x_T.shape[1:]) != tuple(model.sample_shape):
        raise ShapeError(f"model {model.name!r} takes samples of shape {tuple(model.sample_shape)}, got calibration of shape {tuple(x_T.shape)}")
    n = plan.n_steps
    first = 0 if target == "trajectory" else 1  # the first interval whose fine solution is needed
    fines = {i: _fine_plan(fine, substeps, model, plan.times[i], plan.times[i + 1]) for i in range(first, n) if n > 1}
    start_step = {slot: i for i, slot in enumerate(compiled.starts)}
    preds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # step -> (x0, eps) at its first evaluation
    states: dict[int, torch.Tensor] = {}  # grid index -> the plan's state there in its final form
    fine_state: list[torch.Tensor] = [x_T]  # target="trajectory": the fine path's state
    coefficients: list[tuple[tuple[float, ...], tuple[float, ...]] | None] = [None] * n
    fits: list[dict[str, Any]] = []
    before = model.evaluations

    def on_grid(g: int, _t: float, x: torch.Tensor) -> None:
        # The runner keeps ``x`` as the grid state that the later combinations read: correcting it in
        # place here is what the compiled correction term does (up to rounding) in the fitted plan.
        i = g - 1
        if target == "trajectory" and i in fines:
            fine_state[0] = run_plan(model, fine_state[0], fines[i])
        if i >= 1:
            goal = (fine_state[0] if target == "trajectory" else run_plan(model, states.pop(i), fines[i])).to(x.dtype)
            m = min(differences, i)
            feats = [preds[i - k + 1][0] - preds[i - k][0] for k in range(1, m + 1)]
            feats += [preds[i - k + 1][1] - preds[i - k][1] for k in range(1, m + 1)]
            resid = goal - x
            gram = np.array([[_dot(f, h) for h in feats] for f in feats])
            rhs = np.array([_dot(f, resid) for f in feats])
            ok = np.all(np.isfinite(gram)) and np.all(np.isfinite(rhs))
            c = np.linalg.lstsq(gram, rhs, rcond=1e-12)[0] if ok else np.full(len(feats), np.nan)
            if not np.all(np.isfinite(c)):
                raise SolverError(f"the IIA fit of step {i} of {plan.name!r} is not finite (model outputs or the fine target are not)")
            for f, ck in zip(feats, c):
                x.add_(f, alpha=float(ck))
            coefficients[i] = (tuple(float(v) for v in c[:m]), tuple(float(v) for v in c[m:]))
            fits.append({"step": i, "x0": list(coefficients[i][0]), "eps": list(coefficients[i][1]),
                         "mse_before": float(torch.mean(resid.to(torch.float64) ** 2)),
                         "mse_after": float(torch.mean((goal - x).to(torch.float64) ** 2))})
            preds.pop(i - differences, None)
        states.pop(i, None)
        if g < n and target == "step":
            states[g] = x.clone()

    runner = PlanRunner(model, x_T, compiled, callback=on_grid)
    while (op := runner.request()) is not None:
        x_in = runner.pending_input
        out = model.output(x_in, op.t, op.alpha, op.sigma) if runner.fold else model.predict(x_in, op.t)
        step = start_step.get(op.slot)
        if step is not None and n > 1:
            xs = runner.pending_state
            if runner.fold:
                p0, q0, pe, qe = prediction_coefficients(model.prediction, op.alpha, op.sigma)
                o = out.to(runner.work)
                preds[step] = (p0 * xs + q0 * o, pe * xs + qe * o)
            else:
                preds[step] = (out.x0.to(runner.work), out.eps.to(runner.work))
        runner.answer(out)
    runner.result()
    model.guard.flush()
    spent = model.evaluations - before
    batch = x_T.shape[0]
    steps = tuple(st.with_(correction=c) for st, c in zip(base.steps, coefficients))
    meta = dict(plan.meta)
    meta["iia"] = {
        "base": plan.name,
        "target": target,
        "differences": differences,
        "fine": fine,
        "substeps": substeps,
        "n_calibration": batch,
        "seed": int(seed) if calibration is None else None,
        "model_evaluations": spent,
        "fine_evaluations": spent - batch * plan.nfe,
        "evaluations_per_sample": spent / batch,
        "fits": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in f.items()} for f in fits],
    }
    return base.replace(steps=steps, name=f"iia-{plan.name}", meta=meta)

"""The front door: :func:`sample` resolves a preset (or the measured default, or an autotuned choice)
into a compiled plan and runs it sequentially (:mod:`fewstep.executor`) or parallel in time
(:mod:`fewstep.parallel`). :class:`~fewstep.executor.PlanRunner` and :func:`~fewstep.executor.run_plan`
are re-exported here."""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .autotune import AutotuneOptions, AutotuneResult, autotune as autotune_choice
from .defaults import default_call
from .errors import ArgumentError, ShapeError, SolverError
from .executor import Callback, PlanRunner, run_plan  # noqa: F401  (PlanRunner re-exported)
from .finite import all_finite
from .models import Model
from .noise import NoiseSource
from .parallel import ParallelOptions, run_plan_parallel
from .solvers.compile import CompiledPlan, Evaluate, compile_plan
from .solvers.plan import SolverSchedule, schedule_identity
from .solvers.presets import preset

__all__ = ["sample", "run_plan", "PlanRunner", "SampleInfo", "resolve_plan", "clear_plan_cache"]


@dataclass
class SampleInfo:
    """What a sampling run did: the plan, model evaluations per sample, and model calls."""

    plan: SolverSchedule
    nfe: int
    calls: int
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_plan(
    model: Model,
    solver: str | SolverSchedule | None,
    nfe: int | None,
    options: dict[str, Any],
    data_dim: int | None = None,
) -> SolverSchedule:
    """A preset name (with ``nfe`` and grid options), a ready :class:`SolverSchedule`, or ``None``:
    the measured default for the model's noise schedule and parameterisation and the data dimension
    ``data_dim`` (values per sample; :func:`fewstep.defaults.default_call`). A preset named without a
    grid gets the default grid for the same (``data_dim`` and ``model_prediction`` grid options)."""
    dim_opt = {k: v for k, v in (("data_dim", data_dim), ("model_prediction", model.prediction)) if v is not None and k not in options}
    if solver is None:
        if nfe is None:
            raise ArgumentError("give nfe= (model evaluations per sample), or a solver schedule")
        tuned = model.tuned_schedules.get(nfe) if not options else None
        if tuned is not None:
            return tuned
        name, defaults = default_call(model.schedule, nfe, data_dim, model.prediction)
        return preset(name, nfe, model.schedule, **{**defaults, **dim_opt, **options})
    if isinstance(solver, SolverSchedule):
        if nfe is not None and nfe != solver.nfe:
            raise SolverError(f"nfe={nfe} was given but the solver schedule {solver.name!r} uses {solver.nfe}")
        if options:
            raise SolverError(f"grid options {sorted(options)} apply to presets, not to a ready solver schedule")
        return solver
    if not isinstance(solver, str):
        raise ArgumentError(f"solver must be a preset name or a SolverSchedule, got {type(solver).__name__}")
    if nfe is None:
        raise ArgumentError(f"preset {solver!r} needs nfe= (model evaluations per sample)")
    return preset(solver, nfe, model.schedule, **{**dim_opt, **options})


_COMPILED: OrderedDict[tuple[Any, ...], tuple[SolverSchedule, CompiledPlan]] = OrderedDict()
_COMPILED_MAX = 64


class _Unkeyable(Exception):
    """An option value the plan cache cannot key by value."""


def _frozen(value: Any) -> Any:
    """An option value as a hashable key *by value*: tensors and arrays by dtype, shape and a digest
    of their contents (hashed by identity, a tensor edited in place would return the stale plan),
    lists / tuples / dicts element by element; other values as they are (hashed as they hash)."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            raise _Unkeyable("a meta tensor has no values")
        host = value.detach().to("cpu").contiguous()  # the preset reads these values anyway
        return ("tensor", str(host.dtype), tuple(host.shape), hashlib.blake2b(host.numpy().tobytes() if host.dtype != torch.bfloat16
                                                                          else host.view(torch.int16).numpy().tobytes(), digest_size=16).digest())
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        return ("array", str(arr.dtype), arr.shape, hashlib.blake2b(arr.tobytes(), digest_size=16).digest())
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), _frozen(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_frozen(v) for v in value))
    return value


def _prepare(model: Model, solver: str | SolverSchedule | None, nfe: int | None, options: dict[str, Any],
             data_dim: int | None = None) -> tuple[SolverSchedule, CompiledPlan]:
    """Build and compile the plan; a preset with hashable options is compiled once per noise
    schedule (and data dimension) and reused (a pipeline calls ``sample`` with the same solver batch
    after batch)."""
    key: tuple[Any, ...] | None = None
    if isinstance(solver, str) or (solver is None and not (nfe in model.tuned_schedules and not options)):
        try:
            key = (solver, nfe, _frozen(options), schedule_identity(model.schedule), data_dim, model.prediction)
            hash(key)
        except (TypeError, _Unkeyable):  # an unhashable option value, or a tensor whose values cannot be read
            key = None
    if key is not None and key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key]
    plan = resolve_plan(model, solver, nfe, options, data_dim)
    result = plan, compile_plan(plan, model.schedule)
    if key is not None:
        _COMPILED[key] = result
        if len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.popitem(last=False)
    return result


def clear_plan_cache() -> None:
    """Forget the compiled plans that :func:`sample` keeps for repeated calls."""
    _COMPILED.clear()


def _check_input(model: Model, x_T: torch.Tensor) -> None:
    if not isinstance(x_T, torch.Tensor):
        raise ShapeError(f"x_T must be a torch.Tensor, got {type(x_T).__name__}")
    if not x_T.dtype.is_floating_point:
        raise ShapeError(f"x_T must be a floating-point tensor, got {x_T.dtype}")
    if x_T.ndim < 2 or x_T.shape[0] == 0:
        raise ShapeError(f"x_T must be shaped (batch, ...) with batch >= 1, got {tuple(x_T.shape)}")
    if model.sample_shape is not None and tuple(x_T.shape[1:]) != tuple(model.sample_shape):
        raise ShapeError(f"model {model.name!r} takes samples of shape (batch, {', '.join(map(str, model.sample_shape))}), got {tuple(x_T.shape)}")
    if model.guard.enabled:
        model.guard.check(x_T, lambda _: ShapeError("x_T contains NaN or Inf"))
    elif x_T.device.type == "cpu" and not all_finite(x_T):  # free on the CPU, so checked even with checks off
        raise ShapeError("x_T contains NaN or Inf")


def _check_evaluable(model: Model, plan: CompiledPlan) -> None:
    """Refuse, before any model call, a plan that evaluates the model where its parameterisation
    cannot be converted: ``eps`` / ``score`` / ``edm`` models at alpha = 0 (the pure-noise end of a
    flow schedule), where ``x0 = (x - sigma eps) / alpha`` is undefined."""
    if model.prediction not in ("eps", "score", "edm"):
        return
    for op in plan.ops:
        if isinstance(op, Evaluate) and not op.alpha > 0.0:
            raise SolverError(
                f"a {model.prediction!r}-prediction model cannot be evaluated at t = {op.t:g}, where alpha = 0 "
                f"(pure noise of {model.schedule!r}): its x0 = (x - sigma eps) / alpha is undefined there. "
                "Start below the pure-noise end (t_start < t_max, or a grid whose first time has alpha > 0), "
                "or wrap a model that predicts x0, v or the flow velocity"
            )


def sample(
    model: Model,
    x_T: torch.Tensor,
    solver: str | SolverSchedule | None = None,
    *,
    nfe: int | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    return_info: bool = False,
    seed: int | None = None,
    sample_indices: Sequence[int] | torch.Tensor | None = None,
    noise: NoiseSource | str | None = None,
    grad: bool = False,
    parallel: "bool | ParallelOptions" = False,
    warm_start: Any = None,
    autotune: "bool | AutotuneOptions | None" = None,
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, SampleInfo]:
    """Sample from ``model`` starting at noise ``x_T`` (already scaled to the start time's marginal,
    e.g. ``sigma_max * randn`` for EDM) with a preset name and ``nfe``, or a :class:`SolverSchedule`.
    Without ``solver`` the model's searched schedule for ``nfe`` runs when it has one
    (``model.tuned_schedules``; the bundled models ship some), else the measured default for the
    model's noise schedule (:func:`fewstep.default_solver`); without ``spacing`` each preset uses its
    default grid for that schedule (:func:`fewstep.default_spacing`).

    Grid options for presets: ``spacing``, ``t_start``, ``t_end`` (default: the schedule's largest
    time to sigma = 0), ``t_noisy_start``, ``t_noisy_end``, ``rho``; other keyword options go to the
    preset (an unknown one is an :class:`~fewstep.ArgumentError` listing the valid ones).
    ``callback(i, t_i, x_i)`` sees every grid state once, in its final form.

    The model runs under ``torch.no_grad()``: no autograd graph is recorded, whatever the model's
    parameters. ``grad=True`` records it (to differentiate through the sampler).

    Stochastic schedules draw the increments of one Brownian path per ``(seed, sample index)``
    (``noise="brownian"``, :class:`~fewstep.BrownianNoise`), generated on the tensor's device, and the
    same seed on a finer grid refines the same path. Sample k is bitwise the same whatever the batch
    it is in (size, position, split) when the model computes each row independently of the others:
    the noise and the loop's arithmetic are elementwise, so only a model whose batched arithmetic
    rounds by batch size (matmul blocking) moves it, by that rounding carried along the trajectory. ``sample_indices`` gives the rows' global indices when a batch is split (default
    ``0..B-1``). ``noise="interval"`` is cheaper (one normal per step) but keyed by the step's
    interval; any object with an ``increment`` method may supply the noise. Without ``seed`` a random
    one is drawn and reported in the info.

    ``parallel=True`` (or a :class:`~fewstep.ParallelOptions`) runs the same plan by parallel-in-time
    iteration (:mod:`fewstep.parallel`): rounds of one batched model call over a window of steps,
    the same samples within the tolerance, in fewer sequential rounds; the info's
    ``extra["parallel"]`` says how many rounds and evaluations it took. ``warm_start``: a previous
    parallel run's info (recorded with ``ParallelOptions(record=True)``) to start from.

    ``autotune=True`` (or an :class:`~fewstep.AutotuneOptions`; default: the model's ``autotune``)
    chooses the grid, and without a named preset the preset too, for this model, NFE and sample shape
    on a few samples of its own against a fine solve, at most 3,000 sample-evaluations once, then
    cached by what the model computes (:mod:`fewstep.autotune`); the info's ``extra["autotune"]`` says
    what it chose and spent. A model's searched schedule for the NFE still comes first.
    """
    if not isinstance(model, Model):
        raise ArgumentError(f"model must be a fewstep.Model (wrap your network: fewstep.Model(fn, schedule, prediction=...)), got {type(model).__name__}")
    if not isinstance(grad, bool):
        raise ArgumentError(f"grad must be True or False, got {grad!r}")
    model.guard.discard()
    _check_input(model, x_T)
    tuned = _autotune(model, x_T, solver, nfe, options, model.autotune if autotune is None else autotune)
    if tuned is not None:
        solver, options = tuned.preset, {**options, **tuned.options}
    plan, compiled = _prepare(model, solver, nfe, options, math.prod(x_T.shape[1:]))
    _check_evaluable(model, compiled)
    if compiled.stochastic and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if sample_indices is not None and len(sample_indices) != x_T.shape[0]:
        raise ShapeError(f"{len(sample_indices)} sample_indices for a batch of {x_T.shape[0]}")
    popts = _parallel_options(parallel, callback, warm_start)
    calls0 = model.calls
    extra: dict[str, Any] = {"seed": seed} if compiled.stochastic else {}
    if tuned is not None:
        extra["autotune"] = tuned.summary()
    model._sampling = True
    try:
        with torch.enable_grad() if grad else torch.no_grad():
            if popts is not None:
                out, extra["parallel"] = run_plan_parallel(model, x_T, compiled, popts, seed=seed, sample_indices=sample_indices, noise=noise, warm_start=warm_start)
            else:
                out = run_plan(model, x_T, compiled, callback=callback, progress=progress, seed=seed, sample_indices=sample_indices, noise=noise)
        model.guard.flush()  # the one host synchronisation of the NaN/Inf checks on an accelerator
    finally:
        model._sampling = False
        model.guard.discard()
    if return_info:
        return out, SampleInfo(plan, compiled.nfe, model.calls - calls0, extra)
    return out


def _autotune(model: Model, x_T: torch.Tensor, solver: Any, nfe: int | None, options: dict[str, Any], setting: Any) -> "AutotuneResult | None":
    """The autotuned choice for this call, or ``None`` (autotune off, a ready solver schedule, or the
    model's searched schedule for this NFE, which comes first)."""
    if setting is None or setting is False:
        return None
    if setting is True:
        config = AutotuneOptions()
    elif isinstance(setting, AutotuneOptions):
        config = setting
    else:
        raise ArgumentError(f"autotune must be True/False or a fewstep.AutotuneOptions, got {setting!r}")
    if isinstance(solver, SolverSchedule) or (solver is None and nfe in model.tuned_schedules and not options):
        return None
    if nfe is None:
        raise ArgumentError("autotune needs nfe= (model evaluations per sample)")
    return autotune_choice(model, nfe, tuple(x_T.shape[1:]), sample, preset=solver, options=options, config=config,
                           device=x_T.device, dtype=x_T.dtype, teacher=_teacher_reference)


def _teacher_reference(model: Model, noises: torch.Tensor, solver: str, nfe: int, options: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """Autotune's reference: ``solver`` at ``nfe`` from ``noises``, with its trajectory's
    :class:`~fewstep.teacher.TeacherCosts` (the same samples as :func:`sample` gives)."""
    from .teacher import teacher_solve

    plan = resolve_plan(model, solver, nfe, options, math.prod(noises.shape[1:]))
    return teacher_solve(model, noises, plan)


def _parallel_options(parallel: Any, callback: Any, warm_start: Any) -> "ParallelOptions | None":
    if parallel is False or parallel is None:
        if warm_start is not None:
            raise ArgumentError("warm_start applies to parallel sampling: pass parallel=True (or ParallelOptions)")
        return None
    if callback is not None:
        raise ArgumentError("callback is not available with parallel=True (states change from round to round)")
    if parallel is True:
        return ParallelOptions()
    if isinstance(parallel, ParallelOptions):
        return parallel
    raise ArgumentError(f"parallel must be True/False or a fewstep.ParallelOptions, got {parallel!r}")

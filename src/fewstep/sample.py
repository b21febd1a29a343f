"""The one sequential sampling loop: run a compiled solver schedule on a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .errors import ShapeError, SolverError
from .models import Model
from .noise import keyed_noise
from .solvers.compile import Combine, CompiledPlan, Evaluate, compile_plan
from .solvers.plan import SolverSchedule
from .solvers.presets import preset

__all__ = ["sample", "run_plan", "SampleInfo", "resolve_plan"]

Callback = Callable[[int, float, torch.Tensor], None]


@dataclass
class SampleInfo:
    """What a sampling run did: the plan, model evaluations per sample, and model calls."""

    plan: SolverSchedule
    nfe: int
    calls: int
    extra: dict[str, Any] = field(default_factory=dict)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _last_uses(plan: CompiledPlan) -> tuple[dict[int, int], dict[int, int]]:
    state_last: dict[int, int] = {plan.output: len(plan.ops)}
    slot_last: dict[int, int] = {}
    for k, op in enumerate(plan.ops):
        if isinstance(op, Evaluate):
            state_last[op.state] = max(state_last.get(op.state, -1), k)
        else:
            state_last[op.base] = max(state_last.get(op.base, -1), k)
            for slot, _, _ in op.terms:
                slot_last[slot] = k
    return state_last, slot_last


def run_plan(
    model: Model,
    x_T: torch.Tensor,
    plan: CompiledPlan,
    *,
    callback: Callback | None = None,
    progress: bool = False,
    seed: int | None = None,
    sample_indices: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Execute the affine program of a compiled plan, one model call per evaluation. Fresh noise
    (stochastic steps) is keyed by ``(seed, sample index, step)``; sample indices default to 0..B-1."""
    from tqdm.auto import tqdm

    work = _work_dtype(x_T.dtype)
    states: dict[int, torch.Tensor] = {0: x_T.to(work)}
    preds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    state_last, slot_last = _last_uses(plan)
    bar = tqdm(total=plan.nfe, desc="sampling", unit="eval", disable=not progress, leave=False)
    try:
        for k, op in enumerate(plan.ops):
            if isinstance(op, Evaluate):
                p = model.predict(states[op.state].to(x_T.dtype), op.t)
                preds[op.slot] = (p.x0.to(work), p.eps.to(work))
                bar.update(1)
                if state_last.get(op.state, -1) <= k:
                    states.pop(op.state, None)
                continue
            x = states[op.base] * op.a if op.a != 1.0 else states[op.base].clone()
            for slot, kind, c in op.terms:
                x.add_(preds[slot][0 if kind == "x0" else 1], alpha=c)
            if op.noise != 0.0:
                if seed is None:
                    raise SolverError("this solver schedule draws noise; pass seed=")
                z = keyed_noise(x.shape, seed, step=op.noise_key, indices=sample_indices, dtype=work, device=x.device)
                x.add_(z, alpha=op.noise)
            states[op.target] = x
            if state_last.get(op.base, -1) <= k:
                states.pop(op.base, None)
            for slot, _, _ in op.terms:
                if slot_last.get(slot, -1) <= k:
                    preds.pop(slot, None)
            if callback is not None and op.grid_index is not None:
                callback(op.grid_index, plan.times[op.grid_index], x)
    finally:
        bar.close()
    return states[plan.output].to(x_T.dtype)


def resolve_plan(
    model: Model,
    solver: str | SolverSchedule,
    nfe: int | None,
    options: dict[str, Any],
) -> SolverSchedule:
    """A preset name (with ``nfe`` and grid options) or a ready :class:`SolverSchedule`."""
    if isinstance(solver, SolverSchedule):
        if nfe is not None and nfe != solver.nfe:
            raise SolverError(f"nfe={nfe} was given but the solver schedule {solver.name!r} uses {solver.nfe}")
        if options:
            raise SolverError(f"grid options {sorted(options)} apply to presets, not to a ready solver schedule")
        return solver
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a preset name or a SolverSchedule, got {type(solver).__name__}")
    if nfe is None:
        raise SolverError(f"preset {solver!r} needs nfe=")
    return preset(solver, nfe, model.schedule, **options)


def _check_input(model: Model, x_T: torch.Tensor) -> None:
    if not isinstance(x_T, torch.Tensor):
        raise ShapeError(f"x_T must be a torch.Tensor, got {type(x_T).__name__}")
    if not x_T.dtype.is_floating_point:
        raise ShapeError(f"x_T must be a floating-point tensor, got {x_T.dtype}")
    if x_T.ndim < 2 or x_T.shape[0] == 0:
        raise ShapeError(f"x_T must be shaped (batch, ...) with batch >= 1, got {tuple(x_T.shape)}")
    if model.sample_shape is not None and tuple(x_T.shape[1:]) != tuple(model.sample_shape):
        raise ShapeError(f"model {model.name!r} takes samples of shape (batch, {', '.join(map(str, model.sample_shape))}), got {tuple(x_T.shape)}")
    if not bool(torch.isfinite(x_T).all()):
        raise ShapeError("x_T contains NaN or Inf")


def sample(
    model: Model,
    x_T: torch.Tensor,
    solver: str | SolverSchedule = "ddim",
    *,
    nfe: int | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    return_info: bool = False,
    seed: int | None = None,
    sample_indices: Sequence[int] | torch.Tensor | None = None,
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, SampleInfo]:
    """Sample from ``model`` starting at noise ``x_T`` (already scaled to the start time's marginal,
    e.g. ``sigma_max * randn`` for EDM) with a preset name and ``nfe``, or a :class:`SolverSchedule`.

    Grid options for presets: ``spacing``, ``t_start``, ``t_end`` (default: the schedule's largest
    time to sigma = 0), ``t_noisy_end``, ``rho``. ``callback(i, t_i, x_i)`` sees every grid state.

    Stochastic schedules draw noise keyed by ``(seed, sample index, step)``, so sample k is the same
    whatever the batch it is in; ``sample_indices`` gives the rows' global indices when a batch is
    split (default ``0..B-1``). Without ``seed`` a random one is drawn and reported in the info.
    """
    _check_input(model, x_T)
    plan = resolve_plan(model, solver, nfe, options)
    compiled = compile_plan(plan, model.schedule)
    if compiled.stochastic and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if sample_indices is not None and len(sample_indices) != x_T.shape[0]:
        raise ShapeError(f"{len(sample_indices)} sample_indices for a batch of {x_T.shape[0]}")
    calls0 = model.calls
    out = run_plan(model, x_T, compiled, callback=callback, progress=progress, seed=seed, sample_indices=sample_indices)
    if return_info:
        return out, SampleInfo(plan, compiled.nfe, model.calls - calls0, {"seed": seed} if compiled.stochastic else {})
    return out

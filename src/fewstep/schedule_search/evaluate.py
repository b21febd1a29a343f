"""Many solver schedules on the same noises, together: K plans x B noises in one batched model call
per evaluation index (each row at its own time), not K sequential runs.

Every plan of a search has the same NFE, so their compiled programs request evaluations in lockstep:
each :class:`~fewstep.executor.PlanRunner` runs its own combinations (cheap), then all pending inputs
are concatenated and the model is called once (in chunks of at most ``max_rows`` rows, the memory
cap) with per-row times. A plan whose state or model output stops being finite (an unstable
candidate, an overflowing model), or whose rows make the model raise
:class:`~fewstep.ModelOutputError`, drops out of the batch and scores infinity; it never stops the
search. The model's own NaN/Inf guard is off meanwhile (each plan's outputs are checked here, so one
plan's overflow cannot fail the batched call of the others), and restored after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import ArgumentError, ModelOutputError
from ..executor import PlanRunner
from ..finite import FiniteGuard
from ..models import Model
from ..solvers.compile import compile_plan
from ..solvers.plan import SolverSchedule

__all__ = ["evaluate_plans", "BatchCost"]


@dataclass
class BatchCost:
    """Model work spent: ``calls`` (batched model calls) and ``evaluations`` (rows evaluated =
    samples x NFE, the cost in single-sample model evaluations)."""

    calls: int = 0
    evaluations: int = 0

    def add(self, other: "BatchCost") -> None:
        self.calls += other.calls
        self.evaluations += other.evaluations


def _answer_rows(model: Model, x: torch.Tensor, t: torch.Tensor, fold: bool, max_rows: int, cost: BatchCost) -> list:
    """Raw outputs (``fold``) or predictions for rows ``x`` at per-row times ``t``, in chunks."""
    outs = []
    for xs, ts in zip(x.split(max_rows), t.split(max_rows)):
        cost.calls += 1
        cost.evaluations += xs.shape[0]
        outs.append(model.raw(xs, ts) if fold else model.predict(xs, ts))
    if fold:
        return [torch.cat(outs)]
    return [type(outs[0])(torch.cat([o.x0 for o in outs]), torch.cat([o.eps for o in outs]))]


def evaluate_plans(model: Model, plans: Sequence[SolverSchedule], x_T: torch.Tensor, *, max_rows: int = 4096) -> tuple[list[torch.Tensor], BatchCost]:
    """Final samples of every plan from the same noises ``x_T`` (one tensor per plan; all NaN for a
    plan that diverged), and the model work spent."""
    if not plans:
        return [], BatchCost()
    nfes = {p.nfe for p in plans}
    if len(nfes) != 1:
        raise ArgumentError(f"plans evaluated together must have the same NFE, got {sorted(nfes)}")
    if not isinstance(max_rows, int) or max_rows < 1:
        raise ArgumentError(f"max_rows must be a positive integer, got {max_rows!r}")
    runners = [PlanRunner(model, x_T, compile_plan(p, model.schedule)) for p in plans]
    alive = [True] * len(runners)
    cost = BatchCost()
    b = x_T.shape[0]
    guard, model.guard = model.guard, FiniteGuard(False)
    try:
        with torch.no_grad():
            while True:
                ops = [r.request() if ok else None for r, ok in zip(runners, alive)]
                active = [i for i, op in enumerate(ops) if op is not None]
                for i, ok in zip(list(active), _finite([runners[i].pending_input for i in active])):
                    if not ok:
                        alive[i] = False
                        active.remove(i)
                if not active:
                    break
                answers = _answer_plans(model, runners, ops, active, b, max_rows, cost)
                given = [i for i, part in answers.items() if part is not None]
                finite = dict(zip(given, _finite([answers[i] for i in given])))
                for i, part in answers.items():
                    if part is None or not finite[i]:
                        alive[i] = False  # raised ModelOutputError, or a NaN/Inf output: this candidate only
                    else:
                        runners[i].answer(part)
    finally:
        model.guard = guard
    results = [r.result() if ok else torch.full_like(x_T, float("nan")) for r, ok in zip(runners, alive)]
    return results, cost


def _finite(parts: list) -> list[bool]:
    """Whether each tensor (or prediction: its ``x0`` and ``eps``) is finite, in one host synchronisation."""
    if not parts:
        return []
    flags = [torch.isfinite(p).all() if isinstance(p, torch.Tensor) else torch.isfinite(p.x0).all() & torch.isfinite(p.eps).all()
             for p in parts]
    return [bool(v) for v in torch.stack(flags).cpu().tolist()]


def _answer_plans(model: Model, runners: list[PlanRunner], ops: list, active: list[int], b: int, max_rows: int,
                  cost: BatchCost) -> dict[int, object]:
    """Each active plan's answer to its pending request, from one batched call; when that call raises
    :class:`~fewstep.ModelOutputError`, each plan's rows are asked alone and a plan whose rows raise
    answers ``None``."""
    fold = runners[active[0]].fold
    t = torch.cat([torch.full((b,), ops[i].t, dtype=torch.float64, device=runners[i].pending_input.device) for i in active])
    try:
        (out,) = _answer_rows(model, torch.cat([runners[i].pending_input for i in active]), t, fold, max_rows, cost)
    except ModelOutputError:
        if len(active) == 1:
            return {active[0]: None}
        answers: dict[int, object] = {}
        for i in active:
            answers.update(_answer_plans(model, runners, ops, [i], b, max_rows, cost))
        return answers
    parts = out.split(b) if fold else [type(out)(x0, eps) for x0, eps in zip(out.x0.split(b), out.eps.split(b))]
    return dict(zip(active, parts))

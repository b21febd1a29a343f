"""Time grids by dynamic programming over a teacher trajectory's stored model outputs (GITS:
Chen, Zhou, Wang, Shen & Lyu, "On the Trajectory Regularity of ODE-based Diffusion Sampling", ICML 2024).

A fine teacher solve (the search's reference solve) evaluates the model at its grid times
``tau_0 > tau_1 > ... > tau_(M-1)`` and ends at ``tau_M`` (sigma = 0). Recording each evaluation's
state ``X_i`` and data prediction ``D_i`` costs no extra model call. A first-order (DDIM) step from
``tau_i`` to ``tau_j`` started on the teacher's state, ``a_ij X_i + W_ij D_i`` (``(a, W)`` from
:func:`fewstep.solvers.coefficients.base_terms`), misses the teacher's state at ``tau_j`` by

    c_ij = mean over samples of RMS(a_ij X_i + W_ij D_i - X_j)    (X_M: the teacher's result)

and the grid of ``N`` steps is the path ``0 = p_0 < p_1 < ... < p_N = M`` that minimises the summed
local errors ``sum_k c(p_(k-1), p_k)`` (dynamic programming, ``O(N M^2)``). As in the paper the costs
are those of DDIM and the grid is used with any multistep solver; the search takes it as one more
seed grid (:mod:`.engine`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ArgumentError
from ..executor import PlanRunner
from ..models import Model, to_prediction
from ..solvers.coefficients import base_terms
from ..solvers.compile import compile_plan
from ..solvers.plan import SolverSchedule
from ..solvers.points import points

__all__ = ["TeacherCosts", "teacher_solve", "dp_path", "gits_times"]


@dataclass(frozen=True)
class TeacherCosts:
    """The teacher's grid (``times``: its evaluation times, then its end) and the local-error matrix
    ``costs[i, j]`` (``i < j``; ``inf`` elsewhere) of first-order steps between its points."""

    times: tuple[float, ...]
    costs: np.ndarray

    def to_json(self) -> dict[str, object]:
        return {"times": list(self.times), "costs": [[float(v) if np.isfinite(v) else None for v in row] for row in self.costs]}

    @classmethod
    def from_json(cls, data: object) -> "TeacherCosts":
        if not isinstance(data, dict) or not isinstance(data.get("times"), list) or not isinstance(data.get("costs"), list):
            raise ArgumentError("teacher costs must be an object with 'times' and 'costs' lists")
        times = tuple(float(t) for t in data["times"])
        costs = np.array([[np.inf if v is None else float(v) for v in row] for row in data["costs"]], dtype=np.float64)
        if costs.shape != (len(times), len(times)):
            raise ArgumentError(f"teacher costs are {costs.shape} for {len(times)} times")
        return cls(times, costs)


def _record(model: Model, x: torch.Tensor, plan: SolverSchedule) -> tuple[torch.Tensor, list[float], list[torch.Tensor], list[torch.Tensor]]:
    """Run ``plan`` from ``x`` as :func:`fewstep.sample` would, keeping every evaluation's time, state
    and data prediction; returns the final samples too."""
    compiled = compile_plan(plan, model.schedule)
    runner = PlanRunner(model, x, compiled)
    times, states, preds = [], [], []
    with torch.no_grad():
        while (op := runner.request()) is not None:
            x_in = runner.pending_input
            if runner.fold:
                out = model.output(x_in, op.t, op.alpha, op.sigma)
                x0 = to_prediction(model.prediction, out, x_in, torch.tensor(op.alpha, dtype=torch.float64),
                                   torch.tensor(op.sigma, dtype=torch.float64)).x0
                runner.answer(out)
            else:
                pred = model.predict(x_in, op.t)
                x0 = pred.x0
                runner.answer(pred)
            times.append(float(op.t))
            states.append(x_in.to(torch.float64))
            preds.append(x0.to(torch.float64))
        model.guard.flush()
        return runner.result(), times, states, preds


def teacher_solve(model: Model, x: torch.Tensor, plan: SolverSchedule, *, max_rows: int = 4096) -> tuple[torch.Tensor, TeacherCosts]:
    """The final samples of ``plan`` (a deterministic fine solve ending at sigma = 0) from ``x``, and
    the :class:`TeacherCosts` of its trajectory, at no model call beyond the solve's own. A plan that
    evaluates the model twice at one time (singlestep stages) is refused."""
    finals, cost_sum, rows = [], None, 0
    times: list[float] = []
    for xs in x.split(max_rows):
        final, times, states, preds = _record(model, xs, plan)
        finals.append(final)
        if len(set(times)) != len(times) or not all(a > b for a, b in zip(times, times[1:])):
            raise ArgumentError("teacher costs need a plan with one evaluation per grid time (a multistep solve)")
        pts = points(model.schedule, times + [float(plan.times[-1])])
        if pts[-1].sigma != 0.0:
            raise ArgumentError(f"teacher costs need a solve that ends at sigma = 0, this one ends at t = {plan.times[-1]}")
        targets = states + [final.to(torch.float64)]
        m = len(pts)
        part = np.full((m, m), np.inf)
        for i in range(m - 1):
            for j in range(i + 1, m):
                a, w = base_terms("data", pts[i], pts[j])
                miss = a * states[i] + w * preds[i] - targets[j]
                part[i, j] = float(miss.flatten(1).pow(2).mean(1).sqrt().sum())
        cost_sum = part if cost_sum is None else cost_sum + part
        rows += int(xs.shape[0])
    assert cost_sum is not None
    return torch.cat(finals), TeacherCosts(tuple(times) + (float(plan.times[-1]),), cost_sum / rows)


def dp_path(costs: np.ndarray, steps: int) -> list[int]:
    """Indices ``0 = p_0 < ... < p_steps = M`` minimising ``sum_k costs[p_(k-1), p_k]`` (``M + 1`` points)."""
    m = costs.shape[0]
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= m - 1:
        raise ArgumentError(f"a path of {steps} steps over {m} teacher points needs 1 <= steps <= {m - 1}")
    best = np.full((steps + 1, m), np.inf)
    back = np.zeros((steps + 1, m), dtype=np.int64)
    best[0, 0] = 0.0
    for k in range(1, steps + 1):
        total = best[k - 1][:, None] + costs  # [i, j]: reach i in k - 1 steps, then i -> j
        back[k] = np.argmin(total, axis=0)
        best[k] = total[back[k], np.arange(m)]
    path = [m - 1]
    for k in range(steps, 0, -1):
        path.append(int(back[k, path[-1]]))
    path.reverse()
    if path[0] != 0 or not np.isfinite(best[steps, m - 1]):
        raise ArgumentError(f"no finite path of {steps} steps over the teacher's points")
    return path


def gits_times(teacher: TeacherCosts, steps: int) -> tuple[float, ...]:
    """The ``steps + 1`` grid times (start to sigma = 0) of the least summed local error."""
    return tuple(teacher.times[i] for i in dp_path(teacher.costs, steps))

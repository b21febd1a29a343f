"""Time grids by dynamic programming over a teacher trajectory's stored model outputs (GITS:
Chen, Zhou, Wang, Shen & Lyu, "On the Trajectory Regularity of ODE-based Diffusion Sampling", ICML 2024).

A fine teacher solve (the search's reference solve) evaluates the model at its grid times
``tau_0 > tau_1 > ...`` and ends at sigma = 0. Recording each evaluation's state ``X_i`` and data
prediction ``D_i`` costs no extra model call. On its points (for the order-2 misses at most
:data:`MAX_POINTS` of them, evenly spaced in its evaluations, the start and the end kept), a step
started on the teacher's state misses the teacher's state at ``tau_j`` by

    order 1 (DDIM):           c_ij  = mean over samples of RMS(a_ij X_i + w_ij D_i - X_j)
    order 2 (multistep, the
    previous point q):        c_qij = mean over samples of RMS(a X_i + w_i D_i + w_q D_q - X_j)

with the framework's coefficients (:func:`fewstep.solvers.coefficients.base_terms`; the data-prediction
log-SNR multistep of DPM-Solver++(2M) / UniPC, :func:`~fewstep.solvers.coefficients.node_weights`);
``X_end`` is the teacher's result, and the step into sigma = 0 is first order. Every miss is a
quadratic form in the per-sample Gram matrix of the recorded vectors, so one matrix product serves
all ``O(M^3)`` of them whatever the dimension. The grid of ``N`` steps is the path
``0 = p_0 < ... < p_N = end`` minimising the summed misses (dynamic programming: ``O(N M^2)`` for
order 1, ``O(N M^3)`` over (previous, current) pairs for order 2). The paper uses order 1 and any
solver on the result; a budgeted search takes the order-1 grid as a seed (:mod:`fewstep.schedule_search.engine`; the
order-2 one was measured as a seed too and never was the best seed, so it is not computed there).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import ArgumentError, SolverError
from .executor import PlanRunner
from .models import Model, to_prediction
from .solvers.coefficients import base_terms, node_positions, node_weights
from .solvers.compile import compile_plan
from .solvers.plan import SolverSchedule
from .solvers.points import Point, points

__all__ = ["TeacherCosts", "teacher_solve", "dp_path", "dp_path2", "gits_times", "MAX_POINTS", "TEACHER_FORMAT"]

#: teacher points the order-2 programme chooses among (its misses are O(points^3); order 1 takes them all)
MAX_POINTS = 49
#: samples per float64 Gram product (bounds the float64 copy of the recorded trajectory)
GRAM_ROWS = 8
#: bumped whenever what :func:`teacher_solve` computes changes (a cached entry of another format is recomputed)
TEACHER_FORMAT = 2


@dataclass(frozen=True)
class TeacherCosts:
    """The candidate times (a subset of the teacher's evaluation times, then its end), the order-1
    misses ``costs[i, j]`` and, when computed, the order-2 misses ``costs2[q, i, j]`` (``inf`` where undefined)."""

    times: tuple[float, ...]
    costs: np.ndarray
    costs2: np.ndarray | None = None

    def to_array(self) -> np.ndarray:
        """``(1, m, m)`` or ``(m + 1, m, m)``: the order-1 matrix, then the order-2 one (what the reference cache stores)."""
        return self.costs[None] if self.costs2 is None else np.concatenate([self.costs[None], self.costs2])

    @classmethod
    def from_array(cls, times: list[float], arr: np.ndarray) -> "TeacherCosts":
        m = len(times)
        if arr.shape not in ((1, m, m), (m + 1, m, m)):
            raise ArgumentError(f"teacher costs for {m} times must have shape {(1, m, m)} or {(m + 1, m, m)}, got {arr.shape}")
        return cls(tuple(float(t) for t in times), arr[0].astype(np.float64), arr[1:].astype(np.float64) if arr.shape[0] > 1 else None)


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
            states.append(x_in)
            preds.append(x0)
        model.guard.flush()
        return runner.result(), times, states, preds


def _chosen(n_eval: int, order2: bool) -> list[int]:
    """The evaluation indices the programme chooses among: all of them, or for the order-2 misses at
    most :data:`MAX_POINTS` - 1, evenly spaced, the first kept."""
    if not order2 or n_eval <= MAX_POINTS - 1:
        return list(range(n_eval))
    return sorted(set(np.round(np.linspace(0, n_eval - 1, MAX_POINTS - 1)).astype(int).tolist()))


def _weights(pts: list[Point], schedule: object, order2: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Coefficients of the misses on the candidate points ``pts`` (the last at sigma = 0):
    ``w1[i, j] = (a, w)`` of the order-1 step, ``w2[q, i, j] = (a, w_i, w_q)`` of the order-2 one."""
    m = len(pts)
    w1 = np.full((m, m, 2), np.nan)
    for i in range(m - 1):
        for j in range(i + 1, m):
            w1[i, j] = base_terms("data", pts[i], pts[j])
    if not order2:
        return w1, None
    w2 = np.full((m, m, m, 3), np.nan)
    for q in range(m - 2):
        for i in range(q + 1, m - 1):
            for j in range(i + 1, m - 1):
                try:
                    taus = node_positions("lambda", "data", schedule, pts[i], pts[j], [pts[i], pts[q]])  # type: ignore[arg-type]
                    a, (wi, wq), _ = node_weights("data", "lambda", "bh2", schedule, pts[i], pts[j], taus)  # type: ignore[arg-type]
                    w2[q, i, j] = (a, wi, wq)
                except SolverError:  # the previous point at pure noise (infinite log-SNR): first order, as the presets do
                    w2[q, i, j] = (*w1[i, j], 0.0)
            w2[q, i, m - 1] = (*w1[i, m - 1], 0.0)  # into sigma = 0: first order
    return w1, w2


def _misses(gram: torch.Tensor, m: int, w1: np.ndarray, w2: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Summed over samples: RMS of every miss, from the per-sample Gram matrix ``gram`` (B, 2m - 1,
    2m - 1) of the vectors ``X_0 .. X_(m-1)`` (``X_(m-1)``: the end) then ``D_0 .. D_(m-2)``, per value."""
    g = gram.double().numpy()
    xs, ds = np.arange(m), m + np.arange(m - 1)
    c1 = np.full((m, m), np.inf)
    c2 = np.full((m, m, m), np.inf) if w2 is not None else None
    for i in range(m - 1):
        j = np.arange(i + 1, m)
        a, w = w1[i, j, 0], w1[i, j, 1]
        # |a X_i + w D_i - X_j|^2 expanded
        sq = (a * a * g[:, xs[i], xs[i]][:, None] + w * w * g[:, ds[i], ds[i]][:, None] + g[:, xs[j], xs[j]]
              + 2 * a * w * g[:, xs[i], ds[i]][:, None] - 2 * a * g[:, xs[i], xs[j]] - 2 * w * g[:, ds[i], xs[j]])
        c1[i, j] = np.sqrt(np.maximum(sq, 0.0)).sum(axis=0)
        if w2 is None or c2 is None:
            continue
        for q in range(i):
            a, wi, wq = w2[q, i, j, 0], w2[q, i, j, 1], w2[q, i, j, 2]
            v = [(a, xs[i]), (wi, ds[i]), (wq, ds[q])]
            sq = g[:, xs[j], xs[j]].copy()
            for cu, u in v:
                sq = sq - 2 * cu * g[:, u, xs[j]]
                for cw, w_ in v:
                    sq = sq + cu * cw * g[:, u, w_][:, None]
            c2[q, i, j] = np.sqrt(np.maximum(sq, 0.0)).sum(axis=0)
    return c1, c2


def _gram(vecs: torch.Tensor) -> torch.Tensor:
    """Per-sample Gram matrices ``(b, u, v)`` of ``vecs`` ``(u, b, d)`` in float64, divided by ``d``
    (the expanded squared misses cancel: float32 would lose them)."""
    v = vecs.to(torch.float64)
    return torch.einsum("ubd,vbd->buv", v, v) / v.shape[-1]


def teacher_solve(model: Model, x: torch.Tensor, plan: SolverSchedule, *, max_rows: int = 4096,
                  order2: bool = False) -> tuple[torch.Tensor, TeacherCosts]:
    """The final samples of ``plan`` (a deterministic fine solve ending at sigma = 0) from ``x``, and
    the :class:`TeacherCosts` of its trajectory (``order2``: the order-2 misses too, ``O(M^3)``), at no
    model call beyond the solve's own. A plan that evaluates the model twice at one time (singlestep
    stages) is refused."""
    finals: list[torch.Tensor] = []
    sums: tuple[np.ndarray, np.ndarray | None] | None = None
    weights: tuple[np.ndarray, np.ndarray | None] | None = None
    cand: list[float] = []
    for xs in x.split(max_rows):
        final, times, states, preds = _record(model, xs, plan)
        finals.append(final)
        if len(set(times)) != len(times) or not all(a > b for a, b in zip(times, times[1:])):
            raise ArgumentError("teacher costs need a plan with one evaluation per grid time (a multistep solve)")
        keep = _chosen(len(times), order2)
        cand = [times[k] for k in keep] + [float(plan.times[-1])]
        pts = points(model.schedule, cand)
        if pts[-1].sigma != 0.0:
            raise ArgumentError(f"teacher costs need a solve that ends at sigma = 0, this one ends at t = {plan.times[-1]}")
        if weights is None:
            weights = _weights(pts, model.schedule, order2)
        vecs = torch.stack([states[k] for k in keep] + [final] + [preds[k] for k in keep]).flatten(2)  # (2m-1, B, d)
        gram = torch.cat([_gram(vecs[:, b:b + GRAM_ROWS]) for b in range(0, vecs.shape[1], GRAM_ROWS)])
        part = _misses(gram, len(cand), *weights)
        sums = part if sums is None else (sums[0] + part[0], None if part[1] is None else sums[1] + part[1])  # type: ignore[operator]
    assert sums is not None
    rows = int(x.shape[0])
    return torch.cat(finals), TeacherCosts(tuple(cand), sums[0] / rows, None if sums[1] is None else sums[1] / rows)


def dp_path(costs: np.ndarray, steps: int) -> list[int]:
    """Indices ``0 = p_0 < ... < p_steps = M`` minimising ``sum_k costs[p_(k-1), p_k]`` (``M + 1`` points)."""
    m = costs.shape[0]
    _check_steps(steps, m)
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


def dp_path2(costs: np.ndarray, costs2: np.ndarray, steps: int) -> list[int]:
    """As :func:`dp_path`, the first step costing ``costs[0, p_1]`` and every later one
    ``costs2[p_(k-2), p_(k-1), p_k]`` (a step that depends on the point before it)."""
    m = costs.shape[0]
    _check_steps(steps, m)
    idx = np.arange(m)
    ordered = (idx[:, None, None] < idx[None, :, None]) & (idx[None, :, None] < idx[None, None, :])
    costs2 = np.where(ordered, costs2, np.inf)  # only q < i < j: a path goes forward in time
    best = np.full((m, m), np.inf)  # best[q, i]: reach i in k steps, the point before it q
    best[0, 1:] = costs[0, 1:]
    backs = []
    for _ in range(steps - 1):
        total = best[:, :, None] + costs2  # [q, i, j]
        back = np.argmin(total, axis=0)  # [i, j]: the best q
        best = np.take_along_axis(total, back[None], axis=0)[0]  # [i, j]
        backs.append(back)
    last = int(np.argmin(best[:, m - 1]))
    if not np.isfinite(best[last, m - 1]):
        raise ArgumentError(f"no finite path of {steps} steps over the teacher's points")
    path = [m - 1, last]
    for back in reversed(backs):
        path.append(int(back[path[-1], path[-2]]))
    path.reverse()
    return path


def _check_steps(steps: int, m: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= m - 1:
        raise ArgumentError(f"a path of {steps} steps over {m} teacher points needs 1 <= steps <= {m - 1}")


def gits_times(teacher: TeacherCosts, steps: int, order: int = 1) -> tuple[float, ...]:
    """The ``steps + 1`` grid times (start to sigma = 0) of the least summed local miss of ``order`` 1 or 2."""
    if order not in (1, 2):
        raise ArgumentError(f"order must be 1 or 2, got {order!r}")
    if order == 2 and teacher.costs2 is None:
        raise ArgumentError("these teacher costs have no order-2 misses (teacher_solve(..., order2=True))")
    path = dp_path(teacher.costs, steps) if order == 1 else dp_path2(teacher.costs, teacher.costs2, steps)
    return tuple(teacher.times[i] for i in path)

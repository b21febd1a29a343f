"""The polish: a searched plan's continuous parameters fitted to the *final* error by Levenberg-Marquardt.

A budgeted search ends here. Its best candidate fixes the steps' strategies; the polish then fits, on
the calibration noises and their references, ``n - 1`` free grid logits (the softmax grid of
:class:`~.space.Space`; one logit is redundant) and, on every step after the first, the two
coefficients of an IIA-form correction (:attr:`fewstep.Step.correction`: ``c_x0 (x0_i - x0_(i-1)) +
c_eps (eps_i - eps_(i-1))`` added to the step's result). The target is the distance of the final
samples to the references, not a step's local error (IIA's least squares, :func:`fewstep.fit_iia`):
the parameters absorb every step's truncation error, as the learned grids of LD3 (Tong et al. 2024)
and the learned coefficients of S4S (Frankel et al. 2025) do with gradients through the sampler. Here
nothing is differentiated: the Jacobian of the final samples in the parameters is taken by forward
differences on the first ``jacobian_rows`` calibration noises (all ``P + 1`` plans in one batched run,
:func:`~.evaluate.evaluate_plans`), so any model works. The search's RMSE is the mean over samples of
each one's RMS, dominated less by a few far samples than a sum of squares: each sample's residuals
(and Jacobian rows) are weighted by ``||r_b||^(-1/2)`` at the current point, which makes the
least-squares gradient that of ``sum_b ||r_b||`` (iteratively reweighted least squares). A step is

    (J^T J + mu diag(J^T J)) d = -J^T r          (Levenberg 1944, Marquardt 1963)

tried at three dampings ``mu / 4, mu, 4 mu`` together on every calibration noise; the best is taken if
it lowers the objective (the search's metric: the residuals are the RMSE's, the acceptance is the
metric's), and ``mu`` moves with the outcome. It stops when no trial lowers the error by a
``1e-3`` fraction, after ``max_iterations``, or when the next iteration would not fit in ``rows``.

Cost per iteration: ``(P + 1) jacobian_rows nfe + 3 n_calibration nfe`` model rows, ``P = 3 (n - 1)``
for ``n`` steps. The polished plan is one finalist of :func:`fewstep.search`: it is returned only
when it is better on the held-out noises, which it never saw.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..models import Model
from ..solvers.plan import SolverSchedule
from .evaluate import BatchCost, evaluate_plans
from .objective import Objective
from .space import Candidate, Space

__all__ = ["PolishResult", "polish", "gauss_newton", "corrected", "polish_parameters", "iteration_cost", "JACOBIAN_ROWS", "MAX_ITERATIONS"]

#: calibration noises the Jacobian is taken on (all of them when there are fewer)
JACOBIAN_ROWS = 16
MAX_ITERATIONS = 8
#: forward-difference step of every parameter (logits and coefficients are O(1)); a secant this wide, not a
#: derivative, so that a network whose outputs wiggle between nearby times (sinusoidal time embeddings) is seen
#: by its trend: 1e-3 gave no descent direction at all on `digits-edm`
STEP = 0.03
#: relative decrease of the error below which an iteration counts as no progress
MIN_GAIN = 1e-3
DAMPINGS = (0.25, 1.0, 4.0)


def polish_parameters(n_steps: int) -> int:
    """Parameters fitted for a plan of ``n_steps`` steps: ``n - 1`` grid logits and two coefficients per later step."""
    return 3 * (n_steps - 1)


def iteration_cost(n_steps: int, nfe: int, n_calibration: int, jacobian_rows: int = JACOBIAN_ROWS) -> int:
    """Model rows of one iteration (the Jacobian's plans and the three trial steps)."""
    return (polish_parameters(n_steps) + 1) * min(jacobian_rows, n_calibration) * nfe + len(DAMPINGS) * n_calibration * nfe


@dataclass
class PolishResult:
    """The polished candidate's grid (``cand``) and corrections, its calibration error, and what it cost."""

    cand: Candidate
    corrections: tuple[tuple[float, float], ...]
    error: float
    start_error: float
    iterations: int = 0
    #: the Levenberg-Marquardt damping for the next step
    mu: float = 1e-3
    #: converged (or diverged): a resumed search does not go on
    done: bool = False
    #: calibration noises the Jacobian is taken on (the first ones)
    jacobian_rows: int = JACOBIAN_ROWS
    cost: BatchCost = field(default_factory=BatchCost)
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def fresh(cls, cand: Candidate, error: float, jacobian_rows: int = JACOBIAN_ROWS) -> "PolishResult":
        """The start: ``cand`` (of calibration error ``error``) with no correction."""
        return cls(cand, tuple((0.0, 0.0) for _ in cand.z[1:]), float(error), float(error), jacobian_rows=jacobian_rows)

    def plan(self, space: Space, name: str = "searched") -> SolverSchedule:
        return corrected(space.schedule(self.cand, name=name), self.corrections)

    def to_json(self) -> dict[str, Any]:
        return {"cand": self.cand.to_dict(), "corrections": [list(c) for c in self.corrections], "error": self.error,
                "start_error": self.start_error, "iterations": self.iterations, "mu": self.mu, "done": self.done, "jacobian_rows": self.jacobian_rows,
                "cost": {"calls": self.cost.calls, "evaluations": self.cost.evaluations}, "history": self.history}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PolishResult":
        return cls(Candidate.from_dict(data["cand"]), tuple((float(a), float(b)) for a, b in data["corrections"]), float(data["error"]),
                   float(data["start_error"]), int(data["iterations"]), float(data["mu"]), bool(data["done"]), int(data["jacobian_rows"]),
                   BatchCost(int(data["cost"]["calls"]), int(data["cost"]["evaluations"])), list(data["history"]))


def corrected(plan: SolverSchedule, corrections: tuple[tuple[float, float], ...]) -> SolverSchedule:
    """``plan`` with step ``i + 1`` corrected by ``corrections[i] = (c_x0, c_eps)`` (zeros: no correction)."""
    steps = list(plan.steps)
    for i, (cx, ce) in enumerate(corrections, start=1):
        steps[i] = steps[i].with_(correction=None if cx == 0.0 and ce == 0.0 else ((float(cx),), (float(ce),)))
    return plan.replace(steps=tuple(steps))


def gauss_newton(base: torch.Tensor, nudged: Sequence[torch.Tensor], ref: torch.Tensor,
                 step: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The gradient ``J^T r``, the matrix ``J^T J`` and its diagonal scale at the samples ``base``, from
    the samples ``nudged[k]`` with parameter ``k`` moved by ``step`` (forward differences). The
    objective is the mean over samples of each one's RMS, not the RMS of all: each sample's rows are
    weighted by ``||r_b||^(-1/2)``, so that ``J^T r`` is the gradient of ``sum_b ||r_b||`` (IRLS)."""
    b = base.shape[0]
    r = (base - ref).to(torch.float64).reshape(b, -1)
    norms = r.norm(dim=1)
    root_w = norms.clamp_min(1e-12 * float(norms.mean()) + 1e-300).rsqrt()[:, None]
    jac = torch.stack([((x - base).to(torch.float64).reshape(b, -1) * root_w).reshape(-1) / step for x in nudged], 1).cpu().numpy()
    rw = (r * root_w).reshape(-1).cpu().numpy()
    h = jac.T @ jac
    return jac.T @ rw, h, np.diag(h) + 1e-12 * max(float(np.max(np.diag(h))), 1e-300)


def _unpack(start: PolishResult, theta: np.ndarray) -> tuple[Candidate, tuple[tuple[float, float], ...]]:
    n = len(start.cand.z)
    z = (start.cand.z[0], *(float(v) for v in theta[: n - 1]))
    c = theta[n - 1:].reshape(n - 1, 2)
    return Candidate(start.cand.genes, z), tuple((float(a), float(b)) for a, b in c)


def _pack(res: PolishResult) -> np.ndarray:
    return np.concatenate([np.asarray(res.cand.z[1:], dtype=np.float64), np.asarray(res.corrections, dtype=np.float64).reshape(-1)])


def polish(model: Model, space: Space, start: PolishResult, objective: Objective, rows: int, *,
           max_iterations: int = MAX_ITERATIONS, max_rows: int = 4096,
           on_iteration: Callable[[PolishResult], None] | None = None,
           log: Callable[[str], None] | None = None) -> PolishResult:
    """Levenberg-Marquardt on ``start``'s free grid logits and corrections (see the module docstring),
    spending at most ``rows`` model rows more than ``start.cost`` (a resumed polish passes its saved
    result), the Jacobian on the first ``start.jacobian_rows`` calibration noises; ``on_iteration(result)``
    after each iteration (the state save). Returns a new result."""
    noises, ref = objective.calibration.noises, objective.calibration.reference
    n_cal, nfe = int(noises.shape[0]), space.nfe
    nj = min(start.jacobian_rows, n_cal)
    n = len(start.cand.z)
    res = dataclasses.replace(start, cost=BatchCost(start.cost.calls, start.cost.evaluations), history=list(start.history))
    if n < 2 or res.done:
        return res
    limit = start.cost.evaluations + rows
    trial_cost = len(DAMPINGS) * n_cal * nfe
    theta = _pack(res)
    lsq: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (gradient, Gauss-Newton matrix, its scale) at theta
    while res.iterations < max_iterations:
        if lsq is None:
            if res.cost.evaluations + iteration_cost(n, nfe, n_cal, nj) > limit:
                break
            plans = [corrected(space.schedule(c), k) for c, k in (_unpack(res, theta + STEP * e) for e in np.eye(theta.size))]
            xs, cost = evaluate_plans(model, [res.plan(space), *plans], noises[:nj], max_rows=max_rows)
            res.cost.add(cost)
            if not all(bool(torch.isfinite(x).all()) for x in xs):
                res.done = True  # a parameter's nudge diverges: nowhere safe to go
                break
            lsq = gauss_newton(xs[0], xs[1:], ref[:nj], STEP)
        elif res.cost.evaluations + trial_cost > limit:
            break
        g, h, scale = lsq
        thetas = [theta - np.linalg.solve(h + res.mu * f * np.diag(scale), g) for f in DAMPINGS]
        trials = [_unpack(res, th) for th in thetas]
        xs, cost = evaluate_plans(model, [corrected(space.schedule(c), k) for c, k in trials], noises, max_rows=max_rows)
        res.cost.add(cost)
        errors = [objective.error(x) for x in xs]
        i = int(np.argmin(errors))
        gain = (res.error - errors[i]) / res.error if math.isfinite(errors[i]) and res.error > 0 else -math.inf
        res.iterations += 1
        if gain > 0:
            theta, lsq = thetas[i], None
            res.cand, res.corrections = trials[i]
            res.error = float(errors[i])
            res.mu *= DAMPINGS[i] / 2
        else:
            res.mu *= 16.0
        res.done = 0 < gain < MIN_GAIN or res.mu > 1e4
        res.history.append({"iteration": res.iterations, "error": res.error, "mu": res.mu, "evaluations": res.cost.evaluations})
        if on_iteration:
            on_iteration(res)
        if log:
            log(f"polish {res.iterations}: calibration error {res.error:.4g} (mu {res.mu:.2g}, {res.cost.evaluations} model evaluations)")
        if res.done:
            break
    return res

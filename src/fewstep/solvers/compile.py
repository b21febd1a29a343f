"""Compile a :class:`SolverSchedule` into a list of affine operations (DESIGN 6).

Every step is affine once the model outputs are known, so a whole solver becomes a short program:

* ``Evaluate(state, t, slot)``: ``D[slot] = model(X[state], t)`` (its x0 and eps);
* ``Combine(target, base, a, terms, noise, bias)``: ``X[target] = a X[base] + sum c D[slot].kind + sum c_z z
  (+ bias)``, each ``z`` the normalised increment of one of the sample's Brownian paths (channel 0: the
  step noise of the SDE rules; channel 1: EDM's churn) over a log-SNR interval.

A step's IIA correction (:attr:`~fewstep.solvers.strategy.Step.correction`, fitted by
:func:`fewstep.fit_iia`) is more terms of the combination that makes the step's result (its
corrector's, with a UniC corrector): ``+c (D_j - D_(j-1))`` on the predictions at two steps' first
evaluations (:attr:`CompiledPlan.starts`).

All coefficients are float64 numbers computed here, once per plan: the sampling loop does no
schedule maths, and anything that changes a solver changes the plan, never the loop. A step whose
weights come from empirical model statistics (DPM-Solver-v3, :mod:`fewstep.solvers.ems`) has
*per-dimension* coefficients: ``a``, a term's ``c`` and ``bias`` are then float64 CPU tensors of the
sample shape (the plan's :attr:`CompiledPlan.sample_shape`), still affine in the state and the model
outputs, which the executor moves to the state's device once per run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch

from ..errors import SolverError
from ..schedules import NoiseSchedule
from .coefficients import node_positions, node_weights
from .ems import ModelStatistics, ems_weights, is_ems
from .points import Point, point, points
from .plan import SolverSchedule
from .strategy import Step

__all__ = ["Evaluate", "Combine", "CompiledPlan", "compile_plan", "Coef"]

KIND = {"data": "x0", "noise": "eps"}


@dataclass(frozen=True)
class Evaluate:
    state: int
    t: float
    slot: int
    alpha: float = math.nan  # the schedule's alpha and sigma at t (float64), so the loop does no schedule maths
    sigma: float = math.nan


#: a coefficient: a float64 number, or (DPM-Solver-v3) a float64 CPU tensor of the sample shape
Coef = Union[float, torch.Tensor]


@dataclass(frozen=True)
class Combine:
    target: int
    base: int
    a: Coef
    terms: tuple[tuple[int, str, Coef], ...]  # (slot, "x0" | "eps", coefficient)
    grid_index: int | None = None  # set when the target is the state at times[grid_index]
    #: (coefficient, lambda_from, lambda_to, channel): fresh noise, the normalised increment of the
    #: Brownian path ``channel`` over the interval
    noise: tuple[tuple[float, float, float, int], ...] = ()
    #: a per-dimension constant added to the state (DPM-Solver-v3's b statistic), or None
    bias: torch.Tensor | None = None

    @property
    def per_dimension(self) -> bool:
        """Is any coefficient a per-dimension tensor?"""
        return isinstance(self.a, torch.Tensor) or self.bias is not None or any(isinstance(c, torch.Tensor) for _, _, c in self.terms)


@dataclass(frozen=True)
class CompiledPlan:
    ops: tuple[Evaluate | Combine, ...]
    n_states: int
    n_slots: int
    output: int
    times: tuple[float, ...]
    nfe: int
    #: the sample shape per-dimension coefficients are shaped for (``None``: scalar coefficients only)
    sample_shape: tuple[int, ...] | None = None
    #: :func:`fewstep.identity.model_key` of the only model the plan may run (its statistics' model), or None
    model_key: str | None = None
    #: the slot of each step's first evaluation (at its start, or its churned start)
    starts: tuple[int, ...] = ()

    @property
    def stochastic(self) -> bool:
        return any(isinstance(op, Combine) and op.noise for op in self.ops)

    @property
    def per_dimension(self) -> bool:
        """Does any combination have per-dimension coefficients?"""
        return any(isinstance(op, Combine) and op.per_dimension for op in self.ops)


class _Builder:
    def __init__(self) -> None:
        self.ops: list[Evaluate | Combine] = []
        self.n_states = 1
        self.n_slots = 0

    def evaluate(self, state: int, p: Point) -> int:
        slot = self.n_slots
        self.n_slots += 1
        self.ops.append(Evaluate(state, p.t, slot, p.alpha, p.sigma))
        return slot

    def combine(self, base: int, a: Coef, terms: list[tuple[int, str, Coef]], grid_index: int | None = None,
                noise: tuple[tuple[float, float, float, int], ...] = (), bias: torch.Tensor | None = None) -> int:
        target = self.n_states
        self.n_states += 1
        self.ops.append(Combine(target, base, a, tuple(terms), grid_index, tuple(nz for nz in noise if nz[0] != 0.0), bias))
        return target


def _weights(step: Step, variant: str, sched: NoiseSchedule, s: Point, t: Point, nodes: list[Point],
             taus: list[float] | None) -> tuple[float, list[float], tuple[tuple[float, float, float, int], ...]]:
    """``(a, node weights, noise terms)`` of the combination from ``s`` to ``t`` through ``nodes``."""
    if taus is None:
        taus = node_positions(step.interp, step.prediction, sched, s, t, nodes) if len(nodes) > 1 else [0.0]
    try:
        a, w, c = node_weights(step.prediction, step.interp, variant, sched, s, t, taus, step.noise, step.eta)
    except SolverError as exc:
        raise SolverError(f"{exc}") from None
    return a, w, ((c, s.lam, t.lam, 0),) if c != 0.0 else ()


def _ems_combination(stats: ModelStatistics | None, step: Step, variant: str, s: Point, t: Point,
                     nodes: list[tuple[Point, int]], i: int) -> tuple[Coef, list[tuple[int, str, Coef]], torch.Tensor | None]:
    """``(a, terms, bias)`` of a DPM-Solver-v3 combination (:func:`~fewstep.solvers.ems.ems_weights`)."""
    if stats is None:
        raise SolverError(f"step {i} takes its weights from empirical model statistics ({variant!r}) but the plan carries none: build it "
                          "with fewstep.preset('dpm_solver_v3', nfe, schedule, statistics=fewstep.model_statistics(model))")
    if step.method != "multistep" or step.interp != "lambda" or step.uniform_nodes or step.noise != "none" or step.churn:
        raise SolverError(f"step {i}: DPM-Solver-v3 weights ({variant!r}) apply to deterministic multistep steps interpolating in "
                          f"lambda (method='multistep', interp='lambda', no uniform_nodes, noise='none', no churn), got {step}")
    a, per_node, bias = ems_weights(stats, s, t, [p for p, _ in nodes], pseudo=variant == "ems_pseudo")
    terms: list[tuple[int, str, Coef]] = []
    for (_, slot), (c_x0, c_eps) in zip(nodes, per_node):
        terms += [(slot, kind, c) for kind, c in (("x0", c_x0), ("eps", c_eps)) if c is not None]
    return a, terms, bias


def _correction_terms(step: Step, i: int, start_slots: list[int]) -> list[tuple[int, str, Coef]]:
    """Step ``i``'s IIA correction (:attr:`Step.correction`) as terms of its result's combination:
    ``c[k-1] (D_(i-k+1) - D_(i-k))`` for the x0 and eps predictions ``D`` at the steps' first
    evaluations (zero coefficients add nothing, so an all-zero correction leaves the program as it was)."""
    if step.correction is None:
        return []
    if step.correction_depth > i:
        raise SolverError(f"step {i} has an IIA correction reading {step.correction_depth} previous steps but only {i} exist")
    terms: list[tuple[int, str, Coef]] = []
    for kind, coefs in zip(("x0", "eps"), step.correction):
        for k, c in enumerate(coefs, 1):
            if c != 0.0:
                terms += [(start_slots[i - k + 1], kind, c), (start_slots[i - k], kind, -c)]
    return terms


#: the Brownian channel of EDM's churn noise (independent of the step noise on channel 0)
CHURN_CHANNEL = 1


def _churn(b: _Builder, sched: NoiseSchedule, step: Step, cur: int, s: Point, t: Point, lam_floor: float) -> tuple[int, Point]:
    """EDM's churn (Karras et al. 2022, Alg. 2): raise the VE noise level ``sigma/alpha = e^-lambda`` of
    the state at ``s`` by ``1 + churn``: ``x_hat = (alpha_hat / alpha_s) x + alpha_hat sqrt(e^(-2 lambda_hat)
    - e^(-2 lambda_s)) S_noise z``, ``z`` the churn channel's increment over the step ``[s, t]``. The
    raised level is capped at the schedule's largest noise level ``lam_floor``. Returns the new state
    and the point it is at."""
    if step.churn == 0.0 or not (s.alpha > 0.0 and math.isfinite(s.lam)):
        return cur, s
    lam_hat = max(s.lam - math.log1p(step.churn), lam_floor)
    if not lam_hat < s.lam:
        return cur, s
    hat = point(sched, float(sched.t_of_lambda(lam_hat)))
    coef = hat.alpha * math.sqrt(math.exp(-2.0 * hat.lam) - math.exp(-2.0 * s.lam)) * step.churn_noise
    noise = ((coef, s.lam, t.lam, CHURN_CHANNEL),)
    return b.combine(cur, hat.alpha / s.alpha, [], noise=noise), hat


def compile_plan(plan: SolverSchedule, sched: NoiseSchedule) -> CompiledPlan:
    """Turn a solver schedule into affine operations for the noise schedule ``sched``."""
    plan.check_schedule(sched)
    stats = plan.statistics
    uses_stats = False
    b = _Builder()
    pts = points(sched, plan.times)
    start_slots: list[int] = []
    starts: list[Point] = []  # where each step's first evaluation is (its start, or its churned start)
    lam_floor = float(sched.lambda_(sched.t_max))
    cur = 0
    pending: tuple[Step, int, Point, Point, list[tuple[Point, int]], float] | None = None  # corrector of the previous step
    for i, step in enumerate(plan.steps):
        s, t = pts[i], pts[i + 1]
        kind = KIND[step.prediction]
        if step.churn and pending is not None:
            raise SolverError(
                f"step {i} churns its start state, but step {i - 1} has a UniC corrector that needs the model at "
                "that state; drop the corrector before a churned step"
            )
        cur, s = _churn(b, sched, step, cur, s, t, lam_floor)
        e0 = b.evaluate(cur, s)
        start_slots.append(e0)
        starts.append(s)
        if pending is not None:  # UniC: correct the state we just evaluated, re-using that evaluation
            cstep, cbase, cs, ct, cnodes, _ = pending
            taus = None
            if cstep.uniform_nodes:
                taus = [0.0] + [-float(h) for h in cstep.history[: len(cnodes) - 1]] + [1.0]
            cvariant = cstep.corrector_variant or cstep.variant
            if is_ems(cvariant):  # nodes in the reference's order: the start, the new point, earlier starts
                a, terms, bias = _ems_combination(stats, cstep, cvariant, cs, ct, cnodes[:1] + [(ct, e0)] + cnodes[1:], i - 1)
                cur = b.combine(cbase, a, terms + _correction_terms(cstep, i - 1, start_slots), grid_index=i, bias=bias)
                uses_stats = True
            else:
                nodes = cnodes + [(ct, e0)]
                a, w, nz = _weights(cstep, cvariant, sched, cs, ct, [p for p, _ in nodes], taus)
                # the corrected state re-uses the predictor's noise: the same Brownian increment
                terms = [(slot, KIND[cstep.prediction], c) for (_, slot), c in zip(nodes, w)] + _correction_terms(cstep, i - 1, start_slots)
                cur = b.combine(cbase, a, terms, grid_index=i, noise=nz)
            pending = None
        if step.method == "multistep":
            nodes = [(s, e0)] + [(starts[i - h], start_slots[i - h]) for h in step.history]
            # a corrected state is reported (grid_index) by its corrector, once, in its final form; the
            # IIA correction goes to the step's result: the corrected state when there is a corrector
            corr = [] if step.corrector else _correction_terms(step, i, start_slots)
            if is_ems(step.variant):
                a, terms, bias = _ems_combination(stats, step, step.variant, s, t, nodes, i)
                new = b.combine(cur, a, terms + corr, grid_index=None if step.corrector else i + 1, bias=bias)
                uses_stats = True
            else:
                taus = [0.0] + [-float(h) for h in step.history] if step.uniform_nodes else None
                a, w, nz = _weights(step, step.variant, sched, s, t, [p for p, _ in nodes], taus)
                terms = [(slot, kind, c) for (_, slot), c in zip(nodes, w)] + corr
                new = b.combine(cur, a, terms, grid_index=None if step.corrector else i + 1, noise=nz)
            if step.corrector:
                pending = (step, cur, s, t, nodes[: step.corrector - 1], 0.0)
        else:
            if step.stages and not (math.isfinite(s.lam) and math.isfinite(t.lam)):
                raise SolverError(
                    f"step {i} is singlestep of order {step.order} but spans an infinite log-SNR interval "
                    f"({s} -> {t}); use order 1 on a step that leaves alpha = 0 or reaches sigma = 0"
                )
            nodes = [(s, e0)]
            for r in step.stages:
                lam_r = s.lam + r * (t.lam - s.lam)
                pr = t if r == 1.0 else point(sched, float(sched.t_of_lambda(lam_r)))
                a, w, nz = _weights(step, step.stage_variant or step.variant, sched, s, pr, [p for p, _ in nodes], None)
                xr = b.combine(cur, a, [(slot, kind, c) for (_, slot), c in zip(nodes, w)], noise=nz)
                nodes.append((pr, b.evaluate(xr, pr)))
            final = nodes if step.final_nodes is None else [nodes[j] for j in step.final_nodes]
            a, w, nz = _weights(step, step.variant, sched, s, t, [p for p, _ in final], None)
            terms = [(slot, kind, c) for (_, slot), c in zip(final, w)] + _correction_terms(step, i, start_slots)
            new = b.combine(cur, a, terms, grid_index=i + 1, noise=nz)
        cur = new
    shape = key = None
    if uses_stats and stats is not None:
        shape = stats.sample_shape if stats.sample_shape != () else None
        key = stats.model
    return CompiledPlan(tuple(b.ops), b.n_states, b.n_slots, cur, plan.times, b.n_slots, shape, key, tuple(start_slots))

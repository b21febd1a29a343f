"""DPM-Solver-v3 (Zheng, Lu, Chen & Zhu, NeurIPS 2023): the multistep predictor-corrector whose
weights come from the model's empirical model statistics (EMS, :func:`fewstep.model_statistics`).

It is a preset of the one framework: each step is a multistep :class:`~fewstep.solvers.strategy.Step`
whose weight variant is ``ems`` (or ``ems_pseudo``), and the plan carries the statistics
(:attr:`~fewstep.SolverSchedule.statistics`). Compiling the plan turns each step into an affine
combination whose coefficients are per-dimension tensors (:mod:`fewstep.solvers.ems`); sequential
and parallel-in-time sampling run it as any other plan.

The step strategy follows the reference implementation (``thu-ml/DPM-Solver-v3``, ``dpm_solver_v3.py``,
``DPM_Solver_v3.sample``): predictor of order ``min(order, i + 1)`` on step ``i`` (the warm-up),
``lower_order_final`` capping it by the steps left; the corrector of step ``i`` corrects the state at
``t_(i+1)`` with the evaluation made there, with as many nodes as the predictor (``corrector_pseudo=False``,
the default: the reference's unconditional EDM and score_sde codebases, ``c_pseudo=False``) or one node
more with pseudo order (``True``: the README's example and its Stable Diffusion sampler), only where
that gives at least 2 nodes. The default was measured better on the oracle and the digits network
(``benchmarks/reports/dpm_solver_v3.md``) and is third order, the pseudo-order corrector second. Departures, each a framework convention: the step into sigma = 0 (outside any
statistics, lambda = +inf) is the framework's usual last step (:func:`~fewstep.solvers.presets.building.into_clean`,
order ``final_order``), and a grid that starts at pure noise (alpha = 0) takes a DDIM first step and
never reads that point again.

Without ``statistics`` the preset runs DPM-Solver-v3 with the paper's degenerate statistics ``l = 1,
s = b = 0`` (the reference's ``degenerated=True``), which is DPM-Solver++ with exact weights of the
polynomial in lambda (plus the corrector), and warns.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from ...errors import SolverError
from ...schedules import NoiseSchedule
from ...timesteps import time_grid
from ..ems import ModelStatistics, StatisticsError
from ..plan import SolverSchedule, recorded_for, schedule_fingerprint
from ..points import points
from ..strategy import Step
from .building import DEFAULT_FINAL_ORDER, check_int, check_nfe, ends_clean, into_clean, multistep_orders, pure_noise_start, register_preset

__all__ = ["dpm_solver_v3"]


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SolverError(f"preset 'dpm_solver_v3': {name} must be True or False, got {value!r}")
    return value


@register_preset("dpm_solver_v3")
def dpm_solver_v3(nfe: int, sched: NoiseSchedule, *, statistics: ModelStatistics | None = None, order: int = 3,
                  predictor_pseudo: bool = False, corrector: bool = True, corrector_pseudo: bool = False,
                  lower_order_final: bool = True, final_order: int | None = None, spacing: Any = None, **grid: Any) -> SolverSchedule:
    """DPM-Solver-v3 with the empirical model statistics ``statistics`` of the model to sample
    (:func:`fewstep.model_statistics`). ``order``: the predictor's order (the reference uses 3
    unconditionally, 2 with guidance); ``predictor_pseudo`` / ``corrector_pseudo``: Newton divided
    differences taken as Taylor coefficients (the reference's pseudo-order; its README: predictor off,
    "only enabled in few cases (5 steps on CIFAR-10)"; a pseudo-order corrector has ``p + 1`` nodes,
    the default one ``p``); ``corrector``:
    the UniC-style corrector re-using each new evaluation (the reference turns it off at large NFE);
    ``lower_order_final``: the order is at most the number of steps left; ``final_order``: the order of
    the step into sigma = 0. The plan carries the statistics; they must cover every finite log-SNR of
    the grid."""
    name = "dpm_solver_v3"
    order = check_int("order", order, 1, 3, name)
    predictor_pseudo, corrector, corrector_pseudo = (_flag(k, v) for k, v in (("predictor_pseudo", predictor_pseudo), ("corrector", corrector),
                                                                                 ("corrector_pseudo", corrector_pseudo)))
    lower_order_final = _flag("lower_order_final", lower_order_final)
    final_order = DEFAULT_FINAL_ORDER if final_order is None else check_int("final_order", final_order, 1, 4, name)
    n = check_nfe(nfe, 1, name)
    times = time_grid(sched, n, spacing, **grid)
    pts = points(sched, times)
    ends, pure = ends_clean(sched, times), pure_noise_start(sched, times)
    finite = [p.lam for p in pts if math.isfinite(p.lam)]
    if statistics is None:
        warnings.warn("dpm_solver_v3 without statistics= runs its degenerate form (l = 1, s = b = 0: DPM-Solver++ with exact weights "
                      "and the corrector); compute the model's statistics with fewstep.model_statistics(model) for DPM-Solver-v3 itself",
                      UserWarning, stacklevel=4)
        lo, hi = (min(finite), max(finite)) if len(finite) >= 2 else (finite[0] - 1.0, finite[0] + 1.0) if finite else (-1.0, 1.0)
        statistics = ModelStatistics.constant((lo, hi if hi > lo else lo + 1.0), schedule=schedule_fingerprint(sched))
    elif not isinstance(statistics, ModelStatistics):
        raise SolverError(f"preset {name!r}: statistics must be a fewstep.ModelStatistics (fewstep.model_statistics(model)), "
                          f"got {type(statistics).__name__}")
    elif not recorded_for(statistics.schedule, sched):
        raise StatisticsError(f"preset {name!r}: the statistics were computed on noise schedule {statistics.schedule}, not on "
                              f"{schedule_fingerprint(sched)} ({sched!r}): compute them for the model to sample")
    orders = multistep_orders(n, order, lower_order_final, ends, final_order)
    steps: list[Step] = []
    for i, o in enumerate(orders):
        if pure and i == 0:  # out of alpha = 0: DDIM (lambda = -inf is in no statistics)
            steps.append(Step(order=1, prediction="data"))
            continue
        if pure:
            o = min(o, i)  # never reads the pure-noise start
        if ends and i == n - 1:
            steps.append(into_clean(Step(order=o, prediction="data")))
            continue
        for p in (pts[i], pts[i + 1]):
            if not statistics.covers(p.lam):
                lo, hi = statistics.lambda_range
                raise StatisticsError(
                    f"preset {name!r}: the grid's time {p.t:.6g} (lambda = {p.lam:.6g}) is outside the log-SNRs the statistics cover, "
                    f"[{lo:.6g}, {hi:.6g}]: compute them over the sampling range (fewstep.model_statistics(..., t_start=, t_end=)) "
                    "or sample inside theirs (t_start= / t_end=)"
                )
        nodes = o + 1 if corrector_pseudo else o
        c = nodes if (corrector and i < n - 1 and nodes >= 2) else 0
        variant = "ems_pseudo" if predictor_pseudo else "ems"
        cvariant = "ems_pseudo" if corrector_pseudo else "ems"
        steps.append(Step(order=o, prediction="data", variant=variant, corrector=c, corrector_variant=cvariant if c else None))  # type: ignore[arg-type]
    meta = {"preset": name, "order": order, "predictor_pseudo": predictor_pseudo, "corrector": corrector, "corrector_pseudo": corrector_pseudo,
            "lower_order_final": lower_order_final, "final_order": final_order,
            "statistics": statistics.model if statistics.model is not None else statistics.settings.get("kind", "given")}
    return SolverSchedule(times=tuple(float(t) for t in times), steps=tuple(steps), name=name, schedule=schedule_fingerprint(sched),
                          meta=meta, statistics=statistics)

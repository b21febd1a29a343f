"""Solver-schedule search: tune the time grid and each step's strategy for a model and an NFE budget,
and save the result as a schedule file (``fewstep.search``; the CLI ``fewstep search``).

* objective: error of the final samples against very fine reference solves from the same
  calibration noises (:mod:`.objective`), reported on separate held-out noises too;
* space: grid logits and per-step genes, legal by construction (:mod:`.space`);
* cost: all candidates of a generation evaluated together, one batched model call per evaluation
  index (:mod:`.evaluate`);
* method: best presets on their best grids first, then surrogate-ranked evolution and grid
  refinement, seeded and resumable (:mod:`.engine`);
* budget: at most ``budget`` sample-evaluations in all (default :func:`.budget.default_budget`:
  30,000 up to NFE 10), candidates raced on a few noises first (:mod:`.budget`); ``budget=None``
  runs the long search of fixed generations.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Sequence

import torch

from .._version import __version__
from ..errors import ArgumentError
from ..identity import modules_device, find_modules, model_key, probe_for
from ..metrics import rmse
from ..models import Model
from ..noise import initial_noise
from ..solvers.plan import SolverSchedule, schedule_fingerprint
from .budget import AUTO, BUDGET_SEED_PRESETS, POLISH_SHARE, REFINE_SHARE, BudgetPlan, default_budget, plan_budget, resolve_budget
from .engine import SEED_PRESETS, SEED_SPACINGS, SearchConfig, SearchReport, StateError, run_search, seed_plan
from .evaluate import evaluate_plans
from ..teacher import gits_times
from .objective import Objective, default_cache_dir, reference_set
from .space import Candidate, Gene, Space

__all__ = ["search", "default_budget", "resolve_budget", "AUTO", "SearchConfig", "SearchReport", "StateError", "Space", "Candidate", "Gene", "Objective",
           "reference_set", "evaluate_plans", "default_cache_dir"]


def _noises(model: Model, given: torch.Tensor | None, n: int, seed: int, start: int, what: str, t_start: float | None,
            like: torch.Tensor | None = None) -> torch.Tensor:
    """``given``, else ``n`` keyed noises of ``seed`` (sample indices ``start..start+n-1``) at the
    start time, shaped ``model.sample_shape`` (else like ``like``), in ``like``'s dtype and on its
    device when given, else float32 on the device of the model's weights (the CPU without any)."""
    if given is not None:
        if not isinstance(given, torch.Tensor) or given.ndim < 2 or given.shape[0] < 2:
            raise ArgumentError(f"{what} must be a tensor of noises shaped (batch >= 2, ...), got {getattr(given, 'shape', type(given).__name__)}")
        return given
    if model.sample_shape is None and like is None:
        raise ArgumentError(f"the model has no sample_shape: pass {what}= noises shaped (batch, ...) at the start time")
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise ArgumentError(f"the number of {what} noises must be an integer >= 2, got {n!r}")
    shape = tuple(model.sample_shape) if model.sample_shape is not None else tuple(like.shape[1:])  # type: ignore[union-attr]
    if like is not None:
        dtype, device = like.dtype, like.device
    else:
        dtype, device = torch.float32, modules_device(find_modules(model.fn)) or torch.device("cpu")
    return initial_noise(model.schedule, (n, *shape), seed, t_start=t_start, indices=range(start, start + n), dtype=dtype, device=device)


def _default_seed(model: Model, nfe: int, dim: int) -> tuple[str, tuple[tuple[str, Any], ...], str] | None:
    """The default call (:func:`fewstep.defaults.default_call` for this model and sample size) as a
    ``(preset, options, spacing)`` seed, so that a search never starts below what the user has."""
    from ..defaults import default_call

    try:
        name, opts = default_call(model.schedule, nfe, dim, model.prediction)
    except Exception:  # noqa: BLE001  a schedule without a rule: the sweep's seeds only
        return None
    opts = dict(opts)
    spacing = str(opts.pop("spacing", "logistic"))
    return name, tuple(sorted(opts.items())), spacing


def search(
    model: Model,
    nfe: int,
    *,
    budget: int | str | None = AUTO,
    calibration: torch.Tensor | None = None,
    heldout: torch.Tensor | None = None,
    n_calibration: int | None = None,
    n_heldout: int | None = None,
    noise_seed: int = 0,
    seed: int = 0,
    metric: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
    metric_name: str | None = None,
    reference_nfe: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    state: str | os.PathLike[str] | None = None,
    t_start: float | None = None,
    population: int | None = None,
    offspring: int | None = None,
    generations: int | None = None,
    refine_generations: int | None = None,
    max_rows: int = SearchConfig.max_rows,
    seed_presets: Sequence[tuple[str, dict[str, Any]]] | None = None,
    seed_spacings: Sequence[str] = SEED_SPACINGS,
    screen: int | None = None,
    seed_keep: int | None = None,
    on_generation: Callable[[int, dict[str, Any]], None] | None = None,
    log: Callable[[str], None] | None = None,
    return_report: bool = False,
) -> SolverSchedule | tuple[SolverSchedule, SearchReport]:
    """Search the time grid and per-step strategies of a solver for ``model`` at ``nfe`` evaluations.

    ``budget``: sample-evaluations (model rows) the whole call may spend, references, probe and
    held-out check included, whether or not the references come from the cache (default
    :data:`AUTO`: :func:`default_budget`, 30,000 up to NFE 10); the unset settings below are derived
    from it (:func:`~fewstep.schedule_search.budget.plan_budget`) and candidates are raced.
    ``budget=None``: the long search, ``generations`` of ``population`` candidates, 256 + 256
    noises, references at NFE 200, no cap.

    ``calibration`` / ``heldout``: noises at the start time ``t_start`` (default: the schedule's
    start; default noises: ``n_calibration`` / ``n_heldout`` keyed noises of ``noise_seed`` on the
    device of the model's weights, the held-out ones with other sample indices and drawn like
    ``calibration``: its dtype and device, and its sample shape for a model without ``sample_shape``).
    Their references are fine solves from ``t_start`` cached under ``cache_dir`` (default
    :func:`~fewstep.schedule_search.objective.default_cache_dir`), on the noises' device and dtype.
    ``metric(samples, reference)`` replaces the RMSE (a state file records it by its name and a
    digest of its code and weights, :func:`~fewstep.schedule_search.engine.metric_identity`).
    ``state``: a JSON file written after every generation; calling again with the same arguments
    (``reference_nfe`` and the metric included) resumes from it. A candidate whose model outputs or
    samples are not finite scores infinity; the search goes on. ``generations`` (``refine_generations`` of them grid-only) of
    ``population`` evaluated candidates each, chosen from ``offspring`` bred ones; ``seed`` makes
    it reproducible. Returns the best schedule, whose ``meta["search"]`` records its provenance
    (model, schedule fingerprint, NFE, objective, calibration and held-out errors, the best preset
    at its best grid on both, fewstep version, model evaluations spent); with ``return_report``
    also a :class:`SearchReport`.
    """
    if not isinstance(model, Model):
        raise ArgumentError(f"model must be a fewstep.Model, got {type(model).__name__}")
    cap = resolve_budget(budget, nfe) if isinstance(nfe, int) and not isinstance(nfe, bool) and nfe >= 1 else None
    rows_given = {k: int(v.shape[0]) for k, v in (("calibration", calibration), ("heldout", heldout)) if isinstance(v, torch.Tensor) and v.ndim >= 2}
    spend: BudgetPlan | None = None
    if cap is not None:
        if refine_generations is not None:
            raise ArgumentError("refine_generations applies to the long search (budget=None): a budgeted search refines the grid "
                                "by pattern search and polishes it with the last 45 % of its budget")
        spend = plan_budget(cap, nfe, n_calibration=rows_given.get("calibration", n_calibration),
                            n_heldout=rows_given.get("heldout", n_heldout), reference_nfe=reference_nfe)
        n_calibration, n_heldout, reference_nfe = spend.n_calibration, spend.n_heldout, spend.reference_nfe
    else:
        n_calibration, n_heldout = n_calibration or 256, n_heldout or 256
        reference_nfe = 200 if reference_nfe is None else reference_nfe
    cal = _noises(model, calibration, n_calibration, noise_seed, 0, "calibration", t_start)
    held = _noises(model, heldout, n_heldout, noise_seed, cal.shape[0], "heldout", t_start, like=cal)
    if tuple(cal.shape[1:]) != tuple(held.shape[1:]):
        raise ArgumentError(f"calibration and held-out noises differ in shape: {tuple(cal.shape)} vs {tuple(held.shape)}")
    default_seed = _default_seed(model, nfe, math.prod(cal.shape[1:]))
    config = SearchConfig(
        nfe=nfe, seed=seed, max_rows=max_rows, seed_spacings=tuple(seed_spacings),
        population=population or SearchConfig.population, offspring=offspring or (48 if spend else SearchConfig.offspring),
        generations=generations or (100_000 if spend else SearchConfig.generations),
        refine_generations=SearchConfig.refine_generations if refine_generations is None else refine_generations,
        seed_presets=tuple((n, tuple(sorted(dict(o).items()))) for n, o in (seed_presets or (BUDGET_SEED_PRESETS if spend else SEED_PRESETS))),
        screen=screen or (spend.race if spend else SearchConfig.screen), seed_keep=seed_keep or (4 if spend else SearchConfig.seed_keep),
        extra_seeds=(default_seed,) if default_seed else (),
        budget=spend.search if spend else None, race=spend.race if spend else 0,
        refine_fraction=REFINE_SHARE if spend else SearchConfig.refine_fraction, polish_fraction=POLISH_SHARE if spend else 0.0)
    key = model_key(model)  # once: the weights are hashed once per search
    probe = probe_for(model, cal)  # what the model computes: checked against cached references and the state
    evaluations0 = model.evaluations
    bar_rows = spend.error_bar_rows if spend else None
    objective = Objective(
        calibration=reference_set(model, cal, reference_nfe=reference_nfe, cache_dir=cache_dir, max_rows=max_rows, log=log, key=key, probe=probe,
                                  t_start=t_start, error_bar_rows=bar_rows, teacher=spend is not None),
        heldout=reference_set(model, held, reference_nfe=reference_nfe, cache_dir=cache_dir, max_rows=max_rows, log=log, key=key, probe=probe,
                              t_start=t_start, error_bar_rows=bar_rows),
        metric=metric or rmse, metric_name=metric_name or (getattr(metric, "__name__", "custom") if metric else "rmse"),
    )
    reference_evaluations = model.evaluations - evaluations0  # 0 when the references came from the cache
    teacher = objective.calibration.teacher
    if teacher is not None and nfe < len(teacher.times):
        # a budgeted search also starts from the grid of least summed first-order miss along its references' trajectories (GITS)
        config = dataclasses.replace(config, seed_grids=(("gits", gits_times(teacher, nfe)),))
    space, best, report = run_search(model, objective, config, t_start=t_start, state_path=state, on_generation=on_generation, log=log,
                                     key=key, probe=probe)

    plan = space.schedule(best, name=f"searched-{model.name}-nfe{nfe}")
    base = report.baseline
    base_plan = seed_plan(base["preset"], base["options"], base["spacing"], model.schedule, nfe, space.t_start, dict(config.seed_grids)) if base else None
    if base_plan is not None and base["calibration_error"] < report.best_calibration:
        # a seed the space cannot express (or not evaluated as a candidate) won: return it rather than something worse
        plan, report.best_calibration = base_plan.replace(name=f"searched-{model.name}-nfe{nfe}"), float(base["calibration_error"])
    # a budgeted search's grid-phase finalist (the best seed's strategies on a tuned grid): returned
    # instead when it is better on the held-out noises (the evolved strategies overfitted a few noises)
    grid_plan = (space.schedule(report.grid_best, name=f"searched-{model.name}-nfe{nfe}")
                 if report.grid_best is not None and report.grid_best != best else None)
    # and its polished finalist (grid and corrections fitted to the final error on the calibration noises)
    pol = report.polished
    polished_plan = pol.plan(space, name=f"searched-{model.name}-nfe{nfe}") if pol is not None and pol.error < pol.start_error else None
    named = {"search": plan, "baseline": base_plan, "grid_phase": grid_plan, "polished": polished_plan}
    named = {k: p for k, p in named.items() if p is not None}
    held_samples, cost = evaluate_plans(model, list(named.values()), held, max_rows=max_rows)
    held_errors = dict(zip(named, (objective.error(x, "heldout") for x in held_samples)))
    report.best_heldout = held_errors["search"]
    report.baseline_heldout = held_errors.get("baseline")
    finalists = {k: e for k, e in held_errors.items() if k != "baseline"}
    chosen = min(finalists, key=lambda k: (finalists[k], k != "search"))
    calibration_of = {"search": report.best_calibration, "grid_phase": report.grid_best_calibration, "polished": pol.error if pol else None}
    plan, report.best_calibration, report.best_heldout = named[chosen], float(calibration_of[chosen]), finalists[chosen]  # type: ignore[arg-type]
    if objective.calibration.error_bar > 0.2 * report.best_calibration and log:
        log(f"search: the references' error bar ({objective.calibration.error_bar:.3g}) is more than a fifth of the best error "
            f"({report.best_calibration:.3g}): raise reference_nfe")
    meta = {
        "model": key, "schedule_fingerprint": schedule_fingerprint(model.schedule), "nfe": nfe,
        "objective": objective.metric_name, "fewstep_version": __version__, "seed": seed,
        "calibration": {"noises": int(cal.shape[0]), "noise_seed": noise_seed if calibration is None else None, "error": report.best_calibration},
        "heldout": {"noises": int(held.shape[0]), "error": report.best_heldout, "finalists": finalists,
                    "chosen": chosen},
        "reference": {"method": objective.calibration.method, "error_bar": objective.calibration.error_bar},
        "baseline": {**base, "heldout_error": report.baseline_heldout} if base else None,
        "budget": {"budget": cap, "generations": len(report.history), "population": config.population, "offspring": config.offspring,
                   "race": config.race, "raced_out": report.history[-1].get("raced_out", 0) if report.history else 0,
                   "polish": ({"iterations": pol.iterations, "start_error": pol.start_error, "error": pol.error,
                               "model_evaluations": pol.cost.evaluations} if pol is not None else None),
                   "model_calls": report.calls + cost.calls, "model_evaluations": report.evaluations + cost.evaluations,
                   "reference_evaluations": reference_evaluations, "probe_evaluations": probe.evaluations,
                   "charged_evaluations": (probe.evaluations + spend.reserved["calibration_references"] + spend.reserved["heldout_references"]
                                           + report.evaluations + cost.evaluations if spend else None),
                   "search_wall_s": round(report.wall_s, 2)},
    }
    plan = plan.replace(meta={"search": meta})
    return (plan, report) if return_report else plan

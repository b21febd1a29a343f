"""The search at the field's cost (issue 26): ``fewstep.search(model, nfe, budget=30_000)`` against the best
preset at its best grid and against a grid-only optimiser of the same budget, on noises the search never saw.

Per target and NFE (default: the bundled digits networks and the 3072-d oracle, NFE 4, 5, 6, 8, 10):

* **best preset**: every deterministic seed preset of the long search
  (``fewstep.schedule_search.engine.SEED_PRESETS``) on every seed grid (logistic, quadratic, uniform_t,
  uniform_lambda, karras; diffusers' leading / leading_multistep / trailing on ``DiscreteVP``) run on the
  judge noises, the best kept (chosen on the judge noises themselves: a bar that favours the presets);
* **default**: ``fewstep.sample(model, x_T, nfe=N)`` with the model's tuned schedules removed;
* **budgeted search**: ``fewstep.search(model, N, budget=B, noise_seed=101)``: its own calibration and
  held-out noises (seed 101, never the judge's), everything it spends charged to ``B``; the details
  table gives what its last phase, the polish (Levenberg-Marquardt on the grid and IIA-form corrections),
  did to the calibration error and which finalist the held-out check returned;
* **grid-only**: Nelder-Mead (scipy) on the grid logits of the default call's solver, started from the
  default grid, on the same calibration noises and references as the search, for as many evaluations as
  the search's share of ``B`` buys (the issue's "plain Nelder-Mead on one preset's time gaps").

Errors are RMSE on the judge noises (``targets.build(tid, batch, "judge")``: seed 0) against their
reference (oracles: DOP853; networks: UniPC at NFE 400); ratios are to the best preset. Bars (issue 26):
search / best preset <= 0.7 at NFE 4-6 and <= 0.85 at NFE 8-10, and search <= grid-only.

    python benchmarks/search_budget.py                                   # -> reports/search_budget.md (+ .json)
    python benchmarks/search_budget.py --targets digits-vp-eps --nfe 5 --budget 30000
    python benchmarks/search_budget.py --targets val-unet16-edm gmm-d1024@flow-shift3 --out reports/search_budget_heldout.md

Nothing is asserted; the figures are measured, with the machine they were measured on.
"""

from __future__ import annotations

import _common  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

import argparse
import json
import math
import time
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize

import fewstep
from fewstep.defaults import default_call
from fewstep.metrics import rmse
from fewstep.report import markdown_table
from fewstep.schedule_search import Space, evaluate_plans, reference_set
from fewstep.schedule_search.budget import plan_budget
from fewstep.schedule_search.engine import DISCRETE_SEED_SPACINGS, SEED_PRESETS, SEED_SPACINGS, seed_plan
from fewstep.schedule_search.objective import Objective

from _common import CACHE, REPORTS, log, report_header, set_threads, write_text_atomic
import targets as T

TARGETS = ("digits-vp-eps", "digits-flow", "digits-edm", "gmm-d3072@vp")
NFES = (4, 5, 6, 8, 10)
SEARCH_NOISE_SEED = 101
SEARCH_CACHE = CACHE / "search_budget"


def bar(nfe: int) -> float:
    return 0.7 if nfe <= 6 else 0.85


def judge_error(t: Any, plan: fewstep.SolverSchedule) -> float:
    x = fewstep.sample(t.model, t.x_T, plan)
    return float(rmse(x, t.ref)) if bool(torch.isfinite(x).all()) else math.inf


def best_preset(t: Any, nfe: int) -> dict[str, Any]:
    """Every seed preset on every seed grid on the judge noises (batched), the best one."""
    spacings = SEED_SPACINGS + (DISCRETE_SEED_SPACINGS if isinstance(t.sched, fewstep.DiscreteVP) else ())
    plans, labels = [], []
    t_start = float(t.sched.t_max)
    for name, opts in SEED_PRESETS:
        for sp in spacings:
            try:
                plan = seed_plan(name, dict(opts), sp, t.sched, nfe, t_start)
            except (fewstep.FewstepError, ValueError):
                continue
            if plan.nfe == nfe:
                plans.append(plan)
                labels.append((name, dict(opts), sp))
    samples, _ = evaluate_plans(t.model, plans, t.x_T, max_rows=4096)
    errors = [float(rmse(x, t.ref)) if bool(torch.isfinite(x).all()) else math.inf for x in samples]
    i = int(np.argmin(errors))
    name, opts, sp = labels[i]
    return {"preset": name, "options": opts, "spacing": sp, "error": errors[i], "plans": len(plans)}


def grid_only(model: fewstep.Model, nfe: int, budget: int) -> tuple[fewstep.SolverSchedule, dict[str, Any]]:
    """Nelder-Mead on the default solver's grid logits, the search's calibration noises and references,
    ``plan_budget(budget, nfe).search`` model rows (the search's own share)."""
    shape = tuple(model.sample_shape)
    spend = plan_budget(budget, nfe)
    cal = fewstep.initial_noise(model.schedule, (spend.n_calibration, *shape), SEARCH_NOISE_SEED, indices=range(spend.n_calibration))
    objective = Objective(reference_set(model, cal, reference_nfe=spend.reference_nfe, cache_dir=SEARCH_CACHE,
                                        error_bar_rows=spend.error_bar_rows))
    name, opts = default_call(model.schedule, nfe, math.prod(shape), model.prediction)
    start = fewstep.preset(name, nfe, model.schedule, **opts)
    space = Space(model.schedule, nfe)
    cand = space.from_schedule(start)
    if cand is None:
        raise RuntimeError(f"the default plan {start.name} is not a search candidate")
    evals = spend.search // (spend.n_calibration * nfe)
    seen: dict[tuple[float, ...], float] = {}

    def loss(z: np.ndarray) -> float:
        key = tuple(np.round(z, 12))
        if key not in seen:
            plan = space.schedule(type(cand)(cand.genes, tuple(float(v) for v in z)))
            (x,), _ = evaluate_plans(model, [plan], cal)
            seen[key] = objective.error(x)
        return seen[key]

    z0 = np.asarray(cand.z)
    res = minimize(loss, z0, method="Nelder-Mead", options={"maxfev": evals, "xatol": 1e-4, "fatol": 1e-7, "initial_simplex":
                                                              np.vstack([z0] + [z0 + 0.5 * np.eye(len(z0))[i] for i in range(len(z0))])})
    best = min(seen, key=seen.get)  # type: ignore[arg-type]
    plan = space.schedule(type(cand)(cand.genes, best), name=f"grid-only-{name}-nfe{nfe}")
    return plan, {"function_evaluations": len(seen), "calibration_error": seen[best], "start_error": seen.get(tuple(np.round(z0, 12))),
                  "rows": len(seen) * spend.n_calibration * nfe, "success": bool(res.success)}


def run_cell(t: Any, nfe: int, budget: int) -> dict[str, Any]:
    rec: dict[str, Any] = {"nfe": nfe}
    t0 = time.perf_counter()
    rec["best_preset"] = best_preset(t, nfe)
    rec["best_preset_s"] = time.perf_counter() - t0
    rec["default"] = float(rmse(fewstep.sample(t.model, t.x_T, nfe=nfe), t.ref))
    t.model.reset_counters()
    t0 = time.perf_counter()
    plan, report = fewstep.search(t.model, nfe, budget=budget, noise_seed=SEARCH_NOISE_SEED, cache_dir=SEARCH_CACHE, return_report=True)
    rec["search_s"] = time.perf_counter() - t0
    meta = plan.meta["search"]
    counted = t.model.evaluations
    rec["search"] = {"error": judge_error(t, plan), "counted_rows": counted, "charged_rows": meta["budget"]["charged_evaluations"],
                     "calibration_error": meta["calibration"]["error"], "heldout_error": meta["heldout"]["error"],
                     "baseline": {k: meta["baseline"][k] for k in ("preset", "options", "spacing")} if meta["baseline"] else None,
                     "noises": meta["calibration"]["noises"], "reference_nfe": plan_budget(budget, nfe).reference_nfe,
                     "generations": meta["budget"]["generations"], "raced_out": meta["budget"]["raced_out"],
                     "reference_error_bar": meta["reference"]["error_bar"], "chosen": meta["heldout"]["chosen"],
                     "finalists": meta["heldout"]["finalists"], "polish": meta["budget"]["polish"], "plan": plan.to_dict()}
    t0 = time.perf_counter()
    gplan, ginfo = grid_only(t.model, nfe, budget)
    rec["grid_only_s"] = time.perf_counter() - t0
    rec["grid_only"] = {"error": judge_error(t, gplan), **ginfo}
    b = rec["best_preset"]["error"]
    rec["ratios"] = {"default": rec["default"] / b, "search": rec["search"]["error"] / b, "grid_only": rec["grid_only"]["error"] / b}
    return rec


def _polish_cell(p: dict[str, Any] | None) -> str:
    return f"{p['error'] / p['start_error']:.3f} ({p['model_evaluations']:,})" if p else "-"


def _chosen_cell(s: dict[str, Any]) -> str:
    f = s.get("finalists") or {}
    if not f or "chosen" not in s:
        return "-"
    return f"{s['chosen']} ({f[s['chosen']] / f['search']:.3f})"


def write_report(results: dict[str, dict[int, dict[str, Any]]], args: argparse.Namespace, wall: float, path: str) -> None:
    lines = report_header("Search at the field's cost: `fewstep.search(model, N, budget=B)` vs the best preset and a grid-only optimiser",
                          "search_budget.py", None, wall)
    lines += [__doc__.split("\n\n")[1].strip(), "",
              f"Budget B = {args.budget:,} sample-evaluations per (target, NFE), everything charged (references, probe, held-out check). "
              "Errors are judge-noise RMSE; ratios are to the best preset at its best grid (< 1: better).", ""]
    head = ["target", "NFE", "best preset (grid)", "its RMSE", "default", "budgeted search", "grid-only (same budget)",
            "search rows (charged)", "search s", "bar"]
    rows, misses, worse_than_grid = [], [], []
    for tid, cells in results.items():
        for nfe, r in sorted(cells.items()):
            bp, ra = r["best_preset"], r["ratios"]
            ok = ra["search"] <= bar(nfe)
            if not ok:
                misses.append(f"{tid} NFE {nfe}: {ra['search']:.2f} (bar {bar(nfe)})")
            if ra["search"] > ra["grid_only"]:
                worse_than_grid.append(f"{tid} NFE {nfe}: {ra['search']:.2f} vs {ra['grid_only']:.2f}")
            label = bp["preset"] + "".join(f",{k}={v}" for k, v in bp["options"].items())
            rows.append([tid, nfe, f"{label} ({bp['spacing']})", f"{bp['error']:.4g}", f"{ra['default']:.3f}", f"**{ra['search']:.3f}**" if not ok else f"{ra['search']:.3f}",
                         f"{ra['grid_only']:.3f}", f"{r['search']['charged_rows']:,}", f"{r['search_s']:.0f}", bar(nfe)])
    lines += ["## Results", "", markdown_table(head, rows), ""]
    n = sum(len(c) for c in results.values())
    lines += ["## Headline", "",
              f"- bar (search / best preset <= 0.7 at NFE 4-6, <= 0.85 at NFE 8-10) met in {n - len(misses)} of {n} cells"
              + (f"; missed: {'; '.join(misses)}" if misses else ""),
              f"- search worse than the grid-only optimiser of the same budget in {len(worse_than_grid)} of {n} cells"
              + (f": {'; '.join(worse_than_grid)}" if worse_than_grid else ""),
              f"- geometric mean ratio: search {math.exp(np.mean([math.log(r['ratios']['search']) for c in results.values() for r in c.values()])):.3f}, "
              f"grid-only {math.exp(np.mean([math.log(r['ratios']['grid_only']) for c in results.values() for r in c.values()])):.3f}, "
              f"default {math.exp(np.mean([math.log(r['ratios']['default']) for c in results.values() for r in c.values()])):.3f}", ""]
    lines += ["## Search details", "", markdown_table(
        ["target", "NFE", "calibration noises", "reference NFE (error bar)", "generations", "raced out", "counted rows", "search's own held-out / calibration",
         "polish: calibration error after / before (rows)", "finalist returned (held-out error / search's)", "grid-only evaluations", "seed it beat"],
        [[tid, nfe, r["search"]["noises"], f"{r['search']['reference_nfe']} ({r['search']['reference_error_bar']:.2g})", r["search"]["generations"],
          r["search"]["raced_out"], f"{r['search']['counted_rows']:,}", f"{r['search']['heldout_error'] / r['search']['calibration_error']:.2f}",
          _polish_cell(r["search"].get("polish")), _chosen_cell(r["search"]), r["grid_only"]["function_evaluations"],
          (r["search"]["baseline"] or {}).get("preset", "") + " (" + str((r["search"]["baseline"] or {}).get("spacing", "")) + ")"]
         for tid, cells in results.items() for nfe, r in sorted(cells.items())]), ""]
    write_text_atomic(REPORTS / path, "\n".join(lines))
    write_text_atomic(REPORTS / path.replace(".md", ".json"), json.dumps(results, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=list(TARGETS))
    ap.add_argument("--nfe", nargs="+", type=int, default=list(NFES))
    ap.add_argument("--budget", type=int, default=30_000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="search_budget.md")
    ap.add_argument("--merge", action="store_true", help="keep the other targets' results of the report's JSON (a run split in parts)")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    t_all = time.perf_counter()
    results: dict[str, dict[int, dict[str, Any]]] = {}
    old = REPORTS / args.out.replace(".md", ".json")
    if args.merge and old.is_file():
        results = {tid: {int(n): r for n, r in cells.items()} for tid, cells in json.loads(old.read_text()).items() if tid not in args.targets}
    for tid in args.targets:
        t = T.build(tid, T.default_batch(tid, "judge"), "judge")
        t.model.sample_shape = tuple(t.x_T.shape[1:])
        t.model.identity = t.model.identity or f"bench:{tid}"
        results[tid] = {}
        for nfe in args.nfe:
            log(f"[{tid}] NFE {nfe} ...")
            results[tid][nfe] = run_cell(t, nfe, args.budget)
            r = results[tid][nfe]["ratios"]
            log(f"[{tid}] NFE {nfe}: search {r['search']:.3f}, grid-only {r['grid_only']:.3f}, default {r['default']:.3f}")
            write_report(results, args, time.perf_counter() - t_all, args.out)
    write_report(results, args, time.perf_counter() - t_all, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

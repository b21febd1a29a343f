"""Which adaptation to use when (issue 26): the cost / quality frontier of every per-model adaptation
fewstep has, on an exact oracle and a network.

    python benchmarks/adaptation.py --threads 1                       # -> reports/adaptation.md (+ .json, .png)
    python benchmarks/adaptation.py --targets gmm-d64@vp --nfe 5 --threads 1

Per target (default ``digits-vp-eps`` and ``gmm-d64@vp``) and NFE (default 5 and 8), every method is
one point: **x** = sample-evaluations (model rows) spent adapting to this model (0 for the static
rules), **y** = judge RMSE / RMSE of the best preset at its best grid on the same noises (< 1: better
than every preset on every grid, chosen on the very noises it is judged on). The methods:

* **static default**: ``fewstep.sample(model, x_T, nfe=N)``, the model's shipped schedules removed;
* **DMN**: the default solver on ``spacing="dmn"``, and DDIM / DPM-Solver++(2M) / DPM-Solver++(3M) on
  their order-matched ``dmn1`` / ``dmn2`` / ``dmn3`` (no model call: docs/time-grids.md);
* **GITS**: ``fewstep.fit_gits(model, N, solver, n_calibration=64, seed=101)`` (the grid of least summed
  first-order miss along 64 UniPC teacher solves, by dynamic programming) with the default call's
  solver and with DPM-Solver++(2M); x = the teacher solves' evaluations;
* **autotune**: ``fewstep.sample(model, x_T, nfe=N, autotune=True)`` (its own noises, seed 918273);
  x = the tuning's evaluations;
* **IIA**: ``fewstep.fit_iia(model, plan, n_calibration=64, seed=101)`` on DDIM, DPM-Solver++(2M) and
  the default plan with the paper's step target, and on the default plan with the trajectory target;
  x = ``plan.meta["iia"]["model_evaluations"]``;
* **DPM-Solver-v3**: statistics from ``fewstep.model_statistics(model, n_samples, n_times, seed=1)``
  (cached like ``dpm_solver_v3.py``'s), then ``fewstep.sample(model, x_T, "dpm_solver_v3", nfe=N,
  statistics=stats)``; x = the statistics' JVP rows (one statistics file serves every NFE; a JVP
  row costs more wall time than a plain evaluation);
* **budgeted search**: ``fewstep.search(model, N, budget=B, noise_seed=101)``; x = the evaluations
  charged to ``B`` (references counted);
* **long search** (``budget=None``): on an oracle run here (256 + 256 noises of seed 101); on a
  bundled network the shipped schedule (``fewstep.zoo.tuned_schedules``), x = its recorded model
  evaluations plus its references as a budget would charge them (``1.5 x 200`` per calibration and
  held-out noise; they were read from a cache when it was made). The shipped schedules were
  calibrated on seed-0 noises 0..255, which include the judge noises, so on a network every method
  is also measured on **fresh** noises (seed 0, indices 256..319, in the shipped schedules'
  held-out set) against their own UniPC-400 reference and best preset, and the long search's point
  is its fresh ratio.

The best preset is ``search_budget.best_preset`` (every seed preset of the long search on every seed
grid, the best on the judge noises). Nothing is asserted; the figures are measured, with the machine.
"""

from __future__ import annotations

import _common  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

import argparse
import json
import math
import tempfile
import time
import warnings
from types import SimpleNamespace
from typing import Any

import torch

import fewstep
from fewstep.metrics import rmse
from fewstep.report import markdown_table

import quality as Q
import targets as T
from _common import CACHE, REPORTS, log, report_header, set_threads, write_text_atomic
from dpm_solver_v3 import _statistics
from search_budget import best_preset

TARGETS = ("digits-vp-eps", "gmm-d64@vp")
NFES = (5, 8)
BUDGETS = (10_000, 30_000)
V3_SETTINGS = {"gmm-d64@vp": [(64, 1201), (256, 1201)], "digits-vp-eps": [(64, 121), (256, 121)]}
V3_SEED = 1
NOISE_SEED = 101  # search and IIA calibration noises: never the judge's (seed 0)
IIA_BASES = (("DDIM", "ddim"), ("DPM++(2M)", "dpmpp_2m"), ("default", None))
DMN = (("default solver, dmn", None, "dmn"), ("ddim, dmn1", "ddim", "dmn1"), ("dpmpp_2m, dmn2", "dpmpp_2m", "dmn2"),
       ("dpmpp_3m, dmn3", "dpmpp_3m", "dmn3"))
FRESH = range(256, 320)  # seed-0 indices outside the shipped schedules' calibration noises (0..255)
LONG_NOISES = 256  # the long search's own default (256 calibration + 256 held-out)
WORK = CACHE / "adaptation"
FAMILIES = ("static default", "DMN", "GITS", "autotune", "IIA", "DPM-Solver-v3", "budgeted search", "long search")
#: fewstep.fit_gits's solvers: the default call's and DPM-Solver++(2M)
GITS_SOLVERS = (("default solver", None), ("dpmpp_2m", "dpmpp_2m"))


def _finite_rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(rmse(x.to(torch.float64), ref)) if bool(torch.isfinite(x).all()) else math.inf


class Judge:
    """One noise set with its reference and best preset per NFE."""

    def __init__(self, name: str, model: fewstep.Model, sched: Any, x_T: torch.Tensor, ref: torch.Tensor, nfes: tuple[int, ...]) -> None:
        self.name, self.x_T, self.ref = name, x_T, ref
        ns = SimpleNamespace(model=model, sched=sched, x_T=x_T, ref=ref)
        self.best: dict[int, dict[str, Any]] = {}
        for n in nfes:
            t0 = time.perf_counter()
            self.best[n] = best_preset(ns, n)
            self.best[n]["wall_s"] = time.perf_counter() - t0
            bp = self.best[n]
            log(f"  [{name}] NFE {n}: best preset {bp['preset']} {bp['options']} ({bp['spacing']}) {bp['error']:.4g}")

    def error(self, model: fewstep.Model, plan: fewstep.SolverSchedule) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return _finite_rmse(fewstep.sample(model, self.x_T, plan), self.ref)


def fresh_judge(t: Any, nfes: tuple[int, ...]) -> Judge:
    """A network's second noise set (seed 0, indices 256..319) with a cached UniPC-400 reference."""
    x = fewstep.initial_noise(t.sched, (len(FRESH), *t.model.sample_shape), 0, indices=FRESH, dtype=torch.float64)
    path = CACHE / f"ref-net-{t.name}-{T.network_sha(t.name)}-i{FRESH.start}-{FRESH.stop - 1}-s0-unipc{T.NETWORK_REF_NFE}.npy"

    def compute() -> tuple[torch.Tensor, dict[str, Any]]:
        chk = fewstep.check_fine_reference(t.model, x, nfe=T.NETWORK_REF_NFE)
        return chk.solution, {"rms_change": chk.rms_change, "method": chk.method}

    log(f"[{t.name}] fresh noises: reference ...")
    ref, _, _ = Q._cached(path, tuple(x.shape), compute)
    return Judge("fresh", t.model, t.sched, x, ref, nfes)


def point(family: str, label: str, x: float, plan: fewstep.SolverSchedule | None, wall: float, judges: list[Judge], model: fewstep.Model,
          nfe: int, **extra: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {"family": family, "label": label, "evaluations": int(x), "wall_s": round(wall, 2), **extra}
    if plan is not None:
        rec["plan"] = plan.name
        for j in judges:
            err = j.error(model, plan)
            rec[f"{j.name}_rmse"] = err
            rec[f"{j.name}_ratio"] = err / j.best[nfe]["error"]
    return rec


def run_cell(t: Any, nfe: int, judges: list[Judge], stats: list[tuple[int, int, Any]], budgets: tuple[int, ...], shipped: dict[int, Any],
             long_search: bool) -> list[dict[str, Any]]:
    model, sched = t.model, t.sched
    pts: list[dict[str, Any]] = []
    dtype = torch.float64 if t.kind == "oracle" else None

    def add(family: str, label: str, x: float, plan: Any, wall: float, **extra: Any) -> None:
        rec = point(family, label, x, plan, wall, judges, model, nfe, **extra)
        pts.append(rec)
        log(f"[{t.name}] NFE {nfe} {label}: x {rec['evaluations']:,}, judge ratio {rec.get('judge_ratio', float('nan')):.3f}"
            + (f", fresh {rec['fresh_ratio']:.3f}" if "fresh_ratio" in rec else "") + f" ({wall:.0f} s)")

    # static rules
    _, info = fewstep.sample(model, t.x_T[:2], nfe=nfe, return_info=True)
    default_plan = info.plan
    add("static default", "static default (" + default_plan.name + ")", 0, default_plan, 0.0)
    for label, solver, spacing in DMN:
        args = (model, t.x_T[:2]) if solver is None else (model, t.x_T[:2], solver)
        _, info = fewstep.sample(*args, nfe=nfe, spacing=spacing, return_info=True)
        add("DMN", "DMN: " + label, 0, info.plan, 0.0)

    # GITS: the grid of least summed DDIM miss along 64 teacher solves
    for label, solver in GITS_SOLVERS:
        t0 = time.perf_counter()
        plan = fewstep.fit_gits(model, nfe, solver, n_calibration=64, seed=NOISE_SEED, dtype=dtype)
        add("GITS", f"GITS grid, {label}", plan.meta["gits"]["model_evaluations"], plan, time.perf_counter() - t0)

    # autotune
    t0 = time.perf_counter()
    _, info = fewstep.sample(model, t.x_T[:2], nfe=nfe, return_info=True, autotune=fewstep.AutotuneOptions(cache_dir=WORK / "autotune"))
    tune = info.extra["autotune"]
    add("autotune", f"autotune (chose {tune['choice']})", tune["tuning_evaluations"], info.plan, float(tune["tuning_wall_s"]),
        samples=tune["samples"], reference_nfe=tune["reference_nfe"], cached=tune["cached"],
        tuning_wall_s=tune["tuning_wall_s"])

    # IIA
    for label, solver in IIA_BASES:
        args = (model, t.x_T[:2]) if solver is None else (model, t.x_T[:2], solver)
        _, info = fewstep.sample(*args, nfe=nfe, return_info=True)
        base = info.plan
        base_errors = {j.name: j.error(model, base) for j in judges}
        for target in (("step", "trajectory") if solver is None else ("step",)):
            t0 = time.perf_counter()
            plan = fewstep.fit_iia(model, base, n_calibration=64, seed=NOISE_SEED, target=target, dtype=dtype)
            wall = time.perf_counter() - t0
            meta = plan.meta["iia"]
            add("IIA", f"IIA-{label} ({target})", meta["model_evaluations"], plan, wall, base=base.name,
                base_ratios={k: v / next(j for j in judges if j.name == k).best[nfe]["error"] for k, v in base_errors.items()})

    # DPM-Solver-v3
    for n_samples, n_times, st in stats:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            _, info = fewstep.sample(model, t.x_T[:2], "dpm_solver_v3", nfe=nfe, statistics=st, return_info=True)
        add("DPM-Solver-v3", f"DPM-Solver-v3, statistics {n_samples} x {n_times}", st.cost["jvps"], info.plan,
            float(st.cost["wall_s"]), model_calls=st.cost["model_calls"], statistics_wall_s=st.cost["wall_s"])

    # search
    for b in budgets:
        t0 = time.perf_counter()
        plan = fewstep.search(model, nfe, budget=b, noise_seed=NOISE_SEED, cache_dir=WORK / "search")
        m = plan.meta["search"]
        add("budgeted search", f"search, budget {b:,}", m["budget"]["charged_evaluations"], plan, time.perf_counter() - t0,
            calibration_noises=m["calibration"]["noises"], heldout_over_calibration=m["heldout"]["error"] / m["calibration"]["error"])
    if shipped.get(nfe) is not None:
        plan = shipped[nfe]
        m = plan.meta["search"]
        ref_rows = int(1.5 * 200 * (m["calibration"]["noises"] + m["heldout"]["noises"]))
        x = m["budget"]["model_evaluations"] + max(m["budget"]["reference_evaluations"], ref_rows)
        add("long search", "long search (shipped schedule)", x, plan, m["budget"]["search_wall_s"], recorded_model_evaluations=m["budget"]["model_evaluations"],
            recorded_reference_evaluations=m["budget"]["reference_evaluations"], charged_references=ref_rows,
            calibration_noises=m["calibration"]["noises"], heldout_noises=m["heldout"]["noises"], in_sample_on_judge=True)
    elif long_search:
        t0 = time.perf_counter()
        e0 = model.evaluations
        with tempfile.TemporaryDirectory() as tmp:  # references computed, so counted
            plan = fewstep.search(model, nfe, budget=None, n_calibration=LONG_NOISES, n_heldout=LONG_NOISES, noise_seed=NOISE_SEED, cache_dir=tmp)
        m = plan.meta["search"]
        add("long search", f"long search ({LONG_NOISES} + {LONG_NOISES} noises)", model.evaluations - e0, plan, time.perf_counter() - t0,
            recorded=m["budget"], heldout_over_calibration=m["heldout"]["error"] / m["calibration"]["error"])
    for p in pts:
        p["y"] = p["fresh_ratio"] if p["family"] == "long search" and "fresh_ratio" in p else p["judge_ratio"]
    return pts


def frontier(pts: list[dict[str, Any]], key: str = "y") -> list[dict[str, Any]]:
    """The points no cheaper-or-equal point beats: sorted by cost, each lower than all before it."""
    out: list[dict[str, Any]] = []
    for p in sorted(pts, key=lambda p: (p["evaluations"], p[key])):
        if not out or p[key] < out[-1][key]:
            out.append(p)
    return out


COLORS = {"static default": "black", "DMN": "tab:gray", "GITS": "tab:brown", "autotune": "tab:orange", "IIA": "tab:green", "DPM-Solver-v3": "tab:purple",
          "budgeted search": "tab:blue", "long search": "tab:red"}
MARKERS = {"static default": "s", "DMN": "v", "GITS": "X", "autotune": "D", "IIA": "^", "DPM-Solver-v3": "P", "budgeted search": "o", "long search": "*"}
ZERO_X = 30.0  # where the free methods sit on the log axis


def plot(results: dict[str, dict[int, list[dict[str, Any]]]], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [(tid, n) for tid, c in results.items() for n in sorted(c)]
    cols = max(len(c) for c in results.values())
    fig, axes = plt.subplots(len(results), cols, figsize=(5.2 * cols, 4.0 * len(results)), squeeze=False)
    for (tid, n), ax in zip(cells, [a for row in axes for a in row]):
        pts = results[tid][n]
        for fam in FAMILIES:
            fp = [p for p in pts if p["family"] == fam]
            if fp:
                ax.scatter([max(p["evaluations"], ZERO_X) for p in fp], [p["y"] for p in fp], c=COLORS[fam], marker=MARKERS[fam],
                           s=90 if fam == "long search" else 40, label=fam, zorder=3, alpha=0.85)
        fr = frontier(pts)
        ax.step([max(p["evaluations"], ZERO_X) for p in fr] + [3e6], [p["y"] for p in fr] + [fr[-1]["y"]], where="post", color="k",
                lw=0.8, ls=":", zorder=2)
        ax.axhline(1.0, color="tab:red", lw=0.8, ls="--", zorder=1)
        ax.set_xscale("log")
        ax.set_xlim(ZERO_X / 2, 3e6)
        ticks = [ZERO_X, 1e3, 1e4, 1e5, 1e6]
        ax.set_xticks(ticks)
        ax.set_xticklabels(["0", "1e3", "1e4", "1e5", "1e6"])
        ax.set_title(f"{tid}, NFE {n}", fontsize=10)
        ax.set_xlabel("sample-evaluations spent adapting")
        ax.set_ylabel("RMSE / best preset at its best grid")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle("Cost / quality of per-model adaptation (dotted: the frontier; dashed: the best preset)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict[str, dict[int, list[dict[str, Any]]]], extras: dict[str, Any], argv: list[str], wall: float,
                 machine: list[str] | None = None) -> None:
    lines = report_header("Adaptation: the cost / quality frontier (static default, DMN, GITS, autotune, IIA, DPM-Solver-v3, search)",
                          "adaptation.py", argv, wall)
    if machine is not None:  # re-rendered: the machine and date of the measuring run
        start, end = lines.index("Machine:"), lines.index("", lines.index("Machine:"))
        lines[start:end] = machine
        lines[2] = f"Generated by `python benchmarks/adaptation.py {' '.join(argv)}` in {wall:.0f} s ({extras['_run']['date']}; re-rendered with `--report-only`)."
    machine = lines[lines.index("Machine:"):lines.index("", lines.index("Machine:"))]
    lines += [__doc__.split("\n\n", 2)[2].split("\n\nThe best preset")[0].strip(), "",
              "x: sample-evaluations (model rows) spent adapting to this model at this NFE (DPM-Solver-v3: JVP rows of the statistics, "
              "shared by every NFE). Ratios: RMSE / the best preset's RMSE at its best grid on the same noises (< 1: better). "
              "`y` is the judge ratio, except the shipped long search's, which is its fresh ratio (the judge noises were among its "
              "calibration noises). Wall seconds are this machine's, beside two other benchmark jobs on its two cores: not for comparing.",
              "", "![frontier](adaptation.png)", ""]
    for tid, cells in results.items():
        for n, pts in sorted(cells.items()):
            j = extras[tid]["judges"]
            bp = j["judge"][n]
            lines += [f"## {tid}, NFE {n}", "",
                      f"Best preset on the judge noises: {bp['preset']}{bp['options'] or ''} ({bp['spacing']}), RMSE {bp['error']:.4g}"
                      + (f"; on the fresh noises: {j['fresh'][n]['preset']}{j['fresh'][n]['options'] or ''} ({j['fresh'][n]['spacing']}), "
                         f"RMSE {j['fresh'][n]['error']:.4g}" if "fresh" in j else "") + ".", ""]
            fr = {id(p) for p in frontier(pts)}
            head = ["method", "x (sample-evaluations)", "judge RMSE", "judge ratio"] + (["fresh ratio"] if "fresh" in j else []) + ["y", "frontier", "wall s", "note"]
            rows = []
            for p in pts:
                note = ""
                if "base_ratios" in p:
                    note = "base " + ", ".join(f"{k} {v:.3f}" for k, v in p["base_ratios"].items())
                if p.get("in_sample_on_judge"):
                    note = (f"judge noises in its calibration set; recorded {p['recorded_model_evaluations']:,} model + "
                            f"{p['recorded_reference_evaluations']:,} reference evaluations, references charged {p['charged_references']:,}")
                if "heldout_over_calibration" in p:
                    note = f"its own held-out / calibration {p['heldout_over_calibration']:.2f}"
                if p["family"] == "autotune":
                    note = f"{p['samples']} samples, reference NFE {p['reference_nfe']}" + (" (cached: cost of the tuning run)" if p["cached"] else "")
                rows.append([p["label"], f"{p['evaluations']:,}", f"{p['judge_rmse']:.4g}", f"{p['judge_ratio']:.3f}"]
                            + ([f"{p['fresh_ratio']:.3f}"] if "fresh" in j else [])
                            + [f"**{p['y']:.3f}**" if id(p) in fr else f"{p['y']:.3f}", "yes" if id(p) in fr else "", f"{p.get('tuning_wall_s', p['wall_s']):.0f}", note])
            lines += [markdown_table(head, rows), ""]
    lines += ["## Headline", ""]
    for tid, cells in results.items():
        for n, pts in sorted(cells.items()):
            fr = frontier(pts)
            best = min(pts, key=lambda p: p["y"])
            under = [p for p in sorted(pts, key=lambda p: p["evaluations"]) if p["y"] < 1.0]
            default = next(p for p in pts if p["family"] == "static default")
            text = (f"- **{tid}, NFE {n}**: static default {default['y']:.3f}; best {best['label']} ({best['evaluations']:,}: {best['y']:.3f}); "
                    "frontier " + " -> ".join(f"{p['label']} ({p['evaluations']:,}: {p['y']:.3f})" for p in fr))
            text += (f"; cheapest below the best preset: {under[0]['label']} ({under[0]['evaluations']:,}: {under[0]['y']:.3f})" if under
                     else "; nothing below the best preset")
            lines.append(text)
            if all("fresh_ratio" in p for p in pts):
                lines.append("  - on the fresh noises (every method out of sample, the long search included): "
                             + " -> ".join(f"{p['label']} ({p['evaluations']:,}: {p['fresh_ratio']:.3f})" for p in frontier(pts, "fresh_ratio")))
    fams = {f: [] for f in FAMILIES}
    for cells in results.values():
        for pts in cells.values():
            for f in FAMILIES:
                ys = [p["y"] for p in pts if p["family"] == f]
                if ys:
                    fams[f].append(min(ys))
    lines += ["", "Best point of each method per cell (geometric mean over the cells, then the range):", ""]
    for f, ys in fams.items():
        if ys:
            lines.append(f"- {f}: {math.exp(sum(map(math.log, ys)) / len(ys)):.3f} ({min(ys):.3f}-{max(ys):.3f})")
    lines.append("")
    lines += ["## Targets", ""] + [f"- {tid}: {extras[tid]['describe']}" for tid in results] + [""]
    write_text_atomic(REPORTS / "adaptation.md", "\n".join(lines))
    if "_run" not in extras or lines[2].startswith("Generated by") and "re-rendered" not in lines[2]:
        extras["_run"] = {"argv": argv, "wall_s": wall, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine}
    write_text_atomic(REPORTS / "adaptation.json", json.dumps({"results": results, "extras": extras}, indent=1, default=str))
    try:
        plot(results, REPORTS / "adaptation.png")
    except ImportError as exc:  # matplotlib is optional (the ``report`` extra)
        log(f"no plot: {exc}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=list(TARGETS))
    ap.add_argument("--nfe", nargs="+", type=int, default=list(NFES))
    ap.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS))
    ap.add_argument("--no-long", action="store_true", help="skip the long search on oracles")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--report-only", action="store_true", help="re-render reports/adaptation.md / .png from reports/adaptation.json (no measuring)")
    args = ap.parse_args(argv)
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if args.report_only:
        data = json.loads((REPORTS / "adaptation.json").read_text())
        res = {tid: {int(n): pts for n, pts in cells.items()} for tid, cells in data["results"].items()}
        ext = data["extras"]
        for tid in res:
            ext[tid]["judges"] = {k: {int(n): v for n, v in b.items()} for k, b in ext[tid]["judges"].items()}
        run = ext["_run"]
        write_report(res, ext, run["argv"], run["wall_s"], run.get("machine"))
        return 0
    set_threads(args.threads)
    t_all = time.perf_counter()
    nfes = tuple(args.nfe)
    results: dict[str, dict[int, list[dict[str, Any]]]] = {}
    extras: dict[str, Any] = {}
    for tid in args.targets:
        t = T.build(tid, T.default_batch(tid, "judge"), "judge")
        t.model.sample_shape = tuple(t.x_T.shape[1:])
        t.model.identity = t.model.identity or f"bench:{tid}"
        log(f"[{tid}] best presets ...")
        judges = [Judge("judge", t.model, t.sched, t.x_T, t.ref, nfes)]
        shipped: dict[int, Any] = {}
        if t.kind == "zoo":
            judges.append(fresh_judge(t, nfes))
            shipped = dict(fewstep.zoo.tuned_schedules(tid))
        stats = []
        for n_samples, n_times in V3_SETTINGS.get(tid, []):
            st, cached = _statistics(t, n_samples, n_times, V3_SEED, batch=min(256, n_samples))
            stats.append((n_samples, n_times, st))
        extras[tid] = {"describe": t.describe, "judges": {j.name: j.best for j in judges}}
        results[tid] = {}
        for n in nfes:
            results[tid][n] = run_cell(t, n, judges, stats, tuple(args.budgets), shipped, not args.no_long)
            write_report(results, extras, argv, time.perf_counter() - t_all)
    write_report(results, extras, argv, time.perf_counter() - t_all)
    log(f"done in {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""DPM-Solver-v3 (issue 26): what its empirical model statistics cost, and its error against UniPC and
DPM-Solver++(2M / 3M) on the same grid.

    python benchmarks/dpm_solver_v3.py            # gmm-d64@vp: statistics of 64 / 256 / 1024 samples x 1201 log-SNRs
                                                  #   (1024 x 1201: the reference's CIFAR-10 setting); digits-vp-eps: 64 / 256 x 121;
                                                  #   each target also 256 samples with f' by a second JVP
    python benchmarks/dpm_solver_v3.py --full     # and digits-vp-eps 1024 x 121, gmm-d3072@vp 64 x 241 (slow on a CPU)
    python benchmarks/dpm_solver_v3.py --quick    # gmm-d64@vp: 64 / 256 samples x 241 log-SNRs (a few minutes)

Per target (benchmarks/targets.py: model, the judge noises and their reference solutions), the
statistics are computed by ``fewstep.model_statistics`` from ODE trajectories of keyed noises of seed
``--seed`` (1: not the judge noises, seed 0), cached under ``benchmarks/.cache`` as safetensors (a rerun
reads them and reports the cost measured when they were made). Then RMSE against the reference at
NFE 5, 6, 8, 10 of:

* UniPC (fewstep's ``unipc``: bh2, order 3), UniPC-2 (the default solver), DPM-Solver++(2M) (midpoint)
  and DPM-Solver++(3M) (exact weights), on the grid ``fewstep.sample(model, x, "dpm_solver_v3", ...)``
  uses (the family's logistic grid) and, where it differs, on the default call's (shifted for eps models);
* DPM-Solver-v3 (fewstep's defaults: order 3, the corrector of as many nodes as the predictor, as the
  reference's EDM / score_sde codebases; lower order at the end) on the same grids, with each set of
  statistics (f' by the secant along the trajectory, the default, or by a second JVP); also without
  statistics (its degenerate form l = 1, s = b = 0) and with the README's pseudo-order corrector of
  p + 1 nodes (``corrector_pseudo=True``), with the largest secant statistics.

Benchmarks never assert; the report says what was measured and where.
"""

from __future__ import annotations

import _common  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

import argparse
import hashlib
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import fewstep
from fewstep.defaults import default_grid
from fewstep.identity import model_key
from fewstep.solvers.compile import compile_plan

import targets as T
from _common import CACHE, REPORTS, log, report_header, write_text_atomic

NFES = (5, 6, 8, 10)
#: per target: (samples, log-SNRs, how f' is taken); the last "secant" setting also runs the c = p + 1 corrector
DEFAULT = {"gmm-d64@vp": [(64, 1201, "secant"), (256, 1201, "secant"), (1024, 1201, "secant"), (256, 1201, "jvp")],
           "digits-vp-eps": [(64, 121, "secant"), (256, 121, "secant"), (256, 121, "jvp")]}
FULL = {**DEFAULT, "digits-vp-eps": [(64, 121, "secant"), (256, 121, "secant"), (1024, 121, "secant"), (256, 121, "jvp")],
        "gmm-d3072@vp": [(64, 241, "secant")]}
QUICK = {"gmm-d64@vp": [(64, 241, "secant"), (256, 241, "secant"), (64, 241, "jvp")]}
BASELINES = (("UniPC", "unipc", {}), ("UniPC-2", "unipc", {"order": 2}), ("DPM++(2M)", "dpmpp_2m", {}), ("DPM++(3M)", "dpmpp_3m", {}))


def _statistics(target: Any, n_samples: int, n_times: int, seed: int, batch: int, derivative: str = "secant") -> tuple[fewstep.ModelStatistics, bool]:
    """The target model's statistics, from the cache when it has them (this model's, same estimator)."""
    tag = target.name.replace("@", "-")
    key = model_key(target.model)
    # the file is named by what the model computes too: benchmarks that label the same target differently
    # (adaptation.py sets an identity) keep their own files instead of overwriting each other's
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    path = CACHE / f"ems-{tag}-{digest}-n{n_samples}-t{n_times}-s{seed}-{derivative}.safetensors"
    if path.is_file():
        try:
            st = fewstep.ModelStatistics.load(path)
            if st.model == key and st.settings.get("derivative") == derivative:
                return st, True
        except fewstep.FewstepError as exc:
            log(f"[{target.name}] ignoring cached statistics {path.name}: {exc}")
    log(f"[{target.name}] statistics: {n_samples} samples x {n_times} log-SNRs ...")
    st = fewstep.model_statistics(target.model, n_samples=n_samples, n_times=n_times, seed=seed, batch_size=batch,
                                  dtype=torch.float32 if target.kind == "zoo" else torch.float64, derivative=derivative)
    st.save(path)
    log(f"[{target.name}]   {st.cost}")
    return st, False


def _rmse(target: Any, solver: str, nfe: int, grid: list[float], **opts: Any) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # v3 without statistics says it runs its degenerate form
        x = fewstep.sample(target.model, target.x_T, solver, nfe=nfe, spacing=grid, **opts)
    return fewstep.rmse(x.to(torch.float64), target.ref)


def _label(s: dict[str, Any]) -> str:
    return f"v3 {s['n_samples']}x{s['n_times']}" + (" jvp" if s["derivative"] == "jvp" else "")


def run_target(tid: str, settings: list[tuple[int, int, str]], seed: int, nfes: tuple[int, ...]) -> dict[str, Any]:
    target = T.build(tid, T.default_batch(tid, "judge"), "judge")
    sched = target.model.schedule
    dim = T.dimension(target.model)
    # the grid `fewstep.sample(model, x, "dpm_solver_v3", ...)` uses (the family's logistic grid), and the
    # default call's (shifted for eps models): both when they differ
    choices = {"v3's grid (the family's logistic grid)": default_grid(sched, "dpm_solver_v3", dim, target.model.prediction),
               "the default call's grid (shifted for eps models)": default_grid(sched, "unipc", dim, target.model.prediction)}
    grid_sets = {}
    for label, (name, opts) in choices.items():
        if all((name, opts) != v for v in grid_sets.values()):
            grid_sets[label] = (name, opts)
    stats = []
    for n_samples, n_times, derivative in settings:
        st, cached = _statistics(target, n_samples, n_times, seed, batch=min(256, n_samples), derivative=derivative)
        name, opts = next(iter(grid_sets.values()))
        plan = fewstep.preset("dpm_solver_v3", max(nfes), sched, statistics=st, spacing=name, **opts)
        st._cache.clear()
        t0 = time.perf_counter()
        compile_plan(plan, sched)
        stats.append({"n_samples": n_samples, "n_times": n_times, "derivative": derivative, "stats": st, "cached": cached,
                      "compile_s": time.perf_counter() - t0})
    tables = {}
    for glabel, (gname, gopts) in grid_sets.items():
        grids = {n: [float(t) for t in fewstep.time_grid(sched, n, gname, **gopts)] for n in nfes}
        rows = []
        for n in nfes:
            row: dict[str, Any] = {"nfe": n}
            for label, name, opts in BASELINES:
                row[label] = _rmse(target, name, n, grids[n], **opts)
            row["v3 degenerate"] = _rmse(target, "dpm_solver_v3", n, grids[n])
            for s in stats:
                row[_label(s)] = _rmse(target, "dpm_solver_v3", n, grids[n], statistics=s["stats"])
            big = [s for s in stats if s["derivative"] == "secant"][-1]
            row[_label(big) + " c=p+1"] = _rmse(target, "dpm_solver_v3", n, grids[n], statistics=big["stats"], corrector_pseudo=True)
            rows.append(row)
            log(f"[{tid}] {glabel}, NFE {n}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "nfe"))
        tables[glabel] = {"grid": (gname, gopts), "rows": rows}
    return {"target": target, "tables": tables, "stats": stats}


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def report(results: list[dict[str, Any]], argv: list[str], wall: float, quick: bool) -> str:
    lines = report_header("DPM-Solver-v3: cost of the statistics and RMSE" + (" (quick)" if quick else ""), "dpm_solver_v3.py", argv, wall)
    lines += [
        "DPM-Solver-v3 (Zheng, Lu, Chen & Zhu 2023) against UniPC (orders 3 and 2) and DPM-Solver++(2M / 3M) on the same",
        "grid, RMSE against each target's reference on its judge noises: on the grid `fewstep.sample(model, x, \"dpm_solver_v3\",",
        "statistics=...)` uses (the family's logistic grid) and, where it differs, on the default call's (the default rule",
        "shifts it for eps models). The statistics come from `fewstep.model_statistics` on ODE trajectories of noises of",
        "another seed (docs/mathematics.md, \"DPM-Solver-v3\"), with f' by the secant along the trajectory (the default) or by",
        "a second JVP (`jvp`).",
        "",
        "## Cost of the statistics",
        "",
        "Each sample at each log-SNR costs one Jacobian-vector product (forward-mode AD) for l, whose output also moves the",
        "trajectory; `jvp` adds a second one for the derivative of the model along the ODE. Wall time is on this machine",
        "(CPU, shared); `compile` is building the v3 plan's per-dimension weights at the largest NFE the first time (later",
        "calls reuse them).",
        "",
        "| target | samples | log-SNRs | f' | model calls | JVPs (rows) | wall s | ms per JVP row | compile s | cached |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for res in results:
        for s in res["stats"]:
            c = s["stats"].cost
            per = 1e3 * c["wall_s"] / max(1, c["jvps"])
            lines.append(f"| {res['target'].name} | {s['n_samples']} | {s['n_times']} | {s['derivative']} | {c['model_calls']} | {c['jvps']} | "
                         f"{c['wall_s']:.1f} | {per:.3f} | {s['compile_s']:.2f} | {'yes' if s['cached'] else 'no'} |")
    lines += ["", "Rows marked cached were computed by an earlier run of this command; their cost is what that run measured",
              "(kept in the statistics file's metadata).", "",
              "The reference's settings: 1024 samples x 1201 log-SNRs (EDM CIFAR-10, NFE < 10), 4096 x 1201 (score_sde),",
              "1024 x 121 (EDM at NFE >= 10, LSUN), 1024 x 501 (ImageNet-256 guided), 1024 x 251 (Stable Diffusion).", ""]
    for res in results:
        t = res["target"]
        lines += [f"## {t.name}", "", t.describe, ""]
        for glabel, tab in res["tables"].items():
            name, opts = tab["grid"]
            lines += [f"### On {glabel}: `{name}` {opts}", ""]
            keys = [k for k in tab["rows"][0] if k != "nfe"]
            lines += ["| NFE | " + " | ".join(keys) + " | best v3 / UniPC | best v3 / best UniPC, DPM++ |",
                      "|---:|" + "---:|" * (len(keys) + 2)]
            for row in tab["rows"]:
                v3 = min(v for k, v in row.items() if k.startswith("v3 ") and k != "v3 degenerate" and " jvp" not in k)
                best = min(row["UniPC"], row["UniPC-2"], row["DPM++(2M)"], row["DPM++(3M)"])
                lines.append(f"| {row['nfe']} | " + " | ".join(_fmt(row[k]) for k in keys) + f" | {v3 / row['UniPC']:.3f} | {v3 / best:.3f} |")
            lines.append("")
    lines += ["Columns: `v3 NxT`: DPM-Solver-v3 (defaults: corrector of p nodes) with statistics of N samples x T log-SNRs,",
              "f' by the secant; `jvp`: f' by the second JVP; `c=p+1`: with the pseudo-order corrector of p + 1 nodes instead",
              "(the README's example); `v3 degenerate`: without statistics (l = 1, s = b = 0: DPM-Solver++ with exact weights",
              "plus the corrector). The ratios take the best v3 column with secant statistics (sizes and corrector variants)",
              "at that NFE, against UniPC and against the best of the four baselines.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="gmm-d64@vp with 64 / 256 samples x 241 log-SNRs")
    ap.add_argument("--full", action="store_true", help="add gmm-d3072@vp")
    ap.add_argument("--seed", type=int, default=1, help="seed of the statistics' noises (the judge noises are seed 0)")
    ap.add_argument("--nfes", default=",".join(map(str, NFES)))
    ap.add_argument("--out", type=Path, default=REPORTS / "dpm_solver_v3.md")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL if args.full else DEFAULT
    nfes = tuple(int(v) for v in args.nfes.split(","))
    t0 = time.perf_counter()
    results = [run_target(tid, settings, args.seed, nfes) for tid, settings in plan.items()]
    text = report(results, argv, time.perf_counter() - t0, args.quick)
    write_text_atomic(args.out, text)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""GITS grids (``fewstep.fit_gits``) against the default grid, per solver, on noises they were not fitted on.

Per target and NFE: the default call's solver and DPM-Solver++(2M), each on its default grid and on the
GITS grids of order 1 (the paper's: summed first-order misses) and order 2 (summed second-order
multistep misses), fitted on 64 teacher solves of seed 101 (UniPC at ``max(48, 8 NFE)``); judged on the
judge noises (seed 0) against their reference (oracles: DOP853; networks: UniPC at NFE 400). Ratios:
RMSE on the GITS grid / RMSE of the same solver on its default grid (< 1: the GITS grid is better).

    python benchmarks/gits.py                                   # -> reports/gits.md (+ .json)
    python benchmarks/gits.py --targets gmm-d64@vp --nfe 5 8

Nothing is asserted; the figures are measured, with the machine they were measured on.
"""

from __future__ import annotations

import _common  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

import argparse
import json
import math
import time
from typing import Any

import torch

import fewstep
from fewstep.metrics import rmse
from fewstep.report import markdown_table

import targets as T
from _common import REPORTS, log, report_header, set_threads, write_text_atomic

TARGETS = ("gmm-d64@vp", "gmm-d64@flow", "gmm-d3072@vp", "digits-vp-eps", "digits-flow")
NFES = (5, 6, 8, 10)
SOLVERS = (("default solver", None), ("dpmpp_2m", "dpmpp_2m"))
SEED = 101


def _error(t: Any, x: torch.Tensor) -> float:
    return float(rmse(x.to(torch.float64), t.ref)) if bool(torch.isfinite(x).all()) else math.inf


def run_cell(t: Any, nfe: int) -> dict[str, Any]:
    dtype = torch.float64 if t.kind == "oracle" else None
    rec: dict[str, Any] = {}
    for label, solver in SOLVERS:
        base = fewstep.sample(t.model, t.x_T, solver, nfe=nfe) if solver else fewstep.sample(t.model, t.x_T, nfe=nfe)
        row = {"default_grid": _error(t, base)}
        for order in (1, 2):
            t0 = time.perf_counter()
            plan = fewstep.fit_gits(t.model, nfe, solver, n_calibration=64, seed=SEED, order=order, dtype=dtype)
            row[f"order{order}"] = _error(t, fewstep.sample(t.model, t.x_T, plan))
            row[f"order{order}_ratio"] = row[f"order{order}"] / row["default_grid"]
            row[f"order{order}_cost"] = plan.meta["gits"]["model_evaluations"]
            row[f"order{order}_s"] = round(time.perf_counter() - t0, 2)
            row[f"order{order}_times"] = list(plan.times)
        rec[label] = row
    return rec


def write_report(results: dict[str, dict[int, dict[str, Any]]], wall: float) -> None:
    lines = report_header("GITS grids (`fewstep.fit_gits`) against the default grid", "gits.py", None, wall)
    lines += [__doc__.split("\n\n")[1].strip(), ""]
    rows, ratios = [], {1: [], 2: []}
    for tid, cells in results.items():
        for nfe, rec in sorted(cells.items()):
            for label, row in rec.items():
                rows.append([tid, nfe, label, f"{row['default_grid']:.4g}", f"{row['order1_ratio']:.2f}", f"{row['order2_ratio']:.2f}",
                             f"{row['order1_cost']:,}", f"{row['order1_s']:.1f}"])
                for o in (1, 2):
                    ratios[o].append(row[f"order{o}_ratio"])
    lines += ["## Results", "", markdown_table(["target", "NFE", "solver", "RMSE, default grid", "GITS order 1 / default grid",
                                                 "GITS order 2 / default grid", "fit cost (sample-evaluations)", "fit s"], rows), ""]
    lines += ["## Headline", ""]
    for o in (1, 2):
        r = [v for v in ratios[o] if math.isfinite(v)]
        gm = math.exp(sum(map(math.log, r)) / len(r)) if r else math.nan
        lines.append(f"- order {o}: geometric mean {gm:.2f}, range {min(r):.2f}-{max(r):.2f}, better than the default grid in "
                     f"{sum(v < 1 for v in r)} of {len(ratios[o])} cells")
    lines.append("")
    write_text_atomic(REPORTS / "gits.md", "\n".join(lines))
    write_text_atomic(REPORTS / "gits.json", json.dumps({k: {str(n): v for n, v in c.items()} for k, c in results.items()}, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=list(TARGETS))
    ap.add_argument("--nfe", nargs="+", type=int, default=list(NFES))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    t_all = time.perf_counter()
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for tid in args.targets:
        t = T.build(tid, T.default_batch(tid, "judge"), "judge")
        t.model.sample_shape = tuple(t.x_T.shape[1:])
        results[tid] = {}
        for nfe in args.nfe:
            results[tid][nfe] = run_cell(t, nfe)
            log(f"[{tid}] NFE {nfe}: " + "; ".join(f"{k} o1 {v['order1_ratio']:.2f} o2 {v['order2_ratio']:.2f}" for k, v in results[tid][nfe].items()))
        write_report(results, time.perf_counter() - t_all)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Why autotune misses its target (<= 0.8x the best peer): selection or reach.

Reads a defaults report (``reports/defaults.json`` and / or ``reports/defaults_oracles.json``, made by
``benchmarks/defaults.py``) and, for every cell where ``sample(..., autotune=True)`` was above 0.8x the
best peer at its best grid option, asks two questions on the judge noises (seed 0):

* **selection**: the candidate that was most accurate on autotune's own tuning samples (read back from
  the autotune cache the report filled; a cell whose entry is missing is tuned again, and the JSON's
  ``from_cache`` says which) -- was it kept out by the confidence gate,
  and would it have met 0.8 on the judge noises?
* **reach**: the best of *all* of autotune's candidates chosen with hindsight on the judge noises
  themselves -- does any candidate meet 0.8?

    python benchmarks/autotune_misses.py                         # -> reports/autotune_misses.md (+ .json)
    python benchmarks/autotune_misses.py --reports reports/defaults.json

Nothing is asserted; the figures are measured, with the machine they were measured on. The GITS
candidate's grid depends on the tuning reference; it is judged only when autotune chose it.
"""

from __future__ import annotations

import _common  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import fewstep
from fewstep.autotune import AutotuneOptions, autotune, candidates
from fewstep.report import markdown_table
from fewstep.sample import _teacher_reference, sample

import targets as T
from defaults import best_peer
from _common import REPORTS, log, report_header, set_threads, write_text_atomic

BAR = 0.8
REPORTS_READ = ("defaults.json", "defaults_oracles.json")


def missed_cells(result: dict[str, Any]) -> list[tuple[int, float, float]]:
    """``(nfe, best peer RMSE, autotune / best peer)`` for each cell of one target above the bar."""
    out = []
    for nfe, rec in result["fewstep"]["autotune"].items():
        best = best_peer(result["peers"]["records"], int(nfe))
        if best is not None and isinstance(rec.get("rmse"), (int, float)) and rec["rmse"] / best["rmse"] > BAR:
            out.append((int(nfe), best["rmse"], rec["rmse"] / best["rmse"]))
    return out


def explain(tid: str, cells: list[tuple[int, float, float]]) -> list[dict[str, Any]]:
    t = T.build(tid, T.default_batch(tid, "judge"), "judge")
    shape, dim = tuple(t.x_T.shape[1:]), int(t.x_T[0].numel())
    rows = []
    for nfe, peer, ratio in cells:
        tuned = autotune(t.model, nfe, shape, sample, config=AutotuneOptions(cache_dir=T.CACHE / "autotune"), teacher=_teacher_reference)
        judge: dict[str, float] = {}
        for label, name, opts in candidates(t.sched, nfe, dim, None, t.model.prediction):
            judge[label] = float(fewstep.rmse(fewstep.sample(t.model, t.x_T, name, nfe=nfe, **opts), t.ref)) / peer
        if tuned.label not in judge:  # the GITS grid of the tuning reference
            judge[tuned.label] = float(fewstep.rmse(fewstep.sample(t.model, t.x_T, tuned.preset, nfe=nfe, **tuned.options), t.ref)) / peer
        top = tuned.extra.get("most_accurate")
        best = min(judge, key=judge.__getitem__)
        rows.append({"target": tid, "nfe": nfe, "ratio": ratio, "chosen": tuned.label, "from_cache": tuned.cached,
                     "tuning_best": top, "confidence": tuned.extra.get("confidence"), "tuning_best_on_judge": judge.get(top),
                     "hindsight_best": best, "hindsight_ratio": judge[best], "samples": tuned.samples})
        log(f"[{tid}] NFE {nfe}: {ratio:.2f} ({tuned.label}); tuning best {top}; hindsight {best} {judge[best]:.2f}")
    return rows


def _r(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"


def write_report(rows_by_report: dict[str, list[dict[str, Any]]], wall_s: float, argv: list[str] | None) -> None:
    lines = report_header("Why autotune misses 0.8x the best peer: selection or reach", "autotune_misses.py", argv, wall_s)
    lines += [__doc__.split("\n\n")[1], ""]
    for name, rows in rows_by_report.items():
        reach = sum(r["hindsight_ratio"] <= BAR for r in rows)
        gated = [r for r in rows if r["chosen"] != r["tuning_best"]]
        gated_meets = sum(isinstance(r["tuning_best_on_judge"], float) and r["tuning_best_on_judge"] <= BAR for r in gated)
        lines += [f"## {name}", "",
                  f"{len(rows)} cells above {BAR}. **Reach:** in {len(rows) - reach} of them no candidate meets {BAR} on the judge noises "
                  f"even chosen with hindsight. **Selection:** the gate kept the default over the tuning samples' most accurate "
                  f"candidate in {len(gated)}, of which {gated_meets} would have met {BAR}; in {len(rows) - len(gated)} autotune ran "
                  f"that candidate.", "",
                  markdown_table(["target", "NFE", "autotune / best peer", "chosen", "tuning samples' best (confidence)",
                                  "its ratio on the judge", "best candidate with hindsight", "its ratio"],
                                 [[r["target"], r["nfe"], _r(r["ratio"]), r["chosen"], f"{r['tuning_best']} ({_r(r['confidence'])})",
                                   _r(r["tuning_best_on_judge"]), r["hindsight_best"], _r(r["hindsight_ratio"])] for r in rows]), ""]
    write_text_atomic(REPORTS / "autotune_misses.md", "\n".join(lines))
    write_text_atomic(REPORTS / "autotune_misses.json", json.dumps(rows_by_report, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reports", nargs="+", default=[str(REPORTS / n) for n in REPORTS_READ])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    t0 = time.perf_counter()
    out: dict[str, list[dict[str, Any]]] = {}
    for path in args.reports:
        results = json.loads(Path(path).read_text())["targets"]
        rows: list[dict[str, Any]] = []
        for tid, result in results.items():
            cells = missed_cells(result)
            if cells:
                rows += explain(tid, cells)
        out[Path(path).name] = rows
    write_report(out, time.perf_counter() - t0, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Stochastic (SDE) presets beside the best deterministic ones: distribution quality per NFE, and the
evidence for choosing each SDE preset's default time grid.

A stochastic sampler has no single "right answer" per noise (every Brownian path gives another
sample), so there is no RMSE against a reference here: each run is judged by the distribution of its
samples.

- Exact oracles: a seeded Gaussian mixture (``fewstep.GaussianMixture.random(16, 8, 4, seed=0)``,
  "gmm-d16") as the exact model on ``DiscreteVP.linear()`` (eps prediction), ``FlowMatching()`` and
  ``EDM()`` (x0 prediction). Metrics: the likelihood gap ``E_true[log p] - mean log p(samples)``
  under the exact density (E_true from 200,000 exact samples), its standard error, and the Fréchet
  distance (``fewstep.metrics.frechet_distance``) to an exact sample set of the batch's size, beside
  the "floor" (what exact sample sets of that size score: mean and sd over 5 replicates). NFE 10, 20,
  50, 100; every preset on every spacing (``logistic``, ``uniform_t``, ``uniform_lambda``,
  ``karras``, ``quadratic``) and on its default grid (``spacing=None``).
- The bundled digits networks ``digits-vp-eps``, ``digits-flow``, ``digits-edm``: the digits feature
  Fréchet distance (``fewstep.zoo.evaluate.DigitsEvaluator``, as quality.py / defaults.py) at NFE 10,
  20, 50, batch 256 (quality.py's). The SDE presets run on their default grid and on the grid(s) the
  oracle of the same schedule family ranked best (``--net-grids``); the ODE rows on their default grid.
- Noise probe: ``ddpm`` and ``dpmpp_2m_sde`` at NFE 20 on every target, on the default grid and one other, with
  ``--seed-probe`` (2) more Brownian seeds: the seed-to-seed sd of one cell and of a paired grid difference.

    python benchmarks/sde_quality.py            # full (33 min on the 2-vCPU VM beside other jobs) -> reports/sde_quality.md (+ .json)
    python benchmarks/sde_quality.py --quick    # gmm-d16@vp, batch 500, NFE 10 20, 2 grids (< 1 min) -> reports/sde_quality_quick.md
    python benchmarks/sde_quality.py --targets oracles --nfe 10 20 --jobs 1 --out /tmp/sde.md
    python benchmarks/sde_quality.py --reuse benchmarks/reports/sde_quality.json   # rerun only what the earlier JSON lacks

Work is spread over ``--jobs`` processes (default: the CPUs of this process, at most 2), each with
``--threads`` torch threads (default 1). Nothing is asserted; this is not a test.
"""

from __future__ import annotations

import _common  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import fewstep
from fewstep.report import markdown_table

from _common import REPORTS, log, machine_lines, set_threads, write_text_atomic

#: (row label, preset, options, kind): the stochastic presets, then the deterministic rows beside them
ROWS: tuple[tuple[str, str, dict[str, Any], str], ...] = (
    ("ddpm", "ddpm", {}, "sde"),
    ("euler_ancestral", "euler_ancestral", {}, "sde"),
    ("dpmpp_2m_sde", "dpmpp_2m_sde", {}, "sde"),
    ("dpmpp_3m_sde", "dpmpp_3m_sde", {}, "sde"),
    ("dpmpp_3m_sde weights=published", "dpmpp_3m_sde", {"weights": "published"}, "sde"),
    ("dpmpp_sde", "dpmpp_sde", {}, "sde"),
    ("sa_solver", "sa_solver", {}, "sde"),
    ("er_sde", "er_sde", {}, "sde"),
    ("edm_sde", "edm_sde", {}, "sde"),
    ("ddim eta=0.5", "ddim", {"eta": 0.5}, "sde"),
    ("unipc (library default)", "unipc", {}, "ode"),
    ("dpmpp_2m", "dpmpp_2m", {}, "ode"),
    ("heun", "heun", {}, "ode"),
    ("ddim", "ddim", {}, "ode"),
)
SPACINGS = ("logistic", "uniform_t", "uniform_lambda", "karras", "quadratic")
SHORT = {"logistic": "L", "uniform_t": "UT", "uniform_lambda": "UL", "karras": "K", "quadratic": "Q"}
NFES = (10, 20, 50, 100)
NET_NFES = (10, 20, 50)
QUICK_NFES = (10, 20)
QUICK_SPACINGS = ("logistic", "uniform_lambda")

#: the oracle: GaussianMixture.random(DIM, K, RANK, seed=ORACLE_SEED)
ORACLE_DIM, ORACLE_K, ORACLE_RANK, ORACLE_SEED = 16, 8, 4, 0
ORACLE_BATCH, QUICK_BATCH = 2000, 500
N_TRUE = 200_000  # exact samples for E_true[log p]
FLOOR_REPS = 5
NET_BATCH = 256  # quality.py --digits' batch
NOISE_SEED = 0  # initial noise (keyed), the same for every run of a target
BROWNIAN_SEED = 1  # ``seed=`` of fewstep.sample: the Brownian noise of the stochastic presets
TRUE_SEED, REF_SEED, FLOOR_SEED = 11, 12, 100
#: the noise probe: these rows at PROBE_NFE on their default grid and one other, with more Brownian seeds
PROBE_ROWS = ("dpmpp_2m_sde", "ddpm")
PROBE_NFE = 20
#: a grid "ties" the best when within 5% of it or within TIE_SE standard errors (paired for the gap)
TIE_REL, TIE_SE = 0.05, 2.0

#: schedule key -> (constructor, the oracle's prediction type, how the report names it)
SCHEDULES: dict[str, tuple[Callable[[], fewstep.NoiseSchedule], str, str]] = {
    "vp": (lambda: fewstep.DiscreteVP.linear(), "eps", "DiscreteVP.linear()"),
    "flow": (lambda: fewstep.FlowMatching(), "x0", "FlowMatching()"),
    "edm": (lambda: fewstep.EDM(), "x0", "EDM()"),
}
NETWORKS = ("digits-vp-eps", "digits-flow", "digits-edm")


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:240]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def fmt_gap(v: Any) -> str:
    if not _finite(v):
        return "n/a"
    return f"{v:+.3f}" if abs(v) < 10 else f"{v:+.3g}"


def fmt_fd(v: Any) -> str:
    return f"{v:.3g}" if _finite(v) else "n/a"


def family_of(sched: fewstep.NoiseSchedule) -> str:
    return fewstep.defaults.schedule_family(sched)


def sample_hash(x: torch.Tensor) -> str:
    return hashlib.sha1(x.detach().to(torch.float64).contiguous().numpy().tobytes()).hexdigest()[:12]


def grid_kwargs(spacing: str) -> dict[str, Any]:
    """``spacing=None`` is the library's default grid for the preset and schedule."""
    return {"spacing": None if spacing == "default" else spacing}


def git_state() -> str:
    import defaults as D  # the helper the other reports use

    return D._git_state()


# ---------------------------------------------------------------------------------------------
# targets (built once per process)
# ---------------------------------------------------------------------------------------------
def oracle_id(key: str, dim: int) -> str:
    return f"gmm-d{dim}@{key}"


def make_oracle(dim: int) -> fewstep.GaussianMixture:
    return fewstep.GaussianMixture.random(dim, ORACLE_K, ORACLE_RANK, seed=ORACLE_SEED, name=f"gmm-d{dim}")


@lru_cache(maxsize=None)
def oracle_ctx(key: str, dim: int, batch: int) -> dict[str, Any]:
    make, pred, _ = SCHEDULES[key]
    sched = make()
    g = make_oracle(dim)
    true = g.sample(N_TRUE, seed=TRUE_SEED)
    lp_true = g.log_prob(true)
    return {"oracle": g, "sched": sched, "model": g.as_model(sched, pred),
            "x_T": fewstep.initial_noise(sched, (batch, dim), NOISE_SEED, dtype=torch.float64),
            "lp_true_mean": float(lp_true.mean()), "lp_true_var": float(lp_true.var()),
            "ref": g.sample(batch, seed=REF_SEED)}


def oracle_setup(key: str, dim: int, batch: int, reps: int) -> dict[str, Any]:
    """The scale of the columns: E_true[log p] and its SE, and what exact sample sets of the batch's size
    score (likelihood gap and FD against the same exact reference set), over ``reps`` replicates."""
    c = oracle_ctx(key, dim, batch)
    g = c["oracle"]
    gaps, fds = [], []
    for i in range(reps):
        x = g.sample(batch, seed=FLOOR_SEED + i)
        gaps.append(c["lp_true_mean"] - float(g.log_prob(x).mean()))
        fds.append(fewstep.metrics.frechet_distance(x, c["ref"]))
    lp_sd = math.sqrt(c["lp_true_var"])
    cov = g.covariance() if callable(g.covariance) else g.covariance
    return {"id": oracle_id(key, dim), "kind": "oracle", "schedule_key": key, "schedule": repr(c["sched"]),
            "schedule_label": SCHEDULES[key][2], "family": family_of(c["sched"]), "prediction": SCHEDULES[key][1],
            "oracle": repr(g), "dim": dim, "batch": batch, "n_true": N_TRUE, "e_true_logp": c["lp_true_mean"],
            "e_true_logp_se": lp_sd / math.sqrt(N_TRUE), "logp_sd": lp_sd, "gap_se_typical": lp_sd / math.sqrt(batch),
            "floor_gap_mean": float(np.mean(gaps)), "floor_gap_sd": float(np.std(gaps, ddof=1)) if reps > 1 else float("nan"),
            "floor_fd_mean": float(np.mean(fds)), "floor_fd_sd": float(np.std(fds, ddof=1)) if reps > 1 else float("nan"),
            "floor_fd_values": fds, "floor_gap_values": gaps, "data_cov_trace": float(cov.trace())}


@lru_cache(maxsize=None)
def network_ctx(name: str, batch: int) -> dict[str, Any]:
    from fewstep.zoo.evaluate import DigitsEvaluator

    model = fewstep.zoo.load(name)
    model.tuned_schedules = {}  # presets are named below; keep the searched schedules out of the picture anyway
    x_T = fewstep.initial_noise(model.schedule, (batch, *model.sample_shape), NOISE_SEED, dtype=torch.float64)
    return {"model": model, "sched": model.schedule, "x_T": x_T, "evaluator": DigitsEvaluator()}


def network_setup(name: str, batch: int, reps: int) -> dict[str, Any]:
    """Feature FD of real train digits in ``reps`` disjoint subsets of the batch's size (the first is
    quality.py's "real train digits" figure): the scale and the noise of the column."""
    from fewstep.zoo import card

    c = network_ctx(name, batch)
    ev = c["evaluator"]
    train = ev.split.train_x
    k = max(1, min(reps, train.shape[0] // batch))
    fds = [ev.evaluate(train[i * batch:(i + 1) * batch])["fd_features"] for i in range(k)]
    return {"id": name, "kind": "network", "schedule": repr(c["sched"]), "schedule_label": repr(c["sched"]),
            "family": family_of(c["sched"]), "prediction": c["model"].prediction, "batch": batch,
            "sha256": str(card(name)["sha256"])[:12], "real_fd_values": fds, "real_fd_mean": float(np.mean(fds)),
            "real_fd_sd": float(np.std(fds, ddof=1)) if k > 1 else float("nan"), "n_heldout": int(ev.split.heldout_x.shape[0])}


# ---------------------------------------------------------------------------------------------
# work units (run in the worker processes)
# ---------------------------------------------------------------------------------------------
def _init_worker(threads: int) -> None:
    torch.set_num_threads(max(1, threads))


def _run_one(model: fewstep.Model, x_T: torch.Tensor, preset: str, n: int, spacing: str, opts: dict[str, Any],
             seed: int) -> tuple[torch.Tensor, Any]:
    return fewstep.sample(model, x_T, preset, nfe=n, seed=seed, return_info=True, **grid_kwargs(spacing), **opts)


def _plan_or_error(preset: str, n: int, sched: fewstep.NoiseSchedule, spacing: str, opts: dict[str, Any]) -> tuple[Any, str]:
    try:
        return fewstep.preset(preset, n, sched, **grid_kwargs(spacing), **opts), ""
    except fewstep.FewstepError as exc:
        return None, _err(exc)


def run_unit(spec: dict[str, Any]) -> dict[str, Any]:
    """One (target, row): every grid of ``spec['grids']`` at every NFE. Identical plans (e.g. the default
    grid and the spacing it is) run once. Returns plain records."""
    t_unit = time.perf_counter()
    kind, tid = spec["kind"], spec["target"]
    label, preset, opts, row_kind = spec["row"]
    seed = int(spec.get("seed", BROWNIAN_SEED))
    if kind == "oracle":
        c = oracle_ctx(spec["key"], spec["dim"], spec["batch"])
        g, n_b = c["oracle"], spec["batch"]
    else:
        c = network_ctx(spec["name"], spec["batch"])
    model, sched, x_T = c["model"], c["sched"], c["x_T"]
    records: list[dict[str, Any]] = []
    for n in spec["nfes"]:
        plans: dict[str, Any] = {}
        lps: dict[str, np.ndarray] = {}
        by_grid: dict[str, dict[str, Any]] = {}
        for sp in spec["grids"]:
            rec: dict[str, Any] = {"target": tid, "row": label, "preset": preset, "options": opts, "kind": row_kind,
                                   "nfe": n, "grid": sp, "same_as": None, "error": "", "seed": seed,
                                   "probe": bool(spec.get("probe"))}
            plan, err = _plan_or_error(preset, n, sched, sp, opts)
            if plan is None:
                rec["error"] = err
                records.append(rec)
                by_grid[sp] = rec
                continue
            same = next((k for k, p in plans.items() if p == plan), None)
            if same is not None:
                base = by_grid[same]
                rec.update({k: v for k, v in base.items() if k not in ("grid", "same_as")})
                rec["same_as"] = same
                if same in lps:
                    lps[sp] = lps[same]
                records.append(rec)
                by_grid[sp] = rec
                continue
            plans[sp] = plan
            t0 = time.perf_counter()
            try:
                x, info = _run_one(model, x_T, preset, n, sp, opts, seed)
            except Exception as exc:  # noqa: BLE001  a combination that cannot run is recorded, not fatal
                rec["error"] = _err(exc)
                records.append(rec)
                by_grid[sp] = rec
                continue
            rec["wall_s"] = time.perf_counter() - t0
            meta = info.plan.meta
            rec.update({"spacing_used": meta.get("spacing"), "grid_options": meta.get("grid"), "nfe_used": int(info.nfe),
                        "stochastic": bool(info.plan.stochastic), "n_steps": int(info.plan.n_steps),
                        "t_first_steps": [float(t) for t in info.plan.times[:3]], "hash": sample_hash(x)})
            if int(info.nfe) != n:
                rec["error"] = f"used {info.nfe} NFE for a budget of {n}"
            finite = bool(torch.isfinite(x).all())
            rec["finite"] = finite
            if not finite:
                rec["error"] = rec["error"] or f"non-finite samples ({int((~torch.isfinite(x)).sum())} values)"
            elif kind == "oracle":
                lp = g.log_prob(x.reshape(x.shape[0], -1)).numpy()
                lps[sp] = lp
                rec["gap"] = c["lp_true_mean"] - float(lp.mean())
                rec["gap_se"] = math.sqrt(float(lp.var(ddof=1)) / n_b + c["lp_true_var"] / N_TRUE)
                rec["fd"] = fewstep.metrics.frechet_distance(x, c["ref"])
            else:
                m = c["evaluator"].evaluate(x)
                rec.update({"fd": m["fd_features"], "fd_pixels": m["fd_pixels"], "confidence": m["confidence"]})
            records.append(rec)
            by_grid[sp] = rec
        if kind == "oracle":  # paired standard errors of gap differences (same noises, same Brownian seed)
            ok = {sp: r for sp, r in by_grid.items() if _finite(r.get("gap")) and sp in lps}
            best = min(ok, key=lambda s: abs(ok[s]["gap"])) if ok else None
            for sp, r in ok.items():
                for ref_sp, key in (("default", "se_vs_default"), (best, "se_vs_best")):
                    if ref_sp in lps:
                        d = lps[sp] - lps[ref_sp]
                        r[key] = float(d.std(ddof=1) / math.sqrt(len(d))) if ref_sp != sp else 0.0
    return {"records": records, "wall_s": time.perf_counter() - t_unit, "target": tid, "row": label, "pid": os.getpid()}


def run_units(specs: list[dict[str, Any]], jobs: int, threads: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    records: list[dict[str, Any]] = []
    walls: dict[str, float] = defaultdict(float)
    done = 0

    def take(out: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        records.extend(out["records"])
        walls[out["target"]] += out["wall_s"]
        log(f"  [{done}/{len(specs)}] {out['target']} {out['row']}: {out['wall_s']:.1f} s")

    if jobs <= 1:
        for s in specs:
            take(run_unit(s))
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                 initargs=(threads,)) as ex:
            futs = [ex.submit(run_unit, s) for s in specs]
            for f in as_completed(futs):
                take(f.result())
    return records, dict(walls)


# ---------------------------------------------------------------------------------------------
# analysis
# ---------------------------------------------------------------------------------------------
def cells(records: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, dict[str, Any]]]:
    out: dict[tuple[str, str, int], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in records:
        if r.get("probe"):
            continue
        out[(r["target"], r["row"], r["nfe"])][r["grid"]] = r
    return out


def default_name(grids: dict[str, dict[str, Any]]) -> str:
    """The named spacing the default grid is (its plan equals that spacing's), else ``default``."""
    d = grids.get("default")
    if d is None:
        return "default"
    if d.get("same_as"):
        return d["same_as"]
    for sp, r in grids.items():
        if sp != "default" and r.get("same_as") == "default":
            return sp
    return "default"


def default_label(grids: dict[str, dict[str, Any]]) -> str:
    """How the report names the default grid: the named spacing it equals, else the spacing it used."""
    dn = default_name(grids)
    if dn != "default":
        return dn
    d = grids.get("default") or {}
    used = d.get("spacing_used")
    return f"{used} (default options)" if used in grids else (used or "default")


def candidates(grids: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Named spacings, plus ``default`` when it is none of them."""
    cand = {sp: r for sp, r in grids.items() if sp != "default"}
    if "default" in grids and default_name(grids) == "default":
        cand["default"] = grids["default"]
    return cand


def rank_cell(grids: dict[str, dict[str, Any]], metric: str, fd_noise: float) -> dict[str, Any]:
    """Best grid by ``metric`` ('gap': smallest |gap|; 'fd': smallest FD) and the grids tied with it (within
    5% or TIE_SE standard errors: the paired SE of the gap difference, or ``fd_noise`` for FD)."""
    cand = {sp: r for sp, r in candidates(grids).items() if not r.get("error") and _finite(r.get(metric))}
    if not cand:
        return {"best": None, "ties": [], "value": None}
    val = (lambda r: abs(r["gap"])) if metric == "gap" else (lambda r: r["fd"])
    best = min(cand, key=lambda s: val(cand[s]))
    b = val(cand[best])
    ties = []
    for sp, r in cand.items():
        noise = TIE_SE * (r.get("se_vs_best", 0.0) if metric == "gap" else fd_noise)
        if val(r) - b <= max(TIE_REL * b, noise if _finite(noise) else 0.0):
            ties.append(sp)
    ranks = {sp: i for i, sp in enumerate(sorted(cand, key=lambda s: val(cand[s])))}
    return {"best": best, "ties": ties, "value": b, "ranks": ranks}


def summarise(records: list[dict[str, Any]], setups: dict[str, dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (family, row), over the oracle targets of that family and their NFEs: wins and ties per spacing by
    |gap| and by FD; the recommended grid (most ties over both metrics, then most wins, then mean rank)."""
    agg: dict[tuple[str, str], dict[str, Any]] = {}
    for (tid, row, n), grids in cells(records).items():
        st = setups[tid]
        if st["kind"] != "oracle":
            continue
        key = (st["family"], row)
        a = agg.setdefault(key, {"family": st["family"], "row": row, "cells": 0, "wins": defaultdict(lambda: defaultdict(int)),
                                 "ties": defaultdict(lambda: defaultdict(int)), "ranks": defaultdict(list), "defaults": set(),
                                 "errors": defaultdict(list), "targets": set()})
        a["cells"] += 1
        a["targets"].add(tid)
        a["defaults"].add(default_name(grids))
        for sp, r in grids.items():
            if r.get("error"):
                a["errors"][sp].append(f"{tid} NFE {n}: {r['error']}")
        for metric, noise in (("gap", 0.0), ("fd", st["floor_fd_sd"])):
            rc = rank_cell(grids, metric, noise)
            if rc["best"] is None:
                continue
            a["wins"][metric][rc["best"]] += 1
            for sp in rc["ties"]:
                a["ties"][metric][sp] += 1
            if metric == "gap":
                for sp, rk in rc["ranks"].items():
                    a["ranks"][sp].append(rk)
    for a in agg.values():
        spac = sorted(set(a["ranks"]) | set(a["ties"]["gap"]) | set(a["ties"]["fd"]))
        score = {sp: a["ties"]["gap"][sp] + a["ties"]["fd"][sp] for sp in spac}
        wins = {sp: a["wins"]["gap"][sp] + a["wins"]["fd"][sp] for sp in spac}
        mrank = {sp: float(np.mean(a["ranks"][sp])) if a["ranks"][sp] else 99.0 for sp in spac}
        order = sorted(spac, key=lambda s: (-score[s], -wins[s], mrank[s]))
        a.update({"score": score, "wins_total": wins, "mean_rank": mrank, "order": order})
        cur = sorted(a["defaults"])
        a["current_default"] = cur[0] if len(cur) == 1 else "/".join(cur)
        top = order[0] if order else None
        a["recommended"] = top
        a["keep_default"] = bool(top is not None and len(cur) == 1 and score.get(cur[0], -1) == score[top])
    return agg


def network_grids(agg: dict[tuple[str, str], dict[str, Any]], family: str, row: str, default_grid: str | None, k: int) -> list[str]:
    """``default`` plus the ``k`` best-ranked non-default spacings of the oracle family's summary."""
    a = agg.get((family, row))
    if a is None or k <= 0:
        return ["default"]
    cur = default_grid or a["current_default"]
    extra = [sp for sp in a["order"] if sp not in (cur, "default")][:k]
    return ["default", *extra]


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def cell_text(grids: dict[str, dict[str, Any]], metric: str, noise: float, fmt: Callable[[Any], str]) -> str:
    d = grids.get("default")
    if d is None:
        return "n/a"
    dv = fmt(d.get(metric)) if not d.get("error") else "error"
    rc = rank_cell(grids, metric, noise)
    if rc["best"] is None:
        return dv
    dn = default_name(grids)
    b = candidates(grids)[rc["best"]]
    tie = " =" if dn in rc["ties"] else ""
    if rc["best"] == dn:
        return f"**{dv}** (best)"
    return f"{dv}{tie} \\| {rc['best']}: {fmt(b.get(metric))}"


def network_cell(grids: dict[str, dict[str, Any]]) -> str:
    items = []
    order = ["default"] + [sp for sp in grids if sp != "default"]
    for sp in order:
        r = grids.get(sp)
        if r is None or (sp != "default" and r.get("same_as") == "default"):
            continue
        name = default_label(grids) if sp == "default" else sp
        items.append((SHORT.get(name, name) + ("*" if sp == "default" else ""), r))
    ok = [r.get("fd") for _, r in items if not r.get("error") and _finite(r.get("fd"))]
    best = min(ok) if ok else None
    out = []
    for name, r in items:
        v = "error" if r.get("error") else fmt_fd(r.get("fd"))
        out.append(f"{name} **{v}**" if best is not None and r.get("fd") == best and len(items) > 1 else f"{name} {v}")
    return " / ".join(out) or "n/a"


def probe_lines(records: list[dict[str, Any]], setups: dict[str, dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """The Brownian-seed noise: per probed (target, row, grid) the metric over the seeds (x_T fixed), and the
    per-seed difference other grid - default grid."""
    probes = [r for r in records if r.get("probe")]
    if not probes:
        return [], []
    keys = sorted({(r["target"], r["row"], r["nfe"]) for r in probes})
    rows_md, js = [], []
    for tid, row, n in keys:
        st = setups.get(tid, {})
        mets = ("gap", "fd") if st.get("kind") == "oracle" else ("fd",)
        mine = [r for r in records if r["target"] == tid and r["row"] == row and r["nfe"] == n
                and (r.get("probe") or r.get("seed", BROWNIAN_SEED) == BROWNIAN_SEED)]
        grids = [g for g in dict.fromkeys(r["grid"] for r in probes if r["target"] == tid and r["row"] == row and r["nfe"] == n)]
        by: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
        for r in mine:
            if r["grid"] in grids and not r.get("error"):
                by[r["grid"]][int(r.get("seed", BROWNIAN_SEED))] = r
        seeds = sorted(set.intersection(*[set(v) for v in by.values()])) if by and len(by) == len(grids) else []
        if not seeds:
            continue
        dflt = by.get("default", {})
        dlabel = next((r.get("same_as") or r.get("spacing_used") for r in dflt.values()), "default")
        for m in mets:
            cells_txt, entry = [], {"target": tid, "row": row, "nfe": n, "metric": m, "seeds": seeds, "grids": {}}
            for g in grids:
                vals = [by[g][sd][m] for sd in seeds]
                entry["grids"][g] = vals
                name = f"{dlabel} (default)" if g == "default" else g
                cells_txt.append(f"{name}: {np.mean(vals):{'+.3f' if m == 'gap' else '.3g'}} ± {np.std(vals, ddof=1):.2g}")
            diffs = []
            for g in grids:
                if g == "default":
                    continue
                d = [by[g][sd][m] - by["default"][sd][m] for sd in seeds]
                entry.setdefault("diff_vs_default", {})[g] = d
                diffs.append(f"{g} - default: {np.mean(d):+.3g} ± {np.std(d, ddof=1):.2g}")
            rows_md.append([tid, row, n, {"gap": "gap", "fd": "FD"}[m], len(seeds), "; ".join(cells_txt), "; ".join(diffs)])
            js.append(entry)
    md = [markdown_table(["target", "preset", "NFE", "metric", "seeds", "per grid: mean ± sd over the seeds", "paired difference: mean ± sd"], rows_md)]
    return md, js


def at_floor(r: dict[str, Any] | None, st: dict[str, Any]) -> bool:
    """At the exact-sample floor: |gap| <= 2 SE and FD <= floor mean + 3 floor sd (oracles)."""
    if r is None or r.get("error") or not _finite(r.get("gap")) or not _finite(r.get("fd")):
        return False
    return abs(r["gap"]) <= 2 * r["gap_se"] and r["fd"] <= st["floor_fd_mean"] + 3 * st["floor_fd_sd"]


def probe_noise(pr_js: list[dict[str, Any]], tid: str | None, metric: str) -> tuple[list[float], list[float]]:
    """From the noise probe: the seed-to-seed sds of single cells and of paired grid differences."""
    cell_sd, diff_sd = [], []
    for e in pr_js:
        if (tid is None or e["target"] == tid) and e["metric"] == metric:
            cell_sd += [float(np.std(v, ddof=1)) for v in e["grids"].values() if len(v) > 1]
            diff_sd += [float(np.std(v, ddof=1)) for v in e.get("diff_vs_default", {}).values() if len(v) > 1]
    return cell_sd, diff_sd


def _span(v: list[float]) -> str:
    return f"{min(v):.2g}-{max(v):.2g}" if v else "n/a"


def target_sections(tid: str, st: dict[str, Any], cc: dict[tuple[str, str, int], dict[str, dict[str, Any]]], rows: list[str],
                    nfes: tuple[int, ...], pr_js: list[dict[str, Any]] | None = None) -> list[str]:
    lines = [f"## {tid}", ""]
    if st["kind"] == "oracle":
        lines += [f"Oracle `{st['oracle']}` (`fewstep.GaussianMixture.random({st['dim']}, {ORACLE_K}, {ORACLE_RANK}, seed={ORACLE_SEED})`, "
                  f"trace of the data covariance {st['data_cov_trace']:.3g}) as an exact `{st['prediction']}` model on "
                  f"`fewstep.{st['schedule_label']}` (family `{st['family']}`); batch {st['batch']}. "
                  f"E_true[log p] = {st['e_true_logp']:.4f} ± {st['e_true_logp_se']:.4f} (SE, {st['n_true']:,} exact samples; sd of log p "
                  f"{st['logp_sd']:.2f} nats). **Scale:** the likelihood gap of one run has SE ≈ {st['gap_se_typical']:.3f} nats "
                  f"(per cell in the JSON, `gap_se`); {FLOOR_REPS} exact sample sets of {st['batch']} score gap "
                  f"{st['floor_gap_mean']:+.3f} ± {st['floor_gap_sd']:.3f} (mean ± sd) and FD {st['floor_fd_mean']:.4f} ± "
                  f"{st['floor_fd_sd']:.4f}: the floor.", ""]
        for metric, title, noise, fmt in (("gap", "likelihood gap (nats; 0 = exact; < 0: samples sit in too-dense regions)", 0.0, fmt_gap),
                                          ("fd", f"Fréchet distance to {st['batch']} exact samples (floor {st['floor_fd_mean']:.3g})",
                                           st["floor_fd_sd"], fmt_fd)):
            lines += [f"### {title}", "",
                      "Each cell: the metric on the preset's default grid (`spacing=None`) | the best grid: its metric (best by "
                      + ("|gap|" if metric == "gap" else "FD") + "). **bold (best)**: the default grid is the best; `=`: the default is "
                      "within 5% or 2 " + ("paired SE" if metric == "gap" else "floor sd") + " of the best.", ""]
            trows = []
            for row in rows:
                dflt = next((default_label(cc[(tid, row, n)]) for n in nfes if (tid, row, n) in cc), "?")
                trows.append([f"{row} ({dflt})"] + [cell_text(cc[(tid, row, n)], metric, noise, fmt) if (tid, row, n) in cc else "n/a"
                                                    for n in nfes])
            lines += [markdown_table(["preset (default grid)"] + [f"NFE {n}" for n in nfes], trows), ""]
        # full matrix
        lines += ["### Every grid: gap ± its SE / FD", "",
                  "Same noises and Brownian seed in every cell of a row, so differences along a row are paired (their SE, "
                  "`se_vs_best` / `se_vs_default` in the JSON, is usually much smaller than a cell's own SE). `*` marks the default grid.", ""]
        spac = [s for s in SPACINGS if any((tid, row, n) in cc and s in cc[(tid, row, n)] for row in rows for n in nfes)]
        mrows = []
        for row in rows:
            for n in nfes:
                g = cc.get((tid, row, n))
                if not g:
                    continue
                dn = default_name(g)
                out = [row, n]
                for sp in spac + (["default"] if dn == "default" else []):
                    r = g.get(sp)
                    if r is None:
                        out.append("")
                    elif r.get("error"):
                        out.append("error")
                    else:
                        out.append(f"{fmt_gap(r.get('gap'))} ± {r.get('gap_se', float('nan')):.2f} / {fmt_fd(r.get('fd'))}"
                                   + (" *" if sp == dn else ""))
                mrows.append(out)
        lines += [markdown_table(["preset", "NFE"] + spac + (["default"] if any("default" == default_name(cc[k]) for k in cc if k[0] == tid) else []), mrows), ""]
    else:
        lines += [f"Bundled network `{tid}` (`{st['schedule']}`, {st['prediction']} prediction, weights {st['sha256']}), batch "
                  f"{st['batch']} (the first {st['batch']} keyed noises of seed {NOISE_SEED}), float32 network, float64 solver arithmetic. "
                  f"Feature FD to the {st['n_heldout']} held-out digits; **scale:** {len(st['real_fd_values'])} disjoint sets of "
                  f"{st['batch']} real train digits score {st['real_fd_mean']:.3g} ± {st['real_fd_sd']:.2g} (mean ± sd): the floor and the "
                  f"noise of one cell. The SDE rows ran on their default grid and on the oracle's best-ranked other grid(s) of the "
                  f"`{st['family']}` family; the ODE rows on their default grid only."
                  + (lambda c, d: f" **Noise (Brownian seed, x_T fixed):** one cell's FD moves by sd {_span(c)} between seeds, a paired "
                     f"difference of two grids by sd {_span(d)}; so only differences well above that resolve a grid, and the "
                     f"SDE rows against the deterministic rows (which have no Brownian seed) are not ranked here." if c else "")(
                      *probe_noise(pr_js or [], tid, "fd")), ""]
        trows = []
        for row in rows:
            g0 = next((cc[(tid, row, n)] for n in nfes if (tid, row, n) in cc), None)
            if g0 is None:
                continue
            ran = [sp for sp in g0 if sp != "default"]
            trows.append([f"{row} ({default_label(g0)})", ", ".join(ran) or "-"]
                         + [network_cell(cc[(tid, row, n)]) if (tid, row, n) in cc else "n/a" for n in nfes])
        lines += ["Each cell: feature FD on every grid run, the default grid first (`*`), the lowest in bold. The Brownian-seed "
                  "noise of a cell and of a grid difference is in the noise probe section.", "",
                  markdown_table(["preset (default grid)", "other grids run"] + [f"NFE {n}" for n in nfes], trows), ""]
    return lines


def summary_lines(agg: dict[tuple[str, str], dict[str, Any]], cc: dict[tuple[str, str, int], dict[str, dict[str, Any]]],
                  setups: dict[str, dict[str, Any]], net_nfes: tuple[int, ...], rows: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    out_rows, js = [], []
    nets_by_family = {st["family"]: tid for tid, st in setups.items() if st["kind"] == "network"}
    for fam in sorted({a["family"] for a in agg.values()}):
        for row in rows:
            a = agg.get((fam, row))
            if a is None:
                continue
            n_cells = a["cells"]

            def counts(metric: str) -> str:
                items = sorted(a["ties"][metric].items(), key=lambda kv: (-kv[1], -a["wins"][metric][kv[0]]))
                return ", ".join(f"{SHORT.get(sp, sp)} {t}/{a['wins'][metric][sp]}" for sp, t in items if t) or "-"

            rec = a["recommended"]
            rec_txt = (f"keep **{a['current_default']}**" if a["keep_default"] else f"**{rec}** ({a['score'].get(rec, 0)} vs "
                       f"{a['score'].get(a['current_default'], 0)})") if rec else "n/a"
            net_txt = "-"
            net = nets_by_family.get(fam)
            if net is not None:
                parts = []
                for n in net_nfes:
                    g = cc.get((net, row, n))
                    if not g:
                        continue
                    d = g.get("default")
                    alt = [(sp, r) for sp, r in g.items() if sp != "default" and not r.get("error") and _finite(r.get("fd"))
                           and not r.get("same_as")]
                    if d is None or d.get("error"):
                        parts.append("error")
                    elif alt:
                        sp, r = min(alt, key=lambda kv: kv[1]["fd"])
                        parts.append(f"{fmt_fd(d['fd'])} vs {SHORT.get(sp, sp)} {fmt_fd(r['fd'])}")
                    else:
                        parts.append(fmt_fd(d["fd"]))
                net_txt = "; ".join(parts) or "-"
            out_rows.append([fam, row, a["current_default"], counts("gap"), counts("fd"), rec_txt, net_txt])
            js.append({"family": fam, "row": row, "cells": n_cells, "targets": sorted(a["targets"]), "current_default": a["current_default"],
                       "ties": {m: dict(v) for m, v in a["ties"].items()}, "wins": {m: dict(v) for m, v in a["wins"].items()},
                       "score": a["score"], "mean_rank_gap": a["mean_rank"], "order": a["order"], "recommended": rec,
                       "keep_default": a["keep_default"], "network_check": net_txt,
                       "errors": {sp: v for sp, v in a["errors"].items()}})
    head = ["family", "preset", "current default", "by abs(gap): ties/wins per grid", "by FD: ties/wins per grid",
            "recommended (score: ties, both metrics)", f"network FD default vs best other grid run, NFE {'/'.join(map(str, net_nfes))}"]
    return [markdown_table(head, out_rows)], js


def floor_lines(cc: dict[tuple[str, str, int], dict[str, dict[str, Any]]], setups: dict[str, dict[str, Any]], rows: list[str],
                nfes: tuple[int, ...]) -> tuple[list[str], list[str]]:
    trows, never = [], []
    oracles = [tid for tid, st in setups.items() if st["kind"] == "oracle"]
    for row in rows:
        out = [row]
        for tid in oracles:
            st = setups[tid]
            first: dict[str, Any] = {"default": None, "any": None, "grid": None}
            for n in nfes:
                g = cc.get((tid, row, n))
                if not g:
                    continue
                if first["default"] is None and at_floor(g.get("default"), st):
                    first["default"] = n
                if first["any"] is None:
                    hits = [sp for sp, r in candidates(g).items() if at_floor(r, st)]
                    if hits:
                        first["any"], first["grid"] = n, ("/".join(hits) if len(hits) <= 2 else f"{len(hits)} grids")
            g_top = cc.get((tid, row, max(nfes)))
            extra = ""
            if g_top:
                rc = rank_cell(g_top, "gap", 0.0)
                b = candidates(g_top).get(rc["best"]) if rc["best"] else None
                d = g_top.get("default")
                if b is not None and d is not None and not d.get("error"):
                    extra = (f" (NFE {max(nfes)}: default {fmt_gap(d.get('gap'))} / {fmt_fd(d.get('fd'))}, "
                             f"best {rc['best']} {fmt_gap(b.get('gap'))} / {fmt_fd(b.get('fd'))})")
            cell = (f"default: {first['default'] or 'never'}, any grid: "
                    + (f"{first['any']} ({first['grid']})" if first["any"] else "never"))
            if first["any"] is None:
                never.append(f"`{row}` on {tid}: not at the floor on any grid up to NFE {max(nfes)}{extra}")
            elif first["default"] is None:
                never.append(f"`{row}` on {tid}: only off its default grid (from NFE {first['any']}, {first['grid']}); "
                             f"default grid never{extra}")
            out.append(cell)
        trows.append(out)
    return [markdown_table(["preset"] + [f"{tid}: first NFE at the floor" for tid in oracles], trows)], never


def identical_rows(records: list[dict[str, Any]]) -> list[str]:
    """Rows whose samples are bit-identical to another row's in every cell they share."""
    by: dict[tuple[str, str], dict[tuple[str, int, str], str]] = defaultdict(dict)
    for r in records:
        if r.get("hash"):
            by[(r["target"], r["row"])][(r["target"], r["nfe"], r["grid"])] = r["hash"]
    pairs: dict[tuple[str, str], list[bool]] = defaultdict(list)
    keys = list(by)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            if a[0] != b[0]:
                continue
            common = set(by[a]) & set(by[b])
            if common:
                pairs[(a[1], b[1])].append(all(by[a][k] == by[b][k] for k in common))
    return [f"`{a}` and `{b}`" for (a, b), v in pairs.items() if v and all(v)]


# ---------------------------------------------------------------------------------------------
def check_rows() -> tuple[list[tuple[str, str, dict[str, Any], str]], list[str]]:
    from fewstep.solvers.presets import preset_options

    names = set(fewstep.preset_names())
    ok, skipped = [], []
    for row in ROWS:
        label, preset, opts, _ = row
        if preset not in names:
            skipped.append(f"{label}: no preset {preset!r} in fewstep.preset_names()")
            continue
        bad = [k for k in opts if k not in preset_options(preset)]
        if bad:
            skipped.append(f"{label}: options {bad} not in preset_options({preset!r})")
            continue
        ok.append(row)
    return ok, skipped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="gmm-d16@vp only, batch 500, NFE 10 20, grids logistic + uniform_lambda")
    ap.add_argument("--targets", nargs="+", default=None, help="'oracles', 'networks', 'all' (default), or ids: vp flow edm digits-vp-eps ...")
    ap.add_argument("--nfe", nargs="+", type=int, default=None, help=f"oracle NFEs (default {' '.join(map(str, NFES))})")
    ap.add_argument("--net-nfe", nargs="+", type=int, default=None, help=f"network NFEs (default {' '.join(map(str, NET_NFES))})")
    ap.add_argument("--dim", type=int, default=ORACLE_DIM, help="dimension of the oracle mixture")
    ap.add_argument("--batch", type=int, default=None, help=f"oracle batch (default {ORACLE_BATCH}; --quick {QUICK_BATCH})")
    ap.add_argument("--net-batch", type=int, default=NET_BATCH)
    ap.add_argument("--net-grids", type=int, default=1, help="non-default grids per SDE preset on the networks (the oracle's best-ranked)")
    ap.add_argument("--net-all-grids", action="store_true", help="every spacing for every row on the networks (slow)")
    ap.add_argument("--seed-probe", type=int, default=None,
                    help=f"extra Brownian seeds for the noise probe ({', '.join(PROBE_ROWS)} at NFE {PROBE_NFE}, default grid and one "
                         "other, every target; default 2, --quick 1; 0: none)")
    ap.add_argument("--reuse", nargs="+", default=None, help="earlier reports' JSON: work units they hold with the same settings are "
                    "taken from them, not rerun (the report names the runs and fewstep sources the cells were measured on)")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default: the CPUs of this process, at most 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default 1; with --jobs 1: all CPUs)")
    ap.add_argument("--out", default=None, help="report path (default reports/sde_quality.md or _quick.md); JSON beside it")
    args = ap.parse_args(argv)

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    jobs = args.jobs if args.jobs is not None else (1 if args.quick else min(2, cpus))
    threads = set_threads(args.threads if jobs <= 1 else 1)
    worker_threads = args.threads or 1
    nfes = tuple(sorted(set(args.nfe or (QUICK_NFES if args.quick else NFES))))
    net_nfes = tuple(sorted(set(args.net_nfe or NET_NFES)))
    spacings = QUICK_SPACINGS if args.quick else SPACINGS
    batch = args.batch or (QUICK_BATCH if args.quick else ORACLE_BATCH)
    sel = args.targets or (["vp"] if args.quick else ["all"])
    keys, nets = [], []
    for s in sel:
        if s in ("all", "oracles"):
            keys += list(SCHEDULES)
        if s in ("all", "networks"):
            nets += list(NETWORKS)
        if s in SCHEDULES:
            keys.append(s)
        elif s.startswith("gmm-") and "@" in s:
            keys.append(s.split("@", 1)[1])
        elif s in NETWORKS:
            nets.append(s)
        elif s not in ("all", "oracles", "networks"):
            raise SystemExit(f"unknown target {s!r}")
    keys, nets = list(dict.fromkeys(keys)), list(dict.fromkeys(nets))
    out = Path(args.out) if args.out else REPORTS / ("sde_quality_quick.md" if args.quick else "sde_quality.md")
    command = " ".join(["python benchmarks/sde_quality.py", *(argv if argv is not None else sys.argv[1:])])
    rows, skipped_rows = check_rows()
    row_labels = [r[0] for r in rows]
    t_all = time.perf_counter()
    source = git_state()
    log(f"sde_quality: oracles {keys} (d={args.dim}, batch {batch}, NFE {nfes}), networks {nets} (batch {args.net_batch}, "
        f"NFE {net_nfes}); {jobs} jobs x {worker_threads if jobs > 1 else threads} threads")

    setups: dict[str, dict[str, Any]] = {}
    records: list[dict[str, Any]] = []
    walls: dict[str, float] = {}
    phase_s: dict[str, float] = {}
    net_plan: dict[str, dict[str, list[str]]] = {}

    #: every run whose units this report holds: run id -> command, fewstep source, date, wall time
    run_id = f"{time.strftime('%Y-%m-%d %H:%M')} {source}"
    runs: dict[str, dict[str, Any]] = {}
    reuse_index: dict[tuple[str, str, int, str, int], dict[str, Any]] = {}
    reused = [0, 0]
    for path in args.reuse or []:
        old = json.loads(Path(path).read_text())
        o = old.get("settings", {})
        same = (o.get("oracle", {}).get("dim") == args.dim and o.get("oracle", {}).get("batch") == batch
                and o.get("oracle", {}).get("n_true") == N_TRUE and o.get("net_batch") == args.net_batch
                and o.get("noise_seed") == NOISE_SEED)
        if not same:
            log(f"--reuse {path}: other settings (oracle dim/batch, network batch or noise seed); nothing reused")
            continue
        old_id = f"{old.get('date', '?')} {old.get('fewstep_source', '?')}"
        old_runs = dict(old.get("runs") or {})
        old_runs.setdefault(old_id, {"command": old.get("command"), "fewstep_source": old.get("fewstep_source"), "date": old.get("date"),
                                     "wall_s": old.get("wall_s"), "unit_wall_s": sum((old.get("unit_wall_s") or {}).values())})
        for r in old.get("records", []):
            key = (r["target"], r["row"], r["nfe"], r["grid"], int(r.get("seed", BROWNIAN_SEED)))
            if key not in reuse_index:  # the first file that holds a cell wins
                rid = r.get("run") or old_id
                reuse_index[key] = {**r, "run": rid}
                runs.setdefault(rid, old_runs.get(rid, {}))

    spot = ["none"]

    def spot_check() -> None:
        """Resample a few reused oracle cells (one per row kind, smallest NFE) and compare their sample hashes."""
        picks: dict[str, dict[str, Any]] = {}
        for r in reuse_index.values():
            if r.get("hash") and r["target"].startswith("gmm-") and int(r.get("seed", BROWNIAN_SEED)) == BROWNIAN_SEED \
                    and r["grid"] == "default" and r["target"] in setups and r["row"] in {x[0] for x in rows if x[3] == "sde"}:
                k = f"{r['target']}|{r['row']}"
                if k not in picks or r["nfe"] < picks[k]["nfe"]:
                    picks[k] = r
        by_target: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for k in sorted(picks):
            by_target[k.split("|")[0]].append(picks[k])
        chosen = [lst[(3 * i) % len(lst)] for i, lst in enumerate(by_target.values())]  # one cell per oracle target
        if not chosen:
            return
        rowmap = {x[0]: x for x in rows}
        same = 0
        for r in chosen:
            st = setups[r["target"]]
            out = run_unit({"kind": "oracle", "target": r["target"], "key": st["schedule_key"], "dim": args.dim, "batch": batch,
                            "row": rowmap[r["row"]], "nfes": (r["nfe"],), "grids": ["default"]})
            same += out["records"][0].get("hash") == r["hash"]
        spot[0] = (f"{same} of {len(chosen)} bit-identical (" + ", ".join(f"{r['target']} {r['row']} NFE {r['nfe']}" for r in chosen) + ")")
        log(f"reuse spot check: {spot[0]}")

    def run_or_reuse(specs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, float]]:
        todo, got = [], []
        for sp in specs:
            seed = int(sp.get("seed", BROWNIAN_SEED))
            keys = [(sp["target"], sp["row"][0], n, g, seed) for n in sp["nfes"] for g in sp["grids"]]
            if keys and all(k in reuse_index for k in keys):
                got += [{**reuse_index[k], "seed": seed, "probe": bool(sp.get("probe"))} for k in keys]
                reused[0] += 1
            else:
                todo.append(sp)
        reused[1] += len(specs)
        recs, w = run_units(todo, jobs, worker_threads) if todo else ([], {})
        for r in recs:
            r["run"] = run_id
        return got + recs, w

    def run_lines() -> list[str]:
        """Which run measured how many of the cells (with ``--reuse``, earlier runs' cells are taken as they were)."""
        count: dict[str, int] = defaultdict(int)
        for r in records:
            count[r.get("run", run_id)] += 1
        if set(count) <= {run_id}:
            return []
        out = [f"- cells measured by {len(count)} runs (`--reuse`: cells of earlier runs with the same settings are taken as they "
               f"were, not rerun); spot check, reused oracle cells resampled now: {spot[0]}"]
        for rid, k in sorted(count.items()):
            info = runs.get(rid, {}) if rid != run_id else {"command": command, "fewstep_source": source, "date": "this run"}
            wall = info.get("wall_s")
            out.append(f"  - {k} cells: `{info.get('command') or '?'}` on fewstep {info.get('fewstep_source', '?')} ({info.get('date', '?')}"
                       + (f", {wall:.0f} s wall" if isinstance(wall, (int, float)) else "") + ")")
        return out

    def write(partial: bool) -> None:
        wall = time.perf_counter() - t_all
        cc = cells(records)
        agg = summarise(records, setups)
        sum_md, sum_js = summary_lines(agg, cc, setups, net_nfes, row_labels)
        fl_md, never = floor_lines(cc, setups, row_labels, nfes) if any(s["kind"] == "oracle" for s in setups.values()) else ([], [])
        never_sde = [x for x in never if any(x.startswith(f"`{r[0]}`") for r in rows if r[3] == "sde")]
        never_ode = [x for x in never if x not in never_sde]
        errors = sorted({f"{r['target']} {r['row']} NFE {r['nfe']} grid {r['grid']}: {r['error']}" for r in records if r.get("error")})
        same = identical_rows(records)
        pr_md, pr_js = probe_lines(records, setups)
        head = [
            "# Stochastic (SDE) presets: distribution quality per NFE and their default grids", "",
            f"Generated by `{command}` in {wall:.0f} s wall time ({time.strftime('%Y-%m-%d %H:%M')})"
            + (" — **PARTIAL** (networks still to run)" if partial else "") + ".", "",
            "Machine:", *machine_lines(), f"- fewstep source: {source}",
            f"- work: {jobs} worker process(es) x {worker_threads if jobs > 1 else threads} torch thread(s); "
            + ("unit wall times " if walls else "")
            + (f"sum to {sum(walls.values()):.0f} s (per target: " + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items()) + ")"
               if walls else "no work unit ran in this invocation"),
            *run_lines(), "",
            "What runs: `fewstep.sample(model, x_T, preset, nfe=N, seed=" f"{BROWNIAN_SEED}, spacing=SP, **options)` from "
            f"`x_T = fewstep.initial_noise(sched, (batch, *shape), {NOISE_SEED}, dtype=torch.float64)`, the same noises and the same "
            "Brownian seed for every cell of a target (one Brownian path per sample over log-SNR, shared by every grid and NFE), so "
            "the comparison of grids along a row is paired. `spacing=None` is the "
            "preset's default grid (`fewstep.defaults.default_spacing`), reported as the spacing whose plan it equals (identical "
            "plans run once). Stochastic rows: " + ", ".join(f"`{r[0]}`" for r in rows if r[3] == "sde") + "; deterministic rows "
            "beside them: " + ", ".join(f"`{r[0]}`" for r in rows if r[3] == "ode") + ". Grids: " + ", ".join(spacings) + ".", "",
            "Ranking: best grid = smallest |likelihood gap| (the gap is a cross-entropy difference, not a divergence: it is "
            "negative when samples crowd into high-density regions, so its size is ranked) or smallest FD. A grid **ties** the "
            f"best when it is within {TIE_REL:.0%} of it or within {TIE_SE:g} standard errors (the paired SE of the gap "
            "difference; for the oracle FD the sd of the floor replicates; for the network FD the sd over disjoint sets of "
            "real digits). Summary per (schedule family, preset): for every grid the number of NFEs where it ties the best / "
            "is the best, by |gap| and by FD; recommended = most ties over both metrics, then most wins, then mean rank by |gap|. "
            "\"keep\" = the current default grid has the top score.", "",
        ]
        body = ["## Recommended default grids (oracle evidence; network check)", "",
                f"Cells `L 3/2` = logistic tied the best at 3 NFEs, was the best at 2 (out of {len(nfes)} NFEs per oracle target). "
                "Grids: L logistic, UT uniform_t, UL uniform_lambda, K karras, Q quadratic."
                + (" Network column: digits feature FD on the default grid vs the best other grid run there (real-digit sets score "
                   + ", ".join(f"{st['real_fd_mean']:.3g} ± {st['real_fd_sd']:.2g} on {tid}" for tid, st in setups.items() if st["kind"] == "network")
                   + ")." if any(st["kind"] == "network" for st in setups.values()) else "")
                + (lambda c, d: f" Network FD at batch {args.net_batch} is noisy: between Brownian seeds one cell moves by sd "
                   f"{_span(c)} and a paired grid difference by sd {_span(d)} (noise section); read that column for large effects only."
                   if c else "")(*probe_noise([e for e in pr_js if setups.get(e["target"], {}).get("kind") == "network"], None, "fd")),
                "", *sum_md, ""]
        if fl_md:
            body += ["## Which presets reach the exact-sample floor", "",
                     "At the floor: |gap| <= 2 SE and FD <= floor mean + 3 floor sd. Cells: the first NFE at which the preset's "
                     "default grid / any grid (which) is at the floor (a cell can leave the floor again at a higher NFE: the "
                     "criterion is per cell and noisy near its edge).", "", *fl_md, ""]
            body += ["**Stochastic presets that do not reach the floor** (on the default grid, or on any grid):", ""]
            body += [f"- {x}" for x in never_sde] or ["- none"]
            body += [""]
            if never_ode:
                body += ["Deterministic rows not at the floor: " + "; ".join(never_ode), ""]
        if pr_md:
            body += ["## Noise: the Brownian seed", "",
                     f"The grid comparisons above use one Brownian seed ({BROWNIAN_SEED}; one Brownian path per sample over log-SNR, "
                     "shared by every grid and NFE) and one set of initial noises. Here the probed rows rerun with other seeds, "
                     "the initial noises fixed: the sd over seeds is the seed-to-seed noise of one cell, the sd of the paired "
                     "difference that of a grid comparison.", "", *pr_md, ""]
        if same:
            body += ["Bit-identical samples in every cell: " + "; ".join(same) + " (the same method).", ""]
        if net_plan:
            body += ["Grids run on the networks (default + the oracle family's best-ranked other grid(s)): "
                     + "; ".join(f"{net}: " + ", ".join(f"{row} {'/'.join(g)}" for row, g in plan.items() if len(g) > 1)
                                 for net, plan in net_plan.items()), ""]
        cc_all = cc
        for tid, st in setups.items():
            body += target_sections(tid, st, cc_all, row_labels, nfes if st["kind"] == "oracle" else net_nfes, pr_js)
        body += ["## Errors and skipped combinations", ""]
        body += [f"- {e}" for e in errors] or ["- none"]
        body += [f"- row skipped: {s}" for s in skipped_rows] + [""]
        body += ["Phase wall times of this invocation (cells taken with `--reuse` cost nothing here): "
                 + ", ".join(f"{k} {v:.0f} s" for k, v in phase_s.items()), ""]
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, "\n".join(head + body))
        js = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "wall_s": wall, "partial": partial, "fewstep_source": source,
              "machine": dict(line[2:].split(": ", 1) for line in machine_lines()), "jobs": jobs, "threads": worker_threads if jobs > 1 else threads,
              "settings": {"nfes": nfes, "net_nfes": net_nfes, "spacings": spacings, "oracle": {"dim": args.dim, "k": ORACLE_K, "rank": ORACLE_RANK,
                           "seed": ORACLE_SEED, "batch": batch, "n_true": N_TRUE}, "net_batch": args.net_batch, "noise_seed": NOISE_SEED,
                           "brownian_seed": BROWNIAN_SEED, "tie_rel": TIE_REL, "tie_se": TIE_SE, "rows": [list(r[:2]) + [r[2], r[3]] for r in rows]},
              "targets": setups, "unit_wall_s": walls, "phase_s": phase_s, "network_grids": net_plan, "summary": sum_js,
              "not_at_floor": never, "identical_rows": same, "noise_probe": pr_js, "reused_units": reused[0],
              "runs": {**runs, run_id: {"command": command, "fewstep_source": source, "date": time.strftime("%Y-%m-%d %H:%M"),
                                        "wall_s": wall, "unit_wall_s": sum(walls.values())}}, "errors": errors, "skipped_rows": skipped_rows, "records": records}
        write_text_atomic(out.with_suffix(".json"), json.dumps(js, indent=1, default=str))
        log(f"wrote {out} and {out.with_suffix('.json')} ({wall:.0f} s){' (partial)' if partial else ''}")

    # ---- phase 1: oracles
    if keys:
        t0 = time.perf_counter()
        for k in keys:
            setups[oracle_id(k, args.dim)] = oracle_setup(k, args.dim, batch, FLOOR_REPS)
            log(f"[{oracle_id(k, args.dim)}] floor: FD {setups[oracle_id(k, args.dim)]['floor_fd_mean']:.4f}, gap SE "
                f"{setups[oracle_id(k, args.dim)]['gap_se_typical']:.3f}")
        specs = [{"kind": "oracle", "target": oracle_id(k, args.dim), "key": k, "dim": args.dim, "batch": batch, "row": row,
                  "nfes": nfes, "grids": ["default", *spacings]} for k in keys for row in rows]
        if reuse_index:
            spot_check()
        recs, w = run_or_reuse(specs)
        records += recs
        walls.update(w)
        phase_s["oracles"] = time.perf_counter() - t0
        if nets:
            write(partial=True)

    # ---- phase 2: networks
    if nets:
        t0 = time.perf_counter()
        agg = summarise(records, setups)
        specs = []
        for name in nets:
            st = network_setup(name, args.net_batch, FLOOR_REPS)
            setups[name] = st
            log(f"[{name}] real digits FD {st['real_fd_mean']:.3g} ± {st['real_fd_sd']:.2g}")
            net_plan[name] = {}
            for row in rows:
                if args.net_all_grids:
                    grids = ["default", *spacings]
                elif row[3] == "sde":
                    grids = network_grids(agg, st["family"], row[0], None, args.net_grids)
                else:
                    grids = ["default"]
                net_plan[name][row[0]] = grids
                specs.append({"kind": "network", "target": name, "name": name, "batch": args.net_batch, "row": row,
                              "nfes": net_nfes, "grids": grids})
        specs.sort(key=lambda s: -len(s["grids"]))  # the longest units first
        recs, w = run_or_reuse(specs)
        records += recs
        walls.update(w)
        phase_s["networks"] = time.perf_counter() - t0

    # ---- phase 3: the Brownian-seed noise probe
    n_probe = args.seed_probe if args.seed_probe is not None else (1 if args.quick else 2)
    if n_probe > 0 and setups:
        t0 = time.perf_counter()
        agg = summarise(records, setups)
        specs = []
        for tid, st in setups.items():
            for row in rows:
                if row[0] not in PROBE_ROWS:
                    continue
                if st["kind"] == "network":
                    grids = net_plan.get(tid, {}).get(row[0], ["default"])[:2]
                    n_p = PROBE_NFE if PROBE_NFE in net_nfes else net_nfes[0]
                    base = {"kind": "network", "target": tid, "name": tid, "batch": args.net_batch}
                else:
                    grids = network_grids(agg, st["family"], row[0], None, 1)
                    n_p = PROBE_NFE if PROBE_NFE in nfes else nfes[0]
                    base = {"kind": "oracle", "target": tid, "key": st["schedule_key"], "dim": args.dim, "batch": batch}
                for k in range(n_probe):
                    specs.append({**base, "row": row, "nfes": (n_p,), "grids": grids, "seed": BROWNIAN_SEED + 1 + k, "probe": True})
        recs, w = run_or_reuse(specs)
        records += recs
        for k, v in w.items():
            walls[k] = walls.get(k, 0.0) + v
        phase_s["noise probe"] = time.perf_counter() - t0
    write(partial=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

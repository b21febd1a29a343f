"""Defaults are the product: ``fewstep.sample(model, x_T, nfe=N)`` -- no solver and no spacing named,
whatever the library's defaults are at run time -- against the best diffusers scheduler / k-diffusion
sampler at ITS best grid option, per NFE, on the exact oracles on every schedule family and on the
bundled digits networks.

Per target and NFE: the default call's RMSE against the reference and its second metric (oracles: the
exact likelihood gap; networks: the digits feature Fréchet distance), the best peer (name, option, NFE
used, RMSE) and the ratio default / peer (< 1: fewstep ahead), the same restricted to diffusers, what
the default call ran (``info.plan.name``, ``info.plan.meta``, ``fewstep.defaults.default_solver`` /
``default_spacing``), and the previous default call ``sample(model, x_T, "ddim", nfe=N,
spacing="uniform_t")`` for context. A second table per target: the order of the step into sigma = 0
(``final_order=1`` vs the preset's default) for unipc, dpmpp_3m and dpmpp_2m at NFE 5-10. A headline
across targets (ratio default / best peer) states whether the bar (ratio <= 1 everywhere) is met.

Peers do not change when fewstep changes, so every peer run is cached in
``benchmarks/.cache/peers-<target>.json``, keyed by (peer, option, NFE, batch, seed, reference file,
diffusers / k-diffusion versions, model mode); a rerun after a fewstep change runs only fewstep's side.

    python benchmarks/defaults.py                      # all targets -> reports/defaults.md (+ .json)
    python benchmarks/defaults.py --quick              # gmm-d64@vp + gmm-d64@flow, batch 64, NFE 5 10 -> reports/defaults_quick.md
    python benchmarks/defaults.py --targets oracles    # the oracle targets only (or: networks, or ids below)
    python benchmarks/defaults.py --targets gmm-d64@edm digits-flow:64 --nfe 5 10

Targets: ``<oracle>@<schedule>[:batch]`` with schedule one of vp (DiscreteVP.linear), vp-scaled-linear,
vp-cosine, linear-vp, cosine-vp, edm, flow; or a zoo network ``digits-vp-eps``, ``digits-flow``,
``digits-edm`` [:batch]. No number is asserted; nothing here is a test.
"""

from __future__ import annotations

import _common  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

import argparse
import inspect
import json
import math
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import fewstep
from fewstep.report import markdown_table

from _common import CACHE, REPORTS, RecordCache, log, machine_lines, package_version, quiet_diffusers, set_threads, write_text_atomic
import peers as peers_mod
import quality as Q
import targets as T

NFES = (5, 6, 8, 10, 15, 20)
QUICK_NFES = (5, 10)
FINAL_ORDER_NFES = (5, 6, 8, 10)
FINAL_ORDER_PRESETS = ("unipc", "dpmpp_3m", "dpmpp_2m")
PREVIOUS_DEFAULT = ("ddim", {"spacing": "uniform_t"})
MODEL_MODE = "sigma"
PEER_CACHE_FORMAT = 2  # 2: diffusers peers built from the schedule's own trained_betas; exponential, beta, Lu grids

#: schedules no diffusers scheduler takes: fewstep's own best preset at its best grid is measured beside
#: whatever peers exist (k-diffusion's samplers, which need only the VE noise levels)
FEWSTEP_BEST_SCHEDULES = ("linear-vp", "cosine-vp")
QUICK_TARGETS = (("gmm-d64@vp", 64), ("gmm-d64@flow", 64))


# ---------------------------------------------------------------------------------------------
# targets (benchmarks/targets.py: the judge noises, seed 0)
# ---------------------------------------------------------------------------------------------
@dataclass
class DTarget:
    id: str  # e.g. gmm-d64@vp, digits-flow, val-unet32-eps-linear
    target: Q.Target
    ref_file: str  # the cached reference this target's numbers are measured against
    sched_label: str
    sched_key: str | None  # None for a network
    build_s: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)


def parse_target(spec: str, quick: bool) -> tuple[str, int]:
    name, _, b = spec.partition(":")
    if b:
        return name, int(b)
    return name, 64 if quick else T.default_batch(name, "judge")


def make_target(tid: str, batch: int, seed: int) -> DTarget:
    if seed != T.NOISE_SEEDS["judge"]:
        raise SystemExit(f"the judge noises are seed {T.NOISE_SEEDS['judge']} (benchmarks/targets.py); seed {seed} is not a noise set")
    if "@" in tid and (tid.split("@", 1)[1] not in T.SCHEDULES or tid.split("@", 1)[0] not in T.ORACLES):
        raise SystemExit(f"unknown oracle target {tid!r}: oracles {', '.join(T.ORACLES)}; schedules {', '.join(T.SCHEDULES)}")
    t = T.build(tid, batch, "judge")
    if t.kind == "zoo":
        floor = _digits_floor(batch)
        t.meta.update(metric_floor=floor)
    else:
        t.meta.update(metric_floor=t.metric(t.peer_model.sample(batch, seed=seed + 2)))
    return DTarget(tid, t, t.meta["reference_file"], repr(t.sched), tid.split("@", 1)[1] if "@" in tid else None, t.meta["build_s"], dict(t.meta))


def _digits_floor(batch: int) -> float:
    from fewstep.zoo.evaluate import DigitsEvaluator

    evaluator = DigitsEvaluator()
    return float(evaluator.evaluate(evaluator.split.train_x[:batch])["fd_features"])


# ---------------------------------------------------------------------------------------------
# fewstep's side (run every time)
# ---------------------------------------------------------------------------------------------
def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _metric(target: Q.Target, x: torch.Tensor) -> tuple[float | None, str]:
    try:
        return float(target.metric(x)), ""
    except Exception as exc:  # noqa: BLE001  a metric that cannot be computed is recorded, not fatal
        return None, _err(exc)


def _call_with(fn: Callable[..., Any], *args: Any, **maybe: Any) -> Any:
    """``fn(*args, **maybe)`` passing only the keyword arguments ``fn`` accepts."""
    try:
        params = inspect.signature(fn).parameters
        ok = {k: v for k, v in maybe.items() if k in params or any(p.kind is p.VAR_KEYWORD for p in params.values())}
    except (TypeError, ValueError):
        ok = {}
    return fn(*args, **ok)


def defaults_api(sched: fewstep.NoiseSchedule, nfe: int) -> dict[str, Any]:
    """What ``fewstep.defaults`` says the default call runs (if that module exists yet)."""
    try:
        import fewstep.defaults as D
    except Exception as exc:  # noqa: BLE001
        return {"error": f"fewstep.defaults not importable: {_err(exc)}"}
    out: dict[str, Any] = {}
    fn = getattr(D, "default_solver", None)
    name = None
    if fn is None:
        out["solver_error"] = "fewstep.defaults.default_solver does not exist"
    else:
        try:
            sol = _call_with(fn, sched, nfe=nfe)
            name, opts = (sol if isinstance(sol, tuple) else (sol, {}))
            out["solver"], out["solver_options"] = name, dict(opts or {})
        except Exception as exc:  # noqa: BLE001
            out["solver_error"] = _err(exc)
    fn = getattr(D, "default_spacing", None)
    if fn is None:
        out["spacing_error"] = "fewstep.defaults.default_spacing does not exist"
    else:
        try:
            out["spacing"] = _call_with(fn, sched, name, nfe=nfe)
        except Exception as exc:  # noqa: BLE001
            out["spacing_error"] = _err(exc)
    return out


def run_call(target: Q.Target, solver: str | None, n: int, *, metric: bool, **opts: Any) -> dict[str, Any]:
    """One fewstep call: RMSE vs the reference, the metric, what it ran; errors recorded."""
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"solver": solver, "options": opts, "nfe": n}
    try:
        args = (target.model, target.x_T) if solver is None else (target.model, target.x_T, solver)
        x, info = fewstep.sample(*args, nfe=n, return_info=True, **opts)
    except Exception as exc:  # noqa: BLE001
        rec.update(error=_err(exc), traceback=traceback.format_exc(limit=6), rmse=None, wall_s=time.perf_counter() - t0)
        return rec
    rec["wall_s"] = time.perf_counter() - t0
    plan = info.plan
    rec.update(nfe_used=int(info.nfe), plan=plan.name, meta={k: v for k, v in dict(plan.meta).items()},
               times=[float(t) for t in plan.times], rmse=float(fewstep.rmse(x, target.ref)), extra=dict(info.extra))
    problems = []
    if not _finite(rec["rmse"]):
        problems.append("non-finite samples")
    if rec["nfe_used"] > n:
        problems.append(f"used {rec['nfe_used']} NFE for a budget of {n}")
    if problems:
        rec["error"] = "; ".join(problems)
    if metric and not problems:
        rec["metric"], merr = _metric(target, x)
        if merr:
            rec["metric_error"] = merr
    return rec


def held_out_rule(tid: str) -> "fewstep.defaults.DefaultRule | None":
    """The default rule chosen without the model of ``tid`` (``reports/default_rule.json``, made by
    ``python benchmarks/default_rule.py select``), or ``None`` when that file does not cover it."""
    from default_rule import rule_from_json

    path = REPORTS / "default_rule.json"
    if not path.is_file():
        return None
    chosen = json.loads(path.read_text())
    entry = chosen["leave_one_model_out"].get(T.group_of(tid))
    if entry is not None and tid in entry["members"]:
        return rule_from_json(entry["rule"])
    if tid not in chosen["targets"] and not any(tid in e["members"] for e in chosen["leave_one_model_out"].values()):
        return rule_from_json(chosen["shipped"]["rule"])  # never fitted: the rule chosen on all the others is held out from it
    return None


#: the rule the library shipped before the validation zoo (chosen and judged on the same models)
FORMER_RULE = fewstep.defaults.DefaultRule(vp=fewstep.defaults.FamilyRule(fewstep.defaults.GridParams(0.0, 1.4)),
                                           flow=fewstep.defaults.FamilyRule(fewstep.defaults.GridParams(0.6, 1.1)), eps=None, dim_slope=0.0)


def run_rule(t: Q.Target, rule: "fewstep.defaults.DefaultRule", nfes: tuple[int, ...]) -> dict[int, dict[str, Any]]:
    """What ``rule`` would run on ``t`` at each NFE (its preset and grid for the model's declared
    schedule, parameterisation and dimension), run and measured."""
    out = {}
    for n in nfes:
        name, opts = rule.call(t.sched, n, T.dimension(t.model), t.model.prediction)
        out[n] = run_call(t, name, n, metric=True, **opts)
    return out


def fewstep_side(dt: DTarget, nfes: tuple[int, ...], *, fewstep_best: bool, final_order_table: bool = True) -> dict[str, Any]:
    t = dt.target
    t_start = time.perf_counter()
    out: dict[str, Any] = {"default": {}, "previous": {}, "final_order": [], "fewstep_best": {}, "timings": {}}
    t0 = time.perf_counter()
    for n in nfes:
        rec = run_call(t, None, n, metric=True)
        rec["defaults_api"] = defaults_api(t.sched, n)
        out["default"][n] = rec
        if rec.get("error"):
            log(f"[{dt.id}] DEFAULT CALL FAILED at NFE {n}: {rec['error']}")
    out["timings"]["default call"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    name, opts = PREVIOUS_DEFAULT
    for n in nfes:
        out["previous"][n] = run_call(t, name, n, metric=True, **opts)
    out["timings"]["previous default"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in FINAL_ORDER_PRESETS if final_order_table else ():
        for n in nfes:
            if n not in FINAL_ORDER_NFES:
                continue
            base = run_call(t, p, n, metric=False)
            fo1 = run_call(t, p, n, metric=False, final_order=1)
            for r in (base, fo1):
                r.pop("times", None)
                r.pop("traceback", None)
            out["final_order"].append({"preset": p, "nfe": n, "default": base, "final_order_1": fo1})
    out["timings"]["final_order table"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    held = held_out_rule(dt.id)
    out["lomo"] = {"rule": None if held is None else repr(held), **(run_rule(t, held, nfes) if held is not None else {})}
    out["timings"]["held-out rule"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["former"] = run_rule(t, FORMER_RULE, nfes)
    out["timings"]["former rule"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["autotune"] = {}
    for n in nfes:
        evals0, a0 = t.model.evaluations, time.perf_counter()
        rec = run_call(t, None, n, metric=True, autotune=fewstep.AutotuneOptions(cache_dir=CACHE / "autotune"))
        rec["tune"] = rec.pop("extra", {}).get("autotune")
        out["autotune"][n] = rec
    out["timings"]["autotune"] = time.perf_counter() - t0
    if fewstep_best:
        t0 = time.perf_counter()
        out["fewstep_best"] = best_fewstep(t, nfes)
        out["timings"]["best fewstep preset"] = time.perf_counter() - t0
    out["timings"]["total"] = time.perf_counter() - t_start
    log(f"[{dt.id}] fewstep side: {out['timings']['total']:.1f}s")
    return out


def best_fewstep(t: Q.Target, nfes: tuple[int, ...]) -> dict[int, dict[str, Any]]:
    """Every deterministic fewstep preset (and quality.py's variants) at every spacing: the best per NFE."""
    from fewstep.cli import parse_solver_arg

    try:
        presets, _, _ = Q.distinct_presets()
    except Exception as exc:  # noqa: BLE001
        log(f"[{t.name}] cannot list presets: {_err(exc)}")
        return {}
    spacings = tuple(Q.ZOO_SPACINGS if t.kind == "zoo" else Q.SPACINGS) + ("logistic", "leading_multistep")
    best: dict[int, dict[str, Any]] = {}
    samples: dict[int, torch.Tensor] = {}
    for p in presets + list(Q.VARIANTS):
        base, popts = parse_solver_arg(p)
        for n in nfes:
            for sp in spacings:
                try:
                    x, info = fewstep.sample(t.model, t.x_T, base, nfe=n, spacing=sp, return_info=True, **popts)
                except Exception:  # noqa: BLE001  (a spacing a schedule does not have, ...)
                    continue
                e = float(fewstep.rmse(x, t.ref))
                if int(info.nfe) <= n and math.isfinite(e) and (n not in best or e < best[n]["rmse"]):
                    best[n] = {"solver": p, "spacing": sp, "nfe_used": int(info.nfe), "rmse": e}
                    samples[n] = x
    for n, x in samples.items():
        best[n]["metric"], _ = _metric(t, x)
    return best


# ---------------------------------------------------------------------------------------------
# the peers' side (cached)
# ---------------------------------------------------------------------------------------------
class PeerCache(RecordCache):
    """``benchmarks/.cache/peers-<target>.json``: one record per peer run."""

    def __init__(self, target_id: str, read: bool) -> None:
        super().__init__(CACHE / f"peers-{target_id}.json", PEER_CACHE_FORMAT, read)

    @staticmethod
    def key(peer: str, option: str, nfe: int, batch: int, seed: int, ref_file: str) -> str:
        return json.dumps([peer, option, nfe, batch, seed, ref_file, package_version("diffusers"), package_version("k-diffusion"), MODEL_MODE])


def peers_side(dt: DTarget, nfes: tuple[int, ...], *, kdiffusion: bool, read_cache: bool) -> dict[str, Any]:
    t = dt.target
    t_start = time.perf_counter()
    cache = PeerCache(dt.id, read_cache)
    batch, seed = int(t.x_T.shape[0]), int(dt.meta["seed"])
    ctx = peers_mod.PeerContext(t.peer_model, t.sched, MODEL_MODE)
    records: list[dict[str, Any]] = []
    fresh = cached = 0
    fresh_s = 0.0
    timings: dict[str, float] = {}
    try:
        peers = peers_mod.all_peers(kdiffusion=kdiffusion, schedule=t.sched)
    except Exception as exc:  # noqa: BLE001
        log(f"[{dt.id}] cannot list peers: {_err(exc)}")
        peers = []
    for peer in peers:
        t0 = time.perf_counter()
        n_fresh = 0
        for n in nfes:
            if n < peer.min_nfe:
                continue
            for opt in peer.options:
                label = peer.option_label(opt)
                key = PeerCache.key(peer.name, label, n, batch, seed, dt.ref_file)
                rec = cache.get(key)
                if rec is not None:
                    cached += 1
                    records.append({**rec, "cached": True})
                    continue
                r0 = time.perf_counter()
                rec = {"peer": peer.name, "source": peer.source, "option": label, "nfe": n}
                try:
                    res = peer.run(ctx, opt, t.x_T, n)
                except Exception as exc:  # noqa: BLE001  an option that fails is recorded and skipped
                    rec.update(rmse=None, error=_err(exc))
                    res = None
                else:
                    if res is None:
                        rec.update(rmse=None, duplicate=True)
                if res is not None:
                    x, used = res
                    rec.update(nfe_used=int(used), rmse=float(fewstep.rmse(x, t.ref)))
                    if used > n:
                        rec["error"] = f"used {used} model calls for an NFE budget of {n}"
                    elif not math.isfinite(rec["rmse"]):
                        rec["error"] = "non-finite samples"
                    else:
                        rec["metric"], merr = _metric(t, x)
                        if merr:
                            rec["metric_error"] = merr
                rec["wall_s"] = time.perf_counter() - r0
                fresh_s += rec["wall_s"]
                cache.put(key, rec)
                records.append({**rec, "cached": False})
                fresh += 1
                n_fresh += 1
        timings[peer.name] = time.perf_counter() - t0
        if n_fresh:
            cache.save()
            log(f"[{dt.id}] {peer.name}: {n_fresh} runs, {timings[peer.name]:.1f}s")
    wall = time.perf_counter() - t_start
    log(f"[{dt.id}] peers: {fresh} run, {cached} from cache, {wall:.1f}s")
    return {"records": records, "fresh": fresh, "cached": cached, "fresh_s": fresh_s, "wall_s": wall, "timings": timings,
            "cache_file": str(cache.path.relative_to(CACHE.parent.parent)) if cache.path.is_relative_to(CACHE.parent.parent) else str(cache.path),
            "families": [p.name for p in peers]}


def cached_best_peers(tid: str) -> dict[int, float]:
    """The best peer's RMSE per NFE on ``tid``'s judge noises, from the peer cache alone (empty when
    the peers have not run: ``python benchmarks/defaults.py --peers-only --targets TID``)."""
    batch = T.default_batch(tid, "judge")
    cache = PeerCache(tid, True)
    best: dict[int, float] = {}
    for key, rec in cache.entries.items():
        peer, option, nfe, b, seed, ref_file, *_ = json.loads(key)
        if b != batch or seed != T.NOISE_SEEDS["judge"] or rec.get("error") or not _finite(rec.get("rmse")) or rec.get("nfe_used", nfe) > nfe:
            continue
        best[int(nfe)] = min(best.get(int(nfe), math.inf), float(rec["rmse"]))
    return best


def best_peer(records: list[dict[str, Any]], n: int, source: str | None = None) -> dict[str, Any] | None:
    ok = [r for r in records if r["nfe"] == n and not r.get("error") and _finite(r.get("rmse"))
          and (source is None or r["source"] == source)]
    return min(ok, key=lambda r: r["rmse"]) if ok else None


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    return f"{v:.4g}" if _finite(v) else "n/a"


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if _finite(a) and _finite(b) and b > 0 else None


def _rcell(r: float | None, bold_above: float = 1.0) -> str:
    if r is None:
        return "n/a"
    txt = f"{r:.3g}"
    if txt == "1" and r != 1.0:  # 0.9996 / 1.004: show on which side of 1 it is
        txt = f"{r:.4f}"
    return f"**{txt}**" if r > bold_above else txt


def _meta_str(meta: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in meta.items() if k != "preset") or "-"


def _ran(rec: dict[str, Any]) -> str:
    if rec.get("plan") is None:
        return "n/a"
    api = rec.get("defaults_api", {})
    sp = rec.get("meta", {}).get("spacing") or api.get("spacing") or "?"
    s = f"`{rec['plan']}` ({_meta_str(rec.get('meta', {}))}) on `{sp}`"
    if api.get("solver") is not None and api["solver"] != rec["plan"]:
        s += f" [default_solver() says `{api['solver']}`!]"
    return s


def _peer_str(p: dict[str, Any] | None) -> str:
    if p is None:
        return "n/a"
    return f"{p['peer']} ({p['option']}; {p.get('nfe_used', '?')} NFE)"


def comparator(res: dict[str, Any], n: int) -> tuple[str, dict[str, Any] | None]:
    """What the default is held against at NFE n: the best peer, else (no peer at all) fewstep's best preset."""
    bp = best_peer(res["peers"]["records"], n)
    if bp is not None:
        return "peer", bp
    fb = res["fewstep"]["fewstep_best"].get(n)
    if fb is not None:
        return "fewstep-best", {"peer": f"fewstep {fb['solver']}", "option": fb["spacing"], "nfe_used": fb["nfe_used"], "rmse": fb["rmse"]}
    return "none", None


def target_section(dt: DTarget, res: dict[str, Any], nfes: tuple[int, ...]) -> list[str]:
    t, fs, pe = dt.target, res["fewstep"], res["peers"]
    mh = t.metric_header
    lines = [f"## {dt.id}", "", t.describe, ""]
    fams = pe["families"]
    n_diff = sum(1 for f in fams if f.startswith("diffusers"))
    if n_diff == 0:
        lines += [f"No diffusers scheduler takes `{t.sched!r}`: the peers are {'k-diffusion samplers only' if fams else 'none'}"
                  + (", and the default is also held against fewstep's own best preset at its best grid (all deterministic presets "
                     "and quality.py's variants over quality.py's spacings; the column 'best fewstep')." if fs["fewstep_best"] else "."), ""]
    lines += [f"Peers ({len(fams)} families, each at its best option per NFE): " + ", ".join(fams) + ".", ""]

    rows = []
    for n in nfes:
        d, prev = fs["default"][n], fs["previous"][n]
        kind, bp = comparator(res, n)
        bd = best_peer(pe["records"], n, "diffusers")
        if d.get("error"):
            dcell, rcell, rdcell = f"**FAILED: {d['error'][:160]}**", "**FAILED**", "**FAILED**"
        else:
            dcell = _fmt(d["rmse"])
            rcell = _rcell(_ratio(d["rmse"], bp["rmse"] if bp else None)) + (" (vs fewstep best)" if kind == "fewstep-best" else "")
            rdcell = _rcell(_ratio(d["rmse"], bd["rmse"] if bd else None))
        row = [n, dcell, _fmt(d.get("metric")), d.get("nfe_used", "n/a"), _peer_str(bp), _fmt(bp["rmse"] if bp else None),
               _fmt(bp.get("metric") if bp else None), rcell, _peer_str(bd), _fmt(bd["rmse"] if bd else None), rdcell]
        if fs["fewstep_best"]:
            fb = fs["fewstep_best"].get(n)
            row += [f"{fb['solver']} ({fb['spacing']})" if fb else "n/a", _fmt(fb["rmse"] if fb else None),
                    "**FAILED**" if d.get("error") else _rcell(_ratio(d.get("rmse"), fb["rmse"] if fb else None))]
        prev_cell = _fmt(prev.get("rmse")) if not prev.get("error") else f"error: {prev['error'][:60]}"
        row += [prev_cell, _fmt(prev.get("metric")),
                "**FAILED**" if d.get("error") else _rcell(_ratio(d.get("rmse"), prev.get("rmse")))]
        rows.append(row)
    head = ["NFE", "default RMSE", f"default {mh}", "NFE used", "best peer (option; NFE used)", "RMSE", f"peer {mh}",
            "default / peer", "best diffusers (option; NFE used)", "RMSE", "default / diffusers"]
    if fs["fewstep_best"]:
        head += ["best fewstep (spacing)", "RMSE", "default / best fewstep"]
    head += ["previous default (ddim, uniform_t) RMSE", f"previous {mh}", "default / previous"]
    lines += ["### The default call vs the best peer", "",
              "`fewstep.sample(model, x_T, nfe=N)` with nothing else named. Ratios < 1: the default is more accurate; > 1 in bold. "
              "'previous default' = `fewstep.sample(model, x_T, \"ddim\", nfe=N, spacing=\"uniform_t\")`, the old default call.", "",
              markdown_table(head, rows), ""]

    ran = []
    for n in nfes:
        d = fs["default"][n]
        api = d.get("defaults_api", {})
        api_s = (f"`{api['solver']}`" + (f" {api['solver_options']}" if api.get("solver_options") else "")) if "solver" in api else \
            api.get("solver_error") or api.get("error", "n/a")
        sp_s = f"`{api['spacing']}`" if "spacing" in api else api.get("spacing_error") or api.get("error", "n/a")
        grid = d.get("times")
        grid_s = ("[" + ", ".join(f"{x:.4g}" for x in grid) + "]") if grid and len(grid) <= 12 else \
            (f"[{grid[0]:.4g}, {grid[1]:.4g}, ..., {grid[-2]:.4g}, {grid[-1]:.4g}] ({len(grid)} times)" if grid else "n/a")
        ran.append([n, "**FAILED**" if d.get("error") and d.get("plan") is None else f"`{d.get('plan')}`",
                    _meta_str(d.get("meta", {})) if d.get("meta") else "n/a", api_s, sp_s, grid_s, f"{d.get('wall_s', 0):.2f}"])
    lines += ["### What the default call ran", "",
              markdown_table(["NFE", "info.plan.name", "info.plan.meta", "defaults.default_solver(sched)",
                              "defaults.default_spacing(sched, name)", "time grid", "wall s"], ran), ""]
    fails = [(n, fs["default"][n]) for n in nfes if fs["default"][n].get("error")]
    if fails:
        lines += ["**The default call FAILED** (a bug, not an n/a):", ""]
        for n, d in fails:
            tb = d.get("traceback", "").strip().splitlines()
            lines += [f"- NFE {n}: `{d['error']}`" + (f" (at `{tb[-3].strip()}`)" if len(tb) >= 3 else "")]
        lines += [""]

    fo_rows = []
    for e in fs["final_order"]:
        b, f1 = e["default"], e["final_order_1"]
        fo_rows.append([e["preset"], e["nfe"], b.get("meta", {}).get("final_order", "?") if not b.get("error") else "n/a",
                        _fmt(b.get("rmse")) if not b.get("error") else f"error: {b['error'][:80]}",
                        _fmt(f1.get("rmse")) if not f1.get("error") else f"error: {f1['error'][:80]}",
                        _rcell(_ratio(f1.get("rmse"), b.get("rmse")) if not (b.get("error") or f1.get("error")) else None)])
    if fo_rows:
        lines += ["### Order of the step into sigma = 0", "",
                  "Each preset at its default grid (no spacing named): RMSE with the preset's default `final_order` "
                  "(recorded from `info.plan.meta`) and with `final_order=1`; ratio final_order=1 / default (> 1 in bold: "
                  "order 1 into sigma = 0 is worse here).", "",
                  markdown_table(["preset", "NFE", "default final_order", "RMSE (default)", "RMSE (final_order=1)",
                                  "final_order=1 / default"], fo_rows), ""]

    errs: dict[str, list[str]] = {}
    for r in pe["records"]:
        if r.get("error"):
            errs.setdefault(r["peer"], []).append(f"{r['option']} @ {r['nfe']}: {r['error'][:100]}")
    if errs:
        lines += ["Peer options that failed (recorded, skipped):", ""]
        lines += [f"- {k}: {len(v)} runs, e.g. {v[0]}" for k, v in errs.items()] + [""]
    tm = res["timings"]
    lines += [f"Time: target (reference, metric) {tm['build_s']:.1f} s; fewstep side {fs['timings']['total']:.1f} s "
              f"({', '.join(f'{k} {v:.1f} s' for k, v in fs['timings'].items() if k != 'total')}); peers {pe['wall_s']:.1f} s "
              f"({pe['fresh']} runs now, {pe['fresh_s']:.1f} s; {pe['cached']} from `{pe['cache_file']}`).", ""]
    return lines


def _ratio_grid(results: dict[str, dict[str, Any]], targets: dict[str, DTarget], nfes: tuple[int, ...], column: str,
                bar: float) -> tuple[list[list[str]], list[str], int, list[float]]:
    """Rows target x NFE of ``column``'s RMSE / the best peer's (bold above ``bar``), the misses, the
    number of cells and every ratio."""
    rows, misses, cells, ratios = [], [], 0, []
    for tid, res in results.items():
        row = [f"{tid} (d={targets[tid].meta.get('dim', '?')})"]
        for n in nfes:
            rec = res["fewstep"].get(column, {}).get(n)
            kind, bp = comparator(res, n)
            if rec is None:
                row.append("n/a")
                continue
            cells += 1
            if rec.get("error"):
                row.append("**FAILED**")
                misses.append(f"{tid} @ NFE {n}: FAILED ({rec['error'][:80]})")
                continue
            r = _ratio(rec.get("rmse"), bp["rmse"] if bp else None)
            if r is not None:
                ratios.append(r)
            if r is None or r > bar:
                misses.append(f"{tid} @ NFE {n}: {_fmt(r)} vs {_peer_str(bp)}")
            row.append(_rcell(r, bar) + ("†" if kind == "fewstep-best" else ""))
        rows.append(row)
    return rows, misses, cells, ratios


def held_out_section(results: dict[str, dict[str, Any]], targets: dict[str, DTarget], nfes: tuple[int, ...]) -> list[str]:
    """The static rule chosen without the judged model (leave one model out), against the best peer."""
    rows, misses, cells, ratios = _ratio_grid(results, targets, nfes, "lomo", 1.0)
    if not cells:
        return ["(No held-out rules: run `python benchmarks/default_rule.py fit` and `select` first.)", ""]
    worst = {n: max((_ratio(results[t]["fewstep"]["lomo"][n].get("rmse"), (comparator(results[t], n)[1] or {}).get("rmse")) or 0.0)
                    for t in results if n in results[t]["fewstep"].get("lomo", {})) for n in nfes}
    lines = ["## Leave one model out: the static rule chosen WITHOUT the judged model / best peer", "",
             "For each model, `benchmarks/default_rule.py select` chose the rule (preset, logistic centre and scale per family, "
             "dimension slope) on every other model's fit noises (`reports/default_rule.md`); here it runs on this model's judge "
             "noises, against the best peer at its best grid. A model that never entered the fit runs the rule chosen on all the "
             "others (the library's rule). Searched schedules are off everywhere (`tuned_schedules` emptied). "
             "Target: <= 1 in every cell.", "",
             markdown_table(["target"] + [f"NFE {n}" for n in nfes], rows), "",
             "Worst held-out ratio per NFE: " + ", ".join(f"NFE {n}: {worst[n]:.3g}" for n in nfes)
             + f"; geometric mean over all {len(ratios)} cells {math.exp(sum(map(math.log, ratios)) / len(ratios)):.3g}.", ""]
    lines += ([f"**Held-out bar (<= 1): NOT met** in {len(misses)} of {cells} cells:", ""] + [f"- {m}" for m in misses] + [""]) if misses \
        else [f"**Held-out bar (<= 1): met** in all {cells} cells.", ""]
    return lines


def former_section(results: dict[str, dict[str, Any]], targets: dict[str, DTarget], nfes: tuple[int, ...]) -> list[str]:
    """The rule shipped before the validation zoo, on the same judge noises: what the change bought."""
    rows, _, cells, ratios = _ratio_grid(results, targets, nfes, "former", 1.0)
    if not cells or not ratios:
        return []
    now = [r for r in _ratio_grid(results, targets, nfes, "default", 1.0)[3]]
    gm = lambda v: math.exp(sum(map(math.log, v)) / len(v))  # noqa: E731
    return ["## The former rule (fewstep 0.2.0 before the validation zoo) / best peer", "",
            f"`{FORMER_RULE!r}`: UniPC on the logistic grid, centre 0 (flow 0.6), scale 1.4 (flow 1.1), no dimension or "
            "parameterisation term, chosen on the bundled models it was then judged on.", "",
            markdown_table(["target"] + [f"NFE {n}" for n in nfes], rows), "",
            f"Geometric mean over {len(ratios)} cells {gm(ratios):.3g}, worst {max(ratios):.3g} "
            f"(the default call now: {gm(now):.3g}, worst {max(now):.3g}).", ""]


def autotune_section(results: dict[str, dict[str, Any]], targets: dict[str, DTarget], nfes: tuple[int, ...]) -> list[str]:
    """``sample(..., autotune=True)`` against the best peer, and what tuning cost."""
    rows, misses, cells, ratios = _ratio_grid(results, targets, nfes, "autotune", 0.8)
    if not cells:
        return []
    cost_rows = []
    for tid, res in results.items():
        row = [tid]
        for n in nfes:
            rec = res["fewstep"]["autotune"].get(n) or {}
            tune = rec.get("tune") or {}
            row.append(f"{tune.get('tuning_evaluations', '?')} / {tune.get('tuning_wall_s', float('nan')):.1f} s ({tune.get('choice', '?')})"
                       if tune else "n/a")
        cost_rows.append(row)
    lines = ["## Autotune: `sample(model, x_T, nfe=N, autotune=True)` / best peer", "",
             "Autotune chose among the default, its neighbours (`fewstep.autotune.candidates`) and the default preset on the GITS grid "
             "of its reference solve, on its own keyed noises "
             f"(seed {fewstep.AutotuneOptions().seed}: neither the judge nor the fit noises) against a fine solve of them, within "
             f"{fewstep.AutotuneOptions().budget} sample-evaluations. Target: <= 0.8 in every cell.", "",
             markdown_table(["target"] + [f"NFE {n}" for n in nfes], rows), "",
             f"Geometric mean over all {len(ratios)} cells {math.exp(sum(map(math.log, ratios)) / len(ratios)):.3g}.", ""]
    lines += ([f"**Autotune bar (<= 0.8): NOT met** in {len(misses)} of {cells} cells:", ""] + [f"- {m}" for m in misses] + [""]) if misses \
        else [f"**Autotune bar (<= 0.8): met** in all {cells} cells.", ""]
    lines += ["Cost of tuning, per target and NFE: sample-evaluations / wall time on this machine (the choice). Tuned once per "
              "(model, NFE, sample shape); later calls read the cache.", "",
              markdown_table(["target"] + [f"NFE {n}" for n in nfes], cost_rows), ""]
    return lines


def _git_state() -> str:
    """The checkout the library was imported from (the default call measures whatever it holds)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return f"git {sha or '?'}" + (" + uncommitted changes under src/" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=None,
                    help="target ids [:batch], or the groups 'oracles', 'networks', 'all' (default: all)")
    ap.add_argument("--nfe", nargs="+", type=int, default=None, help=f"NFE budgets (default {' '.join(map(str, NFES))})")
    ap.add_argument("--quick", action="store_true", help="gmm-d64@vp and gmm-d64@flow, batch 64, NFE 5 10 -> reports/defaults_quick.md")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-peers-cache", action="store_true", help="rerun every peer (the cache is rewritten with the new results)")
    ap.add_argument("--no-kdiffusion", action="store_true", help="leave out the k-diffusion peers")
    ap.add_argument("--fewstep-best", action="store_true",
                    help="also search fewstep's best preset at its best grid on every target (always on for linear-vp, cosine-vp)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: $FEWSTEP_BENCH_THREADS or all CPUs of this process)")
    ap.add_argument("--no-final-order", action="store_true", help="leave out the table of final_order=1 against each preset's default")
    ap.add_argument("--peers-only", action="store_true", help="only run (and cache) the peers of the targets; no report")
    ap.add_argument("--out", default=None, help="report path (default reports/defaults.md, or reports/defaults_quick.md with --quick); JSON beside it")
    args = ap.parse_args(argv)
    quiet_diffusers()
    threads = set_threads(args.threads)

    specs: list[tuple[str, int]] = []
    for spec in (args.targets or (["quick"] if args.quick else ["all"])):
        if spec == "quick":
            specs += list(QUICK_TARGETS)
        elif spec in ("all", "oracles", "networks"):
            group = [tid for tid in T.all_target_ids() if spec == "all" or (("@" in tid) == (spec == "oracles"))]
            specs += [parse_target(tid, args.quick) for tid in group]
        else:
            specs.append(parse_target(spec, args.quick))
    specs = list(dict.fromkeys(specs))
    nfes = tuple(sorted(set(args.nfe or (QUICK_NFES if args.quick else NFES))))
    out = Path(args.out) if args.out else REPORTS / ("defaults_quick.md" if args.quick else "defaults.md")

    t_all = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    targets: dict[str, DTarget] = {}
    for tid, batch in specs:
        log(f"=== {tid} (batch {batch})")
        dt = make_target(tid, batch, args.seed)
        if args.peers_only:
            peers_side(dt, nfes, kdiffusion=not args.no_kdiffusion, read_cache=not args.no_peers_cache)
            continue
        fs = fewstep_side(dt, nfes, fewstep_best=args.fewstep_best or dt.sched_key in FEWSTEP_BEST_SCHEDULES,
                          final_order_table=not args.no_final_order)
        pe = peers_side(dt, nfes, kdiffusion=not args.no_kdiffusion, read_cache=not args.no_peers_cache)
        results[dt.id] = {"fewstep": fs, "peers": pe, "timings": {"build_s": dt.build_s, "fewstep_s": fs["timings"]["total"],
                                                                  "peers_s": pe["wall_s"]}}
        targets[dt.id] = dt
    wall = time.perf_counter() - t_all
    if args.peers_only:
        log(f"peers cached for {len(specs)} targets ({wall:.0f} s)")
        return 0

    # ---- headline
    hl_rows: list[list[str]] = []
    fb_rows: list[list[str]] = []
    misses: list[str] = []
    failures: dict[str, list[str]] = {}  # error -> the cells (target @ NFE) where the default call failed with it
    n_cells = 0
    for tid, res in results.items():
        row = [f"{tid} (b{targets[tid].meta['batch']})"]
        fb_row = [tid]
        for n in nfes:
            d = res["fewstep"]["default"][n]
            kind, bp = comparator(res, n)
            if d.get("error"):
                failures.setdefault(d["error"][:200], []).append(f"{tid} @ {n}")
                row.append("**FAILED**")
                n_cells += 1
            elif bp is None:
                row.append("n/a")
            else:
                r = _ratio(d["rmse"], bp["rmse"])
                n_cells += 1
                if r is None or r > 1.0:
                    misses.append(f"{tid} @ NFE {n}: {_fmt(r)} vs {_peer_str(bp)}")
                row.append(_rcell(r) + ("†" if kind == "fewstep-best" else ""))
            fb = res["fewstep"]["fewstep_best"].get(n)
            fb_row.append("**FAILED**" if d.get("error") else (_rcell(_ratio(d.get("rmse"), fb["rmse"])) + f" ({fb['solver']}, {fb['spacing']})" if fb else "n/a"))
        ran = [fs_ran for fs_ran in (res["fewstep"]["default"][n] for n in nfes) if fs_ran.get("plan")]
        combos = list(dict.fromkeys(f"{d['plan']} on {d.get('meta', {}).get('spacing') or d.get('defaults_api', {}).get('spacing', '?')}"
                                    + (f", final_order={d['meta']['final_order']}" if "final_order" in d.get("meta", {}) else "") for d in ran))
        row.append("; ".join(combos) or "**FAILED**")
        hl_rows.append(row)
        if res["fewstep"]["fewstep_best"]:
            fb_rows.append(fb_row)

    command = " ".join(["python benchmarks/defaults.py", *(argv if argv is not None else sys.argv[1:])])
    ran_any = next((r["fewstep"]["default"][n] for r in results.values() for n in nfes if r["fewstep"]["default"][n].get("plan")), None)
    head = [
        "# Defaults: `fewstep.sample(model, x_T, nfe=N)` vs the best peer at its best grid", "",
        f"Generated by `{command}` in {wall:.0f} s wall time ({time.strftime('%Y-%m-%d %H:%M')}).", "",
        "Machine:", *machine_lines(), f"- fewstep source: {_git_state()}", "",
        "The default call names no solver and no spacing: it measures whatever the library's defaults are at run time. "
        "Peers (`benchmarks/peers.py`, chosen by the model's schedule with `all_peers(schedule=...)`): diffusers' schedulers "
        "and k-diffusion's samplers, each at its best grid option per NFE (diffusers `timestep_spacing` / Karras sigmas, "
        "flow `shift` / `flow_shift` in 0.5, 1, 2, 3; EDM sigma schedules; k-diffusion Karras / exponential sigmas), "
        f"querying the model at the noise level they ask for (`--model-mode {MODEL_MODE}`). All start from the same keyed "
        "noise `fewstep.initial_noise(sched, shape, seed)` in float64 and end at sigma = 0. RMSE against a reference "
        "solution of the probability-flow ODE from the same noise (oracles: DOP853; networks: UniPC at NFE 400). "
        f"Peer runs come from the cache `benchmarks/.cache/peers-<target>.json` when present (`--no-peers-cache` reruns them).", "",
        "## Headline: RMSE ratio default / best peer (< 1: the default is more accurate)", "",
        markdown_table(["target"] + [f"NFE {n}" for n in nfes] + ["the default ran"], hl_rows), "",
    ]
    if any("†" in c for r in hl_rows for c in r[1:-1]):
        head += ["† no peer ran on this target: the ratio is to fewstep's own best preset at its best grid.", ""]
    n_failed = sum(len(v) for v in failures.values())
    if misses or failures:
        head += [f"**Bar (default / best peer <= 1 in every cell): NOT met** in {len(misses) + n_failed} of {n_cells} cells"
                 + (f" ({len(misses)} with a ratio > 1, {n_failed} where the default call FAILED)" if failures else "") + ":", ""]
        head += [f"- {m}" for m in misses] + [""]
    else:
        head += [f"**Bar (default / best peer <= 1 in every cell): met** in all {n_cells} cells.", ""]
    if failures:
        head += ["**THE DEFAULT CALL FAILED** (a bug in the library, not a missing number):", ""]
        for err, cells in failures.items():
            head += [f"- `{err}` in {len(cells)} cells: " + ", ".join(cells)]
        head += [""]
    head += held_out_section(results, targets, nfes) + former_section(results, targets, nfes) + autotune_section(results, targets, nfes)
    if fb_rows:
        head += ["Where no diffusers scheduler applies (and on request, `--fewstep-best`): ratio default / fewstep's own best "
                 "preset at its best grid (preset, spacing):", "",
                 markdown_table(["target"] + [f"NFE {n}" for n in nfes], fb_rows), ""]
    if ran_any is not None:
        head += [f"The default call ran e.g. {_ran(ran_any)}; per target and NFE in the sections below.", ""]
    tm_rows = [[tid, f"{r['timings']['build_s']:.1f}", f"{r['timings']['fewstep_s']:.1f}", f"{r['timings']['peers_s']:.1f}",
                r["peers"]["fresh"], r["peers"]["cached"]] for tid, r in results.items()]
    head += ["Time per target (s): reference and metric set-up, fewstep's side (run every time), peers (run, or read from the cache):", "",
             markdown_table(["target", "set-up s", "fewstep s", "peers s", "peer runs now", "peer runs cached"], tm_rows), ""]

    sections: list[str] = []
    for tid, res in results.items():
        sections += target_section(targets[tid], res, nfes)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(head + sections))
    js = {"command": command, "wall_s": wall, "fewstep_source": _git_state(), "date": time.strftime("%Y-%m-%d %H:%M"), "threads": threads,
          "machine": dict(line[2:].split(": ", 1) for line in machine_lines()), "nfes": list(nfes),
          "bar_met": not (misses or failures), "bar_misses": misses, "default_failures": failures,
          "targets": {tid: {"meta": targets[tid].meta, "describe": targets[tid].target.describe, **res} for tid, res in results.items()}}
    write_text_atomic(out.with_suffix(".json"), json.dumps(js, indent=1, default=str))
    log(f"wrote {out} and {out.with_suffix('.json')} ({wall:.0f} s)")
    print("\n".join(head[head.index("## Headline: RMSE ratio default / best peer (< 1: the default is more accurate)"):]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

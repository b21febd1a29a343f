"""Solver-schedule search (issue 14): is a searched schedule (``fewstep.search``) clearly better than the best
fewstep preset at its best grid, and than the best diffusers / k-diffusion peer at its best grid option, on
noises the search never saw?

Targets and NFE 4, 5, 6, 8, 10:

* the exact oracle ``gmm-d3072`` on ``DiscreteVP.linear()``: a search is RUN here per NFE,
  ``fewstep.search(model, nfe, n_calibration=128, n_heldout=256, cache_dir=benchmarks/.cache/search,
  state=benchmarks/.cache/search/gmm-d3072-nfe<N>.state.json)`` (resumable; a finished state is reused),
  with its wall time and model evaluations;
* the bundled networks ``digits-vp-eps``, ``digits-flow``, ``digits-edm``: NOT searched here; the schedules they
  ship (``fewstep.zoo.load(name).tuned_schedules[nfe]``, made by ``python -m fewstep.zoo.tune``) are measured and
  their recorded provenance reported. An NFE with no tuned schedule yet is said so in every table.

Per target and NFE, on the held-out noises ``fewstep.initial_noise(sched, (256, *shape), 0, indices=range(C, C + 256))``
(C = the search's calibration count: 128 for gmm-d3072, 256 for the networks; the start of the search's own
held-out set), against the cached references ``fewstep.schedule_search.reference_set`` (UniPC at NFE 200):
the searched schedule's RMSE; the best fewstep preset at its best grid (every deterministic preset of
quality.py's ``distinct_presets()`` plus its VARIANTS, on the spacings logistic, quadratic, uniform_t,
uniform_lambda, karras, plus leading / leading_multistep / trailing on DiscreteVP); the best peer at its best
grid option (defaults.py's peers machinery). Bars: searched / best preset <= 0.6 at NFE 4-6 and <= 0.8 at
NFE 8-10; networks at NFE 6: the searched samples' digits feature FD within 1.5x the converged model's
(the reference samples of the same noises); held-out error within 1.2x the calibration error (the tune
runs' own numbers: 256 calibration, 1000 held-out noises); search wall time <= 10 min per (target, NFE).

    python benchmarks/search.py                               # everything -> reports/search.md (+ .json)
    python benchmarks/search.py --quick                       # gmm-d3072, NFE 5, tiny search -> reports/search_quick.md
    python benchmarks/search.py --targets gmm-d3072 --nfe 4
    python benchmarks/search.py --targets networks --nfe 4 5 6

Cached (a rerun is cheap): the searches (their state files), the references (``benchmarks/.cache/search`` for the
oracle, ``~/.cache/fewstep`` -- the tune runs' cache -- for the networks), every preset run (keyed by the plan
the preset builds, the noises and the fewstep version: ``benchmarks/.cache/search/presets-<target>.json``) and
every peer run (``benchmarks/.cache/peers-search-<target>.json``). No number is asserted; nothing here is a test.
"""

from __future__ import annotations

import _common  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

import argparse
import hashlib
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import fewstep
from fewstep.report import markdown_table

from _common import CACHE, REPORTS, RecordCache, log, machine_lines, quiet_diffusers, set_threads, write_text_atomic
import defaults as D
import quality as Q

ORACLE_TARGETS = ("gmm-d3072",)
NETWORK_TARGETS = ("digits-vp-eps", "digits-flow", "digits-edm")
NFES = (4, 5, 6, 8, 10)
FD_NFES = (4, 5, 6)
FD_BAR_NFE = 6
FD_BAR = 1.5
GENERALISATION_BAR = 1.2
WALL_BAR_S = 600.0
HELDOUT = 256
ORACLE_CALIBRATION = 128
NETWORK_CALIBRATION = 256  # the tune runs' (read from the schedule's provenance when it exists)
NOISE_SEED = 0
SEARCH_CACHE = CACHE / "search"
BASE_SPACINGS = ("logistic", "quadratic", "uniform_t", "uniform_lambda", "karras")
DISCRETE_SPACINGS = ("leading", "leading_multistep", "trailing")
PLAN_CHUNK = 16  # plans evaluated together (16 x 256 rows = one 4096-row model call)
#: --screen: the networks' preset sweep runs every plan on the first SCREEN noises and the SCREEN_KEEP best on all
SCREEN = 32
SCREEN_KEEP = 16
PRESET_CACHE_FORMAT = 1
#: --quick: gmm-d3072 at NFE 5, few noises, a tiny search (checks the script, measures nothing)
QUICK = {"nfes": (5,), "calibration": 32, "heldout": 64,
         "budget": {"generations": 3, "refine_generations": 1, "population": 4, "offspring": 8}}


def preset_bar(n: int) -> float:
    return 0.6 if n <= 6 else 0.8


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: Any, spec: str = ".4g") -> str:
    return format(v, spec) if _finite(v) else "n/a"


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if _finite(a) and _finite(b) and b > 0 else None


# ---------------------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------------------
@dataclass
class STarget:
    id: str
    kind: str  # "oracle" | "zoo"
    model: fewstep.Model
    peer_model: Any  # the oracle (GaussianMixture) or the same Model
    sched: fewstep.NoiseSchedule
    shape: tuple[int, ...]
    calibration: int  # C: the held-out noises are indices C .. C + heldout - 1
    heldout: int
    cache_dir: Path | None  # reference cache (None: fewstep's default, the tune runs')
    noises: torch.Tensor | None = None  # the held-out noises (float32, like the search's)
    ref: torch.Tensor | None = None  # their references (float64)
    ref_info: dict[str, Any] = field(default_factory=dict)
    tuned: dict[int, Any] = field(default_factory=dict)  # networks: the shipped schedules
    tuned_error: str | None = None
    card_entries: dict[str, Any] = field(default_factory=dict)
    build_s: float = 0.0

    @property
    def noise_key(self) -> str:
        """What identifies the held-out set and its references (the preset and peer cache keys)."""
        from fewstep.schedule_search.objective import model_identity as mid

        return (f"{mid(self.model)}|initial_noise seed {NOISE_SEED} indices {self.calibration}..{self.calibration + self.heldout - 1}"
                f" shape {list(self.shape)}|{self.ref_info.get('method', '?')}")

    def held_noises(self, n: int | None = None) -> torch.Tensor:
        n = self.heldout if n is None else n
        return fewstep.initial_noise(self.sched, (n, *self.shape), NOISE_SEED, indices=range(self.calibration, self.calibration + n))


def oracle_target(name: str, calibration: int, heldout: int) -> STarget:
    oracle = fewstep.bundled_oracle(name)
    sched = fewstep.DiscreteVP.linear()
    base = oracle.as_model(sched)
    model = fewstep.Model(base.fn, sched, base.prediction, name=base.name, sample_shape=(oracle.dim,),
                          identity=f"oracle:{name}|vp-linear")
    return STarget(name, "oracle", model, oracle, sched, (oracle.dim,), calibration, heldout, SEARCH_CACHE)


def _retry(fn: Any, what: str, tries: int = 5) -> Any:
    """The tune runs replace schedule files and cards while this runs (each atomically, but a file and its
    card one after the other): a SHA mismatch seen in between goes away on a second look."""
    for i in range(tries):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            if i == tries - 1:
                raise
            log(f"{what}: {_err(exc)}; retrying")
            time.sleep(2.0)
    return None


def network_target(name: str, heldout: int) -> STarget:
    from fewstep.zoo import card

    model = _retry(lambda: fewstep.zoo.load(name), f"loading {name}")
    tuned: dict[int, Any] = {}
    tuned_error = None
    try:
        tuned = _retry(lambda: fewstep.zoo.tuned_schedules(name), f"tuned schedules of {name}")
    except Exception as exc:  # noqa: BLE001  a damaged tuned schedule is reported, the rest still runs
        tuned_error = _err(exc)
    entries = dict(card(name).get("tuned_schedules", {}) or {})
    cals = {int((p.meta.get("search", {}).get("calibration") or {}).get("noises") or 0) for p in tuned.values()} - {0}
    cal = cals.pop() if len(cals) == 1 else NETWORK_CALIBRATION
    if cals:
        log(f"[{name}] tuned schedules with different calibration counts; using {cal}")
    t = STarget(name, "zoo", model, model, model.schedule, tuple(model.sample_shape), cal, heldout, None,
                tuned=tuned, tuned_error=tuned_error, card_entries=entries)
    return t


def _reference_path(model: fewstep.Model, noises: torch.Tensor, cache_dir: Path | None, reference_nfe: int = 200) -> Path | None:
    """Where ``reference_set`` caches the references of ``noises`` (the library's own key; None if that fails)."""
    from fewstep.schedule_search.objective import reference_cache_path

    try:
        return reference_cache_path(model, noises, reference_nfe=reference_nfe, cache_dir=cache_dir)
    except Exception:  # noqa: BLE001
        return None


def attach_references(t: STarget) -> None:
    """The held-out noises and their references. A network's references are taken from the tune run's larger
    held-out set when that is cached (its first rows are these noises: keyed noise i does not depend on the batch)."""
    from fewstep.schedule_search import reference_set

    t0 = time.perf_counter()
    ev0 = t.model.evaluations
    t.noises = t.held_noises()
    sources = []
    if t.kind == "zoo":
        sizes = sorted({int((p.meta.get("search", {}).get("heldout") or {}).get("noises") or 0) for p in t.tuned.values()}, reverse=True)
        sources = [n for n in sizes if n > t.heldout]
    for n in sources:
        big = t.held_noises(n)
        path = _reference_path(t.model, big, t.cache_dir)
        if path is not None and path.is_file() and path.with_suffix(".json").is_file():
            rs = reference_set(t.model, big, cache_dir=t.cache_dir, log=log)
            t.ref = rs.reference[: t.heldout].to(torch.float64)
            t.ref_info = {"method": rs.method, "error_bar": rs.error_bar, "cached": rs.cached, "file": f"{path.name}[:{t.heldout}]",
                          "from_heldout_of": n}
            break
    if t.ref is None:
        # float64 noises: the same cache key (the digest is of the float64 values), a float64 reference back
        rs = reference_set(t.model, t.noises.to(torch.float64), cache_dir=t.cache_dir, log=log)
        path = _reference_path(t.model, t.noises, t.cache_dir)
        t.ref = rs.reference.to(torch.float64)
        t.ref_info = {"method": rs.method, "error_bar": rs.error_bar, "cached": rs.cached, "file": path.name if path else "?"}
    t.ref_info["s"] = time.perf_counter() - t0
    t.ref_info["model_evaluations"] = t.model.evaluations - ev0
    t.ref_info["cache_dir"] = str(t.cache_dir) if t.cache_dir is not None else "~/.cache/fewstep (fewstep's default)"


# ---------------------------------------------------------------------------------------------
# the search (the oracle), or the shipped schedule (the networks)
# ---------------------------------------------------------------------------------------------
def state_path(t: STarget, n: int, quick: bool) -> Path:
    return SEARCH_CACHE / f"{t.id}-nfe{n}{'-quick' if quick else ''}.state.json"


def run_search(t: STarget, n: int, *, quick: bool, budget: dict[str, int]) -> dict[str, Any]:
    from fewstep.schedule_search import StateError, reference_set

    rec: dict[str, Any] = {"source": "searched here", "nfe": n}
    state = state_path(t, n, quick)
    # the references the search needs, first (timed apart; the search then reads them from the cache)
    t0 = time.perf_counter()
    ev0 = t.model.evaluations
    cal_noises = fewstep.initial_noise(t.sched, (t.calibration, *t.shape), NOISE_SEED, indices=range(0, t.calibration))
    for x in (cal_noises, t.held_noises()):
        reference_set(t.model, x, cache_dir=SEARCH_CACHE, log=log)
    rec["reference_s"] = time.perf_counter() - t0
    rec["reference_evaluations_now"] = t.model.evaluations - ev0
    for attempt in (0, 1):
        t1 = time.perf_counter()
        ev1 = t.model.evaluations
        try:
            plan, report = fewstep.search(t.model, n, n_calibration=t.calibration, n_heldout=t.heldout, noise_seed=NOISE_SEED,
                                          cache_dir=SEARCH_CACHE, state=state, return_report=True,
                                          log=lambda m: log(f"[{t.id} NFE {n}] {m}"), **budget)
        except StateError as exc:
            if attempt:
                raise
            stale = state.with_name(state.name + f".stale-{time.strftime('%Y%m%d-%H%M%S')}")
            log(f"[{t.id} NFE {n}] {_err(exc)}: moved to {stale.name}, searching afresh")
            os.replace(state, stale)
            rec["stale_state"] = stale.name
            continue
        break
    rec["call_s"] = time.perf_counter() - t1
    rec["evaluations_now"] = t.model.evaluations - ev1
    rec["resumed_from"] = report.resumed_from
    rec["generations"] = budget.get("generations", 32)
    rec["search_wall_s"] = report.wall_s  # the generation loop, accumulated over resumes (what the tune runs record)
    rec["history"] = report.history
    rec["presets"] = report.presets
    rec["plan"] = plan
    rec["state"] = str(state)
    out = SEARCH_CACHE / f"{t.id}-nfe{n}{'-quick' if quick else ''}.json"
    write_text_atomic(out, plan.to_json())
    rec["schedule_file"] = str(out)
    return rec


def shipped(t: STarget, n: int) -> dict[str, Any]:
    plan = t.tuned.get(n)
    rec: dict[str, Any] = {"source": "shipped (zoo.tune)", "nfe": n, "plan": plan}
    if plan is None:
        rec["missing"] = t.tuned_error or "no tuned schedule yet"
    return rec


def provenance(t: STarget, rec: dict[str, Any]) -> dict[str, Any]:
    """The schedule's recorded provenance (``meta["search"]``) in flat form."""
    plan = rec.get("plan")
    meta = plan.meta.get("search", {}) if plan is not None else {}
    base = meta.get("baseline") or {}
    budget = meta.get("budget") or {}
    from fewstep.schedule_search.objective import model_identity

    out = {
        "calibration_error": (meta.get("calibration") or {}).get("error"),
        "calibration_noises": (meta.get("calibration") or {}).get("noises"),
        "heldout_error": (meta.get("heldout") or {}).get("error"),
        "heldout_noises": (meta.get("heldout") or {}).get("noises"),
        "best_preset": (f"{base.get('preset')}" + (f" {base['options']}" if base.get("options") else "") + f" ({base.get('spacing')})") if base else None,
        "best_preset_calibration_error": base.get("calibration_error"),
        "best_preset_heldout_error": base.get("heldout_error"),
        "model_evaluations": budget.get("model_evaluations"),
        "reference_evaluations": budget.get("reference_evaluations"),
        "search_wall_s": budget.get("search_wall_s"),
        "generations": budget.get("generations"),
        "population": budget.get("population"),
        "offspring": budget.get("offspring"),
        "fewstep_version": meta.get("fewstep_version"),
        "reference": meta.get("reference"),
        "objective": meta.get("objective"),
        "model": meta.get("model"),
    }
    if meta and meta.get("model") != model_identity(t.model):
        out["model_mismatch"] = f"schedule searched for {meta.get('model')!r}, the model is {model_identity(t.model)!r}"
    return out


def run_plan(t: STarget, plan: Any) -> tuple[torch.Tensor | None, dict[str, Any]]:
    t0 = time.perf_counter()
    try:
        x, info = fewstep.sample(t.model, t.noises, plan, return_info=True)
    except Exception as exc:  # noqa: BLE001
        return None, {"error": _err(exc), "traceback": traceback.format_exc(limit=6)}
    r = float(fewstep.rmse(x, t.ref))
    rec = {"rmse": r, "nfe_used": int(info.nfe), "wall_s": time.perf_counter() - t0}
    if not math.isfinite(r):
        rec["error"] = "non-finite samples"
    return x, rec


# ---------------------------------------------------------------------------------------------
# the best preset at its best grid, on the held-out noises (cached per plan)
# ---------------------------------------------------------------------------------------------
class PresetCache(RecordCache):
    """``benchmarks/.cache/search/presets-<target>.json``: one record per (preset plan, noises)."""

    def __init__(self, target_id: str, read: bool) -> None:
        super().__init__(SEARCH_CACHE / f"presets-{target_id}.json", PRESET_CACHE_FORMAT, read)

    @staticmethod
    def key(plan_hash: str, noise_key: str) -> str:
        return json.dumps([plan_hash, noise_key, fewstep.__version__])


def plan_hash(plan: Any) -> str:
    d = json.loads(plan.to_json())
    return hashlib.sha256(json.dumps([d.get("schedule"), d.get("times"), d.get("steps")], sort_keys=True).encode()).hexdigest()[:24]


def _run_plans(t: STarget, hs: list[str], plans: dict[str, Any], labels: dict[str, list[tuple[str, str]]], noises: torch.Tensor,
               ref: torch.Tensor, noise_key: str, cache: "PresetCache") -> float:
    """Run the plans ``hs`` on ``noises`` (plans of one NFE together, PLAN_CHUNK at a time), cache their RMSE against
    ``ref`` under ``noise_key``; the wall time."""
    from fewstep.schedule_search import evaluate_plans

    fresh_s = 0.0
    by_nfe: dict[int, list[str]] = {}
    for h in hs:
        by_nfe.setdefault(plans[h].nfe, []).append(h)
    for k, group in sorted(by_nfe.items()):
        for i in range(0, len(group), PLAN_CHUNK):
            chunk = group[i: i + PLAN_CHUNK]
            c0 = time.perf_counter()
            try:
                xs, _ = evaluate_plans(t.model, [plans[h] for h in chunk], noises)
                recs = []
                for x in xs:
                    r = float(fewstep.rmse(x, ref))
                    recs.append({"rmse": r, "nfe_used": k} if math.isfinite(r) else {"rmse": None, "nfe_used": k, "error": "non-finite samples"})
            except Exception as exc:  # noqa: BLE001  one plan that will not run: run the chunk one by one
                log(f"[{t.id}] batched preset evaluation failed ({_err(exc)}); one by one")
                recs = []
                for h in chunk:
                    try:
                        x = fewstep.sample(t.model, noises, plans[h])
                        r = float(fewstep.rmse(x, ref))
                        recs.append({"rmse": r if math.isfinite(r) else None, "nfe_used": k})
                    except Exception as exc1:  # noqa: BLE001
                        recs.append({"rmse": None, "nfe_used": k, "error": _err(exc1)})
            dt = time.perf_counter() - c0
            fresh_s += dt
            for h, r in zip(chunk, recs):
                cache.put(PresetCache.key(h, noise_key), {**r, "label": "%s (%s)" % labels[h][0], "wall_s": dt / len(chunk)})
            cache.save()
        log(f"[{t.id}] presets: {len(group)} plans of {k} NFE run on {noises.shape[0]} noises")
    return fresh_s


def preset_sweep(t: STarget, nfes: tuple[int, ...], *, read_cache: bool, screen: int = 0) -> dict[int, dict[str, Any]]:
    """The best preset at its best grid on the held-out noises: every (preset, spacing) plan (identical plans once); with
    ``screen``, all plans on the first ``screen`` noises and the SCREEN_KEEP best of them on all (as the search's own seeds)."""
    from fewstep.cli import parse_solver_arg

    names = Q.distinct_presets()[0] + list(Q.VARIANTS)
    spacings = BASE_SPACINGS + (DISCRETE_SPACINGS if isinstance(t.sched, fewstep.DiscreteVP) else ())
    cache = PresetCache(t.id, read_cache)
    out: dict[int, dict[str, Any]] = {}
    for n in nfes:
        t0 = time.perf_counter()
        labels: dict[str, list[tuple[str, str]]] = {}
        plans: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        for p in names:
            base, popts = parse_solver_arg(p)
            for sp in spacings:
                try:
                    plan = fewstep.preset(base, n, t.sched, spacing=sp, **popts)
                except Exception as exc:  # noqa: BLE001  (a spacing this schedule does not have, an NFE too small, ...)
                    skipped[f"{p} ({sp})"] = _err(exc)
                    continue
                if plan.nfe > n:
                    skipped[f"{p} ({sp})"] = f"uses {plan.nfe} NFE"
                    continue
                h = plan_hash(plan)
                labels.setdefault(h, []).append((p, sp))
                plans.setdefault(h, plan)
        fresh_s = 0.0
        screened: dict[str, float | None] = {}
        full = list(plans)
        if screen and len(plans) > SCREEN_KEEP:
            skey = f"{t.noise_key}:first{screen}"
            todo = [h for h in plans if cache.get(PresetCache.key(h, skey)) is None]
            fresh_s += _run_plans(t, todo, plans, labels, t.noises[:screen], t.ref[:screen], skey, cache)
            screened = {h: cache.entries[PresetCache.key(h, skey)].get("rmse") for h in plans}
            full = sorted(plans, key=lambda h: (not _finite(screened[h]), screened[h] if _finite(screened[h]) else 0.0, h))[:SCREEN_KEEP]
            log(f"[{t.id}] presets NFE {n}: {len(plans)} plans screened on {screen} noises, the best {len(full)} run on all")
        todo = [h for h in full if cache.get(PresetCache.key(h, t.noise_key)) is None]
        fresh_s += _run_plans(t, todo, plans, labels, t.noises, t.ref, t.noise_key, cache)
        rows = []
        for h, labs in labels.items():
            if h not in full:
                r = {"rmse": None, "nfe_used": plans[h].nfe, "screen_rmse": screened.get(h),
                     "error": f"screened out (RMSE {_fmt(screened.get(h))} on the first {screen} noises)"}
            else:
                r = {**cache.entries[PresetCache.key(h, t.noise_key)], "screen_rmse": screened.get(h)}
            rows.append({"preset": labs[0][0], "spacing": labs[0][1], "same_plan": [f"{p} ({sp})" for p, sp in labs[1:]],
                         "rmse": r.get("rmse"), "nfe_used": r.get("nfe_used"), "error": r.get("error"), "plan_hash": h})
        ok = [r for r in rows if _finite(r["rmse"])]
        best = min(ok, key=lambda r: r["rmse"]) if ok else None
        out[n] = {"best": best, "rows": sorted(rows, key=lambda r: (r["rmse"] is None, r["rmse"] or 0.0)),
                  "plans": len(plans), "combinations": sum(len(v) for v in labels.values()), "run_now": len(todo),
                  "cached": len(full) - len(todo), "screen": screen if screened else 0, "run_on_all": len(full), "fresh_s": fresh_s, "wall_s": time.perf_counter() - t0, "skipped": skipped,
                  "best_plan": plans[best["plan_hash"]] if best else None}
        log(f"[{t.id}] NFE {n}: best preset {best['preset'] + ' (' + best['spacing'] + ')' if best else 'n/a'} "
            f"RMSE {_fmt(best['rmse'] if best else None)} ({len(plans)} distinct plans, {len(todo)} run now)")
    return out


# ---------------------------------------------------------------------------------------------
# the peers (defaults.py's machinery and cache format)
# ---------------------------------------------------------------------------------------------
def peers(t: STarget, nfes: tuple[int, ...], *, kdiffusion: bool, read_cache: bool) -> dict[str, Any]:
    metric = (lambda x: _fd(x)) if t.kind == "zoo" else (lambda x: float("nan"))
    qt = Q.Target(t.id, t.kind, t.model, t.peer_model, t.sched, t.noises, t.ref, metric,
                  "feature FD" if t.kind == "zoo" else "-", "", {})
    dt = D.DTarget(f"search-{t.id}", qt, t.noise_key, repr(t.sched), None, 0.0, {"seed": NOISE_SEED, "batch": t.heldout})
    return D.peers_side(dt, nfes, kdiffusion=kdiffusion, read_cache=read_cache)


_EVALUATOR: Any = None


def _fd(x: torch.Tensor) -> float:
    global _EVALUATOR
    if _EVALUATOR is None:
        from fewstep.zoo.evaluate import DigitsEvaluator

        _EVALUATOR = DigitsEvaluator()
    return float(_EVALUATOR.evaluate(x)["fd_features"])


# ---------------------------------------------------------------------------------------------
# one target
# ---------------------------------------------------------------------------------------------
def run_target(t: STarget, nfes: tuple[int, ...], args: argparse.Namespace, quick: bool) -> dict[str, Any]:
    t_start = time.perf_counter()
    res: dict[str, Any] = {"nfe": {}, "timings": {}}
    budget = QUICK["budget"] if quick else {}
    schedules: dict[int, dict[str, Any]] = {}
    if t.kind == "oracle":
        for n in nfes:
            log(f"=== search {t.id} NFE {n}")
            schedules[n] = run_search(t, n, quick=quick, budget=budget)
    else:
        for n in nfes:
            schedules[n] = shipped(t, n)
    res["timings"]["search_s"] = time.perf_counter() - t_start

    t0 = time.perf_counter()
    attach_references(t)
    res["reference"] = dict(t.ref_info)
    res["timings"]["reference_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sweep = preset_sweep(t, nfes, read_cache=not args.no_cache, screen=SCREEN if (args.screen and t.kind == "zoo") else 0)
    res["timings"]["presets_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pe = peers(t, nfes, kdiffusion=not args.no_kdiffusion, read_cache=not args.no_peers_cache)
    res["timings"]["peers_s"] = time.perf_counter() - t0
    res["peers"] = {k: v for k, v in pe.items() if k != "records"}
    res["peer_records"] = pe["records"]

    t0 = time.perf_counter()
    fd_ref = fd_real = None
    if t.kind == "zoo":
        fd_ref = _fd(t.ref)
        fd_real = _fd(_EVALUATOR.split.train_x[: t.heldout])
        res["fd_reference"], res["fd_real"] = fd_ref, fd_real
    for n in nfes:
        s = schedules[n]
        plan = s.get("plan")
        e: dict[str, Any] = {k: v for k, v in s.items() if k not in ("plan", "history", "presets")}
        if t.kind == "oracle":
            e["search_history"] = s.get("history")
            e["search_presets"] = s.get("presets")
        e["provenance"] = provenance(t, s) if plan is not None else None
        if plan is not None:
            e["schedule"] = json.loads(plan.to_json())
            x, r = run_plan(t, plan)
            e["searched"] = r
            if r.get("error") is None and r.get("nfe_used") != n:
                r["error"] = f"used {r.get('nfe_used')} NFE for a budget of {n}"
        else:
            x = None
        sw = sweep[n]
        e["best_preset"] = sw["best"]
        e["preset_sweep"] = {k: v for k, v in sw.items() if k not in ("best_plan",)}
        bp = D.best_peer(pe["records"], n)
        bd = D.best_peer(pe["records"], n, "diffusers")
        bk = D.best_peer(pe["records"], n, "k-diffusion")
        e["best_peer"], e["best_diffusers"], e["best_kdiffusion"] = bp, bd, bk
        srm = (e.get("searched") or {}).get("rmse") if plan is not None and not (e.get("searched") or {}).get("error") else None
        e["ratio_preset"] = _ratio(srm, sw["best"]["rmse"] if sw["best"] else None)
        e["ratio_peer"] = _ratio(srm, bp["rmse"] if bp else None)
        if t.kind == "zoo" and n in FD_NFES:
            fd: dict[str, Any] = {"reference": fd_ref, "real": fd_real}
            if x is not None and srm is not None:
                fd["searched"] = _fd(x)
            if sw["best_plan"] is not None:
                xb, _ = run_plan(t, sw["best_plan"])
                if xb is not None:
                    fd["best_preset"] = _fd(xb)
            fd["best_peer"] = bp.get("metric") if bp else None
            e["fd"] = fd
        res["nfe"][n] = e
    res["timings"]["measure_s"] = time.perf_counter() - t0
    res["timings"]["total_s"] = time.perf_counter() - t_start
    return res


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _cell(r: float | None, bar: float | None) -> tuple[str, bool]:
    """The ratio as text, bold with a mark where it misses ``bar``; and whether it missed."""
    if r is None:
        return "n/a", False
    txt = f"{r:.3g}"
    if bar is not None and r > bar:
        return f"**{txt}** ✗", True
    return txt, False


def _wall_cell(w: Any) -> str:
    if not _finite(w):
        return "n/a"
    return "yes" if w <= WALL_BAR_S else "**no** ✗"


def _peer_str(p: dict[str, Any] | None) -> str:
    return D._peer_str(p)


def _preset_str(b: dict[str, Any] | None) -> str:
    if not b:
        return "n/a"
    return f"{b['preset']} ({b['spacing']}; {b.get('nfe_used', '?')} NFE)"


def background_jobs() -> list[str]:
    """Other processes of this project running now (read from /proc; the search benchmark's timings share the CPUs with them)."""
    me = os.getpid()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if ("fewstep" in cmd or "benchmarks/" in cmd or "pytest" in cmd) and "benchmarks/search.py" not in cmd:
            found.append(cmd[:120])
    return sorted(set(found))


def build_report(results: dict[str, dict[str, Any]], targets: dict[str, STarget], nfes: tuple[int, ...], meta: dict[str, Any],
                 complete: bool) -> tuple[str, dict[str, Any]]:
    lines: list[str] = []
    quick = meta["quick"]
    lines += ["# Solver-schedule search: searched schedules vs the best preset and the best peer, on held-out noises", ""]
    lines += [f"Generated by `{meta['command']}` in {meta['wall_s']:.0f} s wall time ({meta['date']})."
              + ("" if complete else f" **Partial report: written after {len(results)} of {meta['n_targets']} targets; the run was still going.**"), ""]
    if quick:
        lines += [f"**--quick**: gmm-d3072 at NFE {', '.join(map(str, nfes))} with {QUICK['calibration']} calibration / "
                  f"{QUICK['heldout']} held-out noises and a tiny search ({QUICK['budget']}): checks the script, measures nothing.", ""]
    lines += ["Machine:", *machine_lines(), f"- fewstep source: {meta['git']}",
              f"- load average (1 / 5 / 15 min) at the start {meta['load_start']}, at the end {meta['load_end']}",
              "- other project processes running at the start (background jobs share the CPUs, so every wall time here is "
              "an upper bound for an idle machine): " + ("; ".join(f"`{c}`" for c in meta["background_start"]) or "none"), ""]

    # ---- headline
    misses: dict[str, list[str]] = {"preset": [], "fd": [], "generalisation": [], "wall": []}
    unmeasured: dict[str, list[str]] = {"preset": [], "fd": [], "generalisation": [], "wall": []}
    cells = {k: 0 for k in misses}
    hl_rows = []
    for tid, res in results.items():
        row = [tid]
        for n in nfes:
            e = res["nfe"].get(n)
            if e is None:
                row.append("not run")
                continue
            if e.get("missing"):
                row.append("no tuned schedule yet")
                unmeasured["preset"].append(f"{tid} @ NFE {n} (no tuned schedule yet)")
                continue
            if (e.get("searched") or {}).get("error"):
                row.append(f"**searched schedule FAILED**: {e['searched']['error'][:60]}")
                misses["preset"].append(f"{tid} @ NFE {n}: the searched schedule failed ({e['searched']['error'][:100]})")
                cells["preset"] += 1
                continue
            c1, m1 = _cell(e["ratio_preset"], preset_bar(n))
            c2, _ = _cell(e["ratio_peer"], None)
            cells["preset"] += 1
            if m1:
                misses["preset"].append(f"{tid} @ NFE {n}: {e['ratio_preset']:.3g} > {preset_bar(n)} "
                                        f"(searched {_fmt(e['searched']['rmse'])} vs {_preset_str(e['best_preset'])} {_fmt(e['best_preset']['rmse'])})")
            elif e["ratio_preset"] is None:
                unmeasured["preset"].append(f"{tid} @ NFE {n} (no finite best preset)")
            row.append(f"{c1} / {c2}")
        hl_rows.append(row)
    lines += ["## Headline: RMSE ratio searched / best preset at its best grid, and searched / best peer at its best grid option", "",
              f"Cells: `searched / best preset` then `searched / best peer`, on {'the' if not quick else 'the --quick'} held-out noises "
              "(< 1: the searched schedule is more accurate). Bar on the first ratio: <= 0.6 at NFE 4-6, <= 0.8 at NFE 8-10; a miss is "
              "bold and marked ✗. The peer ratio has no bar.", "",
              markdown_table(["target"] + [f"NFE {n}" for n in nfes], hl_rows), ""]

    # ---- FD, generalisation, wall (collect first)
    fd_rows, gen_rows, cost_rows = [], [], []
    for tid, res in results.items():
        t = targets[tid]
        for n in nfes:
            e = res["nfe"].get(n)
            if e is None:
                continue
            pv = e.get("provenance") or {}
            # wall / evaluations
            if t.kind == "oracle":
                w = e.get("search_wall_s")
                res_from = e.get("resumed_from")
                src = ("searched in this run" if not res_from else
                       "from the finished state file of an earlier run (wall as recorded there)" if res_from >= (pv.get("generations") or 0) else
                       f"searched in this run, resumed from generation {res_from} of its state file")
                refs = e.get("reference_evaluations_now") or 0
                cost_rows.append([tid, n, _fmt(w, ".0f"), _fmt(e.get("call_s"), ".0f"), pv.get("model_evaluations", "n/a"),
                                  f"{refs} ({e.get('reference_s', 0):.0f} s, before the search)" if refs else "0 (cached)", f"{pv.get('generations')} x {pv.get('population')} (of {pv.get('offspring')} bred)",
                                  _wall_cell(w), src])
            elif e.get("missing"):
                cost_rows.append([tid, n, "-", "-", "-", "-", "-", "n/a", "no tuned schedule yet"])
                w = None
            else:
                w = pv.get("search_wall_s")
                cost_rows.append([tid, n, _fmt(w, ".0f"), "-", pv.get("model_evaluations", "n/a"), pv.get("reference_evaluations", "n/a"),
                                  f"{pv.get('generations')} x {pv.get('population')} (of {pv.get('offspring')} bred)",
                                  _wall_cell(w), "recorded by `python -m fewstep.zoo.tune` (its machine and load)"])
            if e.get("missing"):
                unmeasured["wall"].append(f"{tid} @ NFE {n}")
            elif _finite(w):
                cells["wall"] += 1
                if w > WALL_BAR_S:
                    misses["wall"].append(f"{tid} @ NFE {n}: {w:.0f} s")
            # calibration vs held-out
            if e.get("missing"):
                if t.kind == "zoo":
                    gen_rows.append([tid, n, "no tuned schedule yet", "", "", "", "", "", ""])
                    unmeasured["generalisation"].append(f"{tid} @ NFE {n}")
            else:
                ce, he = pv.get("calibration_error"), pv.get("heldout_error")
                r = _ratio(he, ce)
                barred = t.kind == "zoo"
                c, m = _cell(r, GENERALISATION_BAR if barred else None)
                if barred and r is not None:
                    cells["generalisation"] += 1
                    if m:
                        misses["generalisation"].append(f"{tid} @ NFE {n}: held-out / calibration {r:.3g}")
                bce, bhe = pv.get("best_preset_calibration_error"), pv.get("best_preset_heldout_error")
                gen_rows.append([tid + ("" if barred else " (info)"), n, f"{_fmt(ce)} ({pv.get('calibration_noises')})", f"{_fmt(he)} ({pv.get('heldout_noises')})",
                                 c, pv.get("best_preset") or "n/a", _fmt(bce), _fmt(bhe), _cell(_ratio(bhe, bce), None)[0]])
            # FD
            if t.kind == "zoo" and n in FD_NFES:
                fd = e.get("fd") or {}
                r = _ratio(fd.get("searched"), fd.get("reference"))
                bar = FD_BAR if n == FD_BAR_NFE else None
                c, m = _cell(r, bar)
                if n == FD_BAR_NFE:
                    if e.get("missing") or r is None:
                        unmeasured["fd"].append(f"{tid} @ NFE {n}" + (" (no tuned schedule yet)" if e.get("missing") else ""))
                    else:
                        cells["fd"] += 1
                        if m:
                            misses["fd"].append(f"{tid} @ NFE {n}: searched FD {fd['searched']:.3g} = {r:.3g}x the converged model's {fd['reference']:.3g}")
                fd_rows.append([tid, n, "no tuned schedule yet" if e.get("missing") else _fmt(fd.get("searched"), ".3g"),
                                _fmt(fd.get("best_preset"), ".3g") + (f" ({e['best_preset']['preset']}, {e['best_preset']['spacing']})" if e.get("best_preset") else ""),
                                _fmt(fd.get("best_peer"), ".3g"), _fmt(fd.get("reference"), ".3g"), _fmt(fd.get("real"), ".3g"),
                                c + ("" if n == FD_BAR_NFE else " (no bar)")])

    bar_names = {"preset": "searched / best preset <= 0.6 at NFE 4-6, <= 0.8 at NFE 8-10",
                 "fd": f"networks, NFE {FD_BAR_NFE}: searched feature FD <= {FD_BAR} x the converged model's",
                 "generalisation": f"networks: held-out error <= {GENERALISATION_BAR} x calibration error (the tune runs' numbers)",
                 "wall": f"search wall time <= {WALL_BAR_S / 60:.0f} min per (target, NFE)"}
    lines += ["## Bars", ""]
    for k, name in bar_names.items():
        if cells[k] == 0 and not misses[k]:
            status = "**not measured** (no cell)"
        elif misses[k]:
            status = f"**NOT met** in {len(misses[k])} of {cells[k]} measured cells"
        else:
            status = f"**met** in all {cells[k]} measured cells"
        extra = f"; not measured: {', '.join(unmeasured[k])}" if unmeasured[k] else ""
        lines += [f"- {name}: {status}{extra}"]
        lines += [f"  - {m}" for m in misses[k]]
    lines += [""]

    lines += ["## Search cost per (target, NFE)", "",
              "gmm-d3072: searched in this run (`search wall` = the search's generation loop as its state records it, over all resumes; "
              "`this call` = the `fewstep.search` call now: the generations not yet in the state plus the final held-out check; references "
              "are computed once per target before the first search and are not included). Networks: what the tune run recorded in the "
              "schedule (`meta.search.budget`). Model evaluations = sample rows evaluated (samples x NFE), search plus its final held-out check. "
              f"Bar: <= {WALL_BAR_S:.0f} s; every wall time here was taken while the other jobs listed under Machine may have been running.", "",
              markdown_table(["target", "NFE", "search wall s", "this call s", "model evaluations", "reference evaluations",
                              "generations x evaluated per generation", f"<= {WALL_BAR_S:.0f} s", "source"], cost_rows), ""]

    # ---- per target held-out comparison
    for tid, res in results.items():
        t = targets[tid]
        ri = res["reference"]
        lines += [f"## {tid}", ""]
        if t.kind == "oracle":
            lines += [f"Exact oracle `{t.peer_model!r}` on `fewstep.DiscreteVP.linear()`, model `oracle.as_model(sched)` with "
                      f"`sample_shape={t.shape}`, `identity={t.model.identity!r}`. Searched here: `fewstep.search(model, N, "
                      f"n_calibration={t.calibration}, n_heldout={t.heldout}, cache_dir=benchmarks/.cache/search, "
                      f"state=benchmarks/.cache/search/{tid}-nfeN{'-quick' if quick else ''}.state.json"
                      + (f", {', '.join(f'{k}={v}' for k, v in QUICK['budget'].items())}" if quick else "") + ")` (default budget otherwise); "
                      "the schedules are saved beside the states as `<target>-nfeN.json`.", ""]
        else:
            ent = t.card_entries
            lines += [f"Bundled network `{tid}` on `{t.sched!r}`; schedules shipped with it: "
                      + (", ".join(f"NFE {k}" for k in sorted(t.tuned)) or "none yet")
                      + (f" (error reading them: {t.tuned_error})" if t.tuned_error else "")
                      + (f"; the card lists NFE {', '.join(sorted(ent, key=int))}" if ent else "") + ".", ""]
        lines += [f"Held-out noises: `fewstep.initial_noise(sched, {(t.heldout, *t.shape)}, {NOISE_SEED}, indices=range({t.calibration}, "
                  f"{t.calibration + t.heldout}))` (float32, as the search draws them). References: {ri.get('method')}, error bar (RMS change from "
                  f"half the NFE) {_fmt(ri.get('error_bar'), '.2g')}, `{ri.get('file')}` in {ri.get('cache_dir')}"
                  + (f" (the first {t.heldout} of the tune run's {ri['from_heldout_of']} held-out noises)" if ri.get("from_heldout_of") else "")
                  + (", cached" if ri.get("cached") else f", computed now in {ri.get('s', 0):.0f} s") + ".", ""]
        rows = []
        for n in nfes:
            e = res["nfe"].get(n)
            if e is None:
                continue
            bp, bd, bk, pr = e["best_peer"], e["best_diffusers"], e["best_kdiffusion"], e["best_preset"]
            pv = e.get("provenance") or {}
            if e.get("missing"):
                scell, ucell = "no tuned schedule yet", "-"
            elif (e.get("searched") or {}).get("error"):
                scell, ucell = f"**FAILED**: {e['searched']['error'][:80]}", "-"
            else:
                scell, ucell = _fmt(e["searched"]["rmse"]), e["searched"]["nfe_used"]
            rows.append([n, scell, ucell, _preset_str(pr), _fmt(pr["rmse"] if pr else None), _cell(e["ratio_preset"], preset_bar(n))[0],
                         _peer_str(bp), _fmt(bp["rmse"] if bp else None), _cell(e["ratio_peer"], None)[0],
                         _peer_str(bd) + " " + _fmt(bd["rmse"] if bd else None) if bd else "n/a",
                         _peer_str(bk) + " " + _fmt(bk["rmse"] if bk else None) if bk else "n/a",
                         pv.get("best_preset") or "-"])
        lines += ["### Held-out comparison", "",
                  "RMSE against the references of the held-out noises. Best preset: the best of "
                  f"{results[tid]['nfe'][nfes[0]]['preset_sweep']['combinations'] if nfes and nfes[0] in results[tid]['nfe'] else '?'} "
                  "(preset, spacing) combinations at this NFE (identical plans run once). 'search's best preset': the best seed preset "
                  "the search itself started from (on its calibration noises), for context.", "",
                  markdown_table(["NFE", "searched RMSE", "NFE used", "best preset (spacing; NFE used)", "RMSE", "searched / preset",
                                  "best peer (option; NFE used)", "RMSE", "searched / peer", "best diffusers", "best k-diffusion",
                                  "search's best preset"], rows), ""]
        top = []
        for n in nfes:
            e = res["nfe"].get(n)
            if e is None:
                continue
            sw = e["preset_sweep"]
            best3 = [r for r in sw["rows"] if _finite(r["rmse"])][:3]
            scr = f"all on {sw['screen']} noises, the best {sw.get('run_on_all')} on all" if sw.get("screen") else "no (all on all)"
            top.append([n, sw["plans"], scr, f"{sw['run_now']} / {sw['cached']}",
                        "; ".join(f"{r['preset']} ({r['spacing']}) {_fmt(r['rmse'])}" for r in best3), len(sw["skipped"])])
        lines += ["Preset sweep: distinct plans, whether they were screened first (`--screen`: every plan on the first noises, the best "
                  "on all, as the search's own generation 0), plans run on all noises now / from the cache, the three best, (preset, "
                  "spacing) combinations that do not exist at this NFE or exceed it:", "",
                  markdown_table(["NFE", "distinct plans", "screened", "run now / cached", "three best", "skipped"], top), ""]
        if t.kind == "oracle":
            prow = []
            for n in nfes:
                e = res["nfe"].get(n)
                if e is None or not e.get("provenance"):
                    continue
                pv = e["provenance"]
                hist = e.get("search_history") or []
                first = hist[0]["best"] if hist else None
                prow.append([n, _fmt(first), _fmt(pv["calibration_error"]), _fmt(pv["heldout_error"]), pv["best_preset"],
                             _fmt(pv["best_preset_calibration_error"]), _fmt(pv["best_preset_heldout_error"]),
                             _cell(_ratio(pv["heldout_error"], pv["best_preset_heldout_error"]), None)[0]])
            lines += ["The search's own record (calibration / held-out errors of the searched schedule and of the best seed preset "
                      "on the search's noises; 'after generation 0' = the best of the seed presets on their grids):", "",
                      markdown_table(["NFE", "calibration after generation 0", "calibration (searched)", "held-out (searched)", "search's best preset",
                                      "its calibration", "its held-out", "held-out searched / preset"], prow), ""]
        else:
            prow = []
            for n in nfes:
                e = res["nfe"].get(n)
                if e is None:
                    continue
                if e.get("missing"):
                    prow.append([n, "no tuned schedule yet"] + [""] * 8)
                    continue
                pv = e["provenance"]
                prow.append([n, f"{_fmt(pv['calibration_error'])} ({pv['calibration_noises']})", f"{_fmt(pv['heldout_error'])} ({pv['heldout_noises']})",
                             pv["best_preset"], _fmt(pv["best_preset_heldout_error"]), _cell(_ratio(pv["heldout_error"], pv["best_preset_heldout_error"]), None)[0],
                             pv["model_evaluations"], _fmt(pv["search_wall_s"], ".0f"), pv["fewstep_version"],
                             pv.get("model_mismatch") or "matches"])
            lines += ["Recorded provenance of the shipped schedules (`meta.search`, written by the tune run):", "",
                      markdown_table(["NFE", "calibration error (noises)", "held-out error (noises)", "best preset (on its calibration)",
                                      "its held-out error", "held-out searched / preset", "model evaluations", "search wall s",
                                      "fewstep", "model identity"], prow), ""]
        errs: dict[str, list[str]] = {}
        for r in res["peer_records"]:
            if r.get("error"):
                errs.setdefault(r["peer"], []).append(f"{r['option']} @ {r['nfe']}: {r['error'][:100]}")
        if errs:
            lines += ["Peer options that failed (recorded, skipped): " + "; ".join(f"{k}: {len(v)} runs, e.g. {v[0]}" for k, v in errs.items()), ""]
        tm, pe = res["timings"], res["peers"]
        lines += [f"Time: searches {tm['search_s']:.0f} s, references {tm['reference_s']:.0f} s, preset sweep {tm['presets_s']:.0f} s, "
                  f"peers {tm['peers_s']:.0f} s ({pe['fresh']} runs now, {pe['cached']} from `{pe['cache_file']}`), measuring {tm['measure_s']:.0f} s.", ""]

    if fd_rows:
        lines += ["## Digits feature Fréchet distance (networks, NFE 4-6)", "",
                  "Fréchet distance to the held-out digits in the bundled classifier's feature space (`fewstep.zoo.evaluate.DigitsEvaluator`) "
                  f"of {HELDOUT} samples from the held-out noises: the searched schedule, the best preset (by RMSE, as above), the best peer, the "
                  f"converged model (the reference samples of the same noises), and {HELDOUT} real train digits (small-sample FD is biased "
                  f"upwards; compare within the column). Bar at NFE {FD_BAR_NFE}: searched <= {FD_BAR} x converged.", "",
                  markdown_table(["target", "NFE", "searched FD", "best preset FD", "best peer FD", "converged model FD", "real digits FD",
                                  "searched / converged"], fd_rows), ""]
    if gen_rows:
        lines += ["## Calibration vs held-out error", "",
                  "The schedule's recorded calibration error (its objective) and held-out error (fresh noises; the tune runs use 1,000), "
                  f"and their ratio; bar for the networks: <= {GENERALISATION_BAR}. The oracle (its search's own calibration / held-out counts) "
                  "for information. Beside it "
                  "the same two numbers for the best seed preset the search started from.", "",
                  markdown_table(["target", "NFE", "calibration error (noises)", "held-out error (noises)", "held-out / calibration",
                                  "search's best preset", "its calibration", "its held-out", "its held-out / calibration"], gen_rows), ""]

    lines += ["## Method", "",
              "- All solvers start from the same held-out noises and end at sigma = 0; RMSE = mean over samples of the per-sample RMS "
              "difference to the reference (`fewstep.rmse`).",
              "- Presets: " + ", ".join(Q.distinct_presets()[0]) + " and the variants " + ", ".join(f"`{v}`" for v in Q.VARIANTS)
              + f" over {', '.join(BASE_SPACINGS)} (+ {', '.join(DISCRETE_SPACINGS)} on DiscreteVP); plans of the same NFE evaluated "
              "together (`fewstep.schedule_search.evaluate_plans`, identical to `fewstep.sample`), a plan that uses fewer NFE than the "
              "budget counts at the budget (as in quality.py).",
              "- Peers: `defaults.peers_side` (`all_peers(schedule=...)` at every grid option, the model queried at the noise level each "
              "peer asks for); diffusers' DDPM-family schedulers for DiscreteVP, its flow schedulers (incl. shifted grids) for flow matching, "
              "its EDM schedulers for EDM; k-diffusion where the start has a finite noise level.",
              "- Caches: references (`reference-<key>.npy`), search states and schedules in `benchmarks/.cache/search/` (networks: the "
              "tune runs' `~/.cache/fewstep`), preset runs in `benchmarks/.cache/search/presets-<target>.json` (keyed by the plan, the noises "
              "and the fewstep version; `--no-cache` reruns), peer runs in `benchmarks/.cache/peers-search-<target>.json` "
              "(`--no-peers-cache` reruns).", ""]
    js = {"bars": {k: {"bar": bar_names[k], "cells": cells[k], "misses": misses[k], "not_measured": unmeasured[k],
                       "met": (not misses[k]) if cells[k] else None} for k in bar_names}}
    return "\n".join(lines), js


def _jsonable(res: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(res, default=lambda o: o.to_json() if hasattr(o, "to_json") else str(o)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=None,
                    help=f"target names ({', '.join(ORACLE_TARGETS + NETWORK_TARGETS)}) or the groups 'oracles', 'networks', 'all' (default: all)")
    ap.add_argument("--nfe", nargs="+", type=int, default=None, help=f"NFE budgets (default {' '.join(map(str, NFES))})")
    ap.add_argument("--quick", action="store_true",
                    help=f"gmm-d3072 at NFE 5 with {QUICK['calibration']} / {QUICK['heldout']} noises and a tiny search -> reports/search_quick.md")
    ap.add_argument("--screen", action="store_true",
                    help=f"networks: screen the preset plans on the first {SCREEN} held-out noises and run the best {SCREEN_KEEP} on all "
                         "(~4x cheaper; the exhaustive sweep otherwise)")
    ap.add_argument("--no-cache", action="store_true", help="rerun every preset (the preset cache is rewritten)")
    ap.add_argument("--no-peers-cache", action="store_true", help="rerun every peer (the peer cache is rewritten)")
    ap.add_argument("--no-kdiffusion", action="store_true", help="leave out the k-diffusion peers")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: $FEWSTEP_BENCH_THREADS or all CPUs of this process)")
    ap.add_argument("--out", default=None, help="report path (default reports/search.md, reports/search_quick.md with --quick); JSON beside it")
    args = ap.parse_args(argv)
    quiet_diffusers()
    threads = set_threads(args.threads)

    names: list[str] = []
    for spec in (args.targets or (list(ORACLE_TARGETS) if args.quick else ["all"])):
        if spec in ("all", "oracles", "networks"):
            names += (list(ORACLE_TARGETS) if spec != "networks" else []) + (list(NETWORK_TARGETS) if spec != "oracles" else [])
        elif spec in ORACLE_TARGETS + NETWORK_TARGETS:
            names.append(spec)
        else:
            raise SystemExit(f"unknown target {spec!r}; one of {', '.join(ORACLE_TARGETS + NETWORK_TARGETS)}, oracles, networks, all")
    names = list(dict.fromkeys(names))
    if args.quick and any(n not in ORACLE_TARGETS for n in names):
        raise SystemExit("--quick runs the oracle only (the networks are not searched here)")
    nfes = tuple(sorted(set(args.nfe or (QUICK["nfes"] if args.quick else NFES))))
    out = Path(args.out) if args.out else REPORTS / ("search_quick.md" if args.quick else "search.md")
    calibration, heldout = (QUICK["calibration"], QUICK["heldout"]) if args.quick else (ORACLE_CALIBRATION, HELDOUT)

    command = " ".join(["python benchmarks/search.py", *(argv if argv is not None else sys.argv[1:])])
    meta = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick, "git": D._git_state(),
            "load_start": " / ".join(f"{v:.2f}" for v in os.getloadavg()), "background_start": background_jobs(),
            "n_targets": len(names), "threads": threads}
    t_all = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    targets: dict[str, STarget] = {}

    def write(complete: bool) -> None:
        meta.update(wall_s=time.perf_counter() - t_all, load_end=" / ".join(f"{v:.2f}" for v in os.getloadavg()))
        text, js = build_report(results, targets, nfes, meta, complete)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, text)
        data = {**{k: v for k, v in meta.items()}, "complete": complete, "nfes": list(nfes),
                "machine": dict(line[2:].split(": ", 1) for line in machine_lines()), **js,
                "targets": {tid: {"id": tid, "kind": targets[tid].kind, "calibration": targets[tid].calibration,
                                  "heldout": targets[tid].heldout, "noise_key": targets[tid].noise_key, **_jsonable(res)}
                            for tid, res in results.items()}}
        write_text_atomic(out.with_suffix(".json"), json.dumps(data, indent=1, default=str))
        log(f"wrote {out} and {out.with_suffix('.json')}")

    for name in names:
        log(f"=== {name}")
        t0 = time.perf_counter()
        t = oracle_target(name, calibration, heldout) if name in ORACLE_TARGETS else network_target(name, HELDOUT)
        t.build_s = time.perf_counter() - t0
        targets[name] = t
        results[name] = run_target(t, nfes, args, args.quick)
        write(complete=name == names[-1])
    text = out.read_text()
    print(text[text.index("## Headline"): text.index("## Search cost")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

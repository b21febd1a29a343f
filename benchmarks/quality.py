"""Quality per NFE: every fewstep preset vs diffusers' schedulers and k-diffusion's samplers on the
bundled exact oracles (DESIGN 5: "at NFE 5-10 the best preset matches or beats the best diffusers
scheduler on the oracle").

All solvers see the same model (the exact oracle on the DDPM linear-beta schedule,
``fewstep.DiscreteVP.linear()``) and the same initial noises; the error is the RMSE against a
DOP853 reference solution of the probability-flow ODE from those noises (cached as .npy under
``benchmarks/.cache/``), plus the exact log-likelihood gap to true samples. Every solver is
reported at its best grid option per NFE: fewstep presets over the spacings ``uniform_t,
uniform_lambda, karras, leading, trailing, quadratic``; diffusers schedulers over ``timestep_spacing`` in
leading / linspace / trailing, with and without ``use_karras_sigmas``; k-diffusion over Karras and
exponential sigmas.

    python benchmarks/quality.py            # full run (~10-15 min on 2 CPU cores) -> reports/quality.md
    python benchmarks/quality.py --quick    # gmm-d64, batch 64 (~1 min)        -> reports/quality_quick.md

No timing is asserted; nothing here is a test.
"""

from __future__ import annotations

import _common  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import fewstep
from fewstep.cli import parse_solver_arg
from fewstep.report import markdown_table

from _common import CACHE, REPORTS, log, machine_lines, quiet_diffusers
import peers as peers_mod

NFES = (5, 6, 8, 10, 15, 20, 50)
SUMMARY_NFES = (5, 6, 8, 10)
SPACINGS = ("uniform_t", "uniform_lambda", "karras", "leading", "trailing", "quadratic")
FULL_ORACLES = (("gmm-d64", 256), ("digits-gmm", 256), ("gmm-d3072", 64))
QUICK_ORACLES = (("gmm-d64", 64),)
REF_RTOL = 1e-10
N_TRUE = 2048
#: the bundled networks (DESIGN: "the preset quality table ... on the digits models"); batch 256 keeps
#: the feature Fréchet distance meaningful, the grid of NFE and spacings keeps the run within ~30 min
ZOO_MODELS = (("digits-vp-eps", 256), ("digits-flow", 256))
ZOO_NFES = (5, 6, 8, 10, 15, 20)
ZOO_SPACINGS = ("uniform_t", "uniform_lambda", "karras", "leading", "trailing")
ZOO_REF_NFE = 400
#: preset options also run (as their own rows): the diffusers-equivalent DEIS (interpolation in
#: lambda rather than tAB's t), and full order up to the last noisy step (fewstep's default, like
#: diffusers', lowers the order at the end below 15 steps)
VARIANTS = ("deis:interp=lambda", "deis:interp=lambda,lower_order_final=false", "unipc:lower_order_final=false",
            "dpmpp_3m:lower_order_final=false")
#: fewstep presets on diffusers' grids
PEER_GRIDS = ("leading", "trailing", "karras", "uniform_lambda")
#: (label, fewstep preset, its options, diffusers peer, NFE parity) defining the same method on the same grid
AGREEMENT_PAIRS = (
    ("ddim", "ddim", {}, "diffusers DDIM", None),
    ("dpmpp_2m", "dpmpp_2m", {}, "diffusers DPMSolverMultistep 2M", None),
    ("dpmpp_3m weights=published", "dpmpp_3m", {"weights": "published"}, "diffusers DPMSolverMultistep 3M", None),
    ("dpmpp_3m (exact weights)", "dpmpp_3m", {}, "diffusers DPMSolverMultistep 3M", None),
    ("unipc order=2", "unipc", {"order": 2}, "diffusers UniPC 2 (bh2)", None),
    ("unipc (order 3)", "unipc", {}, "diffusers UniPC 3 (bh2)", None),
    ("deis order=2 interp=lambda", "deis", {"order": 2, "interp": "lambda"}, "diffusers DEIS 2", None),
    ("deis interp=lambda", "deis", {"interp": "lambda"}, "diffusers DEIS 3", None),
    ("pndm", "pndm", {}, "diffusers PNDM (PLMS)", None),
    ("euler", "euler", {}, "diffusers Euler", None),
    ("heun", "heun", {}, "diffusers Heun", "odd"),
    ("lms", "lms", {}, "diffusers LMS", None),
)


@dataclass
class Result:
    oracle: str
    solver: str
    source: str  # fewstep | diffusers | k-diffusion
    nfe: int  # the NFE budget of the row
    nfe_used: int | None
    option: str
    rmse: float | None
    error: str = ""


# ---------------------------------------------------------------------------------------------
@dataclass
class Target:
    """A model every solver samples from the same noises, its reference and its second metric."""

    name: str
    kind: str  # "oracle" | "zoo"
    model: fewstep.Model  # what fewstep samples
    peer_model: Any  # what the peers query (the oracle itself, or the same Model)
    sched: fewstep.NoiseSchedule
    x_T: torch.Tensor
    ref: torch.Tensor
    metric: Callable[[torch.Tensor], float]  # of the best samples per (solver, NFE)
    metric_header: str
    describe: str  # the paragraph under the section heading
    meta: dict[str, Any]


def _cached(path: Path, shape: tuple[int, ...], compute: Callable[[], tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor, dict[str, Any], bool]:
    """A float64 array (plus its JSON side-car) computed once and cached under ``benchmarks/.cache``."""
    CACHE.mkdir(parents=True, exist_ok=True)
    side = path.with_suffix(".json")
    if path.is_file() and side.is_file():
        arr = np.load(path)
        if arr.shape == shape:
            return torch.from_numpy(arr), json.loads(side.read_text()), True
    t0 = time.perf_counter()
    x, info = compute()
    info = {**info, "compute_s": time.perf_counter() - t0}
    np.save(path, x.to(torch.float64).numpy())
    side.write_text(json.dumps(info))
    return x.to(torch.float64), info, False


def oracle_target(name: str, batch: int, seed: int) -> Target:
    """An exact oracle: DOP853 reference, exact log-likelihood gap as the second metric."""
    t0 = time.perf_counter()
    oracle = fewstep.bundled_oracle(name)
    t_build = time.perf_counter() - t0
    sched = fewstep.DiscreteVP.linear()
    model = oracle.as_model(sched)  # x0 prediction (fewstep reads x0 and eps from it)
    x_T = fewstep.initial_noise(sched, (batch, oracle.dim), seed, dtype=torch.float64)
    log(f"[{name}] d={oracle.dim}, batch {batch}: reference ...")
    path = CACHE / f"ref-{name}-vp_linear-b{batch}-s{seed}-rtol{REF_RTOL:g}.npy"
    ref, info, cached = _cached(path, tuple(x_T.shape), lambda: (fewstep.reference_solution(model, x_T, rtol=REF_RTOL, atol=REF_RTOL), {}))
    lik = LikGap(oracle, seed)
    floor = lik(oracle.sample(batch, seed=seed + 2))
    ref_note = "cached" if cached else f"computed in {info['compute_s']:.1f} s"
    describe = (f"Oracle {oracle!r}, d = {oracle.dim}, batch {batch}, seed {seed}. "
                f"Reference: DOP853 at rtol = atol = {REF_RTOL:g} ({ref_note}). "
                f"Likelihood gap = mean log p(true) - mean log p(samples) in nats with {N_TRUE} true samples; "
                f"{batch} exact samples score {floor:+.3g} (the column's noise floor).")
    meta = {"oracle": repr(oracle), "dim": oracle.dim, "batch": batch, "seed": seed, "oracle_build_s": t_build,
            "reference_s": info["compute_s"], "reference_cached": cached, "exact_gap_floor": floor}
    return Target(name, "oracle", model, oracle, sched, x_T, ref, lik, "lik gap (nats)", describe, meta)


def zoo_target(name: str, batch: int, seed: int, ref_nfe: int = ZOO_REF_NFE) -> Target:
    """A bundled digits network (float32 weights, float64 solver arithmetic): reference = UniPC at
    ``ref_nfe`` (its change from ``ref_nfe / 2`` is reported), second metric = the digits feature
    Fréchet distance to the held-out split."""
    from fewstep.zoo import card
    from fewstep.zoo.evaluate import DigitsEvaluator

    model = fewstep.zoo.load(name)
    sched = model.schedule
    x_T = fewstep.initial_noise(sched, (batch, *model.sample_shape), seed, dtype=torch.float64)
    log(f"[{name}] batch {batch}: reference (unipc NFE {ref_nfe}) ...")
    sha = str(card(name)["sha256"])[:12]
    path = CACHE / f"ref-zoo-{name}-{sha}-b{batch}-s{seed}-unipc{ref_nfe}.npy"

    def compute() -> tuple[torch.Tensor, dict[str, Any]]:
        chk = fewstep.check_fine_reference(model, x_T, nfe=ref_nfe)
        return chk.solution, {"rms_change": chk.rms_change, "max_abs_change": chk.max_abs_change, "method": chk.method}

    ref, info, cached = _cached(path, tuple(x_T.shape), compute)
    evaluator = DigitsEvaluator()
    floor = evaluator.evaluate(evaluator.split.train_x[:batch])["fd_features"]
    fd_ref = evaluator.evaluate(ref)["fd_features"]
    ref_note = "cached" if cached else f"computed in {info['compute_s']:.1f} s"
    describe = (f"Bundled network `{name}` (float32 weights, {card(name)['architecture']['parameters']:,} parameters; solver arithmetic in "
                f"float64), batch {batch}, seed {seed}. Reference: {info['method']} with `lower_order_final=false` ({ref_note}); "
                f"it moves by {info['rms_change']:.2g} RMS (max {info['max_abs_change']:.2g}) from half as many NFE, the resolution "
                f"of the RMSE column. Feature FD = Fréchet distance of the samples to the {len(evaluator.split.heldout_x)} held-out digits "
                f"in the bundled classifier's feature space (`fewstep.zoo.evaluate`); with {batch} samples, real train digits score "
                f"{floor:.3g} and the reference samples {fd_ref:.3g} (small-sample FD is biased upwards: compare within the column).")
    meta = {"model": name, "sha256": sha, "batch": batch, "seed": seed, "reference_s": info["compute_s"],
            "reference_cached": cached, "reference_rms_change": info["rms_change"], "fd_features_real": floor,
            "fd_features_reference": fd_ref}
    return Target(name, "zoo", model, model, sched, x_T, ref, lambda x: evaluator.evaluate(x)["fd_features"],
                  "feature FD", describe, meta)


def make_target(name: str, batch: int, seed: int) -> Target:
    return zoo_target(name, batch, seed) if name in fewstep.zoo.list() else oracle_target(name, batch, seed)


def distinct_presets() -> tuple[list[str], dict[str, list[str]], dict[str, str]]:
    """Preset names with aliases folded (``plms`` is ``pndm``) and stochastic presets set aside."""
    from fewstep.solvers import presets as P

    table = getattr(P, "PRESETS", {})
    by_fn: dict[Any, list[str]] = defaultdict(list)
    for name in fewstep.preset_names():
        by_fn[table.get(name, name)].append(name)
    names, aliases, skipped = [], {}, {}
    sched = fewstep.DiscreteVP.linear()
    for group in by_fn.values():
        group = sorted(group, key=lambda n: (n == "plms", n))
        name = group[0]
        try:
            plan = fewstep.preset(name, 10, sched)
        except Exception as exc:  # noqa: BLE001
            skipped[name] = f"cannot build at NFE 10: {exc}"
            continue
        if any(float(getattr(s, "renoise", 0.0) or 0.0) > 0.0 for s in plan.steps):
            skipped[name] = "stochastic (draws fresh noise each step); RMSE against an ODE reference does not apply"
            continue
        names.append(name)
        if len(group) > 1:
            aliases[name] = group[1:]
    return sorted(names), aliases, skipped


class LikGap:
    """``fewstep.likelihood_gap`` with the true samples' mean log-density computed once."""

    def __init__(self, oracle: fewstep.GaussianMixture, seed: int) -> None:
        self.oracle = oracle
        self.true = oracle.sample(N_TRUE, seed=seed + 1)
        self.lp_true = float(oracle.log_prob(self.true).mean())
        self.checked = False

    def __call__(self, x: torch.Tensor) -> float:
        gap = self.lp_true - float(self.oracle.log_prob(x.reshape(x.shape[0], -1)).mean())
        if not self.checked:  # the shortcut is fewstep.likelihood_gap exactly
            ref = fewstep.likelihood_gap(self.oracle, x, self.true)
            assert math.isclose(gap, ref, rel_tol=1e-9, abs_tol=1e-9), (gap, ref)
            self.checked = True
        return gap


# ---------------------------------------------------------------------------------------------
def run_target(target: Target, nfes: tuple[int, ...], *, kdiffusion: bool, model_mode: str,
               presets: list[str], spacings: tuple[str, ...] = SPACINGS) -> tuple[list[Result], dict[tuple[str, int], float], dict[str, Any]]:
    t_start = time.perf_counter()
    name, model, x_T, ref = target.name, target.model, target.x_T, target.ref
    results: list[Result] = []
    samples: dict[tuple[str, int], torch.Tensor] = {}  # best sample per (solver, nfe), for the likelihood gap
    best: dict[tuple[str, int], float] = {}
    timings: dict[str, float] = defaultdict(float)

    def keep(res: Result, x: torch.Tensor | None) -> None:
        results.append(res)
        if res.rmse is None or x is None:
            return
        key = (res.solver, res.nfe)
        if key not in best or res.rmse < best[key]:
            best[key] = res.rmse
            samples[key] = x

    # ---- fewstep presets, each at every spacing
    for p in presets:
        t0 = time.perf_counter()
        base, popts = parse_solver_arg(p)
        for n in nfes:
            for sp in spacings:
                try:
                    x, info = fewstep.sample(model, x_T, base, nfe=n, spacing=sp, return_info=True, **popts)
                except Exception as exc:  # noqa: BLE001  a preset that cannot run here is reported, not fatal
                    keep(Result(name, p, "fewstep", n, None, sp, None, f"{type(exc).__name__}: {exc}"[:120]), None)
                    continue
                keep(Result(name, p, "fewstep", n, int(info.nfe), sp, fewstep.rmse(x, ref)), x)
        timings[p] += time.perf_counter() - t0
        log(f"[{name}] fewstep {p}: {timings[p]:.1f}s")

    # ---- peers, each at every grid option
    ctx = peers_mod.PeerContext(target.peer_model, target.sched, model_mode)
    for peer in peers_mod.all_peers(kdiffusion=kdiffusion, schedule=target.sched):
        t0 = time.perf_counter()
        for n in nfes:
            if n < peer.min_nfe:
                continue
            for opt in peer.options:
                label = peer.option_label(opt)
                try:
                    out = peer.run(ctx, opt, x_T, n)
                except Exception as exc:  # noqa: BLE001
                    keep(Result(name, peer.name, peer.source, n, None, label, None, f"{type(exc).__name__}: {exc}"[:120]), None)
                    continue
                if out is None:  # the same grid as an option already run
                    continue
                x, used = out
                if used > n:
                    raise RuntimeError(f"{peer.name} {label} used {used} model calls for an NFE budget of {n}")
                keep(Result(name, peer.name, peer.source, n, used, label, fewstep.rmse(x, ref)), x)
        timings[peer.name] += time.perf_counter() - t0
        log(f"[{name}] {peer.name}: {timings[peer.name]:.1f}s")

    # ---- the same method on the same grid: fewstep preset vs diffusers scheduler, both on trailing steps
    t0 = time.perf_counter()
    agreement = []
    by_name = {p.name: p for p in peers_mod.all_peers(kdiffusion=False, schedule=target.sched)}
    for label, preset_name, opts, peer_name, parity in AGREEMENT_PAIRS:
        peer = by_name.get(peer_name)
        if peer is None or preset_name not in presets:
            continue
        for n in nfes:
            if n < peer.min_nfe or (parity == "odd" and n % 2 == 0):
                continue
            try:
                xf = fewstep.sample(model, x_T, preset_name, nfe=n, spacing="trailing", **opts)
                out = peer.run(ctx, {"timestep_spacing": "trailing"}, x_T, n)
            except Exception as exc:  # noqa: BLE001
                agreement.append({"fewstep": label, "peer": peer_name, "nfe": n, "cell": f"error: {exc}"[:60]})
                continue
            if out is None:
                continue
            xd, used = out
            ef, ed, diff = fewstep.rmse(xf, ref), fewstep.rmse(xd, ref), fewstep.rmse(xf, xd)
            agreement.append({"fewstep": label, "peer": peer_name, "nfe": n, "nfe_used_peer": used, "diff": diff,
                              "rmse_fewstep": ef, "rmse_peer": ed, "cell": f"{diff:.1e} ({ef / ed:.3g})"})
    timings["same-grid agreement"] = time.perf_counter() - t0
    log(f"[{name}] same-grid agreement: {timings['same-grid agreement']:.1f}s")

    t0 = time.perf_counter()
    gaps = {key: target.metric(x) for key, x in samples.items()}
    timings[target.metric_header] = time.perf_counter() - t0
    meta = {**target.meta, "wall_s": time.perf_counter() - t_start, "timings": dict(timings), "agreement": agreement}
    return results, gaps, meta


# ---------------------------------------------------------------------------------------------
def best_rows(results: list[Result]) -> dict[tuple[str, int], Result]:
    out: dict[tuple[str, int], Result] = {}
    for r in results:
        if r.rmse is None:
            continue
        key = (r.solver, r.nfe)
        if key not in out or r.rmse < out[key].rmse:  # type: ignore[operator]
            out[key] = r
    return out


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.4g}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.3g}"


def target_section(name: str, describe: str, metric_header: str, results: list[Result], gaps: dict[tuple[str, int], float],
                   meta: dict[str, Any], nfes: tuple[int, ...], counterparts: dict[str, list[str]],
                   aliases: dict[str, list[str]]) -> tuple[list[str], list[dict[str, Any]]]:
    agreement = {(e["fewstep"], e["nfe"]): e["cell"] for e in meta.get("agreement", [])}
    agreement_pairs = list(dict.fromkeys((e["fewstep"], e["peer"]) for e in meta.get("agreement", [])))
    bests = best_rows(results)
    solvers_fs = sorted({r.solver for r in results if r.source == "fewstep"})
    solvers_peer = list(dict.fromkeys(r.solver for r in results if r.source != "fewstep"))
    lines = [f"## {name}", "", f"{describe} Wall time for this model: {meta['wall_s']:.0f} s.", ""]

    # summary: best fewstep vs best peer (and best diffusers) per NFE
    lines += ["### Summary: best fewstep preset vs best peer", "",
              "RMSE vs reference; ratio < 1 means fewstep's best preset is more accurate. Peers include "
              "diffusers and k-diffusion; the 'best diffusers' columns restrict the peers to diffusers (DESIGN 5's bar). "
              "The last columns restrict fewstep to grids the peers also offer, separating the gain of the solver from "
              "that of the time grid (`quadratic` / `uniform_t` are fewstep-only grids; diffusers' `linspace` is close to `uniform_t`).", ""]
    summary_rows = []
    summary_json = []
    for n in nfes:
        fs = [bests[(s, n)] for s in solvers_fs if (s, n) in bests]
        pe = [bests[(s, n)] for s in solvers_peer if (s, n) in bests]
        df = [r for r in pe if r.source == "diffusers"]
        if not fs or not pe:
            continue
        bf = min(fs, key=lambda r: r.rmse)  # type: ignore[arg-type,return-value]
        bp = min(pe, key=lambda r: r.rmse)  # type: ignore[arg-type,return-value]
        bd = min(df, key=lambda r: r.rmse) if df else None  # type: ignore[arg-type,return-value]
        on_peer_grids = [r for r in results if r.source == "fewstep" and r.nfe == n and r.rmse is not None and r.option in PEER_GRIDS]
        bg = min(on_peer_grids, key=lambda r: r.rmse) if on_peer_grids else None  # type: ignore[arg-type,return-value]
        summary_rows.append([
            n, f"{bf.solver} ({bf.option})", _fmt(bf.rmse), f"{bp.solver} ({bp.option}; {bp.nfe_used} NFE)", _fmt(bp.rmse),
            _ratio(bf.rmse, bp.rmse), f"{bd.solver} ({bd.option})" if bd else "n/a", _fmt(bd.rmse if bd else None),
            _ratio(bf.rmse, bd.rmse if bd else None),
            f"{bg.solver} ({bg.option})" if bg else "n/a", _fmt(bg.rmse if bg else None), _ratio(bg.rmse if bg else None, bp.rmse),
        ])
        summary_json.append({"oracle": name, "nfe": n, "fewstep": asdict(bf), "peer": asdict(bp), "diffusers": asdict(bd) if bd else None,
                             "fewstep_on_peer_grids": asdict(bg) if bg else None,
                             "metric_fewstep": gaps.get((bf.solver, n)), "metric_peer": gaps.get((bp.solver, n))})
    lines += [markdown_table(["NFE", "best fewstep (spacing)", "RMSE", "best peer (option)", "RMSE", "ratio fs/peer",
                              "best diffusers (option)", "RMSE", "ratio fs/diffusers",
                              f"best fewstep on peer grids ({', '.join(PEER_GRIDS)})", "RMSE", "ratio to best peer"], summary_rows), ""]

    # counterparts: each fewstep preset vs the peers implementing the same method, each at its best option
    cp_rows = []
    for p in solvers_fs:
        for peer_name in counterparts.get(p, []):
            cells = []
            for n in nfes:
                a, b = bests.get((p, n)), bests.get((peer_name, n))
                if a is None or b is None or not b.rmse:
                    cells.append("n/a")
                    continue
                ratio = a.rmse / b.rmse  # type: ignore[operator]
                cells.append(f"**{ratio:.3g}**" if ratio > 1.2 else f"{ratio:.3g}")
            cp_rows.append([p, peer_name] + cells)
    if cp_rows:
        lines += ["### Same method, fewstep vs peer, each at its best grid option", "",
                  "RMSE ratio fewstep / peer (< 1: fewstep more accurate); ratios > 1.2 in bold. Differences come from "
                  "the grids each side may choose from and from method details (warm-up, final steps, coefficient variants).", "",
                  markdown_table(["fewstep", "peer"] + [f"NFE {n}" for n in nfes], cp_rows), ""]

    if agreement:
        lines += ["### Same method on the same grid (diffusers `trailing`)", "",
                  "fewstep preset (options chosen to define the same method as the scheduler) and the diffusers scheduler, both on "
                  "diffusers' trailing time steps. Each cell: RMS difference between the two sample sets, then in brackets the "
                  "RMSE-vs-reference ratio fewstep / diffusers. A difference far below both errors means the two compute the same "
                  "method; a ratio far from 1 on the same grid would point at a bug. Known definitional differences that show up here: "
                  "diffusers DDIM and PNDM step from t to t - 1000 // n rather than to the next grid entry, so when n does not divide 1000 "
                  "their last step ends at t = 0 (sigma_ve ~ 0.01), not at sigma = 0; diffusers DEIS ends at sigma(t = 0), not 0, and "
                  "uses its full order on the last step when n >= 15; diffusers UniPC lowers the order on the last steps at every n "
                  "(fewstep only below 15 steps); diffusers LMS and PNDM take their full order on the step into sigma = 0, while fewstep's "
                  "multistep presets take order 1 there (trailing grids end with a large step, e.g. sigma_ve 0.72 -> 0 at 5 steps, "
                  "so that choice dominates their error on this grid).", "",
                  markdown_table(["fewstep preset", "diffusers"] + [f"NFE {n}" for n in nfes],
                                 [[a_label, peer_name] + [agreement.get((a_label, n), "n/a") for n in nfes]
                                  for a_label, peer_name in agreement_pairs]), ""]

    # RMSE matrix
    mat_rows = []
    for s in solvers_fs + solvers_peer:
        label = s + (f" (= {', '.join(aliases[s])})" if s in aliases else "")
        mat_rows.append([label] + [_fmt(bests[(s, n)].rmse) if (s, n) in bests else "n/a" for n in nfes])
    lines += ["### RMSE vs reference at the best option (solver x NFE)", "", markdown_table(["solver"] + [f"NFE {n}" for n in nfes], mat_rows), ""]

    # rows
    rows = []
    for s in solvers_fs + solvers_peer:
        for n in nfes:
            r = bests.get((s, n))
            if r is None:
                errs = [x.error for x in results if x.solver == s and x.nfe == n and x.error]
                if errs:
                    rows.append([s, "fewstep" if s in solvers_fs else "peer", n, "n/a", "n/a", "n/a", "n/a", errs[0][:60]])
                continue
            rows.append([s, r.source, n, r.nfe_used, r.option, _fmt(r.rmse), _fmt(gaps.get((s, n))), ""])
    lines += ["### All rows (each solver at its best option per NFE)", "",
              markdown_table(["solver", "source", "NFE", "NFE used", "best option", "RMSE", metric_header, "note"], rows), ""]
    t = meta["timings"]
    lines += ["Time per solver family (all options and NFEs): " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()) + ".", ""]
    return lines, summary_json


def counterpart_map() -> dict[str, list[str]]:
    cp: dict[str, list[str]] = defaultdict(list)
    for peer in peers_mod.all_peers(kdiffusion=True):
        if peer.counterpart:
            cp[peer.counterpart].append(peer.name)
    return cp


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="gmm-d64 only, batch 64 (a few minutes at most)")
    ap.add_argument("--oracles", nargs="+", default=None, help="oracle[:batch] ... (default: gmm-d64:256 digits-gmm:256 gmm-d3072:64)")
    ap.add_argument("--digits", action="store_true",
                    help="the bundled digits networks instead of the oracles (NFE 5-20, four spacings) -> reports/quality_digits.md")
    ap.add_argument("--models", nargs="+", default=None, help="zoo model[:batch] ... (default with --digits: digits-vp-eps:256)")
    ap.add_argument("--nfe", nargs="+", type=int, default=None, help=f"NFE budgets (default {NFES}; with --digits {ZOO_NFES})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--presets", nargs="+", default=None, help="fewstep presets (default: all deterministic ones)")
    ap.add_argument("--no-kdiffusion", action="store_true", help="leave out the k-diffusion peers")
    ap.add_argument("--model-mode", choices=["sigma", "timestep"], default="sigma",
                    help="how peers query the oracle: at the scheduler's own noise level (default) or at its timestep (see peers.py)")
    ap.add_argument("--out", default=None, help="report path (default reports/quality.md, or reports/quality_quick.md with --quick)")
    args = ap.parse_args(argv)
    quiet_diffusers()

    digits = args.digits or bool(args.models)
    specs = args.models if digits else args.oracles
    if specs:
        targets = []
        for spec in specs:
            nm, _, b = spec.partition(":")
            targets.append((nm, int(b) if b else (64 if nm == "gmm-d3072" or args.quick else 256)))
    elif digits:
        targets = [(nm, 64 if args.quick else b) for nm, b in ZOO_MODELS]
    else:
        targets = list(QUICK_ORACLES if args.quick else FULL_ORACLES)
    default_nfes = ((5, 10) if args.quick else ZOO_NFES) if digits else NFES
    nfes = tuple(sorted(set(args.nfe or default_nfes)))
    spacings = ZOO_SPACINGS if digits else SPACINGS
    stem = "quality_digits" if digits else "quality"
    out = Path(args.out) if args.out else REPORTS / (f"{stem}_quick.md" if args.quick else f"{stem}.md")
    presets, aliases, skipped = distinct_presets()
    presets = presets + list(VARIANTS)
    if args.presets:
        presets = [p for p in args.presets]
    cps = counterpart_map()

    t_all = time.perf_counter()
    sections: list[str] = []
    all_results: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    metas = {}
    metric_header = "lik gap (nats)"
    for name, batch in targets:
        target = make_target(name, batch, args.seed)
        metric_header = target.metric_header
        res, gaps, meta = run_target(target, nfes, kdiffusion=not args.no_kdiffusion, model_mode=args.model_mode,
                                     presets=presets, spacings=spacings)
        lines, summ = target_section(name, target.describe, target.metric_header, res, gaps, meta, nfes, cps, aliases)
        sections += lines
        summaries += summ
        metas[name] = meta
        bests = best_rows(res)
        all_results += [{**asdict(r), "best": bests.get((r.solver, r.nfe)) is r,
                         metric_header: gaps.get((r.solver, r.nfe)) if bests.get((r.solver, r.nfe)) is r else None} for r in res]
    wall = time.perf_counter() - t_all

    command = " ".join(["python benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])])
    setup = ("Setup: the bundled digits network(s) (`fewstep.zoo.load`), on the schedule they were trained with "
             "(digits-vp-eps: DDPM linear betas 1e-4..0.02, 1000 steps); initial noise "
             "`fewstep.initial_noise(sched, (batch, 1, 8, 8), seed)` in float64, shared by every solver; peers query the same network "
             "(at the time t(lambda) of the noise level they ask for); all solvers end at sigma = 0. "
             if digits else
             "Setup: noise schedule `fewstep.DiscreteVP.linear()` (DDPM linear betas 1e-4..0.02, 1000 steps); "
             "model `oracle.as_model(sched)` (the exact posterior); initial noise `fewstep.initial_noise(sched, (batch, d), seed)` "
             "in float64, shared by every solver; all solvers end at sigma = 0. ")
    head = [
        "# Quality per NFE: fewstep presets vs diffusers and k-diffusion on "
        + ("the bundled digits networks" if digits else "exact oracles"), "",
        f"Generated by `{command}` in {wall:.0f} s wall time ({time.strftime('%Y-%m-%d %H:%M')}).", "",
        "Machine:", *machine_lines(), "",
        setup + f"NFE = model evaluations per sample. Seed {args.seed}.", "",
        "Grid options each solver picks its best from (per NFE, by RMSE):", "",
        f"- fewstep presets: `spacing=` {', '.join(spacings)}; besides the defaults, the preset options {', '.join('`' + v + '`' for v in VARIANTS)} run as rows of their own.",
        "- diffusers schedulers: `timestep_spacing` leading / linspace / trailing, each with and without "
        "`use_karras_sigmas` where the scheduler has it (DDIM and PNDM do not; DPMSolverSinglestep has no "
        "`timestep_spacing`); options that produce an identical grid are run once. DDIM and PNDM with "
        "`set_alpha_to_one=True`, DDIM with `clip_sample=False`, PNDM with `skip_prk_steps=True` (PLMS). "
        "Driven by a `scale_model_input` / `step` loop; Euler / Heun / LMS work on `x / alpha` with "
        "`init_noise_sigma` as diffusers intends. Heun uses 2n - 1 calls for n steps, so at an even budget it uses one call less; "
        "PNDM uses n + 1 calls for n steps.",
        "- k-diffusion samplers (sampling.py loaded standalone): Karras (rho 7) or exponential sigmas from "
        "sigma_min = sigma(t=0) to sigma_max = sigma(t=999) in the VE view, then 0; the denoiser is the model's "
        "x0 prediction in that view (the oracle's exact `posterior(x, 1, sigma).x0`). `dpm_fast` gets NFE - 1 evaluations plus one denoiser call to reach sigma = 0.",
        f"- Peer model queries: `--model-mode {args.model_mode}` "
        + ("(each call answered exactly at the noise level the scheduler itself assigns to that call, so only its discretisation "
           "error is measured; `--model-mode timestep` calls eps(x, t) at the scheduler's timestep instead)." if args.model_mode == "sigma"
           else "(eps(x, t) at the scheduler's timestep, fewstep's interpolation between integer steps)."),
        "",
    ]
    if skipped:
        head += ["Presets left out: " + "; ".join(f"`{k}`: {v}" for k, v in skipped.items()) + ".", ""]
    if aliases:
        head += ["Aliases (same preset, run once): " + "; ".join(f"`{k}` = {', '.join(f'`{a}`' for a in v)}" for k, v in aliases.items()) + ".", ""]

    # headline across oracles
    hl = []
    for s in summaries:
        if s["nfe"] in SUMMARY_NFES:
            f, p, d = s["fewstep"], s["peer"], s["diffusers"]
            hl.append([s["oracle"], s["nfe"], f"{f['solver']} ({f['option']})", _fmt(f["rmse"]), f"{p['solver']} ({p['option']})",
                       _fmt(p["rmse"]), _ratio(f["rmse"], p["rmse"]), _ratio(f["rmse"], d["rmse"] if d else None),
                       _fmt(s["metric_fewstep"]), _fmt(s["metric_peer"])])
    head += ["## Headline: NFE 5-10", "", markdown_table(
        ["model", "NFE", "best fewstep", "RMSE", "best peer", "RMSE", "fs/peer", "fs/best diffusers",
         f"{metric_header}: fewstep", f"{metric_header}: peer"], hl), ""]

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(head + sections))
    out.with_suffix(".json").write_text(json.dumps({"machine": dict(line[2:].split(": ", 1) for line in machine_lines()), "wall_s": wall,
                                                    "oracles": metas, "summary": summaries, "results": all_results}, indent=1, default=str))
    log(f"wrote {out} and {out.with_suffix('.json')} ({wall:.0f} s)")
    print("\n".join(head[-(len(hl) + 3):]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

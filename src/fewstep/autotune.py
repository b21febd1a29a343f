"""Autotune on first use (the cuDNN-benchmark pattern): for this model, NFE and sample shape, run a few
candidate solvers / grids on a few samples against a fine solve of the same samples, keep the most
accurate, and cache the choice under the model's behaviour-keyed identity (:mod:`fewstep.identity`).

Candidates (:func:`candidates`) are the static default (:data:`fewstep.defaults.DEFAULT_RULE`) and its
neighbours: the logistic grid's centre moved by -1.5, -0.75, +0.75, +1.5 in log-SNR, its scale times 0.7
and 1.4, UniPC of order 2 on the rule's grid; the grid families the peers use (:data:`FAMILY_GRIDS`: the
default preset on uniform log-SNR, i.e. diffusers' exponential sigmas, and on the DMN grid; UniPC of order 2
on uniform log-SNR and on DPM-Solver's time-quadratic grid); with a named preset, only its grids; and,
when :func:`fewstep.sample` tunes (it records the
reference solve's trajectory), the chosen preset on the GITS grid of that trajectory
(:mod:`fewstep.teacher`: least summed first-order miss, found for no model call). The
reference is UniPC on the rule's grid at ``max(4 N, 40)`` evaluations. With ``K`` candidates the cost is ``n (R + K N)`` sample-evaluations for
``n`` samples plus the identity probe's few; ``n`` is as many as the budget (default 3,000) allows, at
most 64 and at least 4. The samples are keyed noises of ``seed`` (not the caller's), so the choice
does not depend on the batch being sampled, and it is deterministic for a given seed.

A candidate replaces the default only when it is better with confidence
(:data:`CONFIDENCE`): in that fraction of bootstrap resamples of the tuning samples (a fixed generator
of ``seed``) its RMSE is below the default's. On 4-64 samples the most accurate candidate is often
better by chance; without this gate autotune was worse than the default on held-out noises in 6 of 78
network cells and 16 of 108 oracle cells, with it in 2 and 4 (``docs/defaults.md``).

    x = fewstep.sample(model, x_T, nfe=8, autotune=True)          # tunes once, then reuses
    model = fewstep.Model(fn, sched, "eps", autotune=True)        # every default call of this model
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .atomic import write_atomic
from .cachedir import default_cache_dir
from .defaults import DEFAULT_RULE, default_call
from .errors import ArgumentError
from .models import Model
from .noise import initial_noise

__all__ = ["AutotuneOptions", "AutotuneResult", "autotune", "candidates", "clear_autotune_cache", "confidence_better", "CANDIDATE_SET_VERSION",
           "CONFIDENCE", "FAMILY_GRIDS"]

#: bumped whenever :func:`candidates` or the reference changes, so cached choices are remade
CANDIDATE_SET_VERSION = 6
#: the bootstrap confidence a candidate needs to replace the default (chosen before measuring: a
#: one-sided 90 % bar), and the number of resamples
CONFIDENCE = 0.9
BOOTSTRAP_RESAMPLES = 1000
CENTER_MOVES = (-1.5, -0.75, 0.75, 1.5)
SCALE_FACTORS = (0.7, 1.4)
#: the other presets on the rule's grid. DPM-Solver++ 2M and 3M were candidates until version 6: on the
#: fit noises of the 31 benchmark targets (186 cells) neither was ever the most accurate candidate
OTHER_PRESETS: tuple[tuple[str, dict[str, Any]], ...] = (("unipc", {"order": 2}),)
#: ``(spacing, preset options or None for the default preset's own)``: the grid families of the peers
#: (``benchmarks/defaults.py``). Chosen on the fit noises (seed 7) of the 31 benchmark targets, never the
#: judge noises: with them the most accurate candidate per cell is 0.959x the version-5 set's (geometric
#: mean over 186 cells), down to 0.60-0.65x on eps networks (quadratic), a scaled-linear oracle (uniform
#: log-SNR) and an EDM network at NFE 20 (DMN)
FAMILY_GRIDS: tuple[tuple[str, dict[str, Any] | None], ...] = (
    ("uniform_lambda", None), ("dmn", None), ("uniform_lambda", {"order": 2}), ("quadratic", {"order": 2}))
#: options that choose the grid or the preset: autotune chooses them, so a call may not also set them
CHOSEN_OPTIONS = frozenset({"spacing", "logistic_center", "logistic_scale", "rho", "steps_offset"})


@dataclass(frozen=True)
class AutotuneOptions:
    """``budget``: sample-evaluations in all (reference, candidates, identity probe); ``seed``: the
    keyed noises tuned on (not a seed users sample with, so that the choice is not made on the very
    noises it is used for); ``cache_dir``: where choices are kept (default: ``autotune/`` in
    :func:`fewstep.schedule_search.default_cache_dir`; ``False``: memory only)."""

    budget: int = 3000
    seed: int = 918273
    cache_dir: str | Path | bool | None = None
    max_samples: int = 64
    min_samples: int = 4

    def __post_init__(self) -> None:
        for name in ("budget", "seed", "max_samples", "min_samples"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "seed" else 1):
                raise ArgumentError(f"autotune {name} must be a {'non-negative' if name == 'seed' else 'positive'} integer, got {v!r}")


@dataclass
class AutotuneResult:
    """The choice (``preset`` with ``options``) and what it cost: ``errors`` of every candidate (RMSE
    to the reference on ``samples`` samples), ``evaluations`` spent now (0 when it came from a cache)."""

    preset: str
    options: dict[str, Any]
    label: str
    errors: dict[str, float]
    samples: int
    reference_nfe: int
    evaluations: int
    cached: bool
    wall_s: float
    key: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What was chosen, what this call spent (``evaluations``, ``wall_s``) and what the tuning cost
        when it was done (``tuning_evaluations``, ``tuning_wall_s``)."""
        return {"choice": self.label, "preset": self.preset, "options": dict(self.options), "samples": self.samples,
                "reference_nfe": self.reference_nfe, "evaluations": self.evaluations, "cached": self.cached, "wall_s": round(self.wall_s, 3),
                "tuning_evaluations": self.extra.get("tuning_evaluations", self.evaluations),
                "tuning_wall_s": round(float(self.extra.get("tuning_wall_s", self.wall_s)), 3)}


def candidates(sched: Any, nfe: int, dim: int | None, preset: str | None = None, prediction: str | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    """``(label, preset, options)`` of every candidate for a model of parameterisation ``prediction``:
    the default (or ``preset`` on the default grid) first, then the grid moves, then (for the default
    call only) the other presets."""
    name, base = default_call(sched, nfe, dim, prediction)
    if preset is not None:
        name, base = preset, {k: v for k, v in base.items() if k in ("spacing", "logistic_center", "logistic_scale")}
    c, s = float(base["logistic_center"]), float(base["logistic_scale"])
    out: list[tuple[str, str, dict[str, Any]]] = [("default", name, dict(base))]
    out += [(f"center{m:+g}", name, {**base, "logistic_center": c + m}) for m in CENTER_MOVES]
    out += [(f"scale*{f:g}", name, {**base, "logistic_scale": s * f}) for f in SCALE_FACTORS]
    grid = {k: base[k] for k in ("spacing", "logistic_center", "logistic_scale")}
    own = {k: v for k, v in base.items() if k not in grid}
    if preset is None:
        for other, opts in OTHER_PRESETS:
            if (other, opts) != (name, own):
                out.append((_label(other, opts), other, {**opts, **grid}))
    for spacing, opts in FAMILY_GRIDS:
        if opts is None or ("unipc", opts) == (name, own):  # the default preset on this grid
            cand = (spacing, name, {**own, "spacing": spacing})
        elif preset is None:
            cand = (f"{spacing}:{_label('unipc', opts)}", "unipc", {**opts, "spacing": spacing})
        else:
            continue
        if all((c[1], c[2]) != cand[1:] for c in out):
            out.append(cand)
    return out


def _label(preset: str, opts: dict[str, Any]) -> str:
    return preset + "".join(f",{k}={v}" for k, v in opts.items())


_MEMORY: dict[str, AutotuneResult] = {}
#: (id(model), what was asked) -> (state token, cache key): skips re-hashing the weights while no
#: parameter or buffer of the model's modules has changed (their version counters and storage)
_RECENT: dict[tuple[int, str], tuple[tuple[Any, ...], str]] = {}


def confidence_better(candidate: torch.Tensor | None, default: torch.Tensor | None, seed: int,
                      resamples: int = BOOTSTRAP_RESAMPLES) -> float:
    """The fraction of bootstrap resamples of the samples (per-sample RMS errors, paired) in which
    ``candidate``'s error (their mean, :func:`fewstep.rmse`) is below ``default``'s; 1.0 when they are
    the same run, 0.0 when either is missing. Deterministic: the resamples come from a generator
    seeded with ``seed``."""
    if candidate is None or default is None:
        return 0.0
    if candidate is default or torch.equal(candidate, default):
        return 1.0
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, candidate.numel(), (resamples, candidate.numel()), generator=g)
    return float((candidate[idx].sum(1) < default[idx].sum(1)).double().mean())


def _state_token(model: Model) -> tuple[Any, ...]:
    """What changes when the model's function or any of its weights change: the function object, and
    each tensor's identity, storage and in-place version counter (no data is read)."""
    from .identity import find_modules

    tensors = [t for m in find_modules(model.fn) for t in (*m.parameters(), *m.buffers())]
    tensors += [c.cell_contents for c in (getattr(model.fn, "__closure__", None) or ())
                if isinstance(getattr(c, "cell_contents", None), torch.Tensor)]  # e.g. prompt embeddings
    given = vars(model).get("identity", vars(model).get("_given"))  # a user's identity= (never a computed one)
    return (id(model.fn), given, model.prediction, id(model.schedule), model.threshold,
            tuple((id(t), t.data_ptr() if t.device.type != "meta" else 0, t._version) for t in tensors))


def clear_autotune_cache() -> None:
    """Forget the choices kept in memory (files in the cache folder stay)."""
    _MEMORY.clear()
    _RECENT.clear()


def _cache_dir(opts: AutotuneOptions) -> Path | None:
    if opts.cache_dir is False:
        return None
    if opts.cache_dir is None or opts.cache_dir is True:
        return default_cache_dir() / "autotune"
    return Path(opts.cache_dir)


def autotune(model: Model, nfe: int, sample_shape: Sequence[int], run: Callable[..., torch.Tensor], *, preset: str | None = None,
             options: dict[str, Any] | None = None, config: AutotuneOptions | None = None, device: torch.device | str | None = None,
             dtype: torch.dtype = torch.float32, log: Callable[[str], None] | None = None,
             teacher: Callable[..., tuple[torch.Tensor, Any]] | None = None) -> AutotuneResult:
    """Choose the preset and grid for ``model`` at ``nfe`` evaluations on samples shaped
    ``sample_shape`` (see the module docstring), sampling with ``run`` (:func:`fewstep.sample`);
    ``options`` are the caller's other sampling options (``t_start``, ``t_end``, preset options),
    kept for every candidate and the reference. ``teacher(model, noises, solver, nfe, options)``:
    the reference solve with its :class:`~fewstep.teacher.TeacherCosts` (adds the GITS
    candidate; :func:`fewstep.sample` passes it), else the reference is ``run``'s."""
    from .identity import Probe, model_key, probe_for, warn_mismatch

    cfg = config or AutotuneOptions()
    opts = dict(options or {})
    clash = sorted(CHOSEN_OPTIONS & set(opts))
    if clash:
        raise ArgumentError(f"autotune chooses the grid: do not also set {clash} (or sample without autotune)")
    if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
        raise ArgumentError(f"autotune needs nfe= (model evaluations per sample), got {nfe!r}")
    shape = tuple(int(v) for v in sample_shape)
    dim = math.prod(shape)
    cands = candidates(model.schedule, nfe, dim, preset, model.prediction)
    with_gits = teacher is not None and not {"t_start", "t_end", "t_noisy_start", "t_noisy_end"} & set(opts)
    if preset is not None:
        from .solvers.presets import preset as build_preset

        if build_preset(preset, nfe, model.schedule, **{**opts, **cands[0][2]}).stochastic:
            raise ArgumentError(f"autotune compares deterministic solvers with the ODE solution; {preset!r} draws noise at its steps")
    ref_nfe = max(4 * nfe, 40)
    per_sample = ref_nfe + (len(cands) + with_gits) * nfe
    probe_cost = 6
    n = min(cfg.max_samples, (cfg.budget - probe_cost) // per_sample)
    if n < cfg.min_samples:
        raise ArgumentError(f"autotune at NFE {nfe} with {len(cands)} candidates costs {per_sample} evaluations per sample; a budget of "
                            f"{cfg.budget} allows {max(n, 0)} samples, fewer than {cfg.min_samples}: raise the budget "
                            f"(AutotuneOptions(budget={cfg.min_samples * per_sample + probe_cost})) or sample without autotune")
    t0 = time.perf_counter()
    wanted = {"version": CANDIDATE_SET_VERSION, "nfe": nfe, "shape": list(shape), "preset": preset, "options": sorted((k, repr(v)) for k, v in opts.items()),
              "budget": cfg.budget, "seed": cfg.seed, "rule": repr(DEFAULT_RULE)}
    token = _state_token(model)
    memo = (id(model), json.dumps(wanted, sort_keys=True))
    if memo in _RECENT and _RECENT[memo][0] == token:
        key = _RECENT[memo][1]
    else:
        key = hashlib.sha256(json.dumps([model_key(model), wanted]).encode()).hexdigest()[:24]
        _RECENT[memo] = (token, key)
    if key in _MEMORY:
        hit = _MEMORY[key]
        return AutotuneResult(hit.preset, dict(hit.options), hit.label, dict(hit.errors), hit.samples, hit.reference_nfe, 0, True,
                              time.perf_counter() - t0, key, dict(hit.extra))
    evals0 = model.evaluations
    folder = _cache_dir(cfg)
    path = folder / f"autotune-{key}.json" if folder is not None else None
    probe = probe_for(model, torch.empty((1, *shape), dtype=dtype), device=device)
    if path is not None and path.is_file():
        try:
            data = json.loads(path.read_text())
            stored = Probe.from_json(data["probe"])
            if data.get("wanted") == json.loads(json.dumps(wanted)) and stored.matches(probe):
                result = AutotuneResult(data["preset"], dict(data["options"]), data["label"], dict(data["errors"]), int(data["samples"]),
                                        int(data["reference_nfe"]), model.evaluations - evals0, True, time.perf_counter() - t0, key,
                                        {"tuning_evaluations": data.get("evaluations"), "tuning_wall_s": data.get("wall_s", float("nan")),
                                         "most_accurate": data.get("most_accurate"), "confidence": data.get("confidence")})
                _MEMORY[key] = result
                return result
            warn_mismatch(f"autotune cache {path} was written by a model that computes something else (its probe differs); tuning again", log)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warn_mismatch(f"autotune cache {path} is unreadable ({exc}); tuning again", log)

    noises = initial_noise(model.schedule, (n, *shape), cfg.seed, t_start=opts.get("t_start"), dtype=dtype, device=device)
    base = cands[0]
    ref_opts = {**opts, **{k: base[2][k] for k in ("spacing", "logistic_center", "logistic_scale")}}
    ref_opts.setdefault("lower_order_final", False)
    if teacher is not None:
        reference, costs = teacher(model, noises, "unipc", ref_nfe, ref_opts)
        if with_gits and nfe < len(costs.times):
            from .teacher import gits_times

            cands = cands + [("gits", base[1], {**{k: v for k, v in base[2].items() if k not in CHOSEN_OPTIONS},
                                                "spacing": [float(t) for t in gits_times(costs, nfe)]})]
    else:
        reference = run(model, noises, "unipc", nfe=ref_nfe, autotune=False, **ref_opts)
    errors: dict[str, float] = {}
    per_sample: dict[str, torch.Tensor] = {}
    for label, name, cand_opts in cands:
        try:
            x = run(model, noises, name, nfe=nfe, autotune=False, **{**opts, **cand_opts})
            per_sample[label] = (x.detach().double() - reference.detach().double()).pow(2).flatten(1).mean(1).sqrt().cpu()
            err = float(per_sample[label].mean())  # fewstep.rmse: the per-sample RMS averaged over the samples
        except Exception as exc:  # noqa: BLE001  a candidate that fails (a preset too short for this NFE, NaN) loses
            if log:
                log(f"autotune: candidate {label} failed: {type(exc).__name__}: {exc}")
            err = math.inf
        errors[label] = err if math.isfinite(err) else math.inf
    best = min(errors, key=lambda k: (errors[k], [c[0] for c in cands].index(k)))
    confidence = confidence_better(per_sample.get(best), per_sample.get(cands[0][0]), cfg.seed)
    label = best if best == cands[0][0] or confidence >= CONFIDENCE or not math.isfinite(errors[cands[0][0]]) else cands[0][0]
    _, name, chosen = next(c for c in cands if c[0] == label)
    spent, wall = model.evaluations - evals0, time.perf_counter() - t0
    result = AutotuneResult(name, dict(chosen), label, errors, n, ref_nfe, spent, False, wall, key,
                            {"tuning_evaluations": spent, "tuning_wall_s": wall, "most_accurate": best, "confidence": confidence})
    _MEMORY[key] = result
    if path is not None:
        record = {"format": "fewstep-autotune", "wanted": wanted, "preset": name, "options": chosen, "label": label,
                  "most_accurate": best, "confidence": confidence,
                  "errors": {k: (v if math.isfinite(v) else None) for k, v in errors.items()}, "samples": n, "reference_nfe": ref_nfe,
                  "evaluations": result.evaluations, "wall_s": result.wall_s, "probe": probe.to_json(), "model": model.name}
        try:
            write_atomic(path, json.dumps(record, indent=1))
        except OSError as exc:
            warn_mismatch(f"autotune could not write its cache {path} ({exc}); the choice is kept in memory only", log)
    if log:
        log(f"autotune: {label} ({name}) chosen for NFE {nfe} on {n} samples, {result.evaluations} evaluations, {result.wall_s:.1f} s")
    return result

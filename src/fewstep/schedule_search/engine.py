"""The search: start from the best presets on their best grids, let a cheap predictor pick which of
many evolved candidates to evaluate, refine the grid of the best, and save state after every
generation so that a killed search resumes where it stopped.

Generation 0 screens every deterministic preset (and the usual option variants) on every seed grid
on the first ``screen`` calibration noises, all together (one batched model call per evaluation
index), and evaluates the ``seed_keep`` best distinct plans on all calibration noises: the best of
those is the *baseline* (the best preset at its best grid); their plans become the first population. Each
evolution generation breeds ``offspring`` children (tournament selection, uniform crossover, one
to three mutations of genes, singlestep splits / merges or the grid), ranks them with a ridge
regression of log-error on candidate features fitted to everything evaluated so far (the cheap
predictor of S^3, Liu et al. 2023: only the ``population`` best-predicted children are evaluated
for real, plus one at random to keep it honest), and keeps the best ``population`` of all
evaluated. The last ``refine_generations`` refine the best grid only by pattern search (every grid
logit moved up and down, all moves evaluated together, the step halved when none improves). Everything is seeded; the state (population, archive,
random generator) is written atomically after every generation.

With a ``budget`` (model rows the search may spend) the search is *raced*: every new candidate runs
first on the first ``race`` calibration noises only (the same noises for all: common random numbers),
and only one whose error there is within ``race_margin`` of the best fully evaluated candidate's error
on the same noises goes on to the rest (successive halving in two stages; the losers keep an estimate
``error_race * best_full / best_race``, which is never below the best). A budgeted search runs in
four phases after the seeds: up to ``grid_fraction`` of the budget a *grid phase* (compass search
on every grid logit of the best seed, its steps' strategies fixed: few parameters, so it overfits a
few noises least), then evolution, then ``refine_fraction`` refining the best grid, and the last
``polish_fraction`` polishes the best candidate (:mod:`.polish`: its grid and IIA-form corrections
fitted to the final error; what it leaves refines the grid). The grid phase's best
(:attr:`SearchReport.grid_best`) and the polished plan (:attr:`SearchReport.polished`) are kept as
finalists: :func:`fewstep.search` returns whichever of them and the overall best is best on the
held-out noises. No batch is started that would spend more than is left, and the search stops when
nothing fits.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..atomic import write_atomic
from ..errors import ArgumentError, FewstepError, SolverError
from ..identity import Probe, walk_callable, model_key, probe_for, weights_digest
from ..metrics import rmse
from ..models import Model
from ..schedules import DiscreteVP
from ..solvers.plan import SolverSchedule, schedule_fingerprint
from ..solvers.presets import preset
from .evaluate import BatchCost, evaluate_plans
from .objective import Objective, tensor_digest
from .polish import JACOBIAN_ROWS, PolishResult, iteration_cost, polish
from .space import Candidate, Gene, Space

__all__ = ["SearchConfig", "run_search", "SearchReport", "SEED_PRESETS", "SEED_SPACINGS", "DISCRETE_SEED_SPACINGS", "StateError", "seed_plan",
           "add_budget_arguments", "metric_identity"]

STATE_FORMAT = "fewstep.search_state"
STATE_VERSION = 6  # 2: keyed by fewstep.identity.model_key, with the model's probe; 3: the reference settings and the metric's code;
# 4: a budget, racing, and the default call among the seeds; 5: the grid phase of a budgeted search; 6: its polish phase

#: the presets a search starts from (each at every seed spacing): every deterministic preset
#: (aliases folded: ``plms`` is ``pndm``; ``lcm`` is stochastic) and the option variants users set
SEED_PRESETS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("ddim", {}), ("deis", {}), ("deis", {"interp": "lambda"}), ("deis", {"interp": "lambda", "lower_order_final": False}),
    ("dpm_solver_2", {}), ("dpm_solver_3", {}), ("dpmpp_2m", {}), ("dpmpp_2s", {}), ("dpmpp_3m", {}),
    ("dpmpp_3m", {"lower_order_final": False}), ("heun", {}), ("ipndm", {}), ("lms", {}), ("pndm", {}),
    ("unipc", {}), ("unipc", {"order": 2}), ("unipc", {"lower_order_final": False}),
)
#: the grids each seed preset is tried on; DiscreteVP schedules also get diffusers' discrete grids
SEED_SPACINGS: tuple[str, ...] = ("logistic", "quadratic", "uniform_t", "uniform_lambda", "karras", "dmn")
DISCRETE_SEED_SPACINGS: tuple[str, ...] = ("leading", "leading_multistep", "trailing")


def seed_plan(name: str, options: dict[str, Any], spacing: str, schedule: Any, nfe: int, t_start: float,
              grids: dict[str, Sequence[float]] | None = None) -> SolverSchedule:
    """A seed preset's plan: on ``t_start``, except diffusers' discrete grids, which fix their own, and
    the explicit times of ``grids[spacing]`` (a named grid of the search, e.g. ``"gits"``)."""
    if grids and spacing in grids:
        return preset(name, nfe, schedule, spacing=[float(t) for t in grids[spacing]], **options)
    start = {} if spacing in DISCRETE_SEED_SPACINGS else {"t_start": t_start}
    return preset(name, nfe, schedule, spacing=spacing, **start, **options)


def metric_identity(metric: Callable[..., Any] | None) -> str:
    """What a search state records of its metric: ``"rmse"`` for the default, else the function's
    qualified name with the digest :mod:`fewstep.identity` takes of a model function (its code and
    the plain values it closes over) and the weights of the torch modules it uses, so that two
    lambdas, or one feature network with other weights, are two metrics."""
    if metric is None or metric is rmse:
        return "rmse"
    walk = walk_callable(metric)
    code = hashlib.sha256("\n".join(walk.code).encode()).hexdigest()[:16]
    mods = walk.outermost_modules()
    weights = hashlib.sha256("\n".join(weights_digest(m) for m in mods).encode()).hexdigest()[:16] if mods else "none"
    name = getattr(metric, "__qualname__", None) or type(metric).__qualname__
    return f"{getattr(metric, '__module__', None) or '?'}.{name}|code:{code}|weights:{weights}"


class _BudgetSpent(Exception):
    """Raised inside a generation when the next batch no longer fits in the search's budget."""


class StateError(ArgumentError):
    """A search state file does not belong to this search (other model, noises, NFE or settings), or
    was written by a model that computes something else (its stored probe does not match)."""


@dataclass(frozen=True)
class SearchConfig:
    """Everything that determines a search's result (the state file must match it to resume)."""

    nfe: int
    seed: int = 0
    population: int = 8
    offspring: int = 96
    generations: int = 32
    refine_generations: int = 8
    max_rows: int = 4096
    seed_presets: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = tuple((n, tuple(sorted(o.items()))) for n, o in SEED_PRESETS)
    seed_spacings: tuple[str, ...] = SEED_SPACINGS
    #: named explicit grids every seed preset is tried on too (``(("gits", times),)``: :mod:`fewstep.teacher`)
    seed_grids: tuple[tuple[str, tuple[float, ...]], ...] = ()
    screen: int = 32
    seed_keep: int = 12
    #: ``(preset, options, spacing)`` seeds tried besides the preset x spacing sweep (the default call)
    extra_seeds: tuple[tuple[str, tuple[tuple[str, Any], ...], str], ...] = ()
    #: model rows (samples x NFE) the search may spend in all (``None``: no cap; ``generations`` ends it)
    budget: int | None = None
    #: calibration noises every new candidate runs on first (0: no racing)
    race: int = 0
    race_margin: float = 0.02
    #: with a budget: the share of it (at the end) that refines the grid only
    refine_fraction: float = 0.3
    #: with a budget: the grid phase runs until this share of it is spent (the seeds included)
    grid_fraction: float = 0.35
    #: with a budget: the share of it (at the very end) that polishes the best candidate's grid and
    #: corrections by Levenberg-Marquardt on the final error (:mod:`.polish`); 0: no polish
    polish_fraction: float = 0.0

    def __post_init__(self) -> None:
        for name, lo in (("nfe", 1), ("seed", 0), ("population", 2), ("offspring", 1), ("generations", 1), ("refine_generations", 0), ("max_rows", 1),
                         ("screen", 2), ("seed_keep", 1), ("race", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ArgumentError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.budget is not None and (not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget < 1):
            raise ArgumentError(f"budget must be a positive integer (model rows) or None, got {self.budget!r}")
        for name in ("race_margin", "refine_fraction", "grid_fraction", "polish_fraction"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= float(v) < 1.0:
                raise ArgumentError(f"{name} must be a number in [0, 1), got {v!r}")
        if self.grid_fraction + self.refine_fraction + self.polish_fraction > 1.0:
            raise ArgumentError(f"grid_fraction + refine_fraction + polish_fraction must not exceed 1, got {self.grid_fraction} + "
                                f"{self.refine_fraction} + {self.polish_fraction}")
        if self.budget is None and self.refine_generations >= self.generations:
            raise ArgumentError(f"refine_generations ({self.refine_generations}) must be below generations ({self.generations})")

    def to_json(self) -> dict[str, Any]:
        return {"nfe": self.nfe, "seed": self.seed, "population": self.population, "offspring": self.offspring,
                "generations": self.generations, "refine_generations": self.refine_generations, "max_rows": self.max_rows,
                "seed_presets": [[n, dict(o)] for n, o in self.seed_presets], "seed_spacings": list(self.seed_spacings),
                "seed_grids": [[n, list(g)] for n, g in self.seed_grids],
                "screen": self.screen, "seed_keep": self.seed_keep, "extra_seeds": [[n, dict(o), sp] for n, o, sp in self.extra_seeds],
                "budget": self.budget, "race": self.race, "race_margin": self.race_margin, "refine_fraction": self.refine_fraction,
                "grid_fraction": self.grid_fraction, "polish_fraction": self.polish_fraction}


def _budget_value(text: str) -> int | str | None:
    """``--budget``: a positive integer, ``auto`` or ``none`` (the long search)."""
    import argparse

    low = text.strip().lower()
    if low in ("auto", "none"):
        return None if low == "none" else "auto"
    try:
        value = int(low.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, 'auto' or 'none', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"the budget must be positive, got {value}")
    return value


def add_budget_arguments(parser: Any, default_budget: str | None = "auto") -> None:
    """The search budget as command-line options (``fewstep search`` and ``python -m fewstep.zoo.tune``):
    ``--budget`` (sample-evaluations in all, ``auto``, or ``none`` for the long search) and the
    settings it would otherwise derive (unset: derived from the budget, or :class:`SearchConfig`'s
    for the long search)."""
    parser.add_argument("--budget", type=_budget_value, default=default_budget,
                        help=f"sample-evaluations the search may spend in all, references included: an integer, 'auto' (30,000 up to NFE 10, "
                             f"3,000 per NFE above) or 'none' (the long search of --generations; default {default_budget or 'none'})")
    parser.add_argument("--generations", type=int, default=None, help=f"generations in all (generation 0: the seed presets; long search: {SearchConfig.generations})")
    parser.add_argument("--refine-generations", type=int, default=None,
                        help=f"long search: the last generations, which refine the best grid only ({SearchConfig.refine_generations})")
    parser.add_argument("--population", type=int, default=None, help=f"candidates evaluated per generation ({SearchConfig.population})")
    parser.add_argument("--offspring", type=int, default=None, help=f"children bred per generation (long search: {SearchConfig.offspring}; budgeted: 48)")


@dataclass
class SearchReport:
    """What a search did: the baseline presets, the history, the cost."""

    baseline: dict[str, Any]
    presets: list[dict[str, Any]]
    history: list[dict[str, Any]]
    calls: int
    evaluations: int
    wall_s: float
    best_calibration: float
    best_heldout: float | None = None
    baseline_heldout: float | None = None
    resumed_from: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: a budgeted search's grid-phase finalist: the best candidate with the best seed's strategies
    grid_best: Candidate | None = None
    grid_best_calibration: float | None = None
    #: a budgeted search's polished finalist (:mod:`.polish`): the best candidate, its grid and corrections fitted to the final error
    polished: PolishResult | None = None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, allow_nan=True))


def _rng_state_to_json(rng: np.random.Generator) -> dict[str, Any]:
    return rng.bit_generator.state


def _rng_from_json(state: dict[str, Any]) -> np.random.Generator:
    bg = np.random.PCG64()
    bg.state = state
    return np.random.Generator(bg)


class _Search:
    def __init__(self, model: Model, objective: Objective, config: SearchConfig, *, t_start: float | None,
                 state_path: Path | None, on_generation: Callable[[int, dict[str, Any]], None] | None,
                 log: Callable[[str], None] | None, key: str | None = None, probe: Probe | None = None) -> None:
        self.model, self.objective, self.config = model, objective, config
        self.space = Space(model.schedule, config.nfe, t_start=t_start)
        self.t_start_given = t_start
        self.state_path, self.on_generation, self.log = state_path, on_generation, log
        self.identity = {
            "format": STATE_FORMAT, "version": STATE_VERSION, "config": config.to_json(),
            "model": model_key(model) if key is None else key,
            "schedule": schedule_fingerprint(model.schedule), "t_start": self.space.t_start,
            "calibration": tensor_digest(objective.calibration.noises), "metric": objective.metric_name,
            "metric_code": metric_identity(objective.metric), "reference_nfe": objective.calibration.reference_nfe,
            "reference": objective.calibration.method,
        }
        # what the model computes (fewstep.identity.Probe): a state of another model under the same key is refused
        self._probe = probe
        self.cost = BatchCost()
        self.archive: dict[str, tuple[Candidate, float]] = {}
        self.race_errors: dict[str, float] = {}  # error on the first ``race`` calibration noises
        self.partial: set[str] = set()  # keys of candidates that lost the race (their archive error is an estimate)
        self.exhausted = False  # the budget ended the search
        self.population: list[Candidate] = []
        self.presets: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        self.generation = 0
        self.rng = np.random.default_rng(config.seed)
        self.wall = 0.0
        self.delta = 0.4  # the grid step of the pattern search (refinement generations)
        self.grid_genes: tuple[Gene, ...] | None = None  # the strategies the grid phase tunes the grid of
        self.grid_delta = 0.4  # the grid phase's step
        self.polished: PolishResult | None = None  # the polish phase's progress
        self.resumed_from: int | None = None

    # ---- state -----------------------------------------------------------------------------
    @property
    def probe(self) -> Probe:
        """The model's probe on samples like the calibration noises (taken once, when a state is used)."""
        if self._probe is None:
            self._probe = probe_for(self.model, self.objective.calibration.noises)
        return self._probe

    def _save(self) -> None:
        if self.state_path is None:
            return
        _write_json_atomic(self.state_path, {
            **self.identity, "probe": self.probe.to_json(), "generation": self.generation, "rng": _rng_state_to_json(self.rng),
            "population": [c.to_dict() for c in self.population],
            "archive": [[c.to_dict(), e, self.race_errors.get(k), k in self.partial] for k, (c, e) in self.archive.items()],
            "exhausted": self.exhausted,
            "presets": self.presets, "history": self.history,
            "cost": {"calls": self.cost.calls, "evaluations": self.cost.evaluations}, "wall_s": self.wall, "delta": self.delta,
            "grid_genes": [asdict(g) for g in self.grid_genes] if self.grid_genes is not None else None, "grid_delta": self.grid_delta,
            "polished": self.polished.to_json() if self.polished is not None else None,
        })

    def _load(self) -> bool:
        if self.state_path is None or not self.state_path.is_file():
            return False
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as exc:
            raise StateError(f"search state {str(self.state_path)!r} is unreadable ({exc}); delete it to start over") from None
        if not isinstance(data, dict):
            raise StateError(f"search state {str(self.state_path)!r} is not a JSON object")
        for key, want in self.identity.items():
            have = data.get(key)
            if have != want:
                if isinstance(want, dict) and isinstance(have, dict):
                    diff = {k: (have.get(k), want.get(k)) for k in sorted(set(want) | set(have)) if have.get(k) != want.get(k)}
                    what = ", ".join(f"{k}: {a!r:.40} in the file, {b!r:.40} now" for k, (a, b) in diff.items())
                else:
                    what = f"{have!r:.80} in the file, {want!r:.80} now"
                raise StateError(f"search state {str(self.state_path)!r} belongs to another search ({key} differs: {what}); "
                                 "use another state file or delete it to start over")
        try:
            stored = Probe.from_json(data.get("probe"))
        except ArgumentError as exc:
            raise StateError(f"search state {str(self.state_path)!r} has no readable model probe ({exc}); delete it to start over") from None
        if not stored.matches(self.probe):
            raise StateError(f"search state {str(self.state_path)!r} was written by a different model: same key {self.identity['model']!r}, "
                             f"but its probe outputs differ by {stored.difference(self.probe):.3g} of their RMS (more than "
                             f"{max(stored.rtol, self.probe.rtol):g}); use another state file or delete it to start over")
        try:
            self.generation = int(data["generation"])
            self.rng = _rng_from_json(data["rng"])
            self.population = [Candidate.from_dict(c) for c in data["population"]]
            self.archive, self.race_errors, self.partial = {}, {}, set()
            for c, e, race_e, partial in data["archive"]:
                cand = Candidate.from_dict(c)
                self.archive[cand.key()] = (cand, float(e))
                if race_e is not None:
                    self.race_errors[cand.key()] = float(race_e)
                if partial:
                    self.partial.add(cand.key())
            self.exhausted = bool(data["exhausted"])
            self.presets, self.history = list(data["presets"]), list(data["history"])
            self.cost = BatchCost(int(data["cost"]["calls"]), int(data["cost"]["evaluations"]))
            self.wall = float(data["wall_s"])
            self.delta = float(data["delta"])
            genes = data["grid_genes"]
            self.grid_genes = None if genes is None else tuple(Gene(**g) for g in genes)
            self.grid_delta = float(data["grid_delta"])
            self.polished = PolishResult.from_json(data["polished"]) if data["polished"] is not None else None
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"search state {str(self.state_path)!r} is malformed ({exc}); delete it to start over") from None
        self.resumed_from = self.generation
        return True

    # ---- evaluation ------------------------------------------------------------------------
    def _fitting(self, k: int, rows: int) -> int:
        """How many of ``k`` plans run on ``rows`` noises fit in what is left of the budget."""
        if self.config.budget is None:
            return k
        return max(0, min(k, (self.config.budget - self.cost.evaluations) // (rows * self.config.nfe)))

    def _samples(self, plans: Sequence[SolverSchedule], noises: torch.Tensor) -> list[torch.Tensor]:
        """Final samples of ``plans`` from ``noises`` (the caller has checked that they fit the budget)."""
        samples, cost = evaluate_plans(self.model, plans, noises, max_rows=self.config.max_rows)
        self.cost.add(cost)
        return samples

    def _errors(self, x: torch.Tensor) -> tuple[float, float | None]:
        """The error of full-batch samples ``x``, and on their first ``race`` rows when racing."""
        race = self.config.race
        return self.objective.error(x), (self.objective.error(x[:race], first=race) if 0 < race < x.shape[0] else None)

    def _record(self, cand: Candidate, x: torch.Tensor) -> float:
        e, race_e = self._errors(x)
        self.archive[cand.key()] = (cand, e)
        if race_e is not None:
            self.race_errors[cand.key()] = race_e
        return e

    def _best_full(self) -> tuple[Candidate, float] | None:
        """The best candidate evaluated on every calibration noise."""
        return next(((c, e) for c, e in self._ranked() if c.key() not in self.partial), None)

    def _evaluate_candidates(self, cands: Sequence[Candidate]) -> None:
        """Evaluate the new ``cands``: on all calibration noises, or raced (see the module docstring)."""
        todo = [c for c in dict.fromkeys(cands, None) if c.key() not in self.archive]
        if not todo:
            return
        noises = self.objective.calibration.noises
        n, race = int(noises.shape[0]), self.config.race
        best = self._best_full()
        best_race = self.race_errors.get(best[0].key()) if best is not None else None
        if not 0 < race < n or best is None or best_race is None or not math.isfinite(best[1]) or best_race <= 0:
            k = self._fitting(len(todo), n)
            for c, x in zip(todo[:k], self._samples([self.space.schedule(c) for c in todo[:k]], noises) if k else []):
                self._record(c, x)
            if k < len(todo):
                raise _BudgetSpent
            return
        wanted = len(todo)
        k = self._fitting(wanted, race)
        if k == 0:
            raise _BudgetSpent
        todo = todo[:k]
        plans = [self.space.schedule(c) for c in todo]
        heads = self._samples(plans, noises[:race])
        head_errors = [self.objective.error(x, first=race) for x in heads]
        bar = best_race * (1.0 + self.config.race_margin)
        winners = [i for i, e in enumerate(head_errors) if math.isfinite(e) and e <= bar]
        go_on = self._fitting(len(winners), n - race)
        for i, c in enumerate(todo):
            if i in winners[:go_on]:
                continue
            e = head_errors[i]
            self.archive[c.key()] = (c, e * best[1] / best_race if math.isfinite(e) else math.inf)
            self.race_errors[c.key()] = e
            self.partial.add(c.key())
        if go_on:
            tails = self._samples([plans[i] for i in winners[:go_on]], noises[race:])
            for i, tail in zip(winners[:go_on], tails):
                self._record(todo[i], torch.cat([heads[i], tail]))
        if go_on < len(winners) or k < wanted:
            raise _BudgetSpent

    def _ranked(self) -> list[tuple[Candidate, float]]:
        return sorted(self.archive.values(), key=lambda ce: (ce[1], ce[0].key()))

    # ---- generations -------------------------------------------------------------------------
    def _seed_generation(self) -> None:
        """Screen every (seed preset, spacing) plan on the first ``screen`` calibration noises, then
        evaluate the ``seed_keep`` best distinct plans on all of them (the cheap first pass keeps a
        wide preset sweep at the cost of a few generations)."""
        cfg = self.config
        # diffusers' discrete grids fix their own first time (``leading`` starts below the last
        # training step, as in diffusers): tried when the search starts at the schedule's start
        discrete = isinstance(self.model.schedule, DiscreteVP) and self.t_start_given is None
        spacings = cfg.seed_spacings + (DISCRETE_SEED_SPACINGS if discrete else ()) + tuple(n for n, _ in cfg.seed_grids)
        distinct: dict[str, tuple[SolverSchedule, list[tuple[str, dict[str, Any], str]]]] = {}
        seeds_wanted = [(name, dict(opts), sp) for name, opts, sp in cfg.extra_seeds]
        seeds_wanted += [(name, dict(opts), sp) for name, opts in cfg.seed_presets for sp in dict.fromkeys(spacings)]
        for name, opts, sp in seeds_wanted:
            try:
                plan = seed_plan(name, opts, sp, self.model.schedule, cfg.nfe, self.space.t_start, dict(cfg.seed_grids))
            except (FewstepError, ValueError):  # a spacing this schedule does not have, an NFE too small
                continue
            if plan.nfe != cfg.nfe:
                continue
            d = plan.to_dict()
            key = json.dumps([d["times"], d["steps"]], sort_keys=True)
            distinct.setdefault(key, (plan, []))[1].append((name, opts, sp))
        if not distinct:
            raise SolverError(f"no seed preset builds a plan of exactly {cfg.nfe} evaluations on this schedule")
        entries = list(distinct.values())  # the extra seeds (the default call) first: a tight budget screens them first
        noises = self.objective.calibration.noises
        n = int(noises.shape[0])
        screen = min(cfg.screen, n)
        heads: dict[int, torch.Tensor] = {}
        if len(entries) > cfg.seed_keep and screen < n:
            k = self._fitting(len(entries), screen)
            samples = self._samples([p for p, _ in entries[:k]], noises[:screen]) if k else []
            heads = dict(enumerate(samples)) if cfg.budget is not None else {}  # reused below when the budget counts
            screened = [self.objective.error(x, first=screen) for x in samples] + [float("nan")] * (len(entries) - k)
        else:
            screened = [float("nan")] * len(entries)
        order = sorted(range(len(entries)), key=lambda i: (not math.isfinite(screened[i]), screened[i] if math.isfinite(screened[i]) else 0.0, i))
        kept = [i for i in order if math.isfinite(screened[i]) or not heads][: cfg.seed_keep]
        rest = noises[screen:] if heads else noises
        kept = kept[: self._fitting(len(kept), int(rest.shape[0]))]
        if not kept:
            raise SolverError(f"the search's budget ({cfg.budget} model rows) ends before one seed plan is evaluated on the calibration noises: "
                              "raise the budget")
        errors: dict[int, float] = {}
        full = self._samples([entries[i][0] for i in kept], rest)
        full_samples = {i: torch.cat([heads[i], x]) if heads else x for i, x in zip(kept, full)}
        for i, x in full_samples.items():
            errors[i] = self.objective.error(x)
        if not any(math.isfinite(e) for e in errors.values()):
            raise SolverError(f"every seed plan diverged ({len(kept)} evaluated: non-finite samples, NaN/Inf model outputs or "
                              "ModelOutputError on every one): check the model's outputs on these noises before searching")
        self.presets = [{"preset": n, "options": o, "spacing": sp, "screen_error": screened[i] if math.isfinite(screened[i]) else None,
                         "calibration_error": errors.get(i, float("nan"))}
                        for i in range(len(entries)) for n, o, sp in entries[i][1]]
        # the first population: the best screened plans the space can express (a grid that starts
        # below the search's start, as diffusers' leading one, is moved to start there)
        seeds: list[Candidate] = []
        for i in order:
            exact = self.space.from_schedule(entries[i][0])
            cand = exact or self._started_here(entries[i][0])
            if cand is None or cand in seeds:
                continue
            if exact is not None and i in errors and cand.key() not in self.archive:
                self._record(cand, full_samples[i])  # the same plan: already evaluated
            seeds.append(cand)
            if len(seeds) >= cfg.population and i not in kept:
                break
        if not seeds:
            seeds = [Candidate(tuple(Gene() for _ in range(cfg.nfe)), tuple(0.0 for _ in range(cfg.nfe)))]
        self._evaluate_candidates(seeds)
        self.population = [c for c, _ in self._ranked()[: cfg.population]]

    def _started_here(self, plan: SolverSchedule) -> Candidate | None:
        """``plan`` with its first time moved to the search's start, as a candidate (or None)."""
        if not float(plan.times[0]) < self.space.t_start:
            return None
        return self.space.from_schedule(plan.replace(times=(self.space.t_start, *plan.times[1:])))

    def _surrogate(self, cands: Sequence[Candidate]) -> np.ndarray | None:
        data = [(c, e) for c, e in self.archive.values() if math.isfinite(e) and e > 0]
        if len(data) < 2 * self.config.population:
            return None
        x = np.stack([self.space.features(c) for c, _ in data])
        y = np.log([e for _, e in data])
        ridge = 1.0
        w = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ y)
        return np.stack([self.space.features(c) for c in cands]) @ w

    def _evolve_generation(self) -> None:
        cfg, rng, space = self.config, self.rng, self.space
        ranked = self._ranked()
        parents = [c for c, _ in ranked[: cfg.population]]
        children: dict[str, Candidate] = {}
        for _ in range(cfg.offspring * 4):
            if len(children) >= cfg.offspring:
                break
            a = parents[min(int(rng.integers(len(parents))), int(rng.integers(len(parents))))]  # tournament of two by rank
            child = a
            if rng.random() < 0.3:
                child = space.crossover(a, parents[int(rng.integers(len(parents)))], rng)
            for _ in range(1 + int(rng.integers(3))):
                child = space.mutate(child, rng)
            if child.key() not in self.archive and space.is_legal(child):
                children.setdefault(child.key(), child)
        pool = list(children.values())
        if not pool:
            return
        predicted = self._surrogate(pool)
        if predicted is None:
            chosen = pool[: cfg.population]
        else:
            order = list(np.argsort(predicted, kind="stable"))
            chosen = [pool[i] for i in order[: cfg.population - 1]]
            rest = [pool[i] for i in order[cfg.population - 1:]]
            if rest:
                chosen.append(rest[int(rng.integers(len(rest)))])
        self._evaluate_candidates(chosen)
        self.population = [c for c, _ in self._ranked()[: cfg.population]]

    def _pattern_moves(self, best: Candidate, coords: Sequence[int], delta: float) -> list[Candidate]:
        """``best`` with each grid logit of ``coords`` moved by +-``delta`` (clipped to the space's limits)."""
        trials = []
        for i in coords:
            for sign in (1.0, -1.0):
                z = list(best.z)
                z[i] = float(np.clip(z[i] + sign * delta, -6.0, 6.0))
                trials.append(Candidate(best.genes, tuple(z)))
        return trials

    def _refine_generation(self) -> None:
        """Pattern search on the grid of the best candidate: ``population / 2`` logits (chosen at
        random, all of them for short grids) moved by +-delta, evaluated together; the step halves
        when no move improves (delta starts at 0.4)."""
        best, best_e = self._best_full() or self._ranked()[0]
        n = len(best.z)
        coords = sorted(self.rng.permutation(n)[: max(1, self.config.population // 2)].tolist()) if n > self.config.population // 2 else range(n)
        try:
            self._evaluate_candidates(self._pattern_moves(best, coords, self.delta))
        finally:
            if (self._best_full() or self._ranked()[0])[1] >= best_e:
                self.delta *= 0.5
        self.population = [c for c, _ in self._ranked()[: self.config.population]]

    def _grid_best(self) -> tuple[Candidate, float] | None:
        """The best fully evaluated candidate with the grid phase's strategies."""
        if self.grid_genes is None:
            return None
        return next(((c, e) for c, e in self._ranked() if c.genes == self.grid_genes and c.key() not in self.partial), None)

    def _grid_generation(self) -> None:
        """The grid phase: compass search (every grid logit moved by +-delta, all moves evaluated
        together, the step halved when none improves) on the best candidate with the best seed's
        strategies, which are fixed for the phase. ``nfe`` parameters, not the genes' many choices:
        on 8-48 noises it overfits less than evolution (Kolda, Lewis & Torczon 2003, generating set search)."""
        if self.grid_genes is None:
            self.grid_genes = (self._best_full() or self._ranked()[0])[0].genes
        best, best_e = self._grid_best() or self._best_full() or self._ranked()[0]
        try:
            self._evaluate_candidates(self._pattern_moves(best, range(len(best.z)), self.grid_delta))
        finally:
            now = self._grid_best()
            if now is None or now[1] >= best_e:
                self.grid_delta *= 0.5
        self.population = [c for c, _ in self._ranked()[: self.config.population]]

    def _polish_generation(self) -> None:
        """The polish phase (:mod:`.polish`), in one generation: Levenberg-Marquardt on the best fully
        evaluated candidate's grid and IIA-form corrections, every iteration saved to the state, its
        Jacobian on as many noises (4 to 16) as leave room for two iterations. What it leaves of the
        budget (converged early, or too little for an iteration) goes to grid refinement."""
        left = self.config.budget - self.cost.evaluations  # type: ignore[operator]
        if self.polished is None:
            best, best_e = self._best_full() or self._ranked()[0]
            n_cal, n = int(self.objective.calibration.noises.shape[0]), len(best.z)
            fits = [k for k in range(4, JACOBIAN_ROWS + 1) if 2 * iteration_cost(n, self.config.nfe, n_cal, k) <= left]
            self.polished = PolishResult.fresh(best, best_e, max(fits, default=4))
            if not fits:
                self.polished.done = True
                self._refine_generation()
                return
        counted = BatchCost(self.polished.cost.calls, self.polished.cost.evaluations)  # the polish's work already in self.cost

        def count(res: PolishResult) -> None:
            self.cost.add(BatchCost(res.cost.calls - counted.calls, res.cost.evaluations - counted.evaluations))
            counted.calls, counted.evaluations = res.cost.calls, res.cost.evaluations
            self.polished = res

        def saved(res: PolishResult) -> None:
            count(res)
            self._save()

        res = polish(self.model, self.space, self.polished, self.objective, left,
                     max_rows=self.config.max_rows, on_iteration=saved, log=self.log)
        count(res)
        res.done = True

    def run(self) -> tuple[Candidate, SearchReport]:
        cfg = self.config
        self._load()
        evo_end = cfg.generations - cfg.refine_generations
        while self.generation < cfg.generations and not self.exhausted:
            t0 = time.perf_counter()
            g = self.generation
            if g == 0:
                phase = "seeds"
            elif cfg.budget is not None and self.cost.evaluations < cfg.grid_fraction * cfg.budget:
                phase = "grid"
            elif (g < evo_end) if cfg.budget is None else (self.cost.evaluations < (1.0 - cfg.refine_fraction - cfg.polish_fraction) * cfg.budget):
                phase = "evolve"
            elif (cfg.budget is None or cfg.polish_fraction == 0.0 or self.cost.evaluations < (1.0 - cfg.polish_fraction) * cfg.budget
                  or (self.polished is not None and self.polished.done)):
                phase = "refine"
            else:
                phase = "polish"
            try:
                {"seeds": self._seed_generation, "grid": self._grid_generation, "evolve": self._evolve_generation,
                 "refine": self._refine_generation, "polish": self._polish_generation}[phase]()
            except _BudgetSpent:
                self.exhausted = True
            best_c, best_e = self._best_full() or self._ranked()[0]
            self.population = [c for c, _ in self._ranked()[: cfg.population]]
            self.wall += time.perf_counter() - t0
            self.generation += 1
            entry = {"generation": g, "phase": phase, "best": best_e, "evaluated": len(self.archive), "evaluations": self.cost.evaluations,
                     "raced_out": len(self.partial)}
            self.history.append(entry)
            self._save()
            if self.log:
                self.log(f"generation {g}: best calibration error {best_e:.4g} ({len(self.archive)} candidates, {self.cost.evaluations} model evaluations)")
            if self.on_generation:
                self.on_generation(g, entry)
        best_c, best_e = self._best_full() or self._ranked()[0]
        finite_presets = [p for p in self.presets if math.isfinite(p["calibration_error"])]
        baseline = min(finite_presets, key=lambda p: p["calibration_error"]) if finite_presets else {}
        grid = self._grid_best()
        report = SearchReport(baseline=baseline, presets=self.presets, history=self.history, calls=self.cost.calls,
                              evaluations=self.cost.evaluations, wall_s=self.wall, best_calibration=best_e,
                              resumed_from=self.resumed_from, grid_best=grid[0] if grid else None,
                              grid_best_calibration=grid[1] if grid else None, polished=self.polished)
        return best_c, report


def run_search(model: Model, objective: Objective, config: SearchConfig, *, t_start: float | None = None,
               state_path: str | os.PathLike[str] | None = None, on_generation: Callable[[int, dict[str, Any]], None] | None = None,
               log: Callable[[str], None] | None = None, key: str | None = None,
               probe: Probe | None = None) -> tuple[Space, Candidate, SearchReport]:
    """Run (or resume, when ``state_path`` holds this search's state) and return the space, the
    best candidate and the report. ``key`` / ``probe``: the model's
    :func:`~fewstep.identity.model_key` and :func:`~fewstep.identity.probe_for` its calibration
    noises (taken here when not given); a state whose key differs, or whose probe does not match,
    is refused (:class:`StateError`)."""
    s = _Search(model, objective, config, t_start=t_start, state_path=Path(state_path) if state_path else None,
                on_generation=on_generation, log=log, key=key, probe=probe)
    best, report = s.run()
    return s.space, best, report

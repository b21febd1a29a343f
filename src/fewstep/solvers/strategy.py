"""The strategy of one solver step: a small immutable record (DESIGN 1.3).

A step from time s to time t integrates the probability-flow ODE exactly up to a polynomial
interpolant of the model's prediction::

    data:   x_t = (sigma_t / sigma_s) x_s + sigma_t int e^lambda  P_x0(lambda)  dlambda
    noise:  x_t = (alpha_t / alpha_s) x_s - alpha_t int e^-lambda P_eps(lambda) dlambda

The strategy decides which prediction is interpolated, through which nodes (the step's start,
earlier steps' starts = *multistep*, extra evaluations inside the step = *singlestep*), in which
variable (lambda, the model time t, or the variable in which the kernel is flat), how the
integral weights are taken (exact phi functions or UniPC's B(h) variants: a registered weight
variant), whether a UniC corrector re-uses the next evaluation, and which registered noise rule
draws fresh noise with which ``eta`` (:mod:`fewstep.solvers.registry`). DDIM, DPM-Solver(++),
UniPC, DEIS, PNDM, Euler, Heun, LMS and the stochastic samplers (DDPM, Euler ancestral,
DPM-Solver++ SDE, SA-Solver, ER-SDE) are all such records (see :mod:`fewstep.solvers.presets`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from ..errors import SolverError

from .registry import noise_rule, variant_names

__all__ = ["Step", "PREDICTIONS", "METHODS", "VARIANTS", "INTERPS", "CORRECTION_KEYS", "MAX_CORRECTION_DIFFERENCES"]

PREDICTIONS = ("data", "noise")
METHODS = ("multistep", "singlestep")
#: the built-in weight variants (more may be registered, :func:`~fewstep.solvers.registry.register_variant`):
#: phi: exact integral of the interpolant; bh1/bh2: UniPC's B(h) = h / e^h - 1 for a single
#: difference term (bh2 = DPM-Solver++ "midpoint"); dpm3m: DPM-Solver++(3M)'s weights (k-th term
#: divided by k!); adams: flat kernel weights 1/(k+1) scaled by the first-order weight (PNDM).
VARIANTS = ("phi", "bh1", "bh2", "dpm3m", "adams")
#: lambda: polynomial in the half log-SNR; t: in the model's time (DEIS tAB); flat: in the variable
#: whose kernel is flat (sigma/alpha for noise prediction, alpha/sigma for data prediction: LMS);
#: sigma: in the VE noise level sigma/alpha (finite at sigma = 0: steps into the data of order >= 2);
#: rho: in sigma / (alpha + sigma) (finite at both ends: steps out of pure noise and into the data).
INTERPS = ("lambda", "t", "flat", "sigma", "rho")
MAX_ORDER = 4

_DEFAULT_STAGES = {1: (), 2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0), 4: (0.25, 0.5, 0.75)}


def _choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise SolverError(f"Step.{name} must be one of {options}, got {value!r}")


def _unit_number(name: str, value: Any, open_low: bool = False) -> float:
    """A number in [0, 1] (or (0, 1]) as a float; huge integers and non-numbers are errors, not crashes."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        v = float(value) if ok else math.nan
    except OverflowError:
        v = math.nan
    if not ((0.0 < v <= 1.0) if open_low else (0.0 <= v <= 1.0)):
        rng = "(0, 1]" if open_low else "[0, 1]"
        raise SolverError(f"Step.{name} must hold numbers in {rng}, got {value!r:.60}")
    return v


#: the keys of a correction record: coefficients of differences of the data (x0) and noise (eps) predictions
CORRECTION_KEYS = ("x0", "eps")
#: at most this many consecutive differences per prediction in a correction
MAX_CORRECTION_DIFFERENCES = 3


def _correction(value: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """A correction record (``None``, ``{"x0": [...], "eps": [...]}`` or a pair of sequences; a number
    stands for a list of one) as a pair of tuples of finite floats."""
    if value is None:
        return None
    if isinstance(value, dict):
        if set(value) != set(CORRECTION_KEYS):
            raise SolverError(f"Step.correction must be an object with exactly the keys {list(CORRECTION_KEYS)}, "
                              f"got the keys {sorted(map(str, value))!r:.80}")
        value = tuple(value[k] for k in CORRECTION_KEYS)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise SolverError(f'Step.correction must be null or {{"x0": [c_1, ...], "eps": [c_1, ...]}}, got {value!r:.80}')
    out = []
    for key, part in zip(CORRECTION_KEYS, value):
        coefs = part if isinstance(part, (tuple, list)) else (part,)
        if len(coefs) > MAX_CORRECTION_DIFFERENCES:
            raise SolverError(f"Step.correction[{key!r}] may hold at most {MAX_CORRECTION_DIFFERENCES} coefficients, got {len(coefs)}")
        nums = []
        for c in coefs:
            ok = isinstance(c, (int, float)) and not isinstance(c, bool)
            try:
                v = float(c) if ok else math.nan
            except OverflowError:
                v = math.nan
            if not math.isfinite(v):
                raise SolverError(f"Step.correction[{key!r}] must hold finite numbers, got {part!r:.60}")
            nums.append(v)
        out.append(tuple(nums))
    return out[0], out[1]


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise SolverError(f"Step.{name} must be a list of integers, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class Step:
    """One step's strategy. Defaults give DDIM (first order, data prediction)."""

    order: int = 1
    prediction: Literal["data", "noise"] = "data"
    method: Literal["multistep", "singlestep"] = "multistep"
    variant: Literal["phi", "bh1", "bh2", "dpm3m", "adams"] = "phi"
    interp: Literal["lambda", "t", "flat", "sigma", "rho"] = "lambda"
    #: multistep: previous step starts used as nodes (1 = the previous step's start, ...)
    history: tuple[int, ...] = field(default=())
    #: multistep: place history nodes at -1, -2, ... (fixed Adams-Bashforth weights) not at their real spacing
    uniform_nodes: bool = False
    #: singlestep: positions r in (0, 1] of the extra evaluations, as fractions of the step in lambda
    stages: tuple[float, ...] = field(default=())
    #: singlestep: variant used to reach the stages (default: ``variant``)
    stage_variant: str | None = None
    #: singlestep: nodes of the final interpolant (0 = start, j = stage j); default all
    final_nodes: tuple[int, ...] | None = None
    #: UniC corrector: number of nodes of its interpolant (0 = none); it adds the new point to the
    #: start and the first ``corrector - 2`` history nodes. UniPC uses ``order + 1``.
    corrector: int = 0
    corrector_variant: str | None = None
    #: registered noise rule (:mod:`fewstep.solvers.noise_rules`): ``none`` (the ODE), ``sde`` (the
    #: reverse-SDE family, kernel rate 1 + eta), ``ancestral`` (DDIM's eta, Euler ancestral, DDPM),
    #: ``renoise`` (a fixed fraction eta of the variance re-drawn: LCM), ``er_sde``, ...
    noise: str = "none"
    #: the noise rule's parameter (0: deterministic)
    eta: float = 0.0
    #: EDM "churn" (Karras et al. 2022, Algorithm 2): before the step, raise the state's VE noise level
    #: sigma/alpha by the factor ``1 + churn`` with fresh noise (an independent Brownian channel), then
    #: integrate from there (the step's first evaluation is at the raised level). 0: none.
    churn: float = 0.0
    #: EDM's S_noise: the churn noise is scaled by this factor (slightly above 1 offsets detail loss)
    churn_noise: float = 1.0
    #: IIA correction (Zhang, Niwa & Kleijn, ICLR 2024; :func:`fewstep.fit_iia`): ``(c_x0, c_eps)``, two
    #: tuples of coefficients, adds ``sum_k c_x0[k-1] (x0_(i-k+1) - x0_(i-k)) + sum_k c_eps[k-1] (eps_(i-k+1) -
    #: eps_(i-k))`` to step ``i``'s result (with a corrector: to the corrected state), ``x0_j, eps_j`` the
    #: model's predictions at step ``j``'s first evaluation. ``None``: none. Also given as
    #: ``{"x0": [...], "eps": [...]}`` (a number stands for a list of one).
    correction: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.order, int) or isinstance(self.order, bool) or not 1 <= self.order <= MAX_ORDER:
            raise SolverError(f"Step.order must be an integer in 1..{MAX_ORDER}, got {self.order!r}")
        _choice("prediction", self.prediction, PREDICTIONS)
        _choice("method", self.method, METHODS)
        _choice("interp", self.interp, INTERPS)
        for name in ("variant", "stage_variant", "corrector_variant"):
            value = getattr(self, name)
            if (value is not None or name == "variant") and (not isinstance(value, str) or value not in variant_names()):
                raise SolverError(f"Step.{name} must be one of {tuple(variant_names())}, got {value!r}")
        if not isinstance(self.uniform_nodes, bool):
            raise SolverError(f"Step.uniform_nodes must be true/false, got {self.uniform_nodes!r}")
        hist = _int_tuple("history", self.history)
        object.__setattr__(self, "history", hist)
        if not isinstance(self.stages, (tuple, list)) or not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in self.stages):
            raise SolverError(f"Step.stages must be a list of numbers, got {self.stages!r}")
        object.__setattr__(self, "stages", tuple(_unit_number("stages", r, open_low=True) for r in self.stages))
        if self.final_nodes is not None:
            object.__setattr__(self, "final_nodes", _int_tuple("final_nodes", self.final_nodes))
        if not isinstance(self.corrector, int) or isinstance(self.corrector, bool) or self.corrector < 0:
            raise SolverError(f"Step.corrector must be an integer >= 0, got {self.corrector!r}")
        if not isinstance(self.noise, str):
            raise SolverError(f"Step.noise must be a noise rule name, got {self.noise!r:.60}")
        rule = noise_rule(self.noise)
        ok = isinstance(self.eta, (int, float)) and not isinstance(self.eta, bool)
        try:
            eta = float(self.eta) if ok else math.nan
        except OverflowError:
            eta = math.nan
        if not (rule.eta_min <= eta <= rule.eta_max) or math.isinf(eta):
            raise SolverError(f"Step.eta of noise rule {self.noise!r} must be a number in [{rule.eta_min:g}, {rule.eta_max:g}], got {self.eta!r:.60}")
        object.__setattr__(self, "eta", eta)
        for name in ("churn", "churn_noise"):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            try:
                v = float(value) if ok else math.nan
            except OverflowError:
                v = math.nan
            if not (0.0 <= v < math.inf):
                raise SolverError(f"Step.{name} must be a finite number >= 0, got {value!r:.60}")
            object.__setattr__(self, name, v)
        object.__setattr__(self, "correction", _correction(self.correction))

        if self.method == "multistep":
            if not hist and self.order > 1:
                object.__setattr__(self, "history", tuple(range(1, self.order)))
            if len(self.history) != self.order - 1:
                raise SolverError(f"a multistep step of order {self.order} needs {self.order - 1} history nodes, got {self.history}")
            if any(h < 1 for h in self.history) or len(set(self.history)) != len(self.history):
                raise SolverError(f"Step.history entries must be distinct integers >= 1, got {self.history}")
            if self.stages or self.final_nodes is not None:
                raise SolverError("stages / final_nodes apply to singlestep steps only")
            if self.corrector:
                if not 2 <= self.corrector <= self.order + 1:
                    raise SolverError(f"a corrector of {self.corrector} nodes needs 2 <= corrector <= order + 1 = {self.order + 1}")
        else:
            if self.history or self.uniform_nodes:
                raise SolverError("history / uniform_nodes apply to multistep steps only")
            if self.corrector:
                raise SolverError("the UniC corrector applies to multistep steps only")
            if not self.stages and self.order > 1:
                object.__setattr__(self, "stages", _DEFAULT_STAGES[self.order])
            if len(self.stages) != self.order - 1:
                raise SolverError(f"a singlestep step of order {self.order} needs {self.order - 1} stages, got {self.stages}")
            if any(not (0.0 < r <= 1.0) for r in self.stages) or any(b <= a for a, b in zip(self.stages, self.stages[1:])):
                raise SolverError(f"singlestep stages must be increasing positions in (0, 1], got {self.stages}")
            if self.final_nodes is not None:
                fn = self.final_nodes
                if 0 not in fn or any(not 0 <= j <= len(self.stages) for j in fn) or len(set(fn)) != len(fn):
                    raise SolverError(f"final_nodes must contain 0 and distinct stage indices 0..{len(self.stages)}, got {fn}")
        rule.check(self)

    # ---- derived ---------------------------------------------------------------------------
    @property
    def nfe(self) -> int:
        """Model evaluations this step costs (its start plus its stages)."""
        return 1 + len(self.stages)

    @property
    def stochastic(self) -> bool:
        """Does this step draw fresh noise?"""
        return noise_rule(self.noise).stochastic(self.eta) or (self.churn > 0.0 and self.churn_noise > 0.0)

    @property
    def correction_depth(self) -> int:
        """How many previous step starts the IIA correction reads (its number of differences)."""
        return 0 if self.correction is None else max(len(c) for c in self.correction)

    @property
    def depth(self) -> int:
        """How many previous step starts this step reads."""
        return max(self.history, default=0)

    def with_(self, **changes: Any) -> "Step":
        """A copy with some fields changed (re-validated). Changing ``order`` resets derived defaults."""
        data = self.to_dict()
        if changes.get("correction") is not None:  # the file's form
            c = _correction(changes["correction"])
            changes = {**changes, "correction": {k: list(v) for k, v in zip(CORRECTION_KEYS, c)}}  # type: ignore[union-attr]
        if "order" in changes:
            data.update(history=(), stages=(), final_nodes=None)
        data.update(changes)
        return Step.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["history"] = list(self.history)
        d["stages"] = list(self.stages)
        d["final_nodes"] = None if self.final_nodes is None else list(self.final_nodes)
        if self.churn == 0.0 and self.churn_noise == 1.0:  # files without churn read as before
            del d["churn"], d["churn_noise"]
        if self.correction is None:  # files without IIA corrections read as before
            del d["correction"]
        else:
            d["correction"] = {k: list(v) for k, v in zip(CORRECTION_KEYS, self.correction)}
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Step":
        if not isinstance(data, dict):
            raise SolverError(f"a step must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)} | {"renoise"}
        extra = set(data) - known
        if extra:
            raise SolverError(f"unknown step field(s) {sorted(extra)}; known: {sorted(known)}")
        args = dict(data)
        if "renoise" in args:  # fewstep <= 0.3 files: the fraction of the variance re-drawn
            nu = args.pop("renoise")
            if nu not in (0, 0.0) and "noise" not in args:
                args["noise"], args["eta"] = "renoise", nu
        for key in ("history", "stages", "final_nodes"):
            if isinstance(args.get(key), list):
                args[key] = tuple(args[key])
        corr = args.get("correction")
        if corr is not None and not (isinstance(corr, dict) and all(isinstance(v, list) for v in corr.values())):
            raise SolverError(f'Step.correction must be null or an object {{"x0": [c_1, ...], "eps": [c_1, ...]}} of lists of numbers, got {corr!r:.80}')
        return cls(**args)

"""The search space: a time grid and one strategy gene per step, legal by construction.

A :class:`Candidate` is ``genes`` (one :class:`Gene` per step) and ``z`` (one grid logit per step).
The grid lives in the quantile ``u`` of the logistic log-SNR density of the schedule's family
(:mod:`fewstep.timesteps`, ``lambda = c + s logit(u)``): the start time sits at ``u0`` (0 for pure
noise), the smallest noisy time at ``u_max``, and ``softmax(z)`` splits ``[u0, u_max]`` into the
``n - 1`` gaps between the noisy points plus the gap left above the last one, so every ``z`` is a
strictly decreasing grid ending with the step into sigma = 0, and where the last noisy step ends is
a parameter like the others.

A gene decides a step's method (multistep, or singlestep of order 2 costing 2 evaluations),
prediction, order, coefficient variant, UniC corrector and interpolation variable. Turning genes
into :class:`~fewstep.Step` records applies the same rules as the presets (order capped by the
history, the step into sigma = 0 in noise form in sigma/alpha, rho where a node is pure noise), so
every candidate compiles, and its NFE is the number of steps plus its singlestep stages.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch

from ..defaults import default_grid
from ..errors import ArgumentError
from ..schedules import FlowMatching, NoiseSchedule
from ..solvers.coefficients import point
from ..solvers.plan import SolverSchedule, schedule_fingerprint
from ..solvers.presets.building import finite_from_pure_noise as _finite_from_pure_noise, into_clean as _into_clean
from ..solvers.strategy import Step

__all__ = ["Gene", "Candidate", "Space", "GENE_CHOICES"]

#: the values each gene field may take
GENE_CHOICES: dict[str, tuple[Any, ...]] = {
    "method": ("ms", "ss2"),
    "prediction": ("data", "noise"),
    "order": (1, 2, 3),
    "variant": ("phi", "bh1", "bh2"),
    "corrector": (False, True),
    "interp": ("lambda", "t"),
}
Z_LIMIT = 6.0  # grid logits are clipped to [-6, 6]: no gap below e^-12 of another


@dataclass(frozen=True)
class Gene:
    """One step's strategy choices (see :data:`GENE_CHOICES`)."""

    method: str = "ms"
    prediction: str = "data"
    order: int = 3
    variant: str = "bh2"
    corrector: bool = True
    interp: str = "lambda"

    def __post_init__(self) -> None:
        for name, options in GENE_CHOICES.items():
            if getattr(self, name) not in options:
                raise ArgumentError(f"Gene.{name} must be one of {options}, got {getattr(self, name)!r}")

    @property
    def nfe(self) -> int:
        return 2 if self.method == "ss2" else 1


@dataclass(frozen=True)
class Candidate:
    """A grid (``z``, one logit per step) and one gene per step."""

    genes: tuple[Gene, ...]
    z: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.genes) != len(self.z) or not self.genes:
            raise ArgumentError(f"a candidate needs one grid logit per step, got {len(self.genes)} genes and {len(self.z)} logits")

    @property
    def nfe(self) -> int:
        return sum(g.nfe for g in self.genes)

    def key(self) -> str:
        """A stable identity (rounded logits) for the archive."""
        genes = ";".join(f"{g.method},{g.prediction},{g.order},{g.variant},{int(g.corrector)},{g.interp}" for g in self.genes)
        return genes + "|" + ",".join(f"{v:.6f}" for v in self.z)

    def to_dict(self) -> dict[str, Any]:
        return {"genes": [asdict(g) for g in self.genes], "z": [float(v) for v in self.z]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Candidate":
        return cls(tuple(Gene(**g) for g in data["genes"]), tuple(float(v) for v in data["z"]))


class Space:
    """Candidates for ``nfe`` evaluations on ``sched``, from ``t_start`` (default: the schedule's
    largest time) to the clean time, on the logistic grid coordinates of the schedule's family."""

    def __init__(self, sched: NoiseSchedule, nfe: int, *, t_start: float | None = None) -> None:
        if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
            raise ArgumentError(f"nfe must be an integer >= 1, got {nfe!r}")
        self.sched, self.nfe = sched, nfe
        self.t_start = float(sched.t_max if t_start is None else t_start)
        opts = default_grid(sched)[1]
        self.c = float(opts.get("logistic_center", 0.0))
        self.s = float(opts.get("logistic_scale", 1.4))
        if isinstance(sched, FlowMatching):
            self.c -= math.log(sched.shift)
        self.pure = float(sched.alpha(self.t_start)) == 0.0
        self.u0 = self._quantile(float(sched.lambda_(self.t_start)))
        self.u_max = self._quantile(float(sched.lambda_(sched.t_min)))
        self._pure_point = point(sched, self.t_start)

    # ---- the grid --------------------------------------------------------------------------
    def _quantile(self, lam: float) -> float:
        if lam == -math.inf:
            return 0.0
        if lam == math.inf:
            return 1.0
        return 1.0 / (1.0 + math.exp(-(lam - self.c) / self.s))

    def _u_to_t(self, u: np.ndarray) -> np.ndarray:
        lam = self.c + self.s * np.log(u / (1.0 - u))
        return self.sched.t_of_lambda(torch.from_numpy(lam)).numpy()

    def times(self, z: Sequence[float]) -> list[float]:
        """``n + 1`` strictly decreasing times from ``t_start`` to the clean time."""
        w = np.exp(np.clip(np.asarray(z, dtype=np.float64), -Z_LIMIT, Z_LIMIT))
        w = w / w.sum()
        u = self.u0 + (self.u_max - self.u0) * np.cumsum(w)[:-1]
        inner = self._u_to_t(u) if len(u) else np.zeros(0)
        ts = [self.t_start, *inner.tolist(), float(self.sched.t_clean)]
        for i in range(1, len(ts) - 1):  # guard against rounding in t(lambda) on very small gaps
            if not ts[i] < ts[i - 1]:
                ts[i] = float(np.nextafter(ts[i - 1], -np.inf))
        return ts

    def logits_for_times(self, times: Sequence[float]) -> tuple[float, ...]:
        """The ``z`` whose grid has the given noisy times (clamped into ``(u0, u_max]``)."""
        lam = self.sched.lambda_(torch.as_tensor(list(times[1:-1]), dtype=torch.float64)).numpy()
        u = np.array([self._quantile(float(v)) for v in lam])
        u = np.clip(u, self.u0, self.u_max)
        edges = np.concatenate([[self.u0], u, [self.u_max]])
        gaps = np.maximum(np.diff(edges), 1e-9 * (self.u_max - self.u0))
        z = np.log(gaps / gaps.sum())
        return tuple(float(v) for v in np.clip(z - z.mean(), -Z_LIMIT, Z_LIMIT))

    # ---- strategies ------------------------------------------------------------------------
    def steps(self, genes: Sequence[Gene]) -> list[Step]:
        """The legal :class:`Step` records for these genes (the rules of the presets)."""
        n = len(genes)
        out: list[Step] = []
        for i, g in enumerate(genes):
            last = i == n - 1
            if g.method == "ss2":
                if not self._singlestep_allowed(i, n):
                    raise ArgumentError(f"step {i} of {n} cannot be singlestep (into sigma = 0 or out of pure noise)")
                out.append(Step(order=2, prediction=g.prediction, method="singlestep", variant=g.variant))  # type: ignore[arg-type]
                continue
            order = min(g.order, i + 1)
            corrector = order + 1 if (g.corrector and not last and not (self.pure and i == 0 and g.variant != "bh2")) else 0
            prediction = "data" if (self.pure and i == 0) else g.prediction
            st = Step(order=order, prediction=prediction, variant=g.variant, interp=g.interp, corrector=corrector)  # type: ignore[arg-type]
            if last:
                st = _into_clean(st)
            if self.pure and i > 0 and (st.depth >= i or (st.corrector and st.corrector - 2 >= i)):
                st = _finite_from_pure_noise(st, self._pure_point)
            out.append(st)
        return out

    def _singlestep_allowed(self, i: int, n: int) -> bool:
        return i < n - 1 and not (self.pure and i == 0)

    def is_legal(self, cand: Candidate) -> bool:
        """Compiles with exactly ``nfe`` evaluations (checked on the genes alone, before compiling)."""
        n = len(cand.genes)
        return cand.nfe == self.nfe and all(g.method == "ms" or self._singlestep_allowed(i, n) for i, g in enumerate(cand.genes))

    def schedule(self, cand: Candidate, name: str = "searched") -> SolverSchedule:
        plan = SolverSchedule(times=tuple(self.times(cand.z)), steps=tuple(self.steps(cand.genes)), name=name,
                              schedule=schedule_fingerprint(self.sched))
        if plan.nfe != self.nfe:
            raise ArgumentError(f"candidate has NFE {plan.nfe}, the space {self.nfe}")
        return plan

    def from_schedule(self, plan: SolverSchedule) -> Candidate | None:
        """The candidate nearest to a solver schedule (a preset's plan), or ``None`` if its steps have
        no gene (singlestep of order 3, fixed Adams weights, stochastic steps)."""
        genes = []
        for st in plan.steps:
            if st.stochastic or st.uniform_nodes or (st.method == "singlestep" and st.order != 2):
                return None
            variant = st.variant if st.variant in GENE_CHOICES["variant"] else "phi"
            interp = st.interp if st.interp in GENE_CHOICES["interp"] else "lambda"
            genes.append(Gene(method="ss2" if st.method == "singlestep" else "ms", prediction=st.prediction,
                              order=min(max(st.order, 1), 3), variant=variant, corrector=st.corrector > 0, interp=interp))
        if float(plan.times[-1]) != float(self.sched.t_clean) or float(plan.times[0]) != self.t_start:
            return None
        cand = Candidate(tuple(genes), self.logits_for_times(plan.times))
        return cand if self.is_legal(cand) else None

    # ---- moves -------------------------------------------------------------------------------
    def random_gene(self, rng: np.random.Generator) -> Gene:
        return Gene(**{k: v[int(rng.integers(len(v)))] for k, v in GENE_CHOICES.items() if k != "method"})

    def mutate(self, cand: Candidate, rng: np.random.Generator, grid_sigma: float = 0.3) -> Candidate:
        """One random legal move: a gene field, a singlestep split / merge, or a grid perturbation
        (a move that would be illegal returns the parent)."""
        child = self._move(cand, rng, grid_sigma)
        return child if self.is_legal(child) else cand

    def _move(self, cand: Candidate, rng: np.random.Generator, grid_sigma: float) -> Candidate:
        kind = rng.choice(["gene", "gene", "grid", "grid", "method"])
        genes, z = list(cand.genes), list(cand.z)
        if kind == "grid":
            mask = rng.random(len(z)) < max(0.3, 1.0 / len(z))
            z = [v + float(rng.normal(0.0, grid_sigma)) if m else v for v, m in zip(z, mask)]
            return Candidate(tuple(genes), tuple(float(np.clip(v, -Z_LIMIT, Z_LIMIT)) for v in z))
        if kind == "method" and len(genes) > 1:
            i = int(rng.integers(len(genes) - 1))
            if genes[i].method == "ss2":  # split: one step of two evaluations -> two steps of one
                g = replace(genes[i], method="ms")
                genes[i:i + 1] = [g, g]
                half = z[i] - math.log(2.0)
                z[i:i + 1] = [half, half]
            elif genes[i + 1].method == "ms":  # merge steps i and i + 1 into one singlestep step
                genes[i:i + 2] = [replace(genes[i], method="ss2")]
                z[i:i + 2] = [float(np.logaddexp(z[i], z[i + 1]))]
            return Candidate(tuple(genes), tuple(z))
        i = int(rng.integers(len(genes)))
        field = str(rng.choice([k for k in GENE_CHOICES if k != "method"]))
        options = [v for v in GENE_CHOICES[field] if v != getattr(genes[i], field)]
        genes[i] = replace(genes[i], **{field: options[int(rng.integers(len(options)))]})
        return Candidate(tuple(genes), tuple(z))

    def crossover(self, a: Candidate, b: Candidate, rng: np.random.Generator) -> Candidate:
        """Uniform crossover of genes and grid logits (parents with the same number of steps); ``a``
        when the child would not spend exactly the NFE (parents whose singlestep steps sit at other
        positions: ``[ss2, ms, ms]`` x ``[ms, ss2, ms]`` can give ``[ms, ms, ms]``)."""
        if len(a.genes) != len(b.genes):
            return a
        pick = rng.random(len(a.genes)) < 0.5
        genes = tuple(ga if p else gb for ga, gb, p in zip(a.genes, b.genes, pick))
        mix = rng.random()
        z = tuple(float(mix * za + (1 - mix) * zb) for za, zb in zip(a.z, b.z))
        child = Candidate(genes, z)
        return child if self.is_legal(child) else a

    # ---- features for the cheap predictor ----------------------------------------------------
    def features(self, cand: Candidate) -> np.ndarray:
        """One-hot genes per step position, the noisy points' quantiles and log gaps (padded to the
        largest possible number of steps): the inputs of the surrogate."""
        per_step = sum(len(v) for v in GENE_CHOICES.values())
        f = np.zeros(self.nfe * (per_step + 2) + 1)
        w = np.exp(np.clip(np.asarray(cand.z), -Z_LIMIT, Z_LIMIT))
        w = w / w.sum()
        u = np.cumsum(w)
        for i, g in enumerate(cand.genes):
            base = i * (per_step + 2)
            off = 0
            for name, options in GENE_CHOICES.items():
                f[base + off + options.index(getattr(g, name))] = 1.0
                off += len(options)
            f[base + per_step] = u[i]
            f[base + per_step + 1] = math.log(w[i])
        f[-1] = 1.0
        return f

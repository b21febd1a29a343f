"""Defaults chosen from measurements: the solver that ``fewstep.sample(model, x_T, nfe=N)`` runs when
no solver is named, and the time grid each preset uses when no ``spacing`` is named, per family of
noise schedule and data dimension. The rule (:data:`DEFAULT_RULE`) is chosen by
``python benchmarks/default_rule.py`` on the validation zoo and the oracles, leaving one model out, and
judged against the peers by ``python benchmarks/defaults.py`` (``benchmarks/reports/defaults.md``);
``docs/defaults.md`` summarises the evidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .schedules import EDM, CosineVP, DiscreteVP, FlowMatching, LinearVP, NoiseSchedule

__all__ = ["NOISE_PREDICTIONS", "rule_from_dict", "schedule_family", "default_solver", "default_spacing", "default_grid", "default_call", "DefaultRule", "FamilyRule",
           "GridParams", "SolverChoice", "DEFAULT_RULE", "DEFAULT_SOLVERS", "SPACING_RULES"]

FAMILIES = ("discrete_vp", "linear_vp", "cosine_vp", "edm", "flow")


def schedule_family(sched: NoiseSchedule) -> str:
    """``discrete_vp`` | ``linear_vp`` | ``cosine_vp`` | ``edm`` | ``flow`` (``other`` for user subclasses)."""
    for cls, name in ((DiscreteVP, "discrete_vp"), (LinearVP, "linear_vp"), (CosineVP, "cosine_vp"), (EDM, "edm"), (FlowMatching, "flow")):
        if isinstance(sched, cls):
            return name
    return "other"


#: parameterisations whose data prediction divides the network's output error by alpha (large at
#: high noise): the rule may give them a grid of their own (:attr:`DefaultRule.eps`)
NOISE_PREDICTIONS = ("eps", "score")


@dataclass(frozen=True)
class GridParams:
    """The logistic log-SNR grid ``lambda = center + scale * logit(u)`` (:mod:`fewstep.timesteps`)."""

    center: float
    scale: float


@dataclass(frozen=True)
class SolverChoice:
    """A preset and its options (a tuple of pairs, so that rules are hashable)."""

    preset: str
    options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class FamilyRule:
    """The default for one schedule family: a grid, and a preset for NFE <= ``low_nfe_max`` and one
    above; from ``high_nfe_min`` on (when ``high_grid`` is set) the grid ``high_grid``."""

    grid: GridParams
    solver: SolverChoice = field(default_factory=lambda: SolverChoice("unipc"))
    low_nfe_solver: SolverChoice = field(default_factory=lambda: SolverChoice("unipc"))
    low_nfe_max: int = 0
    high_grid: GridParams | None = None
    high_nfe_min: int = 0

    def solver_for(self, nfe: int | None) -> SolverChoice:
        return self.low_nfe_solver if nfe is not None and nfe <= self.low_nfe_max else self.solver

    def grid_for(self, nfe: int | None) -> GridParams:
        """The grid at ``nfe`` (``None``, or anything but an integer, which the preset then refuses: the
        low-NFE grid)."""
        if self.high_grid is not None and isinstance(nfe, int) and not isinstance(nfe, bool) and nfe >= self.high_nfe_min:
            return self.high_grid
        return self.grid


@dataclass(frozen=True)
class DefaultRule:
    """What the default call runs: a preset on the logistic grid, read from declared properties only:
    the schedule's family (VP and EDM, or flow matching), the NFE and the data dimension ``d`` (the
    number of values per sample).

    The grid's centre moves towards noise as the dimension grows, ``center - dim_slope * log(d / dim_ref) / 2``
    with ``d`` clamped to ``[dim_ref, dim_max]`` (the range it was measured on): the resolution shift of
    Simple Diffusion (Hoogeboom et al. 2023) and SD3 (Esser et al. 2024), whose noise-level shift is
    ``sqrt(d / d_ref)`` for ``dim_slope = 1``. A flow schedule's own ``shift`` moves the logistic
    spacing's centre by ``-log(shift)`` (:func:`fewstep.time_grid`); the rule keeps the fraction
    ``flow_shift_weight`` of that move (``0``: the same noise levels whatever the declared shift).
    """

    vp: FamilyRule = field(default_factory=lambda: FamilyRule(GridParams(0.0, 1.4)))
    flow: FamilyRule = field(default_factory=lambda: FamilyRule(GridParams(0.6, 1.1)))
    eps: FamilyRule | None = None
    dim_slope: float = 0.0
    dim_ref: int = 64
    dim_max: int = 3072
    flow_shift_weight: float = 1.0

    def family(self, sched: NoiseSchedule, prediction: str | None = None) -> FamilyRule:
        """The part of the rule for this schedule and parameterisation: ``flow`` on flow matching,
        ``eps`` for a noise- or score-predicting model on the other schedules (when the rule has one),
        else ``vp``."""
        if schedule_family(sched) == "flow":
            return self.flow
        if prediction in NOISE_PREDICTIONS and self.eps is not None:
            return self.eps
        return self.vp

    def center(self, grid: GridParams, dim: int | None) -> float:
        """The grid's centre for data of ``dim`` values per sample (``None``: ``dim_ref``)."""
        if not dim or self.dim_slope == 0.0:
            return grid.center
        d = min(max(int(dim), self.dim_ref), self.dim_max)
        return grid.center - self.dim_slope * 0.5 * math.log(d / self.dim_ref)

    def grid_options(self, sched: NoiseSchedule, dim: int | None, prediction: str | None = None, nfe: int | None = None) -> dict[str, float]:
        """``logistic_center`` / ``logistic_scale`` of the grid at ``nfe`` (``None``: the low-NFE grid)."""
        grid = self.family(sched, prediction).grid_for(nfe)
        center = self.center(grid, dim)
        if isinstance(sched, FlowMatching) and self.flow_shift_weight != 1.0:  # undo part of the spacing's -log(shift)
            center += (1.0 - self.flow_shift_weight) * math.log(sched.shift)
        return {"logistic_center": center, "logistic_scale": grid.scale}

    def call(self, sched: NoiseSchedule, nfe: int | None, dim: int | None, prediction: str | None = None) -> tuple[str, dict[str, Any]]:
        """``(preset, options)`` of the default call at ``nfe`` for a model of parameterisation
        ``prediction`` on ``sched`` with ``dim`` values per sample."""
        choice = self.family(sched, prediction).solver_for(nfe)
        return choice.preset, {**dict(choice.options), "spacing": "logistic", **self.grid_options(sched, dim, prediction, nfe)}


def rule_from_dict(data: dict[str, Any]) -> DefaultRule:
    """A :class:`DefaultRule` from its plain-JSON form (``benchmarks/reports/default_rule.json``
    stores the chosen rule so; ``benchmarks/default_rule.py`` writes it)."""

    def solver(c: dict[str, Any]) -> SolverChoice:
        return SolverChoice(c["preset"], tuple(tuple(kv) for kv in c["options"]))

    def family(f: dict[str, Any]) -> FamilyRule:
        high = f.get("high_grid")
        return FamilyRule(GridParams(**f["grid"]), solver(f["solver"]), solver(f["low_nfe_solver"]), int(f["low_nfe_max"]),
                          GridParams(**high) if high else None, int(f.get("high_nfe_min", 0)))

    return DefaultRule(vp=family(data["vp"]), flow=family(data["flow"]), eps=family(data["eps"]) if data.get("eps") else None,
                       dim_slope=float(data["dim_slope"]), dim_ref=int(data["dim_ref"]), dim_max=int(data["dim_max"]),
                       flow_shift_weight=float(data.get("flow_shift_weight", 1.0)))


_UNIPC = SolverChoice("unipc")
_UNIPC_2 = SolverChoice("unipc", (("order", 2),))

#: the rule the default call runs: chosen by ``python benchmarks/default_rule.py select --objective
#: regret`` on the fit noises of 27 targets (oracles on every schedule family at d = 64..3072 and 11
#: trained networks), the rule with the least loss over all of them, its flow part chosen again with
#: every regret counted (``select --family flow --bar 1.0``); then a grid of its own for NFE >= 12
#: for every family (``select-high``: NFE 15 and 20, scales up to 6, 31 targets) and the flow part
#: with the fraction of a flow schedule's shift the grid keeps (``select-flow-shift``: none). Each
#: model's leave-one-out rule is judged on held-out noises by ``benchmarks/defaults.py``
#: (docs/defaults.md).
DEFAULT_RULE = DefaultRule(
    vp=FamilyRule(GridParams(0.5, 1.4), solver=_UNIPC, low_nfe_solver=_UNIPC_2, low_nfe_max=8,
                  high_grid=GridParams(0.75, 3.0), high_nfe_min=12),
    flow=FamilyRule(GridParams(0.5, 1.4), solver=_UNIPC, low_nfe_solver=_UNIPC_2, low_nfe_max=11,
                    high_grid=GridParams(0.5, 1.4), high_nfe_min=12),
    eps=FamilyRule(GridParams(-0.75, 2.0), solver=_UNIPC, low_nfe_solver=_UNIPC_2, low_nfe_max=11,
                   high_grid=GridParams(0.25, 4.0), high_nfe_min=12),
    dim_slope=0.5,
    flow_shift_weight=0.0,
)

#: family -> (preset, options) run by ``sample(model, x_T, nfe=N)`` above the rule's low-NFE range
#: (from :data:`DEFAULT_RULE`; kept for callers of the earlier API)
DEFAULT_SOLVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "*": (DEFAULT_RULE.vp.solver.preset, dict(DEFAULT_RULE.vp.solver.options)),
    "flow": (DEFAULT_RULE.flow.solver.preset, dict(DEFAULT_RULE.flow.solver.options)),
}

#: (family, preset) -> (spacing, grid options), ``"*"`` matching any; the most specific rule wins, in
#: the order (family, preset), (family, *), (*, preset), (*, *). ``logistic`` (log-SNR points with a
#: logistic density, centre c and scale s) is defined on noise levels, so it is one grid for every
#: schedule family; its c and s come from :data:`DEFAULT_RULE` (family, parameterisation, dimension).
#: Measured against uniform_t, quadratic, uniform_lambda and karras it was the best or within a few
#: percent of the best for UniPC, DPM-Solver++(2M/3M), DEIS, LMS and iPNDM on the VP, EDM and
#: continuous-VP oracles and networks. Consistency sampling keeps diffusers' trailing.
SPACING_RULES: dict[tuple[str, str], tuple[str, dict[str, float]]] = {
    ("*", "*"): ("logistic", {}),  # the centre and scale of DEFAULT_RULE for the family and dimension
    ("flow", "*"): ("logistic", {}),
    ("discrete_vp", "lcm"): ("trailing", {}),
    # Heun's trapezoid in sigma/alpha from a large first noise level is unstable on the logistic grid's
    # long first step (digits-vp-eps: 34 RMSE at NFE 5, 0.18 at NFE 20); uniform t measured best for
    # Heun on the VP and flow networks and oracles, the logistic grid on EDM; Euler on flow likewise
    ("*", "heun"): ("uniform_t", {}),
    ("flow", "heun"): ("uniform_t", {}),
    ("edm", "heun"): ("logistic", {}),
    ("flow", "euler"): ("uniform_t", {}),
    # EDM's stochastic Heun is Heun with churn: the same grids
    ("*", "edm_sde"): ("uniform_t", {}),
    ("flow", "edm_sde"): ("uniform_t", {}),
    ("edm", "edm_sde"): ("logistic", {}),
}


def default_solver(sched: NoiseSchedule, nfe: int | None = None, prediction: str | None = None) -> tuple[str, dict[str, Any]]:
    """The preset (and its options) that runs when no solver is named, for this schedule's family,
    NFE and the model's parameterisation."""
    choice = DEFAULT_RULE.family(sched, prediction).solver_for(nfe)
    return choice.preset, dict(choice.options)


def default_call(sched: NoiseSchedule, nfe: int | None = None, dim: int | None = None, prediction: str | None = None) -> tuple[str, dict[str, Any]]:
    """``(preset, options)`` that ``sample(model, x_T, nfe=N)`` runs for a model of parameterisation
    ``prediction`` on ``sched`` whose samples have ``dim`` values (:data:`DEFAULT_RULE`), grid
    options included."""
    return DEFAULT_RULE.call(sched, nfe, dim, prediction)


#: presets whose logistic grid ignores the model's parameterisation (the default rule's eps-model grid):
#: DPM-Solver-v3 re-parameterises the model itself through its statistics, and on the family's grid it had
#: 0.46-0.78x its error on the eps-shifted one on two held-out eps networks (val-unet8-eps-linear-long,
#: val-mlp-eps-linear; 64 x 121 statistics, NFE 5-10) and 0.41-0.55x on digits-vp-eps (docs/defaults.md)
PARAMETERISATION_BLIND_PRESETS = frozenset({"dpm_solver_v3"})


def default_grid(sched: NoiseSchedule, preset: str | None = None, dim: int | None = None,
                 prediction: str | None = None, nfe: int | None = None) -> tuple[str, dict[str, float]]:
    """The time grid ``preset`` uses on ``sched`` when no ``spacing`` is given, with its grid options
    (which apply unless the caller sets them); a logistic grid takes :data:`DEFAULT_RULE`'s centre
    and scale for the family, the model's parameterisation ``prediction``, the data dimension
    ``dim`` (``None``: no dimension shift) and the NFE (``None``: the low-NFE grid)."""
    fam = schedule_family(sched)
    name, opts = "logistic", {}
    for key in ((fam, preset or "*"), (fam, "*"), ("*", preset or "*"), ("*", "*")):
        if key in SPACING_RULES:
            name, opts = SPACING_RULES[key]
            break
    if name == "logistic":
        if preset in PARAMETERISATION_BLIND_PRESETS:
            prediction = None
        return name, {**DEFAULT_RULE.grid_options(sched, dim, prediction, nfe), **opts}
    return name, dict(opts)


def default_spacing(sched: NoiseSchedule, preset: str | None = None) -> str:
    """The name of the time grid ``preset`` uses on ``sched`` when no ``spacing`` is given."""
    return default_grid(sched, preset)[0]

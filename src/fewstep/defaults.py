"""Defaults chosen from measurements: the solver that ``fewstep.sample(model, x_T, nfe=N)`` runs when
no solver is named, and the time grid each preset uses when no ``spacing`` is named, per family of
noise schedule. The evidence is ``benchmarks/reports/defaults.md`` (``python benchmarks/defaults.py``);
``docs/defaults.md`` summarises it.
"""

from __future__ import annotations

from typing import Any

from .schedules import EDM, CosineVP, DiscreteVP, FlowMatching, LinearVP, NoiseSchedule

__all__ = ["schedule_family", "default_solver", "default_spacing", "default_grid", "DEFAULT_SOLVERS", "SPACING_RULES"]

FAMILIES = ("discrete_vp", "linear_vp", "cosine_vp", "edm", "flow")


def schedule_family(sched: NoiseSchedule) -> str:
    """``discrete_vp`` | ``linear_vp`` | ``cosine_vp`` | ``edm`` | ``flow`` (``other`` for user subclasses)."""
    for cls, name in ((DiscreteVP, "discrete_vp"), (LinearVP, "linear_vp"), (CosineVP, "cosine_vp"), (EDM, "edm"), (FlowMatching, "flow")):
        if isinstance(sched, cls):
            return name
    return "other"


#: family -> (preset, options) run by ``sample(model, x_T, nfe=N)``: UniPC (order 3, bh2, corrector;
#: the step into sigma = 0 at order 2) was the most accurate preset at its default grid on every
#: oracle family and on the three bundled networks (benchmarks/reports/defaults.md).
DEFAULT_SOLVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "*": ("unipc", {}),
}

#: (family, preset) -> (spacing, grid options), ``"*"`` matching any; the most specific rule wins, in
#: the order (family, preset), (family, *), (*, preset), (*, *). ``logistic`` (log-SNR points with a
#: logistic density, centre c and scale s) is defined on noise levels, so it is one grid for every
#: schedule family; measured against uniform_t, quadratic, uniform_lambda and karras it was the best or
#: within a few percent of the best for UniPC, DPM-Solver++(2M/3M), DEIS, LMS and iPNDM on the VP, EDM
#: and continuous-VP oracles and networks with c = 0 (centred at sigma/alpha = 1), s = 1.4. On flow
#: models uniform t (c = 0, s = 1) lost to diffusers' UniPC with flow_shift 0.5 on digits-flow at NFE
#: 10-20; c = 0.6, s = 1.1 (and the schedule's ``shift`` moving c by -log(shift)) beat it on both flow
#: targets but one cell (1.02x). Consistency sampling keeps diffusers' trailing.
SPACING_RULES: dict[tuple[str, str], tuple[str, dict[str, float]]] = {
    ("*", "*"): ("logistic", {"logistic_center": 0.0, "logistic_scale": 1.4}),
    ("flow", "*"): ("logistic", {"logistic_center": 0.6, "logistic_scale": 1.1}),
    ("discrete_vp", "lcm"): ("trailing", {}),
    # Heun's trapezoid in sigma/alpha from a large first noise level is unstable on the logistic grid's
    # long first step (digits-vp-eps: 34 RMSE at NFE 5, 0.18 at NFE 20); uniform t measured best for
    # Heun on the VP and flow networks and oracles, the logistic grid on EDM; Euler on flow likewise
    ("*", "heun"): ("uniform_t", {}),
    ("flow", "heun"): ("uniform_t", {}),
    ("edm", "heun"): ("logistic", {"logistic_center": 0.0, "logistic_scale": 1.4}),
    ("flow", "euler"): ("uniform_t", {}),
    # EDM's stochastic Heun is Heun with churn: the same grids
    ("*", "edm_sde"): ("uniform_t", {}),
    ("flow", "edm_sde"): ("uniform_t", {}),
    ("edm", "edm_sde"): ("logistic", {"logistic_center": 0.0, "logistic_scale": 1.4}),
}


def default_solver(sched: NoiseSchedule) -> tuple[str, dict[str, Any]]:
    """The preset (and its options) that runs when no solver is named, for this schedule's family."""
    name, opts = DEFAULT_SOLVERS.get(schedule_family(sched), DEFAULT_SOLVERS["*"])
    return name, dict(opts)


def default_grid(sched: NoiseSchedule, preset: str | None = None) -> tuple[str, dict[str, float]]:
    """The time grid ``preset`` uses on ``sched`` when no ``spacing`` is given, with its grid options
    (which apply unless the caller sets them)."""
    fam = schedule_family(sched)
    for key in ((fam, preset or "*"), (fam, "*"), ("*", preset or "*"), ("*", "*")):
        if key in SPACING_RULES:
            name, opts = SPACING_RULES[key]
            return name, dict(opts)
    return "logistic", {}


def default_spacing(sched: NoiseSchedule, preset: str | None = None) -> str:
    """The name of the time grid ``preset`` uses on ``sched`` when no ``spacing`` is given."""
    return default_grid(sched, preset)[0]

"""Named samplers as presets: each builds a :class:`~fewstep.solvers.plan.SolverSchedule` from the
shared :class:`~fewstep.solvers.strategy.Step`.

One module per sampler family, each registering its presets on import into one table
(:data:`PRESETS`, :func:`~fewstep.solvers.presets.building.register_preset`) from the public helpers
of :mod:`~fewstep.solvers.presets.building`: a new sampler is one new module here (and a line below
importing it) plus a test row. The families:

* :mod:`.exponential`: DDIM, DPM-Solver++(2M) / (3M), UniPC, DEIS (exponential multistep);
* :mod:`.singlestep`: DPM-Solver-1/2/3, DPM-Solver++(2S);
* :mod:`.linear_multistep`: PNDM / PLMS, iPNDM, LMS;
* :mod:`.edm`: Euler, Heun, EDM's stochastic sampler (k-diffusion / EDM);
* :mod:`.ancestral`: DDPM, Euler ancestral, DPM-Solver++ (2M) / (3M) SDE, DPM-Solver++ SDE;
* :mod:`.sa_solver`, :mod:`.er_sde` (with its noise rule), :mod:`.lcm`;
* :mod:`.dpm_solver_v3`: DPM-Solver-v3, whose weights come from the model's empirical statistics.

This module is the front door: :func:`preset` builds a named preset with the default grid of its
noise schedule, :func:`preset_options` lists what it accepts.
"""

from __future__ import annotations

import inspect
from typing import Any

from ...defaults import default_grid
from ...errors import ArgumentError, SolverError
from ...models import PREDICTION_TYPES
from ...schedules import NoiseSchedule
from ..plan import SolverSchedule
from . import ancestral, dpm_solver_v3, edm, er_sde, exponential, lcm, linear_multistep, sa_solver, singlestep  # noqa: F401  (register their presets)
from .building import DEFAULT_FINAL_ORDER, GRID_OPTIONS, PRESETS, PresetFn, preset_names, register_preset

__all__ = ["preset", "preset_options", "preset_names", "register_preset", "PRESETS", "GRID_OPTIONS",
           "DEFAULT_FINAL_ORDER", "PresetFn"]


def preset_options(name: str) -> list[str]:
    """The keyword options of a preset: its own and the grid options."""
    if name not in PRESETS:
        raise SolverError(f"unknown solver preset {name!r}; known: {preset_names()}")
    own = [p.name for p in inspect.signature(PRESETS[name]).parameters.values()
           if p.kind is inspect.Parameter.KEYWORD_ONLY]
    return sorted(set(own) | set(GRID_OPTIONS))


def preset(name: str, nfe: int, sched: NoiseSchedule, **options: Any) -> SolverSchedule:
    """Build the named preset for ``nfe`` model evaluations on the noise schedule ``sched``.

    Options: ``spacing`` (a name from :data:`fewstep.timesteps.SPACINGS` or explicit times; default
    :func:`fewstep.default_spacing` of the preset and schedule), ``t_start``, ``t_end``,
    ``t_noisy_start``, ``t_noisy_end``, ``rho``, ``data_dim`` and ``model_prediction`` (values per
    sample and the model's parameterisation: they choose the default
    logistic grid, :class:`fewstep.defaults.DefaultRule`; :func:`fewstep.sample` passes it), and
    preset-specific ones (:func:`preset_options`).
    """
    if not isinstance(name, str):
        raise ArgumentError(f"a preset name must be a string, got {type(name).__name__}")
    if not isinstance(sched, NoiseSchedule):
        raise ArgumentError(f"sched must be a fewstep NoiseSchedule, got {type(sched).__name__}")
    valid = preset_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ArgumentError(f"unknown option(s) {unknown} for preset {name!r}; valid options: {valid}")
    data_dim = options.pop("data_dim", None)
    if data_dim is not None and (not isinstance(data_dim, int) or isinstance(data_dim, bool) or data_dim < 1):
        raise ArgumentError(f"data_dim must be a positive integer (values per sample), got {data_dim!r}")
    model_prediction = options.pop("model_prediction", None)
    if model_prediction is not None and model_prediction not in PREDICTION_TYPES:
        raise ArgumentError(f"model_prediction must be one of {PREDICTION_TYPES}, got {model_prediction!r}")
    if options.get("spacing") is None:
        options["spacing"], grid_defaults = default_grid(sched, name, data_dim, model_prediction, nfe)
        for key, value in grid_defaults.items():
            options.setdefault(key, value)
    plan = PRESETS[name](nfe, sched, **options)
    options.update({k: v for k, v in (("data_dim", data_dim), ("model_prediction", model_prediction)) if v is not None})
    sp = options["spacing"]
    plan.meta["spacing"] = sp if isinstance(sp, str) else "explicit"
    grid = {k: options[k] for k in GRID_OPTIONS if k != "spacing" and k in options}
    if grid:
        plan.meta["grid"] = grid
    return plan

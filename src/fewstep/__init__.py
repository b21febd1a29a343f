"""fewstep: fast training-free sampling for diffusion and flow-matching models.

The public API (DESIGN section 7) is re-exported here.
"""

import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    # libgomp's default (active) wait policy lets idle OpenMP threads spin; on small shared machines
    # (2 vCPUs, other processes busy) every small parallel torch op then costs milliseconds instead
    # of microseconds. Passive waiting is the default here unless the user chose otherwise.
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ._version import __version__  # set in src/fewstep/_version.py

from .errors import ArgumentError, FewstepError, ModelOutputError, ScheduleError, ScheduleFileError, ShapeError, SolverError, ZooError
from .metrics import frechet_distance, likelihood_gap, rmse
from .models import Model, Prediction, Threshold, batched_classifier_free_guidance, classifier_free_guidance
from .noise import BrownianNoise, IntervalNoise, initial_noise, keyed_noise
from .oracle import GaussianMixture, bundled_oracle
from .reference import check_fine_reference, check_reference, reference_solution
from .parallel import ParallelInfo, ParallelOptions, parallel_solve
from .generate import GenerateInfo, generate, load_samples
from .sample_folder import MappedSamples
from .sample import SampleInfo, sample
from .autotune import AutotuneOptions, AutotuneResult
from .schedules import EDM, CosineVP, DiscreteVP, FlowMatching, LinearVP, NoiseSchedule, VPSchedule
from .solvers.plan import SolverSchedule
from .solvers.presets import preset, preset_names, preset_options
from .solvers.strategy import Step
from .timesteps import time_grid
from .defaults import default_call, default_solver, default_spacing
from .schedule_search import search
from .statistics import ModelStatistics, model_statistics
from .iia import fit_iia
from .gits import fit_gits
from . import zoo

__all__ = [
    "AutotuneOptions", "AutotuneResult", "default_call", "ArgumentError", "BrownianNoise", "IntervalNoise", "ParallelInfo", "ParallelOptions", "parallel_solve", "GenerateInfo", "generate", "load_samples", "MappedSamples", "CosineVP", "DiscreteVP", "EDM", "FewstepError", "FlowMatching", "GaussianMixture", "LinearVP", "Model",
    "ModelOutputError", "NoiseSchedule", "Prediction", "SampleInfo", "ScheduleError", "ScheduleFileError",
    "ShapeError", "SolverError", "SolverSchedule", "Step", "Threshold", "VPSchedule", "ZooError", "__version__",
    "batched_classifier_free_guidance", "default_solver", "default_spacing", "bundled_oracle", "check_fine_reference", "check_reference", "classifier_free_guidance",
    "frechet_distance", "initial_noise", "keyed_noise", "likelihood_gap", "preset", "preset_names", "preset_options",
    "reference_solution", "rmse", "sample", "search", "time_grid", "zoo", "ModelStatistics", "model_statistics", "fit_iia", "fit_gits",
]

"""Shared test helpers: convergence-order fits against a converged reference."""

import numpy as np
import torch

import fewstep


def empirical_order(model, x_T, solver, nfes, ref, **opts):
    """Slope of log RMSE against log NFE (negated): the observed convergence order."""
    errs = [fewstep.rmse(fewstep.sample(model, x_T, solver, nfe=n, **opts), ref) for n in nfes]
    slope = np.polyfit(np.log(nfes), np.log(errs), 1)[0]
    return -slope, errs


def oracle_setup(schedule, *, dim=4, batch=12, seed=0, prediction="x0"):
    g = fewstep.GaussianMixture.random(dim, 3, 1, seed=seed)
    model = g.as_model(schedule, prediction)
    x_T = fewstep.initial_noise(schedule, (batch, dim), seed, dtype=torch.float64)
    ref = fewstep.reference_solution(model, x_T, rtol=1e-12, atol=1e-12)
    return g, model, x_T, ref

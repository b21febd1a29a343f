"""Convergence order of every preset, measured on the exact oracle (DESIGN 1.3; issue 3).

The error against a converged reference falls like NFE^-p; the slope of log RMSE vs log NFE is
the observed order p. The solve ends at the schedule's smallest noisy time (no final denoising
jump, whose fixed error would hide the order). Multistep methods of order >= 3 start with
singlestep steps of full order (``warmup="singlestep"``): with the usual lower-order warm-up the
first step's O(h^2) local error bounds the global order by 2 asymptotically (how soon that shows
depends on the model; at high noise the prediction barely moves, so its constant is small). That is
a property of the warm-up, not of the method.
"""

import numpy as np
import pytest
import torch

import fewstep

EDM = fewstep.EDM()
T_END = EDM.t_min

# preset, options, nominal order, NFEs in the asymptotic range, spacing
CASES = [
    ("ddim", {}, 1, [64, 128, 256], "uniform_lambda"),
    ("euler", {}, 1, [64, 128, 256], "karras"),
    ("dpm_solver_1", {}, 1, [64, 128, 256], "uniform_lambda"),
    ("heun", {}, 2, [65, 129, 257], "karras"),
    ("dpm_solver_2", {}, 2, [64, 128, 256], "uniform_lambda"),
    ("dpmpp_2s", {}, 2, [64, 128, 256], "uniform_lambda"),
    ("dpmpp_2m", {}, 2, [64, 128, 256], "uniform_lambda"),
    ("dpmpp_2m", {"solver_type": "heun"}, 2, [64, 128, 256], "uniform_lambda"),
    ("dpm_solver_3", {}, 3, [60, 120, 240], "uniform_lambda"),
    ("dpmpp_3m", {"warmup": "singlestep"}, 3, [120, 240, 480], "uniform_lambda"),
    ("deis", {"warmup": "singlestep"}, 3, [80, 160, 320], "uniform_lambda"),
    ("deis", {"warmup": "singlestep", "interp": "lambda"}, 3, [80, 160, 320], "uniform_lambda"),
    ("unipc", {"warmup": "singlestep", "corrector": False}, 3, [120, 240, 480], "uniform_lambda"),
    ("unipc", {"warmup": "singlestep", "variant": "bh1"}, 4, [60, 120, 240], "uniform_lambda"),
    ("unipc", {"warmup": "singlestep"}, 4, [60, 120, 240], "uniform_lambda"),
    ("unipc", {"order": 2}, 3, [64, 128, 256], "uniform_lambda"),
    ("lms", {"warmup": "singlestep"}, 4, [80, 160, 320], "uniform_lambda"),
    # fixed Adams-Bashforth weights assume equal steps in sigma/alpha: measured on a window where a
    # grid uniform in sigma resolves the ODE (sigma 5 -> 0.5)
    ("ipndm", {"warmup": "singlestep"}, 4, [160, 320, 640], "uniform_t"),
    ("pndm", {}, 3, [40, 80, 160], "uniform_t"),
]
WINDOWS = {"ipndm": (5.0, 0.5), "pndm": (5.0, 0.5)}


_PROBLEMS = {}


def _problem(window=(EDM.t_max, T_END)):
    if window not in _PROBLEMS:
        g = fewstep.GaussianMixture.random(4, 3, 1, seed=0)
        model = g.as_model(EDM)
        x_T = fewstep.initial_noise(EDM, (12, 4), 0, t_start=window[0], dtype=torch.float64)
        ref = fewstep.reference_solution(model, x_T, t_start=window[0], t_end=window[1], rtol=1e-13, atol=1e-13)
        _PROBLEMS[window] = (model, x_T, ref, window)
    return _PROBLEMS[window]


@pytest.fixture(scope="module")
def oracle_problem():
    return _problem()


def _order(problem, name, opts, nfes, spacing):
    model, x_T, ref, (t0, t1) = problem
    errs = []
    for n in nfes:
        x, info = fewstep.sample(model, x_T, name, nfe=n, spacing=spacing, t_start=t0, t_end=t1, return_info=True, **opts)
        assert info.nfe == n
        errs.append(fewstep.rmse(x, ref))
    return -np.polyfit(np.log(nfes), np.log(errs), 1)[0], errs


@pytest.mark.parametrize("name,opts,nominal,nfes,spacing", CASES, ids=[f"{c[0]}-{c[2]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}" for c in CASES])
def test_preset_has_its_nominal_order(name, opts, nominal, nfes, spacing):
    problem = _problem(WINDOWS[name]) if name in WINDOWS else _problem()
    order, errs = _order(problem, name, opts, nfes, spacing)
    assert abs(order - nominal) <= 0.3, f"{name} {opts}: order {order:.2f} (nominal {nominal}), errors {errs}"


def test_published_dpmpp_3m_weights_are_second_order(oracle_problem):
    """DPM-Solver++(3M)'s published second-difference weight is half the exact one (h phi_3 D2 vs
    2 h phi_3 D2): even with a full-order start it converges at order 2, the exact weights at 3."""
    published, _ = _order(oracle_problem, "dpmpp_3m", {"warmup": "singlestep", "weights": "published"}, [120, 240, 480], "uniform_lambda")
    exact, _ = _order(oracle_problem, "dpmpp_3m", {"warmup": "singlestep"}, [120, 240, 480], "uniform_lambda")
    assert abs(published - 2) <= 0.3 and abs(exact - 3) <= 0.3

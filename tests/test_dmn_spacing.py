"""The ``dmn`` spacings: time grids optimised for a solver's order from the noise schedule alone
(Xue et al. 2024, :mod:`fewstep.optimized_steps`; issue 26 item 4).

Properties, not stored numbers: the solver weights are the exact exponential-integrator integrals of
the Lagrange interpolant; the grid is strictly monotone with the ends of ``uniform_lambda`` on every
schedule family, deterministic, at a minimum of its objective (lower than at uniform lambda, and
than at nearby grids); a failed optimisation raises; on the exact Gaussian-mixture oracle UniPC and
DPM-Solver++(2M) are more accurate on it than on the uniform-lambda grid, the paper's comparison.
"""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

import fewstep
from fewstep.errors import ScheduleError
from fewstep.optimized_steps import _optimise, default_dmn_order, dmn_lambdas, dmn_objective, dmn_step_orders, dmn_step_weights

SCHEDULES = [
    fewstep.DiscreteVP.linear(),
    fewstep.DiscreteVP.cosine(),
    fewstep.LinearVP(),
    fewstep.CosineVP(),
    fewstep.EDM(),
    fewstep.FlowMatching(),
    fewstep.FlowMatching(shift=3.0),
]
DMN = ["dmn", "dmn1", "dmn2", "dmn3"]


def _lagrange_integral(lams, i, nodes, j):
    """``int_{lambda_i}^{lambda_{i+1}} e^lambda l_j(lambda) dlambda`` by adaptive quadrature."""
    others = [k for k in nodes if k != j]

    def f(x):
        return math.exp(x) * np.prod([(x - lams[k]) / (lams[j] - lams[k]) for k in others])

    return quad(f, lams[i], lams[i + 1], epsabs=0.0, epsrel=1e-12)[0]


@pytest.mark.parametrize("order", [1, 2, 3])
def test_weights_are_the_exponential_integrator_integrals(order):
    rng = np.random.default_rng(order)
    lams = np.sort(rng.uniform(-6.0, 6.0, 9))
    lams[3] = lams[2] + 1e-3  # a tiny step (the moments' quadrature branch) beside large ones (the recurrence)
    orders = dmn_step_orders(8, order, lower_order_final=False)
    w = dmn_step_weights(lams, orders)
    for i, k in enumerate(orders):
        nodes = [i - l for l in range(k)]
        for l, j in enumerate(nodes):
            exact = _lagrange_integral(lams, i, nodes, j)
            assert w[i, l] * math.exp(lams[j]) == pytest.approx(exact, rel=1e-9)
            assert np.sign(w[i, l]) == (-1) ** l  # the newest node positive, older ones alternate
        assert np.all(w[i, k:] == 0.0)
        # the basis sums to one: a constant data prediction is integrated exactly
        total = sum(w[i, l] * math.exp(lams[i - l]) for l in range(k))
        assert total == pytest.approx(math.exp(lams[i + 1]) - math.exp(lams[i]), rel=1e-12)


def test_step_orders_follow_the_multistep_presets():
    assert dmn_step_orders(6, 3) == (1, 2, 3, 3, 2, 1)  # warm-up, lower order at a noisy end
    assert dmn_step_orders(6, 3, after=1) == (1, 2, 3, 3, 3, 2)  # the clean step follows
    assert dmn_step_orders(6, 2, prior=1, after=1) == (1, 2, 2, 2, 2, 2)
    assert dmn_step_orders(20, 3) == (1, 2) + (3,) * 18  # no lower order final from 15 steps
    with pytest.raises(ScheduleError, match="orders"):
        dmn_step_orders(5, 4)


@pytest.mark.parametrize("sched", SCHEDULES, ids=repr)
@pytest.mark.parametrize("spacing", DMN)
def test_grid_monotone_with_the_uniform_lambda_ends(sched, spacing):
    for n in (1, 2, 3, 5, 8, 12):
        ts = fewstep.time_grid(sched, n, spacing)
        ref = fewstep.time_grid(sched, n, "uniform_lambda")
        assert ts.shape == (n + 1,) and ts.dtype == np.float64
        assert np.all(np.isfinite(ts)) and np.all(np.diff(ts) < 0)
        assert ts[0] == sched.t_max and ts[-1] == sched.t_clean
        pure = float(sched.alpha(sched.t_max)) == 0.0
        if n - pure - 1 >= 1:  # the same noisy ends as uniform_lambda: t_min, and t_noisy_start after pure noise
            assert ts[-2] == ref[-2]
            assert ts[1] == ref[1] or not pure


def test_grid_honours_the_ends_it_is_given():
    edm = fewstep.EDM()
    ts = fewstep.time_grid(edm, 6, "dmn2", t_start=20.0, t_end=0.05)  # noisy end: nothing appended
    assert ts[0] == 20.0 and ts[-1] == 0.05 and np.all(np.diff(ts) < 0)
    ts = fewstep.time_grid(edm, 6, "dmn2", t_noisy_end=0.01)
    assert ts[-2] == 0.01 and ts[-1] == 0.0


def test_deterministic():
    sched = fewstep.DiscreteVP.linear()
    first = fewstep.time_grid(sched, 9, "dmn3")
    _optimise.cache_clear()
    again = fewstep.time_grid(sched, 9, "dmn3")
    np.testing.assert_array_equal(first, again)


def test_default_order_is_the_default_solvers():
    vp, flow = fewstep.DiscreteVP.linear(), fewstep.FlowMatching()
    for sched in (vp, flow):
        for n in (5, 8, 9, 12):
            preset, options = fewstep.default_solver(sched, n)
            assert preset == "unipc"
            order = options.get("order", 3)
            assert default_dmn_order(sched, n) == order
            np.testing.assert_array_equal(fewstep.time_grid(sched, n, "dmn"), fewstep.time_grid(sched, n, f"dmn{order}"))


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("m", [3, 5, 9])
def test_objective_at_a_minimum_below_uniform_lambda(order, m):
    lam0, lam1 = -5.0, 4.6
    orders = dmn_step_orders(m, order, after=1)
    lams = dmn_lambdas(lam0, lam1, orders)
    assert lams[0] == lam0 and lams[-1] == lam1 and np.all(np.diff(lams) > 0)
    best = dmn_objective(lams, orders)
    assert best < dmn_objective(np.linspace(lam0, lam1, m + 1), orders)
    # no nearby grid is better: moving any inner point either way raises the objective
    for i in range(1, m):
        for step in (-1e-3, 1e-3):
            moved = lams.copy()
            moved[i] += step
            assert dmn_objective(moved, orders) >= best * (1 - 1e-9)


def test_grid_is_the_optimum_mapped_to_time():
    sched = fewstep.EDM()
    ts = fewstep.time_grid(sched, 7, "dmn2")
    lams = sched.lambda_(torch.from_numpy(ts[:-1])).numpy()  # the noisy part, before the clean time
    expected = dmn_lambdas(lams[0], lams[-1], dmn_step_orders(6, 2, after=1))
    np.testing.assert_allclose(lams, expected, rtol=0, atol=1e-9)


def test_bad_inputs_and_failed_optimisations_raise(monkeypatch):
    with pytest.raises(ScheduleError, match="finite"):
        dmn_lambdas(-math.inf, 3.0, (1, 2))
    with pytest.raises(ScheduleError, match="finite"):
        dmn_lambdas(3.0, -1.0, (1, 2))
    with pytest.raises(ScheduleError, match="orders"):
        dmn_lambdas(-3.0, 3.0, (1, 4))
    import scipy.optimize

    class Result:
        def __init__(self, x):
            self.x, self.message = x, "forced"

    orders = dmn_step_orders(5, 2, after=1)
    _optimise.cache_clear()  # no cached answer bypasses the optimiser
    monkeypatch.setattr(scipy.optimize, "minimize", lambda f, x0, **kw: Result(x0[::-1].copy()))
    with pytest.raises(ScheduleError, match="failed"):  # a non-monotone answer
        dmn_lambdas(-4.0, 4.0, orders)
    monkeypatch.setattr(scipy.optimize, "minimize", lambda f, x0, **kw: Result(x0 + np.linspace(0.0, 0.5, x0.size)))
    with pytest.raises(ScheduleError, match="did not improve"):  # monotone, but worse than its start
        dmn_lambdas(-4.0, 4.0, orders)


def test_presets_take_the_spacing():
    for sched in (fewstep.DiscreteVP.linear(), fewstep.EDM(), fewstep.FlowMatching()):
        plan = fewstep.preset("unipc", 6, sched, spacing="dmn")
        assert plan.meta["spacing"] == "dmn" and plan.nfe == 6
        assert plan.times == tuple(fewstep.time_grid(sched, 6, "dmn").tolist())


_ORACLE: dict = {}


def _oracle(sched):
    key = repr(sched)
    if key not in _ORACLE:
        g = fewstep.bundled_oracle("gmm-d64")
        model = g.as_model(sched)
        x_T = fewstep.initial_noise(sched, (32, g.dim), 0, dtype=torch.float64)
        _ORACLE[key] = (model, x_T, fewstep.reference_solution(model, x_T, rtol=1e-10, atol=1e-10))
    return _ORACLE[key]


@pytest.mark.parametrize("solver, spacing", [("unipc", "dmn"), ("unipc", "dmn3"), ("dpmpp_2m", "dmn2")])
def test_more_accurate_than_uniform_lambda_on_the_oracle(solver, spacing):
    """The paper's comparison (optimised vs uniform log-SNR steps), on the exact oracle of a DDPM
    schedule at NFE 5-10; the default logistic grid is not the comparison (it beats both here)."""
    model, x_T, ref = _oracle(fewstep.DiscreteVP.linear())
    for nfe in (5, 6, 8, 10):
        err = fewstep.rmse(fewstep.sample(model, x_T, solver, nfe=nfe, spacing=spacing), ref)
        base = fewstep.rmse(fewstep.sample(model, x_T, solver, nfe=nfe, spacing="uniform_lambda"), ref)
        assert err < 0.9 * base, (solver, spacing, nfe, err, base)

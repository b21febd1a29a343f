"""The default call and the default grids (issue 13): what ``sample(model, x_T, nfe=N)`` runs, and
the logistic log-SNR spacing it uses."""

import math

import numpy as np
import pytest
import torch

import fewstep
from conftest import ALL_SCHEDULES


@pytest.mark.parametrize("family", sorted(ALL_SCHEDULES))
def test_default_call_runs_the_documented_default(family):
    sched = ALL_SCHEDULES[family]()
    g = fewstep.GaussianMixture.random(3, 2, 1, seed=1)
    model = g.as_model(sched, "x0")
    x = fewstep.initial_noise(sched, (4, 3), 0, dtype=torch.float64)
    out, info = fewstep.sample(model, x, nfe=8, return_info=True)
    name, opts = fewstep.default_solver(sched)
    spacing = fewstep.default_spacing(sched, name)
    assert info.plan.name == name and info.plan.meta["spacing"] == spacing and info.nfe == 8
    explicit = fewstep.sample(model, x, name, nfe=8, spacing=spacing, **opts)
    assert torch.equal(out, explicit)
    assert spacing == "logistic"


def test_default_call_needs_an_nfe():
    model = fewstep.GaussianMixture.random(3, 2, 1, seed=1).as_model(fewstep.EDM())
    with pytest.raises(fewstep.ArgumentError, match="nfe="):
        fewstep.sample(model, torch.randn(2, 3))


def test_every_preset_without_spacing_uses_the_rule_table():
    vp, flow, edm = fewstep.DiscreteVP.linear(), fewstep.FlowMatching(), fewstep.EDM()
    for name in fewstep.preset_names():
        expect_vp = {"lcm": "trailing", "heun": "uniform_t", "edm_sde": "uniform_t"}.get(name, "logistic")
        assert fewstep.preset(name, 8, vp).meta["spacing"] == expect_vp
        assert fewstep.preset(name, 8, flow).meta["spacing"] == ("uniform_t" if name in ("heun", "euler", "edm_sde") else "logistic")
        assert fewstep.preset(name, 8, edm).meta["spacing"] == "logistic"


@pytest.mark.parametrize("family", sorted(ALL_SCHEDULES))
def test_logistic_grid_is_a_valid_grid_at_every_n(family):
    sched = ALL_SCHEDULES[family]()
    for n in range(1, 51):
        ts = fewstep.time_grid(sched, n, "logistic")
        assert len(ts) == n + 1 and ts[0] == sched.t_max and ts[-1] == sched.t_clean and np.all(np.diff(ts) < 0), (n, ts)
        if n > 1:  # the noisy points stop at the schedule's smallest noisy time
            assert ts[-2] >= sched.t_min - 1e-12


@pytest.mark.parametrize("scale,center", [(1.4, 0.0), (1.0, 0.0), (2.0, -1.0)])
def test_logistic_points_are_uniform_quantiles_of_a_logistic_in_log_snr(scale, center):
    """The definition: lambda_i = c + s logit(u_i) with u_i uniform from the start's quantile."""
    sched = fewstep.LinearVP()
    n = 6
    ts = fewstep.time_grid(sched, n, "logistic", logistic_center=center, logistic_scale=scale)
    lam = sched.lambda_(torch.as_tensor(ts[:-1])).numpy()
    u = 1.0 / (1.0 + np.exp(-(lam - center) / scale))
    assert np.allclose(np.diff(u), np.diff(u)[0], rtol=1e-8)
    assert np.diff(u)[0] == pytest.approx((1.0 - u[0]) / n, rel=1e-8)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.4])
def test_logistic_with_centre_zero_scale_one_on_flow_is_uniform_flow_time(shift):
    """c = 0, s = 1 is uniform flow time, and the schedule's shift moves both grids alike."""
    flow = fewstep.FlowMatching(shift=shift)
    grid = fewstep.time_grid(flow, 7, "logistic", logistic_center=0.0, logistic_scale=1.0)
    assert np.allclose(grid, fewstep.time_grid(flow, 7, "uniform_t"), atol=1e-12)


def test_family_grid_options_apply_unless_given():
    flow, vp = fewstep.FlowMatching(), fewstep.DiscreteVP.linear()
    plan = fewstep.preset("unipc", 6, flow)
    assert plan.times == tuple(fewstep.time_grid(flow, 6, "logistic", logistic_center=0.6, logistic_scale=1.1))
    assert plan.times == tuple(fewstep.time_grid(flow, 6))  # time_grid takes the family's defaults too
    mine = fewstep.preset("unipc", 6, flow, logistic_scale=2.0)
    assert mine.times == tuple(fewstep.time_grid(flow, 6, "logistic", logistic_center=0.6, logistic_scale=2.0))
    assert fewstep.preset("unipc", 6, vp).times == tuple(fewstep.time_grid(vp, 6, "logistic", logistic_center=0.0, logistic_scale=1.4))


def test_logistic_grid_ends_at_an_intermediate_time():
    sched = fewstep.EDM()
    ts = fewstep.time_grid(sched, 5, "logistic", t_end=0.5)
    assert ts[0] == 80.0 and ts[-1] == 0.5 and np.all(np.diff(ts) < 0)
    with pytest.raises(fewstep.ScheduleError, match="logistic_scale must be > 0"):
        fewstep.time_grid(sched, 5, "logistic", logistic_scale=0.0)


def test_default_beats_the_previous_default_on_the_oracle():
    """Not a benchmark (benchmarks/defaults.py measures against the peers): a guard that the default
    call stays far better than what ``sample`` ran before issue 13 (DDIM on uniform t)."""
    sched = fewstep.DiscreteVP.linear()
    g = fewstep.GaussianMixture.random(8, 4, 2, seed=3)
    model = g.as_model(sched)
    x = fewstep.initial_noise(sched, (32, 8), 0, dtype=torch.float64)
    ref = fewstep.reference_solution(model, x)
    for nfe in (6, 10):
        new = fewstep.rmse(fewstep.sample(model, x, nfe=nfe), ref)
        old = fewstep.rmse(fewstep.sample(model, x, "ddim", nfe=nfe, spacing="uniform_t"), ref)
        assert new < 0.5 * old, (nfe, new, old)

"""The default call and the default grids (issue 13): what ``sample(model, x_T, nfe=N)`` runs, and
the logistic log-SNR spacing it uses."""

import importlib
import math

import numpy as np
import pytest
import torch

import fewstep
from conftest import ALL_SCHEDULES


@pytest.mark.parametrize("nfe", [6, 10])
@pytest.mark.parametrize("family", sorted(ALL_SCHEDULES))
def test_default_call_runs_the_documented_default(family, nfe):
    sched = ALL_SCHEDULES[family]()
    g = fewstep.GaussianMixture.random(3, 2, 1, seed=1)
    model = g.as_model(sched, "x0")
    x = fewstep.initial_noise(sched, (4, 3), 0, dtype=torch.float64)
    out, info = fewstep.sample(model, x, nfe=nfe, return_info=True)
    name, opts = fewstep.default_solver(sched, nfe, "x0")
    spacing = fewstep.default_spacing(sched, name)
    assert info.plan.name == name and info.plan.meta["spacing"] == spacing and info.nfe == nfe
    explicit = fewstep.sample(model, x, name, nfe=nfe, spacing=spacing, **opts)
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
    from fewstep.defaults import DEFAULT_RULE

    flow, vp = fewstep.FlowMatching(), fewstep.DiscreteVP.linear()
    fg, vg = DEFAULT_RULE.flow.grid, DEFAULT_RULE.vp.grid
    plan = fewstep.preset("unipc", 6, flow)
    assert plan.times == tuple(fewstep.time_grid(flow, 6, "logistic", logistic_center=fg.center, logistic_scale=fg.scale))
    assert plan.times == tuple(fewstep.time_grid(flow, 6))  # time_grid takes the family's defaults too
    mine = fewstep.preset("unipc", 6, flow, logistic_scale=2.7)
    assert mine.times == tuple(fewstep.time_grid(flow, 6, "logistic", logistic_center=fg.center, logistic_scale=2.7))
    assert fewstep.preset("unipc", 6, vp).times == tuple(fewstep.time_grid(vp, 6, "logistic", logistic_center=vg.center, logistic_scale=vg.scale))


# ---- the rule's mechanics (whatever its measured parameters are) --------------------------------------
from fewstep.defaults import DefaultRule, FamilyRule, GridParams, SolverChoice  # noqa: E402

RULE = DefaultRule(
    vp=FamilyRule(GridParams(0.5, 1.4), SolverChoice("unipc"), SolverChoice("dpmpp_2m"), 6),
    flow=FamilyRule(GridParams(1.0, 1.0), SolverChoice("unipc", (("order", 2),))),
    eps=FamilyRule(GridParams(-1.0, 2.0), SolverChoice("deis")),
    dim_slope=0.8, dim_ref=64, dim_max=3072,
)


@pytest.fixture
def rule(monkeypatch):
    import fewstep.defaults as D

    clear = importlib.import_module("fewstep.sample").clear_plan_cache  # compiled plans follow the rule in force
    monkeypatch.setattr(D, "DEFAULT_RULE", RULE)
    clear()
    yield RULE
    clear()


def test_the_grid_centre_moves_with_the_data_dimension_within_the_measured_range(rule):
    vp = fewstep.DiscreteVP.linear()
    centre = {d: fewstep.default_call(vp, 10, d)[1]["logistic_center"] for d in (2, 64, 256, 1024, 3072, 65536)}
    assert centre[2] == centre[64] == 0.5  # below the reference dimension: no shift
    for d in (256, 1024, 3072):
        assert centre[d] == pytest.approx(0.5 - 0.8 * 0.5 * math.log(d / 64))
    assert centre[65536] == centre[3072]  # clamped: beyond what was measured the shift stops growing
    assert fewstep.default_call(vp, 10, None)[1]["logistic_center"] == 0.5


def test_the_rule_reads_the_family_the_parameterisation_and_the_nfe(rule):
    vp, edm, flow = fewstep.DiscreteVP.linear(), fewstep.EDM(), fewstep.FlowMatching(shift=3.0)
    assert fewstep.default_call(vp, 5, 64, "x0")[0] == "dpmpp_2m" and fewstep.default_call(vp, 6, 64, "x0")[0] == "dpmpp_2m"
    assert fewstep.default_call(vp, 8, 64, "v")[0] == "unipc"
    assert fewstep.default_call(vp, 8, 64, "eps") == ("deis", {"spacing": "logistic", "logistic_center": -1.0, "logistic_scale": 2.0})
    assert fewstep.default_call(edm, 8, 64, "score")[0] == "deis" and fewstep.default_call(edm, 8, 64, "edm")[0] == "unipc"
    assert fewstep.default_call(flow, 8, 64, "eps") == ("unipc", {"order": 2, "spacing": "logistic", "logistic_center": 1.0, "logistic_scale": 1.0})
    assert fewstep.default_solver(vp, 5) == ("dpmpp_2m", {}) and fewstep.default_solver(vp, 20, "eps") == ("deis", {})


def test_sample_reads_the_dimension_and_parameterisation_for_the_default_call_and_named_presets(rule):
    vp = fewstep.DiscreteVP.linear()
    small = fewstep.GaussianMixture.random(64, 2, 1, seed=1)
    big = fewstep.GaussianMixture.random(1024, 2, 1, seed=1)
    for g in (small, big):
        for prediction in ("x0", "eps"):
            model = g.as_model(vp, prediction)
            x = fewstep.initial_noise(vp, (2, g.dim), 0, dtype=torch.float64)
            name, opts = fewstep.default_call(vp, 8, g.dim, prediction)
            _, info = fewstep.sample(model, x, nfe=8, return_info=True)
            assert info.plan.meta["preset"] == name
            assert info.plan.times == fewstep.preset(name, 8, vp, **opts).times
            # a preset named without a grid: the same grid as the default call for this model
            _, named = fewstep.sample(model, x, "dpmpp_2m", nfe=8, return_info=True)
            assert named.plan.times == tuple(fewstep.time_grid(vp, 8, "logistic", logistic_center=opts["logistic_center"],
                                                               logistic_scale=opts["logistic_scale"]))
            # DPM-Solver-v3 re-parameterises the model itself: its grid is the family's, whatever the model predicts
            family = fewstep.default_call(vp, 8, g.dim, "x0")[1]
            assert fewstep.preset("dpm_solver_v3", 8, vp, data_dim=g.dim, model_prediction=prediction).times == \
                tuple(fewstep.time_grid(vp, 8, "logistic", logistic_center=family["logistic_center"], logistic_scale=family["logistic_scale"]))
    assert fewstep.default_call(vp, 8, 64, "eps")[1] != fewstep.default_call(vp, 8, 64, "x0")[1]  # so the line above tells them apart
    # the compiled-plan cache tells the shapes and parameterisations apart
    m64, m1024 = small.as_model(vp), big.as_model(vp)
    p64 = fewstep.sample(m64, fewstep.initial_noise(vp, (2, 64), 0, dtype=torch.float64), nfe=8, return_info=True)[1].plan
    p1024 = fewstep.sample(m1024, fewstep.initial_noise(vp, (2, 1024), 0, dtype=torch.float64), nfe=8, return_info=True)[1].plan
    assert p64.times != p1024.times and p1024.times[1] > p64.times[1]  # more steps at high noise for the larger data
    with pytest.raises(fewstep.ArgumentError, match="model_prediction"):
        fewstep.preset("unipc", 8, vp, model_prediction="noise")
    with pytest.raises(fewstep.ArgumentError, match="data_dim"):
        fewstep.preset("unipc", 8, vp, data_dim=0)


def test_a_family_takes_its_high_nfe_grid_and_preset_from_the_band_threshold(monkeypatch):
    """``FamilyRule.high_grid`` applies from ``high_nfe_min`` on, to the default call, to presets named
    without a grid and to the diffusers scheduler; below it the low-NFE grid; it round-trips through
    the rule's JSON form."""
    import fewstep.defaults as D
    from dataclasses import asdict, replace

    eps = FamilyRule(GridParams(-1.0, 2.0), SolverChoice("unipc"), SolverChoice("unipc", (("order", 2),)), 11, GridParams(0.25, 4.0), 12)
    banded = replace(RULE, eps=eps)
    monkeypatch.setattr(D, "DEFAULT_RULE", banded)
    clear = importlib.import_module("fewstep.sample").clear_plan_cache
    clear()
    vp = fewstep.DiscreteVP.linear()
    assert fewstep.default_call(vp, 11, 64, "eps") == ("unipc", {"order": 2, "spacing": "logistic", "logistic_center": -1.0, "logistic_scale": 2.0})
    assert fewstep.default_call(vp, 12, 64, "eps") == ("unipc", {"spacing": "logistic", "logistic_center": 0.25, "logistic_scale": 4.0})
    assert fewstep.default_call(vp, 12, 64, "x0")[1]["logistic_scale"] == 1.4  # other families keep theirs
    assert fewstep.preset("dpmpp_2m", 20, vp, model_prediction="eps", data_dim=64).times == tuple(
        fewstep.time_grid(vp, 20, "logistic", logistic_center=0.25, logistic_scale=4.0))
    assert fewstep.preset("dpmpp_2m", 10, vp, model_prediction="eps", data_dim=64).times == tuple(
        fewstep.time_grid(vp, 10, "logistic", logistic_center=-1.0, logistic_scale=2.0))
    model = fewstep.GaussianMixture.random(64, 2, 1, seed=1).as_model(vp, "eps")
    x = fewstep.initial_noise(vp, (2, 64), 0, dtype=torch.float64)
    assert fewstep.sample(model, x, nfe=15, return_info=True)[1].plan.meta["grid"]["logistic_scale"] == 4.0
    assert D.rule_from_dict(asdict(banded)) == banded
    clear()


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_the_rule_keeps_the_declared_fraction_of_a_flow_schedules_shift(monkeypatch, weight):
    """``flow_shift_weight`` w: the default grid on ``FlowMatching(shift=k)`` has the log-SNR points of
    the unshifted schedule's grid moved by ``-w log(k)`` (w = 1: the logistic spacing's own move)."""
    import fewstep.defaults as D
    from dataclasses import replace

    monkeypatch.setattr(D, "DEFAULT_RULE", replace(RULE, flow_shift_weight=weight))
    plain, shifted = fewstep.FlowMatching(), fewstep.FlowMatching(shift=3.0)

    def lambdas(sched):
        name, opts = fewstep.default_call(sched, 8, 64, "flow")
        ts = fewstep.preset(name, 8, sched, **opts).times
        return sched.lambda_(torch.as_tensor(ts[1:-1], dtype=torch.float64)).numpy()

    assert np.allclose(lambdas(shifted), lambdas(plain) - weight * math.log(3.0), atol=1e-9)


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


def test_the_library_runs_the_rule_the_benchmark_chose():
    """``DEFAULT_RULE`` is the rule ``benchmarks/default_rule.py select`` chose on all the targets
    (``benchmarks/reports/default_rule.json``): a hand edit of either shows here."""
    import json
    from pathlib import Path

    from fewstep.defaults import DEFAULT_RULE, rule_from_dict

    chosen = json.loads((Path(__file__).resolve().parent.parent / "benchmarks" / "reports" / "default_rule.json").read_text())
    assert rule_from_dict(chosen["shipped"]["rule"]) == DEFAULT_RULE
    for entry in chosen["leave_one_model_out"].values():  # the held-out rules parse too
        assert isinstance(rule_from_dict(entry["rule"]), type(DEFAULT_RULE))

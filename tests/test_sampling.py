import numpy as np
import pytest
import torch

import fewstep
from helpers import empirical_order, oracle_setup


@pytest.mark.parametrize(
    "schedule,spacing",
    [
        (fewstep.DiscreteVP.linear(), "uniform_t"),
        (fewstep.LinearVP(), "uniform_lambda"),
        (fewstep.EDM(), "karras"),
        (fewstep.FlowMatching(), "uniform_t"),
    ],
    ids=["discrete-vp", "linear-vp", "edm", "flow"],
)
def test_ddim_is_first_order(schedule, spacing):
    _, model, x_T, ref = oracle_setup(schedule)
    order, errs = empirical_order(model, x_T, "ddim", [64, 128, 256, 512], ref, spacing=spacing)
    assert 0.8 <= order <= 1.2, (order, errs)


def test_reference_reports_its_own_convergence():
    g = fewstep.GaussianMixture.random(4, 3, 1, seed=0)
    model = g.as_model(fewstep.DiscreteVP.linear())
    x_T = torch.randn(6, 4, dtype=torch.float64)
    chk = fewstep.check_reference(model, x_T, rtol=1e-9)
    assert chk.max_abs_change < 1e-7
    # and it is the limit the sampler converges to
    fine = fewstep.sample(model, x_T, "ddim", nfe=2000)
    assert fewstep.rmse(fine, chk.solution) < 5e-3


def test_reference_between_intermediate_times_matches_ddim_limit():
    sched = fewstep.LinearVP()
    g = fewstep.GaussianMixture.random(3, 2, 1, seed=1)
    model = g.as_model(sched)
    x = torch.randn(5, 3, dtype=torch.float64) * float(sched.sigma(0.8))
    ref = fewstep.reference_solution(model, x, t_start=0.8, t_end=0.3)
    errs = [fewstep.rmse(fewstep.sample(model, x, "ddim", nfe=n, t_start=0.8, t_end=0.3), ref) for n in (100, 200)]
    assert errs[1] < errs[0] * 0.6 and errs[1] < 1e-3


def _diffusers_ddim(model, x, ds, n):
    ds.set_timesteps(n)
    for t in ds.timesteps:
        eps = model.fn(x, torch.full((x.shape[0],), float(t), dtype=torch.float64))
        x = ds.step(eps, t, x).prev_sample
    return x, [float(t) for t in ds.timesteps]


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("n", [5, 10, 50])
def test_ddim_equals_diffusers_ddim_scheduler(spacing, n, small_gmm):
    diffusers = pytest.importorskip("diffusers")
    ds = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing,
    )
    ds.alphas_cumprod = ds.alphas_cumprod.to(torch.float64)
    sched = fewstep.DiscreteVP(ds.alphas_cumprod)  # the very same numbers diffusers uses
    model = small_gmm.as_model(sched, "eps")
    x = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    xd, timesteps = _diffusers_ddim(model, x.clone(), ds, n)
    plan = fewstep.preset("ddim", n, sched, spacing=spacing)
    assert list(plan.times[:-1]) == timesteps
    y = fewstep.sample(model, x, plan)
    assert float((y - xd).norm() / xd.norm()) <= 1e-6
    # the schedule built from the betas agrees to diffusers' own float32 rounding
    y2 = fewstep.sample(small_gmm.as_model(fewstep.DiscreteVP.linear(), "eps"), x, "ddim", nfe=n, spacing=spacing)
    assert float((y2 - xd).norm() / xd.norm()) <= 1e-5


def test_ddim_data_and_noise_prediction_agree(small_gmm):
    sched = fewstep.DiscreteVP.linear()
    model = small_gmm.as_model(sched)
    x = torch.randn(4, 8, dtype=torch.float64)
    a = fewstep.sample(model, x, "ddim", nfe=7)
    b = fewstep.sample(model, x, "ddim", nfe=7, prediction="noise")
    assert torch.allclose(a, b, atol=1e-10)


def test_ddim_on_flow_matching_is_euler(small_gmm):
    sched = fewstep.FlowMatching()
    model = small_gmm.as_model(sched, "flow")
    x = torch.randn(4, 8, dtype=torch.float64)
    ts = fewstep.time_grid(sched, 6, "uniform_t")
    y = x.clone()
    for t, tn in zip(ts[:-1], ts[1:]):
        v = model.fn(y, torch.full((4,), t, dtype=torch.float64))
        y = y + (tn - t) * v
    assert torch.allclose(fewstep.sample(model, x, "ddim", nfe=6, spacing="uniform_t"), y, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_any_float_dtype_and_image_shape(dtype):
    sched = fewstep.DiscreteVP.linear()
    model = fewstep.Model(lambda x, t: 0.1 * x, sched, "eps")
    x = torch.randn(2, 3, 4, 4).to(dtype)
    y = fewstep.sample(model, x, "ddim", nfe=4)
    assert y.shape == x.shape and y.dtype == dtype and bool(torch.isfinite(y).all())


def test_nfe_is_exact(small_gmm):
    model = small_gmm.as_model(fewstep.EDM())
    x = 80 * torch.randn(3, 8, dtype=torch.float64)
    _, info = fewstep.sample(model, x, "ddim", nfe=9, return_info=True)
    assert info.nfe == 9 and info.calls == 9 and model.evaluations == 27


def test_callback_sees_every_grid_state(small_gmm):
    model = small_gmm.as_model(fewstep.LinearVP())
    seen = []
    fewstep.sample(model, torch.randn(2, 8, dtype=torch.float64), "ddim", nfe=5, callback=lambda i, t, x: seen.append(i))
    assert seen == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("spacing", ["uniform_t", "quadratic", "uniform_lambda", "karras"])
def test_grids_are_decreasing_and_end_at_clean(spacing, any_schedule):
    if float(any_schedule.alpha(any_schedule.t_max)) == 0.0 and spacing in ("uniform_lambda", "karras"):
        # noise-level spacings leave the pure-noise start the way they reach the clean end
        ts = fewstep.time_grid(any_schedule, 8, spacing, t_start=0.99)
        assert ts[0] == 0.99 and ts[-1] == any_schedule.t_clean and np.all(np.diff(ts) < 0)
    ts = fewstep.time_grid(any_schedule, 8, spacing)
    assert len(ts) == 9 and np.all(np.diff(ts) < 0)
    assert ts[0] == any_schedule.t_max and ts[-1] == any_schedule.t_clean


def test_uniform_lambda_grid_is_uniform_in_lambda():
    s = fewstep.LinearVP()
    ts = fewstep.time_grid(s, 6, "uniform_lambda", t_end=1e-3)
    lam = s.lambda_(torch.as_tensor(ts)).numpy()
    assert np.allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-9)


def test_karras_grid_matches_k_diffusion_formula():
    s = fewstep.EDM()
    ts = fewstep.time_grid(s, 10, "karras")
    ramp = np.linspace(0, 1, 10)
    expect = (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert np.allclose(ts[:-1], expect, rtol=1e-12) and ts[-1] == 0.0


# ---- bad input -------------------------------------------------------------------------------
def test_nfe_below_one_is_rejected(small_gmm):
    model = small_gmm.as_model(fewstep.EDM())
    with pytest.raises(fewstep.SolverError, match="nfe >= 1"):
        fewstep.sample(model, torch.randn(2, 8), "ddim", nfe=0)


def test_unknown_preset_and_spacing_are_named(small_gmm):
    model = small_gmm.as_model(fewstep.EDM())
    with pytest.raises(fewstep.SolverError, match="warp_drive"):
        fewstep.sample(model, torch.randn(2, 8), "warp_drive", nfe=5)
    with pytest.raises(fewstep.ScheduleError, match="zigzag"):
        fewstep.sample(model, torch.randn(2, 8), "ddim", nfe=5, spacing="zigzag")


def test_wrong_sample_shape_is_named(small_gmm):
    model = small_gmm.as_model(fewstep.EDM())
    with pytest.raises(fewstep.ShapeError, match=r"\(batch, 8\)"):
        fewstep.sample(model, torch.randn(2, 5), "ddim", nfe=5)


def test_nan_from_model_stops_sampling_with_clear_error():
    calls = []

    def flaky(x, t):
        calls.append(1)
        return x * (float("nan") if len(calls) == 3 else 0.1)

    model = fewstep.Model(flaky, fewstep.DiscreteVP.linear(), "eps", name="flaky")
    with pytest.raises(fewstep.ModelOutputError, match="flaky.*NaN/Inf.*call 3"):
        fewstep.sample(model, torch.randn(2, 4), "ddim", nfe=5)


def test_nan_in_input_noise_is_rejected(small_gmm):
    model = small_gmm.as_model(fewstep.EDM())
    x = torch.randn(2, 8)
    x[0, 0] = float("inf")
    with pytest.raises(fewstep.ShapeError, match="NaN or Inf"):
        fewstep.sample(model, x, "ddim", nfe=5)


@pytest.mark.parametrize(
    "times", [[999.0, 500.0, 600.0, -1.0], [2000.0, 10.0, -1.0], [999.0, float("nan"), -1.0]]
)
def test_bad_explicit_grids_are_rejected(times):
    sched = fewstep.DiscreteVP.linear()
    with pytest.raises(fewstep.ScheduleError):
        fewstep.time_grid(sched, len(times) - 1, times)


def test_discrete_spacings_reject_continuous_schedules():
    with pytest.raises(fewstep.ScheduleError, match="DiscreteVP"):
        fewstep.time_grid(fewstep.EDM(), 5, "leading")


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow", "score", "edm"])
@pytest.mark.parametrize("solver", ["dpmpp_3m", "unipc", "dpm_solver_3", "heun"])
def test_folded_loop_equals_explicit_predictions(prediction, solver):
    """The loop folds the x0/eps conversion into each step's coefficients; with a (non-affine)
    threshold it forms x0 and eps explicitly. An identity threshold must give the same samples."""
    sched = fewstep.DiscreteVP.linear() if prediction != "edm" else fewstep.EDM()
    g = fewstep.GaussianMixture.random(3, 2, 1, seed=4)
    x_T = fewstep.initial_noise(sched, (5, 3), 1, dtype=torch.float64)
    folded = g.as_model(sched, prediction)
    explicit = g.as_model(sched, prediction)
    explicit.threshold = fewstep.Threshold("static", max_value=1e30)
    a = fewstep.sample(folded, x_T, solver, nfe=9)
    b = fewstep.sample(explicit, x_T, solver, nfe=9)
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_huge_finite_outputs_are_not_mistaken_for_nan():
    """The finiteness check sums the output; an overflowing sum is confirmed element-wise."""
    m = fewstep.Model(lambda x, t: torch.full_like(x, 3e38), fewstep.EDM(), "eps")
    out = m.output(torch.zeros(4, 8), 1.0, 1.0, 1.0)
    assert torch.isfinite(out).all()


def test_compiled_plans_are_reused_only_for_the_same_request():
    sched = fewstep.DiscreteVP.linear()
    g = fewstep.GaussianMixture.random(3, 2, 1, seed=2)
    model = g.as_model(sched)
    x_T = fewstep.initial_noise(sched, (4, 3), 0, dtype=torch.float64)
    _, a = fewstep.sample(model, x_T, "dpmpp_2m", nfe=8, return_info=True)
    _, b = fewstep.sample(model, x_T, "dpmpp_2m", nfe=8, return_info=True)
    assert a.plan is b.plan  # compiled once
    _, c = fewstep.sample(model, x_T, "dpmpp_2m", nfe=8, spacing="karras", return_info=True)
    _, d = fewstep.sample(model, x_T, "dpmpp_2m", nfe=9, return_info=True)
    other = g.as_model(fewstep.DiscreteVP.scaled_linear())
    _, e = fewstep.sample(other, x_T, "dpmpp_2m", nfe=8, return_info=True)
    assert len({id(p.plan) for p in (a, c, d, e)}) == 4
    assert not np.allclose(c.plan.times, a.plan.times) and e.plan.schedule != a.plan.schedule

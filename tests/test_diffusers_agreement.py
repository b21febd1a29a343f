"""fewstep's presets / solver schedules reproduce diffusers' ODE schedulers step for step.

Every test drives a diffusers scheduler with the exact GMM oracle (``model.fn`` = the raw model
output) and runs the fewstep solver schedule that is mathematically the same sampler on the same
noise schedule (``DiscreteVP`` built from diffusers' own ``alphas_cumprod``), the same noise and the
same time steps, then compares the final samples in float64 (relative error in norm, bounds below).
Where no preset has diffusers' exact configuration the test pins it as explicit ``Step`` records.

diffusers keeps its noise levels in float32; the tests recompute the very same numbers in float64
(``sqrt((1 - abar) / abar)`` at the integer timesteps, or diffusers' linear interpolation of it for
the VE schedulers, whose model times are then mapped to fewstep times through
``t(lambda = -log sigma)``), so the comparison measures the solver maths, not rounding. The
DPM-Solver multistep and Euler steps still cast the sample to float32 internally, which bounds
their agreement at a few 1e-7 (``RTOL_F32``); everything else computes in float64 and agrees to
1e-13 (``RTOL_F64``), except DPM-Solver singlestep with noise prediction, whose large steps into
sigma_min cancel (fewstep's own float32 run of [dpmsolver-3-midpoint-6] is off by 5e-5 where
a well-conditioned case is off by 3e-7), so float64 rounding alone reaches ~1e-12 there
(``RTOL_F64_NOISE_SINGLESTEP``). The errors depend on torch's CPU kernels (measured maxima,
AVX2/AVX-512 | ATEN_CPU_CAPABILITY=default: float32 class 3.63e-7 | 3.34e-7, noise singlestep
4.1e-13 | 8.2e-13, all other float64 cases 1.7e-14 | 1.9e-14); run with ``-s`` to see them.

fewstep's time ``t = -1`` is diffusers' final ``sigma = 0`` (``final_sigmas_type="zero"``,
``set_alpha_to_one=True``); ``t = 0`` is ``final_sigmas_type="sigma_min"`` / ``alphas_cumprod[0]``.

Not covered for general data: IPNDM's first step out of alpha = 0, where diffusers takes x0 = 0
instead of the model's x0 (see that test); fewstep follows the model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fewstep
from fewstep import SolverSchedule, Step

diffusers = pytest.importorskip("diffusers")

# diffusers deprecates algorithm_type="dpmsolver" and numpy 2 warns inside its set_timesteps
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

RTOL_F32 = 5e-7  # diffusers casts the sample to float32 (DPMSolverMultistep, Euler)
RTOL_F64 = 1e-13  # both compute in float64
RTOL_F64_NOISE_SINGLESTEP = 2e-12  # float64, ill-conditioned: DPMSolverSinglestep algorithm_type="dpmsolver"
BETAS = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
NFES = [6, 10, 20]


# ---- helpers ---------------------------------------------------------------------------------
def _make(cls, **kw):
    ds = cls(**BETAS, **kw)
    ds.alphas_cumprod = ds.alphas_cumprod.to(torch.float64)
    return ds


def _setup(ds, small_gmm, seed):
    sched = fewstep.DiscreteVP(ds.alphas_cumprod.double())  # the very same numbers diffusers uses
    model = small_gmm.as_model(sched, "eps")
    z = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return sched, model, z


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _exact_vp_sigmas(ds):
    """Replace diffusers' float32 sigmas of an integer-timestep VP scheduler by float64 ones:
    ``sqrt((1 - abar_t) / abar_t)`` at its timesteps, then the final 0 or sigma at t = 0."""
    ac = ds.alphas_cumprod
    ts = ds.timesteps.long()
    assert len(ds.sigmas) == len(ts) + 1
    sig = ((1 - ac[ts]) / ac[ts]).sqrt()
    last = 0.0 if float(ds.sigmas[-1]) == 0.0 else float(((1 - ac[0]) / ac[0]).sqrt())
    new = torch.cat([sig, torch.tensor([last], dtype=torch.float64)])
    assert torch.allclose(ds.sigmas.double(), new, rtol=1e-6)  # the same numbers, just not rounded
    ds.sigmas = new
    return [float(t) for t in ts] + [-1.0 if last == 0.0 else 0.0]


def _drive(ds, model, x, model_times, n_calls=None):
    """The user loop of a diffusers pipeline; the model sees fewstep's time ``model_times[k]``
    on call k (the integer timestep, or the time of diffusers' sigma for the VE schedulers).
    ``n_calls`` stops the loop early."""
    assert len(model_times) == len(ds.timesteps)
    for t, tm in list(zip(ds.timesteps, model_times))[:n_calls]:
        xin = ds.scale_model_input(x, t)
        eps = model.fn(xin, torch.full((x.shape[0],), float(tm), dtype=torch.float64))
        x = ds.step(eps, t, x).prev_sample
    return x


def _check(model, x_fewstep, plan, x_diffusers, n_calls, rtol):
    assert plan.nfe == n_calls  # the same number of model evaluations
    y = fewstep.sample(model, x_fewstep, plan)
    err = _rel(y, x_diffusers)
    print(f"relative error {err:.3g} (bound {rtol:g})")  # shown with -s / -rP
    assert err <= rtol, (err, rtol, plan.describe())
    return err


def _multistep_plan(times, orders, **step):
    return SolverSchedule(times=tuple(times), steps=tuple(Step(order=o, **step) for o in orders))


def _dpm_multistep_orders(n, order, lower_order_final, ends_clean):
    """diffusers DPMSolverMultistep: warm-up i + 1; order 1 on the last step (sigma 0, or
    lower_order_final with < 15 steps) and at most 2 on the one before (lower_order_final, < 15)."""
    lof = lower_order_final and n < 15
    out = []
    for i in range(n):
        o = min(order, i + 1)
        if i == n - 1 and (lof or ends_clean):
            o = 1
        if i == n - 2 and lof:
            o = min(o, 2)
        out.append(o)
    return out


# ---- DPMSolverMultistepScheduler -------------------------------------------------------------
@pytest.mark.parametrize("n", NFES)
@pytest.mark.parametrize(
    "order,solver_type", [(2, "midpoint"), (2, "heun"), (3, "midpoint"), (3, "heun")]
)
def test_dpmpp_multistep(n, order, solver_type, small_gmm):
    ds = _make(diffusers.DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=order,
               solver_type=solver_type, lower_order_final=True, final_sigmas_type="zero")
    sched, model, z = _setup(ds, small_gmm, n)
    ds.set_timesteps(n)
    times = _exact_vp_sigmas(ds)
    xd = _drive(ds, model, z.clone(), times[:-1])
    if order == 2:
        plan = fewstep.preset("dpmpp_2m", n, sched, spacing=times, solver_type=solver_type, final_order=1)
    else:
        plan = fewstep.preset("dpmpp_3m", n, sched, spacing=times, solver_type=solver_type, weights="published", final_order=1)
    assert [s.order for s in plan.steps] == _dpm_multistep_orders(n, order, True, True)
    _check(model, z, plan, xd, len(ds.timesteps), RTOL_F32)


@pytest.mark.parametrize("n", NFES)
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpm_solver_multistep_noise_prediction(n, solver_type, small_gmm):
    """algorithm_type="dpmsolver" (noise prediction, DPM-Solver-2M); it needs final_sigmas_type
    sigma_min, so the sampler ends at t = 0. midpoint = UniPC's bh2 weight, heun = exact phi_2."""
    ds = _make(diffusers.DPMSolverMultistepScheduler, algorithm_type="dpmsolver", solver_order=2,
               solver_type=solver_type, lower_order_final=True, final_sigmas_type="sigma_min")
    sched, model, z = _setup(ds, small_gmm, n)
    ds.set_timesteps(n)
    times = _exact_vp_sigmas(ds)
    assert times[-1] == 0.0
    xd = _drive(ds, model, z.clone(), times[:-1])
    variant = {"midpoint": "bh2", "heun": "phi"}[solver_type]
    plan = _multistep_plan(times, _dpm_multistep_orders(n, 2, True, False), prediction="noise", variant=variant)
    _check(model, z, plan, xd, len(ds.timesteps), RTOL_F32)
    if solver_type == "heun":  # = DEIS with a polynomial in lambda (exact phi weights)
        _check(model, z, fewstep.preset("deis", n, sched, order=2, interp="lambda", spacing=times, final_order=1), xd, n, RTOL_F32)


# ---- DPMSolverSinglestepScheduler ------------------------------------------------------------
def _singlestep_plan(sched, grid, order_list, prediction, solver_type):
    """diffusers' singlestep DPM-Solver evaluates the model on its own grid: a run ``1, 2, .., k``
    of its order list is ONE singlestep step of order k from grid[i] to grid[i + k], whose k - 1
    stages are the grid points in between. fewstep places stages at fractions r of the step in
    lambda, so r is computed from the grid. midpoint: order 2 uses UniPC's bh2 weight; order 3
    reaches its second stage with the bh2 (midpoint) 2nd-order update from nodes {0, r1} and takes
    the final update with exact phi weights through nodes {0, r2} only. heun: exact phi weights
    through all nodes."""
    lam = [float(sched.lambda_(t)) for t in grid]
    runs, i = [], 0
    while i < len(order_list):
        k = 1
        while i + k < len(order_list) and order_list[i + k] == k + 1:
            k += 1
        runs.append((i, k))
        i += k
    times, steps = [grid[0]], []
    for i, k in runs:
        times.append(grid[i + k])
        if k == 1:
            steps.append(Step(order=1, prediction=prediction))
            continue
        h = lam[i + k] - lam[i]
        stages = tuple((lam[i + j] - lam[i]) / h for j in range(1, k))
        kw = {}
        if solver_type == "midpoint":
            kw = dict(variant="bh2") if k == 2 else dict(variant="phi", stage_variant="bh2", final_nodes=(0, 2))
        steps.append(Step(order=k, prediction=prediction, method="singlestep", stages=stages, **kw))
    return SolverSchedule(times=tuple(times), steps=tuple(steps))


@pytest.mark.parametrize("n", NFES)
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "dpmsolver"])
def test_dpm_solver_singlestep(n, order, solver_type, algorithm_type, small_gmm):
    final = "zero" if algorithm_type == "dpmsolver++" else "sigma_min"  # dpmsolver cannot step to sigma 0
    ds = _make(diffusers.DPMSolverSinglestepScheduler, algorithm_type=algorithm_type, solver_order=order,
               solver_type=solver_type, lower_order_final=True, final_sigmas_type=final)
    sched, model, z = _setup(ds, small_gmm, n)
    ds.set_timesteps(n)
    grid = _exact_vp_sigmas(ds)
    xd = _drive(ds, model, z.clone(), grid[:-1])
    prediction = "data" if algorithm_type == "dpmsolver++" else "noise"
    plan = _singlestep_plan(sched, grid, list(ds.order_list), prediction, solver_type)
    assert max(s.order for s in plan.steps) == order
    _check(model, z, plan, xd, len(ds.timesteps), RTOL_F64 if prediction == "data" else RTOL_F64_NOISE_SINGLESTEP)


# ---- UniPCMultistepScheduler -----------------------------------------------------------------
@pytest.mark.parametrize("n", NFES)
@pytest.mark.parametrize("corrector", [True, False])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc(n, variant, order, corrector, small_gmm):
    """UniP-p + UniC-p (p + 1 nodes, re-using the next evaluation). ``disable_corrector`` lists the
    predictor steps whose result is not corrected. diffusers' bh1 cannot step into sigma = 0 (its
    order-1 update computes ``alpha_t * B(h) * 0`` with ``B(h) = -inf``, giving NaN), so bh1 ends at
    sigma_min (t = 0) and bh2 at sigma = 0."""
    final = "sigma_min" if variant == "bh1" else "zero"
    ds = _make(diffusers.UniPCMultistepScheduler, solver_order=order, solver_type=variant, lower_order_final=True,
               final_sigmas_type=final, disable_corrector=[] if corrector else list(range(n)))
    sched, model, z = _setup(ds, small_gmm, n)
    ds.set_timesteps(n)
    times = _exact_vp_sigmas(ds)
    assert times[-1] == (0.0 if final == "sigma_min" else -1.0)
    xd = _drive(ds, model, z.clone(), times[:-1])
    # diffusers' UniPC lowers the order on the last steps whatever the number of steps
    plan = fewstep.preset("unipc", n, sched, order=order, variant=variant, corrector=corrector, lower_order_final=True, spacing=times, final_order=1)
    assert [s.order for s in plan.steps] == [min(order, i + 1, n - i) for i in range(n)]
    _check(model, z, plan, xd, len(ds.timesteps), RTOL_F64)


# ---- DEISMultistepScheduler ------------------------------------------------------------------
@pytest.mark.parametrize("n", NFES)
@pytest.mark.parametrize("order", [2, 3])
def test_deis(n, order, small_gmm):
    """diffusers' DEIS ("logrho"): the eps interpolant is a polynomial in log(sigma/alpha) = -lambda,
    i.e. fewstep's deis with interp="lambda". It ends at sigma_min (t = 0)."""
    ds = _make(diffusers.DEISMultistepScheduler, solver_order=order, lower_order_final=True)
    sched, model, z = _setup(ds, small_gmm, n)
    ds.set_timesteps(n)
    times = _exact_vp_sigmas(ds)
    assert times[-1] == 0.0
    xd = _drive(ds, model, z.clone(), times[:-1])
    plan = fewstep.preset("deis", n, sched, order=order, interp="lambda", spacing=times, final_order=1)
    assert [s.order for s in plan.steps] == _dpm_multistep_orders(n, order, True, False)
    _check(model, z, plan, xd, len(ds.timesteps), RTOL_F64)


# ---- PNDMScheduler (PLMS) --------------------------------------------------------------------
@pytest.mark.parametrize("n", NFES)
@pytest.mark.parametrize("set_alpha_to_one,steps_offset", [(False, 1), (True, 0)])
def test_plms(n, set_alpha_to_one, steps_offset, small_gmm):
    """PNDM with skip_prk_steps: n steps on the leading grid for n + 1 model evaluations (a
    trapezoidal first step, then Adams-Bashforth 2, 3, 4 on eps with fixed weights, each plugged into
    the DDIM update). The last step goes to alphas_cumprod[0] (t = 0, Stable Diffusion's setting with
    steps_offset = 1) or, with set_alpha_to_one, to the clean point, still with Adams-Bashforth weights."""
    ds = _make(diffusers.PNDMScheduler, skip_prk_steps=True, set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset)
    ds.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if set_alpha_to_one else ds.alphas_cumprod[0]
    sched, model, z = _setup(ds, small_gmm, n)
    ds.set_timesteps(n)
    xd = _drive(ds, model, z.clone(), [float(t) for t in ds.timesteps])
    t_end = -1.0 if set_alpha_to_one else 0.0
    leading = list(fewstep.time_grid(sched, n, "leading", steps_offset=steps_offset)[:-1])  # ends at t_clean
    plan = fewstep.preset("pndm", n + 1, sched, spacing="leading", steps_offset=steps_offset, t_end=t_end)
    # Adams-Bashforth weights stay finite into sigma = 0, so the last step keeps its order, as in diffusers
    assert list(plan.times) == leading + [t_end] and plan.steps[-1].order == min(4, n)
    assert leading == sorted({float(t) for t in ds.timesteps}, reverse=True)
    _check(model, z, plan, xd, len(ds.timesteps), RTOL_F64)


# ---- Euler / Heun / LMS: the VE variable x / alpha -------------------------------------------
def _ve_setup(ds, small_gmm, n):
    """diffusers' VE schedulers interpolate sigma linearly between integer timesteps (``linspace``
    timesteps are not integers) and keep the result in float32. Recompute those very numbers in
    float64 and map each to the fewstep time with the same noise level, ``t(lambda = -log sigma)``;
    the model is called at that time. diffusers' x_T = init_noise_sigma * z in the VE variable is
    fewstep's x_T = alpha_T * (init_noise_sigma * z); at sigma = 0 (alpha = 1) they coincide."""
    sched, model, z = _setup(ds, small_gmm, n)
    ds.set_timesteps(n)
    ac = ds.alphas_cumprod.numpy()
    table = np.sqrt((1 - ac) / ac)
    sig = torch.from_numpy(np.interp(ds.timesteps.double().numpy(), np.arange(len(table)), table))
    sig = torch.cat([sig, torch.zeros(1, dtype=torch.float64)])
    assert len(ds.sigmas) == len(sig) and torch.allclose(ds.sigmas.double(), sig, rtol=1e-6)
    ds.sigmas = sig

    def t_of(s):
        return -1.0 if float(s) == 0.0 else float(sched.t_of_lambda(-math.log(float(s))))

    model_times = [t_of(s) for s in sig[:-1]]
    grid = [t_of(s) for s in torch.unique_consecutive(sig)]
    x_ve = ds.init_noise_sigma * z
    x_fewstep = float(sched.alpha(grid[0])) * x_ve
    assert abs(float(sched.sigma(grid[0]) / sched.alpha(grid[0])) / float(sig[0]) - 1) < 1e-12
    return sched, model, x_ve, x_fewstep, model_times, grid


@pytest.mark.parametrize("n", NFES)
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_euler(n, spacing, small_gmm):
    ds = _make(diffusers.EulerDiscreteScheduler, timestep_spacing=spacing)
    sched, model, x_ve, x_fs, model_times, grid = _ve_setup(ds, small_gmm, n)
    xd = _drive(ds, model, x_ve, model_times)
    _check(model, x_fs, fewstep.preset("euler", n, sched, spacing=grid), xd, len(ds.timesteps), RTOL_F32)


@pytest.mark.parametrize("n", NFES)
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_heun(n, spacing, small_gmm):
    """n grid steps = n - 1 Heun steps + a last Euler step into sigma = 0: 2n - 1 evaluations."""
    ds = _make(diffusers.HeunDiscreteScheduler, timestep_spacing=spacing)
    sched, model, x_ve, x_fs, model_times, grid = _ve_setup(ds, small_gmm, n)
    xd = _drive(ds, model, x_ve, model_times)
    assert len(grid) == n + 1 and len(ds.timesteps) == 2 * n - 1
    _check(model, x_fs, fewstep.preset("heun", 2 * n - 1, sched, spacing=grid), xd, len(ds.timesteps), RTOL_F64)


@pytest.mark.parametrize("n", NFES)
@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_lms(n, spacing, small_gmm):
    """LMS: Adams-Bashforth with real step sizes on eps as a polynomial in sigma (order 4 after a
    warm-up) = fewstep's lms (interp "flat"), including the last step into sigma = 0 at full order
    (flat-kernel weights stay finite there)."""
    ds = _make(diffusers.LMSDiscreteScheduler, timestep_spacing=spacing)
    sched, model, x_ve, x_fs, model_times, grid = _ve_setup(ds, small_gmm, n)
    xd = _drive(ds, model, x_ve, model_times)
    plan = fewstep.preset("lms", n, sched, spacing=grid)
    assert [s.order for s in plan.steps] == [min(4, i + 1) for i in range(n)]
    _check(model, x_fs, plan, xd, n, RTOL_F64)


# ---- IPNDMScheduler --------------------------------------------------------------------------
@pytest.mark.parametrize("n", NFES)
def test_ipndm_multistep_part(n, small_gmm):
    """diffusers' IPNDM ignores the model's noise schedule: it hard-codes alpha = cos(pi t / 2),
    sigma = sin(pi t / 2) on t in [0, 1] (fewstep's CosineVP(s=0, t_max=1)), a grid with
    sigma_k = sin^2(pi s_k / 2) for s uniform in [1, 0], and a v-prediction model (it forms
    eps = sigma x + alpha v). Its steps are DDIM updates with Adams-Bashforth 1..4 combinations of eps
    at fixed weights (fewstep: noise prediction, variant "adams", uniform_nodes), up to and including
    the last step into sigma = 0. Its first step leaves alpha = 0 with x0 taken as 0 (the
    ``max(alpha, 1e-8)`` division of ``x - sigma * eps = 0``), whereas fewstep's first-order data step
    uses the model's x0 = E[x0] there: the two agree only for zero-mean data, which this test uses
    (the mixture mirrored through the origin) to pin everything else. fewstep's ``ipndm`` preset
    leaves alpha = 0 with that data step and keeps Adams weights on the last step."""
    g = small_gmm
    w = g.log_weights.exp()
    sym = fewstep.GaussianMixture(torch.cat([w, w]), torch.cat([g.means, -g.means]), torch.cat([g.diag, g.diag]),
                                  torch.cat([g.factors, g.factors]))
    sched = fewstep.CosineVP(s=0.0, t_max=1.0)
    model = sym.as_model(sched, "v")
    ds = diffusers.IPNDMScheduler()
    ds.set_timesteps(n)
    s = torch.linspace(1, 0, n + 1, dtype=torch.float64)  # diffusers' numbers, in float64
    ds.betas = torch.sin(s * math.pi / 2) ** 2
    ds.alphas = (1 - ds.betas**2) ** 0.5
    ts = (torch.atan2(ds.betas, ds.alphas) * 2 / math.pi)[:-1]
    assert torch.allclose(ds.timesteps.double(), ts, atol=1e-6)
    ds.timesteps = ts
    z = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    times = [float(t) for t in ts] + [sched.t_clean]
    xd = _drive(ds, model, z.clone(), times[:-1])
    steps = [Step(order=1, prediction="data")]
    steps += [Step(order=min(4, i + 1), prediction="noise", variant="adams", uniform_nodes=True) for i in range(1, n)]
    plan = fewstep.preset("ipndm", n, sched, spacing=times)
    assert plan.steps == tuple(steps)
    _check(model, z, plan, xd, n, RTOL_F64)

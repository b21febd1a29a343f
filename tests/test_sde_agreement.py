"""fewstep's stochastic presets reproduce diffusers' stochastic schedulers step for step, on the same noise.

The set-up is ``test_diffusers_agreement.py``'s (whose helpers are imported): the exact GMM oracle,
``DiscreteVP`` built from diffusers' own ``alphas_cumprod``, diffusers' float32 noise levels
recomputed in float64, diffusers' own time steps passed to the preset as ``spacing=`` (plus the final
time: ``t = -1`` is sigma = 0, ``t = 0`` is ``alphas_cumprod[0]``), final samples compared in float64
(relative error in norm).

The same noise: every diffusers step k draws ``draws[k]`` (its module's ``randn_tensor`` patched,
``variance_noise=`` for DPMSolverMultistep / DDIM, the ``noise_sampler`` of DPMSolverSDE), and
fewstep's noise source :class:`ReplayNoise` hands out the draw of the *interval* it is asked for
(from grid point k to k + 1 in log-SNR, or the stage interval of a singlestep method), so a step
whose noise term is zero (diffusers still draws on the last step into sigma = 0, and on SA-Solver's
steps with tau = 0) cannot shift the alignment, and SA-Solver's corrector gets its predictor's noise.
The draws are float32 numbers (diffusers casts DPMSolverMultistep's noise to float32) held in float64.

Each comparison also runs fewstep once more with one step's noise redrawn and requires that run to
be far off (relative error > ``SENSITIVE``), so no test passes without the noise actually matching,
and checks which steps asked for noise on both sides.

Bounds: diffusers computes DDPM, DDIM, DPMSolverSDE and SA-Solver in float64 here (``RTOL_F64``);
EulerAncestral and DPMSolverMultistep cast the sample to float32 inside ``step()`` (``RTOL_F32``,
``RTOL_F32_3M`` for order 3). Measured maxima (AVX-512 | ``ATEN_CPU_CAPABILITY=default``): float64
6.3e-15 | 7.5e-15; float32, EulerAncestral and 2M SDE 6.6e-7 | 5.7e-7 (dpmpp_2m_sde midpoint, NFE
10); 3M SDE 1.65e-6 | 1.42e-6 (NFE 10). The stochastic runs amplify the float32 rounding more than
the ODE tests do: fewstep's own float32 run of that 3M case is 3.4e-6 from its float64 run, and over
8 other noise seeds and NFE 4-25 the maxima were 1.3e-6 (EulerAncestral, 2M SDE) and 4.6e-6 (3M
SDE). Run with ``-s`` to see every error. All bounds are well inside the required 1e-5; a step's
noise redrawn moves the sample by 0.12 or more.

DDPM with ``"trailing"`` spacing: the last step (t > 0 into sigma = 0) has variance 0, which
diffusers clamps to 1e-20 before the square root, so its sample carries ``1e-10 * z_last``; the test
adds that term to fewstep's sample before comparing.

Disagreements found (pinned as strict xfails):

* ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3)``: in
  ``multistep_dpm_solver_third_order_update`` the D2 weight is ``alpha_t * ((1 - e^(-2h) - 2h) /
  (2h)^2 - 0.5)``; the published (k-diffusion ``sample_dpmpp_3m_sde``) weight with rate 2 is
  ``alpha_t * (0.5 - (e^(-2h) - 1 + 2h) / (2h)^2)`` = diffusers' + ``alpha_t``: the constant 0.5 has
  the wrong sign, so diffusers adds ``-alpha_t * D2`` with D2 = O(h^2) each step (first order globally). With that
  term restored (monkeypatched) diffusers agrees with ``dpmpp_3m_sde(weights="published")`` to float32
  rounding (``test_dpmpp_3m_sde_published``).
* ``SASolverScheduler(corrector_order=1)`` still corrects (``stochastic_adams_moulton_update`` of
  order 1 through the new evaluation only), while fewstep's ``sa_solver(corrector_order=1)`` means no
  corrector; it equals diffusers with the corrector suppressed (``test_sa_solver_predictor_only``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fewstep

diffusers = pytest.importorskip("diffusers")

from test_diffusers_agreement import _dpm_multistep_orders, _exact_vp_sigmas, _make, _rel, _setup, _ve_setup  # noqa: E402

# diffusers' deprecations and numpy 2's warnings inside its set_timesteps
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

RTOL_F64 = 1e-13  # both sides compute in float64
RTOL_F32 = 2e-6  # diffusers casts the sample to float32 (EulerAncestral, DPMSolverMultistep)
RTOL_F32_3M = 5e-6  # the same, order 3 (amplifies the rounding most)
SENSITIVE = 1e-2  # fewstep with one step's noise redrawn must be at least this far off
NFES = [6, 10, 20]


# ---- the same noise on both sides ------------------------------------------------------------
def _draws(count, shape, seed):
    g = torch.Generator().manual_seed(10_000 + seed)
    return [torch.randn(shape, generator=g, dtype=torch.float32).double() for _ in range(count)]


def _close(a, b):
    return a == b or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


class ReplayNoise:
    """A fewstep noise source that hands out the draw stored for the interval ``(lam_from, lam_to)``
    asked for, whatever the order or number of calls; ``calls`` records the keys served."""

    def __init__(self, entries):
        self.entries = list(entries)  # (lam_from, lam_to, key, draw)
        self.calls: list = []

    @classmethod
    def on_grid(cls, sched, grid, draws):
        """Step k, from ``grid[k]`` to ``grid[k + 1]``, gets ``draws[k]`` (key k)."""
        lam = [float(sched.lambda_(float(t))) for t in grid]
        return cls((lam[k], lam[k + 1], k, draws[k]) for k in range(len(grid) - 1))

    def lookup(self, lam_from, lam_to):
        hits = [(key, z) for lf, lt, key, z in self.entries if _close(lf, lam_from) and _close(lt, lam_to)]
        assert len(hits) == 1, f"no (or several) stored noise for the interval {lam_from} -> {lam_to}"
        return hits[0]

    def replaced(self, key, z):
        return ReplayNoise((lf, lt, k, z if k == key else d) for lf, lt, k, d in self.entries)

    def increment(self, lam_from, lam_to, shape, *, indices=None, dtype=torch.float32, device=None):
        key, z = self.lookup(float(lam_from), float(lam_to))
        assert tuple(z.shape) == tuple(shape) and indices is None
        self.calls.append(key)
        return z.to(dtype=dtype, device=device)


class CorrectorGetsOtherNoise(ReplayNoise):
    """Serves fresh noise when an interval is asked for a second time (SA-Solver's corrector)."""

    def increment(self, lam_from, lam_to, shape, **kw):
        key, _ = self.lookup(float(lam_from), float(lam_to))
        z = super().increment(lam_from, lam_to, shape, **kw)
        if self.calls.count(key) > 1:
            z = torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(z.dtype)
        return z


class DiffusersNoise:
    """Stands in for a scheduler module's ``randn_tensor``: a draw during step k is ``draws[k]``."""

    def __init__(self, draws):
        self.draws, self.step, self.taken = draws, None, []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert self.step is not None and self.step not in self.taken, "one draw per step"
        self.taken.append(self.step)
        z = self.draws[self.step]
        assert tuple(z.shape) == tuple(shape)
        return z.to(dtype=dtype or torch.float32)


def _drive(ds, model, x, model_times, noise, *, variance_noise=False, before_step=None, **step_kw):
    """A diffusers pipeline's loop; step k's noise is ``noise.draws[k]`` (patched ``randn_tensor``,
    or passed as ``variance_noise``). ``before_step(ds)`` runs before each ``step()``."""
    assert len(model_times) == len(ds.timesteps)
    for k, (t, tm) in enumerate(zip(ds.timesteps, model_times)):
        xin = ds.scale_model_input(x, t)
        out = model.fn(xin, torch.full((x.shape[0],), float(tm), dtype=torch.float64))
        noise.step = k
        if before_step is not None:
            before_step(ds)
        kw = dict(step_kw)
        if variance_noise:
            kw["variance_noise"] = noise.draws[k]
            noise.taken.append(k)
        x = ds.step(out, t, x, **kw).prev_sample
    return x


def _check(model, x_T, plan, src, x_diffusers, n_calls, rtol, *, offset=0.0):
    """fewstep with noise ``src`` agrees with diffusers; with one step's noise redrawn it does not."""
    assert plan.nfe == n_calls
    y = fewstep.sample(model, x_T, plan, noise=src) + offset
    err = _rel(y, x_diffusers)
    assert src.calls, "the plan drew no noise"
    key = src.calls[len(src.calls) // 2]
    other = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y_other = fewstep.sample(model, x_T, plan, noise=src.replaced(key, other)) + offset
    err_other = _rel(y_other, x_diffusers)
    print(f"relative error {err:.3g} (bound {rtol:g}); step {key}'s noise redrawn: {err_other:.3g}")  # -s / -rP
    assert err <= rtol, (err, rtol, plan.describe())
    assert err_other > SENSITIVE, (err_other, key)
    return err


# ---- DDPMScheduler / DDIMScheduler(eta) ------------------------------------------------------
@pytest.mark.parametrize("n", NFES)
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddpm(n, spacing, small_gmm, monkeypatch):
    """DDPM ancestral sampling, variance fixed_small, over the skipped steps' posterior. "leading"
    ends at t = 0 (its last step, into sigma = 0, draws nothing); "trailing" ends at t > 0 and draws
    on its last step too, times sqrt(clamp(0, 1e-20)) = 1e-10."""
    ds = _make(diffusers.DDPMScheduler, variance_type="fixed_small", clip_sample=False, timestep_spacing=spacing)
    sched, model, z = _setup(ds, small_gmm, n)
    ds.set_timesteps(n)
    grid = [float(t) for t in ds.timesteps] + [-1.0]
    draws = _draws(n, z.shape, n)
    rn = DiffusersNoise(draws)
    monkeypatch.setattr("diffusers.schedulers.scheduling_ddpm.randn_tensor", rn)
    xd = _drive(ds, model, z.clone(), grid[:-1], rn)
    assert rn.taken == list(range(n if spacing == "trailing" else n - 1))
    plan = fewstep.preset("ddpm", n, sched, spacing=grid)
    src = ReplayNoise.on_grid(sched, grid, draws)
    offset = 1e-10 * draws[n - 1] if spacing == "trailing" else 0.0
    _check(model, z, plan, src, xd, n, RTOL_F64, offset=offset)
    assert src.calls == list(range(n - 1))  # nothing drawn into sigma = 0


@pytest.mark.parametrize("n", NFES)
@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("set_alpha_to_one,steps_offset", [(True, 0), (False, 1)])
def test_ddim_eta(n, eta, set_alpha_to_one, steps_offset, small_gmm):
    """DDIM with eta > 0 on its leading grid, ending at sigma = 0 or (Stable Diffusion's setting) at
    alphas_cumprod[0], where the last step draws noise too."""
    ds = _make(diffusers.DDIMScheduler, clip_sample=False, set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset)
    ds.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if set_alpha_to_one else ds.alphas_cumprod[0]
    sched, model, z = _setup(ds, small_gmm, n)
    ds.set_timesteps(n)
    grid = [float(t) for t in ds.timesteps] + [-1.0 if set_alpha_to_one else 0.0]
    draws = _draws(n, z.shape, n)
    rn = DiffusersNoise(draws)
    xd = _drive(ds, model, z.clone(), grid[:-1], rn, variance_noise=True, eta=eta)
    plan = fewstep.preset("ddim", n, sched, spacing=grid, eta=eta)
    src = ReplayNoise.on_grid(sched, grid, draws)
    _check(model, z, plan, src, xd, n, RTOL_F64)
    assert src.calls == list(range(n - 1 if set_alpha_to_one else n))


# ---- EulerAncestralDiscreteScheduler ---------------------------------------------------------
@pytest.mark.parametrize("n", NFES)
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_euler_ancestral(n, spacing, small_gmm, monkeypatch):
    """Euler to sigma_down, then sigma_up of fresh noise, in the VE variable (the Euler ODE test's
    mapping of diffusers' interpolated sigmas to fewstep times); diffusers draws on every step,
    the last one (sigma_up = 0) included."""
    ds = _make(diffusers.EulerAncestralDiscreteScheduler, timestep_spacing=spacing)
    sched, model, x_ve, x_fs, model_times, grid = _ve_setup(ds, small_gmm, n)
    assert len(grid) == n + 1
    draws = _draws(n, x_ve.shape, n)
    rn = DiffusersNoise(draws)
    monkeypatch.setattr("diffusers.schedulers.scheduling_euler_ancestral_discrete.randn_tensor", rn)
    xd = _drive(ds, model, x_ve, model_times, rn)
    assert rn.taken == list(range(n))
    plan = fewstep.preset("euler_ancestral", n, sched, spacing=grid)
    src = ReplayNoise.on_grid(sched, grid, draws)
    _check(model, x_fs, plan, src, xd, n, RTOL_F32)
    assert src.calls == list(range(n - 1))


# ---- DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++") ---------------------------
def _drive_dpm_sde(n, small_gmm, **config):
    """diffusers' DPMSolverMultistep ``sde-dpmsolver++`` (``lower_order_final``) on the oracle with the
    stored draws: ``(sched, model, z, grid, draws, x_diffusers)``."""
    ds = _make(diffusers.DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++", lower_order_final=True, **config)
    sched, model, z = _setup(ds, small_gmm, n)
    ds.set_timesteps(n)
    grid = _exact_vp_sigmas(ds)
    draws = _draws(n, z.shape, n)
    xd = _drive(ds, model, z.clone(), grid[:-1], DiffusersNoise(draws), variance_noise=True)
    return sched, model, z, grid, draws, xd


@pytest.mark.parametrize("n", NFES)
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_dpmpp_2m_sde(n, solver_type, final, small_gmm):
    """DPM-Solver++(2M) SDE; to sigma = 0 the last step is x0 (order 1, its noise term 0), to
    sigma_min (t = 0) it is stochastic, of order 1 below 15 steps (lower_order_final)."""
    sched, model, z, grid, draws, xd = _drive_dpm_sde(n, small_gmm, solver_order=2, solver_type=solver_type, final_sigmas_type=final)
    plan = fewstep.preset("dpmpp_2m_sde", n, sched, spacing=grid, solver_type=solver_type)
    assert [s.order for s in plan.steps] == _dpm_multistep_orders(n, 2, True, final == "zero")
    src = ReplayNoise.on_grid(sched, grid, draws)
    _check(model, z, plan, src, xd, n, RTOL_F32)
    assert src.calls == list(range(n - 1 if final == "zero" else n))


def _restore_published_d2(monkeypatch):
    """Add ``alpha_t * D2`` to diffusers' sde-dpmsolver++ third-order update: its D2 weight
    ``(1 - e^(-2h) - 2h)/(2h)^2 - 0.5`` becomes the published ``0.5 - (e^(-2h) - 1 + 2h)/(2h)^2``."""
    cls = diffusers.DPMSolverMultistepScheduler
    original = cls.multistep_dpm_solver_third_order_update

    def fixed(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        x_t = original(self, model_output_list, *args, sample=sample, noise=noise, **kwargs)
        i = self.step_index
        alpha_t = None
        lam = []
        for s in (self.sigmas[i + 1], self.sigmas[i], self.sigmas[i - 1], self.sigmas[i - 2]):
            a, sg = self._sigma_to_alpha_sigma_t(s)
            alpha_t = a if alpha_t is None else alpha_t
            lam.append(torch.log(a) - torch.log(sg))
        h, h_0, h_1 = lam[0] - lam[1], lam[1] - lam[2], lam[2] - lam[3]
        r0, r1 = h_0 / h, h_1 / h
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        d2 = ((m0 - m1) / r0 - (m1 - m2) / r1) / (r0 + r1)
        return x_t + alpha_t * d2

    monkeypatch.setattr(cls, "multistep_dpm_solver_third_order_update", fixed)


def _dpmpp_3m_sde_case(n, small_gmm):
    sched, model, z, grid, draws, xd = _drive_dpm_sde(n, small_gmm, solver_order=3, solver_type="heun", final_sigmas_type="zero")
    # the order-2 warm-up uses exact phi weights (diffusers' solver_type="heun")
    plan = fewstep.preset("dpmpp_3m_sde", n, sched, spacing=grid, weights="published")
    assert [s.order for s in plan.steps] == _dpm_multistep_orders(n, 3, True, True)
    _check(model, z, plan, ReplayNoise.on_grid(sched, grid, draws), xd, n, RTOL_F32_3M)


@pytest.mark.parametrize("n", NFES)
def test_dpmpp_3m_sde_published(n, small_gmm, monkeypatch):
    """DPM-Solver++(3M) SDE = diffusers' sde-dpmsolver++ of order 3 once its D2 weight is corrected."""
    _restore_published_d2(monkeypatch)
    _dpmpp_3m_sde_case(n, small_gmm)


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="diffusers' sde-dpmsolver++ third-order update weights D2 by alpha_t*((1-e^(-2h)-2h)/(2h)^2 - 0.5): "
                          "the 0.5 has the wrong sign (published/k-diffusion: + 0.5), an extra -alpha_t*D2 per step")
@pytest.mark.parametrize("n", NFES)
def test_dpmpp_3m_sde_diffusers_as_shipped(n, small_gmm):
    _dpmpp_3m_sde_case(n, small_gmm)


# ---- DPMSolverSDEScheduler (k-diffusion's DPM++ SDE) -----------------------------------------
@pytest.mark.parametrize("n", NFES)
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_dpmpp_sde(n, spacing, small_gmm):
    """Singlestep DPM-Solver++ SDE, r = 1/2 in log-SNR: an ancestral stage to the midpoint with the
    noise of [s, s_mid], then an ancestral step from s with the midpoint's x0 and the noise of [s, t];
    the last step is Euler into sigma = 0. diffusers' ``noise_sampler`` (a Brownian tree) is replaced
    by the stored draws of those intervals; the model is called at the fewstep time of each sigma."""
    ds = _make(diffusers.DPMSolverSDEScheduler, timestep_spacing=spacing)
    sched, model, z = _setup(ds, small_gmm, n)
    ds.set_timesteps(n)
    ac = ds.alphas_cumprod.numpy()
    table = np.sqrt((1 - ac) / ac)
    sig = torch.from_numpy(np.interp(ds.timesteps[0::2].double().numpy(), np.arange(len(table)), table))
    assert len(sig) == n
    full = torch.cat([sig[:1], sig[1:].repeat_interleave(2), torch.zeros(1, dtype=torch.float64)])
    assert len(ds.sigmas) == len(full) and torch.allclose(ds.sigmas.double(), full, rtol=1e-6)
    ds.sigmas = full  # diffusers' float32 numbers in float64

    def t_of(s):
        return -1.0 if float(s) == 0.0 else float(sched.t_of_lambda(-math.log(float(s))))

    grid = [t_of(s) for s in sig] + [-1.0]
    lam = [float(sched.lambda_(t)) for t in grid]
    mid = [math.exp(-0.5 * (lam[k] + lam[k + 1])) for k in range(n - 1)]  # sigma at the stage
    model_times = [grid[0]]
    for k in range(n - 1):
        model_times += [t_of(mid[k]), grid[k + 1]]
    assert len(model_times) == len(ds.timesteps) == 2 * n - 1
    draws = _draws(2 * n - 2, z.shape, n)  # step k: the stage's draw 2k, the whole step's 2k + 1
    entries = [(lam[k], 0.5 * (lam[k] + lam[k + 1]), 2 * k, draws[2 * k]) for k in range(n - 1)]
    entries += [(lam[k], lam[k + 1], 2 * k + 1, draws[2 * k + 1]) for k in range(n - 1)]
    src = ReplayNoise(entries)
    taken = []

    def noise_sampler(sigma_from, sigma_to):
        key, z_ = src.lookup(-math.log(float(sigma_from)), -math.log(float(sigma_to)))
        taken.append(key)
        return z_

    x_ve = ds.init_noise_sigma * z
    x = x_ve
    ds.noise_sampler = noise_sampler
    for t, tm in zip(ds.timesteps, model_times):
        xin = ds.scale_model_input(x, t)
        out = model.fn(xin, torch.full((x.shape[0],), float(tm), dtype=torch.float64))
        x = ds.step(out, t, x).prev_sample
    assert taken == list(range(2 * n - 2))
    plan = fewstep.preset("dpmpp_sde", 2 * n - 1, sched, spacing=grid)
    assert [s.order for s in plan.steps] == [2] * (n - 1) + [1]
    _check(model, float(sched.alpha(grid[0])) * x_ve, plan, src, x, 2 * n - 1, RTOL_F64)
    assert sorted(src.calls) == list(range(2 * n - 2))


# ---- SASolverScheduler -----------------------------------------------------------------------
def _sa_case(n, p, c, small_gmm, monkeypatch, *, tau=None, window=None, diffusers_corrects=True):
    kw = {} if tau is None else dict(tau_func=lambda t: tau if window[0] <= t <= window[1] else 0)
    ds = _make(diffusers.SASolverScheduler, predictor_order=p, corrector_order=c, algorithm_type="data_prediction",
               lower_order_final=True, **kw)
    sched, model, z = _setup(ds, small_gmm, n)
    ds.set_timesteps(n)
    grid = _exact_vp_sigmas(ds)
    assert grid[-1] == 0.0  # diffusers' SA-Solver ends at alphas_cumprod[0]
    draws = _draws(n, z.shape, n)
    rn = DiffusersNoise(draws)
    monkeypatch.setattr("diffusers.schedulers.scheduling_sasolver.randn_tensor", rn)
    # diffusers corrects whenever it has a last sample: forgetting it leaves the predictor alone
    no_corrector = None if diffusers_corrects else (lambda s: setattr(s, "last_sample", None))
    xd = _drive(ds, model, z.clone(), grid[:-1], rn, before_step=no_corrector)
    assert rn.taken == list(range(n))  # a draw on every step, tau = 0 or not
    opts = {} if tau is None else dict(tau=tau, tau_window=window)
    plan = fewstep.preset("sa_solver", n, sched, spacing=grid, order=p, corrector_order=c, **opts)
    src = ReplayNoise.on_grid(sched, grid, draws)
    _check(model, z, plan, src, xd, n, RTOL_F64)
    lo, hi = window or (200, 800)
    noisy = [k for k in range(n) if lo <= grid[k] <= hi]
    corrected = c >= 2
    # the predictor of step k, then its corrector (after the next evaluation) on the same interval
    assert src.calls == [k for k in noisy for _ in range(2 if corrected and k < n - 1 else 1)]
    return model, z, plan, sched, grid, draws, xd


@pytest.mark.parametrize("n", NFES)
@pytest.mark.parametrize("p,c", [(2, 2), (3, 3), (1, 2), (3, 2), (2, 3)])
def test_sa_solver(n, p, c, small_gmm, monkeypatch):
    """SA-Solver, data prediction, default tau_func (tau = 1 for timesteps 200..800, inclusive);
    predictor order p, corrector through c nodes, lower orders at the start and the end."""
    model, z, plan, sched, grid, draws, xd = _sa_case(n, p, c, small_gmm, monkeypatch)
    if (p, c) == (2, 2):  # the corrector must re-use its predictor's noise
        y = fewstep.sample(model, z, plan, noise=CorrectorGetsOtherNoise.on_grid(sched, grid, draws))
        assert _rel(y, xd) > SENSITIVE


@pytest.mark.parametrize("n", NFES)
def test_sa_solver_tau(n, small_gmm, monkeypatch):
    """A custom tau_func = tau inside a window of model times = fewstep's tau / tau_window."""
    _sa_case(n, 2, 2, small_gmm, monkeypatch, tau=0.6, window=(300, 900))


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="diffusers' corrector_order=1 still corrects (a 1-node Adams-Moulton step through the new "
                          "evaluation); fewstep's sa_solver(corrector_order=1) has no corrector")
@pytest.mark.parametrize("n", NFES)
def test_sa_solver_corrector_order_1(n, small_gmm, monkeypatch):
    _sa_case(n, 2, 1, small_gmm, monkeypatch)


@pytest.mark.parametrize("n", NFES)
@pytest.mark.parametrize("p", [1, 2, 3])
def test_sa_solver_predictor_only(n, p, small_gmm, monkeypatch):
    """fewstep's corrector_order=1 (no corrector) = diffusers' SA-Solver with its corrector suppressed."""
    _sa_case(n, p, 1, small_gmm, monkeypatch, diffusers_corrects=False)

"""Parallel-in-time sampling (fewstep.parallel): the fixed point is the sequential run.

Properties, per preset family (multistep, singlestep, UniC corrector, stochastic, EDM churn) on the
float64 oracle: window 1 and tolerance 0 reproduce the sequential samples (to rounding); at the
default tolerance they match within a bound tied to the tolerance; the iteration ends within
``M + 1`` rounds; the accelerated scheme needs no more rounds than plain Picard here; a warm start
from a nearby problem needs fewer rounds; ``parallel_solve`` does the same for a recurrence that is
not a sampler.
"""

from __future__ import annotations

import math

import pytest
import torch

import fewstep
from fewstep import ParallelOptions, parallel_solve
from fewstep.errors import ArgumentError, ShapeError, SolverError

FAMILIES = [
    ("ddim", 30, {}),
    ("dpmpp_2m", 20, {}),
    ("unipc", 15, {}),  # multistep + UniC corrector
    ("dpmpp_3m", 15, {}),
    ("dpm_solver_3", 15, {}),  # singlestep stages
    ("heun", 15, {}),
    ("deis", 12, {}),
    ("dpmpp_2m_sde", 20, {}),  # stochastic multistep
    ("dpmpp_sde", 16, {}),  # stochastic singlestep stages (correlated Brownian increments)
    ("sa_solver", 15, {}),  # stochastic predictor-corrector
    ("ddpm", 30, {}),
    ("edm_sde", 15, {"s_churn": 10.0}),  # churn channel
]


@pytest.fixture(scope="module")
def oracle():
    g = fewstep.GaussianMixture.random(4, 4, 2, seed=2)
    model = g.as_model(fewstep.DiscreteVP.linear(), "eps")
    x = fewstep.initial_noise(model.schedule, (16, 4), 0, dtype=torch.float64)
    return model, x


#: the grid the round counts below were measured on (the default grid moves with the default rule;
#: these tests are about the parallel iteration, not the grid)
GRID = {"spacing": "logistic", "logistic_center": 0.0, "logistic_scale": 1.4}


def _run(model, x, name, nfe, kw, **par):
    out, info = fewstep.sample(model, x, name, nfe=nfe, seed=4, parallel=ParallelOptions(**par), return_info=True, **kw)
    return out, info.extra["parallel"]


@pytest.mark.parametrize("name,nfe,kw", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_window_one_and_tolerance_zero_are_the_sequential_run(name, nfe, kw, oracle):
    model, x = oracle
    seq = fewstep.sample(model, x, name, nfe=nfe, seed=4, **kw)
    one, info = _run(model, x, name, nfe, kw, window=1)
    assert torch.equal(one, seq) and info.rounds == info.sequential_evaluations == info.evaluations
    for accelerate in fewstep.parallel.ACCELERATIONS:
        exact, info = _run(model, x, name, nfe, kw, tol=0.0, accelerate=accelerate)
        assert torch.allclose(exact, seq, rtol=0, atol=1e-12), (name, accelerate, float((exact - seq).abs().max()))
        assert info.rounds <= info.sequential_evaluations + 1


@pytest.mark.parametrize("name,nfe,kw", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_default_tolerance_matches_the_sequential_run(name, nfe, kw, oracle):
    """At the default tolerance (each evaluation's input settled to ``tol * sigma`` RMS) and 3x the
    NFE above (where rounds accept many steps) the samples are within ``tol / 2`` RMS of the
    sequential ones (data of scale ~1; measured 6.5e-6..2.1e-5 with the secant replay, 8e-6..1.6e-4 with
    Anderson; accepting at 50x the tolerance gives
    7e-4..1e-2). (Few large steps gain few rounds, stochastic ones least: the benchmark measures it.)"""
    model, x = oracle
    nfe *= 3
    seq = fewstep.sample(model, x, name, nfe=nfe, seed=4, **kw)
    par, info = _run(model, x, name, nfe, kw)
    tol = ParallelOptions().tol
    assert fewstep.rmse(par, seq) < tol / 2, (name, fewstep.rmse(par, seq))
    assert info.converged and info.rounds <= info.sequential_evaluations + 1
    assert info.evaluations == sum(b - a for a, b in info.windows) and len(info.residuals) == info.rounds


def test_acceleration_and_window_trade_rounds_for_evaluations(oracle):
    """On 100-step DDIM: Anderson needs fewer rounds than Picard; a smaller window costs more rounds
    but fewer model evaluations; micro-batches change nothing but the number of calls."""
    model, x = oracle
    _, picard = _run(model, x, "ddim", 100, {}, accelerate="picard")
    _, taa = _run(model, x, "ddim", 100, {}, accelerate="taa")
    assert taa.rounds < picard.rounds < 100
    _, narrow = _run(model, x, "ddim", 100, {}, window=8)
    assert narrow.rounds > taa.rounds and narrow.evaluations < taa.evaluations
    full, info = _run(model, x, "ddim", 40, {})
    split, info_split = _run(model, x, "ddim", 40, {}, max_batch=24)
    assert torch.allclose(full, split, rtol=0, atol=1e-12) and info_split.model_calls > info.model_calls


@pytest.mark.parametrize("name", ["ddim", "unipc", "dpmpp_2m_sde"])
def test_secant_replay_needs_fewer_rounds_and_keeps_the_fixed_point(name, oracle):
    """The secant quasi-Newton replay (each model Jacobian replaced by a per-sample secant slope)
    needs fewer rounds than Anderson and Picard on 100 steps and lands as close to the sequential
    samples; with a thresholded model (outputs as an (x0, eps) pair, each component its own slope)
    too, and tolerance 0 is still the sequential run."""
    model, x = oracle
    seq = fewstep.sample(model, x, name, nfe=100, seed=4, **GRID)
    rounds = {}
    for accelerate in fewstep.parallel.ACCELERATIONS:
        out, info = _run(model, x, name, 100, GRID, accelerate=accelerate)
        rounds[accelerate] = info.rounds
        assert fewstep.rmse(out, seq) < ParallelOptions().tol / 2, (accelerate, fewstep.rmse(out, seq))
    assert rounds["secant"] < rounds["taa"] < rounds["picard"], rounds
    # the first window from the unit-variance Gaussian trajectory: no more rounds than holding outputs,
    # and tolerance 0 still gives the sequential samples
    out, held = _run(model, x, name, 100, GRID, first_window="held")
    assert rounds["secant"] <= held.rounds and fewstep.rmse(out, seq) < ParallelOptions().tol / 2, (rounds, held.rounds)
    exact, _ = _run(model, x, name, 100, GRID, tol=0.0, first_window="held")
    assert torch.allclose(exact, seq, rtol=0, atol=1e-12)
    clipped = fewstep.Model(model.fn, model.schedule, "eps", threshold=fewstep.Threshold("static", 3.0))
    seq = fewstep.sample(clipped, x, name, nfe=40, seed=4, **GRID)
    exact, _ = fewstep.sample(clipped, x, name, nfe=40, seed=4, **GRID, parallel=ParallelOptions(tol=0.0, accelerate="secant"), return_info=True)
    assert torch.allclose(exact, seq, rtol=0, atol=1e-12)
    _, sec = fewstep.sample(clipped, x, name, nfe=40, seed=4, **GRID, parallel=ParallelOptions(accelerate="secant"), return_info=True)
    _, pic = fewstep.sample(clipped, x, name, nfe=40, seed=4, **GRID, parallel=ParallelOptions(accelerate="picard"), return_info=True)
    assert sec.extra["parallel"].rounds < pic.extra["parallel"].rounds


def test_stochastic_parallel_draws_the_sequential_noise_for_any_shard(oracle):
    model, x = oracle
    full, _ = _run(model, x, "dpmpp_2m_sde", 20, {}, tol=0.0)
    rows = [3, 4, 11]
    part, _ = fewstep.sample(model, x[rows], "dpmpp_2m_sde", nfe=20, seed=4, sample_indices=rows,
                             parallel=ParallelOptions(tol=0.0), return_info=True)
    assert torch.allclose(part, full[rows], rtol=0, atol=1e-12)


def test_warm_start_from_a_nearby_problem_needs_fewer_rounds(oracle):
    model, x = oracle
    _, first = _run(model, x, "dpmpp_2m", 40, GRID, record=True)
    assert first.inputs is not None and len(first.inputs) == 40
    _, same = fewstep.sample(model, x, "dpmpp_2m", nfe=40, **GRID, parallel=ParallelOptions(), warm_start=first, return_info=True)
    # the same problem: every recorded input is already settled, one round per window (the secant
    # replay may take one more: its first slopes are the prior, not the recorded run's secants)
    assert math.ceil(40 / ParallelOptions().window) <= same.extra["parallel"].rounds <= math.ceil(40 / ParallelOptions().window) + 1
    _, same = fewstep.sample(model, x, "dpmpp_2m", nfe=40, **GRID, parallel=ParallelOptions(accelerate="taa"),
                             warm_start=_run(model, x, "dpmpp_2m", 40, GRID, record=True, accelerate="taa")[1], return_info=True)
    assert same.extra["parallel"].rounds == math.ceil(40 / ParallelOptions().window)
    # the tolerance is tol * sigma at every evaluation: on this multimodal oracle a 1e-6 change of x_T
    # moves late inputs by ~1e-2 sigma, so "nearby" is that close here
    nearby = x + 1e-6 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    cold_out, cold = _run(model, nearby, "dpmpp_2m", 40, GRID)
    warm_out, info = fewstep.sample(model, nearby, "dpmpp_2m", nfe=40, **GRID, parallel=ParallelOptions(), warm_start=first, return_info=True)
    warm = info.extra["parallel"]
    assert warm.rounds < 0.6 * cold.rounds, (warm.rounds, cold.rounds)
    seq = fewstep.sample(model, nearby, "dpmpp_2m", nfe=40, **GRID)
    assert fewstep.rmse(warm_out, seq) < 10 * ParallelOptions().tol


def test_parallel_solve_on_a_recurrence_that_is_not_a_sampler():
    """A damped nonlinear pendulum by explicit Euler, 200 steps, 5 initial conditions; steps are
    evaluated in batches (K steps at once)."""
    h = 0.05

    def step(x, steps):  # x: (K, B, 2) = (angle, velocity); steps: (K,)
        th, om = x[..., 0], x[..., 1]
        forcing = 0.3 * torch.cos(0.1 * steps.to(x.dtype))[:, None]
        return torch.stack([th + h * om, om + h * (-torch.sin(th) - 0.2 * om + forcing)], -1)

    x0 = torch.tensor([[1.0, 0.0], [2.0, 0.5], [-1.0, 1.0], [0.1, -0.2], [3.0, 0.0]], dtype=torch.float64)
    seq = x0
    for i in range(200):
        seq = step(seq[None], torch.tensor([i]))[0]
    exact, info = parallel_solve(step, x0, 200, tol=0.0)
    assert torch.allclose(exact, seq, rtol=0, atol=1e-12) and info.rounds <= 201
    one, info1 = parallel_solve(step, x0, 200, window=1)
    assert torch.allclose(one, seq, rtol=0, atol=1e-13) and info1.rounds == 200
    rounds = {}
    for accelerate in fewstep.parallel.ACCELERATIONS:
        approx, info = parallel_solve(step, x0, 200, tol=1e-6, accelerate=accelerate, window=64)
        assert float((approx - seq).abs().max()) < 1e-4 and info.rounds < 200, (accelerate, info.rounds)
        rounds[accelerate] = info.rounds
    # a scalar slope cannot hold the pendulum's rotation-like Jacobian: no gain, and no loss
    assert rounds["secant"] <= rounds["picard"], rounds


def test_parallel_refuses_bad_settings(oracle, tmp_path):
    model, x = oracle
    for bad in (dict(window=0), dict(tol=-1.0), dict(tol=math.nan), dict(accelerate="newton"), dict(history=0), dict(max_batch=0),
                dict(first_window="zeros")):
        with pytest.raises(ArgumentError):
            ParallelOptions(**bad)
    with pytest.raises(ArgumentError, match="callback"):
        fewstep.sample(model, x, "ddim", nfe=10, parallel=True, callback=lambda *a: None)
    with pytest.raises(ArgumentError, match="record=True"):
        _, info = _run(model, x, "ddim", 10, {})
        fewstep.sample(model, x, "ddim", nfe=10, parallel=True, warm_start=info)
    _, info = _run(model, x, "ddim", 10, {}, record=True)
    assert len(info.inputs) == 10 and info.inputs[0].shape == x.shape
    with pytest.raises(ShapeError):
        fewstep.sample(model, x, "ddim", nfe=12, parallel=True, warm_start=info)
    with pytest.raises(ArgumentError, match="parallel"):
        fewstep.sample(model, x, "ddim", nfe=10, warm_start=info)
    with pytest.raises(SolverError, match="did not converge"):
        _run(model, x, "ddim", 30, {}, max_rounds=3)

    def nan_model(xx, tt):
        out = torch.zeros_like(xx)
        out[tt < 500] = math.nan
        return out

    bad_model = fewstep.Model(nan_model, fewstep.DiscreteVP.linear(), "eps")
    with pytest.raises(fewstep.ModelOutputError):
        fewstep.sample(bad_model, x, "ddim", nfe=10, parallel=True)
    with pytest.raises(ShapeError):
        parallel_solve(lambda xx, s: xx[:, :1], torch.zeros(3, 2), 5)


@pytest.mark.parametrize("name,nfe", [("ddim", 50), ("dpmpp_2m_sde", 30)])
def test_default_tolerance_on_a_bundled_network(name, nfe):
    """digits-vp-eps (float32 network): parallel samples within ``tol / 2`` RMS (model space, data of
    scale ~1) of the sequential ones, in fewer rounds than steps for DDIM."""
    model = fewstep.zoo.load("digits-vp-eps")
    x = fewstep.initial_noise(model.schedule, (8, *model.sample_shape), 0)
    seq = fewstep.sample(model, x, name, nfe=nfe, seed=2)
    par, info = fewstep.sample(model, x, name, nfe=nfe, seed=2, parallel=True, return_info=True)
    p = info.extra["parallel"]
    assert fewstep.rmse(par, seq) < ParallelOptions().tol / 2, fewstep.rmse(par, seq)
    assert p.rounds < nfe if name == "ddim" else p.rounds <= nfe + 1


def test_micro_batches_are_whole_evaluations_so_per_row_conditioning_lines_up():
    """A model that conditions row r of a call on sample r % B (per-sample prompts or class labels,
    repeated k times for k evaluations, as the diffusers direct path does): with max_batch cutting a
    window at no multiple of the batch, every call still holds whole evaluations, and parallel ==
    sequential."""
    schedule = fewstep.DiscreteVP.linear()
    labels = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)  # one per sample of the batch
    rows_seen = []

    def fn(x, t):
        rows_seen.append(x.shape[0])
        assert x.shape[0] % labels.shape[0] == 0, f"a call of {x.shape[0]} rows splits an evaluation of {labels.shape[0]}"
        cond = labels.repeat(x.shape[0] // labels.shape[0])[:, None]
        return 0.3 * x + 0.1 * cond * torch.tanh(x) * (t[:, None] / 1000.0)

    model = fewstep.Model(fn, schedule, "eps")
    x = fewstep.initial_noise(schedule, (3, 4), 0, dtype=torch.float64)
    seq = fewstep.sample(model, x, "dpmpp_2m", nfe=12)
    rows_seen.clear()
    par = fewstep.sample(model, x, "dpmpp_2m", nfe=12, parallel=ParallelOptions(window=6, max_batch=7, tol=0.0))
    assert max(rows_seen) == 6 and fewstep.rmse(par, seq) < 1e-10
    rows_seen.clear()
    par = fewstep.sample(model, x, "dpmpp_2m", nfe=12, parallel=ParallelOptions(window=6, max_batch=2, tol=0.0))  # < one evaluation
    assert set(rows_seen) == {3} and fewstep.rmse(par, seq) < 1e-10

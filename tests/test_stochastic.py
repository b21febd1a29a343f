"""Stochastic samplers: the Brownian noise they draw, reproducibility, strong convergence, marginals."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import fewstep
from fewstep import SolverError, SolverSchedule, Step
from fewstep.noise import BrownianNoise, IntervalNoise, brownian_time

SDE_PRESETS = ["ddpm", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_sde", "sa_solver", "er_sde", "ddim:eta=0.5", "lcm", "edm_sde:s_churn=20"]
#: not a fixed SDE discretised ever finer: LCM re-noises fully; EDM's churn per step is s_churn / N
NOT_CONVERGENT = ("lcm", "edm_sde:s_churn=20")
DIST_N = 3000  # samples per run
#: NFE where the ancestral updates (first order, and EDM's churn) reach the exact-sample level; 100 for the rest
DIST_HIGH = {"ddpm": 400, "euler_ancestral": 400, "edm_sde": 400}


def _preset(spec: str) -> tuple[str, dict]:
    name, _, opts = spec.partition(":")
    kw = {k: float(v) for k, v in (o.split("=") for o in opts.split(",") if o)}
    return name, kw


# ---- the Brownian path ----------------------------------------------------------------------------
def test_path_values_do_not_depend_on_the_order_of_the_queries():
    """Node normals are kept between queries (a point reuses its neighbour's chain); the value at a
    point is the same sum whatever was asked before (parallel sampling asks in another order)."""
    us = [0.91, 0.5004, 0.2, 0.37, 0.049, 0.9101]
    a, b = BrownianNoise(8), BrownianNoise(8)
    first = {u: a.value(u, (3, 5)) for u in us}
    second = {u: b.value(u, (3, 5)) for u in reversed(us)}
    assert all(torch.equal(first[u], second[u]) for u in us)
    assert torch.equal(first[0.2], BrownianNoise(8).value(0.2, (3, 5)))


def test_increments_are_standard_normal_and_independent_over_disjoint_steps():
    bn = BrownianNoise(3)
    lams = [-4.0, -1.0, 0.5, 2.0, 6.0]
    z = torch.stack([bn.increment(a, b, (4000, 8), dtype=torch.float64).flatten() for a, b in zip(lams, lams[1:])])
    n = z.shape[1]
    assert torch.allclose(z.mean(1), torch.zeros(4, dtype=torch.float64), atol=4.5 / math.sqrt(n))
    assert torch.allclose(z.var(1), torch.ones(4, dtype=torch.float64), atol=4.5 * math.sqrt(2.0 / n))
    assert torch.allclose((z**4).mean(1), torch.full((4,), 3.0, dtype=torch.float64), atol=4.5 * math.sqrt(96.0 / n))
    corr = torch.corrcoef(z)
    assert (corr - torch.eye(4, dtype=torch.float64)).abs().max() < 4.5 / math.sqrt(n)


def test_a_finer_grid_refines_the_same_path():
    """The increment over a step is exactly the sum of the increments over its sub-steps (any
    subdivision), and overlapping intervals correlate as Brownian motion does."""
    bn = BrownianNoise(11)
    shape = (50, 6)
    coarse = bn.increment(-3.0, 1.0, shape, dtype=torch.float64) * math.sqrt(brownian_time(-3.0) - brownian_time(1.0))
    cuts = [-3.0, -2.2, -0.37, 0.2, 1.0]
    fine = sum(BrownianNoise(11).increment(a, b, shape, dtype=torch.float64) * math.sqrt(brownian_time(a) - brownian_time(b))
               for a, b in zip(cuts, cuts[1:]))
    assert torch.allclose(coarse, fine, atol=1e-13)
    # overlapping: corr(z[s, r], z[s, t]) = sqrt(du_r / du_t)
    big = (20000, 4)
    z_half = bn.increment(0.0, 1.0, big, dtype=torch.float64).flatten()
    z_full = bn.increment(0.0, 3.0, big, dtype=torch.float64).flatten()
    expect = math.sqrt((brownian_time(0.0) - brownian_time(1.0)) / (brownian_time(0.0) - brownian_time(3.0)))
    assert abs(float(torch.corrcoef(torch.stack([z_half, z_full]))[0, 1]) - expect) < 4.5 / math.sqrt(z_half.numel())


@pytest.mark.parametrize("source", [BrownianNoise, IntervalNoise])
def test_noise_of_a_sample_does_not_depend_on_its_batch(source):
    full = source(7).increment(-1.0, 0.5, (64, 3, 5))
    for idx in ([0], [5, 1, 63, 2, 30, 17, 9], list(range(64))[::-1]):
        part = source(7).increment(-1.0, 0.5, (len(idx), 3, 5), indices=idx)
        assert torch.equal(part, full[idx])
    assert not torch.equal(full, source(8).increment(-1.0, 0.5, (64, 3, 5)))


def test_steps_finer_than_the_tree_are_refused_with_the_fix():
    with pytest.raises(SolverError, match=r"depth=(\d+)") as info:
        BrownianNoise(0, depth=14).increment(0.1, 0.1 + 1e-5, (2, 2))
    depth = int(re.search(r"depth=(\d+)", str(info.value)).group(1))
    BrownianNoise(0, depth=depth).increment(0.1, 0.1 + 1e-5, (2, 2))  # the suggested tree resolves it


# ---- samplers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vp_model():
    g = fewstep.GaussianMixture.random(3, 4, 1, seed=1)
    return g.as_model(fewstep.DiscreteVP.linear(), "eps")


@pytest.mark.parametrize("spec", SDE_PRESETS)
def test_same_seed_same_samples_at_any_batch_size_or_split(spec, vp_model):
    name, kw = _preset(spec)
    x = fewstep.initial_noise(vp_model.schedule, (64, 3), 0, dtype=torch.float64)
    full = fewstep.sample(vp_model, x, name, nfe=8, seed=5, **kw)
    for rows in ([9], list(range(7)), list(range(32, 64))):
        part = fewstep.sample(vp_model, x[rows], name, nfe=8, seed=5, sample_indices=rows, **kw)
        assert torch.allclose(part, full[rows], rtol=0, atol=1e-12), spec
    assert not torch.allclose(full, fewstep.sample(vp_model, x, name, nfe=8, seed=6, **kw))


STRONG_ORDER = 1.0  # additive noise through Brownian increments: strong order 1 (Kloeden & Platen 10.2)


@pytest.mark.parametrize("spec", [s for s in SDE_PRESETS if s not in NOT_CONVERGENT])
def test_strong_convergence_against_a_fine_solve_of_the_same_path(spec):
    """The RMS distance to the same preset on a 16x finer grid driven by the same Brownian path falls
    at least at the stated strong order (fitted slope > order - 0.3; multistep ones are faster
    pre-asymptotically); with noise keyed per interval (no Brownian consistency) it does not fall at
    all. The target is one Gaussian with a low-rank factor: on a multimodal mixture a few paths
    that switch modes dominate the RMS and the fitted slope moved by +-0.5 between Brownian seeds
    (measured 0.2-1.8 locally); here it moves by < 0.1 (ancestral 0.97, DPM-Solver++ SDE 0.87-0.93 at
    NFE 64-256, the multistep and SA-Solver ones 1.3-1.6)."""
    g = fewstep.GaussianMixture(torch.tensor([1.0]), torch.tensor([[0.8, -0.5, 0.2]]), torch.tensor([[0.3, 0.1, 0.5]]),
                                factors=0.3 * torch.ones(1, 3, 1, dtype=torch.float64))
    sched = fewstep.LinearVP()
    model = g.as_model(sched)
    name, kw = _preset(spec)
    if name == "sa_solver":
        kw["tau_window"] = (0.0, 1.0)
    t_end = float(sched.t_of_lambda(torch.tensor(2.0, dtype=torch.float64)))  # stop at sigma/alpha = e^-2
    kw.update(spacing="uniform_lambda", t_end=t_end)
    x = fewstep.initial_noise(sched, (128, 3), 0, dtype=torch.float64)
    nfes = [16, 32, 64] if name != "dpmpp_sde" else [64, 128, 256]
    ref = fewstep.sample(model, x, name, nfe=16 * nfes[-1], seed=3, **kw)
    errs = [float((fewstep.sample(model, x, name, nfe=n, seed=3, **kw) - ref).pow(2).sum(1).mean().sqrt()) for n in nfes]
    slope = -np.polyfit(np.log(nfes), np.log(errs), 1)[0]
    assert slope > STRONG_ORDER - 0.3, (spec, errs, slope)
    unrelated = [float((fewstep.sample(model, x, name, nfe=n, seed=3, noise=IntervalNoise(3), **kw)
                        - fewstep.sample(model, x, name, nfe=16 * nfes[-1], seed=3, noise=IntervalNoise(3), **kw)).pow(2).sum(1).mean().sqrt())
                 for n in nfes[::2]]
    assert unrelated[-1] > 0.5 * unrelated[0], (spec, unrelated)


@pytest.mark.parametrize("spec", ["ddpm", "dpmpp_2m_sde", "sa_solver", "er_sde", "edm_sde"])
def test_samples_have_the_true_moments_at_high_nfe(spec):
    """Sampling a Gaussian (one-component mixture) at high NFE the SDE presets' samples have its mean and
    (diagonal) covariance within the sampling error of 4,000 exact samples (5 standard errors)."""
    g = fewstep.GaussianMixture(torch.tensor([1.0]), torch.tensor([[0.8, -0.5]]), torch.tensor([[0.3, 0.1]]))
    sched = fewstep.DiscreteVP.linear()
    model = g.as_model(sched, "eps")
    name, kw = _preset(spec)
    n = 4000
    x = fewstep.initial_noise(sched, (n, 2), 0, dtype=torch.float64)
    y = fewstep.sample(model, x, name, nfe=DIST_HIGH.get(name, 100), seed=1, **kw)  # EDM's churn: 400
    mean, var = torch.tensor([0.8, -0.5], dtype=torch.float64), torch.tensor([0.3, 0.1], dtype=torch.float64)
    assert ((y.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all(), (spec, y.mean(0))
    assert ((y.var(0) - var).abs() < 5 * var * math.sqrt(2.0 / n)).all(), (spec, y.var(0), var)


# ---- the distribution they sample -------------------------------------------------------------------


@pytest.fixture(scope="module")
def dist_target():
    """A 4-d mixture of 4 components on the DDPM linear schedule; E[log p] and its standard deviation
    from 200,000 exact samples, one exact set of ``DIST_N`` for the Fréchet distance, and the Fréchet
    distance of 6 further exact sets to it (the floor of a perfect sampler at this sample size)."""
    g = fewstep.GaussianMixture.random(4, 4, 2, seed=2)
    big = g.sample(200_000, seed=5)
    lp = g.log_prob(big)
    exact = big[:DIST_N]
    floor = [fewstep.metrics.frechet_distance(g.sample(DIST_N, seed=50 + j), exact) for j in range(6)]
    return g, float(lp.mean()), float(lp.std()) / math.sqrt(DIST_N), exact, max(floor)


@pytest.mark.parametrize("spec", [s for s in SDE_PRESETS if s not in NOT_CONVERGENT] + ["edm_sde"])
def test_distribution_reaches_the_exact_sample_level(spec, dist_target):
    """At NFE 5 each SDE preset's samples are visibly off the true distribution (Fréchet distance
    above 1.5x the largest of 6 exact sets', or a likelihood gap beyond 4 standard errors); at high
    NFE both are within those bounds (what exact samples give), and both errors shrank."""
    g, mean_logp, se, exact, floor = dist_target
    model = g.as_model(fewstep.DiscreteVP.linear(), "eps")
    name, kw = _preset(spec)
    x = fewstep.initial_noise(model.schedule, (DIST_N, 4), 0, dtype=torch.float64)
    fd_tol, gap_tol = 1.5 * floor, 4.0 * se
    errs = {}
    for nfe in (5, DIST_HIGH.get(name, 100)):
        y = fewstep.sample(model, x, name, nfe=nfe, seed=1, **kw)
        errs[nfe] = (fewstep.metrics.frechet_distance(y, exact), mean_logp - float(g.log_prob(y).mean()))
    (fd_lo, gap_lo), (fd_hi, gap_hi) = errs.values()
    assert fd_lo > fd_tol or abs(gap_lo) > gap_tol, (spec, errs, fd_tol, gap_tol)
    assert fd_hi < fd_tol and abs(gap_hi) < gap_tol, (spec, errs, fd_tol, gap_tol)
    assert fd_hi < fd_lo and abs(gap_hi) < abs(gap_lo), (spec, errs)


def test_eta_zero_is_the_ode():
    g = fewstep.GaussianMixture.random(3, 4, 1, seed=1)
    model = g.as_model(fewstep.DiscreteVP.linear(), "eps")
    x = fewstep.initial_noise(model.schedule, (5, 3), 0, dtype=torch.float64)
    assert torch.allclose(fewstep.sample(model, x, "dpmpp_2m_sde", nfe=10, eta=0.0), fewstep.sample(model, x, "dpmpp_2m", nfe=10, final_order=1), atol=1e-12)
    assert torch.allclose(fewstep.sample(model, x, "ddpm", nfe=10, eta=0.0), fewstep.sample(model, x, "ddim", nfe=10), atol=1e-12)
    assert not fewstep.preset("er_sde", 10, model.schedule, eta=0.0).stochastic


def test_stochastic_records_round_trip_and_old_files_load(tmp_path):
    plan = fewstep.preset("sa_solver", 8, fewstep.DiscreteVP.linear())
    assert plan.stochastic and {s.noise for s in plan.steps} >= {"sde"}
    path = plan.save(tmp_path / "sa.json")
    assert SolverSchedule.load(path) == plan
    old = {"format": "fewstep.solver_schedule", "version": 1, "times": [999.0, 500.0, -1.0],
           "steps": [{"renoise": 1.0}, {"renoise": 0.0}]}
    loaded = SolverSchedule.from_dict(old)
    assert loaded.steps[0] == Step(noise="renoise", eta=1.0) and loaded.steps[1] == Step()


# ---- on an accelerator: no host read per step ------------------------------------------------------
@pytest.mark.parametrize("source", [BrownianNoise, IntervalNoise])
def test_noise_reads_nothing_back_from_the_device(source):
    """The sample indices are keyed on the host (their content when they are host data, the tensor
    object at its version when they live on the device): on ``meta``, where any host read raises,
    every kind of indices works, and an in-place edit of device indices is seen."""
    src = source(5)
    shape = (3, 4)
    for indices in (None, [4, 7, 9], (4, 7, 9), torch.tensor([4, 7, 9]), torch.tensor([4, 7, 9], device="meta")):
        for lam in (-2.0, 0.0, 2.0):
            z = src.increment(lam, lam - 1.0, shape, indices=indices, device="meta")
            assert z.device.type == "meta" and z.shape == shape
    dev_idx = torch.tensor([1, 2, 3], device="meta")
    key, _ = src._rows.get(3, dev_idx, torch.device("meta"))
    assert src._rows.get(3, dev_idx, torch.device("meta"))[0] == key  # unchanged: the same key, no new copy
    dev_idx.add_(1)
    assert src._rows.get(3, dev_idx, torch.device("meta"))[0] != key  # edited in place: other rows


@pytest.mark.parametrize("source", [BrownianNoise, IntervalNoise])
def test_host_indices_are_keyed_by_content(source):
    shape = (3, 5)
    src = source(2)
    lst = [4, 7, 9]
    a = src.increment(1.0, 0.0, shape, indices=lst)
    assert torch.equal(a, source(2).increment(1.0, 0.0, shape, indices=torch.tensor(lst)))
    lst[1] = 8  # the same list object, edited: the noise of the new rows
    b = src.increment(1.0, 0.0, shape, indices=lst)
    assert torch.equal(b, source(2).increment(1.0, 0.0, shape, indices=[4, 8, 9])) and torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    t = torch.tensor([4, 7, 9])
    c = src.increment(1.0, 0.0, shape, indices=t)
    t[1] = 8  # a CPU tensor edited in place
    assert torch.equal(src.increment(1.0, 0.0, shape, indices=t), b) and torch.equal(c, a)
    assert torch.equal(source(2).increment(1.0, 0.0, shape), source(2).increment(1.0, 0.0, shape, indices=range(3)))

import math

import pytest
import torch

import fewstep


def _autograd_eps(g, x, a, s):
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(g.log_prob_t(xr, a, s).sum(), xr)
    return -s * grad


@pytest.mark.parametrize("rank", [0, 3])
def test_closed_form_eps_equals_minus_sigma_score_by_autograd(any_schedule, rank):
    g = fewstep.GaussianMixture.random(6, 3, rank, seed=rank)
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for frac in (0.02, 0.3, 0.7, 0.97):
        t = any_schedule.t_min + frac * (any_schedule.t_max - any_schedule.t_min)
        a, s = float(any_schedule.alpha(t)), float(any_schedule.sigma(t))
        x_t = a * g.sample(5, seed=2) + s * x
        eps = g.posterior(x_t, a, s).eps
        ref = _autograd_eps(g, x_t, a, s)
        assert float((eps - ref).norm() / ref.norm()) <= 1e-8


def test_full_covariance_fast_path_matches_autograd():
    g = fewstep.GaussianMixture.from_covariances(
        torch.tensor([0.3, 0.7]), torch.randn(2, 5, dtype=torch.float64),
        torch.stack([torch.eye(5) + 0.5 * torch.ones(5, 5), 2 * torch.eye(5)]).double(),
    )
    assert g._iso_basis is not None
    x = torch.randn(4, 5, dtype=torch.float64)
    eps = g.posterior(x, 0.6, 0.8).eps
    assert float((eps - _autograd_eps(g, x, 0.6, 0.8)).norm() / eps.norm()) <= 1e-8


def test_posterior_is_consistent_with_forward_process(small_gmm):
    x = torch.randn(7, 8, dtype=torch.float64)
    x0, eps = small_gmm.posterior(x, 0.3, 0.9)
    assert torch.allclose(0.3 * x0 + 0.9 * eps, x, atol=1e-12)


def test_exact_density_is_normalised_in_1d():
    g = fewstep.GaussianMixture(torch.tensor([1.0, 2.0]), torch.tensor([[-1.0], [2.0]]), torch.tensor([[0.3], [0.5]]))
    grid = torch.linspace(-8, 10, 20001, dtype=torch.float64)[:, None]
    dens = g.log_prob(grid).exp()
    assert float(torch.trapezoid(dens, grid[:, 0])) == pytest.approx(1.0, abs=1e-8)


def test_exact_sampling_matches_moments(small_gmm):
    x = small_gmm.sample(200_000, seed=5)
    assert torch.allclose(x.mean(0), small_gmm.mean(), atol=0.02)
    assert torch.allclose(torch.cov(x.T), small_gmm.covariance(), atol=0.03)


def test_low_noise_x0_tends_to_x(small_gmm):
    x = small_gmm.sample(6, seed=1)
    x0 = small_gmm.posterior(x, 1.0, 1e-5).x0
    assert float((x0 - x).abs().max()) < 1e-7


def test_digits_fit_is_a_real_density():
    pytest.importorskip("sklearn")
    g = fewstep.bundled_oracle("digits-gmm")
    from sklearn.datasets import load_digits

    data = torch.as_tensor(load_digits().data / 8.0 - 1.0)
    assert g.dim == 64
    assert math.isfinite(float(g.log_prob(data).mean()))
    # samples from the fitted mixture look like the data in mean and spread
    s = g.sample(4000, seed=0)
    assert float((s.mean(0) - data.mean(0)).abs().max()) < 0.1


def test_oracle_rejects_wrong_dimension(small_gmm):
    with pytest.raises(fewstep.ShapeError, match="dimension 8"):
        small_gmm.posterior(torch.randn(3, 5, dtype=torch.float64), 0.5, 0.5)


def test_frechet_distance_of_gaussians_matches_closed_form():
    # 1-D Gaussians: FD = (m1 - m2)^2 + (s1 - s2)^2
    g = torch.Generator().manual_seed(0)
    a = 1.0 + 2.0 * torch.randn(400_000, 1, generator=g, dtype=torch.float64)
    b = -0.5 + 0.5 * torch.randn(400_000, 1, generator=g, dtype=torch.float64)
    assert fewstep.frechet_distance(a, b) == pytest.approx(1.5**2 + 1.5**2, rel=1e-2)
    assert fewstep.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_likelihood_gap_is_zero_for_exact_samples_and_positive_for_noise(small_gmm):
    true = small_gmm.sample(20_000, seed=1)
    same = small_gmm.sample(20_000, seed=2)
    assert abs(fewstep.likelihood_gap(small_gmm, same, true)) < 0.1
    assert fewstep.likelihood_gap(small_gmm, same + 0.5 * torch.randn_like(same), true) > 1.0

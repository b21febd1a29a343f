import math

import pytest
import torch

import fewstep
from fewstep.schedules import schedule_from_config


def _lambda_range(s):
    t = torch.linspace(s.t_min, s.t_max, 4001, dtype=torch.float64)
    lam = s.lambda_(t)
    lam = lam[torch.isfinite(lam)]
    return float(lam.min()), float(lam.max()), t, lam


def test_lambda_round_trip(any_schedule):
    lo, hi, _, _ = _lambda_range(any_schedule)
    lam = torch.linspace(lo, hi, 5001, dtype=torch.float64)
    back = any_schedule.lambda_(any_schedule.t_of_lambda(lam))
    assert float((back - lam).abs().max()) <= 1e-10


def test_time_round_trip(any_schedule):
    _, _, t, _ = _lambda_range(any_schedule)
    t = t[1:-1]
    back = any_schedule.t_of_lambda(any_schedule.lambda_(t))
    assert float((back - t).abs().max()) <= 1e-9 * max(1.0, abs(any_schedule.t_max))


def test_lambda_strictly_decreasing(any_schedule):
    _, _, _, lam = _lambda_range(any_schedule)
    assert bool((lam[1:] < lam[:-1]).all())


def test_clean_time_has_zero_sigma(any_schedule):
    assert float(any_schedule.sigma(any_schedule.t_clean)) == pytest.approx(0.0, abs=1e-12)
    assert float(any_schedule.lambda_(any_schedule.t_clean)) == math.inf


@pytest.mark.parametrize("name", ["discrete-linear", "discrete-cosine", "linear-vp", "cosine-vp"])
def test_vp_preserves_variance(name):
    from conftest import ALL_SCHEDULES

    s = ALL_SCHEDULES[name]()
    t = torch.linspace(s.t_min, s.t_max, 997, dtype=torch.float64)
    assert float((s.alpha(t) ** 2 + s.sigma(t) ** 2 - 1).abs().max()) <= 1e-12


def test_flow_matching_definition():
    s = fewstep.FlowMatching()
    t = torch.rand(100, dtype=torch.float64) * 0.98 + 0.01
    assert torch.allclose(s.alpha(t), 1 - t, atol=0, rtol=1e-15)
    assert torch.allclose(s.sigma(t), t, atol=0, rtol=1e-15)
    assert torch.allclose(s.lambda_(t), torch.log((1 - t) / t), rtol=1e-13)


def test_edm_definition():
    s = fewstep.EDM()
    t = torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64)
    assert torch.equal(s.alpha(t), torch.ones(3, dtype=torch.float64))
    assert torch.equal(s.sigma(t), t)


def test_discrete_matches_alphas_cumprod_and_diffusers_betas():
    s = fewstep.DiscreteVP.linear(1e-4, 0.02, 1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0)
    n = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(s.alpha(n) ** 2, ac, rtol=1e-12, atol=0)
    # scaled-linear is linear in sqrt(beta)
    sl = fewstep.DiscreteVP.scaled_linear(0.00085, 0.012, 1000)
    b2 = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(sl.alpha(n) ** 2, torch.cumprod(1 - b2, 0), rtol=1e-12, atol=0)


def test_discrete_continuous_t_interpolates_log_alpha():
    s = fewstep.DiscreteVP.linear()
    la = torch.log(s.alpha(torch.tensor([10.0, 11.0], dtype=torch.float64)))
    mid = torch.log(s.alpha(torch.tensor(10.25, dtype=torch.float64)))
    assert float(mid) == pytest.approx(float(0.75 * la[0] + 0.25 * la[1]), rel=1e-14)


def test_dtype_is_preserved_but_maths_is_float64():
    s = fewstep.DiscreteVP.linear()
    t32 = torch.tensor([0.0, 500.0, 999.0], dtype=torch.float32)
    assert s.alpha(t32).dtype == torch.float32
    assert s.lambda_(500.0).dtype == torch.float64


def test_config_round_trip(any_schedule):
    assert schedule_from_config(any_schedule.config()) == any_schedule


@pytest.mark.parametrize(
    "bad",
    [
        lambda: fewstep.DiscreteVP.from_betas([0.1, 1.5]),
        lambda: fewstep.DiscreteVP([0.9, 0.95]),
        lambda: fewstep.EDM(sigma_min=1.0, sigma_max=0.5),
        lambda: fewstep.FlowMatching(shift=0.0),
        lambda: schedule_from_config({"kind": "nope"}),
        lambda: schedule_from_config({"kind": "edm", "sigma_mn": 1}),
    ],
)
def test_bad_schedules_raise_clear_errors(bad):
    with pytest.raises(fewstep.ScheduleError):
        bad()


def test_unknown_schedule_name_is_named_in_error():
    with pytest.raises(fewstep.ScheduleError, match="nope"):
        schedule_from_config({"kind": "nope"})

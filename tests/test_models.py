import pytest
import torch

import fewstep
from fewstep.models import PREDICTION_TYPES, from_prediction, to_prediction


@pytest.mark.parametrize("kind", [k for k in PREDICTION_TYPES if k != "edm"])
def test_every_parameterisation_round_trips(kind, any_schedule):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 5, generator=g, dtype=torch.float64)
    t = torch.linspace(any_schedule.t_min, any_schedule.t_max * 0.97, 6, dtype=torch.float64)
    a, s = any_schedule.alpha(t), any_schedule.sigma(t)
    x = a[:, None] * x0 + s[:, None] * eps
    raw = from_prediction(kind, fewstep.Prediction(x0, eps), x, a, s)
    back = to_prediction(kind, raw, x, a, s)
    scale = 1 + x.abs().max() / a.min()
    assert torch.allclose(back.x0, x0, atol=1e-12 * scale, rtol=1e-10)
    assert torch.allclose(back.eps, eps, atol=1e-12 * scale, rtol=1e-10)


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_model_adapter_gives_same_prediction_for_every_type(kind, small_gmm):
    sched = fewstep.LinearVP()
    ref = small_gmm.as_model(sched, "x0")
    m = small_gmm.as_model(sched, kind)
    x = torch.randn(5, 8, dtype=torch.float64)
    for t in (0.05, 0.5, 0.95):
        p, q = m.predict(x, t), ref.predict(x, t)
        assert torch.allclose(p.x0, q.x0, rtol=1e-9, atol=1e-10)
        assert torch.allclose(p.eps, q.eps, rtol=1e-9, atol=1e-10)


def test_counters_count_calls_and_rows(small_gmm):
    m = small_gmm.as_model(fewstep.EDM(), "eps")
    x = torch.randn(3, 8, dtype=torch.float64)
    m.predict(x, 1.0)
    m.predict(x, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert (m.calls, m.evaluations) == (2, 6)


def test_classifier_free_guidance_two_calls_equals_batched():
    def cond(x, t):
        return x * 2 + t[:, None]

    def uncond(x, t):
        return x - 1

    def both(x2, t2):
        half = x2.shape[0] // 2
        return torch.cat([uncond(x2[:half], t2[:half]), cond(x2[half:], t2[half:])])

    x, t = torch.randn(4, 3), torch.rand(4)
    a = fewstep.classifier_free_guidance(cond, uncond, 3.5)(x, t)
    b = fewstep.batched_classifier_free_guidance(both, 3.5)(x, t)
    assert torch.allclose(a, b)
    assert torch.allclose(a, uncond(x, t) + 3.5 * (cond(x, t) - uncond(x, t)))


def test_thresholding_static_and_dynamic():
    x0 = torch.tensor([[0.5, -3.0, 2.0, 0.1]])
    assert torch.equal(fewstep.Threshold("static", 1.0)(x0), torch.tensor([[0.5, -1.0, 1.0, 0.1]]))
    dyn = fewstep.Threshold("dynamic", max_value=2.5, ratio=1.0)(x0)
    # s = clamp(max|x0| = 3, 1, 2.5) = 2.5 ; clamp then divide
    assert torch.allclose(dyn, torch.tensor([[0.2, -1.0, 0.8, 0.04]]))
    # inside [-1, 1] dynamic thresholding is the identity
    small = torch.tensor([[0.3, -0.9]])
    assert torch.equal(fewstep.Threshold("dynamic", 2.0, 0.995)(small), small)


def test_threshold_keeps_eps_consistent(small_gmm):
    sched = fewstep.DiscreteVP.linear()
    m = small_gmm.as_model(sched, "eps")
    m.threshold = fewstep.Threshold("static", 0.2)
    x = 3 * torch.randn(4, 8, dtype=torch.float64)
    p = m.predict(x, 300.0)
    a, s = sched.alpha(300.0), sched.sigma(300.0)
    assert float(p.x0.abs().max()) <= 0.2 + 1e-12
    assert torch.allclose(a * p.x0 + s * p.eps, x)


def test_wrong_output_shape_is_named():
    m = fewstep.Model(lambda x, t: x[:, :2], fewstep.EDM(), "eps", name="bad")
    with pytest.raises(fewstep.ModelOutputError, match=r"bad.*shape \(2, 2\).*\(2, 3\)"):
        m.predict(torch.randn(2, 3), 1.0)


def test_nan_output_is_caught():
    m = fewstep.Model(lambda x, t: x * float("nan"), fewstep.EDM(), "eps", name="nanny")
    with pytest.raises(fewstep.ModelOutputError, match="NaN/Inf"):
        m.predict(torch.randn(2, 3), 1.0)


def test_unknown_prediction_type():
    with pytest.raises(fewstep.ArgumentError, match="banana"):
        fewstep.Model(lambda x, t: x, fewstep.EDM(), "banana")  # type: ignore[arg-type]


def test_wrong_time_shape():
    m = fewstep.Model(lambda x, t: x, fewstep.EDM(), "eps")
    with pytest.raises(fewstep.ShapeError):
        m.predict(torch.randn(2, 3), torch.ones(3))

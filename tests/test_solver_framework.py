"""The Step framework: validation errors, exactness properties, noise reproducibility."""

import math

import pytest
import torch

import fewstep
from fewstep import SolverSchedule, Step
from fewstep.errors import SolverError
from fewstep.solvers.coefficients import node_weights, point
from fewstep.solvers.compile import Combine, Evaluate, compile_plan
from fewstep.solvers.phi import phis

SCHED = fewstep.DiscreteVP.linear()


def test_phi_series_and_recurrence_agree_at_the_switch():
    for z in (-2.0000001, -1.9999999, 1.9999999, 2.0000001):
        a = phis(z, 5)
        b = [math.expm1(z) / z]
        for k in range(1, 5):
            b.append((b[-1] - 1 / math.factorial(k)) / z)
        assert all(abs(x - y) <= 1e-12 * abs(y) for x, y in zip(a, b))
    assert phis(1e-9, 3) == pytest.approx([1.0, 0.5, 1 / 6], rel=1e-8)


def test_exact_weights_integrate_polynomials_exactly():
    """A prediction that is a polynomial in lambda of degree < number of nodes is integrated exactly."""
    s, t = point(SCHED, 600.0), point(SCHED, 300.0)
    h = t.lam - s.lam
    prev = [point(SCHED, 800.0), point(SCHED, 900.0)]
    nodes = [s] + prev
    taus = [(p.lam - s.lam) / h for p in nodes]
    a, w, _ = node_weights("data", "lambda", "phi", SCHED, s, t, taus)
    f = lambda lam: 0.3 - 0.7 * lam + 0.2 * lam**2  # noqa: E731
    # sigma_t * int e^lam f(lam) dlam, by fine quadrature
    import numpy as np

    grid = np.linspace(s.lam, t.lam, 200001)
    exact = t.sigma * np.trapezoid(np.exp(grid) * f(grid), grid)
    approx = sum(wj * f(p.lam) for wj, p in zip(w, nodes))
    assert approx == pytest.approx(exact, rel=1e-8)
    assert a == pytest.approx(t.sigma / s.sigma)


def _linear_gaussian_model(dim=3, seed=0):
    """Exact eps of zero-mean Gaussian data N(0, C): ``eps(x, t) = sigma (alpha^2 C + sigma^2 I)^-1 x``,
    a linear function of x at every t, so any affine sampler built on it is a linear map of x_T."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=g))
    cov = q @ torch.diag(torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64)[:dim]) @ q.T
    eye = torch.eye(dim, dtype=torch.float64)

    def eps_matrix(t: float) -> torch.Tensor:
        a, s = float(SCHED.alpha(t)), float(SCHED.sigma(t))
        return s * torch.linalg.inv(a * a * cov + s * s * eye)

    def fn(x, t):
        return torch.stack([eps_matrix(float(ti)) @ xi for xi, ti in zip(x, t)])

    return fewstep.Model(fn, SCHED, "eps"), eps_matrix


def _replay(compiled, eps_matrix, x_T):
    """A minimal interpreter of the exposed program: Evaluate stores the model's (x0, eps) at
    X[state], Combine forms ``a X[base] + sum c D[slot].kind``. It uses only op fields and the
    schedule, none of fewstep's sampling code."""
    X, D = {0: x_T.clone()}, {}
    for op in compiled.ops:
        if isinstance(op, Evaluate):
            a, s = float(SCHED.alpha(op.t)), float(SCHED.sigma(op.t))
            x = X[op.state]
            eps = x @ eps_matrix(op.t).T
            D[op.slot] = {"x0": (x - s * eps) / a, "eps": eps}
        else:
            assert isinstance(op, Combine) and not op.noise
            X[op.target] = op.a * X[op.base] + sum(c * D[slot][kind] for slot, kind, c in op.terms)
    return X[compiled.output]


@pytest.mark.parametrize("name", ["unipc", "dpmpp_3m", "dpm_solver_3", "heun"])
def test_affine_form_is_exposed_and_linear(name):
    """The compiled program is affine in the model outputs and it is the program that runs: with a
    model linear in x the whole sampler is linear in x_T, and replaying the exposed ops by hand gives
    fewstep.sample's result."""
    model, eps_matrix = _linear_gaussian_model()
    plan = fewstep.preset(name, 7, SCHED)
    compiled = compile_plan(plan, SCHED)
    ops = compiled.ops
    assert compiled.nfe == 7 == sum(isinstance(op, Evaluate) for op in ops)
    assert all(isinstance(op, (Evaluate, Combine)) for op in ops)
    g = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(4, 3, dtype=torch.float64, generator=g) * float(SCHED.sigma(plan.times[0])) for _ in range(2))
    a, b = 0.7, -1.9
    y1, y2 = fewstep.sample(model, x1, plan), fewstep.sample(model, x2, plan)
    y12 = fewstep.sample(model, a * x1 + b * x2, plan)
    scale = float(y1.abs().max() + y2.abs().max())
    assert scale > 0.1  # a non-degenerate map
    assert float((y12 - (a * y1 + b * y2)).abs().max()) <= 1e-12 * scale
    for x, y in ((x1, y1), (x2, y2)):
        assert float((_replay(compiled, eps_matrix, x) - y).abs().max()) <= 1e-12 * float(y.abs().max())


def test_order_the_history_cannot_support():
    with pytest.raises(SolverError, match="reads 2 previous steps but only 0 exist"):
        SolverSchedule(times=(999.0, 500.0, -1.0), steps=(Step(order=3), Step()))


def test_nfe_too_small_for_singlestep_warmup():
    with pytest.raises(SolverError, match="nfe >= 7"):
        fewstep.preset("dpmpp_3m", 4, SCHED, warmup="singlestep")


def test_singlestep_into_sigma_zero_is_refused():
    plan = SolverSchedule(times=(999.0, -1.0), steps=(Step(order=2, method="singlestep"),))
    g = fewstep.GaussianMixture.random(4, 2, 1, seed=0)
    with pytest.raises(SolverError, match="infinite log-SNR"):
        fewstep.sample(g.as_model(SCHED), torch.randn(2, 4), plan)


def test_multistep_high_order_into_sigma_zero_is_refused():
    plan = SolverSchedule(times=(999.0, 500.0, -1.0), steps=(Step(), Step(order=2, variant="phi")))
    g = fewstep.GaussianMixture.random(4, 2, 1, seed=0)
    with pytest.raises(SolverError, match="'lambda' is infinite at a node or an end"):
        fewstep.sample(g.as_model(SCHED), torch.randn(2, 4), plan)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"order": 5}, "order must be an integer in 1..4"),
        ({"variant": "magic"}, "variant must be one of"),
        ({"order": 2, "history": (1, 1)}, "needs 1 history nodes|distinct"),
        ({"order": 2, "method": "singlestep", "stages": (0.7, 0.3)}, "needs 1 stages|increasing"),
        ({"order": 3, "method": "singlestep", "stages": (0.7, 0.3)}, "increasing"),
        ({"order": 2, "corrector": 5}, "corrector"),
        ({"order": 2, "method": "singlestep", "corrector": 2}, "multistep steps only"),
        ({"noise": "renoise", "eta": 0.5, "order": 2}, "first-order weight"),
        ({"noise": "magic"}, "unknown noise rule"),
        ({"noise": "sde", "eta": -1.0}, "eta"),
        ({"noise": "renoise", "eta": 1.5}, "eta"),
        ({"noise": "renoise", "eta": 0.5, "corrector": 2, "order": 1}, "corrector"),
    ],
)
def test_step_validation_messages(kwargs, match):
    with pytest.raises(SolverError, match=match):
        Step(**kwargs)


def test_last_step_cannot_have_a_corrector():
    with pytest.raises(SolverError, match="last step cannot have a corrector"):
        SolverSchedule(times=(999.0, 500.0, -1.0), steps=(Step(), Step(order=1, corrector=2)))


def test_every_preset_honours_the_nfe_budget_exactly():
    g = fewstep.GaussianMixture.random(4, 2, 1, seed=0)
    for sched in (SCHED, fewstep.EDM(), fewstep.FlowMatching()):
        model = g.as_model(sched)
        x = fewstep.initial_noise(sched, (2, 4), 0, dtype=torch.float64)
        for name in fewstep.preset_names():
            for nfe in (3, 4, 5, 6, 7, 8, 10, 15):
                model.reset_counters()
                fewstep.sample(model, x, name, nfe=nfe, seed=0)
                assert model.calls == nfe, (name, nfe, type(sched).__name__)


def test_stochastic_preset_noise_is_batch_invariant_and_seeded():
    g = fewstep.GaussianMixture.random(4, 2, 1, seed=0)
    model = g.as_model(SCHED)
    x = fewstep.initial_noise(SCHED, (7, 4), 0, dtype=torch.float64)
    full = fewstep.sample(model, x, "lcm", nfe=4, seed=11)
    part = fewstep.sample(model, x[2:5], "lcm", nfe=4, seed=11, sample_indices=[2, 3, 4])
    assert torch.allclose(full[2:5], part, atol=1e-12)
    assert not torch.allclose(full, fewstep.sample(model, x, "lcm", nfe=4, seed=12))
    # a run without a seed reports the seed it drew: re-running with that seed reproduces it exactly
    seedless, info = fewstep.sample(model, x, "lcm", nfe=4, return_info=True)
    assert isinstance(info.extra["seed"], int)
    assert torch.equal(seedless, fewstep.sample(model, x, "lcm", nfe=4, seed=info.extra["seed"]))
    assert not torch.allclose(seedless, fewstep.sample(model, x, "lcm", nfe=4, seed=info.extra["seed"] + 1))


def test_renoise_keeps_exact_marginals():
    """With an exact x0 and nu = 1 the state after a step is exactly distributed as x_t when x0 is a point mass."""
    g = fewstep.GaussianMixture(torch.tensor([1.0]), torch.tensor([[0.7, -0.2]]), torch.tensor([[1e-12, 1e-12]]))
    model = g.as_model(SCHED)
    x = fewstep.initial_noise(SCHED, (20000, 2), 0, dtype=torch.float64)
    plan = SolverSchedule(times=(999.0, 400.0, 200.0), steps=(Step(noise="renoise", eta=1.0), Step(noise="renoise", eta=0.5)))
    y = fewstep.sample(model, x, plan, seed=0)
    a, s = float(SCHED.alpha(200.0)), float(SCHED.sigma(200.0))
    assert torch.allclose(y.mean(0), a * torch.tensor([0.7, -0.2], dtype=torch.float64), atol=0.02)
    assert torch.allclose(y.std(0), torch.full((2,), s, dtype=torch.float64), rtol=0.02)


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")  # the reference quadrature near kinks of t(lambda)
@pytest.mark.parametrize("interp", ["t", "sigma", "rho", "lambda", "flat"])
@pytest.mark.parametrize("prediction", ["data", "noise"])
@pytest.mark.parametrize("case", ["finite", "into_clean", "from_pure_noise"])
def test_weights_integrate_polynomials_in_the_interpolation_variable_exactly(interp, prediction, case):
    """For every interpolation variable u, a prediction that is a polynomial of degree < n in u is
    integrated exactly against the kernel (checked against adaptive quadrature of the defining
    integral), including the infinite ends the closed forms cannot reach: into sigma = 0 and out of
    alpha = 0 (a flow schedule at t = 1)."""
    from scipy.integrate import quad

    from fewstep.solvers.coefficients import coordinate, node_positions

    sched = fewstep.FlowMatching() if case == "from_pure_noise" else SCHED
    times = {"finite": (600.0, 300.0, [800.0, 900.0]), "into_clean": (40.0, -1.0, [120.0, 300.0]),
             "from_pure_noise": (0.7, 0.4, [1.0, 0.85])}[case]
    s, t = point(sched, times[0]), point(sched, times[1])
    nodes = [s] + [point(sched, v) for v in times[2]]
    if prediction == "noise" and case == "from_pure_noise":
        nodes = nodes[:1] + nodes[2:]  # eps at alpha = 0 is not a noise-form node
    try:
        taus = node_positions(interp, prediction, sched, s, t, nodes)
        a, w, _ = node_weights(prediction, interp, "phi", sched, s, t, taus)
    except SolverError:
        # only variables that are infinite at an end may refuse: lambda at both, sigma/flat at alpha = 0
        inf_somewhere = not all(math.isfinite(coordinate(interp, prediction, p)) for p in nodes + [t])
        assert inf_somewhere, (interp, prediction, case)
        return
    us, ut = coordinate(interp, prediction, s), coordinate(interp, prediction, t)
    coeffs = [0.3, -0.7, 0.45][: len(nodes)]

    def poly_at_lambda(lam: float) -> float:
        p = point(sched, float(sched.t_of_lambda(lam)))
        tau = (coordinate(interp, prediction, p) - us) / (ut - us)
        return sum(c * tau**k for k, c in enumerate(coeffs))

    if case == "into_clean" and prediction == "data":
        exact = t.alpha * sum(coeffs)  # the kernel is a point mass at sigma = 0: P(tau = 1)
    elif prediction == "data":
        lo = max(s.lam, -40.0)
        exact = quad(lambda lam: t.alpha * math.exp(lam - t.lam) * poly_at_lambda(lam), lo, t.lam, epsabs=1e-13, epsrel=1e-11, limit=400)[0]
    else:
        hi = min(t.lam, 40.0)
        exact = quad(lambda lam: -t.alpha * math.exp(-lam) * poly_at_lambda(lam), s.lam, hi, epsabs=1e-13, epsrel=1e-11, limit=400)[0]
    approx = sum(wj * sum(c * tj**k for k, c in enumerate(coeffs)) for wj, tj in zip(w, taus))
    # DiscreteVP's t(lambda) is piecewise linear in log alpha (kinks at integer t): the 48-node
    # Gauss-Legendre rule of interp="t" is accurate to ~1e-7 there; smooth integrands to ~1e-12
    rel = 1e-6 if interp == "t" and isinstance(sched, fewstep.DiscreteVP) else 1e-8
    assert approx == pytest.approx(exact, rel=rel, abs=1e-10), (interp, prediction, case)

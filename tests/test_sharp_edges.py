"""The less-travelled paths a new user hits (issue 13): no autograd graph, callbacks once per grid
state, clear errors naming the argument, fingerprints of renamed schedules, flow-model ends,
host synchronisation of the NaN/Inf checks."""

import math

import numpy as np
import pytest
import torch

import fewstep
from fewstep import SolverSchedule, Step
from fewstep.solvers.compile import Combine, Evaluate, compile_plan

VP = fewstep.DiscreteVP.linear()


def _gmm(dim=4):
    return fewstep.GaussianMixture.random(dim, 3, 1, seed=0)


# ---- autograd ---------------------------------------------------------------------------------
class _LinearNet(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.1 * self.lin(x)


def test_sampling_records_no_autograd_graph_unless_asked():
    net = _LinearNet(4)
    model = fewstep.Model(net, VP, "eps")
    x_T = fewstep.initial_noise(VP, (3, 4), 0)
    seen = []
    out = fewstep.sample(model, x_T, "unipc", nfe=6, callback=lambda i, t, x: seen.append(x.requires_grad))
    assert not out.requires_grad and out.grad_fn is None and not any(seen)
    with_grad = fewstep.sample(model, x_T, "unipc", nfe=6, grad=True)
    assert with_grad.requires_grad
    with_grad.sum().backward()
    assert net.lin.weight.grad is not None and torch.isfinite(net.lin.weight.grad).all()
    assert torch.allclose(out, with_grad.detach())


# ---- callback ---------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["unipc", "dpmpp_3m", "heun", "dpm_solver_3", "ddim"])
def test_callback_sees_each_grid_state_once_in_its_final_form(solver):
    """UniPC corrects each state after the next evaluation: the callback must see the corrected
    state (the one the next step starts from), once per grid index."""
    g = _gmm()
    model = g.as_model(VP)
    x_T = fewstep.initial_noise(VP, (2, 4), 0, dtype=torch.float64)
    seen: dict[int, torch.Tensor] = {}
    indices = []

    def cb(i, t, x):
        indices.append(i)
        seen[i] = x.clone()

    out, info = fewstep.sample(model, x_T, solver, nfe=8, callback=cb, return_info=True)
    n = info.plan.n_steps
    assert indices == list(range(1, n + 1))
    assert torch.equal(seen[n], out)
    # structurally: every update starts from x_T or from a reported grid state (never from a
    # predicted state that a corrector later replaced)
    compiled = compile_plan(info.plan, VP)
    combines = [op for op in compiled.ops if isinstance(op, Combine)]
    reported = {op.grid_index: op.target for op in combines if op.grid_index is not None}
    assert sorted(reported) == list(range(1, n + 1))
    assert {op.base for op in combines} <= {0} | set(reported.values())


# ---- errors -------------------------------------------------------------------------------------
def test_unknown_option_lists_the_valid_ones():
    model = _gmm().as_model(VP)
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(fewstep.ArgumentError, match=r"unknown option\(s\) \['paralel'\] for preset 'ddim'.*valid options: \[.*'spacing'"):
        fewstep.sample(model, x, "ddim", nfe=5, paralel=True)
    with pytest.raises(fewstep.ArgumentError, match="'ordr'.*'order'"):
        fewstep.preset("unipc", 5, VP, ordr=2)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m, x: fewstep.sample(m, x, 42, nfe=5), "solver must be a preset name"),
        (lambda m, x: fewstep.sample(m, x, "ddim", nfe=5, rho="seven"), "rho must be a finite number"),
        (lambda m, x: fewstep.sample(m, x, "ddim", nfe=5, t_start="high"), "t_start must be a finite number"),
        (lambda m, x: fewstep.sample(m, x, "ddim", nfe="5"), "nfe must be an integer"),
        (lambda m, x: fewstep.sample(m, x, "unipc", nfe=5, order=7), "order must be an integer in 1..4"),
        (lambda m, x: fewstep.sample(m, x, "unipc", nfe=5, final_order=0), "final_order must be an integer"),
        (lambda m, x: fewstep.sample(m, x, "ddim", nfe=5, grad="yes"), "grad must be True or False"),
        (lambda m, x: fewstep.sample(lambda x, t: x, x, "ddim", nfe=5), "model must be a fewstep.Model"),
        (lambda m, x: fewstep.Model(m.fn, VP, "eps", threshold=None, check_finite=-3), "check_finite"),
        (lambda m, x: fewstep.Threshold("dynamic", ratio=2.0), "ratio"),
        (lambda m, x: fewstep.Model("not callable", VP), "callable"),
        (lambda m, x: fewstep.keyed_noise((2, 3), 0, indices=[1]), "sample indices"),
    ],
)
def test_bad_arguments_are_fewstep_errors_naming_the_argument(call, match):
    model = _gmm().as_model(VP)
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(fewstep.FewstepError, match=match):
        call(model, x)


# ---- fingerprints -----------------------------------------------------------------------------
def test_fingerprint_covers_only_what_defines_alpha_and_sigma(tmp_path):
    a = fewstep.DiscreteVP.linear()
    renamed = fewstep.DiscreteVP(a.alphas_cumprod, name="my-unet-config")
    fp = fewstep.solvers.plan.schedule_fingerprint
    assert fp(a) == fp(renamed)
    assert fp(fewstep.FlowMatching(shift=1.0)) == fp(fewstep.FlowMatching(shift=3.0, t_min=1e-4))
    assert fp(fewstep.EDM(sigma_data=0.5)) == fp(fewstep.EDM(sigma_data=0.8, sigma_max=120.0))
    assert fp(fewstep.LinearVP(t_min=1e-3)) == fp(fewstep.LinearVP(t_min=1e-5))
    assert fp(a) != fp(fewstep.DiscreteVP.scaled_linear())
    assert fp(fewstep.LinearVP(beta_max=20.0)) != fp(fewstep.LinearVP(beta_max=10.0))
    assert fp(fewstep.EDM()) != fp(fewstep.FlowMatching())
    # tune once, sample forever: a file made for the schedule runs on the renamed one
    plan = fewstep.preset("unipc", 6, a)
    path = plan.save(tmp_path / "p.json")
    g = _gmm()
    x = fewstep.initial_noise(a, (3, 4), 0, dtype=torch.float64)
    same = fewstep.sample(g.as_model(renamed), x, SolverSchedule.load(path))
    assert torch.equal(same, fewstep.sample(g.as_model(a), x, plan))
    with pytest.raises(fewstep.SolverError, match="made for noise schedule"):
        fewstep.sample(g.as_model(fewstep.DiscreteVP.scaled_linear()), x, SolverSchedule.load(path))


def test_compiled_preset_cache_tells_shifted_flow_schedules_apart():
    g = _gmm()
    x = fewstep.initial_noise(fewstep.FlowMatching(), (2, 4), 0, dtype=torch.float64)
    _, a = fewstep.sample(g.as_model(fewstep.FlowMatching()), x, "unipc", nfe=6, spacing="uniform_t", return_info=True)
    _, b = fewstep.sample(g.as_model(fewstep.FlowMatching(shift=3.0)), x, "unipc", nfe=6, spacing="uniform_t", return_info=True)
    assert a.plan.schedule == b.plan.schedule and a.plan.times != b.plan.times


# ---- flow-model ends --------------------------------------------------------------------------
FLOW = fewstep.FlowMatching()


@pytest.mark.parametrize("solver,opts", [("dpmpp_2m", {}), ("dpmpp_3m", {}), ("unipc", {"corrector": False}), ("deis", {}), ("lms", {})])
def test_flow_from_pure_noise_compiles_the_order_it_records(solver, opts):
    """No silent order drop: every multistep step from t = 1 combines as many model outputs as its
    record's order (steps reading the alpha = 0 node interpolate in rho = t, finite there)."""
    plan = fewstep.preset(solver, 8, FLOW, spacing="uniform_t", **opts)
    compiled = compile_plan(plan, FLOW)
    combines = [op for op in compiled.ops if isinstance(op, Combine)]
    assert len(combines) == plan.n_steps
    for i, (st, op) in enumerate(zip(plan.steps, combines)):
        used = [c for _, _, c in op.terms if c != 0.0]
        assert len(used) == st.order, (i, st, op.terms)
    assert max(st.order for st in plan.steps) >= 2
    reads_pure = [st for i, st in enumerate(plan.steps) if 0 < i <= st.depth]
    assert reads_pure and all(st.interp in ("rho", "t") or st.uniform_nodes for st in reads_pure)


def test_flow_second_step_is_second_order_not_first():
    """A step that reads the t = 1 node must use it: with x0(t) = c0 + c1 t (linear in rho = t) a
    second-order step is exact. The flow ODE in data form, dx/dt = (x - x0(t)) / t, gives
    x(t)/t = x(s)/s + c0 (1/t - 1/s) + c1 log(s/t) exactly."""
    c0, c1 = torch.tensor([[0.3, -0.2]], dtype=torch.float64), torch.tensor([[0.5, 0.1]], dtype=torch.float64)
    model = fewstep.Model(lambda x, t: c0 + t[:, None] * c1, FLOW, "x0")
    plan = SolverSchedule(times=(1.0, 0.6, 0.3), steps=(Step(), Step(order=2, interp="rho", variant="phi")))
    x = torch.randn(1, 2, dtype=torch.float64)
    states = {}
    out = fewstep.sample(model, x, plan, callback=lambda i, t, y: states.setdefault(i, y.clone()))
    s, t = 0.6, 0.3
    exact = t * (states[1] / s + c0 * (1 / t - 1 / s) + c1 * math.log(s / t))
    assert torch.allclose(out, exact, rtol=0, atol=1e-12)
    first_order = fewstep.sample(model, x, plan.with_step(1, Step()))
    assert not torch.allclose(first_order, exact, atol=1e-3)  # what a silently dropped node would give
    with pytest.raises(fewstep.SolverError, match="infinite at a node"):
        fewstep.sample(model, x, plan.with_step(1, Step(order=2, variant="phi")))  # lambda is -inf at t = 1


@pytest.mark.parametrize("spacing", ["karras", "uniform_lambda"])
def test_noise_level_spacings_start_at_pure_noise(spacing):
    ts = fewstep.time_grid(FLOW, 8, spacing)
    assert ts[0] == 1.0 and ts[1] == pytest.approx(0.999) and ts[-2] == pytest.approx(FLOW.t_min) and ts[-1] == 0.0
    lam = FLOW.lambda_(torch.as_tensor(ts[1:-1])).numpy()
    if spacing == "uniform_lambda":
        assert np.allclose(np.diff(lam), np.diff(lam)[0])
    g = _gmm()
    x = fewstep.initial_noise(FLOW, (3, 4), 0, dtype=torch.float64)
    for solver in ("unipc", "dpmpp_2m", "euler", "heun"):
        out = fewstep.sample(g.as_model(FLOW, "flow"), x, solver, nfe=8, spacing=spacing)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("prediction", ["eps", "score"])
def test_eps_model_on_flow_from_pure_noise_is_refused_at_plan_time(prediction):
    calls = []
    model = fewstep.Model(lambda x, t: calls.append(1) or 0 * x, FLOW, prediction)
    with pytest.raises(fewstep.SolverError, match="cannot be evaluated at t = 1.*alpha = 0"):
        fewstep.sample(model, torch.randn(2, 3), "unipc", nfe=6)
    assert calls == []  # refused before any model call
    out = fewstep.sample(model, 0.99 * torch.randn(2, 3), "unipc", nfe=6, t_start=0.99)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_t_start_and_t_end_are_honoured_with_shift(shift):
    sched = fewstep.FlowMatching(shift=shift)
    ts = fewstep.time_grid(sched, 6, "uniform_t", t_start=0.5, t_end=0.1)
    assert ts[0] == 0.5 and ts[-1] == 0.1 and np.all(np.diff(ts) < 0)
    full = fewstep.time_grid(sched, 6, "uniform_t")
    assert full[0] == 1.0 and full[-1] == 0.0
    u = sched.unshift_times(torch.as_tensor(full)).numpy()
    assert np.allclose(np.diff(u), -1 / 6)  # uniform in the unshifted time


# ---- host synchronisation ---------------------------------------------------------------------
def test_nan_checks_do_not_synchronise_per_model_call(monkeypatch):
    """On an accelerator the NaN/Inf check of each model output stays on the device; the host
    looks once per sample call. Meta tensors stand in for a device: reading one on the host raises,
    so a run without checks completes only if nothing syncs, and with checks exactly one flush does."""
    from fewstep import finite

    model = fewstep.Model(lambda x, t: 0.1 * x, VP, "eps", check_finite=False)
    x = torch.empty(2, 3, 4, 4, device="meta")
    out = fewstep.sample(model, x, "unipc", nfe=10)  # would raise on any host read of a meta tensor
    assert out.device.type == "meta" and model.calls == 10

    flushes = []
    real_flush = finite.FiniteGuard.flush

    def counting_flush(self):
        flushes.append(self.pending)
        self._sums, self._errors = [], []  # meta values cannot be read: count, then drop

    monkeypatch.setattr(finite.FiniteGuard, "flush", counting_flush)
    checked = fewstep.Model(lambda x, t: 0.1 * x, VP, "eps")
    fewstep.sample(checked, x, "unipc", nfe=10)
    assert flushes == [11]  # x_T and the 10 outputs, in one synchronisation
    monkeypatch.setattr(finite.FiniteGuard, "flush", real_flush)


def test_deferred_nan_check_names_the_first_bad_call():
    """The deferred path (as on a GPU), forced on the CPU with an interval: the error names the
    first call whose output was not finite."""
    calls = []

    def flaky(x, t):
        calls.append(1)
        return x * (float("nan") if len(calls) in (3, 5) else 0.1)

    model = fewstep.Model(flaky, VP, "eps", name="flaky", check_finite=100)
    with pytest.raises(fewstep.ModelOutputError, match="flaky.*NaN/Inf.*call 3"):
        fewstep.sample(model, torch.randn(2, 4), "ddim", nfe=6)
    assert len(calls) == 6  # deferred: the run finished, then the one check raised
    every2 = fewstep.Model(flaky, VP, "eps", name="flaky", check_finite=2)
    calls.clear()
    with pytest.raises(fewstep.ModelOutputError, match="call 3"):
        fewstep.sample(every2, torch.randn(2, 4), "ddim", nfe=6)
    assert len(calls) == 3  # x_T + 3 outputs: flushed after call 1 and after call 3

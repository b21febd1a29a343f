"""DPM-Solver-v3 (Zheng, Lu, Chen & Zhu 2023): its empirical model statistics and its update, on exact
oracles in float64.

1. one predictor step and one corrector step equal the reference implementation's formula
   (``thu-ml/DPM-Solver-v3``, ``dpm_solver_v3.py``: ``multistep_predictor_update`` /
   ``multistep_corrector_update``), written out here with its integrals L, S, B, I, C and E_k by
   Simpson's rule on a fine log-SNR grid;
2. with the degenerate statistics ``l = 1, s = b = 0`` it is DPM-Solver++(3M) with exact weights and
   UniPC's predictor-corrector with exact weights, on the same grid;
3. its convergence order on the oracle (with smooth statistics: the integrator's order does not depend
   on which statistics it is given);
4. statistics and schedule files round-trip; other models, schedules and shapes are refused;
5. the cost of the statistics is counted exactly; the estimator matches closed-form statistics of a
   Gaussian; parallel-in-time sampling gives the sequential samples.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.integrate import cumulative_simpson

import fewstep
from fewstep import ModelStatistics, SolverSchedule
from fewstep.errors import ScheduleFileError, ShapeError, SolverError
from fewstep.solvers.ems import StatisticsError

SCHED = fewstep.DiscreteVP.linear()
DIM = 4


@pytest.fixture(scope="module")
def oracle():
    return fewstep.GaussianMixture.random(DIM, 3, 1, seed=0)


@pytest.fixture(scope="module")
def model(oracle):
    return oracle.as_model(SCHED)


@pytest.fixture(scope="module")
def stats(model):
    return fewstep.model_statistics(model, n_samples=32, n_times=61, seed=0, dtype=torch.float64)


@pytest.fixture(scope="module")
def x_T():
    return fewstep.initial_noise(SCHED, (3, DIM), 5, dtype=torch.float64)


# ---- 1. the update against the reference formula ---------------------------------------------------
def _fine_grid(lams, per=40001):
    """A fine grid through every node's log-SNR (the nodes are grid points)."""
    knots = sorted(set(lams))
    parts = [np.linspace(a, b, per) for a, b in zip(knots, knots[1:])]
    return np.concatenate([parts[0]] + [p[1:] for p in parts[1:]])


def _reference_step(st, sched, x_s, t_s, t_t, node_times, node_x, node_eps, pseudo):
    """The reference implementation's update from ``t_s`` to ``t_t`` (dpm_solver_v3.py, lines 652-738):
    ``g_i = e^(S_s - S_i) f_i - e^S_s (B_i - B_s)``, ``f_i = (sigma_i eps_i - l_i x_i) / alpha_i``,
    derivatives of g by a Vandermonde solve (or pseudo: divided differences), and
    ``x_t = alpha_t/alpha_s e^(L_s - L_t) x_s - alpha_t e^(-L_t - S_s)(I_t - I_s) g_s
    - alpha_t e^(-L_t)(C_t - C_s - B_s (I_t - I_s)) - alpha_t e^(L_s - L_t) sum_k E_k g^(k)``,
    every integral by Simpson's rule on a fine grid, the statistics linear between their points."""
    lam = lambda t: float(sched.lambda_(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
    al = lambda t: float(sched.alpha(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
    sg = lambda t: float(sched.sigma(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
    lam_nodes = [lam(t) for t in node_times]
    lam_s, lam_t = lam(t_s), lam(t_t)
    grid = _fine_grid(lam_nodes + [lam_s, lam_t])
    knots = st.lambdas.numpy()
    out = torch.empty_like(x_s)
    for d in range(x_s.shape[1]):
        l = np.interp(grid, knots, st.l[:, d].numpy())
        s = np.interp(grid, knots, st.s[:, d].numpy())
        b = np.interp(grid, knots, st.b[:, d].numpy())
        big_l = cumulative_simpson(l, x=grid, initial=0.0)
        big_s = cumulative_simpson(s, x=grid, initial=0.0)
        big_b = cumulative_simpson(np.exp(-big_s) * b, x=grid, initial=0.0)
        big_i = cumulative_simpson(np.exp(big_l + big_s), x=grid, initial=0.0)
        big_c = cumulative_simpson(np.exp(big_l + big_s) * big_b, x=grid, initial=0.0)
        at = lambda arr, v: arr[int(np.argmin(np.abs(grid - v)))]  # noqa: E731  (v is a grid point)
        L_s, L_t, S_s, B_s, I_s, I_t, C_s, C_t = (at(big_l, lam_s), at(big_l, lam_t), at(big_s, lam_s), at(big_b, lam_s),
                                                  at(big_i, lam_s), at(big_i, lam_t), at(big_c, lam_s), at(big_c, lam_t))
        g = []
        for t_i, l_i, x_i, e_i in zip(node_times, lam_nodes, node_x, node_eps):
            f_i = (sg(t_i) * e_i[:, d].numpy() - np.interp(l_i, knots, st.l[:, d].numpy()) * x_i[:, d].numpy()) / al(t_i)
            g.append(np.exp(S_s - at(big_s, l_i)) * f_i - np.exp(S_s) * (at(big_b, l_i) - B_s))
        n = len(node_times) - 1
        if pseudo:  # divided differences of the nodes in their order, as Taylor coefficients times k!
            table = [g]
            for i in range(1, n + 1):
                table.append([(table[i - 1][j] - table[i - 1][j + 1]) / (lam_nodes[j] - lam_nodes[i + j]) for j in range(n - i + 1)])
            derivs = [table[i][0] * math.factorial(i) for i in range(1, n + 1)]
        else:
            r = np.array([[(lam_nodes[i] - lam_nodes[0]) ** k for k in range(1, n + 1)] for i in range(1, n + 1)])
            sol = np.linalg.solve(r, np.stack([g[i] - g[0] for i in range(1, n + 1)]))
            derivs = [sol[k - 1] * math.factorial(k) for k in range(1, n + 1)]
        a_t = al(t_t)
        x_t = (a_t / al(t_s) * np.exp(L_s - L_t) * x_s[:, d].numpy() - a_t * np.exp(-L_t - S_s) * (I_t - I_s) * g[0]
               - a_t * np.exp(-L_t) * (C_t - C_s - B_s * (I_t - I_s)))
        inside = (grid >= lam_s - 1e-15) & (grid <= lam_t + 1e-15)
        for k in range(1, n + 1):
            e_k = cumulative_simpson(np.exp(big_l + big_s - L_s - S_s)[inside] * (grid[inside] - lam_s) ** k / math.factorial(k), x=grid[inside])[-1]
            x_t = x_t - a_t * np.exp(L_s - L_t) * e_k * derivs[k - 1]
        out[:, d] = torch.from_numpy(x_t)
    return out


def _uncorrected(model, x_T, plan, k):
    """The state the model is evaluated at on time ``plan.times[k]`` (before that step's corrector)."""
    if k == 0:
        return x_T
    steps = list(plan.steps[:k])
    steps[-1] = steps[-1].with_(corrector=0, corrector_variant=None)
    return fewstep.sample(model, x_T, SolverSchedule(times=plan.times[: k + 1], steps=tuple(steps), schedule=plan.schedule, statistics=plan.statistics))


@pytest.mark.parametrize("predictor_pseudo,corrector_pseudo", [(False, True), (True, False)])
def test_one_predictor_and_one_corrector_step_match_the_reference_formula(model, stats, x_T, predictor_pseudo, corrector_pseudo):
    plan = fewstep.preset("dpm_solver_v3", 8, SCHED, statistics=stats, order=3, predictor_pseudo=predictor_pseudo,
                          corrector=True, corrector_pseudo=corrector_pseudo)
    i = 4  # step t_4 -> t_5: order 3, its corrector re-uses the evaluation at t_5
    assert plan.steps[i].order == 3 and plan.steps[i].corrector == (4 if corrector_pseudo else 3)
    states = {}
    fewstep.sample(model, x_T, plan, callback=lambda j, t, x: states.__setitem__(j, x.clone()))  # corrected states
    times = plan.times
    evals = {j: _uncorrected(model, x_T, plan, j) for j in range(2, i + 2)}
    eps = {j: model.predict(evals[j], times[j]).eps for j in evals}
    # the predictor: from the corrected state at t_4 through the evaluations at t_4, t_3, t_2
    nodes = [i, i - 1, i - 2]
    want = _reference_step(stats, SCHED, states[i], times[i], times[i + 1], [times[j] for j in nodes], [evals[j] for j in nodes],
                           [eps[j] for j in nodes], predictor_pseudo)
    got = evals[i + 1]  # the predictor's result is what the model is evaluated at
    assert torch.allclose(got, want, rtol=0, atol=1e-8 * float(want.abs().max())), float((got - want).abs().max())
    # the corrector: from the same start through t_4, the new point t_5, then t_3 (and t_2 for the pseudo order 4)
    nodes = [i, i + 1, i - 1] + ([i - 2] if corrector_pseudo else [])
    want_c = _reference_step(stats, SCHED, states[i], times[i], times[i + 1], [times[j] for j in nodes], [evals[j] for j in nodes],
                             [eps[j] for j in nodes], corrector_pseudo)
    got_c = states[i + 1]
    assert torch.allclose(got_c, want_c, rtol=0, atol=1e-8 * float(want_c.abs().max())), float((got_c - want_c).abs().max())
    assert not torch.allclose(got_c, got, atol=1e-6)  # the corrector did something


# ---- 2. the degenerate statistics -------------------------------------------------------------------
def test_degenerate_statistics_give_dpm_solver_pp_and_unipc_with_exact_weights(model, x_T):
    lo, hi = float(SCHED.lambda_(SCHED.t_max)), float(SCHED.lambda_(SCHED.t_min))
    ones = ModelStatistics.constant((lo, hi), l=1.0, s=0.0, b=0.0, sample_shape=(DIM,), n_times=11)  # per-dimension path
    for nfe in (5, 8):
        v3 = fewstep.sample(model, x_T, "dpm_solver_v3", nfe=nfe, statistics=ones, corrector=False)
        dpmpp = fewstep.sample(model, x_T, "dpmpp_3m", nfe=nfe, solver_type="heun")  # exact (phi) weights throughout
        assert torch.allclose(v3, dpmpp, rtol=0, atol=1e-10), float((v3 - dpmpp).abs().max())
        plan = fewstep.preset("dpm_solver_v3", nfe, SCHED, statistics=ones, corrector=True, corrector_pseudo=False)
        exact = SolverSchedule(times=plan.times, schedule=plan.schedule, steps=tuple(
            s.with_(variant="phi", corrector_variant="phi" if s.corrector else None) if s.variant == "ems" else s for s in plan.steps))
        assert torch.allclose(fewstep.sample(model, x_T, plan), fewstep.sample(model, x_T, exact), rtol=0, atol=1e-10)
        with pytest.warns(UserWarning, match="degenerate"):  # without statistics: the same degenerate method
            plain = fewstep.sample(model, x_T, "dpm_solver_v3", nfe=nfe, corrector=False, order=3, predictor_pseudo=False, lower_order_final=True)
        assert torch.allclose(plain, dpmpp, rtol=0, atol=1e-10)
    real = fewstep.sample(model, x_T, "dpm_solver_v3", nfe=5, statistics=ones, corrector=False)
    other = ModelStatistics.constant((lo, hi), l=0.9, sample_shape=(DIM,))
    assert not torch.allclose(real, fewstep.sample(model, x_T, "dpm_solver_v3", nfe=5, statistics=other, corrector=False), atol=1e-6)


# ---- 3. convergence order -----------------------------------------------------------------------------
def test_convergence_order_on_the_oracle(oracle):
    """With smooth statistics (any l, s, b give a consistent integrator) on EDM's noisy window: the
    predictor of order p converges with order p, a corrector with as many nodes keeps order 3, and the
    pseudo-order corrector (divided differences taken as Taylor coefficients) is second order."""
    edm = fewstep.EDM()
    m = oracle.as_model(edm)
    lam = torch.linspace(float(edm.lambda_(edm.t_max)), float(edm.lambda_(edm.t_min)), 2001, dtype=torch.float64)
    phase = torch.arange(DIM, dtype=torch.float64) * 0.5
    st = ModelStatistics(lam, torch.sigmoid(-0.8 * (lam[:, None] - 1.0) + phase), 0.3 * torch.sin(0.5 * lam[:, None] + phase),
                         0.1 * torch.cos(0.7 * lam[:, None] + phase))
    x = fewstep.initial_noise(edm, (8, DIM), 0, dtype=torch.float64)
    ref = fewstep.reference_solution(m, x, t_end=edm.t_min, rtol=1e-13, atol=1e-13)
    nfes = [32, 64, 128]

    def order(**opts):
        errs = [fewstep.rmse(fewstep.sample(m, x, "dpm_solver_v3", nfe=n, statistics=st, t_end=edm.t_min, spacing="uniform_lambda",
                                            lower_order_final=False, **opts), ref) for n in nfes]
        return -np.polyfit(np.log(nfes), np.log(errs), 1)[0]

    assert abs(order(order=2, corrector=False) - 2.0) <= 0.3
    assert abs(order(order=3, corrector=False) - 3.0) <= 0.35
    assert order(order=3, corrector=True) >= 2.75  # the default: a corrector of as many nodes
    assert abs(order(order=3, corrector=True, corrector_pseudo=True) - 2.0) <= 0.3


# ---- 4. files and refusals ------------------------------------------------------------------------------
def test_statistics_round_trip_through_safetensors(stats, tmp_path):
    path = stats.save(tmp_path / "ems.safetensors")
    back = ModelStatistics.load(path)
    for name in ("lambdas", "l", "s", "b"):
        assert torch.equal(getattr(back, name), getattr(stats, name))
    assert (back.model, back.schedule, back.settings, back.cost, back.sample_shape) == (stats.model, stats.schedule, stats.settings, stats.cost, (DIM,))
    assert back.sha256 == stats.sha256 and len(back.sha256) == 64
    raw = path.read_bytes()
    assert b"pickle" not in raw and raw[8:].lstrip().startswith(b"{")  # safetensors: a JSON header, raw tensors


def test_statistics_files_are_validated(stats, tmp_path):
    from safetensors.torch import save

    good = {k: getattr(stats, k) for k in ("lambdas", "l", "s", "b")}
    meta = {"format": "fewstep.model_statistics", "version": "1", "fewstep": json.dumps({"sample_shape": [DIM], "model": None, "schedule": None})}
    cases = {
        "nan.st": ({**good, "s": torch.full_like(stats.s, math.nan)}, meta, "NaN"),
        "format.st": (good, {**meta, "format": "other"}, "not a fewstep statistics file"),
        "version.st": (good, {**meta, "version": "99"}, "unsupported statistics version"),
        "shape.st": ({**good, "b": stats.b[:-1]}, meta, "shape"),
        "order.st": ({**good, "lambdas": stats.lambdas.flip(0)}, meta, "increasing"),
    }
    for name, (tensors, md, match) in cases.items():
        (tmp_path / name).write_bytes(save(tensors, metadata=md))
        with pytest.raises(StatisticsError, match=match):
            ModelStatistics.load(tmp_path / name)
    (tmp_path / "junk.st").write_bytes(b"\x00" * 5)
    with pytest.raises(StatisticsError):
        ModelStatistics.load(tmp_path / "junk.st")


def test_schedule_files_reference_the_statistics_by_path_and_sha256(model, x_T, tmp_path):
    lo, hi = float(SCHED.lambda_(SCHED.t_max)), float(SCHED.lambda_(SCHED.t_min))
    big = ModelStatistics.constant((lo, hi), l=0.95, s=0.1, b=0.01, sample_shape=(DIM,), n_times=1001)  # too large to embed
    plan = fewstep.preset("dpm_solver_v3", 6, SCHED, statistics=big)
    with pytest.raises(SolverError, match=r"stats\.save"):
        plan.save(tmp_path / "plan.json")
    big.save(tmp_path / "stats" / "ems.safetensors")
    plan.save(tmp_path / "plan.json")
    ref = json.loads((tmp_path / "plan.json").read_text())["statistics"]
    assert ref["file"] == "stats/ems.safetensors" and ref["sha256"] == big.sha256
    back = SolverSchedule.load(tmp_path / "plan.json")
    assert back == plan and back.statistics.sha256 == big.sha256
    assert torch.equal(fewstep.sample(model, x_T, back), fewstep.sample(model, x_T, plan))
    ModelStatistics.constant((lo, hi), l=0.5, sample_shape=(DIM,), n_times=1001).save(tmp_path / "stats" / "ems.safetensors")
    with pytest.raises(ScheduleFileError, match="SHA-256"):
        SolverSchedule.load(tmp_path / "plan.json")
    (tmp_path / "stats" / "ems.safetensors").unlink()
    with pytest.raises(ScheduleFileError, match="cannot read statistics file"):
        SolverSchedule.load(tmp_path / "plan.json")


def test_small_statistics_are_embedded_in_the_schedule_file(model, stats, x_T, tmp_path):
    plan = fewstep.preset("dpm_solver_v3", 6, SCHED, statistics=stats)
    plan.save(tmp_path / "plan.json")
    assert "embedded" in json.loads((tmp_path / "plan.json").read_text())["statistics"]
    back = SolverSchedule.load(tmp_path / "plan.json")
    assert back.statistics.model == stats.model
    assert torch.equal(fewstep.sample(model, x_T, back), fewstep.sample(model, x_T, plan))


def test_statistics_of_another_model_schedule_or_shape_are_refused(model, stats, x_T, tmp_path):
    other = fewstep.GaussianMixture.random(DIM, 3, 1, seed=1).as_model(SCHED)
    with pytest.raises(SolverError, match="another model"):
        fewstep.sample(other, x_T, "dpm_solver_v3", nfe=5, statistics=stats)
    stats.save(tmp_path / "ems.safetensors")  # a file of this model, loaded and given to another one
    with pytest.raises(SolverError, match="another model"):
        fewstep.sample(other, x_T, "dpm_solver_v3", nfe=5, statistics=ModelStatistics.load(tmp_path / "ems.safetensors"))
    edm_model = fewstep.GaussianMixture.random(DIM, 3, 1, seed=0).as_model(fewstep.EDM())
    with pytest.raises(StatisticsError, match="noise schedule"):
        fewstep.sample(edm_model, fewstep.initial_noise(fewstep.EDM(), (2, DIM), 0, dtype=torch.float64), "dpm_solver_v3", nfe=5, statistics=stats)
    lo, hi = stats.lambda_range
    narrow = ModelStatistics.constant((lo, hi), sample_shape=(DIM + 1,))
    with pytest.raises(ShapeError, match="shape"):
        fewstep.sample(model, x_T, "dpm_solver_v3", nfe=5, statistics=narrow)
    short = ModelStatistics.constant((lo + 1.0, hi), sample_shape=(DIM,))
    with pytest.raises(StatisticsError, match="outside the log-SNRs"):
        fewstep.sample(model, x_T, "dpm_solver_v3", nfe=5, statistics=short)


# ---- 5. cost, the estimator, parallel sampling -----------------------------------------------------------
def test_the_cost_of_the_statistics_is_counted_exactly(oracle):
    seen = {"calls": 0, "rows": 0, "jvp_rows": 0}
    inner = oracle.as_model(SCHED)

    def counted(x, t):
        import torch.autograd.forward_ad as fwAD

        seen["calls"] += 1
        seen["rows"] += x.shape[0]
        seen["jvp_rows"] += x.shape[0] if fwAD.unpack_dual(x).tangent is not None else 0
        return inner.fn(x, t)

    m = fewstep.Model(counted, SCHED, "x0", sample_shape=(DIM,))
    # trajectories, f' by the secant: one JVP per sample and point; by a second JVP: two
    for derivative, per in (("secant", 1), ("jvp", 2)):
        seen.update(calls=0, rows=0, jvp_rows=0)
        m.reset_counters()
        st = fewstep.model_statistics(m, n_samples=10, n_times=7, batch_size=4, dtype=torch.float64, derivative=derivative)
        assert seen == {"calls": per * 7 * 3, "rows": per * 7 * 10, "jvp_rows": per * 7 * 10}
        assert (st.cost["model_calls"], st.cost["model_evaluations"], st.cost["jvps"]) == (seen["calls"], seen["rows"], seen["jvp_rows"])
        assert (m.calls, m.evaluations) == (seen["calls"], seen["rows"]) and st.settings["derivative"] == derivative
    data = oracle.sample(6, seed=1)
    st2 = fewstep.model_statistics(m, n_samples=6, n_times=5, batch_size=6, data=data, dtype=torch.float64)
    assert st2.cost["model_evaluations"] == 2 * 5 * 6 and st2.settings["samples"] == "data" and st2.l.shape == (5, DIM)
    assert st2.settings["derivative"] == "jvp"
    with pytest.raises(fewstep.errors.ArgumentError, match="secant"):  # no trajectory to take a secant along
        fewstep.model_statistics(m, n_samples=6, n_times=5, data=data, dtype=torch.float64, derivative="secant")
    with pytest.raises(fewstep.errors.ArgumentError, match="derivative"):
        fewstep.model_statistics(m, n_samples=6, n_times=5, dtype=torch.float64, derivative="exact")


def test_the_estimator_matches_the_statistics_of_a_gaussian():
    """Data ``N(mu, diag(c))``: ``eps`` is linear with a diagonal Jacobian, so ``l = 1 / (1 + c e^(2 lambda))``
    exactly (the Rademacher estimate has no off-diagonal noise), ``f = -mu l`` is the same for every
    sample (``s = 0``) and ``b = f' = 2 mu c e^(2 lambda) l^2`` (up to the central difference of l,
    O(dlambda^2), without the reference's smoothing of l')."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(1, DIM, generator=g, dtype=torch.float64)
    c = (0.2 + torch.rand(1, DIM, generator=g, dtype=torch.float64)) ** 2
    m = fewstep.GaussianMixture(torch.ones(1, dtype=torch.float64), mu, c).as_model(fewstep.LinearVP())
    st = fewstep.model_statistics(m, n_samples=8, n_times=201, dtype=torch.float64, smooth=0)
    e2 = torch.exp(2 * st.lambdas)[:, None]
    l_exact = 1.0 / (1.0 + c * e2)
    assert torch.allclose(st.l, l_exact, rtol=0, atol=1e-10)
    assert float(st.s.abs().max()) < 1e-6
    b_exact = 2 * mu * c * e2 * l_exact**2
    assert torch.allclose(st.b, b_exact, rtol=0, atol=1.5e-3 * float(b_exact.abs().max()))


@pytest.mark.parametrize("derivative", ["jvp", "secant"])
def test_s_and_b_are_the_least_squares_fit_of_f_prime_on_f(model, derivative):
    """At a few log-SNRs, ``f`` and ``f'`` recomputed from the same trajectory states (the statistics'
    own solver, re-run with ``sample``), ``f'`` with ``eps'`` as a central difference along
    ``(dx/dlambda, 1)`` (``jvp``) or with the data prediction's derivative as the central difference
    between the trajectory's neighbouring grid points (``secant``), then ``s, b`` by least squares per
    dimension."""
    from fewstep.statistics import _smoothed_derivative

    stats = fewstep.model_statistics(model, n_samples=32, n_times=61, seed=0, dtype=torch.float64, derivative=derivative)

    times = [float(SCHED.t_of_lambda(torch.tensor(v, dtype=torch.float64))) for v in stats.lambdas.tolist()]
    plan = fewstep.preset("dpmpp_3m", len(times), SCHED, spacing=times + [SCHED.t_clean], lower_order_final=False)
    x_T = fewstep.initial_noise(SCHED, (32, DIM), 0, t_start=times[0], dtype=torch.float64)
    states = {0: x_T}
    fewstep.sample(model, x_T, plan, callback=lambda i, t, x: states.__setitem__(i, x.clone()))
    l_d = _smoothed_derivative(stats.l.numpy(), stats.lambdas.numpy(), 5)
    lam_of = lambda t: float(SCHED.lambda_(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
    for j in (3, 20, 40, 57):
        lam, x = float(stats.lambdas[j]), states[j]
        t = times[j]
        a, s = float(SCHED.alpha(t)), float(SCHED.sigma(t))
        eps = model.predict(x, t).eps
        d = 1e-4
        tp, tm = (float(SCHED.t_of_lambda(torch.tensor(lam + sgn * d, dtype=torch.float64))) for sgn in (1, -1))
        dlog_a = (math.log(float(SCHED.alpha(tp))) - math.log(float(SCHED.alpha(tm)))) / (2 * d)
        dx = dlog_a * x - s * eps
        deps = (model.predict(x + d * dx, tp).eps - model.predict(x - d * dx, tm).eps) / (2 * d)
        l = stats.l[j]
        f = (s * eps - l * x) / a
        if derivative == "jvp":
            fp = math.exp(-lam) * ((l - 1) * eps + deps) - torch.from_numpy(l_d[j]) * x / a
        else:  # f = -x0 + (1 - l) x / alpha: -x0' between the neighbours - (1 - l) e^-lambda eps - l' x / alpha
            x0 = [(states[k] - float(SCHED.sigma(times[k])) * model.predict(states[k], times[k]).eps) / float(SCHED.alpha(times[k]))
                  for k in (j - 1, j + 1)]
            d_x0 = (x0[1] - x0[0]) / float(stats.lambdas[j + 1] - stats.lambdas[j - 1])
            fp = -d_x0 - (1 - l) * math.exp(-lam) * eps - torch.from_numpy(l_d[j]) * x / a
        fc, fpc = f - f.mean(0), fp - fp.mean(0)
        s_ls = (fc * fpc).mean(0) / (fc * fc).mean(0)
        b_ls = fp.mean(0) - s_ls * f.mean(0)
        assert torch.allclose(stats.s[j], s_ls, rtol=1e-4, atol=1e-6), (j, stats.s[j], s_ls)
        assert torch.allclose(stats.b[j], b_ls, rtol=1e-4, atol=1e-6 * (1 + float(b_ls.abs().max()))), (j, stats.b[j], b_ls)
        assert abs(lam - lam_of(t)) < 1e-9


def test_the_secant_derivative_is_not_thrown_by_a_fast_wiggle_in_time(oracle, model):
    """A network's sinusoidal time embedding makes its output wiggle between nearby times (on the bundled
    8x8 network, a period of about 6 of its 1000 steps). Here the oracle's output times
    ``1 + 2e-3 sin(3 t)``: the outputs barely move, but their derivative in ``t`` does. The JVP's ``f'``
    takes that derivative, and its ``s`` moves by about 0.5 from the clean model's (median over log-SNRs and
    dimensions); the secant between the trajectory's grid points sees the wiggle's size, not its
    slope, and stays within 0.05."""
    def wiggly(x, t):
        return model.fn(x, t) * (1 + 2e-3 * torch.sin(3.0 * t).reshape(-1, 1))

    m = fewstep.Model(wiggly, SCHED, "x0", sample_shape=(DIM,))
    clean = fewstep.model_statistics(model, n_samples=32, n_times=61, seed=0, dtype=torch.float64, derivative="jvp")
    moved = {d: float((fewstep.model_statistics(m, n_samples=32, n_times=61, seed=0, dtype=torch.float64, derivative=d).s - clean.s)
                      .abs().median()) for d in ("jvp", "secant")}
    assert moved["secant"] < 0.05 < 0.2 < moved["jvp"], moved


def test_the_derivative_of_l_is_smoothed_as_the_reference_does():
    """``compute_l_d``: central differences (one-sided at the ends), then the mean over i-5..i+5,
    truncated at the ends (the reference's loop, written out)."""
    from fewstep.statistics import _smoothed_derivative

    rng = np.random.default_rng(0)
    lam = np.linspace(-3.0, 2.0, 40)
    l = rng.normal(size=(40, 3))
    gap = lam[1] - lam[0]
    d = [(l[1] - l[0]) / gap] + [(l[i + 1] - l[i - 1]) / (2 * gap) for i in range(1, 39)] + [(l[39] - l[38]) / gap]
    w, n = 5, 40
    want = [np.sum(d[: i + w + 1], axis=0) / (i + w + 1) if i < w else np.sum(d[i - w:], axis=0) / (n - i + w) if i >= n - w
            else np.sum(d[i - w: i + w + 1], axis=0) / (2 * w + 1) for i in range(n)]
    assert np.allclose(_smoothed_derivative(l, lam, 5), np.array(want), rtol=1e-12, atol=1e-12)


def test_parallel_sampling_gives_the_sequential_samples(model, stats, x_T):
    seq = fewstep.sample(model, x_T, "dpm_solver_v3", nfe=8, statistics=stats)
    par = fewstep.sample(model, x_T, "dpm_solver_v3", nfe=8, statistics=stats, parallel=fewstep.ParallelOptions(window=4, tol=0.0))
    assert torch.allclose(par, seq, rtol=0, atol=1e-10)
    assert seq.dtype == torch.float64 and torch.isfinite(seq).all()
    f32 = fewstep.sample(model, x_T.float(), "dpm_solver_v3", nfe=8, statistics=stats)
    assert f32.dtype == torch.float32 and torch.allclose(f32.double(), seq, atol=1e-4)

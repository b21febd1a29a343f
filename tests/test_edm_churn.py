"""EDM's stochastic samplers (Karras et al. 2022, Algorithm 2: ``s_churn``) equal k-diffusion's
``sample_euler`` / ``sample_heun`` given the same noise, and keep fewstep's reproducibility.

k-diffusion's ``sampling.py`` is loaded on its own (``benchmarks/peers.py``; ``import k_diffusion``
needs torchvision, which does not load beside the CPU torch). Its step ``i`` draws
``torch.randn_like(x)`` once whether or not it churns; fewstep's churn noise is the increment of
Brownian channel 1 over the step's interval, so :class:`ReplayChurn` hands out draw ``i`` for the
interval starting at grid point ``i`` and checks that only channel 1 is asked. The oracle (float64,
EDM schedule: alpha = 1, sigma = t) is exact, so both sides differ only by rounding. Each
comparison also redraws one churned step's noise and requires a large difference (the test cannot
pass without the noise being used).
"""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest
import torch

import fewstep
from fewstep.solvers.compile import Combine, Evaluate, compile_plan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from peers import load_k_sampling  # noqa: E402

RTOL = 1e-12


def _k_sampling() -> types.ModuleType:
    try:
        return load_k_sampling()
    except ImportError as exc:  # `make test` installs it; a bare `pip install -e .[dev]` may not
        pytest.skip(str(exc))


class ReplayChurn:
    """fewstep noise source: the churn noise of the step starting at grid point ``i`` is ``draws[i]``."""

    def __init__(self, lams: list[float], draws: list[torch.Tensor]) -> None:
        self.lams, self.draws, self.asked = lams, draws, []

    def increment(self, lam_from, lam_to, shape, *, indices=None, dtype=torch.float32, device=None, channel=0):
        assert channel == 1, "only the churn channel draws noise in these presets"
        i = min(range(len(self.lams)), key=lambda k: abs(self.lams[k] - lam_from))
        assert math.isclose(self.lams[i], lam_from, rel_tol=1e-12) and math.isclose(self.lams[i + 1], lam_to, rel_tol=1e-12)
        self.asked.append(i)
        return self.draws[i].to(dtype=dtype, device=device)


def _k_run(ks, fn, model, x, sigmas, draws, **churn):
    """Run ``ks.<fn>`` with ``torch.randn_like`` answering step ``i`` with ``draws[i]``."""
    queue = list(draws)
    real = ks.torch

    class TorchWithDraws(types.SimpleNamespace):
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def randn_like(t):
            return queue.pop(0).to(t)

    ks.torch = TorchWithDraws()
    try:
        def denoiser(xx, sigma):
            return model.predict(xx, float(sigma[0])).x0

        out = getattr(ks, fn)(denoiser, x.clone(), sigmas, disable=True, **churn)
    finally:
        ks.torch = real
    assert not queue, "k-diffusion drew once per step"
    return out


# s_tmax below sigma_max / (1 + gamma): fewstep caps a churned level at the schedule's largest (80),
# k-diffusion does not (test_churn_capped_at_sigma_max)
CASES = [
    ("euler", "sample_euler", 8, dict(s_churn=2.0, s_tmax=40.0)),
    ("euler", "sample_euler", 12, dict(s_churn=80.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.007)),
    ("heun", "sample_heun", 6, dict(s_churn=1.5, s_tmax=40.0)),
    ("heun", "sample_heun", 10, dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)),
]


@pytest.mark.parametrize("preset,k_fn,n_steps,churn", CASES)
def test_churn_matches_k_diffusion(preset, k_fn, n_steps, churn, small_gmm):
    ks = _k_sampling()
    sched = fewstep.EDM()
    model = small_gmm.as_model(sched, "x0")
    sigmas = ks.get_sigmas_karras(n_steps, 0.002, 80.0, rho=7.0, device="cpu").double()
    grid = [float(s) for s in sigmas]
    nfe = n_steps if preset == "euler" else 2 * n_steps - 1
    plan = fewstep.preset(preset, nfe, sched, spacing=grid, **churn)
    assert list(plan.times) == grid and sum(st.churn > 0 for st in plan.steps) >= 2
    g = torch.Generator().manual_seed(7)
    x = 80.0 * torch.randn(5, small_gmm.means.shape[1], generator=g, dtype=torch.float64)
    draws = [torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(n_steps)]

    ref = _k_run(ks, k_fn, model, x, sigmas, draws, **churn)
    lams = [-math.log(s) if s > 0 else math.inf for s in grid]
    replay = ReplayChurn(lams, draws)
    ours = fewstep.sample(model, x, plan, noise=replay)
    churned = [i for i, st in enumerate(plan.steps) if st.churn > 0]
    assert sorted(replay.asked) == churned
    err = float((ours - ref).norm() / ref.norm())
    print(f"{preset} n={n_steps} {churn}: rel err {err:.2e}")
    assert err < RTOL

    other = list(draws)
    other[churned[len(churned) // 2]] = torch.randn(x.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    moved = fewstep.sample(model, x, plan, noise=ReplayChurn(lams, other))
    assert float((moved - ref).norm() / ref.norm()) > 1e-4


def test_churn_capped_at_sigma_max(small_gmm):
    """A churn from the schedule's largest noise level cannot raise it (the model's time range ends
    there): that step is deterministic, and the next steps churn as usual."""
    sched = fewstep.EDM()
    plan = fewstep.preset("euler", 6, sched, spacing="karras", s_churn=2.0)
    assert plan.times[0] == sched.t_max and all(st.churn > 0 for st in plan.steps)
    compiled = compile_plan(plan, sched)
    churn_noise = [op for op in compiled.ops if isinstance(op, Combine) and any(nz[3] == 1 for nz in op.noise)]
    assert len(churn_noise) == plan.n_steps - 1
    assert [op.t for op in compiled.ops if isinstance(op, Evaluate)][0] == sched.t_max


def test_edm_sde_preset_defaults_and_reproducibility(small_gmm):
    """``edm_sde`` = Heun with EDM's ImageNet-64 churn settings; same seed => same samples at any
    batch split; the churn noise is independent of the step noise channel."""
    sched = fewstep.EDM()
    model = small_gmm.as_model(sched, "x0")
    plan = fewstep.preset("edm_sde", 21, sched)
    gamma = min(40.0 / plan.n_steps, math.sqrt(2) - 1)
    levels = [float(t) for t in plan.times[:-1]]
    assert [st.churn for st in plan.steps] == [gamma if 0.05 <= lv <= 50.0 else 0.0 for lv in levels]
    assert all(st.churn_noise == 1.003 for st in plan.steps if st.churn) and plan.nfe == 21
    x = fewstep.initial_noise(sched, (7, small_gmm.means.shape[1]), seed=1, dtype=torch.float64)
    full = fewstep.sample(model, x, plan, seed=5)
    part = fewstep.sample(model, x[3:], plan, seed=5, sample_indices=list(range(3, 7)))
    assert torch.equal(full[3:], part)
    assert not torch.equal(full, fewstep.sample(model, x, plan, seed=6))
    assert torch.equal(full, fewstep.sample(model, x, "heun", nfe=21, seed=5, s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003))


def test_churn_round_trip_and_refusals(tmp_path, small_gmm):
    sched = fewstep.EDM()
    plan = fewstep.preset("euler", 10, sched, s_churn=3.0)
    path = tmp_path / "churn.json"
    plan.save(path)
    again = fewstep.SolverSchedule.load(path)
    assert again == plan and again.steps[1].churn == pytest.approx(0.3)
    with pytest.raises(fewstep.SolverError, match="churn"):
        fewstep.Step(churn=-1.0)
    with pytest.raises(fewstep.SolverError, match="s_churn"):
        fewstep.preset("heun", 9, sched, s_churn=math.inf)
    model = small_gmm.as_model(sched, "x0")
    x = fewstep.initial_noise(sched, (2, small_gmm.means.shape[1]), seed=0, dtype=torch.float64)
    out, info = fewstep.sample(model, x, plan, return_info=True)  # no seed: one is drawn and reported
    assert torch.equal(out, fewstep.sample(model, x, plan, seed=info.extra["seed"]))

"""k-diffusion interop both ways, against k-diffusion's own samplers (``k_diffusion/sampling.py``
loaded on its own, as benchmarks/peers.py does) on the exact oracle as a k-diffusion denoiser
``D(x, sigma)`` (float64, so both sides differ by rounding only)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fewstep
from fewstep.integrations.kdiffusion import from_denoiser, plan_for_sigmas, sampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from peers import load_k_sampling  # noqa: E402

RTOL = 1e-12


@pytest.fixture(scope="module")
def ks():
    try:
        return load_k_sampling()
    except ImportError as exc:  # `make test` installs it
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def denoiser(small_gmm):
    oracle = small_gmm.as_model(fewstep.EDM(), "x0")

    def D(x, sigma, scale=1.0):  # a k-diffusion denoiser: VE x, per-sample sigma -> x0
        return scale * oracle.predict(x, sigma.to(torch.float64)).x0

    return D


def _rel(a, b):
    return float((a - b).norm() / b.norm())


CASES = [  # (k-diffusion sampler, fewstep preset with the options that make it the same algorithm)
    ("sample_euler", "euler", {}),
    ("sample_heun", "heun", {}),
    ("sample_dpmpp_2m", "dpmpp_2m", {"final_order": 1, "lower_order_final": False}),
]


@pytest.mark.parametrize("k_fn,name,opts", CASES, ids=[c[1] for c in CASES])
@pytest.mark.parametrize("n", [5, 12])
def test_a_k_diffusion_denoiser_as_a_fewstep_model_and_a_preset_as_a_k_sampler(ks, denoiser, k_fn, name, opts, n):
    sigmas = ks.get_sigmas_karras(n, 0.002, 80.0, rho=7.0).double()
    x = 80.0 * torch.randn(6, 8, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    ref = getattr(ks, k_fn)(denoiser, x.clone(), sigmas, disable=True)
    # a fewstep preset as a k-diffusion sampler
    got = sampler(name, **opts)(denoiser, x.clone(), sigmas)
    assert _rel(got, ref) < RTOL, (name, _rel(got, ref))
    # the denoiser as a fewstep model, run by fewstep.sample on the same grid
    model = from_denoiser(denoiser)
    plan = plan_for_sigmas(name, sigmas, model.schedule, **opts)
    assert plan.n_steps == n
    assert _rel(fewstep.sample(model, x, plan), ref) < RTOL


def test_extra_args_callback_and_stochastic_presets(ks, denoiser):
    sigmas = ks.get_sigmas_karras(10, 0.002, 80.0).double()
    x = 80.0 * torch.randn(4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen = []
    a = sampler("unipc")(denoiser, x, sigmas, extra_args={"scale": 0.9}, callback=lambda d: seen.append(d["i"]))
    b = sampler("unipc")(lambda xx, s: denoiser(xx, s, scale=0.9), x, sigmas)
    assert torch.equal(a, b) and seen == list(range(10))
    sde = sampler("dpmpp_2m_sde")
    full = sde(denoiser, x, sigmas, seed=3)
    assert torch.equal(full, sde(denoiser, x, sigmas, seed=3)) and not torch.equal(full, sde(denoiser, x, sigmas, seed=4))
    # any fewstep feature on a k-diffusion denoiser: parallel sampling
    model = from_denoiser(denoiser)
    seq = fewstep.sample(model, x, "dpmpp_2m", nfe=40)
    par = fewstep.sample(model, x, "dpmpp_2m", nfe=40, parallel=True)
    assert fewstep.rmse(par, seq) < 1e-3
    with pytest.raises(fewstep.ArgumentError):
        from_denoiser("not a function")


def test_sigmas_on_the_device_are_read_once_and_the_default_seed_is_fresh(denoiser):
    """k-diffusion passes ``sigmas`` where the model runs (``get_sigmas_karras(..., device=...)``):
    they are read to the host once per call, not once per element (a host synchronisation each on
    a GPU). Without ``seed`` a stochastic preset draws a fresh one from torch's global generator, as
    k-diffusion's own ``torch.randn_like`` does: ``torch.manual_seed`` repeats it."""
    from torch.overrides import TorchFunctionMode

    sigmas = torch.tensor([80.0, 20.0, 5.0, 1.0, 0.2, 0.02, 0.0], dtype=torch.float64)
    ptr = sigmas.untyped_storage().data_ptr()

    class Reads(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("item", "tolist", "__float__", "__bool__", "__int__", "__index__", "numpy") and args \
                    and isinstance(args[0], torch.Tensor) and args[0].untyped_storage().data_ptr() == ptr:
                Reads.n += 1
            return func(*args, **(kwargs or {}))

    x = 80.0 * torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with Reads():
        sampler("dpmpp_2m")(denoiser, x, sigmas)
    assert Reads.n == 1
    sde = sampler("dpmpp_2m_sde")
    torch.manual_seed(11)
    a = sde(denoiser, x, sigmas)
    b = sde(denoiser, x, sigmas)
    torch.manual_seed(11)
    assert not torch.equal(a, b) and torch.equal(a, sde(denoiser, x, sigmas))

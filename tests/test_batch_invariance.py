"""What is promised across batch sizes (issue 27, item 6): sample ``k`` is bitwise the same whatever
the batch it is in when the model computes each row on its own; the step noise and the sampling
loop's arithmetic are elementwise, so only the model's own batched rounding can move it."""

from __future__ import annotations

import pytest
import torch

import fewstep
from fewstep.noise import BrownianNoise, IntervalNoise

PRESETS = ["ddpm", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_sde", "sa_solver", "er_sde", "ddim:eta=0.5",
           "lcm", "edm_sde:s_churn=20", "ddim", "dpmpp_2m", "unipc", "heun"]
DIM = 5  # odd: rows straddle the ends of vectorised blocks differently at every batch size
BATCH = 24


def _spec(spec: str) -> tuple[str, dict[str, float]]:
    name, _, opts = spec.partition(":")
    return name, {k: float(v) for k, v in (o.split("=") for o in opts.split(",") if o)}


@pytest.fixture(scope="module")
def row_model() -> fewstep.Model:
    """A Gaussian-mixture oracle evaluated one row at a time: its output for a row cannot depend on
    the batch (the oracle's batched einsum rounds by batch size at larger dimensions)."""
    oracle = fewstep.GaussianMixture.random(DIM, 3, 2, seed=4)
    inner = oracle.as_model(fewstep.DiscreteVP.linear(), "eps")

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([inner.fn(x[i:i + 1], t[i:i + 1] if t.ndim else t) for i in range(x.shape[0])])

    return fewstep.Model(fn, inner.schedule, "eps", sample_shape=(DIM,))


@pytest.mark.parametrize("noise", ["brownian", "interval"])
@pytest.mark.parametrize("spec", PRESETS)
def test_a_sample_is_bitwise_the_same_in_any_batch(spec, noise, row_model):
    name, kw = _spec(spec)
    x = fewstep.initial_noise(row_model.schedule, (BATCH, DIM), 0, dtype=torch.float64)
    full = fewstep.sample(row_model, x, name, nfe=8, seed=5, noise=noise, **kw)
    for rows in ([9], list(range(7)), [23, 0, 17, 4], list(range(BATCH))[::-1]):
        part = fewstep.sample(row_model, x[rows], name, nfe=8, seed=5, noise=noise, sample_indices=rows, **kw)
        assert torch.equal(part, full[rows]), (spec, noise, rows)


def test_float32_samples_too(row_model):
    x = fewstep.initial_noise(row_model.schedule, (BATCH, DIM), 0)
    full = fewstep.sample(row_model, x, "dpmpp_2m_sde", nfe=8, seed=2)
    part = fewstep.sample(row_model, x[5:11], "dpmpp_2m_sde", nfe=8, seed=2, sample_indices=range(5, 11))
    assert torch.equal(part, full[5:11])


@pytest.mark.parametrize("source", [BrownianNoise, IntervalNoise])
def test_noise_for_rows_that_straddle_blocks(source):
    """Odd row lengths (vector blocks end inside rows) and sizes past the generator's chunking."""
    for n in (1, 3, 7, 33):
        full = source(7).increment(-1.0, 0.5, (67, n), dtype=torch.float64)
        for idx in ([0], [66], list(range(13)), list(range(66, -1, -1))):
            assert torch.equal(source(7).increment(-1.0, 0.5, (len(idx), n), indices=idx, dtype=torch.float64), full[idx])


def test_a_reused_source_keys_its_cache_by_the_indices_not_their_object():
    """One BrownianNoise asked for two batches of the same shape whose indices come in one buffer
    refilled in place (a large batch: more than 4096 rows) gives each batch its own noise."""
    n = 5000
    bn, buf = BrownianNoise(3), torch.arange(n)
    bn.increment(-1.0, 0.5, (n, 1), indices=buf)
    buf += n
    second = bn.increment(-1.0, 0.5, (n, 1), indices=buf)
    assert torch.equal(second, BrownianNoise(3).increment(-1.0, 0.5, (n, 1), indices=torch.arange(n, 2 * n)))

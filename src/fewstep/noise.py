"""Reproducible noise keyed by ``(seed, sample index, step)``.

Sample ``k`` of a batch gets the same noise whatever the batch size, its position in the batch,
or how the batch is split across devices: every sample draws from its own generator seeded by
a hash of ``(seed, index, step)``. Noise is drawn on the CPU in float64 and then moved, so it is
also identical across devices.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from .errors import ShapeError

__all__ = ["noise_seed", "keyed_noise", "initial_noise"]


def noise_seed(seed: int, index: int, step: int = -1) -> int:
    """A 63-bit generator seed from ``(seed, sample index, step)`` (step -1 = initial noise)."""
    digest = hashlib.blake2b(f"fewstep:{int(seed)}:{int(index)}:{int(step)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keyed_noise(
    shape: Sequence[int],
    seed: int,
    *,
    step: int = -1,
    indices: Sequence[int] | torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard normal noise of ``shape = (batch, ...)``; row ``j`` depends only on ``(seed, indices[j], step)``."""
    shape = tuple(int(s) for s in shape)
    idx = list(range(shape[0])) if indices is None else [int(i) for i in torch.as_tensor(indices).tolist()]
    if len(idx) != shape[0]:
        raise ShapeError(f"{len(idx)} sample indices for a batch of {shape[0]}")
    rows = []
    for i in idx:
        g = torch.Generator().manual_seed(noise_seed(seed, i, step))
        rows.append(torch.randn(shape[1:], generator=g, dtype=torch.float64))
    return torch.stack(rows).to(device=device, dtype=dtype)


def initial_noise(
    schedule: "object",
    shape: Sequence[int],
    seed: int = 0,
    *,
    t_start: float | None = None,
    indices: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``x_T = sigma(t_start) z`` with keyed ``z``: the usual prior at the start time (``init_noise_sigma``)."""
    t0 = schedule.t_max if t_start is None else t_start  # type: ignore[attr-defined]
    sig = float(schedule.sigma(float(t0)))  # type: ignore[attr-defined]
    return (sig * keyed_noise(shape, seed, indices=indices, dtype=torch.float64)).to(device=device, dtype=dtype)

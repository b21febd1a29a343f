"""Reproducible noise: keyed initial noise and Brownian-consistent step noise, generated on the device.

Initial noise ``x_T`` is keyed by ``(seed, sample index)`` (:func:`initial_noise`, drawn on the CPU
in float64 and moved: identical on every device; cached references and searched schedules depend
on it, so its keying never changes).

Step noise comes from a **counter-based generator** evaluated with tensor operations on the
tensor's own device (:func:`counter_normals`): element ``j`` of sample ``k`` is a pure function of
``(seed, k, node, j)`` (a SplitMix64 hash of the key, 32-bit integer hashes of the key and the
counter, the Box-Muller transform in float32), so sample ``k`` gets bitwise the same noise whatever the batch
size, its position in the batch, or the split of the batch across devices (every operation on it is
elementwise, as are the sampling loop's combinations: with a model that computes each row on its own,
the samples themselves are bitwise batch-independent). Nothing is read back from the device: the keys
are host data, the sample indices are moved to the device once per run (:class:`_Rows`).

A stochastic step from log-SNR ``lambda_s`` to ``lambda_t`` draws the normalised increment
``z = (W(u_s) - W(u_t)) / sqrt(u_s - u_t)`` of **one Brownian path per (seed, sample)**
(:class:`BrownianNoise`), in the time ``u = 1 / (1 + e^(lambda / 4))`` (0 at the data, 1 at pure
noise, for every noise schedule). ``W`` is a Lévy-Ciesielski (Brownian-tree) construction: the
value at the midpoint of a dyadic cell is the mean of its ends plus ``sqrt(width / 4)`` times a
keyed normal, down to cells of width ``2^-depth``, and inside such a cell the exact Brownian bridge
at the queried point. So a finer grid refines *the same* path (strong convergence can be measured,
a stochastic sampler compared with a fine-grid reference, a stochastic schedule searched), steps
over disjoint intervals get independent standard normal ``z``, and two intervals that overlap get
exactly the Brownian correlation (the stage and the whole step of a stochastic singlestep method).
A new grid point costs the keyed normals of the tree nodes below its lowest common ancestor with
the previous point (about ``depth - log2(N) + 1`` on an ``N``-step grid); :class:`IntervalNoise` costs one per step
but is keyed by the interval, so two different grids see unrelated paths.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import struct
from collections import OrderedDict
from functools import lru_cache
from typing import Any, Callable, Protocol, Sequence

import torch

from .errors import ArgumentError, ShapeError, SolverError

__all__ = [
    "noise_seed", "keyed_noise", "initial_noise", "counter_normals", "NoiseSource", "BrownianNoise",
    "IntervalNoise", "brownian_time", "make_noise_source",
]

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(v: int) -> int:
    v &= _M64
    return v - (1 << 64) if v >= 1 << 63 else v


def _mix_int(v: int) -> int:
    """SplitMix64's finaliser on a Python integer (mod 2^64)."""
    v &= _M64
    v = ((v ^ (v >> 30)) * _MIX1) & _M64
    v = ((v ^ (v >> 27)) * _MIX2) & _M64
    return v ^ (v >> 31)


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 tensors (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


_S_MIX1, _S_MIX2, _S_GOLDEN = _signed(_MIX1), _signed(_MIX2), _signed(_GOLDEN)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (wrapping multiplication, logical shifts)."""
    x = x ^ _srl(x, 30)
    x = x * _S_MIX1
    x = x ^ _srl(x, 27)
    x = x * _S_MIX2
    return x ^ _srl(x, 31)


def _i32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


_H1, _H2 = _i32(0x7FEB352D), _i32(0x846CA68B)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer bijection with good avalanche (Wellons' "lowbias32") on int32 tensors:
    vectorised on the CPU (unlike 64-bit multiplication) and native on GPUs."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _H1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _H2
    return x ^ ((x >> 16) & 0xFFFF)


def keyed_normal_stack(keys: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, K, n)`` float32: ``[b, k]`` is the vector of ``n`` standard normals of the int64 key
    ``keys[b, k]``.

    The 64-bit key is split into 32-bit words ``(a, b)``; pair ``p`` of elements gets the hashes
    ``x1 = h(h(p ^ a) ^ b)`` and ``x2 = h(x1 ^ a')`` (``h`` = :func:`_hash32`, ``a' = a ^ const``), whose
    top 24 bits give the uniforms ``u1 = (x1' + 1/2) 2^-24`` in (0, 1) and ``theta = 2 pi x2' 2^-24``;
    the Box-Muller transform in float32 (a quarter of the cost of float64 here; tails to |z| = 5.9)
    gives element ``p`` (cosine) and element ``m + p`` (sine), ``m = ceil(n / 2)``."""
    m = (n + 1) // 2
    a = (keys & 0xFFFFFFFF).to(torch.int32)[:, :, None]
    b = _srl(keys, 32).to(torch.int32)[:, :, None]
    pairs = torch.arange(m, dtype=torch.int32, device=keys.device)
    x1 = _hash32(_hash32(pairs ^ a) ^ b)
    x2 = _hash32(x1 ^ (a ^ 0x2545F491))
    u1 = (((x1 >> 8) & 0xFFFFFF).to(torch.float32) + 0.5) * 2.0**-24
    theta = ((x2 >> 8) & 0xFFFFFF).to(torch.float32) * (2.0 * math.pi * 2.0**-24)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return torch.cat([r * torch.cos(theta), r * torch.sin(theta)], dim=2)[:, :, :n]


def _normals_of_keys(keys: torch.Tensor, coefs: torch.Tensor, n: int) -> torch.Tensor:
    """``sum_k coefs[k] z(keys[:, k])`` (float64) of :func:`keyed_normal_stack`'s normals, summed in float64."""
    z = keyed_normal_stack(keys, n)
    if keys.shape[1] == 1:
        return z[:, 0].to(torch.float64) * coefs[0]
    out = torch.zeros((keys.shape[0], n), dtype=torch.float64, device=keys.device)
    for k in range(keys.shape[1]):
        out.add_(z[:, k], alpha=float(coefs[k]))
    return out


_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}
_CHUNK_ELEMS = 1 << 22


def _compile_wanted(device: torch.device) -> bool:
    """``FEWSTEP_COMPILE_NOISE=1`` compiles the generator with ``torch.compile`` (one fused kernel;
    on this project's CPU ~4x faster after a one-off compile of seconds). Off by default: on an H100
    the Triton build of the integer hash did not reproduce the eager values (NaN noise,
    benchmarks/reports/noise_cost_gpu.md), and the eager generator is bitwise batch-independent."""
    mode = os.environ.get("FEWSTEP_COMPILE_NOISE", "0").strip().lower()
    return mode in ("1", "true", "yes", "on")


def _generator(device: torch.device) -> Callable[..., torch.Tensor]:
    if not _compile_wanted(device):
        return _normals_of_keys
    key = device.type
    if key not in _COMPILED:
        try:
            _COMPILED[key] = torch.compile(_normals_of_keys, dynamic=True)
        except Exception:  # pragma: no cover - no compiler backend: the eager generator is exact too
            _COMPILED[key] = _normals_of_keys
    return _COMPILED[key]


def counter_normals(keys: torch.Tensor, coefs: Sequence[float] | torch.Tensor, n: int) -> torch.Tensor:
    """``(B, n)`` float64: row ``b`` is ``sum_k coefs[k] z_(keys[b, k])``, each ``z`` a vector of ``n``
    independent standard normals that depends only on its int64 key (see the module docstring).
    Computed on ``keys.device``; large requests are chunked over ``k`` to bound memory."""
    if keys.ndim != 2:
        raise ShapeError(f"keys must be (batch, nodes), got {tuple(keys.shape)}")
    c = torch.as_tensor(coefs, dtype=torch.float64).reshape(-1)  # host numbers (a device copy would wait for the device)
    if c.numel() != keys.shape[1]:
        raise ShapeError(f"{c.numel()} coefficients for {keys.shape[1]} keys")
    gen = _generator(keys.device)
    if gen is not _normals_of_keys:  # the compiled generator (opt-in) takes its coefficients on the device
        c = c.to(keys.device)
    per = max(1, _CHUNK_ELEMS // max(1, keys.shape[0] * n))
    out: torch.Tensor | None = None
    for k0 in range(0, keys.shape[1], per):
        part = gen(keys[:, k0:k0 + per], c[k0:k0 + per], n)
        out = part if out is None else out.add_(part)
    assert out is not None
    return out


def _sample_keys(seed: int, indices: torch.Tensor, domain: int) -> torch.Tensor:
    """int64 key of each sample index for a seed and a noise domain (0: Brownian path, 1: intervals, ...)."""
    base = _signed(_mix_int(_mix_int(int(seed) ^ 0x6A09E667F3BCC909) + domain * _GOLDEN))
    return _mix(indices.to(torch.int64) * _S_GOLDEN + base)


_ROW_TOKENS = itertools.count()


class _Rows:
    """The rows' sample indices on the device and a host key for them, made once per batch of rows.

    A noise source is asked for the same rows at every step, so this keeps the last answer: the
    indices are moved to the device once (asynchronously) and never read back. The key is the
    indices' content when they are host data (``None``, a sequence, a CPU tensor: hashed on the
    host, no device involved), and for indices that live on an accelerator the tensor object at its
    version counter (a fresh token; an in-place edit bumps the version): reading them would be a
    host synchronisation per step."""

    def __init__(self) -> None:
        self._last: tuple[Any, ...] | None = None  # (indices object, version, batch, device, key, device tensor)

    def get(self, batch: int, indices: Sequence[int] | torch.Tensor | None, device: torch.device) -> tuple[Any, torch.Tensor]:
        last = self._last
        version = indices._version if isinstance(indices, torch.Tensor) else None
        if (last is not None and last[0] is indices and last[1] == version and last[2] == batch and last[3] == device
                and (indices is None or isinstance(indices, (torch.Tensor, tuple, range)))):  # unchanged (a list is compared by value)
            return last[4], last[5]
        if isinstance(indices, torch.Tensor) and indices.device.type != "cpu":
            if indices.numel() != batch:
                raise ShapeError(f"{indices.numel()} sample indices for a batch of {batch}")
            key: Any = ("device", next(_ROW_TOKENS))
            idx = indices.detach().reshape(-1).to(device=device, dtype=torch.int64)
        elif indices is None:
            key, idx = ("all", batch), None
        else:
            host = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).clone()  # a snapshot: the caller may edit theirs
            if host.numel() != batch:
                raise ShapeError(f"{host.numel()} sample indices for a batch of {batch}")
            key, idx = ("rows", hashlib.blake2b(host.numpy().tobytes(), digest_size=16).digest()), host
        if last is not None and last[4] == key and last[3] == device:
            idx = last[5]  # the same rows again (a list re-read): keep the device copy
        elif idx is None:
            idx = torch.arange(batch, dtype=torch.int64, device=device)
        elif idx.device != device:
            idx = idx.to(device, non_blocking=True)  # host to device without waiting for the device
        self._last = (indices, version, batch, device, key, idx)
        return key, idx


def brownian_time(lam: float) -> float:
    """``u = 1 / (1 + e^(lambda / 4))``: the Brownian path's time (1 at pure noise, 0 at the data)."""
    if math.isnan(lam):
        raise SolverError("log-SNR is NaN")
    return 0.5 * (1.0 - math.tanh(lam / 8.0))


class NoiseSource(Protocol):
    """Where a stochastic step's standard normal noise comes from."""

    def increment(self, lam_from: float, lam_to: float, shape: Sequence[int], *, indices: Sequence[int] | torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """Standard normal ``z`` of ``shape = (batch, ...)`` for the step from log-SNR ``lam_from`` to ``lam_to``."""
        ...


_ROOT = 0


def _node_tag(node: int) -> int:
    return _signed(_mix_int(node * _GOLDEN + 0x3C6EF372FE94F82B))


def _leaf_tag(u: float) -> int:
    bits = struct.unpack("<q", struct.pack("<d", u))[0]
    return _signed(_mix_int((bits & _M64) ^ 0xA54FF53A5F1D36F1) ^ 0x510E527FADE682D1)


@lru_cache(maxsize=4096)
def _path_point(u: float, depth: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """``W(u)`` as ``sum_j c_j z_(tag_j)``: the Lévy-Ciesielski bisection to ``depth`` levels, then the
    Brownian bridge inside the last cell (``W(0) = 0``, ``W(1) = z_root``)."""
    lo, hi = 0.0, 1.0
    w_lo: dict[int, float] = {}
    w_hi: dict[int, float] = {_node_tag(_ROOT): 1.0}
    cell = 0
    for level in range(depth):
        if u == lo or u == hi:
            break
        mid = 0.5 * (lo + hi)
        w_mid = {k: 0.5 * w_lo.get(k, 0.0) + 0.5 * w_hi.get(k, 0.0) for k in set(w_lo) | set(w_hi)}
        tag = _node_tag((1 << level) + cell)
        w_mid[tag] = w_mid.get(tag, 0.0) + math.sqrt((hi - lo) / 4.0)
        if u < mid:
            hi, w_hi, cell = mid, w_mid, 2 * cell
        else:
            lo, w_lo, cell = mid, w_mid, 2 * cell + 1
    if u == lo:
        w = w_lo
    elif u == hi:
        w = w_hi
    else:
        f = (u - lo) / (hi - lo)
        w = {k: (1.0 - f) * w_lo.get(k, 0.0) + f * w_hi.get(k, 0.0) for k in set(w_lo) | set(w_hi)}
        w[_leaf_tag(u)] = math.sqrt((u - lo) * (hi - u) / (hi - lo))
    items = sorted((k, v) for k, v in w.items() if v != 0.0)
    return tuple(k for k, _ in items), tuple(v for _, v in items)


class BrownianNoise:
    """One Brownian path per ``(seed, sample index)`` over log-SNR (module docstring).

    ``depth``: dyadic levels of the tree in ``u`` (cells of ``2^-depth``; 14 resolves log-SNR steps
    down to ~1e-3 near lambda = 0 and ~6e-3 at |lambda| = 12). A step whose two ends fall in one cell
    is refused (a finer tree is needed: its increments would not be independent of its neighbours').
    ``channel`` selects an independent path (e.g. EDM's churn noise beside the main one).
    Values of ``W`` at the last grid points and the node normals of their chains are kept, so a run
    costs the nodes below each point's common ancestor with its neighbour: ``depth + 2`` normals for
    the first point, about ``depth - log2(N) + 1`` for each further point of an ``N``-step grid."""

    def __init__(self, seed: int, *, depth: int = 14, channel: int = 0) -> None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ArgumentError(f"seed must be an integer, got {seed!r}")
        if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= 40:
            raise ArgumentError(f"depth must be an integer in 1..40, got {depth!r}")
        self.seed, self.depth, self.channel = seed, depth, int(channel)
        self._values: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()
        self._nodes: OrderedDict[int, torch.Tensor] = OrderedDict()  # tag -> the node's keyed normals (float32)
        self._nodes_key: tuple[Any, ...] | None = None
        self._rows = _Rows()

    def __repr__(self) -> str:
        return f"BrownianNoise(seed={self.seed}, depth={self.depth}, channel={self.channel})"

    def _cell(self, u: float) -> int:
        return min(int(u * (1 << self.depth)), (1 << self.depth) - 1)

    def value(self, u: float, shape: Sequence[int], *, indices: Sequence[int] | torch.Tensor | None = None,
              device: torch.device | str | None = None) -> torch.Tensor:
        """``W(u)`` for every sample, float64 of ``shape`` (kept for the next few queries).

        The keyed normals of the tree's nodes are kept for the last points' chains: a point shares
        every node above its lowest common ancestor with its neighbour on the grid, so only the
        nodes below it (and its leaf) are drawn (about ``depth - log2(N) + 1`` normals per point of
        an ``N``-step grid instead of ``depth + 2``). ``W`` is the same sum in the same order
        whichever nodes were kept, so the values do not depend on the order of the queries."""
        shape = tuple(int(s) for s in shape)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        rows_id, idx = self._rows.get(shape[0], indices, dev)
        rows_key = (shape, str(dev), rows_id)
        key = (u, *rows_key)
        hit = self._values.get(key)
        if hit is not None:
            self._values.move_to_end(key)
            return hit
        if rows_key != self._nodes_key:  # another batch: the kept node normals belong to other rows
            self._nodes.clear()
            self._nodes_key = rows_key
        tags, coefs = _path_point(u, self.depth)
        n = math.prod(shape[1:])
        w = torch.zeros((shape[0], n), dtype=torch.float64, device=dev)
        missing = [t for t in tags if t not in self._nodes]
        if missing:
            rows = _sample_keys(self.seed, idx, 2 * self.channel)
            tags_dev = torch.tensor(missing, dtype=torch.int64).to(dev, non_blocking=True)  # no wait for the device
            keys = _mix(rows[:, None] + tags_dev)
            per = max(1, _CHUNK_ELEMS // max(1, shape[0] * n))  # bounded memory for large batches
            for k0 in range(0, len(missing), per):
                fresh = keyed_normal_stack(keys[:, k0:k0 + per], n)
                for k, tag in enumerate(missing[k0:k0 + per]):
                    self._nodes[tag] = fresh[:, k]
        for tag, c in zip(tags, coefs):
            self._nodes.move_to_end(tag)
            w.add_(self._nodes[tag], alpha=c)
        while len(self._nodes) > 3 * (self.depth + 2):  # the last few chains
            self._nodes.popitem(last=False)
        w = w.reshape(shape)
        self._values[key] = w
        if len(self._values) > 4:
            self._values.popitem(last=False)
        return w

    def increment(self, lam_from: float, lam_to: float, shape: Sequence[int], *, indices: Sequence[int] | torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        u_hi, u_lo = brownian_time(lam_from), brownian_time(lam_to)
        if u_hi < u_lo:
            u_hi, u_lo = u_lo, u_hi
        if not u_hi > u_lo:
            raise SolverError(f"a noise interval from log-SNR {lam_from} to {lam_to} is empty in the Brownian time")
        inside = u_lo > 0.0 and u_hi < 1.0 and self._cell(u_hi) == self._cell(u_lo) and u_lo * (1 << self.depth) != self._cell(u_lo)
        if inside:
            needed = max(self.depth + 1, math.ceil(math.log2(1.0 / (u_hi - u_lo))) + 2)
            raise SolverError(
                f"the step from log-SNR {lam_from:.6g} to {lam_to:.6g} is finer than the Brownian path's resolution "
                f"(2^-{self.depth} in u = 1/(1+e^(lambda/4))); use BrownianNoise(seed, depth={needed}) for grids this fine"
            )
        w_hi = self.value(u_hi, shape, indices=indices, device=device)
        w_lo = self.value(u_lo, shape, indices=indices, device=device)
        return ((w_hi - w_lo) / math.sqrt(u_hi - u_lo)).to(dtype)


class IntervalNoise:
    """One keyed standard normal per ``(seed, sample, interval)``: the cheapest noise (one normal per
    step, no tree) and batch-independent like :class:`BrownianNoise`, but keyed by the interval's end
    points, so grids that differ see unrelated noise (no Brownian consistency)."""

    def __init__(self, seed: int, *, channel: int = 0) -> None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ArgumentError(f"seed must be an integer, got {seed!r}")
        self.seed, self.channel = seed, int(channel)
        self._rows = _Rows()

    def __repr__(self) -> str:
        return f"IntervalNoise(seed={self.seed}, channel={self.channel})"

    def increment(self, lam_from: float, lam_to: float, shape: Sequence[int], *, indices: Sequence[int] | torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        _, idx = self._rows.get(shape[0], indices, dev)
        tag = _signed(_mix_int(_leaf_tag(brownian_time(lam_from)) * _GOLDEN + _leaf_tag(brownian_time(lam_to))))
        keys = _mix(_sample_keys(self.seed, idx, 2 * self.channel + 1)[:, None] + tag)
        return counter_normals(keys, (1.0,), math.prod(shape[1:])).reshape(shape).to(dtype)


class _Channel:
    """A user's noise source asked for another Brownian channel (``increment(..., channel=c)``)."""

    def __init__(self, source: Any, channel: int) -> None:
        self.source, self.channel = source, channel

    def increment(self, lam_from: float, lam_to: float, shape: Sequence[int], **kw: Any) -> torch.Tensor:
        return self.source.increment(lam_from, lam_to, shape, channel=self.channel, **kw)  # type: ignore[no-any-return]


def make_noise_source(noise: Any, seed: int, channel: int = 0) -> NoiseSource:
    """``None`` / ``"brownian"`` -> :class:`BrownianNoise`; ``"interval"`` -> :class:`IntervalNoise`;
    an object with an ``increment`` method is used as it is (for ``channel > 0``, e.g. EDM's churn
    noise, its ``increment`` is called with ``channel=``)."""
    if noise is None or noise == "brownian":
        return BrownianNoise(seed, channel=channel)
    if noise == "interval":
        return IntervalNoise(seed, channel=channel)
    if callable(getattr(noise, "increment", None)):
        return noise if channel == 0 else _Channel(noise, channel)  # type: ignore[no-any-return]
    raise ArgumentError(f"noise must be 'brownian', 'interval' or a noise source with an increment() method, got {noise!r}")


# ---- initial noise (keying fixed since fewstep 0.1: cached references and searched schedules use it) ----

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
    """Standard normal noise of ``shape = (batch, ...)``; row ``j`` depends only on ``(seed, indices[j], step)``
    (a CPU generator per row; used for initial noise, where it is drawn once per sample)."""
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

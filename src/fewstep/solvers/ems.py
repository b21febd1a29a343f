"""DPM-Solver-v3 (Zheng, Lu, Chen & Zhu 2023): its empirical model statistics (EMS) and the
per-dimension weights of its multistep update.

**The update.** With ``y = x / alpha`` the probability-flow ODE in the half log-SNR lambda is
``dy/dlambda = -sigma eps / alpha``. For any per-dimension ``l_lambda`` it reads
``dy/dlambda = -l y - f`` with ``f = (sigma eps - l x) / alpha``, so (variation of constants)::

    x_t = (alpha_t / alpha_s) e^(-Lambda_t) x_s - alpha_t int_s^t e^(Lambda(lam) - Lambda_t) f(lam) dlam

``Lambda(lam) = int_{lam_s}^lam l``. With ``Sigma(lam) = int_{lam_s}^lam s`` and
``beta(lam) = int_{lam_s}^lam e^(-Sigma) b``, the reparameterised prediction
``g = e^(-Sigma) f - beta`` (the paper's g_theta, relative to the step's start) gives
``f = e^Sigma (g + beta)``, hence::

    x_t = a x_s - alpha_t e^(-Lambda_t) [ int e^(Lambda+Sigma) g dlam + K ],   K = int e^(Lambda+Sigma) beta dlam

and ``g`` is replaced by the polynomial in lambda through its values at the step's nodes (the start,
earlier step starts, and for the corrector the new point): ``int e^(Lambda+Sigma) g = sum_k c_k M_k``,
``M_k = int e^(Lambda+Sigma) (lam - lam_s)^k``, the Taylor coefficients ``c`` from the node values by
a Vandermonde solve, or, for the "pseudo-order" variant, the Newton divided differences
``g[lam_0, ..., lam_k]`` of the nodes in their order (the reference implementation's ``pseudo``).
Every node value is affine in that node's model outputs: ``g_j = e^(-Sigma_j) f_j - beta_j`` with
``f_j = (sigma_j / alpha_j)(1 - l_j) eps_j - l_j x0_j`` (``x = alpha x0 + sigma eps``). So the step is
``x_t = a x_s + sum_j (p_j eps_j + q_j x0_j) + c`` with per-dimension ``a, p_j, q_j, c``: an affine
step whose weights are per-dimension tensors (:mod:`fewstep.solvers.compile`,
:mod:`fewstep.executor`). With ``l = 1, s = b = 0`` it is DPM-Solver++ (data prediction, exact
weights of the polynomial in lambda); the reference calls that ``degenerated``.

**Discretisation.** The statistics are given on a grid of log-SNRs; between grid points ``l, s, b``
are linear in lambda, so ``Lambda`` and ``Sigma`` are exact piecewise quadratics and every other
integral is a composite Gauss-Legendre rule on the pieces the step covers (the cumulative ``beta``
inside a piece by the rule's integration matrix): accurate to rounding whatever the step, with no
snapping of the step's ends to the grid. The reference implementation instead rounds the sampling
times to the grid and integrates by the trapezoid rule on it (same limit as the grid refines).

:class:`ModelStatistics` holds the statistics (``fewstep.model_statistics`` computes them) and reads
and writes them as safetensors with JSON metadata, validated on load (never pickle).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import SolverError
from .points import Point
from .registry import StepTerms, register_variant

__all__ = ["ModelStatistics", "StatisticsError", "EMS_VARIANTS", "is_ems", "ems_weights", "STATISTICS_FORMAT",
           "STATISTICS_VERSION"]

STATISTICS_FORMAT = "fewstep.model_statistics"
STATISTICS_VERSION = 1
#: the weight variants whose weights come from a plan's statistics: ``ems`` (the Taylor coefficients of
#: the interpolant of g) and ``ems_pseudo`` (Newton divided differences as Taylor coefficients: the
#: reference implementation's pseudo-order predictor / corrector)
EMS_VARIANTS = ("ems", "ems_pseudo")
#: at most this many numbers are embedded in a schedule file (larger statistics are referenced by file)
EMBED_MAX_NUMBERS = 4096
_TENSORS = ("lambdas", "l", "s", "b")
_COLUMN_BLOCK = 1024  # dimensions processed at once in a step's quadrature (bounds memory)
_MEMO_STEPS = 512  # step weights kept per statistics object (a sampler calls sample() with the same plan batch after batch)


class StatisticsError(SolverError):
    """Empirical model statistics are malformed, or do not fit the model, schedule or samples."""


def is_ems(variant: str | None) -> bool:
    """Do a step's weights of this variant come from the plan's statistics?"""
    return variant in EMS_VARIANTS


def _needs_statistics(terms: StepTerms, prediction: str, s: Point, t: Point, w: list[float]) -> list[float]:
    raise SolverError("the 'ems' / 'ems_pseudo' weights (DPM-Solver-v3) come from empirical model statistics: build the "
                      "plan with fewstep.preset('dpm_solver_v3', nfe, schedule, statistics=...) (the plan carries them)")


for _name in EMS_VARIANTS:
    register_variant(_name)(_needs_statistics)


def _as_f64(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise StatisticsError(f"statistics field {name!r} must be a tensor of numbers, got {type(value).__name__}") from None
    if not (value.dtype.is_floating_point or value.dtype in (torch.int32, torch.int64)):
        raise StatisticsError(f"statistics field {name!r} must hold numbers, got {value.dtype}")
    return value.detach().to(device="cpu", dtype=torch.float64).contiguous()


@dataclass(eq=False)
class ModelStatistics:
    """DPM-Solver-v3's empirical model statistics of one model on one noise schedule.

    ``lambdas``: the increasing grid of half log-SNRs ``log(alpha / sigma)`` (noisy end first), shape
    ``(n_times,)``; ``l``, ``s``, ``b``: the statistics at those points per data dimension, shape
    ``(n_times, *sample_shape)`` (``sample_shape = ()``: one number per point, for every dimension).
    ``model``: :func:`fewstep.identity.model_key` of the model they were computed for (``None``: not
    tied to a model); ``schedule``: the noise schedule's fingerprint (``None``: any schedule);
    ``settings`` and ``cost``: how they were computed and what that took (plain JSON values).

    :meth:`save` / :meth:`load` use safetensors with JSON metadata; a loaded file is validated (format,
    version, shapes, finite values). Instances are not hashable (their tensors could change in place).
    """

    lambdas: torch.Tensor
    l: torch.Tensor
    s: torch.Tensor
    b: torch.Tensor
    model: str | None = None
    schedule: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    #: the file these statistics were last saved to or loaded from, and its SHA-256 (set by save / load)
    path: Path | None = field(default=None, repr=False)
    sha256: str | None = field(default=None, repr=False)

    __hash__ = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.lambdas = _as_f64("lambdas", self.lambdas)
        for name in ("l", "s", "b"):
            setattr(self, name, _as_f64(name, getattr(self, name)))
        lam = self.lambdas
        if lam.ndim != 1 or lam.numel() < 2:
            raise StatisticsError(f"statistics 'lambdas' must be a 1-D grid of at least 2 log-SNRs, got shape {tuple(lam.shape)}")
        if not bool(torch.isfinite(lam).all()) or not bool((lam[1:] > lam[:-1]).all()):
            raise StatisticsError("statistics 'lambdas' must be finite and strictly increasing (noisy end first)")
        n = lam.numel()
        shape = tuple(self.l.shape[1:])
        for name in ("l", "s", "b"):
            v = getattr(self, name)
            if v.ndim < 1 or v.shape[0] != n or tuple(v.shape[1:]) != shape:
                raise StatisticsError(f"statistics {name!r} must have shape ({n}, *sample_shape) like 'l' {(n, *shape)}, got {tuple(v.shape)}")
            if not bool(torch.isfinite(v).all()):
                raise StatisticsError(f"statistics {name!r} contain NaN or Inf")
        for name in ("model", "schedule"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise StatisticsError(f"statistics {name!r} must be a string or None, got {type(v).__name__}")
        for name in ("settings", "cost"):
            v = getattr(self, name)
            if not isinstance(v, dict):
                raise StatisticsError(f"statistics {name!r} must be a dict of plain JSON values")
            try:
                json.dumps(v, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise StatisticsError(f"statistics {name!r} must hold plain JSON values: {exc}") from None
        self._cache: dict[str, Any] = {}

    # ---- derived -------------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.l.shape[1:])

    @property
    def n_times(self) -> int:
        return int(self.lambdas.numel())

    @property
    def lambda_range(self) -> tuple[float, float]:
        """``(lambda_min, lambda_max)``: the log-SNRs the statistics cover (noisy end, clean end)."""
        return float(self.lambdas[0]), float(self.lambdas[-1])

    @property
    def n_numbers(self) -> int:
        return self.n_times * (1 + 3 * max(1, math.prod(self.sample_shape)))

    def covers(self, lam: float) -> bool:
        lo, hi = self.lambda_range
        tol = 1e-9 * (1.0 + abs(lam))
        return math.isfinite(lam) and lo - tol <= lam <= hi + tol

    @classmethod
    def constant(cls, lambda_range: Sequence[float], *, l: float = 1.0, s: float = 0.0, b: float = 0.0,
                 sample_shape: Sequence[int] = (), schedule: str | None = None, model: str | None = None,
                 n_times: int = 2) -> "ModelStatistics":
        """Statistics constant in lambda and across dimensions on ``[lambda_min, lambda_max]``.
        ``l = 1, s = b = 0`` is the paper's degenerate choice, with which DPM-Solver-v3 is DPM-Solver++."""
        lo, hi = (float(v) for v in lambda_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise StatisticsError(f"lambda_range must be two finite increasing log-SNRs, got {tuple(lambda_range)}")
        shape = (int(n_times), *(int(d) for d in sample_shape))
        full = lambda v: torch.full(shape, float(v), dtype=torch.float64)  # noqa: E731
        return cls(torch.linspace(lo, hi, int(n_times), dtype=torch.float64), full(l), full(s), full(b), model=model,
                   schedule=schedule, settings={"kind": "constant", "l": float(l), "s": float(s), "b": float(b)})

    def describe(self) -> str:
        lo, hi = self.lambda_range
        return (f"ModelStatistics: {self.n_times} log-SNRs in [{lo:.4g}, {hi:.4g}], samples {self.sample_shape}, model "
                f"{self.model!r}, schedule {self.schedule!r}, cost {self.cost}")

    def __repr__(self) -> str:
        lo, hi = self.lambda_range
        return f"ModelStatistics(n_times={self.n_times}, lambda=[{lo:.4g}, {hi:.4g}], sample_shape={self.sample_shape}, model={self.model!r})"

    # ---- files ---------------------------------------------------------------------------------
    def _metadata(self) -> dict[str, Any]:
        from .._version import __version__

        return {"model": self.model, "schedule": self.schedule, "sample_shape": list(self.sample_shape),
                "settings": self.settings, "cost": self.cost, "fewstep": __version__}

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        tensors = {name: getattr(self, name).contiguous() for name in _TENSORS}
        meta = {"format": STATISTICS_FORMAT, "version": str(STATISTICS_VERSION),
                "fewstep": json.dumps(self._metadata(), sort_keys=True, allow_nan=False)}
        return save(tensors, metadata=meta)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write safetensors (``lambdas``, ``l``, ``s``, ``b``, float64) with the metadata as JSON,
        atomically; remembers the file and its SHA-256 (a schedule file references them)."""
        from ..atomic import write_atomic

        data = self.to_bytes()
        out = write_atomic(path, data)
        self.path, self.sha256 = out.resolve(), hashlib.sha256(data).hexdigest()
        return out

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "statistics") -> "ModelStatistics":
        """Parse and validate a statistics file's bytes (no code is executed: safetensors + JSON)."""
        from safetensors.torch import load

        header = _safetensors_metadata(data, source)
        if header.get("format") != STATISTICS_FORMAT:
            raise StatisticsError(f"{source} is not a fewstep statistics file: format {header.get('format')!r}, expected {STATISTICS_FORMAT!r}")
        try:
            version = int(header.get("version", ""))
        except ValueError:
            version = -1
        if not 1 <= version <= STATISTICS_VERSION:
            raise StatisticsError(f"{source}: unsupported statistics version {header.get('version')!r} (this fewstep reads 1..{STATISTICS_VERSION})")
        try:
            meta = json.loads(header.get("fewstep", ""), parse_constant=_reject)
        except ValueError as exc:
            raise StatisticsError(f"{source}: its metadata is not valid JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise StatisticsError(f"{source}: its metadata must be a JSON object")
        try:
            tensors = load(data)
        except Exception as exc:  # safetensors raises its own error types on corrupt files
            raise StatisticsError(f"{source}: not a readable safetensors file: {exc}") from None
        missing = [k for k in _TENSORS if k not in tensors]
        extra = sorted(set(tensors) - set(_TENSORS))
        if missing or extra:
            raise StatisticsError(f"{source}: tensors must be exactly {list(_TENSORS)} (missing {missing}, unknown {extra})")
        if any(tensors[k].dtype != torch.float64 for k in _TENSORS):
            raise StatisticsError(f"{source}: tensors must be float64")
        shape = meta.get("sample_shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise StatisticsError(f"{source}: metadata 'sample_shape' must be a list of positive integers")
        if tuple(tensors["l"].shape[1:]) != tuple(shape):
            raise StatisticsError(f"{source}: tensors of shape {tuple(tensors['l'].shape)} do not match sample_shape {shape}")
        try:
            return cls(tensors["lambdas"], tensors["l"], tensors["s"], tensors["b"], model=meta.get("model"),
                       schedule=meta.get("schedule"), settings=meta.get("settings", {}), cost=meta.get("cost", {}))
        except StatisticsError as exc:
            raise StatisticsError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ModelStatistics":
        """Read statistics written by :meth:`save`, validated (format, version, shapes, finite values)."""
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise StatisticsError(f"cannot read statistics file {str(path)!r}: {exc}") from None
        stats = cls.from_bytes(data, source=f"statistics file {str(path)!r}")
        stats.path, stats.sha256 = p.resolve(), hashlib.sha256(data).hexdigest()
        return stats

    # ---- schedule-file references ------------------------------------------------------------------
    def reference(self, base: Path | None = None) -> dict[str, Any]:
        """What a schedule file records: small statistics embedded, others by file path and SHA-256
        (the file must have been saved: :meth:`save`)."""
        ref: dict[str, Any] = {"version": STATISTICS_VERSION, "model": self.model, "schedule": self.schedule,
                               "sample_shape": list(self.sample_shape)}
        if self.n_numbers <= EMBED_MAX_NUMBERS:
            ref["embedded"] = {name: getattr(self, name).reshape(-1).tolist() for name in _TENSORS}
            ref["embedded"]["settings"] = self.settings
            return ref
        if self.path is None or self.sha256 is None:
            raise StatisticsError(
                "this plan's DPM-Solver-v3 statistics are not in a file, and a schedule file references them by path and "
                "SHA-256: save them first (stats.save('statistics.safetensors')), then save the plan again; or keep the "
                "statistics and build the plan with fewstep.preset('dpm_solver_v3', nfe, schedule, statistics=stats)"
            )
        file = str(self.path)
        if base is not None:
            try:
                file = os.path.relpath(self.path, base.resolve())
            except ValueError:  # another drive (Windows)
                file = str(self.path)
        ref.update(file=file, sha256=self.sha256)
        return ref

    @classmethod
    def from_reference(cls, ref: Any, base: Path | None = None) -> "ModelStatistics":
        """The statistics a schedule file references (validated; a referenced file must have the recorded SHA-256)."""
        if not isinstance(ref, dict):
            raise StatisticsError("a schedule file's 'statistics' must be an object")
        version = ref.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= STATISTICS_VERSION:
            raise StatisticsError(f"unsupported statistics reference version {version!r} (this fewstep reads 1..{STATISTICS_VERSION})")
        if "embedded" in ref:
            emb = ref["embedded"]
            shape = ref.get("sample_shape")
            if not isinstance(emb, dict) or not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
                raise StatisticsError("embedded statistics need 'embedded' tensors and a 'sample_shape' list of positive integers")
            try:
                lam = torch.tensor(emb["lambdas"], dtype=torch.float64)
                vals = [torch.tensor(emb[k], dtype=torch.float64).reshape(lam.numel(), *shape) for k in ("l", "s", "b")]
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise StatisticsError(f"embedded statistics are malformed: {exc}") from None
            return cls(lam, *vals, model=ref.get("model"), schedule=ref.get("schedule"), settings=emb.get("settings", {}))
        file, digest = ref.get("file"), ref.get("sha256")
        if not isinstance(file, str) or not isinstance(digest, str):
            raise StatisticsError("a statistics reference needs 'file' and 'sha256' strings (or 'embedded' values)")
        path = Path(file)
        if not path.is_absolute() and base is not None:
            path = base / path
        stats = cls.load(path)
        if stats.sha256 != digest:
            raise StatisticsError(f"statistics file {str(path)!r} has SHA-256 {stats.sha256}, but the schedule file recorded {digest}: "
                                  "it changed since the plan was saved")
        for key in ("model", "schedule"):
            if ref.get(key) != getattr(stats, key):
                raise StatisticsError(f"statistics file {str(path)!r} is for {key} {getattr(stats, key)!r}, the schedule file says {ref.get(key)!r}")
        return stats

    # ---- the maths ---------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        """Cached derived arrays and step weights, dropped when a tensor was changed in place."""
        version = tuple(getattr(self, name)._version for name in _TENSORS)
        if self._cache.get("version") != version:
            self._cache = {"version": version}
        return self._cache

    def _linear(self) -> tuple[np.ndarray, "_Linear", "_Linear", "_Linear"]:
        """The grid and ``l``, ``s``, ``b`` as piecewise-linear functions of lambda (flattened to D columns)."""
        cache = self._state()
        if "linear" not in cache:
            n = self.n_times
            knots = self.lambdas.numpy()
            cache["linear"] = (knots, *(_Linear(knots, getattr(self, k).reshape(n, -1).numpy(), k != "b") for k in ("l", "s", "b")))
        return cache["linear"]


def _reject(value: str) -> Any:
    raise ValueError(f"{value} is not valid JSON")


def _safetensors_metadata(data: bytes, source: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors buffer (its JSON header), read without the library."""
    if len(data) < 8:
        raise StatisticsError(f"{source} is too short to be a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > 100_000_000:
        raise StatisticsError(f"{source}: corrupt safetensors header")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"), parse_constant=_reject)
    except (UnicodeDecodeError, ValueError) as exc:
        raise StatisticsError(f"{source}: corrupt safetensors header: {exc}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise StatisticsError(f"{source} has no fewstep metadata (not written by ModelStatistics.save)")
    return meta


# ---- quadrature on the statistics grid ---------------------------------------------------------------
@lru_cache(maxsize=4)
def _gauss_rule(g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on [-1, 1] and the integration matrix ``Q_ij = int_{-1}^{x_i} l_j``
    of the Lagrange basis on the nodes (cumulative integrals inside a piece, exact for degree < g)."""
    leg = np.polynomial.legendre
    x, w = leg.leggauss(g)
    vander = leg.legvander(x, g - 1)  # V_ik = P_k(x_i)
    prim = np.stack([leg.legval(x, leg.legint(np.eye(g)[k], lbnd=-1.0)) for k in range(g)], axis=1)  # int_{-1}^{x_i} P_k
    return x, w, prim @ np.linalg.inv(vander)


class _Linear:
    """A piecewise-linear function of lambda on the statistics grid (values (n, D)): values and exact
    integrals from the grid's first point, for a block of columns."""

    def __init__(self, knots: np.ndarray, values: np.ndarray, integrable: bool = True) -> None:
        self.k, self.v, self.dk = knots, values, np.diff(knots)
        self.cum = None
        if integrable:
            self.cum = np.zeros_like(values)
            np.cumsum(0.5 * self.dk[:, None] * (values[:-1] + values[1:]), axis=0, out=self.cum[1:])

    def _at(self, lam: np.ndarray, cols: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        i = np.clip(np.searchsorted(self.k, lam, side="right") - 1, 0, self.k.size - 2)
        v0 = self.v[i, cols]
        return i, (lam - self.k[i])[:, None], v0, (self.v[i + 1, cols] - v0) / self.dk[i][:, None]

    def __call__(self, lam: np.ndarray, cols: slice) -> np.ndarray:
        _, u, v0, slope = self._at(lam, cols)
        return v0 + slope * u

    def integral(self, lam: np.ndarray, cols: slice) -> np.ndarray:
        i, u, v0, slope = self._at(lam, cols)
        return self.cum[i, cols] + u * (v0 + 0.5 * slope * u)  # type: ignore[index]


def _pieces(knots: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Composite Gauss-Legendre rule on [lo, hi] split at the grid points inside: nodes (P, G), weights
    (P, G), half widths (P,), and the integration matrix of the rule."""
    edges = np.concatenate([[lo], knots[(knots > lo) & (knots < hi)], [hi]])
    half = 0.5 * np.diff(edges)
    g = 4 if float(half.max()) <= 0.05 else 10  # pieces of width <= 0.1: degree 7 is exact to rounding
    x, w, q = _gauss_rule(g)
    nodes = edges[:-1, None] + half[:, None] * (x[None] + 1.0)
    return nodes, half[:, None] * w[None], half, q


def _cumulative(values: np.ndarray, weights: np.ndarray, half: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``int_lo^node`` of a function given at the composite rule's nodes (values (P, G, D)): at every
    node (P, G, D), and over the whole interval (D,)."""
    full = np.einsum("pg,pgd->pd", weights, values)
    start = np.concatenate([np.zeros((1, values.shape[2])), np.cumsum(full[:-1], axis=0)])
    inside = np.einsum("ij,pjd->pid", q, values) * half[:, None, None]
    return start[:, None, :] + inside, full.sum(0)


def _derivative_matrix(deltas: Sequence[float], pseudo: bool) -> np.ndarray:
    """``D`` with ``c_k = sum_j D_kj g_j``: the coefficients of ``(lam - lam_s)^k`` of the interpolant
    of g through nodes at ``lam_s + deltas`` (``deltas[0] = 0``), or, pseudo-order, the Newton divided
    differences ``g[lam_0..lam_k]`` of the nodes in their order."""
    d = np.asarray(deltas, dtype=np.float64)
    n = d.size
    if pseudo:
        out = np.zeros((n, n))
        for k in range(n):
            for j in range(k + 1):
                out[k, j] = 1.0 / np.prod([d[j] - d[m] for m in range(k + 1) if m != j])
        return out
    return np.linalg.inv(np.vander(d, n, increasing=True))


def ems_weights(stats: ModelStatistics, s: Point, t: Point, nodes: Sequence[Point], *, pseudo: bool = False) -> tuple[Any, list[tuple[Any, Any]], Any]:
    """The DPM-Solver-v3 step from ``s`` to ``t`` through ``nodes`` (``nodes[0]`` is ``s``; the others in
    the reference's order: earlier starts for the predictor, ``t`` then earlier starts for the corrector):
    ``(a, [(q_j, p_j)], c)`` with ``x_t = a x_s + sum_j (q_j x0_j + p_j eps_j) + c``. Each coefficient is a
    float64 tensor of the statistics' sample shape, a Python float when that shape is ``()``, and
    ``None`` for a term that is zero everywhere (``c``, or ``p_j`` where ``l = 1``)."""
    if nodes[0] is not s and nodes[0].t != s.t:
        raise SolverError("the first node of a DPM-Solver-v3 step must be its start")
    lams = [p.lam for p in nodes]
    for what, lam in (("start", s.lam), ("end", t.lam), *((f"node at t = {p.t:.6g}", p.lam) for p in nodes)):
        if not stats.covers(lam):
            lo, hi = stats.lambda_range
            raise StatisticsError(
                f"the DPM-Solver-v3 step {s} -> {t} needs the statistics at its {what} (lambda = {lam:.6g}), outside the "
                f"range they cover, lambda in [{lo:.6g}, {hi:.6g}]: compute them over the sampling range "
                "(fewstep.model_statistics(..., t_start=, t_end=)) or sample inside theirs (t_start= / t_end=)"
            )
    if not t.lam > s.lam:
        raise SolverError(f"a DPM-Solver-v3 step must go towards the data (increasing log-SNR): {s} -> {t}")
    memo = stats._state().setdefault("steps", {})
    key = (s.lam, t.lam, t.alpha, s.alpha, tuple((p.lam, p.alpha, p.sigma) for p in nodes), pseudo)
    if key not in memo:
        if len(memo) >= _MEMO_STEPS:
            memo.clear()
        memo[key] = _ems_weights(stats, s, t, nodes, pseudo)
    return memo[key]


def _ems_weights(stats: ModelStatistics, s: Point, t: Point, nodes: Sequence[Point], pseudo: bool) -> tuple[Any, list[tuple[Any, Any]], Any]:
    lams = [p.lam for p in nodes]
    knots, lf, sf, bf = stats._linear()
    lo_k, hi_k = float(knots[0]), float(knots[-1])
    clamp = lambda v: min(max(v, lo_k), hi_k)  # noqa: E731  (ends within the coverage tolerance)
    lam_s, lam_t = clamp(s.lam), clamp(t.lam)
    deltas = [0.0] + [clamp(v) - lam_s for v in lams[1:]]
    dmat = _derivative_matrix(deltas, pseudo)
    npts, ncols = len(nodes), lf.v.shape[1]
    x_s, x_t = np.array([lam_s]), np.array([lam_t])
    a = np.empty(ncols)
    coef = [(np.empty(ncols), np.empty(ncols)) for _ in range(npts)]
    bias = np.empty(ncols)
    nodes_q, wq, half, qmat = _pieces(knots, lam_s, lam_t)
    flat_q = nodes_q.reshape(-1)
    powers = np.stack([(flat_q - lam_s) ** k for k in range(npts)])  # (n, m)
    for c0 in range(0, ncols, _COLUMN_BLOCK):
        cols = slice(c0, min(ncols, c0 + _COLUMN_BLOCK))
        l_at_s = lf.integral(x_s, cols)[0]
        big_l_t = lf.integral(x_t, cols)[0] - l_at_s  # Lambda_t
        s_at_s = sf.integral(x_s, cols)[0]
        sig_q = sf.integral(flat_q, cols) - s_at_s  # Sigma at the rule's nodes (m, d)
        expo = np.exp(lf.integral(flat_q, cols) - (l_at_s + big_l_t) + sig_q)  # e^(Lambda - Lambda_t + Sigma)
        moments = np.einsum("km,m,md->kd", powers, wq.reshape(-1), expo)  # e^(-Lambda_t) M_k
        shape3 = (*nodes_q.shape, -1)
        beta_q, beta_t = _cumulative((np.exp(-sig_q) * bf(flat_q, cols)).reshape(shape3), wq, half, qmat)
        k_term = np.einsum("m,md->d", wq.reshape(-1), expo * beta_q.reshape(expo.shape))  # e^(-Lambda_t) K
        a[cols] = (t.alpha / s.alpha) * np.exp(-big_l_t)
        bias[cols] = -t.alpha * k_term
        weights = -t.alpha * (dmat.T @ moments)  # (n, d): W_j
        for j, p in enumerate(nodes):
            lam_j = clamp(p.lam)
            if j == 0:
                sig_j, beta_j = np.zeros(weights.shape[1]), np.zeros(weights.shape[1])
            elif lam_j > lam_s:  # the new point (corrector): inside the step
                sig_j = sf.integral(np.array([lam_j]), cols)[0] - s_at_s
                beta_j = beta_t if lam_j == lam_t else _beta_between(sf, bf, knots, lam_s, lam_j, s_at_s, cols)
            else:  # an earlier step start: beta = -int_{lam_j}^{lam_s} e^(-Sigma) b
                sig_j = sf.integral(np.array([lam_j]), cols)[0] - s_at_s
                beta_j = -_beta_between(sf, bf, knots, lam_j, lam_s, s_at_s, cols)
            l_j = lf(np.array([lam_j]), cols)[0]
            w_g = weights[j] * np.exp(-sig_j)  # the weight of f_j
            coef[j][0][cols] = -w_g * l_j  # on x0_j
            coef[j][1][cols] = w_g * (p.sigma / p.alpha) * (1.0 - l_j)  # on eps_j
            bias[cols] -= weights[j] * beta_j
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(bias)) and all(np.all(np.isfinite(v)) for pair in coef for v in pair)):
        raise SolverError(f"non-finite DPM-Solver-v3 weights on the step {s} -> {t}")
    shape = stats.sample_shape

    def out(v: np.ndarray, optional: bool) -> Any:
        if optional and not np.any(v):
            return None
        if shape == ():
            return float(v[0])
        return torch.from_numpy(v.reshape(shape).copy())

    return out(a, False), [(out(q, True), out(p, True)) for q, p in coef], out(bias, True)


def _beta_between(sf: _Linear, bf: _Linear, knots: np.ndarray, lo: float, hi: float, s_at_s: np.ndarray, cols: slice) -> np.ndarray:
    """``int_lo^hi e^(-Sigma(r)) b(r) dr`` with ``Sigma`` measured from the step's start."""
    if hi <= lo:
        return np.zeros(s_at_s.shape)
    nodes_q, wq, _, _ = _pieces(knots, lo, hi)
    flat = nodes_q.reshape(-1)
    return np.einsum("m,md->d", wq.reshape(-1), np.exp(-(sf.integral(flat, cols) - s_at_s)) * bf(flat, cols))

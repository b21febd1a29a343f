"""Model adapters: any callable predicting eps / x0 / v / flow velocity / score, or an EDM-style
denoiser, becomes one :class:`Model` whose :meth:`Model.predict` returns both ``x0`` and ``eps``.

Conversions (DESIGN 1.2), with ``x = alpha x0 + sigma eps``:

* ``eps``:   ``x0 = (x - sigma eps) / alpha``
* ``x0``:    ``eps = (x - alpha x0) / sigma``
* ``v``:     ``v = alpha eps - sigma x0``  =>  ``x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)``,
  ``eps = (sigma x + alpha v) / (alpha^2 + sigma^2)``
* ``flow``:  ``u = eps - x0``  =>  ``x0 = (x - sigma u) / (alpha + sigma)``, ``eps = (x + alpha u) / (alpha + sigma)``
* ``score``: ``s = -eps / sigma``
* ``edm``:   a k-diffusion style denoiser ``D(x / alpha, sigma / alpha) -> x0`` (VE coordinates)

All conversion coefficients are computed in float64 from the schedule and cast to the sample dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, NamedTuple, Sequence

import torch

from .errors import ArgumentError, ModelOutputError, ShapeError, SolverError
from .finite import FiniteGuard, all_finite
from .schedules import NoiseSchedule

__all__ = [
    "Model",
    "Prediction",
    "PREDICTION_TYPES",
    "to_prediction",
    "prediction_coefficients",
    "from_prediction",
    "classifier_free_guidance",
    "batched_classifier_free_guidance",
    "Threshold",
]

PredictionType = Literal["eps", "x0", "v", "flow", "score", "edm"]
PREDICTION_TYPES: tuple[str, ...] = ("eps", "x0", "v", "flow", "score", "edm")
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Prediction(NamedTuple):
    """The model's data prediction ``x0`` and noise prediction ``eps`` at one point."""

    x0: torch.Tensor
    eps: torch.Tensor


def _bcast(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample (or scalar) coefficients ``c`` to broadcast against ``x`` of shape (B, ...)."""
    c = c.to(device=x.device, dtype=x.dtype)
    if c.ndim == 0:
        return c
    return c.reshape(c.shape[0], *([1] * (x.ndim - 1)))


def prediction_coefficients(kind: str, alpha: float | torch.Tensor, sigma: float | torch.Tensor) -> tuple:
    """``(p0, q0, pe, qe)`` with ``x0 = p0 x + q0 out`` and ``eps = pe x + qe out``: every
    parameterisation is affine in the sample ``x`` and the raw output ``out`` (DESIGN 1.2)."""
    a, s = alpha, sigma
    if kind == "eps":
        return 1.0 / a, -s / a, 0.0, 1.0
    if kind in ("x0", "edm"):
        return 0.0, 1.0, 1.0 / s, -a / s
    if kind == "v":
        n = a * a + s * s
        return a / n, -s / n, s / n, a / n
    if kind == "flow":
        n = a + s
        return 1.0 / n, -s / n, 1.0 / n, a / n
    if kind == "score":
        return 1.0 / a, s * s / a, 0.0, -s
    raise ArgumentError(f"unknown prediction type {kind!r}; expected one of {PREDICTION_TYPES}")


def _affine(p: float | torch.Tensor, q: float | torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if isinstance(p, float) and p == 0.0:
        return out if isinstance(q, float) and q == 1.0 else q * out
    return p * x + q * out


def to_prediction(
    kind: str, out: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> Prediction:
    """Convert a raw model output of type ``kind`` at ``(x, alpha, sigma)`` to ``(x0, eps)``."""
    p0, q0, pe, qe = (c if isinstance(c, float) else _bcast(c, x) for c in prediction_coefficients(kind, alpha, sigma))
    return Prediction(_affine(p0, q0, x, out), _affine(pe, qe, x, out))


def from_prediction(
    kind: str, pred: Prediction, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """Inverse of :func:`to_prediction`: the raw output of type ``kind`` that gives ``pred``."""
    a, s = _bcast(alpha, x), _bcast(sigma, x)
    x0, eps = pred
    if kind == "eps":
        return eps
    if kind in ("x0", "edm"):
        return x0
    if kind == "v":
        return a * eps - s * x0
    if kind == "flow":
        return eps - x0
    if kind == "score":
        return -eps / s
    raise ArgumentError(f"unknown prediction type {kind!r}; expected one of {PREDICTION_TYPES}")


@dataclass(frozen=True)
class Threshold:
    """Data-space thresholding of the x0 prediction.

    * ``static``: clip x0 to ``[-max_value, max_value]``.
    * ``dynamic`` (Imagen, Saharia et al. 2022): per sample, ``s = clamp(quantile(|x0|, ratio), 1, max_value)``,
      then ``x0 = clamp(x0, -s, s) / s``.
    """

    kind: Literal["static", "dynamic"] = "dynamic"
    max_value: float = 1.0
    ratio: float = 0.995

    def __post_init__(self) -> None:
        if self.kind not in ("static", "dynamic"):
            raise ArgumentError(f"Threshold kind must be 'static' or 'dynamic', got {self.kind!r}")
        if not (self.max_value > 0) or not (0 < self.ratio <= 1):
            raise ArgumentError(f"Threshold needs max_value > 0 and 0 < ratio <= 1, got max_value={self.max_value!r}, ratio={self.ratio!r}")

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        if self.kind == "static":
            return x0.clamp(-self.max_value, self.max_value)
        flat = x0.reshape(x0.shape[0], -1).abs()
        work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        s = torch.quantile(work, self.ratio, dim=1).clamp(1.0, self.max_value).to(x0.dtype)
        s = s.reshape(-1, *([1] * (x0.ndim - 1)))
        return x0.clamp(-s, s) / s


def classifier_free_guidance(cond: ModelFn, uncond: ModelFn, scale: float) -> ModelFn:
    """Two-call CFG: ``uncond(x, t) + scale * (cond(x, t) - uncond(x, t))`` (same prediction type)."""

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        u = uncond(x, t)
        return u + scale * (cond(x, t) - u)

    return guided


def batched_classifier_free_guidance(fn2: ModelFn, scale: float) -> ModelFn:
    """One-call CFG: ``fn2`` takes a doubled batch, unconditional half first, conditional half second."""

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = fn2(torch.cat([x, x]), torch.cat([t, t]))
        u, c = out.chunk(2)
        return u + scale * (c - u)

    return guided


class Model:
    """A denoising model in fewstep's terms.

    ``fn(x, t)`` receives samples ``x`` of shape ``(B, ...)`` and times ``t`` of shape ``(B,)`` in the
    schedule's own time variable (for ``prediction="edm"``: the VE noise level ``sigma / alpha``, and
    ``x / alpha``) and returns a tensor shaped like ``x``.

    ``calls`` counts invocations of ``fn`` and ``evaluations`` counts sample rows evaluated (exact NFE
    accounting: NFE per sample = ``evaluations / batch``).

    ``check_finite``: NaN/Inf in an output raise :class:`~fewstep.ModelOutputError`. On the CPU each
    output is checked at once; on an accelerator the check stays on the device and the host looks
    once, at the end of each :func:`~fewstep.sample` call (no synchronisation per model call), or
    every ``k`` calls with ``check_finite=k``; ``False`` turns it off (see :mod:`fewstep.finite`).
    """

    def __init__(
        self,
        fn: ModelFn,
        schedule: NoiseSchedule,
        prediction: PredictionType = "eps",
        *,
        threshold: Threshold | None = None,
        check_finite: bool | int = True,
        name: str | None = None,
        sample_shape: tuple[int, ...] | None = None,
        to_images: Callable[[torch.Tensor], torch.Tensor] | None = None,
        identity: str | None = None,
        autotune: Any = False,
    ) -> None:
        if prediction not in PREDICTION_TYPES:
            raise ArgumentError(f"unknown prediction type {prediction!r}; expected one of {PREDICTION_TYPES}")
        if not isinstance(schedule, NoiseSchedule):
            raise ArgumentError(f"schedule must be a fewstep NoiseSchedule, got {type(schedule).__name__}")
        if not callable(fn):
            raise ArgumentError(f"the model function must be callable fn(x, t), got {type(fn).__name__}")
        self.fn = fn
        self.schedule = schedule
        self.prediction = prediction
        self.threshold = threshold
        self.guard = FiniteGuard(check_finite)
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.sample_shape = sample_shape
        self._to_images = to_images
        #: what identifies the model's function (cache keys, provenance of searched schedules);
        #: the bundled models set their weights' SHA-256
        self.identity = identity
        #: searched solver schedules by NFE: ``sample(model, x_T, nfe=N)`` with nothing else named runs
        #: ``tuned_schedules[N]`` when it exists (the bundled models ship some; ``fewstep.search`` makes them)
        self.tuned_schedules: dict[int, Any] = {}
        #: ``True`` (or a :class:`fewstep.AutotuneOptions`): every :func:`~fewstep.sample` call of this
        #: model without ``autotune=`` autotunes its grid on first use (:mod:`fewstep.autotune`)
        self.autotune = autotune
        self.calls = 0
        self.evaluations = 0
        self._sampling = False  # set by fewstep.sample while it runs (deferred NaN/Inf checks)

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Samples mapped back to the data's own scale and shape (identity unless the model says how;
        the bundled digits models give pixel values 0..16 shaped (n, 8, 8))."""
        return x if self._to_images is None else self._to_images(x)

    def reset_counters(self) -> None:
        self.calls = 0
        self.evaluations = 0

    @property
    def check_finite(self) -> bool | int:
        return self.guard.interval or self.guard.enabled

    @check_finite.setter
    def check_finite(self, mode: bool | int) -> None:
        self.guard = FiniteGuard(mode)

    def _call(self, x: torch.Tensor, xin: torch.Tensor, tin: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Call ``fn`` once and validate its output (type, shape, finiteness); count the call.
        ``t`` (a number or a per-sample tensor) is only read if the output is not finite."""
        out = self.fn(xin, tin)
        self.calls += 1
        self.evaluations += x.shape[0]
        if not isinstance(out, torch.Tensor):
            raise ModelOutputError(f"model {self.name!r} returned {type(out).__name__}, expected a torch.Tensor")
        if out.shape != x.shape:
            raise ModelOutputError(
                f"model {self.name!r} returned shape {tuple(out.shape)} for input shape {tuple(x.shape)}"
            )
        call = self.calls

        def error(bad: torch.Tensor | None) -> ModelOutputError:
            tt = torch.as_tensor(t, dtype=torch.float64)
            what = f"{int((~torch.isfinite(bad)).sum())} NaN/Inf values" if bad is not None else "NaN/Inf values"
            return ModelOutputError(
                f"model {self.name!r} returned {what} at t in [{float(tt.min()):.6g}, {float(tt.max()):.6g}] (call {call})"
            )

        self.guard.check(out, error)
        return out.to(x.dtype)

    def _input_dtype(self, x: torch.Tensor) -> torch.dtype:
        return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32

    def raw(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Call ``fn`` once, validating the output; ``t`` is a per-sample float64 tensor."""
        alpha, sigma = self.schedule._alpha(t), self.schedule._sigma(t)
        xin = x / _bcast(alpha, x) if self.prediction == "edm" else x
        tin = (sigma / alpha if self.prediction == "edm" else t).to(device=x.device, dtype=self._input_dtype(x))
        return self._call(x, xin, tin, t)

    def output(self, x: torch.Tensor, t: float, alpha: float, sigma: float) -> torch.Tensor:
        """The raw output at one time ``t`` for the whole batch, given that time's ``alpha`` and
        ``sigma`` (the compiled sampling loop's fast path: no schedule maths per call)."""
        xin = x * (1.0 / alpha) if self.prediction == "edm" else x
        tval = sigma / alpha if self.prediction == "edm" else t
        tin = torch.full((x.shape[0],), tval, dtype=self._input_dtype(x), device=x.device)
        return self._call(x, xin, tin, t)

    def output_rows(self, x: torch.Tensor, t: Sequence[float], alpha: Sequence[float], sigma: Sequence[float]) -> torch.Tensor:
        """:meth:`output` with one time per row (rows at different times in one call: parallel
        sampling), by the same arithmetic, so a row's output is what :meth:`output` gives it."""
        dt = self._input_dtype(x)
        if self.prediction == "edm":
            inv = torch.tensor([1.0 / a for a in alpha], dtype=x.dtype, device=x.device)
            xin = x * inv.reshape(-1, *([1] * (x.ndim - 1)))
            tin = torch.tensor([s / a for s, a in zip(sigma, alpha)], dtype=dt, device=x.device)
        else:
            xin, tin = x, torch.tensor([float(v) for v in t], dtype=dt, device=x.device)
        return self._call(x, xin, tin, torch.tensor([float(v) for v in t], dtype=torch.float64))

    def predict(self, x: torch.Tensor, t: torch.Tensor | float) -> Prediction:
        """``(x0, eps)`` at samples ``x`` (B, ...) and times ``t`` (scalar or (B,))."""
        if x.ndim < 1 or x.shape[0] == 0:
            raise ShapeError(f"x must have a non-empty batch dimension, got shape {tuple(x.shape)}")
        t64 = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        if t64.ndim == 0:
            t64 = t64.expand(x.shape[0])
        elif t64.shape != (x.shape[0],):
            raise ShapeError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t64.shape)}")
        alpha, sigma = self.schedule._alpha(t64), self.schedule._sigma(t64)
        pred = to_prediction(self.prediction, self.raw(x, t64), x, alpha, sigma)
        if not self._sampling:
            self.guard.flush()  # a direct call answers for its own output (inside sample: once at the end)
        if self.threshold is not None:
            x0 = self.threshold(pred.x0)
            pred = Prediction(x0, (x - _bcast(alpha, x) * x0) / _bcast(sigma, x))
        return pred

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float) -> Prediction:
        return self.predict(x, t)

    def __repr__(self) -> str:
        return f"Model({self.name!r}, {self.schedule!r}, prediction={self.prediction!r})"

"""Noise schedules: ``x_t = alpha_t x_0 + sigma_t eps``.

Every solver in fewstep needs only ``alpha(t)``, ``sigma(t)``, the half log-SNR
``lambda_(t) = log(alpha_t / sigma_t)`` (strictly decreasing in t) and its inverse
``t_of_lambda``. All of them are computed in float64 and cast back to the input's dtype
(a Python number gives a float64 tensor).

``t`` is the model's own time variable: ``0..N-1`` for :class:`DiscreteVP` (continuous in
between), ``[0, 1]`` for :class:`LinearVP`, :class:`CosineVP` and :class:`FlowMatching`,
``sigma`` for :class:`EDM`. Every schedule also has a *clean time* ``t_clean`` where
``sigma = 0`` (``lambda = +inf``): samplers end there by default. For :class:`DiscreteVP`
it is ``t = -1`` with ``alpha = 1``, the ``final_alpha_cumprod = 1`` convention of diffusers.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch

from .errors import ScheduleError

Number = float | int
TensorLike = torch.Tensor | Number | Sequence[float]

__all__ = [
    "NoiseSchedule",
    "VPSchedule",
    "DiscreteVP",
    "LinearVP",
    "CosineVP",
    "EDM",
    "FlowMatching",
    "schedule_from_config",
]


def _as_f64(t: TensorLike) -> tuple[torch.Tensor, torch.dtype, torch.device]:
    """Return ``t`` as a float64 tensor plus the dtype/device to cast results back to."""
    if isinstance(t, torch.Tensor):
        out_dtype = t.dtype if t.dtype.is_floating_point else torch.float64
        return t.to(torch.float64), out_dtype, t.device
    return torch.as_tensor(t, dtype=torch.float64), torch.float64, torch.device("cpu")


def _log_sigma_from_log_alpha(log_alpha: torch.Tensor) -> torch.Tensor:
    """VP: ``sigma^2 = 1 - alpha^2``, computed as ``log(-expm1(2 log alpha)) / 2`` (no cancellation)."""
    return 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))


def _log_alpha_from_lambda(lam: torch.Tensor) -> torch.Tensor:
    """VP inverse: ``alpha^2 = 1 / (1 + e^{-2 lambda})`` so ``log alpha = -softplus(-2 lambda) / 2``."""
    return -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)


class NoiseSchedule(ABC):
    """Abstract noise schedule. Subclasses implement the float64 ``_log_alpha`` / ``_log_sigma``
    (or ``_alpha`` / ``_sigma``) and ``_t_of_lambda``; the public methods handle dtypes."""

    #: largest time (pure-noise end) and smallest time with sigma > 0, used as defaults
    t_max: float
    t_min: float
    #: time where sigma = 0 exactly (samplers end here unless told otherwise)
    t_clean: float

    # ---- float64 internals -------------------------------------------------------------
    @abstractmethod
    def _alpha(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _sigma(self, t: torch.Tensor) -> torch.Tensor: ...

    def _lambda(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log(self._alpha(t)) - torch.log(self._sigma(t))

    @abstractmethod
    def _t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor: ...

    # ---- public API: tensors in, tensors out ----------------------------------------------
    def alpha(self, t: TensorLike) -> torch.Tensor:
        t64, dt, dev = _as_f64(t)
        return self._alpha(t64).to(device=dev, dtype=dt)

    def sigma(self, t: TensorLike) -> torch.Tensor:
        t64, dt, dev = _as_f64(t)
        return self._sigma(t64).to(device=dev, dtype=dt)

    def lambda_(self, t: TensorLike) -> torch.Tensor:
        t64, dt, dev = _as_f64(t)
        return self._lambda(t64).to(device=dev, dtype=dt)

    def t_of_lambda(self, lam: TensorLike) -> torch.Tensor:
        l64, dt, dev = _as_f64(lam)
        return self._t_of_lambda(l64).to(device=dev, dtype=dt)

    def coefficients(self, t: TensorLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(alpha, sigma, lambda)`` at ``t`` in float64 (for solver coefficient maths)."""
        t64, _, _ = _as_f64(t)
        return self._alpha(t64), self._sigma(t64), self._lambda(t64)

    def check_times(self, t: TensorLike, *, what: str = "time") -> None:
        """Raise :class:`ScheduleError` if any time lies outside ``[t_clean, t_max]``."""
        t64, _, _ = _as_f64(t)
        lo, hi = min(self.t_clean, self.t_max), max(self.t_clean, self.t_max)
        bad = (t64 < lo - 1e-9) | (t64 > hi + 1e-9) | ~torch.isfinite(t64)
        if bool(bad.any()):
            raise ScheduleError(
                f"{what} {t64[bad].tolist()[:5]} outside the domain [{lo}, {hi}] of {self!r}"
            )

    @property
    def is_vp(self) -> bool:
        return False

    def config(self) -> dict[str, Any]:
        """A JSON-serialisable description from which :func:`schedule_from_config` rebuilds it."""
        raise NotImplementedError

    def definition(self) -> dict[str, Any]:
        """What defines ``alpha(t)`` and ``sigma(t)`` and nothing else (not a name, the time domain,
        a flow shift that only moves default grids, or EDM's sigma_data): two schedules with the same
        definition give the same noise levels at the same times, so a solver schedule made for one
        runs on the other (:func:`fewstep.solvers.plan.schedule_fingerprint`)."""
        return {"kind": self.config()["kind"]}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoiseSchedule) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(repr(self.config()))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k not in ("kind", "alphas_cumprod"))
        return f"{type(self).__name__}({args})"


class VPSchedule(NoiseSchedule, ABC):
    """Variance preserving: ``alpha^2 + sigma^2 = 1``. Subclasses give ``log alpha`` and its inverse."""

    @abstractmethod
    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _t_of_log_alpha(self, log_alpha: torch.Tensor) -> torch.Tensor: ...

    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self._log_alpha(t))

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(_log_sigma_from_log_alpha(self._log_alpha(t)))

    def _lambda(self, t: torch.Tensor) -> torch.Tensor:
        la = self._log_alpha(t)
        return la - _log_sigma_from_log_alpha(la)

    def _t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        return self._t_of_log_alpha(_log_alpha_from_lambda(lam))

    @property
    def is_vp(self) -> bool:
        return True


class DiscreteVP(VPSchedule):
    """DDPM-style discrete VP schedule: ``alpha_n^2 = prod_{i<=n} (1 - beta_i)``, n = 0..N-1.

    Continuous ``t`` interpolates ``log alpha`` linearly (as DPM-Solver does); ``t = -1`` is
    the clean point with ``alpha = 1``. The inverse ``t(lambda)`` is exact: ``log alpha`` follows
    from ``lambda`` in closed form, then the piecewise-linear ``log alpha(t)`` is inverted.
    """

    def __init__(self, alphas_cumprod: torch.Tensor | Sequence[float], *, name: str = "custom") -> None:
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ac.numel() < 2:
            raise ScheduleError("DiscreteVP needs at least 2 alphas_cumprod values")
        if not bool(torch.isfinite(ac).all()) or bool((ac <= 0).any()) or bool((ac >= 1).any()):
            raise ScheduleError("alphas_cumprod must be finite and strictly inside (0, 1)")
        if bool((ac[1:] >= ac[:-1]).any()):
            raise ScheduleError("alphas_cumprod must be strictly decreasing")
        self.alphas_cumprod = ac
        self.name = name
        self.num_train_timesteps = ac.numel()
        # knots t = -1, 0, ..., N-1 ; log alpha = 0 at the clean knot
        self._knots_log_alpha = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * torch.log(ac)])
        self.t_max = float(self.num_train_timesteps - 1)
        self.t_min = 0.0
        self.t_clean = -1.0

    # ---- constructors --------------------------------------------------------------------
    @classmethod
    def from_betas(cls, betas: torch.Tensor | Sequence[float], *, name: str = "custom") -> "DiscreteVP":
        b = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if bool((b <= 0).any()) or bool((b >= 1).any()):
            raise ScheduleError("betas must lie strictly inside (0, 1)")
        return cls(torch.exp(torch.cumsum(torch.log1p(-b), 0)), name=name)

    @classmethod
    def linear(cls, beta_start: float = 1e-4, beta_end: float = 0.02, num_train_timesteps: int = 1000) -> "DiscreteVP":
        """DDPM betas linear in ``[beta_start, beta_end]``."""
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        return cls.from_betas(betas, name=f"linear({beta_start},{beta_end},{num_train_timesteps})")

    @classmethod
    def scaled_linear(
        cls, beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000
    ) -> "DiscreteVP":
        """Stable Diffusion's betas: linear in ``sqrt(beta)``."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        return cls.from_betas(betas, name=f"scaled_linear({beta_start},{beta_end},{num_train_timesteps})")

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "DiscreteVP":
        """diffusers' ``squaredcos_cap_v2`` (Nichol & Dhariwal 2021) betas."""

        def abar(u: float) -> float:
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        n = num_train_timesteps
        betas = [min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)]
        return cls.from_betas(betas, name=f"squaredcos_cap_v2({n})")

    squaredcos_cap_v2 = cosine

    # ---- maths -----------------------------------------------------------------------------
    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        knots = self._knots_log_alpha.to(t.device)
        pos = (t + 1.0).clamp(0.0, float(self.num_train_timesteps))
        i0 = pos.floor().long().clamp(max=self.num_train_timesteps - 1)
        frac = pos - i0.to(pos.dtype)
        return knots[i0] + frac * (knots[i0 + 1] - knots[i0])

    def _t_of_log_alpha(self, log_alpha: torch.Tensor) -> torch.Tensor:
        knots = self._knots_log_alpha.to(log_alpha.device)
        neg = -knots  # increasing
        target = (-log_alpha).clamp(float(neg[0]), float(neg[-1]))
        i1 = torch.searchsorted(neg, target.contiguous()).clamp(1, neg.numel() - 1)
        i0 = i1 - 1
        lo, hi = neg[i0], neg[i1]
        frac = (target - lo) / (hi - lo)
        return i0.to(torch.float64) + frac - 1.0

    def config(self) -> dict[str, Any]:
        return {"kind": "discrete_vp", "name": self.name, "alphas_cumprod": self.alphas_cumprod.tolist()}

    def definition(self) -> dict[str, Any]:
        return {"kind": "discrete_vp", "alphas_cumprod": self.alphas_cumprod.tolist()}


class LinearVP(VPSchedule):
    """Continuous VP-SDE with linear beta(t): ``log alpha_t = -beta_min t/2 - (beta_max - beta_min) t^2/4``."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3) -> None:
        if not (0 < beta_min <= beta_max):
            raise ScheduleError("LinearVP needs 0 < beta_min <= beta_max")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.t_max, self.t_min, self.t_clean = 1.0, float(t_min), 0.0

    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * self.beta_min * t - 0.25 * (self.beta_max - self.beta_min) * t * t

    def _t_of_log_alpha(self, log_alpha: torch.Tensor) -> torch.Tensor:
        # a t^2 + b t + c = 0 with a = db/4, b = beta_min/2, c = log alpha <= 0 (stable root)
        a, b = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
        return -2.0 * log_alpha / (b + torch.sqrt(b * b - 4.0 * a * log_alpha))

    def config(self) -> dict[str, Any]:
        return {"kind": "linear_vp", "beta_min": self.beta_min, "beta_max": self.beta_max, "t_min": self.t_min}

    def definition(self) -> dict[str, Any]:
        return {"kind": "linear_vp", "beta_min": self.beta_min, "beta_max": self.beta_max}


class CosineVP(VPSchedule):
    """Continuous cosine VP (Nichol & Dhariwal): ``alpha_t = cos((t+s)/(1+s) pi/2) / cos(s/(1+s) pi/2)``.

    ``alpha`` vanishes at t = 1, so the default ``t_max`` is 0.9946 as in DPM-Solver.
    """

    def __init__(self, s: float = 0.008, t_max: float = 0.9946, t_min: float = 1e-3) -> None:
        self.s = float(s)
        self._theta0 = self.s / (1 + self.s) * math.pi / 2
        self.t_max, self.t_min, self.t_clean = float(t_max), float(t_min), 0.0

    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        theta = (t + self.s) / (1 + self.s) * math.pi / 2
        # log(cos(theta)/cos(theta0)) via log1p of the difference (no cancellation near t = 0)
        diff = -2.0 * torch.sin((theta + self._theta0) / 2) * torch.sin((theta - self._theta0) / 2)
        la = torch.log1p(diff / math.cos(self._theta0))
        return torch.where(t >= 1.0, torch.full_like(la, -math.inf), la)  # alpha(1) = 0 exactly

    def _t_of_log_alpha(self, log_alpha: torch.Tensor) -> torch.Tensor:
        theta = torch.arccos((torch.exp(log_alpha) * math.cos(self._theta0)).clamp(-1.0, 1.0))
        return theta * 2 * (1 + self.s) / math.pi - self.s

    def config(self) -> dict[str, Any]:
        return {"kind": "cosine_vp", "s": self.s, "t_max": self.t_max, "t_min": self.t_min}

    def definition(self) -> dict[str, Any]:
        return {"kind": "cosine_vp", "s": self.s}


class EDM(NoiseSchedule):
    """Variance exploding / EDM (Karras et al. 2022): ``alpha = 1``, ``sigma = t``."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5) -> None:
        if not (0 < sigma_min < sigma_max):
            raise ScheduleError("EDM needs 0 < sigma_min < sigma_max")
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)
        self.t_max, self.t_min, self.t_clean = self.sigma_max, self.sigma_min, 0.0

    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t)

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    def _lambda(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.log(t)

    def _t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        return torch.exp(-lam)

    def config(self) -> dict[str, Any]:
        return {"kind": "edm", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "sigma_data": self.sigma_data}


class FlowMatching(NoiseSchedule):
    """Rectified flow / flow matching: ``alpha = 1 - t``, ``sigma = t``; the velocity target is
    ``u = eps - x0``. ``shift`` is the SD3-style time shift (``t -> shift t / (1 + (shift - 1) t)``)
    that the ``uniform_t`` spacing applies; it does not change alpha or sigma.
    """

    def __init__(self, shift: float = 1.0, t_max: float = 1.0, t_min: float = 1e-3) -> None:
        if shift <= 0:
            raise ScheduleError("FlowMatching shift must be > 0")
        if not (0 < t_min < t_max <= 1):
            raise ScheduleError("FlowMatching needs 0 < t_min < t_max <= 1")
        self.shift = float(shift)
        self.t_max, self.t_min, self.t_clean = float(t_max), float(t_min), 0.0

    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - t

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    def _lambda(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log1p(-t) - torch.log(t)

    def _t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(-lam)

    def shift_times(self, t: torch.Tensor) -> torch.Tensor:
        """SD3 time shift ``s t / (1 + (s - 1) t)`` (identity for shift = 1)."""
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def unshift_times(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`shift_times`: ``u = t / (s - (s - 1) t)``."""
        return t / (self.shift - (self.shift - 1.0) * t)

    def config(self) -> dict[str, Any]:
        return {"kind": "flow", "shift": self.shift, "t_max": self.t_max, "t_min": self.t_min}


_KINDS: dict[str, Any] = {
    "linear_vp": LinearVP,
    "cosine_vp": CosineVP,
    "edm": EDM,
    "flow": FlowMatching,
}


def schedule_from_config(cfg: dict[str, Any]) -> NoiseSchedule:
    """Rebuild a schedule from :meth:`NoiseSchedule.config` (validated; no code execution)."""
    if not isinstance(cfg, dict) or "kind" not in cfg:
        raise ScheduleError(f"a schedule config must be a dict with a 'kind' field, got {cfg!r:.80}")
    kind = cfg["kind"]
    args = {k: v for k, v in cfg.items() if k != "kind"}
    if kind == "discrete_vp":
        if set(args) - {"name", "alphas_cumprod"} or "alphas_cumprod" not in args:
            raise ScheduleError("discrete_vp config needs exactly 'alphas_cumprod' (and optional 'name')")
        return DiscreteVP(args["alphas_cumprod"], name=str(args.get("name", "custom")))
    if kind not in _KINDS:
        raise ScheduleError(f"unknown schedule kind {kind!r}; known: {sorted([*_KINDS, 'discrete_vp'])}")
    try:
        return _KINDS[kind](**args)
    except TypeError as exc:
        raise ScheduleError(f"bad fields for schedule kind {kind!r}: {exc}") from None

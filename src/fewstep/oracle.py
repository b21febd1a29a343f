"""Exact oracle models: a Gaussian-mixture data distribution with closed-form denoisers.

Data: ``p_0 = sum_k pi_k N(mu_k, Sigma_k)`` with ``Sigma_k = diag(delta_k) + U_k U_k^T``
(``U_k`` is d x r; r = 0 gives diagonal covariances, r = d any full covariance).
Under ``x_t = alpha x_0 + sigma eps`` the marginal is again a mixture,
``p_t = sum_k pi_k N(alpha mu_k, C_k)`` with ``C_k = alpha^2 Sigma_k + sigma^2 I``, so

* score  ``grad log p_t(x) = -sum_k r_k(x) C_k^{-1} (x - alpha mu_k)``
* eps    ``= -sigma * score``
* x0     ``= E[x_0 | x_t] = sum_k r_k(x) (mu_k + alpha Sigma_k C_k^{-1} (x - alpha mu_k))``

with responsibilities ``r_k`` from a log-sum-exp. ``C_k^{-1}`` and ``log det C_k`` use the Woodbury
identity, so the cost is O(K d r^2) per sample. Everything is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ArgumentError, ShapeError
from .models import Model, Prediction, from_prediction
from .schedules import NoiseSchedule

__all__ = ["GaussianMixture", "bundled_oracle", "ORACLES"]

_CHUNK_ELEMS = 2**20  # batch rows x K x d processed at once: small enough to stay in cache (2**24 ran 1.9-3x slower per row on the 2-vCPU VM at d = 64 and d = 3072)


@dataclass
class _Woodbury:
    """Per (sample, component) pieces of ``C = diag(A) + alpha^2 U U^T``."""

    inv_a: torch.Tensor  # (B, K, d)   1 / A
    alpha: torch.Tensor  # (B,)
    factors: torch.Tensor  # (K, d, r)
    chol_m: torch.Tensor  # (B, K, r, r) Cholesky of M = I + alpha^2 U^T A^-1 U
    logdet: torch.Tensor  # (B, K)

    #: isotropic fast path: U = V diag(g) with orthonormal V, so C^-1 = (I - V diag(shrink) V^T) / A
    shrink: torch.Tensor | None = None  # (B, K, r)

    def solve(self, y: torch.Tensor) -> torch.Tensor:
        """``C^{-1} y`` for y of shape (B, K, d)."""
        z = y * self.inv_a
        if self.factors.shape[-1] == 0:
            return z
        if self.shrink is not None:  # factors hold the orthonormal V here
            proj = torch.einsum("kdr,bkd->bkr", self.factors, z) * self.shrink
            return z - torch.einsum("kdr,bkr->bkd", self.factors, proj)
        a = self.alpha[:, None, None]
        w = a * torch.einsum("kdr,bkd->bkr", self.factors, z)
        w = torch.cholesky_solve(w.unsqueeze(-1), self.chol_m).squeeze(-1)
        return z - self.inv_a * (a * torch.einsum("kdr,bkr->bkd", self.factors, w))


class GaussianMixture:
    """A Gaussian mixture in R^d with exact noised-marginal predictions under any schedule."""

    def __init__(
        self,
        weights: torch.Tensor,
        means: torch.Tensor,
        diag: torch.Tensor,
        factors: torch.Tensor | None = None,
        *,
        name: str = "gmm",
    ) -> None:
        w = torch.as_tensor(weights, dtype=torch.float64)
        mu = torch.as_tensor(means, dtype=torch.float64)
        dg = torch.as_tensor(diag, dtype=torch.float64)
        if mu.ndim != 2:
            raise ShapeError(f"means must be (K, d), got {tuple(mu.shape)}")
        k, d = mu.shape
        if w.shape != (k,) or dg.shape != (k, d):
            raise ShapeError(f"weights must be ({k},) and diag ({k}, {d}); got {tuple(w.shape)}, {tuple(dg.shape)}")
        if bool((w <= 0).any()) or bool((dg <= 0).any()):
            raise ArgumentError("mixture weights and diagonal variances must be positive")
        u = torch.zeros(k, d, 0, dtype=torch.float64) if factors is None else torch.as_tensor(factors, dtype=torch.float64)
        if u.ndim != 3 or u.shape[:2] != (k, d):
            raise ShapeError(f"factors must be ({k}, {d}, r), got {tuple(u.shape)}")
        self.log_weights = torch.log(w / w.sum())
        self.means, self.diag, self.factors = mu, dg, u
        self.name = name
        self._outer: torch.Tensor | None = None  # U_k[:, r] U_k[:, s], cached for the Woodbury matrix
        self._iso_basis = self._isotropic_basis()

    def _isotropic_basis(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(V, g^2)`` when every ``Sigma_k = delta_k I + V diag(g^2) V^T`` with orthonormal V, else None."""
        u = self.factors
        if u.shape[-1] == 0 or not bool(torch.allclose(self.diag, self.diag[:, :1].expand_as(self.diag), rtol=1e-12, atol=0)):
            return None
        g2 = (u * u).sum(1)  # (K, r)
        if bool((g2 <= 0).any()):
            return None
        gram = u.transpose(-1, -2) @ u
        if not bool(torch.allclose(gram, torch.diag_embed(g2), rtol=0, atol=1e-12 * float(g2.max()))):
            return None
        return u / g2.sqrt()[:, None, :], g2

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def random(
        cls, dim: int, n_components: int = 8, rank: int = 4, *, seed: int = 0, scale: float = 1.0, name: str | None = None
    ) -> "GaussianMixture":
        """A seeded random mixture with data scale ~``scale`` per coordinate (well separated modes)."""
        g = torch.Generator().manual_seed(seed)
        k = n_components
        means = scale * 0.8 * torch.randn(k, dim, generator=g, dtype=torch.float64)
        diag = (scale * (0.05 + 0.25 * torch.rand(k, dim, generator=g, dtype=torch.float64))) ** 2
        factors = scale * 0.35 * torch.randn(k, dim, rank, generator=g, dtype=torch.float64) / math.sqrt(max(rank, 1))
        weights = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
        return cls(weights, means, diag, factors, name=name or f"gmm-d{dim}-k{k}-r{rank}-s{seed}")

    @classmethod
    def from_covariances(cls, weights: torch.Tensor, means: torch.Tensor, covs: torch.Tensor, *, name: str = "gmm") -> "GaussianMixture":
        """Exact full covariances as ``delta I + U U^T`` with ``delta = min eigenvalue / 2``."""
        covs = torch.as_tensor(covs, dtype=torch.float64)
        evals, evecs = torch.linalg.eigh(0.5 * (covs + covs.transpose(-1, -2)))
        if bool((evals <= 0).any()):
            raise ArgumentError("covariances must be positive definite")
        delta = 0.5 * evals.min(dim=-1).values  # (K,)
        factors = evecs * torch.sqrt(evals - delta[:, None]).unsqueeze(-2)
        diag = delta[:, None].expand(-1, covs.shape[-1]).clone()
        return cls(weights, means, diag, factors, name=name)

    @classmethod
    def fit_digits(cls, n_components: int = 10, *, seed: int = 0, reg_covar: float = 1e-3) -> "GaussianMixture":
        """Fit to scikit-learn's 8x8 digits scaled to [-1, 1] (``pixels / 8 - 1``), full covariances."""
        try:
            from sklearn.datasets import load_digits
            from sklearn.mixture import GaussianMixture as SkGMM
        except ImportError as exc:  # pragma: no cover - depends on extras
            raise ImportError("fit_digits needs scikit-learn: pip install 'fewstep[digits]'") from exc
        data = load_digits().data / 8.0 - 1.0
        gm = SkGMM(n_components, covariance_type="full", reg_covar=reg_covar, random_state=seed, max_iter=200)
        gm.fit(data)
        return cls.from_covariances(
            torch.as_tensor(gm.weights_), torch.as_tensor(gm.means_), torch.as_tensor(gm.covariances_),
            name=f"digits-gmm{n_components}",
        )

    # ---- properties ------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.log_weights.exp()[:, None] * self.means).sum(0)

    def covariance(self) -> torch.Tensor:
        """The mixture's overall covariance (law of total covariance)."""
        w = self.log_weights.exp()
        m = self.mean()
        comp = torch.diag_embed(self.diag) + self.factors @ self.factors.transpose(-1, -2)
        dev = self.means - m
        return (w[:, None, None] * (comp + dev[:, :, None] * dev[:, None, :])).sum(0)

    # ---- exact maths -------------------------------------------------------------------------
    def _woodbury(self, alpha: torch.Tensor, sigma: torch.Tensor) -> _Woodbury:
        a2 = (alpha * alpha)[:, None, None]
        big_a = a2 * self.diag[None] + (sigma * sigma)[:, None, None]  # (B, K, d)
        inv_a = 1.0 / big_a
        r = self.factors.shape[-1]
        logdet = torch.log(big_a).sum(-1)
        if r == 0:
            chol = torch.zeros(*big_a.shape[:2], 0, 0, dtype=torch.float64)
        elif self._iso_basis is not None:
            basis, g2 = self._iso_basis
            a_iso = big_a[..., :1]  # (B, K, 1), A is constant along d
            ag2 = a2 * g2[None]  # (B, K, r)
            logdet = logdet + torch.log1p(ag2 / a_iso).sum(-1)
            return _Woodbury(inv_a, alpha, basis, chol_m=torch.empty(0), logdet=logdet, shrink=ag2 / (a_iso + ag2))
        else:
            if self._outer is None:
                self._outer = (self.factors[..., :, None] * self.factors[..., None, :]).reshape(*self.factors.shape[:2], r * r)
            utau = torch.einsum("bkd,kdq->bkq", inv_a, self._outer).reshape(*big_a.shape[:2], r, r)
            m = torch.eye(r, dtype=torch.float64) + a2[..., None] * utau
            chol = torch.linalg.cholesky(m)
            logdet = logdet + 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        return _Woodbury(inv_a, alpha, self.factors, chol, logdet)

    def _chunked(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, fn):  # type: ignore[no-untyped-def]
        rows = max(1, _CHUNK_ELEMS // max(1, self.n_components * self.dim * max(1, self.factors.shape[-1] // 4 + 1)))
        outs = [fn(x[i : i + rows], alpha[i : i + rows], sigma[i : i + rows]) for i in range(0, x.shape[0], rows)]
        if isinstance(outs[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*outs))
        return torch.cat(outs)

    def _prepare(self, x: torch.Tensor, alpha, sigma):  # type: ignore[no-untyped-def]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ShapeError(f"oracle of dimension {self.dim} got x of shape {tuple(x.shape)}; flatten to (B, {self.dim})")
        x64 = x.to(torch.float64)
        b = x.shape[0]
        a = torch.as_tensor(alpha, dtype=torch.float64).expand(b) if torch.as_tensor(alpha).ndim == 0 else torch.as_tensor(alpha, dtype=torch.float64)
        s = torch.as_tensor(sigma, dtype=torch.float64).expand(b) if torch.as_tensor(sigma).ndim == 0 else torch.as_tensor(sigma, dtype=torch.float64)
        return x64, a, s

    def _log_components(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor):  # type: ignore[no-untyped-def]
        wb = self._woodbury(a, s)
        diff = x[:, None, :] - a[:, None, None] * self.means[None]  # (B, K, d)
        cinv_diff = wb.solve(diff)
        quad = (diff * cinv_diff).sum(-1)
        logn = -0.5 * (self.dim * math.log(2 * math.pi) + wb.logdet + quad)
        return self.log_weights[None] + logn, cinv_diff

    def log_prob_t(self, x: torch.Tensor, alpha: torch.Tensor | float, sigma: torch.Tensor | float) -> torch.Tensor:
        """``log p_t(x)`` of the noised marginal at ``(alpha, sigma)``, shape (B,)."""
        x64, a, s = self._prepare(x, alpha, sigma)

        def one(xc, ac, sc):  # type: ignore[no-untyped-def]
            return torch.logsumexp(self._log_components(xc, ac, sc)[0], dim=1)

        return self._chunked(x64, a, s, one)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density of the data distribution, shape (B,)."""
        return self.log_prob_t(x, 1.0, 0.0)

    def posterior(self, x: torch.Tensor, alpha: torch.Tensor | float, sigma: torch.Tensor | float) -> Prediction:
        """Exact ``(E[x0 | x_t], E[eps | x_t])`` in float64."""
        x64, a, s = self._prepare(x, alpha, sigma)

        def one(xc, ac, sc):  # type: ignore[no-untyped-def]
            logc, cinv_diff = self._log_components(xc, ac, sc)
            resp = torch.softmax(logc, dim=1)  # (B, K)
            eps = sc[:, None] * (resp[:, :, None] * cinv_diff).sum(1)
            # Sigma_k C^-1 diff = delta * y + U (U^T y)
            sig_y = self.diag[None] * cinv_diff + torch.einsum("kdr,bkr->bkd", self.factors, torch.einsum("kdr,bkd->bkr", self.factors, cinv_diff))
            x0 = (resp[:, :, None] * (self.means[None] + ac[:, None, None] * sig_y)).sum(1)
            return x0, eps

        x0, eps = self._chunked(x64, a, s, one)
        return Prediction(x0, eps)

    def score(self, x: torch.Tensor, alpha: torch.Tensor | float, sigma: torch.Tensor | float) -> torch.Tensor:
        _, eps = self.posterior(x, alpha, sigma)
        s = torch.as_tensor(sigma, dtype=torch.float64)
        return -eps / (s[:, None] if s.ndim == 1 else s)

    def sample(self, n: int, *, generator: torch.Generator | None = None, seed: int | None = None) -> torch.Tensor:
        """Exact samples from the data distribution, (n, d) float64."""
        g = generator if generator is not None else torch.Generator().manual_seed(0 if seed is None else seed)
        comp = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=g)
        z1 = torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        z2 = torch.randn(n, self.factors.shape[-1], generator=g, dtype=torch.float64)
        x = self.means[comp] + self.diag[comp].sqrt() * z1
        if self.factors.shape[-1]:
            x = x + torch.einsum("ndr,nr->nd", self.factors[comp], z2)
        return x

    # ---- as a model ---------------------------------------------------------------------------
    def as_model(self, schedule: NoiseSchedule, prediction: str = "x0", *, name: str | None = None) -> Model:
        """A :class:`~fewstep.Model` whose ``fn`` returns the exact prediction of type ``prediction``.

        The oracle works on flat vectors (B, d). Output is cast to the input dtype.
        """

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t64 = t.to(torch.float64)
            if prediction == "edm":  # fn receives (x / alpha, sigma / alpha): VE coordinates
                pred = self.posterior(x, torch.ones_like(t64), t64)
                return pred.x0.to(x.dtype)
            a, s = schedule._alpha(t64), schedule._sigma(t64)
            pred = self.posterior(x, a, s)
            return from_prediction(prediction, pred, x.to(torch.float64), a, s).to(x.dtype)

        return Model(fn, schedule, prediction, name=name or f"{self.name}/{prediction}", sample_shape=(self.dim,))  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"GaussianMixture({self.name!r}, d={self.dim}, K={self.n_components}, r={self.factors.shape[-1]})"


#: bundled oracles by name (built on demand; all seeded)
ORACLES = {
    "gmm-d2": lambda: GaussianMixture.random(2, 6, 1, seed=2, name="gmm-d2"),
    "gmm-d64": lambda: GaussianMixture.random(64, 8, 4, seed=0, name="gmm-d64"),
    "gmm-d256": lambda: GaussianMixture.random(256, 8, 4, seed=0, name="gmm-d256"),
    "gmm-d1024": lambda: GaussianMixture.random(1024, 8, 4, seed=0, name="gmm-d1024"),
    "gmm-d3072": lambda: GaussianMixture.random(3072, 8, 4, seed=0, name="gmm-d3072"),
    "digits-gmm": lambda: GaussianMixture.fit_digits(10, seed=0),
}


def bundled_oracle(name: str = "gmm-d64") -> GaussianMixture:
    """One of the bundled oracle mixtures: ``gmm-d2``, ``gmm-d64``, ``gmm-d256``, ``gmm-d1024``, ``gmm-d3072``
    (8 components with random means whose distance grows like sqrt(d)), ``digits-gmm``."""
    if name not in ORACLES:
        raise ArgumentError(f"unknown oracle {name!r}; known: {sorted(ORACLES)}")
    return ORACLES[name]()

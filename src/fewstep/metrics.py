"""Metrics: RMSE vs reference, exact likelihood gap on oracles, Fréchet distance of Gaussian fits."""

from __future__ import annotations

import numpy as np
import torch

from .errors import ShapeError

__all__ = ["rmse", "likelihood_gap", "frechet_distance", "frechet_of_fits", "gaussian_fit", "StreamingGaussian"]


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Per-sample RMS over dimensions, averaged over the batch: ``mean_b sqrt(mean_d (x - ref)^2)``."""
    if x.shape != ref.shape:
        raise ShapeError(f"rmse: shapes differ {tuple(x.shape)} vs {tuple(ref.shape)}")
    d = (x.to(torch.float64) - ref.to(torch.float64)).reshape(x.shape[0], -1)
    return float(d.pow(2).mean(1).sqrt().mean())


def likelihood_gap(oracle: "object", samples: torch.Tensor, true_samples: torch.Tensor) -> float:
    """``mean log p(true) - mean log p(samples)`` under the oracle's exact data density (nats per sample)."""
    lp_true = oracle.log_prob(true_samples.reshape(true_samples.shape[0], -1))  # type: ignore[attr-defined]
    lp = oracle.log_prob(samples.reshape(samples.shape[0], -1))  # type: ignore[attr-defined]
    return float(lp_true.mean() - lp.mean())


def gaussian_fit(x: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(x.detach().cpu().to(torch.float64) if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    a = a.reshape(a.shape[0], -1)
    return a.mean(0), np.atleast_2d(np.cov(a, rowvar=False))


def frechet_distance(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """``|mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x S_y)^(1/2))`` between Gaussian fits (FID's formula)."""
    mx, sx = gaussian_fit(x)
    my, sy = gaussian_fit(y)
    return frechet_of_fits(mx, sx, my, sy)


def frechet_of_fits(mx: np.ndarray, sx: np.ndarray, my: np.ndarray, sy: np.ndarray) -> float:
    """The Fréchet distance of two Gaussians given by their means and covariances."""
    # tr (S_x S_y)^(1/2) = sum of sqrt of the eigenvalues of S_x S_y (real, >= 0 for PSD S_x, S_y);
    # computed from the symmetric form A S_y A with A = S_x^(1/2) for stability
    w, v = np.linalg.eigh(sx)  # S_x is symmetric PSD (possibly singular: e.g. always-blank pixels)
    root_x = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    evals = np.linalg.eigvalsh(root_x @ sy @ root_x)
    trace_covmean = float(np.sum(np.sqrt(np.clip(evals, 0.0, None))))
    return float(np.sum((mx - my) ** 2) + np.trace(sx) + np.trace(sy) - 2.0 * trace_covmean)


class StreamingGaussian:
    """Mean and covariance of rows seen chunk by chunk (float64 sums; the same as :func:`gaussian_fit`
    of all rows, ``np.cov``'s n - 1 normalisation)."""

    def __init__(self) -> None:
        self.n, self.sum, self.outer = 0, None, None

    def add(self, x: torch.Tensor | np.ndarray) -> None:
        a = np.asarray(x.detach().cpu().to(torch.float64) if isinstance(x, torch.Tensor) else x, dtype=np.float64)
        a = a.reshape(a.shape[0], -1)
        if self.sum is None:
            self.sum, self.outer = np.zeros(a.shape[1]), np.zeros((a.shape[1], a.shape[1]))
        self.n += a.shape[0]
        self.sum += a.sum(0)
        self.outer += a.T @ a

    def fit(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2 or self.sum is None or self.outer is None:
            raise ShapeError(f"a Gaussian fit needs at least 2 rows, got {self.n}")
        mean = self.sum / self.n
        cov = (self.outer - self.n * np.outer(mean, mean)) / (self.n - 1)
        return mean, cov

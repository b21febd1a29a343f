"""scikit-learn's 8x8 digits (1797 images, pixel values 0..16) as a fixed, stratified
train / held-out split in model space ``x = pixels / 8 - 1`` (in [-1, 1])."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ArgumentError, ShapeError

__all__ = ["DigitsSplit", "load_digits_split", "to_model_space", "to_images", "PIXEL_MAX"]

PIXEL_MAX = 16.0


def to_model_space(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Pixel values 0..16 (any shape) to float32 model space ``pixels / 8 - 1`` in [-1, 1]."""
    return torch.as_tensor(pixels).float() / 8.0 - 1.0


def to_images(x: torch.Tensor) -> torch.Tensor:
    """Model-space samples to float pixel values clamped to 0..16, one grey image per sample:
    (n, 1, S, S) or (n, S, S) to (n, S, S); flat digits (n, 64) to (n, 8, 8)."""
    x = torch.as_tensor(x)
    if x.ndim == 2 and x.shape[1] == 64:
        x = x.reshape(x.shape[0], 8, 8)
    elif x.ndim == 4 and x.shape[1] == 1 and x.shape[2] == x.shape[3]:
        x = x[:, 0]
    elif not (x.ndim == 3 and x.shape[1] == x.shape[2] and x.shape[0] > 0):
        raise ShapeError(f"expected digit samples shaped (n, 1, S, S), (n, S, S) or (n, 64); got shape {tuple(x.shape)}")
    return ((x.detach().float() + 1.0) * 8.0).clamp(0.0, PIXEL_MAX)


@dataclass(frozen=True)
class DigitsSplit:
    """Train / held-out digits in model space: images (n, 1, 8, 8) float32, labels int64, and the
    indices of each part into ``sklearn.datasets.load_digits()`` (sorted)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    heldout_x: torch.Tensor
    heldout_y: torch.Tensor
    train_idx: np.ndarray
    heldout_idx: np.ndarray
    seed: int
    heldout_fraction: float

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description for model cards; ``heldout_sha256`` hashes the sorted held-out
        indices written as ASCII decimals joined by commas."""
        text = ",".join(str(int(i)) for i in np.sort(self.heldout_idx))
        return {
            "dataset": "sklearn.datasets.load_digits",
            "split": "stratified by label, numpy default_rng(seed)",
            "seed": self.seed,
            "heldout_fraction": self.heldout_fraction,
            "n_train": int(len(self.train_idx)),
            "n_heldout": int(len(self.heldout_idx)),
            "heldout_sha256": hashlib.sha256(text.encode("ascii")).hexdigest(),
        }


def load_digits_split(seed: int = 0, heldout_fraction: float = 0.25) -> DigitsSplit:
    """The digits split: per label (in increasing order), a permutation from one
    ``numpy.random.default_rng(seed)`` and the first ``round(fraction * count)`` go to held-out."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ArgumentError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}")
    from sklearn.datasets import load_digits  # optional dependency (fewstep[digits])

    digits = load_digits()
    images, labels = np.asarray(digits.images), np.asarray(digits.target)
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        held.append(idx[: int(round(heldout_fraction * len(idx)))])
    heldout_idx = np.sort(np.concatenate(held))
    train_idx = np.setdiff1d(np.arange(len(labels)), heldout_idx)

    def part(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return to_model_space(images[idx][:, None]), torch.as_tensor(labels[idx], dtype=torch.int64)

    (train_x, train_y), (heldout_x, heldout_y) = part(train_idx), part(heldout_idx)
    return DigitsSplit(train_x, train_y, heldout_x, heldout_y, train_idx, heldout_idx, int(seed), float(heldout_fraction))

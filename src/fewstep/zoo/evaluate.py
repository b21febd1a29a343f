"""Digits metrics for generated samples, against the held-out split the models never saw:

* Fréchet distance in the feature space of the bundled digits classifier (its penultimate layer:
  an FID for 8x8 digits) and in pixel space (both via :func:`fewstep.frechet_distance`);
* the classifier's confidence (mean max-softmax probability) and the share of samples it
  classifies with probability >= 0.9, as a sanity figure (the models are unconditional, so there
  is no label to be accurate against); and the entropy of the predicted-class histogram in bits
  (log2(10) = 3.32 when every digit is equally frequent).

Samples are read as a user would see them: mapped to pixels 0..16 (clamped) and back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..metrics import frechet_distance
from .data import load_digits_split, to_images, to_model_space

__all__ = ["DigitsEvaluator"]


@dataclass
class _Cached:
    features: torch.Tensor
    pixels: torch.Tensor


class DigitsEvaluator:
    """Metrics of digit samples (model space, (n, 1, 8, 8) or (n, 64)) against held-out digits."""

    def __init__(self, root: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        from . import load_network

        self.net, self.card = load_network("digits-classifier", root, device=device)
        self.device = torch.device(device)
        data = self.card.get("data", {})
        self.split = load_digits_split(seed=int(data.get("seed", 0)), heldout_fraction=float(data.get("heldout_fraction", 0.25)))
        self._heldout = self._embed(self.split.heldout_x)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Clamp to the pixel range as a user's image would be, back in model space, (n, 1, 8, 8) float32."""
        return to_model_space(to_images(x.detach().to(torch.float32).cpu())).reshape(-1, 1, 8, 8)

    def _embed(self, x: torch.Tensor) -> _Cached:
        x = self._prepare(x)
        with torch.no_grad():
            feats = torch.cat([self.net.features(chunk.to(self.device)).cpu() for chunk in x.split(512)])
        return _Cached(feats.to(torch.float64), x.reshape(x.shape[0], -1).to(torch.float64))

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (n, 10) of samples."""
        x = self._prepare(x)
        with torch.no_grad():
            return torch.cat([torch.softmax(self.net(chunk.to(self.device)).float(), -1).cpu() for chunk in x.split(512)])

    def evaluate(self, x: torch.Tensor) -> dict[str, float]:
        """``fd_features``, ``fd_pixels`` (to the held-out digits), ``confidence``, ``confident_share``, ``class_entropy_bits``."""
        if x.shape[0] < 2:
            raise ValueError(f"digit metrics need at least 2 samples, got {x.shape[0]}")
        emb = self._embed(x)
        probs = self.probabilities(x)
        top = probs.max(-1).values
        hist = torch.bincount(probs.argmax(-1), minlength=10).to(torch.float64) / probs.shape[0]
        entropy = float(-(hist[hist > 0] * hist[hist > 0].log2()).sum())
        return {
            "fd_features": frechet_distance(emb.features, self._heldout.features),
            "fd_pixels": frechet_distance(emb.pixels, self._heldout.pixels),
            "confidence": float(top.mean()),
            "confident_share": float((top >= 0.9).to(torch.float64).mean()),
            "class_entropy_bits": entropy,
        }

    def baseline(self) -> dict[str, Any]:
        """The same metrics for the real train split against the held-out split (the bar generated
        samples are measured against), and the classifier's held-out accuracy."""
        out: dict[str, Any] = self.evaluate(self.split.train_x)
        probs = self.probabilities(self.split.heldout_x)
        out["heldout_accuracy"] = float((probs.argmax(-1) == self.split.heldout_y).to(torch.float64).mean())
        out["heldout_confidence"] = float(probs.max(-1).values.mean())
        out["n_train"], out["n_heldout"] = int(self.split.train_x.shape[0]), int(self.split.heldout_x.shape[0])
        out["max_entropy_bits"] = math.log2(10)
        return out

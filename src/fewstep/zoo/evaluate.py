"""Digits metrics for generated samples, against the held-out split the models never saw:

* Fréchet distance in the feature space of the bundled digits classifier (its penultimate layer:
  an FID for 8x8 digits) and in pixel space (both via :func:`fewstep.frechet_distance`);
* the classifier's confidence (mean max-softmax probability) and the share of samples it
  classifies with probability >= 0.9, as a sanity figure (the models are unconditional, so there
  is no label to be accurate against); and the entropy of the predicted-class histogram in bits
  (log2(10) = 3.32 when every digit is equally frequent).

Samples are read as a user would see them: mapped to pixels 0..16 (clamped) and back.

:func:`model_quality` measures a zoo model as its card records it (converged high-NFE samples,
as many as the train split, against the train-vs-held-out bar):

    python -m fewstep.zoo.evaluate NAME [--n 1347] [--nfe 100] [--seed 0] [--write]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ShapeError

from ..metrics import frechet_distance
from .data import load_digits_split, to_images, to_model_space

__all__ = ["DigitsEvaluator", "model_quality", "main"]


@dataclass
class _Cached:
    features: torch.Tensor  # float64, for Fréchet distances
    pixels: torch.Tensor
    probabilities: torch.Tensor  # class probabilities (n, 10)


class DigitsEvaluator:
    """Metrics of digit samples (model space, (n, 1, 8, 8) or (n, 64)) against held-out digits."""

    def __init__(self, root: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        from . import load_network

        self.net, self.card = load_network("digits-classifier", root, device=device)
        self.device = torch.device(device)
        data = self.card.get("data", {})
        self.split = load_digits_split(seed=int(data.get("seed", 0)), heldout_fraction=float(data.get("heldout_fraction", 0.25)))
        self._heldout = self._embed(self.split.heldout_x)

    def _embed(self, x: torch.Tensor) -> _Cached:
        """One classifier pass: features and class probabilities of the samples read as a user's
        image would be (clamped to the pixel range, back in model space)."""
        x = to_model_space(to_images(x.detach().to(torch.float32).cpu())).reshape(-1, 1, 8, 8)
        with torch.no_grad():
            feats = torch.cat([self.net.features(chunk.to(self.device)).cpu() for chunk in x.split(512)])
            probs = torch.softmax(self.net.classify(feats.to(self.device)).float(), -1).cpu()
        return _Cached(feats.to(torch.float64), x.reshape(x.shape[0], -1).to(torch.float64), probs)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (n, 10) of samples."""
        return self._embed(x).probabilities

    def evaluate(self, x: torch.Tensor) -> dict[str, float]:
        """``fd_features``, ``fd_pixels`` (to the held-out digits), ``confidence``, ``confident_share``, ``class_entropy_bits``."""
        if x.shape[0] < 2:
            raise ShapeError(f"digit metrics need at least 2 samples, got {x.shape[0]}")
        emb = self._embed(x)
        top = emb.probabilities.max(-1).values
        hist = torch.bincount(emb.probabilities.argmax(-1), minlength=10).to(torch.float64) / emb.probabilities.shape[0]
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
        probs = self._heldout.probabilities
        out["heldout_accuracy"] = float((probs.argmax(-1) == self.split.heldout_y).to(torch.float64).mean())
        out["heldout_confidence"] = float(probs.max(-1).values.mean())
        out["n_train"], out["n_heldout"] = int(self.split.train_x.shape[0]), int(self.split.heldout_x.shape[0])
        out["max_entropy_bits"] = math.log2(10)
        return out


#: the sampler that produces the "converged" samples the card's metrics describe (how far they are
#: from converged is measured each time: ``rms_change_at_double_nfe``)
QUALITY_SOLVER = ("unipc", {"lower_order_final": False})
QUALITY_NFE = 100


def model_quality(name: str, n: int | None = None, *, nfe: int = QUALITY_NFE, seed: int = 0,
                  root: str | Path | None = None, batch: int = 512) -> dict[str, Any]:
    """Metrics of ``n`` samples (default: as many as the train split) of zoo model ``name`` drawn with
    UniPC at ``nfe`` NFE from seeded noise, next to the train-vs-held-out bar and their ratios."""
    from ..noise import initial_noise
    from ..sample import sample
    from . import load

    model = load(name, root)
    evaluator = DigitsEvaluator(root)
    base = evaluator.baseline()
    n = base["n_train"] if n is None else int(n)
    solver, options = QUALITY_SOLVER
    start = time.perf_counter()
    x_T = initial_noise(model.schedule, (n, *model.sample_shape), seed)
    x = torch.cat([sample(model, chunk, solver, nfe=nfe, progress=False, **options) for chunk in x_T.split(batch)])
    wall = time.perf_counter() - start
    # convergence: the first 256 samples again at twice the NFE
    k = min(256, n)
    finer = sample(model, x_T[:k], solver, nfe=2 * nfe, progress=False, **options)
    change = float((finer.double() - x[:k].double()).pow(2).mean().sqrt())
    got = evaluator.evaluate(x)
    return {
        **got,
        "fd_features_ratio": got["fd_features"] / base["fd_features"],
        "fd_pixels_ratio": got["fd_pixels"] / base["fd_pixels"],
        "train_vs_heldout": {k: base[k] for k in ("fd_features", "fd_pixels", "confidence", "confident_share", "class_entropy_bits")},
        "heldout_confidence": base["heldout_confidence"],
        "samples": n, "solver": solver, "solver_options": options, "nfe": nfe, "seed": seed,
        "rms_change_at_double_nfe": change, "rms_change_samples": k,
        "sampling_wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    from . import WEIGHTS, card

    parser = argparse.ArgumentParser(prog="python -m fewstep.zoo.evaluate", description=model_quality.__doc__)
    parser.add_argument("name")
    parser.add_argument("--n", type=int, default=None, help="samples (default: as many as the train split)")
    parser.add_argument("--nfe", type=int, default=QUALITY_NFE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default=None, help="folder of weights and cards (default: the bundled ones)")
    parser.add_argument("--write", action="store_true", help="record the figures in the card's 'metrics' field")
    args = parser.parse_args(argv)
    got = model_quality(args.name, args.n, nfe=args.nfe, seed=args.seed, root=args.root)
    print(json.dumps(got, indent=1))
    if args.write:
        info = card(args.name, args.root)
        info["metrics"] = got
        path = (Path(args.root) if args.root else WEIGHTS) / f"{args.name}.json"
        path.write_text(json.dumps(info, indent=1) + "\n")
        print(f"recorded in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

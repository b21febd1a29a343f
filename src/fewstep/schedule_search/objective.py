"""What a search minimises: the error of final samples against reference solutions from the same
noises, on a calibration batch, with a held-out batch of other noises reported beside it.

References are very fine solves of the probability-flow ODE (UniPC at ``reference_nfe`` on the
logistic grid, full order to the end; its change from half the NFE is recorded as its error bar),
computed once and cached on disk as ``.npy`` files named by a hash of the model's identity, the
noises and the reference settings. The error is the RMSE by default; any
``metric(samples, reference) -> float`` (lower is better) may replace it, e.g. a Fréchet distance.
"""

from __future__ import annotations

import hashlib
import json
import os
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..atomic import write_atomic
from ..errors import ArgumentError
from ..metrics import rmse
from ..models import Model
from ..solvers.plan import schedule_fingerprint

__all__ = ["Objective", "ReferenceSet", "reference_set", "model_identity", "default_cache_dir"]

Metric = Callable[[torch.Tensor, torch.Tensor], float]


def default_cache_dir() -> Path:
    """``$FEWSTEP_CACHE``, else ``$XDG_CACHE_HOME/fewstep``, else ``~/.cache/fewstep``."""
    if os.environ.get("FEWSTEP_CACHE"):
        return Path(os.environ["FEWSTEP_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "fewstep"


def model_identity(model: Model) -> str:
    """What identifies a model's function for caching and provenance: ``model.identity`` when set
    (the bundled models set their weights' SHA-256), else its name, prediction and schedule."""
    ident = getattr(model, "identity", None)
    if ident:
        return str(ident)
    return f"{model.name}|{model.prediction}|{schedule_fingerprint(model.schedule)}"


def tensor_digest(x: torch.Tensor) -> str:
    """A short hash of a tensor's values and shape (cache keys, search-state identity)."""
    data = x.detach().to(torch.float64).cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16] + f"@{list(x.shape)}"


@dataclass
class ReferenceSet:
    """Noises, their reference solutions, and the reference's own error bar (RMS change from a
    solve at half the NFE)."""

    noises: torch.Tensor
    reference: torch.Tensor
    error_bar: float
    method: str
    cached: bool = False


def _fine_solution(model: Model, x: torch.Tensor, nfe: int, max_rows: int) -> torch.Tensor:
    from ..sample import sample

    parts = [sample(model, xs, "unipc", nfe=nfe, lower_order_final=False) for xs in x.split(max_rows)]
    return torch.cat(parts)


def reference_set(model: Model, noises: torch.Tensor, *, reference_nfe: int = 200, cache_dir: str | os.PathLike[str] | None = None,
                  max_rows: int = 4096, log: Callable[[str], None] | None = None) -> ReferenceSet:
    """The reference solutions of ``noises`` (computed, or read from the cache)."""
    if not isinstance(reference_nfe, int) or reference_nfe < 4:
        raise ArgumentError(f"reference_nfe must be an integer >= 4, got {reference_nfe!r}")
    method = f"unipc at NFE {reference_nfe} (logistic grid, lower_order_final=False)"
    key = hashlib.sha256(json.dumps([model_identity(model), tensor_digest(noises).split("@")[0], list(noises.shape), method]).encode()).hexdigest()[:20]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path, side = folder / f"reference-{key}.npy", folder / f"reference-{key}.json"
    if path.is_file() and side.is_file():
        arr = np.load(path, allow_pickle=False)
        if tuple(arr.shape) == tuple(noises.shape):
            meta = json.loads(side.read_text())
            return ReferenceSet(noises, torch.from_numpy(arr).to(noises.dtype), float(meta["error_bar"]), method, cached=True)
    if log:
        log(f"reference: {noises.shape[0]} fine solves ({method}) ...")
    fine = _fine_solution(model, noises, reference_nfe, max_rows)
    coarse = _fine_solution(model, noises, reference_nfe // 2, max_rows)
    bar = rmse(coarse, fine)
    buf = io.BytesIO()
    np.save(buf, fine.to(torch.float64).cpu().numpy(), allow_pickle=False)
    write_atomic(path, buf.getvalue())
    write_atomic(side, json.dumps({"error_bar": bar, "method": method, "model": model_identity(model)}))
    return ReferenceSet(noises, fine.to(noises.dtype), bar, method)


@dataclass
class Objective:
    """Error of samples against the reference of the same noises (``metric``, default RMSE)."""

    calibration: ReferenceSet
    heldout: ReferenceSet | None = None
    metric: Metric = field(default=rmse)
    metric_name: str = "rmse"

    def error(self, samples: torch.Tensor, on: str = "calibration", first: int | None = None) -> float:
        """The metric of ``samples`` against the references of ``on`` (of its ``first`` noises only,
        when given); infinity if a sample is not finite."""
        ref = self.calibration if on == "calibration" else self.heldout
        if ref is None:
            raise ArgumentError("no held-out set was given")
        if not bool(torch.isfinite(samples).all()):
            return float("inf")
        return float(self.metric(samples, ref.reference if first is None else ref.reference[:first]))

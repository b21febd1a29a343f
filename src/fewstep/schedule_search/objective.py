"""What a search minimises: the error of final samples against reference solutions from the same
noises, on a calibration batch, with a held-out batch of other noises reported beside it.

References are very fine solves of the probability-flow ODE (UniPC at ``reference_nfe`` on the
logistic grid, full order to the end; its change from half the NFE is recorded as its error bar),
computed once and cached on disk as ``.npy`` files named by a hash of the model's key
(:func:`fewstep.identity.model_key`), the noises and the reference settings; the entry's side file
stores the model's probe (:class:`fewstep.identity.Probe`), which a read checks (an entry written by
a model that computes something else is recomputed, with a warning). The error is the RMSE by default; any
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
from ..cachedir import default_cache_dir
from ..errors import ArgumentError
from ..identity import Probe, model_key, probe_for, warn_mismatch
from ..metrics import rmse
from ..models import Model

__all__ = ["Objective", "ReferenceSet", "reference_set", "model_identity", "default_cache_dir"]

Metric = Callable[[torch.Tensor, torch.Tensor], float]


def model_identity(model: Model) -> str:
    """What identifies a model for caching and provenance: :func:`fewstep.identity.model_key` (an
    alias kept for the code that imports it from here)."""
    return model_key(model)


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
                  max_rows: int = 4096, log: Callable[[str], None] | None = None, key: str | None = None,
                  probe: Probe | None = None) -> ReferenceSet:
    """The reference solutions of ``noises`` (computed, or read from the cache).

    The cache entry is named by ``key`` (default :func:`~fewstep.identity.model_key` of ``model``),
    the noises and the method, and stores ``probe`` (default: :func:`~fewstep.identity.probe_for`
    ``(model, noises)``, taken now: ``rows x 3`` model evaluations). An entry whose stored probe does
    not match was written by a model that computes something else under the same key: it is
    recomputed and overwritten, with an :class:`~fewstep.identity.IdentityWarning` (and ``log``)."""
    if not isinstance(reference_nfe, int) or reference_nfe < 4:
        raise ArgumentError(f"reference_nfe must be an integer >= 4, got {reference_nfe!r}")
    method = f"unipc at NFE {reference_nfe} (logistic grid, lower_order_final=False)"
    mkey = model_key(model) if key is None else key
    name = hashlib.sha256(json.dumps([mkey, tensor_digest(noises).split("@")[0], list(noises.shape), method]).encode()).hexdigest()[:20]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path, side = folder / f"reference-{name}.npy", folder / f"reference-{name}.json"
    if probe is None:
        probe = probe_for(model, noises)
    if path.is_file() and side.is_file():
        try:
            arr = np.load(path, allow_pickle=False)
            meta = json.loads(side.read_text())
            stored = Probe.from_json(meta["probe"]) if isinstance(meta, dict) and meta.get("probe") is not None else None
            bar = float(meta["error_bar"])
        except (OSError, ValueError, KeyError, TypeError):
            arr, stored = None, None
            if log:
                log(f"reference: the cache entry {path} is unreadable; recomputing it")
        if arr is not None and tuple(arr.shape) == tuple(noises.shape):
            if stored is not None and stored.matches(probe):
                return ReferenceSet(noises, torch.from_numpy(arr).to(noises.dtype), bar, method, cached=True)
            if stored is None:
                if log:
                    log(f"reference: the cache entry {path} has no model probe (an older fewstep wrote it); recomputing it")
            else:
                warn_mismatch(f"the reference cache entry {path} was written by a model that computes something else under the same key "
                              f"{mkey!r} (its probe outputs differ by {stored.difference(probe):.3g} of their RMS, more than "
                              f"{max(stored.rtol, probe.rtol):g}); recomputing and overwriting it", log)
    if log:
        log(f"reference: {noises.shape[0]} fine solves ({method}) ...")
    fine = _fine_solution(model, noises, reference_nfe, max_rows)
    coarse = _fine_solution(model, noises, reference_nfe // 2, max_rows)
    bar = rmse(coarse, fine)
    buf = io.BytesIO()
    np.save(buf, fine.to(torch.float64).cpu().numpy(), allow_pickle=False)
    write_atomic(path, buf.getvalue())
    write_atomic(side, json.dumps({"error_bar": bar, "method": method, "model": mkey, "probe": probe.to_json()}))
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

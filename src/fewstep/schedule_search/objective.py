"""What a search minimises: the error of final samples against reference solutions from the same
noises, on a calibration batch, with a held-out batch of other noises reported beside it.

References are very fine solves of the probability-flow ODE from the noises' start time ``t_start``
(UniPC at ``reference_nfe`` on its default grid, full order to the end; its change from half the NFE,
on every noise or on the first ``error_bar_rows``, is recorded as its error bar), computed once and cached on disk as ``.npy`` files named by a hash of
the model's key (:func:`fewstep.identity.model_key`), the noises and the reference settings (the
start time and the grid's times included); a cached entry comes back on the noises' device and
dtype, like a fresh one. The entry's side file
stores the model's probe (:class:`fewstep.identity.Probe`), which a read checks (an entry written by
a model that computes something else is recomputed, with a warning). With ``teacher=True`` the fine
solve's trajectory also gives the local-error matrix of first-order steps between its points
(:mod:`fewstep.teacher`, no extra model call), cached beside it (``.teacher.npy``, its times in the side file). The error is the RMSE by default; any
``metric(samples, reference) -> float`` (lower is better) may replace it, e.g. a Fréchet distance.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
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
from ..solvers.plan import SolverSchedule
from ..teacher import TEACHER_FORMAT, TeacherCosts, teacher_solve

__all__ = ["Objective", "ReferenceSet", "reference_set", "reference_cache_path", "model_identity", "default_cache_dir"]

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
    """Noises, their reference solutions (on the noises' device and dtype), and the reference's own
    error bar (RMS change from a solve at half the NFE); ``reference_nfe`` and ``t_start`` (``None``:
    the schedule's start) of the solves."""

    noises: torch.Tensor
    reference: torch.Tensor
    error_bar: float
    method: str
    cached: bool = False
    reference_nfe: int | None = None
    t_start: float | None = None
    #: the fine solve's local-error matrix (:class:`~fewstep.teacher.TeacherCosts`), when asked for
    teacher: TeacherCosts | None = None


def _fine_plan(model: Model, noises: torch.Tensor, nfe: int, t_start: float | None) -> SolverSchedule:
    """The reference solver's plan: UniPC at ``nfe`` on its default grid for these noises, from ``t_start``
    (a ready plan: the model's own autotune never changes a reference)."""
    from ..sample import resolve_plan

    opts: dict[str, object] = {"lower_order_final": False}
    if t_start is not None:
        opts["t_start"] = float(t_start)
    return resolve_plan(model, "unipc", nfe, opts, math.prod(noises.shape[1:]))


def _fine_solution(model: Model, x: torch.Tensor, plan: SolverSchedule, max_rows: int) -> torch.Tensor:
    from ..sample import sample

    parts = [sample(model, xs, plan) for xs in x.split(max_rows)]
    return torch.cat(parts)


def _method(plan: SolverSchedule, reference_nfe: int, t_start: float | None) -> str:
    spacing = plan.meta.get("spacing", "default") if isinstance(plan.meta, dict) else "default"
    text = f"unipc at NFE {reference_nfe} ({spacing} grid, lower_order_final=False)"
    return text if t_start is None else f"{text} from t = {float(t_start):.6g}"


def _entry_name(mkey: str, noises: torch.Tensor, method: str, plan: SolverSchedule, t_start: float | None) -> str:
    """The cache entry's name: a hash of the model key, the noises, the method, the start time and the grid's times."""
    settings: list[object] = [mkey, tensor_digest(noises).split("@")[0], list(noises.shape), method]
    if t_start is not None:
        settings.append(float(t_start))
    settings.append(hashlib.sha256(json.dumps(plan.to_dict()["times"]).encode()).hexdigest()[:16])
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:20]


def reference_cache_path(model: Model, noises: torch.Tensor, *, reference_nfe: int = 200, t_start: float | None = None,
                         cache_dir: str | os.PathLike[str] | None = None, key: str | None = None) -> Path:
    """Where :func:`reference_set` caches the references of ``noises`` (the ``.npy`` file; its side
    file has the suffix ``.json``), without computing anything but the model's key."""
    plan = _fine_plan(model, noises, reference_nfe, t_start)
    name = _entry_name(model_key(model) if key is None else key, noises, _method(plan, reference_nfe, t_start), plan, t_start)
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / f"reference-{name}.npy"


def reference_set(model: Model, noises: torch.Tensor, *, reference_nfe: int = 200, cache_dir: str | os.PathLike[str] | None = None,
                  max_rows: int = 4096, log: Callable[[str], None] | None = None, key: str | None = None,
                  probe: Probe | None = None, t_start: float | None = None, error_bar_rows: int | None = None,
                  teacher: bool = False) -> ReferenceSet:
    """The reference solutions of ``noises`` (computed, or read from the cache), solved from
    ``t_start`` (default: the schedule's start), where the noises are; on the noises' device and dtype.

    The cache entry is named by ``key`` (default :func:`~fewstep.identity.model_key` of ``model``),
    the noises, the method, ``t_start`` and the reference grid's times, and stores ``probe`` (default: :func:`~fewstep.identity.probe_for`
    ``(model, noises)``, taken now: ``rows x 3`` model evaluations). An entry whose stored probe does
    not match was written by a model that computes something else under the same key: it is
    recomputed and overwritten, with an :class:`~fewstep.identity.IdentityWarning` (and ``log``).
    ``error_bar_rows``: the error bar's half-NFE solves run on the first rows only (default: all).
    ``teacher``: also the fine solve's :class:`~fewstep.teacher.TeacherCosts` (an entry cached without them is recomputed)."""
    if not isinstance(reference_nfe, int) or isinstance(reference_nfe, bool) or reference_nfe < 4:
        raise ArgumentError(f"reference_nfe must be an integer >= 4, got {reference_nfe!r}")
    if t_start is not None and (not isinstance(t_start, (int, float)) or isinstance(t_start, bool) or not math.isfinite(float(t_start))):
        raise ArgumentError(f"t_start must be a finite number or None, got {t_start!r}")
    fine_plan, coarse_plan = (_fine_plan(model, noises, n, t_start) for n in (reference_nfe, reference_nfe // 2))
    method = _method(fine_plan, reference_nfe, t_start)
    mkey = model_key(model) if key is None else key
    name = _entry_name(mkey, noises, method, fine_plan, t_start)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path, side = folder / f"reference-{name}.npy", folder / f"reference-{name}.json"
    teacher_path = folder / f"reference-{name}.teacher.npy"
    if probe is None:
        probe = probe_for(model, noises)
    if path.is_file() and side.is_file():
        try:
            arr = np.load(path, allow_pickle=False)
            meta = json.loads(side.read_text())
            stored = Probe.from_json(meta["probe"]) if isinstance(meta, dict) and meta.get("probe") is not None else None
            bar = float(meta["error_bar"])
            costs = None
            if teacher and meta.get("teacher_times") is not None and meta.get("teacher_format") == TEACHER_FORMAT and teacher_path.is_file():
                costs = TeacherCosts.from_array(meta["teacher_times"], np.load(teacher_path, allow_pickle=False))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ArgumentError):
            arr, stored, costs = None, None, None
            if log:
                log(f"reference: the cache entry {path} is unreadable; recomputing it")
        if arr is not None and tuple(arr.shape) == tuple(noises.shape):
            if stored is not None and stored.matches(probe) and (costs is not None or not teacher):
                ref = torch.from_numpy(arr).to(device=noises.device, dtype=noises.dtype)
                return ReferenceSet(noises, ref, bar, method, cached=True, reference_nfe=reference_nfe, t_start=t_start, teacher=costs)
            if stored is not None and stored.matches(probe):
                if log:
                    log(f"reference: the cache entry {path} has no teacher costs; recomputing it")
            elif stored is None:
                if log:
                    log(f"reference: the cache entry {path} has no model probe (an older fewstep wrote it); recomputing it")
            else:
                warn_mismatch(f"the reference cache entry {path} was written by a model that computes something else under the same key "
                              f"{mkey!r} (its probe outputs differ by {stored.difference(probe):.3g} of their RMS, more than "
                              f"{max(stored.rtol, probe.rtol):g}); recomputing and overwriting it", log)
    if log:
        log(f"reference: {noises.shape[0]} fine solves ({method}) ...")
    costs = None
    if teacher:
        fine, costs = teacher_solve(model, noises, fine_plan, max_rows=max_rows)
    else:
        fine = _fine_solution(model, noises, fine_plan, max_rows)
    rows = int(noises.shape[0]) if error_bar_rows is None else max(1, min(int(error_bar_rows), int(noises.shape[0])))
    coarse = _fine_solution(model, noises[:rows], coarse_plan, max_rows)
    bar = rmse(coarse, fine[:rows])
    buf = io.BytesIO()
    np.save(buf, fine.to(torch.float64).cpu().numpy(), allow_pickle=False)
    write_atomic(path, buf.getvalue())
    if costs is not None:
        buf = io.BytesIO()
        np.save(buf, costs.to_array(), allow_pickle=False)
        write_atomic(teacher_path, buf.getvalue())
    write_atomic(side, json.dumps({"error_bar": bar, "method": method, "model": mkey, "probe": probe.to_json(), "t_start": t_start,
                                   "reference_nfe": reference_nfe, **({"teacher_times": list(costs.times), "teacher_format": TEACHER_FORMAT} if costs is not None else {})}))
    return ReferenceSet(noises, fine.to(device=noises.device, dtype=noises.dtype), bar, method, reference_nfe=reference_nfe, t_start=t_start,
                        teacher=costs)


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

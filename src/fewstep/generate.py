"""Generation at scale (issue 18, part 1): sharded, resumable sample generation over torch.distributed.

Sample ``k`` depends only on ``(seed, k)``: its initial noise and its Brownian step noise are keyed
by the global sample index. The index range ``0..num-1`` is cut into shards of ``shard_size``
consecutive indices, the same whatever the number of workers; worker ``r`` of ``W`` takes shards
``r, r + W, ...``. A shard is one batch (so even a float32 network sees the same batch, and its
samples are bitwise the same whatever ``W``), saved as ``shard-NNNNNN.safetensors`` (``samples``,
``indices``, and the samples' SHA-256 in the metadata), written atomically. ``manifest.json`` holds
what defines the run (model identity, solver schedule, seed, NFE, count, shard size, sample shape,
dtype, fewstep version): re-running the same command finishes the missing or damaged shards only;
another run on the same folder is refused.

Workers are the processes of ``torchrun`` (``torch.distributed``: gloo on CPUs, NCCL on GPUs,
several nodes with ``--nnodes``); without it, one process does all shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from . import __version__
from .atomic import write_atomic
from .errors import ArgumentError, FewstepError
from .models import Model
from .noise import initial_noise
from .sample import resolve_plan, sample
from .solvers.plan import SolverSchedule

__all__ = ["generate", "load_samples", "iter_shards", "evaluate_folder", "GenerateInfo", "MANIFEST", "shard_path"]

MANIFEST = "manifest.json"
FORMAT = "fewstep.samples"


@dataclass
class GenerateInfo:
    """What a (possibly distributed) generation run did: shards generated here and in all, shards
    found complete (resumed), damaged ones regenerated, wall time and samples per second."""

    out: Path
    num: int
    shards: int
    generated: int
    reused: int
    repaired: int
    wall_s: float
    samples_per_s: float
    world_size: int
    model_evaluations: int
    extra: dict[str, Any] = field(default_factory=dict)


def shard_path(out: Path, s: int) -> Path:
    return out / f"shard-{s:06d}.safetensors"


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _dist() -> tuple[int, int, Any, bool]:
    """``(rank, world size, torch.distributed or None, started here)``: under torchrun the process
    group is started from its environment (gloo on the CPU, NCCL when CUDA is there)."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1, None, False
    owned = False
    if not dist.is_initialized() and "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        owned = True
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist, owned
    return 0, 1, None, False


def _manifest(model: Model, plan: SolverSchedule, *, num: int, seed: int, shard_size: int, shape: Sequence[int], dtype: torch.dtype) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model": model.identity or model.name,
        "model_schedule": model.schedule.config(),
        "prediction": model.prediction,
        "solver_schedule": plan.to_dict(),
        "seed": seed,
        "nfe": plan.nfe,
        "num": num,
        "shard_size": shard_size,
        "sample_shape": list(shape),
        "dtype": str(dtype).replace("torch.", ""),
        "fewstep_version": __version__,
    }


def _check_manifest(out: Path, wanted: dict[str, Any]) -> None:
    path = out / MANIFEST
    try:
        have = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FewstepError(f"{path} exists but cannot be read ({exc}); move the folder away or delete the manifest") from None
    keys = [k for k in wanted if k != "fewstep_version" and have.get(k) != wanted[k]]
    if keys:
        raise ArgumentError(f"{out} holds another run (differs in {', '.join(keys)}); refusing to mix samples: use another --out folder")


def _valid_shard(path: Path, lo: int, hi: int) -> bool:
    """Is the shard file complete and undamaged (its indices, and the samples' stored SHA-256)?"""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            idx = fh.get_tensor("indices")
            x = fh.get_tensor("samples")
    except (OSError, SafetensorError, KeyError, RuntimeError, ValueError):
        return False
    try:
        stored = json.loads(meta.get("fewstep", "{}")).get("sha256")
    except ValueError:
        return False
    return idx.tolist() == list(range(lo, hi)) and stored == _digest(x)


def generate(
    model: Model,
    *,
    num: int,
    out: str | Path,
    solver: str | SolverSchedule | None = None,
    nfe: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    sample_shape: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    parallel: Any = False,
    progress: bool = True,
    **options: Any,
) -> GenerateInfo:
    """Generate samples ``0..num-1`` into the folder ``out`` as shards of ``batch_size`` (module
    docstring). ``solver`` / ``nfe`` / ``options`` as in :func:`fewstep.sample` (the plan is fixed at
    the start and recorded); ``sample_shape`` defaults to ``model.sample_shape``; ``device``: where
    this worker samples (default: ``cuda:<local rank>`` under torchrun with CUDA, else the CPU).
    Every worker returns the totals of the run."""
    if not isinstance(num, int) or isinstance(num, bool) or num < 1:
        raise ArgumentError(f"num must be a positive integer, got {num!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")
    shape = tuple(sample_shape or model.sample_shape or ())
    if not shape:
        raise ArgumentError("the model has no sample_shape: pass sample_shape=")
    rank, world, dist, owned = _dist()
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() and dist is not None else "cpu"
    out = Path(out)
    plan = resolve_plan(model, solver, nfe, options)
    wanted = _manifest(model, plan, num=num, seed=seed, shard_size=batch_size, shape=shape, dtype=torch.float32)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if (out / MANIFEST).exists():
            _check_manifest(out, wanted)
        else:
            write_atomic(out / MANIFEST, json.dumps(wanted, indent=1))
    if dist is not None:
        dist.barrier()
    _check_manifest(out, wanted)  # every worker: the folder is this run's

    n_shards = (num + batch_size - 1) // batch_size
    mine = list(range(rank, n_shards, world))
    counts = torch.zeros(3, dtype=torch.int64)  # generated, reused, repaired
    evals0 = model.evaluations
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=num, desc=f"generate ({world} worker{'s' if world > 1 else ''})", unit="sample", disable=not progress or rank != 0)
    for s in mine:
        lo, hi = s * batch_size, min(num, (s + 1) * batch_size)
        path = shard_path(out, s)
        if path.exists():
            if _valid_shard(path, lo, hi):
                counts[1] += 1
                bar.update(min((hi - lo) * world, num - bar.n))
                continue
            counts[2] += 1  # damaged (interrupted copy, bit rot): generated again
        idx = list(range(lo, hi))
        x_T = initial_noise(model.schedule, (hi - lo, *shape), seed, indices=idx, device=device)
        x = sample(model, x_T, plan, seed=seed, sample_indices=idx, parallel=parallel).detach().cpu().contiguous()
        from safetensors.torch import save

        # one metadata entry: safetensors orders several keys differently from process to process
        blob = save({"samples": x, "indices": torch.tensor(idx, dtype=torch.int64)}, metadata={"fewstep": json.dumps({"format": FORMAT, "sha256": _digest(x)})})
        write_atomic(path, blob)
        counts[0] += 1
        bar.update(min((hi - lo) * world, num - bar.n))  # rank 0's view: the other workers run alongside
    bar.close()
    evals = torch.tensor([model.evaluations - evals0], dtype=torch.int64)
    if dist is not None:
        dist.all_reduce(counts)
        dist.all_reduce(evals)
        dist.barrier()
        if owned:  # a group started here is closed here (a worker leaving an open gloo group can abort at exit)
            dist.destroy_process_group()
    wall = time.perf_counter() - t0
    generated = int(counts[0])
    done = min(num, generated * batch_size)
    return GenerateInfo(out, num, n_shards, generated, int(counts[1]), int(counts[2]), wall, done / wall if wall > 0 else 0.0, world, int(evals))


def iter_shards(folder: str | Path) -> Any:
    """The samples of a generation folder shard by shard, in index order (each checked)."""
    from safetensors import safe_open

    folder = Path(folder)
    try:
        man = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise FewstepError(f"{folder} is not a generation folder ({exc})") from None
    num, size = int(man["num"]), int(man["shard_size"])
    for s in range((num + size - 1) // size):
        lo, hi = s * size, min(num, (s + 1) * size)
        path = shard_path(folder, s)
        if not _valid_shard(path, lo, hi):
            raise FewstepError(f"shard {path.name} (samples {lo}..{hi - 1}) is missing or damaged: re-run the generate command to finish it")
        with safe_open(str(path), framework="pt") as fh:
            yield fh.get_tensor("samples")


def evaluate_folder(folder: str | Path, *, features: Any = None, reference: torch.Tensor | None = None) -> dict[str, Any]:
    """Metrics of a generation folder, streamed shard by shard (memory of one shard).

    Default: the digits metrics of the bundled classifier (feature and pixel Fréchet distances to the
    held-out digits, mean confidence), for samples in the digits networks' model space. With
    ``features(x) -> (n, d)`` (any feature extractor) and ``reference`` (reference features, (m, d)):
    the Fréchet distance of the samples' features to the reference's."""
    from .metrics import StreamingGaussian, frechet_of_fits, gaussian_fit

    if features is not None:
        if reference is None:
            raise ArgumentError("a feature extractor needs reference features (reference=)")
        acc = StreamingGaussian()
        for x in iter_shards(folder):
            acc.add(features(x))
        mr, sr = gaussian_fit(reference)
        return {"samples": acc.n, "fd": frechet_of_fits(*acc.fit(), mr, sr)}
    from .zoo.evaluate import DigitsEvaluator

    ev = DigitsEvaluator()
    feats, pix = StreamingGaussian(), StreamingGaussian()
    conf = 0.0
    for x in iter_shards(folder):
        emb = ev._embed(x)
        feats.add(emb.features)
        pix.add(emb.pixels)
        conf += float(emb.probabilities.max(-1).values.sum())
    held = ev._heldout
    return {"samples": feats.n, "fd_features": frechet_of_fits(*feats.fit(), *gaussian_fit(held.features)),
            "fd_pixels": frechet_of_fits(*pix.fit(), *gaussian_fit(held.pixels)), "confidence": conf / feats.n}


def load_samples(folder: str | Path) -> torch.Tensor:
    """All samples of a generation folder, in index order (every shard checked against its SHA-256;
    a missing or damaged shard is an error naming it)."""
    return torch.cat(list(iter_shards(folder)))

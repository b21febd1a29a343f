"""Generation at scale: sharded, resumable sample generation over torch.distributed.

Sample ``k`` depends only on ``(seed, k)``: its initial noise and its Brownian step noise are keyed
by the global sample index. The index range ``0..num-1`` is cut into shards of ``shard_size``
consecutive indices, the same whatever the number of workers; worker ``r`` of ``W`` takes shards
``r, r + W, ...``. A shard is one batch (so even a float32 network sees the same batch, and its
samples are bitwise the same whatever ``W``), saved as ``shard-NNNNNN.safetensors`` (``samples``,
``indices``, and the samples' SHA-256 in the metadata), written atomically. ``manifest.json`` holds
what defines the run (the model's key and probe, :mod:`fewstep.identity`; solver schedule, seed,
NFE, count, shard size, sample shape, dtype, fewstep version): re-running the same command finishes
the missing or damaged shards only; another run on the same folder is refused, and so is another
model, even one under the same key whose probe outputs differ.

Workers are the processes of ``torchrun`` (``torch.distributed``: gloo on CPUs, NCCL on GPUs,
several nodes with ``--nnodes``, the folder on a file system they share); without it, one process
does all shards. Rank 0 shows one progress bar for all of them (samples in finished shards on disk).
Reading a folder back: :mod:`fewstep.sample_folder`.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ._version import __version__
from .atomic import write_atomic
from .errors import ArgumentError, FewstepError
from .identity import Probe, model_key
from .models import Model
from .noise import initial_noise
from .sample import resolve_plan, sample
from .sample_folder import FORMAT, MANIFEST, MappedSamples, digest, evaluate_folder, iter_shards, load_samples, shard_path, valid_shard
from .solvers.plan import SolverSchedule

__all__ = ["generate", "load_samples", "iter_shards", "evaluate_folder", "MappedSamples", "GenerateInfo", "MANIFEST", "shard_path"]


@dataclass
class GenerateInfo:
    """What a (possibly distributed) generation run did: shards generated here and in all, shards
    found complete (resumed), damaged ones regenerated, wall time and samples per second;
    ``model_evaluations`` counts the sampling, ``extra["probe_evaluations"]`` this worker's probe of
    the model (:class:`fewstep.identity.Probe`, checked against the folder's manifest)."""

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


def _manifest(model: Model, plan: SolverSchedule, *, num: int, seed: int, shard_size: int, shape: Sequence[int], dtype: torch.dtype,
              probe: Probe) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model": model_key(model),
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
        "probe": probe.to_json(),
    }


def _check_manifest(out: Path, wanted: dict[str, Any], model: Model) -> None:
    """Refuse a folder holding another run: another setting, another model key, or a model whose
    probe does not match (a manifest from before probes: its ``model`` must be ``model.identity``)."""
    path = out / MANIFEST
    try:
        have = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FewstepError(f"{path} exists but cannot be read ({exc}); move the folder away or delete the manifest") from None
    if not isinstance(have, dict):
        raise FewstepError(f"{path} is not a JSON object; move the folder away or delete the manifest")
    legacy = "probe" not in have
    skip = ("fewstep_version", "probe") + (("model",) if legacy else ())
    keys = [k for k in wanted if k not in skip and have.get(k) != wanted[k]]
    if legacy and not (model.identity and have.get("model") == model.identity):
        keys.insert(0, "model")  # an older manifest: only an explicit identity= (recorded as such) can vouch for the model
    if keys:
        raise ArgumentError(f"{out} holds another run (differs in {', '.join(keys)}); refusing to mix samples: use another --out folder")
    if not legacy:
        try:
            stored = Probe.from_json(have["probe"])
        except ArgumentError as exc:
            raise FewstepError(f"{path} has a malformed model probe ({exc}); move the folder away or delete the manifest") from None
        mine = Probe.from_json(wanted["probe"])
        if not stored.matches(mine):
            raise ArgumentError(f"{out} holds another run (differs in model: same key {wanted['model']!r}, but the model's probe outputs differ "
                                f"by {stored.difference(mine):.3g} of their RMS); refusing to mix samples: use another --out folder")


_SHARD_NAME = re.compile(r"shard-(\d{6})\.safetensors")


class _FolderProgress:
    """Rank 0's progress bar over all workers: a thread counts the samples in the shard files on disk
    (every worker writes to the same folder, atomically, so a visible shard is a finished one) every
    ``interval`` seconds; tqdm's rate is then samples per second across all ranks."""

    def __init__(self, out: Path, num: int, size: int, desc: str, enabled: bool, interval: float = 0.5) -> None:
        from tqdm.auto import tqdm

        self.out, self.num, self.size, self.interval = out, num, size, interval
        self.enabled = enabled
        start = self.on_disk() if enabled else 0
        self.bar = tqdm(total=num, initial=start, desc=desc, unit="sample", disable=not enabled)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True) if enabled else None
        if self._thread is not None:
            self._thread.start()

    def on_disk(self) -> int:
        n = 0
        try:
            for entry in os.scandir(self.out):
                m = _SHARD_NAME.fullmatch(entry.name)
                if m:
                    lo = int(m.group(1)) * self.size
                    n += max(0, min(self.num, lo + self.size) - lo)
        except OSError:
            pass
        return n

    def refresh(self) -> None:
        done = self.on_disk()
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.refresh()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.refresh()
        self.bar.close()


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
    evals_probe = model.evaluations
    probe = Probe.take(model, shape, device=device, dtype=torch.float32)  # what the model computes, as this worker samples it
    wanted = _manifest(model, plan, num=num, seed=seed, shard_size=batch_size, shape=shape, dtype=torch.float32, probe=probe)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if (out / MANIFEST).exists():
            _check_manifest(out, wanted, model)
        else:
            write_atomic(out / MANIFEST, json.dumps(wanted, indent=1))
    if dist is not None:
        dist.barrier()
    _check_manifest(out, wanted, model)  # every worker: the folder is this run's
    evals_probe = model.evaluations - evals_probe

    n_shards = (num + batch_size - 1) // batch_size
    mine = list(range(rank, n_shards, world))
    counts = torch.zeros(4, dtype=torch.int64)  # shards generated, reused, repaired; samples generated
    evals0 = model.evaluations
    t0 = time.perf_counter()
    bar = _FolderProgress(out, num, batch_size, f"generate ({world} worker{'s' if world > 1 else ''})", progress and rank == 0)
    for s in mine:
        lo, hi = s * batch_size, min(num, (s + 1) * batch_size)
        path = shard_path(out, s)
        if path.exists():
            if valid_shard(path, lo, hi):
                counts[1] += 1
                continue
            counts[2] += 1  # damaged (interrupted copy, bit rot): generated again
        idx = list(range(lo, hi))
        x_T = initial_noise(model.schedule, (hi - lo, *shape), seed, indices=idx, device=device)
        x = sample(model, x_T, plan, seed=seed, sample_indices=idx, parallel=parallel).detach().cpu().contiguous()
        from safetensors.torch import save

        # one metadata entry: safetensors orders several keys differently from process to process
        blob = save({"samples": x, "indices": torch.tensor(idx, dtype=torch.int64)}, metadata={"fewstep": json.dumps({"format": FORMAT, "sha256": digest(x)})})
        write_atomic(path, blob)
        counts[0] += 1
        counts[3] += hi - lo
    evals = torch.tensor([model.evaluations - evals0], dtype=torch.int64)
    if dist is not None:
        dist.all_reduce(counts)  # waits for every worker: rank 0's bar runs until the last shard is written
        dist.all_reduce(evals)
    bar.close()
    if dist is not None:
        dist.barrier()
        if owned:  # a group started here is closed here (a worker leaving an open gloo group can abort at exit)
            dist.destroy_process_group()
    wall = time.perf_counter() - t0
    done = int(counts[3])
    return GenerateInfo(out, num, n_shards, int(counts[0]), int(counts[1]), int(counts[2]), wall, done / wall if wall > 0 else 0.0, world, int(evals),
                        extra={"probe_evaluations": evals_probe})

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

The manifest also records the parallel-in-time settings (``parallel``: ``None`` for sequential
sampling, else the :class:`~fewstep.ParallelOptions` that change samples), so a resume never mixes
sequential and parallel shards; a manifest without that entry (fewstep 0.2.0) counts as sequential.
A ``manifest.json`` that is not a generation manifest (another program's) is refused with a
:class:`~fewstep.FewstepError`.

Workers are the processes of ``torchrun`` (several nodes with ``--nnodes``, the folder on a file
system they share); without it, one process does all shards. The process group started here has
one backend per device, ``"cpu:gloo,cuda:nccl"`` where CUDA and NCCL are there, else gloo, and the
collectives (counters, the outcome of the folder checks) run on a device that the group's backend
serves (:func:`collective_device`: the CPU under gloo, the sampling GPU under a group that a caller
started with NCCL alone). Every check that can refuse the folder ends in a collective: when one
worker refuses (rank 0 preparing the folder, or any worker checking it, or failing while
sampling), every worker raises with that message instead of waiting for the others. Rank 0 shows
one progress bar for all of them (samples in finished shards on disk). Reading a folder back:
:mod:`fewstep.sample_folder`.
"""

from __future__ import annotations

import dataclasses
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
from .parallel import ParallelOptions
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


#: the device types a backend named alone serves (a name with devices, "cpu:gloo,cuda:nccl", says so itself)
_SERVES: dict[str, tuple[str, ...]] = {"gloo": ("cpu", "cuda"), "nccl": ("cuda",), "mpi": ("cpu", "cuda"), "ucc": ("cpu", "cuda"),
                                       "xccl": ("xpu",), "hccl": ("hpu",)}


def backend_map(config: str) -> dict[str, str]:
    """The backend serving each device type of a process group's backend string (``dist.get_backend_config()``
    or what ``init_process_group`` was given): ``"cpu:gloo,cuda:nccl"`` -> ``{"cpu": "gloo", "cuda": "nccl"}``,
    ``"nccl"`` -> ``{"cuda": "nccl"}`` (NCCL serves CUDA tensors only), ``"gloo"`` -> CPU and CUDA."""
    out: dict[str, str] = {}
    for part in str(config).split(","):
        part = part.strip().lower()
        if not part:
            continue
        if ":" in part:
            dev, name = (v.strip() for v in part.split(":", 1))
            out[dev] = name
        else:
            for dev in _SERVES.get(part, ("cpu",)):
                out.setdefault(dev, part)
    return out


def collective_device(config: str, device: str | torch.device) -> torch.device:
    """Where a worker's counters live for the collectives of a group with backend ``config``: the CPU
    when the group serves it (gloo: no device synchronisation), else the sampling ``device`` when the
    group serves its type, else the current device of a type it serves (NCCL alone: the current
    CUDA device)."""
    served = backend_map(config)
    dev = torch.device(device)
    if "cpu" in served:
        return torch.device("cpu")
    if dev.type in served:
        return dev
    if "cuda" in served:
        return torch.device("cuda", torch.cuda.current_device())
    kind = next(iter(served), "cpu")
    return torch.device(kind)


def default_backend() -> str:
    """The backend a group started here gets: one per device, ``"cpu:gloo,cuda:nccl"``, when CUDA and
    NCCL are there (NCCL serves only CUDA tensors, gloo the CPU ones), else gloo."""
    import torch.distributed as dist

    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def _dist() -> tuple[int, int, Any, bool]:
    """``(rank, world size, torch.distributed or None, started here)``: under torchrun the process
    group is started from its environment with :func:`default_backend`."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1, None, False
    owned = False
    if not dist.is_initialized() and "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=default_backend())
        owned = True
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist, owned
    return 0, 1, None, False


class _Workers:
    """The collectives of one run, on a device the group's backend serves (:func:`collective_device`);
    without a group (one process) each is the local value."""

    def __init__(self, dist: Any, rank: int, world: int, device: str | torch.device) -> None:
        self.dist, self.rank, self.world = dist, rank, world
        config = getattr(dist, "get_backend_config", getattr(dist, "get_backend", None)) if dist is not None else None
        self.device = collective_device(str(config()), device) if config is not None else torch.device("cpu")

    def agree(self, error: BaseException | None) -> None:
        """Every worker passes its error (or ``None``); when any worker has one, every worker raises:
        the failing worker its own exception, the others a :class:`~fewstep.FewstepError` with the
        message of the first failing rank (no worker is left waiting for a collective)."""
        if self.dist is None:
            if error is not None:
                raise error
            return
        first = torch.tensor([self.rank if error is not None else self.world], dtype=torch.int64, device=self.device)
        self.dist.all_reduce(first, op=self.dist.ReduceOp.MIN)
        src = int(first.item())
        if src == self.world:
            return
        text = f"{type(error).__name__}: {error}" if self.rank == src and error is not None else ""
        data = text.encode()[:65536]
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        self.dist.broadcast(size, src=src)
        buf = (torch.tensor(list(data), dtype=torch.uint8) if self.rank == src else torch.zeros(int(size.item()), dtype=torch.uint8)).to(self.device)
        self.dist.broadcast(buf, src=src)
        if error is not None:
            raise error
        message = bytes(buf.cpu().tolist()).decode(errors="replace")
        raise FewstepError(f"worker {src} of {self.world} stopped the run: {message}")

    def total(self, values: list[int]) -> list[int]:
        """The sums of ``values`` over all workers."""
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        if self.dist is not None:
            self.dist.all_reduce(t)
        return [int(v) for v in t.cpu().tolist()]


def parallel_record(parallel: Any) -> dict[str, Any] | None:
    """What the manifest records of ``parallel`` (``generate``'s argument): ``None`` for sequential
    sampling, else every :class:`~fewstep.ParallelOptions` field that changes samples (all but ``record``)."""
    if parallel is False or parallel is None:
        return None
    if parallel is True:
        parallel = ParallelOptions()
    if not isinstance(parallel, ParallelOptions):
        raise ArgumentError(f"parallel must be True/False or a fewstep.ParallelOptions, got {parallel!r}")
    fields = dataclasses.asdict(parallel)
    fields.pop("record", None)
    return {k: v if isinstance(v, (bool, int, float, str, type(None))) else repr(v) for k, v in fields.items()}


def _manifest(model: Model, plan: SolverSchedule, *, num: int, seed: int, shard_size: int, shape: Sequence[int], dtype: torch.dtype,
              probe: Probe, parallel: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model": model_key(model),
        "model_schedule": model.schedule.config(),
        "prediction": model.prediction,
        "solver_schedule": plan.to_dict(),
        "parallel": parallel,
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
    if not isinstance(have, dict) or have.get("format") != FORMAT:
        raise FewstepError(f"{out} is not a fewstep generation folder: its {MANIFEST} is not a {FORMAT} manifest (another program's?); "
                           "use another --out folder")
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
    this worker samples (default: ``cuda:<local rank>`` under torchrun with CUDA, else the CPU);
    ``parallel``: as in :func:`fewstep.sample`, recorded in the manifest (a resume must match it).
    Every worker returns the totals of the run; when one worker fails (another run in the folder,
    an error while sampling), every worker raises."""
    if not isinstance(num, int) or isinstance(num, bool) or num < 1:
        raise ArgumentError(f"num must be a positive integer, got {num!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")
    shape = tuple(sample_shape or model.sample_shape or ())
    if not shape:
        raise ArgumentError("the model has no sample_shape: pass sample_shape=")
    par = parallel_record(parallel)
    rank, world, dist, owned = _dist()
    try:
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() and dist is not None else "cpu"
        return _generate(model, _Workers(dist, rank, world, device), num=num, out=Path(out), solver=solver, nfe=nfe, seed=seed,
                         batch_size=batch_size, shape=shape, device=device, parallel=parallel, par=par, progress=progress, options=options)
    finally:
        if owned:  # a group started here is closed here (a worker leaving an open gloo group can abort at exit)
            dist.destroy_process_group()


def _generate(model: Model, workers: _Workers, *, num: int, out: Path, solver: Any, nfe: int | None, seed: int, batch_size: int,
              shape: tuple[int, ...], device: str | torch.device, parallel: Any, par: dict[str, Any] | None, progress: bool,
              options: dict[str, Any]) -> GenerateInfo:
    """:func:`generate` on one worker; every step that can fail on some workers only ends in
    :meth:`_Workers.agree`."""
    rank, world = workers.rank, workers.world
    error: BaseException | None = None
    evals_probe = model.evaluations
    try:
        plan = resolve_plan(model, solver, nfe, options)
        probe = Probe.take(model, shape, device=device, dtype=torch.float32)  # what the model computes, as this worker samples it
        wanted = _manifest(model, plan, num=num, seed=seed, shard_size=batch_size, shape=shape, dtype=torch.float32, probe=probe,
                           parallel=par)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            if (out / MANIFEST).exists():
                _check_manifest(out, wanted, model)
            else:
                write_atomic(out / MANIFEST, json.dumps(wanted, indent=1))
    except Exception as exc:  # noqa: BLE001  (any worker's failure: every worker stops, see agree)
        error = exc
    workers.agree(error)
    try:
        _check_manifest(out, wanted, model)  # every worker: the folder is this run's (rank 0 wrote or checked it)
    except Exception as exc:  # noqa: BLE001
        error = exc
    workers.agree(error)
    evals_probe = model.evaluations - evals_probe

    n_shards = (num + batch_size - 1) // batch_size
    mine = list(range(rank, n_shards, world))
    counts = [0, 0, 0, 0]  # shards generated, reused, repaired; samples generated
    evals0 = model.evaluations
    t0 = time.perf_counter()
    bar = _FolderProgress(out, num, batch_size, f"generate ({world} worker{'s' if world > 1 else ''})", progress and rank == 0)
    try:
        try:
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
        except Exception as exc:  # noqa: BLE001  (the others finish their shards, then all stop with this message)
            error = exc
        workers.agree(error)
        # waits for every worker: rank 0's bar runs until the last shard is written
        *counts, evals = workers.total([*counts, model.evaluations - evals0])
    finally:
        bar.close()
    workers.total([0])  # the last collective: no worker closes the group while another still reads the totals
    wall = time.perf_counter() - t0
    done = counts[3]
    return GenerateInfo(out, num, n_shards, counts[0], counts[1], counts[2], wall, done / wall if wall > 0 else 0.0, world, evals,
                        extra={"probe_evaluations": evals_probe})

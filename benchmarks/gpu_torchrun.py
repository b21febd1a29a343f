"""Several processes on one machine under torchrun (issue 28): ``fewstep.generate`` from every rank
into one folder, each rank on ``cuda:{LOCAL_RANK % device_count}`` (so two processes can share one
GPU), in a process group with fewstep's default backend (``cpu:gloo,cuda:nccl`` where CUDA and NCCL
are there, else gloo); then one NCCL all-reduce of a CUDA tensor (where the group has NCCL), and
rank 0 reads the folder back.

    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/gpu_torchrun.py --out /tmp/gen

Each rank prints one line starting ``torchrun rank R:`` (its device, the backend, shards it wrote,
the all-reduce's outcome), rank 0 one more with the folder's check. Exits non-zero when a rank fails.
``--device cpu`` runs the ranks on the CPU (gloo). Nothing is asserted beyond that.
"""

from __future__ import annotations

import _common  # noqa: F401

import argparse
import importlib
import os
import sys
import time

import torch
import torch.distributed as dist

import fewstep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", help="cuda or cpu")
    ap.add_argument("--num", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--nfe", type=int, default=4)
    args = ap.parse_args(argv)
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    cuda = args.device == "cuda" and torch.cuda.is_available()
    dev = torch.device(f"cuda:{local % torch.cuda.device_count()}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    try:
        backend = importlib.import_module("fewstep.generate").default_backend()
    except AttributeError:  # pragma: no cover - an older or renamed helper
        backend = "cpu:gloo,cuda:nccl" if cuda and dist.is_nccl_available() else "gloo"
    if not cuda:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    name = torch.cuda.get_device_name(dev) if cuda else "CPU"
    model = fewstep.zoo.load("digits-vp-eps", device=dev)
    t0 = time.perf_counter()
    status = "ok"
    try:
        info = fewstep.generate(model, num=args.num, out=args.out, solver="dpmpp_2m_sde", nfe=args.nfe, seed=3, batch_size=args.batch,
                                device=dev, progress=False)
        wrote = f"{info.generated} of {info.shards} shards in all, world {info.world_size}, {info.samples_per_s:.0f} samples/s"
    except Exception as exc:  # the finding is the message
        status, wrote = "error", f"generate failed: {type(exc).__name__}: {exc}"
    reduce = "not tried (no NCCL in the group)"
    if cuda and "nccl" in str(dist.get_backend()).lower() + backend.lower():
        try:
            t = torch.ones(1, device=dev) * (rank + 1)
            dist.all_reduce(t)
            torch.cuda.synchronize(dev)
            reduce = f"ok (sum {float(t):g})"
        except Exception as exc:
            status, reduce = "error", f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    print(f"torchrun rank {rank}: device {dev} ({name}), backend {backend}, {wrote}; NCCL all-reduce {reduce}; "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    dist.barrier()
    if rank == 0 and status == "ok":
        got = fewstep.load_samples(args.out)
        print(f"torchrun rank 0: folder holds {tuple(got.shape)} samples, finite {bool(torch.isfinite(got).all())}", flush=True)
    dist.destroy_process_group()
    return 0 if status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())

"""Generation throughput on a GPU (issue 18): samples per second of ``fewstep.generate`` at batch
sizes 256-4096, on the bundled digits network and on a UNet-sized convolutional eps model.

Run on a machine with CUDA (e.g. the device tool's H100 / H200), from the repository root:

    PYTHONPATH=src python benchmarks/gpu_generate.py --out benchmarks/reports/generate_gpu.md

For each model and batch size: ``fewstep.generate`` (UniPC, NFE 10) of ``--batches`` shards into a
scratch folder after one warm-up shard, wall time with the device synchronised (shards written,
SHA-256 included), samples per second; beside it, the same batches sampled in memory only
(``fewstep.sample``, no files), so the cost of writing shards shows. The report names the device.
Without CUDA it says so and exits 0 (``--device cpu --batch-sizes 16 32 --channels 8``: a dry run
of the script). Nothing is asserted.
"""

from __future__ import annotations

import _common  # noqa: F401

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import fewstep
from _common import REPORTS, device_or_dry_run, log, report_header, write_text_atomic
from gpu_parallel import conv_model

BATCH_SIZES = (256, 512, 1024, 2048, 4096)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure(model: fewstep.Model, dev: torch.device, batch: int, shards: int, nfe: int, scratch: Path) -> dict[str, float]:
    folder = scratch / f"{model.name}-{batch}"
    fewstep.generate(model, num=batch, out=folder, solver="unipc", nfe=nfe, batch_size=batch, device=dev, progress=False)  # warm-up
    shutil.rmtree(folder)
    _sync(dev)
    t0 = time.perf_counter()
    info = fewstep.generate(model, num=batch * shards, out=folder, solver="unipc", nfe=nfe, batch_size=batch, device=dev, progress=False)
    _sync(dev)
    files_s = time.perf_counter() - t0
    shutil.rmtree(folder)
    x = fewstep.initial_noise(model.schedule, (batch, *model.sample_shape), 0, device=dev)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(shards):
        fewstep.sample(model, x, "unipc", nfe=nfe)
    _sync(dev)
    memory_s = time.perf_counter() - t0
    n = batch * shards
    return {"files_sps": n / files_s, "memory_sps": n / memory_s, "evals": info.model_evaluations / n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPORTS / "generate_gpu.md"))
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a dry run of the script)")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=list(BATCH_SIZES))
    ap.add_argument("--batches", type=int, default=4, help="shards timed per batch size (after one warm-up shard)")
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--channels", type=int, default=128, help="width of the conv model (a dry run on the CPU: 8)")
    args = ap.parse_args(argv)
    found = device_or_dry_run(args.device)
    if found is None:
        return 0
    dev, name = found
    models = [fewstep.zoo.load("digits-vp-eps", device=dev), conv_model(dev, args.channels)]
    labels = ["digits-vp-eps (1x8x8)", f"conv{args.channels} (4x32x32)"]
    rows = []
    t_all = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="fewstep-gpu-generate-"))
    try:
        for label, model in zip(labels, models):
            for batch in args.batch_sizes:
                try:
                    m = measure(model, dev, batch, args.batches, args.nfe, scratch)
                except torch.cuda.OutOfMemoryError:
                    log(f"{label} batch {batch}: out of memory")
                    rows.append([label, batch, "out of memory", "", "", ""])
                    torch.cuda.empty_cache()
                    continue
                rows.append([label, batch, f"{m['files_sps']:.0f}", f"{m['memory_sps']:.0f}", f"{m['files_sps'] / m['memory_sps']:.2f}",
                             f"{m['evals']:.0f}"])
                log(" | ".join(map(str, rows[-1])))
                write_report(args, name, argv, rows, time.perf_counter() - t_all)  # after every row: a time-out keeps the rows so far
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(write_report(args, name, argv, rows, time.perf_counter() - t_all))
    return 0


def write_report(args: argparse.Namespace, name: str, argv: list[str] | None, rows: list[list[object]], wall: float) -> str:
    from fewstep.report import markdown_table

    table = markdown_table(["model", "batch", "generate samples / s (shards on disk)", "sample samples / s (memory only)",
                            "generate / memory", "model evaluations per sample"], rows)
    text = "\n".join([
        *report_header(f"Generation throughput on {name}", "gpu_generate.py", argv, wall),
        f"Device: {name}. UniPC, NFE {args.nfe}, one process; {args.batches} shards of each batch size timed after a "
        "warm-up shard, the device synchronised. 'generate': `fewstep.generate` into a scratch folder (safetensors shards with "
        "their SHA-256, atomic writes); 'memory only': `fewstep.sample` on the same batch sizes.", "",
        table, "",
    ])
    write_text_atomic(Path(args.out), text)
    return table


if __name__ == "__main__":
    sys.exit(main())

"""Parallel-in-time sampling on a GPU: wall-clock speed-up over sequential sampling (issue 16).

Run on a machine with CUDA (e.g. the device tool's H100), from the repository root:

    PYTHONPATH=src python benchmarks/gpu_parallel.py --out benchmarks/reports/parallel_gpu.md

For 100-step DDIM (and 50-step DPM-Solver++(2M)) at batch 1 and 8, on the bundled digits network
and on a UNet-sized convolutional eps model (4x32x32 latents, 3 conv layers of 256 channels: a
model whose single-sample call leaves the GPU mostly idle, as real denoisers at small batch do):
the median wall time of the sequential loop and of parallel sampling (default acceleration and tolerance;
windows all and 32), the speed-up, rounds, evaluations per step and the RMS difference from the
sequential samples. Timings synchronise the device; the two sides alternate. The report names the
device. Without CUDA it says so and exits 0. Nothing is asserted (target in issue 16: >= 3x for 100
steps on an H100).
"""

from __future__ import annotations

import _common  # noqa: F401

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import fewstep
from _common import REPORTS, device_or_dry_run, log, report_header, write_text_atomic


def conv_model(device: torch.device, channels: int = 256) -> fewstep.Model:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(4, channels, 3, padding=1), torch.nn.SiLU(),
        torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.SiLU(),
        torch.nn.Conv2d(channels, 4, 3, padding=1),
    ).to(device).eval()
    for p in net.parameters():
        p.data.mul_(0.2)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.1 * net(x) + x * (1.0 - t[:, None, None, None] / 2000.0)

    model = fewstep.Model(fn, fewstep.DiscreteVP.linear(), "eps", name=f"conv{channels}")
    model.sample_shape = (4, 32, 32)
    return model


def timed(fn, device: torch.device) -> float:  # type: ignore[no-untyped-def]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda d: None)
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPORTS / "parallel_gpu.md"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a dry run of the script)")
    ap.add_argument("--channels", type=int, default=256, help="width of the conv model (a dry run on the CPU: 8)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: the conv model, 20-step DDIM, batch 1, the default window")
    args = ap.parse_args(argv)
    found = device_or_dry_run(args.device)
    if found is None:
        return 0
    dev, name = found
    models = {f"conv{args.channels} (4x32x32)": conv_model(dev, args.channels)}
    if not args.quick:
        models = {"digits-vp-eps": fewstep.zoo.load("digits-vp-eps", device=dev), **models}
    solvers, batches, windows = ((("ddim", 20),), (1,), (32,)) if args.quick else ((("ddim", 100), ("dpmpp_2m", 50)), (1, 8), (None, 32))
    rows: list[list[object]] = []
    table = ""
    t_all = time.perf_counter()
    for label, model in models.items():
        for solver, n in solvers:
            for batch in batches:
                x = fewstep.initial_noise(model.schedule, (batch, *model.sample_shape), 0, device=dev)
                seq_out = fewstep.sample(model, x, solver, nfe=n)
                for window in windows:
                    opts = fewstep.ParallelOptions(window=window)
                    par_out, info = fewstep.sample(model, x, solver, nfe=n, parallel=opts, return_info=True)  # warm-up
                    seq_t, par_t = [], []
                    for _ in range(args.repeats):
                        seq_t.append(timed(lambda: fewstep.sample(model, x, solver, nfe=n), dev))
                        par_t.append(timed(lambda: fewstep.sample(model, x, solver, nfe=n, parallel=opts), dev))
                    p = info.extra["parallel"]
                    s, q = statistics.median(seq_t), statistics.median(par_t)
                    rows.append([label, solver, n, batch, window or n, f"{s * 1e3:.1f}", f"{q * 1e3:.1f}", f"{s / q:.2f}x", p.rounds,
                                 f"{p.evaluations / n:.1f}", f"{fewstep.rmse(par_out.cpu(), seq_out.cpu()):.1e}"])
                    log(" | ".join(map(str, rows[-1])))
                    table = write_report(args.out, name, argv, rows, time.perf_counter() - t_all)  # after every row: a time-out keeps the rows so far
    print(table)
    return 0


def write_report(out: str, name: str, argv: list[str] | None, rows: list[list[object]], wall: float) -> str:
    from fewstep.report import markdown_table

    table = markdown_table(["model", "solver", "N", "batch", "window", "sequential ms", "parallel ms", "speed-up", "rounds", "evals / N", "RMS diff"], rows)
    opts = fewstep.ParallelOptions()
    text = "\n".join([
        *report_header(f"Parallel-in-time sampling on {name}", "gpu_parallel.py", argv, wall),
        f"Device: {name}. Median of the repeats (sequential and parallel alternating, device synchronised). Parallel: "
        f"`ParallelOptions()` defaults (acceleration {opts.accelerate!r}, tolerance {opts.tol:g}) with the window shown.", "",
        table, "",
    ])
    write_text_atomic(Path(out), text)
    return table


if __name__ == "__main__":
    sys.exit(main())

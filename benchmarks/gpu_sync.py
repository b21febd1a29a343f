"""Host synchronisations and per-step overhead of the sampling loop on a GPU (issue 13, item 9).

Run on a machine with CUDA (e.g. the device tool's H100):

    python benchmarks/gpu_sync.py --out benchmarks/reports/gpu_sync.md

Measures, for a UNet-sized convolutional model on the GPU:

* host synchronisations per ``fewstep.sample`` call, counted by ``torch.cuda.set_sync_debug_mode``
  ("warn": each synchronising CUDA call emits a warning, which is counted) with the NaN/Inf check
  deferred (default: one sync per call), every 4 calls, immediate-per-call (``check_finite=1``)
  and off;
* wall time per step (median of repeats) for the same four settings, as ratios to "off" measured
  in one run.

On a machine without CUDA it says so and exits 0 (nothing to measure). Benchmarks never assert.
"""

from __future__ import annotations

import _common  # noqa: F401

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch

import fewstep
from _common import REPORTS, log, report_header, write_text_atomic


def _net(channels: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(4, channels, 3, padding=1), torch.nn.SiLU(),
        torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.SiLU(),
        torch.nn.Conv2d(channels, 4, 3, padding=1),
    )


def _count_syncs(model: fewstep.Model, x: torch.Tensor, nfe: int) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fewstep.sample(model, x, "unipc", nfe=nfe)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--nfe", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--out", default=str(REPORTS / "gpu_sync.md"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        log("no CUDA device: nothing to measure (run this on a GPU machine)")
        return 0
    dev = torch.device("cuda")
    net = _net(args.channels).to(dev).eval()
    sched = fewstep.DiscreteVP.linear()
    x = fewstep.initial_noise(sched, (args.batch, 4, args.size, args.size), 0, device=dev)
    settings = {"deferred (default)": True, "every 4 calls": 4, "every call": 1, "off": False}
    rows = []
    times: dict[str, float] = {}
    for label, mode in settings.items():
        model = fewstep.Model(lambda x, t: net(x), sched, "eps", check_finite=mode)
        fewstep.sample(model, x, "unipc", nfe=args.nfe)  # warm-up and plan compile
        torch.cuda.synchronize()
        syncs = _count_syncs(model, x, args.nfe)
        per = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fewstep.sample(model, x, "unipc", nfe=args.nfe)
            torch.cuda.synchronize()
            per.append((time.perf_counter() - t0) / args.nfe)
        times[label] = statistics.median(per)
        rows.append((label, syncs, times[label] * 1e3))
    lines = [*report_header("Host synchronisations of the sampling loop on a GPU", "gpu_sync.py", argv),
             f"Device: {torch.cuda.get_device_name(0)}; model: 3-layer conv net, {args.channels} channels, batch {args.batch}x4x{args.size}x{args.size} float32; UniPC, NFE {args.nfe}.", "",
             "| NaN/Inf check | host syncs per sample call | ms per step (median) | ratio to off |", "|---|---|---|---|"]
    for label, syncs, ms in rows:
        lines.append(f"| {label} | {syncs} | {ms:.3f} | {times[label] / times['off']:.3f} |")
    write_text_atomic(Path(args.out), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

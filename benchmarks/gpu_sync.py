"""Host synchronisations and per-step overhead of the sampling loop on a GPU (issue 13, item 9; issue 28).

Run on a machine with CUDA (e.g. the device tool's H100):

    python benchmarks/gpu_sync.py --out benchmarks/reports/gpu_sync.md

Measures, for a UNet-sized convolutional model on the GPU:

* host synchronisations per ``fewstep.sample`` call, counted by ``torch.cuda.set_sync_debug_mode``
  ("warn": each synchronising CUDA call emits a warning, which is counted) with the NaN/Inf check
  deferred (default: one sync per call), every 4 calls, immediate-per-call (``check_finite=1``)
  and off;
* wall time per step (median of repeats) for the same four settings, as ratios to "off" measured
  in one run;
* per path (a deterministic and a stochastic preset sequentially, a stochastic preset in parallel):
  the synchronisations CUDA reports, beside the host reads and waiting host-to-device copies that
  tests/test_device_matrix.py's ``HostTraffic`` counts (the two should agree).

``--device cpu`` is a dry run: the per-path counts on the ``meta`` device (no values; every host read
answered and counted by ``HostTraffic``), what the same paths would do on a GPU. The report names
the device of every figure. Benchmarks never assert.
"""

from __future__ import annotations

import _common  # noqa: F401

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

import fewstep
from _common import REPORTS, cuda_syncs, log, report_header, write_text_atomic

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _net(channels: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(4, channels, 3, padding=1), torch.nn.SiLU(),
        torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.SiLU(),
        torch.nn.Conv2d(channels, 4, 3, padding=1),
    )


def _count_syncs(model: fewstep.Model, x: torch.Tensor, nfe: int) -> int:
    return cuda_syncs(lambda: fewstep.sample(model, x, "unipc", nfe=nfe))


def _traffic(dev: torch.device) -> Any:
    os.environ.setdefault("FEWSTEP_TEST_DEVICE", dev.type)
    from test_device_matrix import HostTraffic

    return HostTraffic(dev, answer=dev.type == "meta")


def paths_table(dev: torch.device, net: torch.nn.Module, x: torch.Tensor, nfe: int) -> list[list[Any]]:
    """Per path: CUDA's synchronisation count (``-`` off CUDA), host reads, waiting uploads, model calls."""
    sched = fewstep.DiscreteVP.linear()
    model = fewstep.Model(lambda x, t: net(x), sched, "eps")
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("unipc, sequential", lambda: fewstep.sample(model, x, "unipc", nfe=nfe)),
        ("dpmpp_2m_sde, sequential", lambda: fewstep.sample(model, x, "dpmpp_2m_sde", nfe=nfe, seed=1)),
        ("dpmpp_2m_sde, parallel (window 8)", lambda: fewstep.sample(model, x, "dpmpp_2m_sde", nfe=nfe, seed=1,
                                                                    parallel=fewstep.ParallelOptions(window=8), return_info=True)),
    ]
    rows = []
    for label, run in cases:
        if dev.type != "meta":
            run()  # warm-up, plan compile
        syncs = cuda_syncs(run) if dev.type == "cuda" else "-"
        calls0 = model.calls
        with _traffic(dev) as ht:
            out = run()
        rounds = out[1].extra["parallel"].rounds if isinstance(out, tuple) else "-"
        rows.append([label, syncs, len(ht.reads), len(ht.uploads), model.calls - calls0, rounds])
        log(" | ".join(map(str, rows[-1])))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a dry run on the meta device)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--nfe", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--out", default=str(REPORTS / "gpu_sync.md"))
    args = ap.parse_args(argv)
    t_all = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        log("no CUDA device: nothing to measure (run this on a GPU machine, or --device cpu for a dry run)")
        return 0
    dev = torch.device("meta") if args.device == "cpu" else torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "meta device (CPU dry run: host reads counted, no values)"
    torch.manual_seed(0)
    net = _net(args.channels).to(dev).eval()
    sched = fewstep.DiscreteVP.linear()
    x = fewstep.initial_noise(sched, (args.batch, 4, args.size, args.size), 0, device=dev)
    lines = [f"Device: {name}; model: 3-layer conv net, {args.channels} channels, batch {args.batch}x4x{args.size}x{args.size} float32; NFE {args.nfe}.", ""]
    if dev.type == "cuda":
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
        lines += [f"UniPC on {name}:", "", "| NaN/Inf check | host syncs per sample call | ms per step (median) | ratio to off |", "|---|---|---|---|"]
        for label, syncs, ms in rows:
            lines.append(f"| {label} | {syncs} | {ms:.3f} | {times[label] / times['off']:.3f} |")
        lines.append("")
    with torch.no_grad():
        table = paths_table(dev, net, x, args.nfe)
    lines += [f"Per path on {name} (default NaN/Inf check: one read per call; parallel: one read of the residuals per round). "
              "'CUDA syncs': torch.cuda.set_sync_debug_mode; 'host reads' / 'waiting uploads': HostTraffic (tests/test_device_matrix.py).", "",
              "| path | CUDA syncs per call | host reads | waiting uploads | model calls | parallel rounds |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in table]
    text = "\n".join([*report_header(f"Host synchronisations of the sampling loop on {name}", "gpu_sync.py", argv, time.perf_counter() - t_all),
                      *lines]) + "\n"
    write_text_atomic(Path(args.out), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

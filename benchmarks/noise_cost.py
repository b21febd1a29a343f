"""Cost of fewstep's step noise against ``torch.randn`` of the same shape, on the CPU or a GPU (issue 15).

    python benchmarks/noise_cost.py                      # CPU, eager generator (the default)
    FEWSTEP_COMPILE_NOISE=1 python benchmarks/noise_cost.py --out benchmarks/reports/noise_cost_cpu_compiled.md
    python benchmarks/noise_cost.py --device cuda --out benchmarks/reports/noise_cost_gpu.md

Rows, each the median over repeats of one draw of a ``(batch, 4, size, size)`` float32 tensor, as a
ratio to ``torch.randn`` measured in the same run:

* ``counter normal``: one keyed standard normal per element (:func:`fewstep.noise.counter_normals`,
  what :class:`~fewstep.IntervalNoise` draws per step);
* ``Brownian step, N steps``: the normalised increment of :class:`~fewstep.BrownianNoise` over one
  step of an N-step log-SNR grid (steady state: each new grid point costs ``depth + 2`` normals);
* ``keyed_noise (per-row CPU generators)``: the previous step noise of fewstep <= 0.3, for reference.

Also checks, on the device, that the noise of a sub-batch equals the matching rows of the full
batch (bitwise), and on a GPU that it equals the CPU's to float rounding. Benchmarks never assert.
"""

from __future__ import annotations

import _common  # noqa: F401

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from _common import REPORTS, log, report_header, write_text_atomic
from fewstep.noise import BrownianNoise, IntervalNoise, counter_normals, keyed_noise


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, dev: torch.device, repeats: int) -> float:
    fn()
    _sync(dev)
    out = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def _brownian_step(shape: tuple[int, ...], dev: torch.device, n_steps: int):
    lams = torch.linspace(-6.0, 8.0, n_steps + 1).tolist()
    state = {"i": 0, "bn": BrownianNoise(0)}

    def step() -> torch.Tensor:
        i = state["i"] % n_steps
        if i == 0:
            state["bn"] = BrownianNoise(0)  # a fresh run: its first step computes both ends
        state["i"] += 1
        return state["bn"].increment(lams[i], lams[i + 1], shape, device=dev)

    return step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=str(REPORTS / "noise_cost.md"))
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        log("no CUDA device: nothing to measure")
        return 0
    shape = (args.batch, 4, args.size, args.size)
    n = 4 * args.size * args.size
    t_randn = _median_ms(lambda: torch.randn(shape, device=dev), dev, args.repeats)
    rows = [("torch.randn", t_randn)]
    keys = torch.arange(args.batch, dtype=torch.int64, device=dev)[:, None] * 7919 + 3
    rows.append(("counter normal (IntervalNoise)", _median_ms(lambda: counter_normals(keys, (1.0,), n).float(), dev, args.repeats)))
    for steps in (10, 50):
        fn = _brownian_step(shape, dev, steps)
        rows.append((f"Brownian step, {steps}-step grid (depth 14)", _median_ms(fn, dev, args.repeats * 2)))
    if args.batch * n <= 1 << 22:
        rows.append(("keyed_noise (per-row CPU generators, then moved)",
                     _median_ms(lambda: keyed_noise(shape, 0, step=3, device=dev), dev, max(3, args.repeats // 3))))
    # batch independence on this device
    full = BrownianNoise(5).increment(0.0, 0.5, shape, device=dev)
    idx = sorted({min(3, args.batch - 1), 0, args.batch - 1}, reverse=True)
    part = BrownianNoise(5).increment(0.0, 0.5, (len(idx), *shape[1:]), indices=idx, device=dev)
    same = bool(torch.equal(full[idx], part))
    inter_full = IntervalNoise(5).increment(0.0, 0.5, shape, device=dev)
    same_i = bool(torch.equal(inter_full[idx], IntervalNoise(5).increment(0.0, 0.5, (len(idx), *shape[1:]), indices=idx, device=dev)))
    lines = [*report_header("Step noise cost against torch.randn", "noise_cost.py", argv),
             f"Device: {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}; tensor {args.batch}x4x{args.size}x{args.size} float32; "
             f"FEWSTEP_COMPILE_NOISE={os.environ.get('FEWSTEP_COMPILE_NOISE', '0')} (1: torch.compile the generator; default eager).", "",
             "| noise | ms (median) | ratio to torch.randn |", "|---|---|---|"]
    lines += [f"| {label} | {ms:.3f} | {ms / t_randn:.2f} |" for label, ms in rows]
    lines += ["", f"Sub-batch noise equals the full batch's rows bitwise: Brownian {same}, interval {same_i}; "
              f"non-finite values in the noise: {int((~torch.isfinite(full)).sum())}."]
    if dev.type == "cuda":
        cpu = BrownianNoise(5).increment(0.0, 0.5, (len(idx), *shape[1:]), indices=idx)
        lines.append(f"GPU vs CPU Brownian noise, max |difference|: {(part.cpu() - cpu).abs().max().item():.2e}.")
    write_text_atomic(Path(args.out), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""diffusers pipelines in half precision on a GPU (issue 28): the tiny local pipelines of
tests/test_integrations_diffusers.py (a ``DDPMPipeline`` with a random ``UNet2DModel``, no download)
moved with ``pipe.to(device, dtype)``.

Run on a machine with CUDA (e.g. the device tool's H100), from the repository root:

    PYTHONPATH=src python benchmarks/gpu_diffusers.py --out benchmarks/reports/diffusers_gpu.md

For float16 and bfloat16 against float32 on the same device: ``FewstepScheduler`` inside the
pipeline's own ``__call__`` (a deterministic and a stochastic preset; the pipeline's generator made
on the device, as diffusers' examples do), and the direct path (``fewstep.integrations.diffusers.sample``
without latents: they are drawn on the network's device in its dtype). Per row: the output's device
and dtype, whether it is finite, the largest difference from float32 (images in [0, 1]; latents
relative to their largest value), and on CUDA the host synchronisations of one call
(``torch.cuda.set_sync_debug_mode``; diffusers' own ``DPMSolverMultistepScheduler`` beside it).
``--device cpu`` is a dry run of the script. Without diffusers it says so and exits 0. Nothing is asserted.
"""

from __future__ import annotations

import _common  # noqa: F401

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from _common import REPORTS, cuda_syncs, device_or_dry_run, log, quiet_diffusers, report_header, write_text_atomic


def _syncs(dev: torch.device, fn: Callable[[], Any]) -> Any:
    return cuda_syncs(fn) if dev.type == "cuda" else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPORTS / "diffusers_gpu.md"))
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a dry run of the script)")
    ap.add_argument("--nfe", type=int, default=8)
    args = ap.parse_args(argv)
    try:
        import diffusers
    except ImportError as exc:
        log(f"diffusers is not importable here ({exc}): nothing to measure (carry its wheel: see benchmarks/gpu_session.sh)")
        write_text_atomic(Path(args.out), f"# diffusers pipelines on a GPU\n\nNot run: diffusers is not importable ({exc}).\n")
        return 0
    found = device_or_dry_run(args.device)
    if found is None:
        return 0
    dev, name = found
    quiet_diffusers()
    from fewstep.integrations.diffusers import FewstepScheduler, sample as pipe_sample

    def pipe_for(dtype: torch.dtype) -> Any:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                                         down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                         norm_num_groups=4).eval()
            pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(set_alpha_to_one=True, clip_sample=False))
            pipe = pipe.to(dev, dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def through_pipeline(pipe: Any, solver: str | None) -> torch.Tensor:
        if solver is None:
            pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        else:
            pipe.scheduler = FewstepScheduler.from_pipeline(pipe, solver)
        gen = torch.Generator(dev).manual_seed(1)
        out = pipe(batch_size=2, num_inference_steps=args.nfe, generator=gen, output_type="np").images
        return torch.as_tensor(out)

    rows = []
    t_all = time.perf_counter()
    with torch.no_grad():
        refs: dict[str, torch.Tensor] = {}
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            pipe = pipe_for(dtype)
            cases: list[tuple[str, Callable[[], torch.Tensor]]] = [
                ("FewstepScheduler dpmpp_2m in pipe()", lambda: through_pipeline(pipe, "dpmpp_2m")),
                ("FewstepScheduler dpmpp_2m_sde in pipe()", lambda: through_pipeline(pipe, "dpmpp_2m_sde")),
                ("diffusers DPMSolverMultistepScheduler in pipe()", lambda: through_pipeline(pipe, None)),
                ("direct path unipc (default latents)", lambda: pipe_sample(pipe, solver="unipc", nfe=args.nfe, batch_size=2)),
            ]
            for label, run in cases:
                try:
                    out = run()
                    syncs = _syncs(dev, run)
                except Exception as exc:  # a missing half-precision kernel is a finding, not a crash of the session
                    note = ("diffusers' DDPMPipeline converts its output with .numpy(), which has no bfloat16 (not fewstep)"
                            if "BFloat16" in str(exc) and "pipe()" in label else "")
                    rows.append([label, str(dtype)[6:], f"error: {type(exc).__name__}: {str(exc)[:120]}", "", "", "", note])
                    log(" | ".join(map(str, rows[-1])))
                    continue
                where = f"{out.device.type}, {str(out.dtype)[6:]}" if "direct" in label else f"numpy images from {str(dtype)[6:]} latents"
                finite = bool(torch.isfinite(out.float()).all())
                if dtype == torch.float32:
                    refs[label] = out.float().cpu()
                    diff = "(reference)"
                else:
                    ref = refs.get(label)
                    d = (out.float().cpu() - ref).abs().max() if ref is not None else float("nan")
                    diff = f"{float(d / (ref.abs().max() if 'direct' in label else 1.0)):.1e}" if ref is not None else "-"
                rows.append([label, str(dtype)[6:], where, finite, diff, syncs, ""])
                log(" | ".join(map(str, rows[-1])))
    wall = time.perf_counter() - t_all
    from fewstep.report import markdown_table

    table = markdown_table(["path", "dtype", "output", "finite", "max diff from float32", "host syncs per call", "note"], rows)
    text = "\n".join([
        *report_header(f"diffusers pipelines in half precision on {name}", "gpu_diffusers.py", argv, wall),
        f"Device: {name}. A DDPMPipeline with a tiny random UNet2DModel moved by pipe.to(device, dtype); NFE {args.nfe}, batch 2, "
        "the pipeline's generator on the device. 'max diff': images in [0, 1] (absolute), direct-path latents relative to their largest value.", "",
        table, "",
    ])
    write_text_atomic(Path(args.out), text)
    print(table)
    ok = [r for r in rows if not str(r[2]).startswith("error")]
    half = [r for r in ok if r[1] != "float32"]
    print(f"diffusers on {name}: {len(ok)} of {len(rows)} runs ran, all finite: {all(r[3] is True for r in ok)}; "
          f"largest difference from float32 in half precision: {max((float(r[4]) for r in half if r[4] not in ('-', '')), default=float('nan')):.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

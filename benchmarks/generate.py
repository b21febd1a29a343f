"""Generation at scale (issue 18): throughput of ``fewstep generate`` at 1 and 2 CPU workers
(``torchrun --nproc_per_node``, gloo) on ``digits-vp-eps`` at NFE 10, the two runs' files compared
bitwise, then the digits metrics of the generated set (feature / pixel Fréchet distance).

    python benchmarks/generate.py                  # 50,000 samples (default) -> reports/generate.md
    python benchmarks/generate.py --num 5000       # a smaller set

Each run is the real command line in a fresh folder (including process start-up); samples per
second = num / wall time. Nothing is asserted.
"""

from __future__ import annotations

import _common  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fewstep.report import markdown_table

from _common import REPORTS, log, report_header, write_text_atomic

BIN = Path(sys.executable).parent


def run(workers: int, folder: Path, num: int, batch: int, nfe: int) -> float:
    args = ["generate", "--model", "digits-vp-eps", "--solver", "unipc", "--nfe", str(nfe), "--num-samples", str(num),
            "--batch", str(batch), "--seed", "0", "--out", str(folder)]
    cmd = [str(BIN / "fewstep"), *args] if workers == 1 else [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={workers}", "-m", "fewstep", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    log(r.stdout.strip().splitlines()[-1])
    return wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--out", default=str(REPORTS / "generate.md"))
    args = ap.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="fewstep-generate-"))
    try:
        rows, folders = [], {}
        for workers in (1, 2):
            folders[workers] = scratch / f"w{workers}"
            wall = run(workers, folders[workers], args.num, args.batch, args.nfe)
            rows.append([workers, args.num, f"{wall:.1f}", f"{args.num / wall:.1f}", f"{args.num / wall / workers:.1f}"])
        shards = sorted(p.name for p in folders[1].glob("shard-*.safetensors"))
        same = shards == sorted(p.name for p in folders[2].glob("shard-*.safetensors")) and all(
            filecmp.cmp(folders[1] / f, folders[2] / f, shallow=False) for f in shards)
        ev = subprocess.run([str(BIN / "fewstep"), "evaluate", str(folders[1])], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        metrics = json.loads(ev.stdout) if ev.returncode == 0 else {"error": ev.stderr[-500:]}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table = markdown_table(["workers", "samples", "wall s", "samples / s", "samples / s per worker"], rows)
    text = "\n".join([
        *report_header("Generation at scale: throughput and the generated set's quality", "generate.py", argv),
        f"`fewstep generate --model digits-vp-eps --solver unipc --nfe {args.nfe} --num-samples {args.num} --batch {args.batch} --seed 0`, "
        "one process or `torchrun --standalone --nproc_per_node 2` (gloo), one torch thread per worker, wall time of the "
        "whole command (process start-up included).", "",
        table, "",
        f"The 1-worker and 2-worker folders are bitwise identical: {same} ({len(shards)} shards).", "",
        f"Digits metrics of the {args.num} samples (`fewstep evaluate`): " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items() if k != "folder") + ".", "",
    ])
    write_text_atomic(Path(args.out), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

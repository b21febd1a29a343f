"""Run every benchmark and write its report into benchmarks/reports/ (what `make bench` calls).

    python benchmarks/run_all.py            # full: overhead (~1 min), the default call vs the peers (~36 min,
                                            # ~3 min with its peer cache), quality on the oracles (~15 min on
                                            # 2 CPU cores), quality on the digits networks (~60 min)
                                            # the solver-schedule search (see benchmarks/README.md) and the
                                            # stochastic presets' quality and grids (~33 min beside other jobs),
                                            # parallel-in-time sampling (see benchmarks/README.md)
    python benchmarks/run_all.py --quick    # quick modes of all seven (~6 min)

The overhead benchmark runs first so that its timings are taken on an otherwise idle machine.
Nothing here asserts on timings; the exit status is non-zero only if a benchmark crashes.
"""

from __future__ import annotations

import _common  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

import argparse
import time

import defaults
import generate
import overhead
import parallel
import quality
import sde_quality
import search
from _common import log


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the quick mode of every benchmark")
    ap.add_argument("--only", choices=["overhead", "defaults", "quality", "digits", "search", "sde", "parallel", "generate"], default=None, help="run one benchmark")
    args = ap.parse_args(argv)
    flags = ["--quick"] if args.quick else []
    t0 = time.perf_counter()
    status = 0
    if args.only in (None, "overhead"):
        log("== overhead ==")
        status |= overhead.main(flags)
    if args.only in (None, "defaults"):
        log("== defaults ==")
        status |= defaults.main(flags)
    if args.only in (None, "quality"):
        log("== quality ==")
        status |= quality.main(flags)
    if args.only in (None, "digits"):
        log("== quality on the digits networks ==")
        status |= quality.main(["--digits", *flags])
    if args.only in (None, "search"):
        log("== solver-schedule search ==")
        status |= search.main(flags or ["--screen"])
    if args.only in (None, "sde"):
        log("== stochastic presets: quality and grids ==")
        status |= sde_quality.main(flags)
    if args.only in (None, "parallel"):
        log("== parallel-in-time sampling ==")
        status |= parallel.main(flags)
    if args.only in (None, "generate"):
        log("== generation at scale ==")
        status |= generate.main(["--num", "5000"] if args.quick else [])
    log(f"all benchmarks done in {time.perf_counter() - t0:.0f} s; reports in {_common.REPORTS}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())

"""Parallel-in-time sampling (issue 16): sequential steps vs Picard rounds vs Anderson (TAA) rounds,
model evaluations, agreement with the sequential samples, and wall-clock time, in one run.

Part 1, rounds: on the bundled digits networks, DDIM, DPM-Solver++(2M), UniPC and DPM-Solver++(2M)
SDE at N = 25, 50, 100, 1000 steps, batch 64: the rounds of batched model calls each scheme needs
at the default tolerance (``fewstep.ParallelOptions``), the model evaluations per sample over N, and
the RMS difference from the sequential samples (with the sequential solver's own RMSE against a
NFE-300 UniPC solve for scale).

Part 2, wall clock on this CPU: 100-step DDIM on digits-vp-eps at batch 1 and 8, sequential vs
parallel (Anderson, default settings), median of repeats, the two alternating. A CPU has little
idle width: a batched call costs about as much as the calls it replaces, so the speed-up that
matters is measured on a GPU (``benchmarks/gpu_parallel.py``).

    python benchmarks/parallel.py            # -> reports/parallel.md (+ .json)
    python benchmarks/parallel.py --quick    # digits-vp-eps, N 25 50, DDIM and DPM-Solver++(2M) -> reports/parallel_quick.md

Part 3, where the rounds go (``--trace``, -> reports/parallel_trace.md): 100-step DDIM and UniPC on
digits-vp-eps, the whole trajectory as the window, batch 8: per round, the evaluations accepted and
the error of the current trajectory's end state against the sequential samples, in units of the
solver's own error, for each scheme and for exact-Jacobian Newton; the rounds at tolerances 1e-3..3e-2;
and 1000-step DDIM at windows 32, 128 and the whole trajectory.

Nothing is asserted; the tests (tests/test_parallel.py) hold the properties.
"""

from __future__ import annotations

import _common  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

import argparse
import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

import fewstep
from fewstep.report import markdown_table

from _common import REPORTS, log, machine_lines, report_header, set_threads, write_text_atomic

SOLVERS = ("ddim", "dpmpp_2m", "unipc", "dpmpp_2m_sde")
STEPS = (25, 50, 100, 1000)
TARGETS = ("digits-vp-eps", "digits-flow")
BATCH = 64
SCHEMES = ("picard", "taa", "secant")
LABEL = {"picard": "Picard", "taa": "Anderson", "secant": "secant"}


def rounds_rows(target: str, solvers: tuple[str, ...], steps: tuple[int, ...], batch: int, seed: int, first_window: str) -> list[dict]:
    model = fewstep.zoo.load(target)
    x = fewstep.initial_noise(model.schedule, (batch, *model.sample_shape), seed)
    ref = fewstep.sample(model, x, "unipc", nfe=300)
    rows = []
    for name in solvers:
        for n in steps:
            opts = fewstep.ParallelOptions(first_window=first_window)
            t0 = time.perf_counter()
            seq = fewstep.sample(model, x, name, nfe=n, seed=seed)
            row = {"target": target, "solver": name, "N": n, "window": min(opts.window or n, n), "sequential_s": time.perf_counter() - t0,
                   "solver_rmse_vs_unipc300": fewstep.rmse(seq, ref)}
            for acc in SCHEMES:
                t0 = time.perf_counter()
                par, info = fewstep.sample(model, x, name, nfe=n, seed=seed, parallel=replace(opts, accelerate=acc), return_info=True)
                p = info.extra["parallel"]
                row[acc] = {"rounds": p.rounds, "evals_per_N": p.evaluations / n, "s": time.perf_counter() - t0,
                            "rms_diff": fewstep.rmse(par, seq), "accepted": p.accepted}
            log(f"{target} {name} N={n}: " + ", ".join(f"{LABEL[a]} {row[a]['rounds']} rounds" for a in SCHEMES))
            rows.append(row)
    return rows


def wall_clock(target: str, n: int, batches: tuple[int, ...], repeats: int) -> list[dict]:
    model = fewstep.zoo.load(target)
    out = []
    for batch in batches:
        x = fewstep.initial_noise(model.schedule, (batch, *model.sample_shape), 0)
        seq_t, par_t = [], []
        info = None
        for _ in range(repeats):
            t0 = time.perf_counter()
            fewstep.sample(model, x, "ddim", nfe=n)
            seq_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _, info = fewstep.sample(model, x, "ddim", nfe=n, parallel=True, return_info=True)
            par_t.append(time.perf_counter() - t0)
        p = info.extra["parallel"]
        s, q = statistics.median(seq_t), statistics.median(par_t)
        out.append({"batch": batch, "N": n, "sequential_s": s, "parallel_s": q, "speedup": s / q, "rounds": p.rounds, "evals_per_N": p.evaluations / n})
        log(f"wall clock batch {batch}: sequential {s * 1e3:.0f} ms, parallel {q * 1e3:.0f} ms ({s / q:.2f}x), {p.rounds} rounds")
    return out


def trace_rows(target: str, solvers: tuple[str, ...], n: int, batch: int, first_window: str) -> tuple[list[dict], list[dict]]:
    """Per-round end-state error (see the module docstring) and rounds per tolerance. The end state
    of each round's replay is read by wrapping the engine's private replay (measurement only)."""
    from fewstep import parallel as P

    model = fewstep.zoo.load(target)
    x = fewstep.initial_noise(model.schedule, (batch, *model.sample_shape), 0)
    ref = fewstep.sample(model, x, "unipc", nfe=300)
    ends: list = []
    original = P._PlanProgram.replay

    def replay(self, a, outputs, b, slopes=None):  # type: ignore[no-untyped-def]
        g = original(self, a, outputs, b, slopes)
        ends.append(self.runner.result().clone() if self.runner.finished else None)
        return g

    class ExactJacobian(P._SecantSlopes):
        """Newton's method itself, for reference: the model's exact Jacobian-vector product at each
        replay step (torch.func.jvp). Not a usable scheme: the JVPs run one after another."""

        def linearised(self, j, out, x):  # type: ignore[no-untyped-def]
            prog, (at, _) = self.prior.__self__, self._last[j]
            ev, rows = prog.evals[j], at.shape[0]
            fn = lambda z: prog.model.output_rows(z, [ev.t] * rows, [ev.alpha] * rows, [ev.sigma] * rows)  # noqa: E731
            return out + torch.func.jvp(fn, (at,), ((x - at).to(at.dtype),))[1]

    traces, tols = [], []
    P._PlanProgram.replay = replay
    try:
        for name in solvers:
            seq = fewstep.sample(model, x, name, nfe=n)
            err = fewstep.rmse(seq, ref)
            for acc in (*SCHEMES, "newton"):
                ends.clear()
                if acc == "newton":
                    P._SecantSlopes, secant = ExactJacobian, P._SecantSlopes
                try:
                    _, info = fewstep.sample(model, x, name, nfe=n, parallel=fewstep.ParallelOptions(window=None, accelerate="secant" if acc == "newton" else acc, first_window=first_window),
                                             return_info=True)
                finally:
                    if acc == "newton":
                        P._SecantSlopes = secant
                p = info.extra["parallel"]
                traces.append({"solver": name, "accelerate": acc, "solver_rmse": err, "rounds": p.rounds, "accepted": p.accepted,
                               "end_error_over_solver_error": [None if e is None else fewstep.rmse(e, seq) / err for e in ends]})
                log(f"trace {name} {acc}: {p.rounds} rounds")
            for tol in (1e-3, 3e-3, 1e-2, 3e-2):
                par, info = fewstep.sample(model, x, name, nfe=n, parallel=fewstep.ParallelOptions(window=None, tol=tol, first_window=first_window), return_info=True)
                tols.append({"solver": name, "tol": tol, "rounds": info.extra["parallel"].rounds, "diff_over_solver_error": fewstep.rmse(par, seq) / err})
    finally:
        P._PlanProgram.replay = original
    return traces, tols


def long_run_windows(target: str, n: int, batch: int, windows: tuple[int | None, ...], first_window: str) -> list[dict]:
    """Rounds and evaluations of an N-step DDIM run per window (the window bounds long runs)."""
    model = fewstep.zoo.load(target)
    x = fewstep.initial_noise(model.schedule, (batch, *model.sample_shape), 0)
    seq = fewstep.sample(model, x, "ddim", nfe=n)
    rows = []
    for w in windows:
        par, info = fewstep.sample(model, x, "ddim", nfe=n, parallel=fewstep.ParallelOptions(window=w, first_window=first_window), return_info=True)
        p = info.extra["parallel"]
        rows.append({"window": w or n, "rounds": p.rounds, "evals_per_N": p.evaluations / n, "rms_diff": fewstep.rmse(par, seq)})
        log(f"{n}-step DDIM window {w or n}: {p.rounds} rounds")
    return rows


def write_trace(argv: list[str] | None, out: Path, first_window: str) -> int:
    t0 = time.perf_counter()
    traces, tols = trace_rows("digits-vp-eps", ("ddim", "unipc"), 100, 8, first_window)
    long = long_run_windows("digits-vp-eps", 1000, 8, (32, 128, None), first_window)
    wall = time.perf_counter() - t0
    longest = max(t["rounds"] for t in traces)
    head = ["solver", "scheme", "rounds"] + [str(k) for k in range(1, longest + 1)]
    acc_table = markdown_table(head, [[t["solver"], t["accelerate"], t["rounds"], *t["accepted"], *[""] * (longest - t["rounds"])] for t in traces])
    err_table = markdown_table(head, [[t["solver"], t["accelerate"], t["rounds"], *["-" if e is None else f"{e:.3g}" for e in t["end_error_over_solver_error"]],
                                       *[""] * (longest - t["rounds"])] for t in traces])
    tol_table = markdown_table(["solver", "tol", f"rounds ({LABEL[fewstep.ParallelOptions().accelerate]})", "RMS diff / solver RMSE"],
                               [[r["solver"], f"{r['tol']:g}", r["rounds"], f"{r['diff_over_solver_error']:.3f}"] for r in tols])
    text = "\n".join([
        *report_header("Parallel-in-time sampling: where the rounds go", "parallel.py", argv, wall),
        "100 steps on digits-vp-eps, batch 8, window = the whole trajectory, default tolerance unless stated. A round is "
        "one batched model call (the sequential run needs 100). 'newton': for reference, Newton's method with the model's exact "
        "Jacobian (a JVP at every replay step, one after another: not a usable scheme, a bound on what a better Jacobian "
        "estimate could give).", "",
        "## Evaluations accepted in each round", "", acc_table, "",
        "## The current trajectory's end state after each round", "",
        "RMS distance of the end state of the round's replay to the sequential samples, divided by the solver's own RMSE "
        "(against a NFE-300 UniPC solve): 1 means the estimate is as far from the sequential samples as the solver is from "
        "the exact ones. '-': the round did not reach the end (round 1 evaluates only the first state).", "",
        err_table, "",
        "## Rounds against the tolerance", "", tol_table, "",
        "## Long runs: the window bounds the rounds", "",
        "1000-step DDIM on digits-vp-eps, batch 8, default acceleration and tolerance.", "",
        markdown_table(["window", "rounds", "evals / N", "RMS diff"], [[r["window"], r["rounds"], f"{r['evals_per_N']:.1f}", f"{r['rms_diff']:.1e}"] for r in long]), "",
    ])
    write_text_atomic(out, text)
    write_text_atomic(out.with_suffix(".json"), json.dumps({"machine": machine_lines(), "wall_s": wall, "traces": traces, "tolerances": tols, "long_run_windows": long}, indent=1))
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--targets", nargs="+", default=None, help=f"default: {' '.join(TARGETS)}")
    ap.add_argument("--steps", nargs="+", type=int, default=None, help=f"default: {' '.join(map(str, STEPS))}")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--first-window", default=fewstep.ParallelOptions().first_window, choices=fewstep.parallel.FIRST_WINDOWS,
                    help="the first round's inputs (default: ParallelOptions')")
    ap.add_argument("--trace", action="store_true", help="only part 3 (where the rounds go) -> reports/parallel_trace.md")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    if args.trace:
        return write_trace(argv, Path(args.out) if args.out else REPORTS / "parallel_trace.md", args.first_window)
    out = Path(args.out) if args.out else REPORTS / ("parallel_quick.md" if args.quick else "parallel.md")
    t_all = time.perf_counter()
    targets = args.targets or (TARGETS[:1] if args.quick else TARGETS)
    solvers = SOLVERS[:2] if args.quick else SOLVERS
    steps = tuple(args.steps or (STEPS[:2] if args.quick else STEPS))
    rows = [r for t in targets for r in rounds_rows(t, solvers, steps, BATCH, 0, args.first_window)]
    clock = wall_clock("digits-vp-eps", 100, (1, 8), 3 if args.quick else 7)
    wall = time.perf_counter() - t_all

    best = min(SCHEMES[1:], key=lambda a: sum(r[a]["rounds"] for r in rows))
    table = markdown_table(
        ["target", "solver", "N", "window", "solver RMSE (vs UniPC-300)"]
        + [f"{LABEL[a]} {col}" for a in SCHEMES for col in ("rounds", "evals / N", "RMS diff")] + [f"rounds saved ({LABEL[best]} vs N)"],
        [[r["target"], r["solver"], r["N"], r["window"], f"{r['solver_rmse_vs_unipc300']:.2e}"]
         + [v for a in SCHEMES for v in (r[a]["rounds"], f"{r[a]['evals_per_N']:.1f}", f"{r[a]['rms_diff']:.1e}")]
         + [f"{r['N'] / r[best]['rounds']:.1f}x"] for r in rows])
    clock_table = markdown_table(["batch", "N", "sequential ms", "parallel ms", "speed-up", "rounds", "evals / N"],
                                 [[c["batch"], c["N"], f"{c['sequential_s'] * 1e3:.0f}", f"{c['parallel_s'] * 1e3:.0f}", f"{c['speedup']:.2f}x",
                                   c["rounds"], f"{c['evals_per_N']:.1f}"] for c in clock])
    ddim100 = [r for r in rows if r["solver"] == "ddim" and r["N"] == 100]
    headline = ", ".join(f"{r['target']}: " + ", ".join(f"{LABEL[a]} {r[a]['rounds']}" for a in SCHEMES) + " rounds" for r in ddim100)
    opts = fewstep.ParallelOptions()
    text = "\n".join([
        *report_header("Parallel-in-time sampling: rounds, evaluations, agreement, wall clock", "parallel.py", argv, wall),
        f"Settings: `fewstep.ParallelOptions()` defaults (tolerance {opts.tol:g} on each evaluation's input change / its noise level, "
        f"window {opts.window}, Anderson memory {opts.history}, first window {args.first_window!r}) with each acceleration: Picard (none), Anderson (`taa`), the secant "
        f"quasi-Newton replay (`secant`); batch {BATCH}, seed 0. A round is one "
        "batched model call: the sequential run needs N. 'evals / N': model evaluations per sample over N (the compute price). "
        "'RMS diff': parallel vs sequential samples (float32 networks); the solver's own RMSE against a NFE-300 UniPC solve is "
        "given for scale.", "",
        table, "",
        f"100-step DDIM (target of issue 16: <= 8 rounds with acceleration; ParaTAA reports about 7 on Stable Diffusion with "
        f"early stopping on image similarity): {headline or 'not run in this mode'}.", "",
        "## Wall clock on this CPU", "",
        "100-step DDIM on digits-vp-eps, median of repeats. On a CPU a batched call of k states costs about k single calls, "
        "so little is gained here; the GPU figure is `benchmarks/gpu_parallel.py`'s.", "",
        clock_table, "",
    ])
    write_text_atomic(out, text)
    write_text_atomic(out.with_suffix(".json"), json.dumps({"machine": machine_lines(), "wall_s": wall, "options": asdict(opts),
                                                            "rows": rows, "wall_clock": clock}, indent=1, default=str))
    log(f"wrote {out} ({wall:.0f} s)")
    print(table)
    print(clock_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

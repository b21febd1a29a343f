"""Command line: ``fewstep demo | sample | bench``."""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from . import __version__
from .metrics import frechet_distance, likelihood_gap, rmse
from .noise import initial_noise
from .oracle import ORACLES, bundled_oracle
from .reference import check_reference
from .report import markdown_table, plot_error_vs_nfe
from .sample import sample
from .schedules import EDM, CosineVP, DiscreteVP, FlowMatching, LinearVP, NoiseSchedule
from .solvers.plan import SolverSchedule
from .solvers.presets import preset_names
from .timesteps import SPACINGS

SCHEDULES = {
    "vp-linear": lambda: DiscreteVP.linear(),
    "vp-scaled-linear": lambda: DiscreteVP.scaled_linear(),
    "vp-cosine-discrete": lambda: DiscreteVP.cosine(),
    "vp-continuous": lambda: LinearVP(),
    "vp-cosine": lambda: CosineVP(),
    "edm": lambda: EDM(),
    "flow": lambda: FlowMatching(),
}


def _machine() -> str:
    return f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads, torch {torch.__version__}".strip()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _parse_value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _solver_arg(value: str) -> tuple[str | SolverSchedule, dict[str, object]]:
    """``name``, ``name:key=value,key=value`` (preset options) or a schedule ``.json`` file."""
    if value.endswith(".json") or Path(value).is_file():
        return SolverSchedule.load(value), {}
    name, _, opts = value.partition(":")
    options: dict[str, object] = {}
    for item in filter(None, opts.split(",")):
        key, eq, val = item.partition("=")
        if not eq:
            raise ValueError(f"preset option {item!r} must look like key=value")
        options[key] = _parse_value(val)
    return name, options


def _label(solver: str | SolverSchedule, options: dict[str, object]) -> str:
    if isinstance(solver, SolverSchedule):
        return solver.name
    return solver + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")


def compare(
    *,
    oracle_name: str,
    schedule_name: str,
    solvers: Sequence[tuple[str | SolverSchedule, dict[str, object]]],
    nfes: Sequence[int],
    batch: int,
    seed: int,
    out: Path,
    title: str,
    spacing: str | None = None,
) -> str:
    """Error vs NFE of several solvers on an oracle, against a converged reference; writes report.md + PNG."""
    from tqdm.auto import tqdm

    oracle = bundled_oracle(oracle_name)
    sched: NoiseSchedule = SCHEDULES[schedule_name]()
    model = oracle.as_model(sched)
    x_T = initial_noise(sched, (batch, oracle.dim), seed, dtype=torch.float64)
    t0 = time.perf_counter()
    _log(f"reference: DOP853 probability-flow solve of {batch} samples (d={oracle.dim}) ...")
    ref = check_reference(model, x_T)
    _log(f"reference ready in {time.perf_counter() - t0:.1f}s; its own change under a 100x tighter tolerance: {ref.max_abs_change:.2e}")
    true = oracle.sample(max(batch, 512), seed=seed + 1)
    rows, series = [], {}
    # presets run at every NFE; a schedule file runs at its own NFE
    jobs = [((s, o), n) for s, o in solvers for n in (nfes if isinstance(s, str) else [s.nfe])]
    for (solver, options), n in tqdm(jobs, desc="solvers", unit="run"):
        label = _label(solver, options)
        opts = dict(options)
        if spacing and isinstance(solver, str):
            opts.setdefault("spacing", spacing)
        try:
            x, info = sample(model, x_T, solver, nfe=n if isinstance(solver, str) else None, return_info=True, seed=seed, **opts)
        except Exception as exc:  # a preset that cannot run at this NFE is reported, not fatal
            rows.append([label, n, "n/a", "n/a", "n/a", str(exc)[:60]])
            continue
        err = rmse(x, ref.solution)
        rows.append([label, info.nfe, err, likelihood_gap(oracle, x, true), frechet_distance(x, true), ""])
        series.setdefault(label, ([], []))
        series[label][0].append(info.nfe)
        series[label][1].append(err)
    out.mkdir(parents=True, exist_ok=True)
    headers = ["solver", "NFE", "RMSE vs reference", "log-lik gap (nats)", "Fréchet to data", "note"]
    table = markdown_table(headers, rows)
    plot = plot_error_vs_nfe(series, out / "error_vs_nfe.png", title=title)
    exact_fd = frechet_distance(oracle.sample(batch, seed=seed + 2), true)
    text = "\n".join([
        f"# {title}", "",
        f"Model: exact oracle `{oracle_name}` ({oracle!r}), noise schedule `{schedule_name}` ({sched!r}).",
        f"Batch {batch}, seed {seed}. Reference: DOP853 (rtol 1e-12) probability-flow solve from the same noise; "
        f"its change under a 100x tighter tolerance is {ref.max_abs_change:.2e} (max abs).",
        f"Fréchet distance between two sets of exact samples of these sizes (the floor): {exact_fd:.4g}.",
        f"Machine: {_machine()}; fewstep {__version__}.", "",
        table, "", f"![error vs NFE]({plot.name})", "",
    ])
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"headers": headers, "rows": rows}, indent=1, default=str))
    return table


def _run_compare(args: argparse.Namespace, solvers: list[tuple[str | SolverSchedule, dict[str, object]]], nfes: Sequence[int], title: str) -> int:
    out = Path(args.out)
    table = compare(
        oracle_name=args.oracle, schedule_name=args.schedule, solvers=solvers, nfes=nfes,
        batch=args.batch, seed=args.seed, out=out, title=title, spacing=args.spacing,
    )
    print(table)
    print(f"\nreport written to {out / 'report.md'} (plot: {out / 'error_vs_nfe.png'})")
    return 0


DEMO_SOLVERS = ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "deis", "heun"]


def cmd_demo(args: argparse.Namespace) -> int:
    solvers = [_solver_arg(s) for s in args.solvers]
    return _run_compare(args, solvers, [5, 10, 20, 50], f"fewstep demo: solvers on {args.oracle}")


def cmd_bench(args: argparse.Namespace) -> int:
    return _run_compare(args, [_solver_arg(s) for s in args.solvers], args.nfe, f"fewstep bench on {args.oracle}")


def cmd_sample(args: argparse.Namespace) -> int:
    oracle = bundled_oracle(args.oracle)
    sched = SCHEDULES[args.schedule]()
    model = oracle.as_model(sched)
    x_T = initial_noise(sched, (args.batch, oracle.dim), args.seed)
    solver, opts = _solver_arg(args.solver)
    if args.spacing and isinstance(solver, str):
        opts.setdefault("spacing", args.spacing)
    x, info = sample(model, x_T, solver, nfe=args.nfe if isinstance(solver, str) else None, progress=True, return_info=True, seed=args.seed, **opts)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import numpy as np

    np.save(out, x.to(torch.float64).numpy())
    print(f"{args.batch} samples with {info.plan.name} ({info.nfe} NFE) written to {out}")
    if args.save_schedule:
        info.plan.save(args.save_schedule)
        print(f"solver schedule written to {args.save_schedule}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fewstep", description="Fast training-free sampling for diffusion and flow models.")
    p.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, batch: int) -> None:
        sp.add_argument("--oracle", default="gmm-d64", choices=sorted(ORACLES), help="bundled exact oracle model")
        sp.add_argument("--schedule", default="vp-linear", choices=sorted(SCHEDULES), help="noise schedule")
        sp.add_argument("--batch", type=int, default=batch, help="number of samples")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--spacing", default=None, choices=sorted(SPACINGS), help="time grid (default: the preset's)")

    d = sub.add_parser("demo", help="compare solvers at NFE 5/10/20/50 on a bundled oracle; write a report")
    common(d, 256)
    d.add_argument("--solvers", nargs="+", default=DEMO_SOLVERS, help="presets to compare")
    d.add_argument("--out", default="reports/demo", help="report folder")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="error vs NFE table and plot for chosen presets or schedule files")
    common(b, 256)
    b.add_argument("--solvers", nargs="+", default=["ddim", "dpmpp_2m", "unipc"], help=f"preset names ({', '.join(preset_names())}), optionally with options as name:key=value,key=value, or schedule .json files")
    b.add_argument("--nfe", nargs="+", type=int, default=[5, 6, 8, 10, 15, 20, 50])
    b.add_argument("--out", default="reports/bench")
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("sample", help="draw samples with a preset or a schedule file; save them as .npy")
    common(s, 16)
    s.add_argument("--solver", default="ddim", help="preset name (name:key=value,... for options) or schedule .json file")
    s.add_argument("--nfe", type=int, default=10)
    s.add_argument("--out", default="reports/samples.npy")
    s.add_argument("--save-schedule", default=None, help="also write the solver schedule used as JSON")
    s.set_defaults(func=cmd_sample)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"fewstep: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

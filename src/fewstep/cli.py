"""Command line: ``fewstep demo | sample | bench | search``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

import torch

from . import __version__
from .errors import ArgumentError, FewstepError
from .metrics import frechet_distance, likelihood_gap, rmse
from .noise import initial_noise
from .oracle import ORACLES, bundled_oracle
from .reference import ReferenceCheck, check_fine_reference, check_reference
from .models import Model
from .parallel import ACCELERATIONS, ParallelOptions
from .report import markdown_table, plot_error_vs_nfe, plot_image_grid
from .sample import sample
from .schedule_search.engine import add_budget_arguments
from .schedules import EDM, CosineVP, DiscreteVP, FlowMatching, LinearVP, NoiseSchedule
from .solvers.plan import SolverSchedule
from .solvers.presets import preset_names, preset_options
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


def parse_solver_arg(value: str) -> tuple[str | SolverSchedule | None, dict[str, object]]:
    """``name``, ``name:key=value,key=value`` (preset options), ``default`` (the measured default
    solver and grid for the model's schedule) or a schedule ``.json`` file."""
    if value.endswith(".json") or Path(value).is_file():
        return SolverSchedule.load(value), {}
    if value == "default":
        return None, {}
    name, _, opts = value.partition(":")
    options: dict[str, object] = {}
    for item in filter(None, opts.split(",")):
        key, eq, val = item.partition("=")
        if not eq:
            raise ArgumentError(f"preset option {item!r} must look like key=value")
        options[key] = _parse_value(val)
    return name, options


def _label(solver: str | SolverSchedule | None, options: dict[str, object]) -> str:
    if isinstance(solver, SolverSchedule):
        return solver.name
    if solver is None:
        return "default"
    return solver + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")


@dataclass
class Target:
    """What a comparison runs on: a model, its initial noises, the metric columns, report lines."""

    label: str
    model: Model
    x_T: torch.Tensor
    headers: list[str]
    metrics: Callable[[torch.Tensor], list[object]]
    notes: list[str]
    reference: Callable[[Model, torch.Tensor], ReferenceCheck]
    images: Callable[[torch.Tensor], Any] | None = None  # samples -> (n, h, w) numpy for grids


def oracle_target(name: str, schedule_name: str, batch: int, seed: int) -> Target:
    """An exact oracle on a named noise schedule: RMSE, exact likelihood gap, Fréchet distance to data."""
    oracle = bundled_oracle(name)
    sched: NoiseSchedule = SCHEDULES[schedule_name]()
    true = oracle.sample(max(batch, 512), seed=seed + 1)
    floor = frechet_distance(oracle.sample(batch, seed=seed + 2), true)
    return Target(
        label=f"oracle {name}",
        model=oracle.as_model(sched),
        x_T=initial_noise(sched, (batch, oracle.dim), seed, dtype=torch.float64),
        headers=["log-lik gap (nats)", "Fréchet to data"],
        metrics=lambda x: [likelihood_gap(oracle, x, true), frechet_distance(x, true)],
        notes=[
            f"Model: exact oracle `{name}` ({oracle!r}), noise schedule `{schedule_name}` ({sched!r}).",
            f"Fréchet distance between two sets of exact samples of these sizes (the floor): {floor:.4g}.",
        ],
        reference=lambda m, x: check_reference(m, x, rtol=1e-10),
    )


def zoo_target(name: str, batch: int, seed: int, reference_nfe: int = 300) -> Target:
    """A bundled trained network: RMSE against a very fine solve, and Fréchet distances /
    classifier confidence against held-out digits."""
    from . import zoo
    from .zoo.evaluate import DigitsEvaluator

    model = zoo.load(name)
    ev = DigitsEvaluator()
    base = ev.baseline()
    floor = ev.evaluate(ev.split.train_x[: max(batch, 2)])  # Fréchet distances are biased upwards at small sample sizes
    info = zoo.card(name)
    keys = ["fd_features", "fd_pixels", "confidence"]
    return Target(
        label=f"model {name}",
        model=model,
        x_T=initial_noise(model.schedule, (batch, *model.sample_shape), seed),
        headers=["digits FD (features)", "FD (pixels)", "classifier confidence"],
        metrics=lambda x: [ev.evaluate(x)[k] for k in keys],
        notes=[
            f"Model: bundled `{name}` ({info['architecture']['class']}, {info['architecture'].get('parameters', '?')} parameters, "
            f"{info['prediction']} prediction on {model.schedule!r}), float32.",
            f"Digits metrics against the {base['n_heldout']} held-out digits: Fréchet distance in the bundled classifier's feature "
            f"space and in pixel space, and the classifier's mean confidence. Real train digits score "
            f"{floor['fd_features']:.4g} / {floor['fd_pixels']:.4g} / {floor['confidence']:.3f} with as many samples as this batch "
            f"({base['fd_features']:.4g} / {base['fd_pixels']:.4g} with all {base['n_train']}); held-out digits have confidence "
            f"{base['heldout_confidence']:.3f}.",
        ],
        reference=lambda m, x: check_fine_reference(m, x, nfe=reference_nfe),
        images=lambda x: model.to_images(x[:16]).numpy(),
    )


def compare(
    *,
    target: Target,
    solvers: Sequence[tuple[str | SolverSchedule, dict[str, object]]],
    nfes: Sequence[int],
    seed: int,
    out: Path,
    title: str,
    spacing: str | None = None,
) -> str:
    """Error vs NFE of several solvers against a converged reference; writes report.md, an
    error-vs-NFE plot, and (for image models) a grid of samples per solver and NFE."""
    from tqdm.auto import tqdm

    model, x_T = target.model, target.x_T
    t0 = time.perf_counter()
    _log(f"reference: converged probability-flow solve of {x_T.shape[0]} samples ({target.label}) ...")
    ref = target.reference(model, x_T)
    _log(f"reference ({ref.method}) ready in {time.perf_counter() - t0:.1f}s; its change from a coarser solve (100x the tolerance, or half the NFE): max {ref.max_abs_change:.2e}, rms {ref.rms_change:.2e}")
    rows, series, grids = [], {}, {}
    # presets run at every NFE; a schedule file runs at its own NFE
    jobs = [((s, o), n) for s, o in solvers for n in (nfes if not isinstance(s, SolverSchedule) else [s.nfe])]
    for (solver, options), n in tqdm(jobs, desc="solvers", unit="run"):
        label = _label(solver, options)
        opts = dict(options)
        if spacing and not isinstance(solver, SolverSchedule):
            opts.setdefault("spacing", spacing)
        try:
            x, info = sample(model, x_T, solver, nfe=None if isinstance(solver, SolverSchedule) else n, return_info=True, seed=seed, **opts)
        except FewstepError as exc:  # a solver that cannot run as asked is reported with the reason; bugs propagate
            why = f"{type(exc).__name__}: {exc}"
            _log(f"{label} at NFE {n} did not run: {why}")
            rows.append([label, n, "n/a", *["n/a"] * len(target.headers), why])
            continue
        if solver is None:
            label = f"default ({info.plan.name}, {info.plan.meta.get('spacing', '?')})"
        if info.plan.stochastic:  # an SDE sampler targets the distribution, not the ODE's trajectory
            rows.append([label, info.nfe, "stochastic", *target.metrics(x), "RMSE vs the ODE reference does not apply: compare the distribution columns"])
        else:
            err = rmse(x, ref.solution)
            rows.append([label, info.nfe, err, *target.metrics(x), ""])
            series.setdefault(label, ([], []))
            series[label][0].append(info.nfe)
            series[label][1].append(err)
        if target.images is not None:
            grids.setdefault(label, {})[info.nfe] = target.images(x)
    out.mkdir(parents=True, exist_ok=True)
    headers = ["solver", "NFE", "RMSE vs reference", *target.headers, "note"]
    table = markdown_table(headers, rows)
    plot = plot_error_vs_nfe(series, out / "error_vs_nfe.png", title=title)
    figures = [f"![error vs NFE]({plot.name})"]
    if grids:
        grid = plot_image_grid(grids, out / "samples.png", title=f"{title}: the same 16 noises", reference=target.images(ref.solution))
        figures.append(f"![samples per solver and NFE]({grid.name})")
    reference_line = (
        f"Batch {x_T.shape[0]}, seed {seed}. Reference: {ref.method} probability-flow solve from the same noise; its change "
        f"from a coarser solve (100x the tolerance, or half the NFE) is {ref.max_abs_change:.2e} max abs, {ref.rms_change:.2e} RMS."
    )
    text = "\n".join([
        f"# {title}", "", *target.notes, reference_line, f"Machine: {_machine()}; fewstep {__version__}.", "",
        table, "", *figures, "",
    ])
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"headers": headers, "rows": rows}, indent=1, default=str))
    return table


def _use_zoo(args: argparse.Namespace) -> bool:
    if args.model and args.oracle:
        raise ArgumentError("give --model (a bundled network) or --oracle (an exact oracle), not both")
    if not args.model and not args.oracle:
        args.model, args.oracle = (DEMO_MODEL, None) if args.command == "demo" else (None, "gmm-d64")
    return bool(args.model)


def _target(args: argparse.Namespace) -> Target:
    if _use_zoo(args):
        return zoo_target(args.model, args.batch, args.seed)
    return oracle_target(args.oracle, args.noise_schedule, args.batch, args.seed)


def _run_compare(args: argparse.Namespace, solvers: list[tuple[str | SolverSchedule, dict[str, object]]], nfes: Sequence[int], title: str) -> int:
    out = Path(args.out)
    target = _target(args)
    table = compare(target=target, solvers=solvers, nfes=nfes, seed=args.seed, out=out, title=f"{title}: {target.label}", spacing=args.spacing)
    print(table)
    print(f"\nreport written to {out / 'report.md'} (plot: {out / 'error_vs_nfe.png'})")
    return 0


DEMO_SOLVERS = ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "deis", "heun"]
DEMO_MODEL = "digits-vp-eps"


def cmd_demo(args: argparse.Namespace) -> int:
    solvers = [parse_solver_arg(s) for s in args.solvers]
    return _run_compare(args, solvers, [5, 10, 20, 50], "fewstep demo")


def with_eta(solvers: list[tuple[str | SolverSchedule | None, dict[str, object]]], eta: float | None) -> list[tuple[str | SolverSchedule | None, dict[str, object]]]:
    """``--eta``: the noise parameter of every named preset that has one (an ``eta=`` given with the
    preset name wins); an error when none of them has one."""
    if eta is None:
        return solvers
    takers = [name for name, _ in solvers if isinstance(name, str) and "eta" in preset_options(name)]
    if not takers:
        with_eta_option = [n for n in preset_names() if "eta" in preset_options(n)]
        raise ArgumentError(f"--eta applies to presets with an eta option ({', '.join(with_eta_option)}); none was given")
    return [(name, {"eta": eta, **opts} if name in takers else opts) for name, opts in solvers]


def parallel_setting(args: argparse.Namespace) -> ParallelOptions | bool:
    """``--parallel`` with ``--window``, ``--tol``, ``--accelerate`` (defaults: :class:`fewstep.ParallelOptions`);
    ``False`` without ``--parallel`` (then those flags are an error)."""
    flags = {k: getattr(args, k) for k in ("window", "tol", "accelerate") if getattr(args, k, None) is not None}
    if not args.parallel:
        if flags:
            raise ArgumentError("--window, --tol and --accelerate apply with --parallel")
        return False
    return replace(ParallelOptions(), **flags)


#: the accelerations `bench --parallel` compares, with their column labels
_SCHEMES = {"picard": "Picard", "taa": "Anderson", "secant": "secant"}


def compare_parallel(
    *,
    target: Target,
    solvers: Sequence[tuple[str | SolverSchedule | None, dict[str, object]]],
    nfes: Sequence[int],
    seed: int,
    out: Path,
    title: str,
    options: ParallelOptions,
    spacing: str | None = None,
) -> str:
    """Sequential vs parallel-in-time sampling, side by side in one run: per solver and NFE the
    sequential model calls and wall time, then for plain Picard and for Anderson acceleration the
    rounds (sequential batched model calls), model evaluations per sample, wall time and the RMS
    difference from the sequential samples; writes report.md and results.json."""
    model, x_T = target.model, target.x_T
    jobs = [((s, o), n) for s, o in solvers for n in (nfes if not isinstance(s, SolverSchedule) else [s.nfe])]
    rows = []
    for (solver, opts0), n in jobs:
        opts = dict(opts0)
        if spacing and not isinstance(solver, SolverSchedule):
            opts.setdefault("spacing", spacing)
        nfe = None if isinstance(solver, SolverSchedule) else n
        try:
            t0 = time.perf_counter()
            seq, info = sample(model, x_T, solver, nfe=nfe, seed=seed, return_info=True, **opts)
            t_seq = time.perf_counter() - t0
            row: list[object] = [_label(solver, opts0), info.nfe, info.calls, round(t_seq, 3)]
            for acc in _SCHEMES:
                t0 = time.perf_counter()
                par, pinfo = sample(model, x_T, solver, nfe=nfe, seed=seed, return_info=True, parallel=replace(options, accelerate=acc), **opts)
                t_par = time.perf_counter() - t0
                p = pinfo.extra["parallel"]
                row += [p.rounds, round(p.evaluations / max(1, p.sequential_evaluations), 2), round(t_par, 3), rmse(par, seq)]
        except FewstepError as exc:
            _log(f"{_label(solver, opts0)} at NFE {n} did not run: {exc}")
            rows.append([_label(solver, opts0), n, *["n/a"] * (2 + 4 * len(_SCHEMES))])
            continue
        rows.append(row)
    headers = ["solver", "NFE", "sequential rounds (model calls)", "sequential s",
               *[f"{_SCHEMES[acc]} {col}" for acc in _SCHEMES for col in ("rounds", "evals / NFE", "s", "RMS diff")]]
    table = markdown_table(headers, rows)
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join([
        f"# {title}", "", *target.notes,
        f"Batch {x_T.shape[0]}, seed {seed}. Parallel settings: window {options.window or 'all'}, tolerance {options.tol:g} "
        "(RMS change of each evaluation's input / its noise level), Anderson memory "
        f"{options.history}. A round is one batched model call (micro-batches aside); 'evals / NFE' is the model "
        "evaluations per sample over the sequential NFE; 'RMS diff' compares with the sequential samples. "
        f"Wall times on this machine ({_machine()}); fewstep {__version__}.", "", table, "",
    ])
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"headers": headers, "rows": rows, "options": asdict(options)}, indent=1, default=str))
    return table


def cmd_bench(args: argparse.Namespace) -> int:
    solvers = with_eta([parse_solver_arg(s) for s in args.solvers], args.eta)
    par = parallel_setting(args)
    if not isinstance(par, ParallelOptions):
        return _run_compare(args, solvers, args.nfe, "fewstep bench")
    out = Path(args.out)
    target = _target(args)
    table = compare_parallel(target=target, solvers=solvers, nfes=args.nfe, seed=args.seed, out=out, title=f"fewstep bench --parallel: {target.label}",
                             options=par, spacing=args.spacing)
    print(table)
    print(f"\nreport written to {out / 'report.md'}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    if _use_zoo(args):
        from . import zoo

        model = zoo.load(args.model)
        x_T = initial_noise(model.schedule, (args.batch, *model.sample_shape), args.seed)
    else:
        oracle = bundled_oracle(args.oracle)
        model = oracle.as_model(SCHEDULES[args.noise_schedule]())
        x_T = initial_noise(model.schedule, (args.batch, oracle.dim), args.seed)
    [(solver, opts)] = with_eta([parse_solver_arg(args.solver)], args.eta)
    if args.spacing and not isinstance(solver, SolverSchedule):
        opts.setdefault("spacing", args.spacing)
    par = parallel_setting(args)
    x, info = sample(model, x_T, solver, nfe=None if isinstance(solver, SolverSchedule) else args.nfe, progress=not args.parallel, return_info=True,
                     seed=args.seed, parallel=par, **opts)
    if isinstance(par, ParallelOptions):
        p = info.extra["parallel"]
        print(f"parallel ({par.accelerate}): {p.rounds} rounds of batched model calls (sequential: {p.sequential_evaluations}), {p.evaluations} "
              f"model evaluations per sample; evaluations accepted per round: {p.accepted}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import numpy as np

    np.save(out, model.to_images(x).to(torch.float64).numpy())
    print(f"{args.batch} samples with {info.plan.name} ({info.nfe} NFE) written to {out}")
    if args.save_schedule:
        info.plan.save(args.save_schedule)
        print(f"solver schedule written to {args.save_schedule}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Sharded, resumable generation (``fewstep.generate``); under ``torchrun`` each process takes its shards."""
    from .generate import generate

    model = _search_model(args)
    solver, opts = parse_solver_arg(args.solver)
    if args.spacing and not isinstance(solver, SolverSchedule):
        opts.setdefault("spacing", args.spacing)
    par = parallel_setting(args)
    info = generate(model, num=args.num, out=args.out, solver=solver, nfe=None if isinstance(solver, SolverSchedule) else args.nfe,
                    seed=args.seed, batch_size=args.batch, progress=True, parallel=par, **opts)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{info.num} samples in {info.shards} shards at {info.out}: {info.generated} generated, {info.reused} already complete, "
              f"{info.repaired} damaged and regenerated; {info.world_size} worker(s), {info.wall_s:.1f} s, "
              f"{info.samples_per_s:.1f} samples/s ({info.samples_per_s / info.world_size:.1f} per worker), "
              f"{info.model_evaluations} model evaluations")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Digits metrics of a generation folder (samples in the model space of the digits networks)."""
    from .generate import evaluate_folder

    print(json.dumps({"folder": str(args.folder), **evaluate_folder(args.folder)}, indent=1))
    return 0


def _search_model(args: argparse.Namespace) -> Model:
    if _use_zoo(args):
        from . import zoo

        return zoo.load(args.model)
    oracle = bundled_oracle(args.oracle)
    model = oracle.as_model(SCHEDULES[args.noise_schedule]())
    model.sample_shape = (oracle.dim,)
    model.identity = f"oracle:{args.oracle}|{args.noise_schedule}"
    return model


def cmd_search(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .schedule_search import search

    model = _search_model(args)
    out = Path(args.out)
    state = Path(args.state) if args.state else out.with_name(out.name + ".state.json")
    bar = tqdm(total=args.generations, desc=f"search {model.name} NFE {args.nfe}", unit="gen")

    def progress(g: int, entry: dict[str, object]) -> None:
        bar.n = g + 1
        bar.set_postfix(best=f"{entry['best']:.4g}", evals=entry["evaluations"])
        bar.refresh()

    try:
        plan, report = search(model, args.nfe, n_calibration=args.calibration, n_heldout=args.heldout, noise_seed=args.noise_seed,
                              seed=args.seed, generations=args.generations, refine_generations=args.refine_generations,
                              population=args.population, offspring=args.offspring, cache_dir=args.cache_dir, state=state,
                              reference_nfe=args.reference_nfe, on_generation=progress, log=_log, return_report=True)
    finally:
        bar.close()
    plan.save(out)
    meta = plan.meta["search"]
    base = meta["baseline"] or {}
    label = " ".join(str(v) for v in (base.get("preset"), base.get("options") or "") if v != "")
    rows = [["best preset at its best grid", f"{label} ({base.get('spacing')})",
             base.get("calibration_error"), base.get("heldout_error")],
            ["searched", plan.name, meta["calibration"]["error"], meta["heldout"]["error"]]]
    print(markdown_table(["", "solver", f"calibration error ({meta['calibration']['noises']} noises)", f"held-out error ({meta['heldout']['noises']} noises)"], rows))
    ratio = meta["heldout"]["error"] / base["heldout_error"] if base.get("heldout_error") else float("nan")
    print(f"\nheld-out ratio searched / best preset: {ratio:.3f}; {meta['budget']['model_evaluations']} model evaluations, "
          f"{report.wall_s:.0f} s of search" + (f" (resumed at generation {report.resumed_from})" if report.resumed_from else ""))
    print(f"schedule written to {out} (state: {state})")
    return 0


def parallel_arguments(sp: argparse.ArgumentParser, what: str) -> None:
    base = ParallelOptions()
    sp.add_argument("--parallel", action="store_true", help=what)
    sp.add_argument("--window", type=int, default=None, help=f"with --parallel: evaluations per round (default: {base.window or 'all'})")
    sp.add_argument("--tol", type=float, default=None, help=f"with --parallel: tolerance on each evaluation's input change / sigma (default {base.tol:g})")
    sp.add_argument("--accelerate", default=None, choices=ACCELERATIONS, help=f"with --parallel (sample): {' or '.join(ACCELERATIONS)} (default {base.accelerate})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fewstep", description="Fast training-free sampling for diffusion and flow models.")
    p.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, batch: int) -> None:
        sp.add_argument("--model", default=None, help=f"bundled trained network (fewstep.zoo; default for demo: {DEMO_MODEL})")
        sp.add_argument("--oracle", default=None, choices=sorted(ORACLES), help="bundled exact oracle model (default for bench and sample: gmm-d64)")
        sp.add_argument("--noise-schedule", default="vp-linear", choices=sorted(SCHEDULES), help="noise schedule of an oracle")
        sp.add_argument("--schedule", default=None, metavar="FILE.json",
                        help="a solver schedule file (e.g. from `fewstep search`) to run; a noise-schedule name here is "
                        "read as --noise-schedule (fewstep 0.1.0 spelling)")
        sp.add_argument("--batch", type=int, default=batch, help="number of samples")
        sp.add_argument("--seed", type=int, default=0, help="seed of the initial noise and of a stochastic solver's Brownian noise (sample k is the same at any --batch)")
        sp.add_argument("--spacing", default=None, choices=sorted(SPACINGS), help="time grid (default: the preset's)")

    d = sub.add_parser("demo", help="compare solvers at NFE 5/10/20/50 on a bundled model (or oracle); write a report")
    common(d, 256)
    d.add_argument("--solvers", nargs="+", default=DEMO_SOLVERS, help="presets to compare")
    d.add_argument("--out", default="reports/demo", help="report folder")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="error vs NFE table and plot for chosen presets or schedule files")
    common(b, 256)
    b.add_argument("--solvers", nargs="+", default=["ddim", "dpmpp_2m", "unipc"], help=f"preset names ({', '.join(preset_names())}), optionally with options as name:key=value,key=value, or schedule .json files")
    b.add_argument("--nfe", nargs="+", type=int, default=[5, 6, 8, 10, 15, 20, 50])
    b.add_argument("--out", default="reports/bench")
    b.add_argument("--eta", type=float, default=None, help="noise parameter of the stochastic presets given (those with an eta option); --seed keys their noise")
    parallel_arguments(b, "compare sequential sampling with parallel-in-time sampling (Picard and Anderson) instead of the error table")
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("sample", help="draw samples with a preset or a schedule file; save them (in the data's own scale) as .npy")
    common(s, 16)
    s.add_argument("--solver", default="default", help="'default' (the measured default for the model's schedule), a preset name (name:key=value,... for options) or a schedule .json file")
    s.add_argument("--nfe", type=int, default=10)
    s.add_argument("--out", default="reports/samples.npy")
    s.add_argument("--save-schedule", default=None, help="also write the solver schedule used as JSON")
    s.add_argument("--eta", type=float, default=None, help="noise parameter of a stochastic preset (one with an eta option); --seed keys its noise")
    parallel_arguments(s, "parallel-in-time sampling (rounds of one batched model call over a window of steps)")
    s.set_defaults(func=cmd_sample)

    gp = sub.add_parser("generate", help="generate samples 0..num-1 as resumable safetensors shards (torchrun: one process per worker)")
    common(gp, 256)
    gp.add_argument("--solver", default="default", help="as for sample")
    gp.add_argument("--nfe", type=int, default=10)
    gp.add_argument("--num-samples", "--num", dest="num", type=int, required=True,
                    help="number of samples (under torchrun write --num-samples: torchrun reads --num as its own --numa-binding)")
    gp.add_argument("--out", required=True, help="the folder of shards and manifest (re-running the same command resumes)")
    parallel_arguments(gp, "each shard by parallel-in-time sampling (the same samples within the tolerance)")
    gp.set_defaults(func=cmd_generate)

    ev = sub.add_parser("evaluate", help="digits metrics (feature / pixel Frechet distance, confidence) of a generation folder of a digits network")
    ev.add_argument("folder")
    ev.add_argument("--model", default=None, help="the digits network that generated it (informational; the metrics use the bundled classifier)")
    ev.set_defaults(func=cmd_evaluate)

    q = sub.add_parser("search", help="search a solver schedule (time grid and per-step strategies) for a model and NFE; resumable")
    common(q, 256)
    q.add_argument("--nfe", type=int, required=True)
    q.add_argument("--out", required=True, help="the schedule file to write (JSON); its state goes to OUT.state.json unless --state")
    q.add_argument("--state", default=None, help="search state file: re-running the same command resumes from it")
    q.add_argument("--calibration", type=int, default=256, help="calibration noises")
    q.add_argument("--heldout", type=int, default=256, help="held-out noises (reported, never searched on)")
    q.add_argument("--noise-seed", type=int, default=0, help="seed of the calibration and held-out noises")
    add_budget_arguments(q)
    q.add_argument("--reference-nfe", type=int, default=200)
    q.add_argument("--cache-dir", default=None, help="where reference solutions are cached (default: $FEWSTEP_CACHE or ~/.cache/fewstep)")
    q.set_defaults(func=cmd_search)
    return p


def _schedule_file_argument(args: argparse.Namespace) -> None:
    """``--schedule FILE.json`` runs a solver schedule file (sample: instead of ``--solver``; bench: as
    one more row); ``--schedule NAME`` with a noise-schedule name keeps its 0.1.0 meaning."""
    value = getattr(args, "schedule", None)
    if value is None:
        return
    if value in SCHEDULES and not Path(value).is_file():
        args.noise_schedule = value
        return
    if args.command == "sample":
        args.solver = value
    elif args.command in ("bench", "demo"):
        args.solvers = [*args.solvers, value]
    else:
        raise ArgumentError(f"--schedule {value!r}: `fewstep {args.command}` takes no solver schedule file")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _schedule_file_argument(args)
        return int(args.func(args))
    except (FewstepError, OSError) as exc:
        print(f"fewstep: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

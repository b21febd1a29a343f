"""Command line: ``fewstep demo | bench | sample | generate | evaluate | search`` (docs/cli.md)."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

import torch

from ._version import __version__
from .errors import ArgumentError, FewstepError
from .metrics import frechet_distance, likelihood_gap, rmse
from .noise import initial_noise
from .oracle import ORACLES, bundled_oracle
from .reference import ReferenceCheck, check_fine_reference, check_reference
from .models import Model
from .parallel import ACCELERATIONS, ParallelOptions
from .report import IMAGE_SUFFIXES, images_of, markdown_table, plot_error_vs_nfe, plot_image_grid, unit_images, write_image_grid
from .sample import sample
from .schedule_search.engine import add_budget_arguments
from .schedules import EDM, CosineVP, DiscreteVP, FlowMatching, LinearVP, NoiseSchedule
from .solvers.plan import SolverSchedule
from .solvers.presets import preset, preset_names, preset_options
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


#: an NFE at which every preset can be built: options that fail here are wrong, not too few steps
_VALIDATION_NFE = 100


def validate_solvers(solvers: Sequence[tuple[str | SolverSchedule | None, dict[str, object]]], nfes: Sequence[int],
                     schedule: NoiseSchedule, spacing: str | None = None) -> None:
    """Check every solver argument before any model call: a preset's name, its option names and
    values (the plan is built at ``max(nfes, 100)``, so only the NFE itself can still make a run
    ``n/a``), and that a schedule file was made for ``schedule``. An :class:`ArgumentError` names
    the bad argument."""
    for solver, options in solvers:
        if solver is None:
            continue
        if isinstance(solver, SolverSchedule):
            try:
                solver.check_schedule(schedule)
            except FewstepError as exc:
                raise ArgumentError(str(exc)) from None
            continue
        label = _label(solver, options)
        if solver not in preset_names():
            raise ArgumentError(f"unknown solver {label!r}: give a preset ({', '.join(preset_names())}), 'default' or a schedule .json file")
        unknown = sorted(set(options) - set(preset_options(solver)))
        if unknown:
            raise ArgumentError(f"solver {label!r}: unknown option(s) {unknown}; valid options: {preset_options(solver)}")
        opts = dict(options)
        if spacing:
            opts.setdefault("spacing", spacing)
        try:
            preset(solver, max([*nfes, _VALIDATION_NFE]), schedule, **opts)
        except (ValueError, TypeError) as exc:  # FewstepError is a ValueError
            raise ArgumentError(f"solver {label!r}: {exc}") from None


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


def oracle_target(name: str, schedule_name: str, batch: int, seed: int, schedule: NoiseSchedule | None = None) -> Target:
    """An exact oracle on a named noise schedule: RMSE, exact likelihood gap, Fréchet distance to data."""
    oracle = bundled_oracle(name)
    sched: NoiseSchedule = schedule if schedule is not None else SCHEDULES[schedule_name]()
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


def digits_floor(ev: Any, n: int) -> dict[str, Any]:
    """The digits metrics of ``n`` real train digits (all of them when ``n`` exceeds the train split)
    against the held-out digits: Fréchet distances are biased upwards at small sample sizes, so
    this is the floor for ``n`` generated samples. ``ev``: a :class:`fewstep.zoo.evaluate.DigitsEvaluator`."""
    m = max(2, min(int(n), int(ev.split.train_x.shape[0])))
    return {"samples": m, **ev.evaluate(ev.split.train_x[:m])}


def zoo_target(name: str, batch: int, seed: int, reference_nfe: int = 300, model: Model | None = None) -> Target:
    """A bundled trained network: RMSE against a very fine solve, and Fréchet distances /
    classifier confidence against held-out digits."""
    from . import zoo
    from .zoo.evaluate import DigitsEvaluator

    model = model if model is not None else zoo.load(name)
    ev = DigitsEvaluator()
    base = ev.baseline()
    floor = digits_floor(ev, batch)
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
        label = key = _label(solver, options)  # the table names what ran; the plot's line and the grid's row keep one key per argument
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
            series.setdefault(key, ([], []))
            series[key][0].append(info.nfe)
            series[key][1].append(err)
        if target.images is not None:
            grids.setdefault(key, {})[info.nfe] = target.images(x)
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


def _target(args: argparse.Namespace, solvers: Sequence[tuple[str | SolverSchedule | None, dict[str, object]]], nfes: Sequence[int]) -> Target:
    """Check every solver against the model's noise schedule (no model call yet), then build the
    comparison target (reference data, metrics)."""
    if _use_zoo(args):
        from . import zoo

        model = zoo.load(args.model)
        validate_solvers(solvers, nfes, model.schedule, args.spacing)
        return zoo_target(args.model, args.batch, args.seed, model=model)
    sched = SCHEDULES[args.noise_schedule]()
    validate_solvers(solvers, nfes, sched, args.spacing)
    return oracle_target(args.oracle, args.noise_schedule, args.batch, args.seed, schedule=sched)


def _run_compare(args: argparse.Namespace, solvers: list[tuple[str | SolverSchedule, dict[str, object]]], nfes: Sequence[int], title: str) -> int:
    out = Path(args.out)
    target = _target(args, solvers, nfes)
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
    target = _target(args, solvers, args.nfe)
    table = compare_parallel(target=target, solvers=solvers, nfes=args.nfe, seed=args.seed, out=out, title=f"fewstep bench --parallel: {target.label}",
                             options=par, spacing=args.spacing)
    print(table)
    print(f"\nreport written to {out / 'report.md'}")
    return 0


#: what ``--out`` of ``sample`` writes, by suffix: a picture, or the samples themselves
SAMPLE_SUFFIXES = (*IMAGE_SUFFIXES, ".npy", ".safetensors")


def output_kind(path: str | Path, flag: str = "--out", allowed: Sequence[str] = SAMPLE_SUFFIXES) -> str:
    """``"image"``, ``"npy"`` or ``"safetensors"`` by the file's suffix (any case); another suffix is an
    :class:`ArgumentError` naming the flag and the suffixes it takes."""
    suffix = Path(path).suffix.lower()
    if suffix not in allowed:
        pictures = [s for s in allowed if s in IMAGE_SUFFIXES]
        data = [s for s in allowed if s not in IMAGE_SUFFIXES]
        listed = "; ".join([*([f"{', '.join(pictures)} (a picture: a grid of the samples)"] if pictures else []),
                            *([f"{', '.join(data)} (the samples in model space)"] if data else [])])
        raise ArgumentError(f"{flag} {str(path)!r}: the suffix {suffix or '(none)'!r} is not one of {listed}")
    return "image" if suffix in IMAGE_SUFFIXES else suffix[1:]


def save_samples(x: torch.Tensor, path: str | Path) -> Path:
    """Samples in model space, shaped (n, *sample_shape), to ``.npy`` or ``.safetensors`` (tensor
    ``samples`` with ``indices`` 0..n-1 and the samples' SHA-256, the layout of a generation shard);
    written atomically, to exactly ``path``."""
    from .atomic import write_atomic
    from .sample_folder import FORMAT, digest

    x = x.detach().cpu().contiguous()
    if output_kind(path) == "npy":
        import numpy as np

        buf = io.BytesIO()
        np.save(buf, x.numpy())
        return write_atomic(path, buf.getvalue())
    from safetensors.torch import save

    meta = {"fewstep": json.dumps({"format": FORMAT, "sha256": digest(x)})}
    return write_atomic(path, save({"samples": x, "indices": torch.arange(x.shape[0], dtype=torch.int64)}, metadata=meta))


def load_sample_file(path: str | Path) -> torch.Tensor:
    """The samples of a ``fewstep sample`` output file (``.npy`` or ``.safetensors``)."""
    path = Path(path)
    kind = output_kind(path, "file", (".npy", ".safetensors"))
    try:
        if kind == "npy":
            import numpy as np

            return torch.from_numpy(np.load(path, allow_pickle=False))
        from safetensors.torch import load_file

        return load_file(str(path))["samples"]
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise FewstepError(f"cannot read samples from {path}: {exc}") from None


def _grid_settings(args: argparse.Namespace, path: str | Path | None, flag: str) -> None:
    """Refuse a picture path of an unknown kind, and grid flags without a picture."""
    if path is not None:
        output_kind(path, flag, IMAGE_SUFFIXES)
    elif getattr(args, "grid_cols", None) is not None or getattr(args, "scale", None) is not None:
        raise ArgumentError(f"--grid-cols and --scale apply to a picture ({flag} FILE.png)")


def _drawable(model: Model, shape: Sequence[int], what: str) -> None:
    """Refuse a picture of samples that are not images, naming the flag."""
    try:
        images_of(model, shape=shape)
    except ArgumentError as exc:
        raise ArgumentError(f"{what}: {exc}") from None


def _write_grid(images: Any, path: str | Path, args: argparse.Namespace) -> str:
    write_image_grid(images, path, cols=args.grid_cols, scale=args.scale)
    cols = min(args.grid_cols or math.ceil(math.sqrt(len(images))), len(images))
    return f"a grid of {len(images)} samples ({-(-len(images) // cols)} x {cols})"


def _model_and_noise(args: argparse.Namespace) -> tuple[Model, torch.Tensor]:
    if _use_zoo(args):
        from . import zoo

        model = zoo.load(args.model)
        return model, initial_noise(model.schedule, (args.batch, *model.sample_shape), args.seed)
    oracle = bundled_oracle(args.oracle)
    model = oracle.as_model(SCHEDULES[args.noise_schedule]())
    return model, initial_noise(model.schedule, (args.batch, oracle.dim), args.seed)


def cmd_sample(args: argparse.Namespace) -> int:
    """Draw ``--batch`` samples; ``--out`` decides what is written by its suffix (checked, like the
    solver and the picture, before any model call)."""
    kind = output_kind(args.out)
    if kind != "image":
        _grid_settings(args, None, "--out")
    model, x_T = _model_and_noise(args)
    if kind == "image":
        _drawable(model, x_T.shape[1:], f"--out {args.out}")
    [(solver, opts)] = with_eta([parse_solver_arg(args.solver)], args.eta)
    if args.spacing and not isinstance(solver, SolverSchedule):
        opts.setdefault("spacing", args.spacing)
    nfe = None if isinstance(solver, SolverSchedule) else args.nfe
    validate_solvers([(solver, opts)], [nfe or 1], model.schedule)
    par = parallel_setting(args)
    x, info = sample(model, x_T, solver, nfe=nfe, progress=not args.parallel, return_info=True, seed=args.seed, parallel=par, **opts)
    if isinstance(par, ParallelOptions):
        p = info.extra["parallel"]
        print(f"parallel ({par.accelerate}): {p.rounds} rounds of batched model calls (sequential: {p.sequential_evaluations}), {p.evaluations} "
              f"model evaluations per sample; evaluations accepted per round: {p.accepted}")
    out = Path(args.out)
    if kind == "image":
        what = _write_grid(images_of(model, x), out, args)
    else:
        save_samples(x, out)
        what = f"{x.shape[0]} samples of shape {tuple(x.shape[1:])} in model space ({kind})"
    print(f"{x.shape[0]} samples with {info.plan.name} ({info.nfe} NFE): {what} written to {out}")
    if args.save_schedule:
        info.plan.save(args.save_schedule)
        print(f"solver schedule written to {args.save_schedule}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Sharded, resumable generation (``fewstep.generate``); under ``torchrun`` each process takes its shards."""
    from .generate import generate, load_samples

    _grid_settings(args, args.preview, "--preview")
    model = _search_model(args)
    if args.preview is not None:
        _drawable(model, model.sample_shape or (), f"--preview {args.preview}")
    solver, opts = parse_solver_arg(args.solver)
    if args.spacing and not isinstance(solver, SolverSchedule):
        opts.setdefault("spacing", args.spacing)
    nfe = None if isinstance(solver, SolverSchedule) else args.nfe
    validate_solvers([(solver, opts)], [nfe or 1], model.schedule)
    par = parallel_setting(args)
    info = generate(model, num=args.num, out=args.out, solver=solver, nfe=nfe, seed=args.seed, batch_size=args.batch, progress=True, parallel=par, **opts)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{info.num} samples in {info.shards} shards at {info.out}: {info.generated} generated, {info.reused} already complete, "
              f"{info.repaired} damaged and regenerated; {info.world_size} worker(s), {info.wall_s:.1f} s, "
              f"{info.samples_per_s:.1f} samples/s ({info.samples_per_s / info.world_size:.1f} per worker), "
              f"{info.model_evaluations} model evaluations")
        if args.preview is not None:
            first = load_samples(args.out, mmap=True)[: args.grid_samples]
            print(f"preview: {_write_grid(images_of(model, first), args.preview, args)} (samples 0..{first.shape[0] - 1}) written to {args.preview}")
    return 0


def _digit_images(x: torch.Tensor) -> Any:
    """Digits in model space, (n, 1, 8, 8) or flat (n, 64), as images in [0, 1]."""
    if x.ndim == 2 and x.shape[1] == 64:
        x = x.reshape(-1, 1, 8, 8)
    return unit_images(x)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Digits metrics of a generation folder or of a ``fewstep sample`` output file (samples in the
    model space of the digits networks), beside those of as many real train digits (the floor)."""
    from .sample_folder import MANIFEST, evaluate_folder, load_samples
    from .zoo.evaluate import DigitsEvaluator

    _grid_settings(args, args.grid, "--grid")
    path = Path(args.path)
    if not path.exists():
        raise ArgumentError(f"{path}: no such generation folder or sample file")
    if args.model is not None:
        from . import zoo

        zoo.card(args.model)  # a bundled network's name (an error otherwise)
    ev = DigitsEvaluator()
    if path.is_dir():
        if not (path / MANIFEST).is_file():
            raise ArgumentError(f"{path} is a folder without {MANIFEST}: give a generation folder (fewstep generate) or a sample file (.npy, .safetensors)")
        head: dict[str, Any] = {"folder": str(path)}
        metrics = evaluate_folder(path)
        x = None
    else:
        x = load_sample_file(path)
        if not ((x.ndim == 4 and tuple(x.shape[1:]) == (1, 8, 8)) or (x.ndim == 2 and x.shape[1] == 64)) or x.shape[0] < 2:
            raise ArgumentError(f"{path}: expected at least 2 digits in model space shaped (n, 1, 8, 8) or (n, 64), got {tuple(x.shape)} "
                                "(`fewstep sample` before 0.2.0 wrote pixel values shaped (n, 8, 8): sample again)")
        head = {"file": str(path)}
        got = ev.evaluate(x)
        metrics = {"samples": int(x.shape[0]), **{k: got[k] for k in ("fd_features", "fd_pixels", "confidence")}}
    floor = digits_floor(ev, metrics["samples"])
    real = {k: floor[k] for k in ("samples", "fd_features", "fd_pixels", "confidence")}
    if args.model is not None:
        head["model"] = args.model
    print(json.dumps({**head, **metrics, "real_digits": real}, indent=1))
    _log(f"feature Fréchet distance {metrics['fd_features']:.4g} for {metrics['samples']} samples; {real['samples']} real train digits score "
         f"{real['fd_features']:.4g} (the floor at this sample count: 'real_digits')")
    if args.grid is not None:
        first = (load_samples(path, mmap=True) if x is None else x)[: args.grid_samples]
        _log(f"grid: {_write_grid(_digit_images(first), args.grid, args)} written to {args.grid}")
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


#: search settings (``fewstep.schedule_search.SearchConfig``) by their command-line flags
_SEARCH_FLAGS = {"refine_generations": "--refine-generations", "generations": "--generations", "population": "--population",
                 "offspring": "--offspring", "nfe": "--nfe", "reference_nfe": "--reference-nfe"}


def check_search_settings(args: argparse.Namespace) -> None:
    """The search settings checked as :class:`fewstep.schedule_search.SearchConfig` checks them, before
    any model call, with the command-line flags named in the message."""
    from .schedule_search import SearchConfig

    from .schedule_search import resolve_budget
    from .schedule_search.budget import plan_budget

    given = {k: getattr(args, k) for k in ("population", "offspring", "generations", "refine_generations") if getattr(args, k) is not None}
    try:
        SearchConfig(nfe=args.nfe, seed=args.seed, **given)
        budget = resolve_budget(args.budget, args.nfe)
        if budget is not None:
            if args.refine_generations is not None:
                raise ArgumentError("refine_generations applies to the long search (--budget none): a budgeted search refines the grid "
                                    "by pattern search and polishes it with the last 45 % of its budget")
            plan_budget(budget, args.nfe, n_calibration=args.calibration, n_heldout=args.heldout, reference_nfe=args.reference_nfe)
    except ArgumentError as exc:
        pattern = re.compile(r"\b(" + "|".join(_SEARCH_FLAGS) + r")\b")
        raise ArgumentError(pattern.sub(lambda m: _SEARCH_FLAGS[m.group(1)], str(exc))) from None


def cmd_search(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from . import schedule_search
    from .schedule_search import SearchConfig

    check_search_settings(args)
    model = _search_model(args)
    out = Path(args.out)
    state = Path(args.state) if args.state else out.with_name(out.name + ".state.json")
    bar = tqdm(total=args.generations or (None if args.budget is not None else SearchConfig.generations), desc=f"search {model.name} NFE {args.nfe}",
               unit="gen")

    def progress(g: int, entry: dict[str, object]) -> None:
        bar.n = g + 1
        bar.set_postfix(best=f"{entry['best']:.4g}", evals=entry["evaluations"])
        bar.refresh()

    try:
        plan, report = schedule_search.search(
            model, args.nfe, budget=args.budget, n_calibration=args.calibration, n_heldout=args.heldout, noise_seed=args.noise_seed, seed=args.seed,
            generations=args.generations, refine_generations=args.refine_generations, population=args.population,
            offspring=args.offspring, cache_dir=args.cache_dir, state=state, reference_nfe=args.reference_nfe, on_generation=progress,
            log=_log, return_report=True)
    except KeyboardInterrupt:
        bar.close()
        if state.is_file():
            _log(f"\ninterrupted: state saved in {state}; run the same command to resume")
        else:
            _log(f"\ninterrupted before the first generation finished (no state in {state} yet); run the same command to start again "
                 "(finished reference solves are cached)")
        return 130
    finally:
        bar.close()
    plan.save(out)
    meta = plan.meta["search"]
    base = meta["baseline"] or {}
    label = " ".join(str(v) for v in (base.get("preset"), base.get("options") or "") if v != "")
    rows = [["best preset at its best grid", f"{label} ({base.get('spacing')})",
             base.get("calibration_error"), base.get("heldout_error")],
            ["searched", f"{plan.name} ({meta['heldout'].get('chosen', 'search')} finalist)", meta["calibration"]["error"], meta["heldout"]["error"]]]
    print(markdown_table(["", "solver", f"calibration error ({meta['calibration']['noises']} noises)", f"held-out error ({meta['heldout']['noises']} noises)"], rows))
    ratio = meta["heldout"]["error"] / base["heldout_error"] if base.get("heldout_error") else float("nan")
    print(f"\nheld-out ratio searched / best preset: {ratio:.3f}; {meta['budget']['model_evaluations']} model evaluations, "
          f"{report.wall_s:.0f} s of search" + (f" (resumed at generation {report.resumed_from})" if report.resumed_from else ""))
    print(f"schedule written to {out} (state: {state})")
    return 0


def parallel_arguments(sp: argparse.ArgumentParser, what: str, accelerate: bool = True) -> None:
    """--parallel with --window, --tol and (where one acceleration is chosen) --accelerate."""
    base = ParallelOptions()
    sp.add_argument("--parallel", action="store_true", help=what)
    sp.add_argument("--window", type=at_least(1), default=None, help=f"with --parallel: evaluations per round (default: {base.window or 'all'})")
    sp.add_argument("--tol", type=float, default=None, help=f"with --parallel: tolerance on each evaluation's input change / sigma (default {base.tol:g})")
    if accelerate:
        sp.add_argument("--accelerate", default=None, choices=ACCELERATIONS, help=f"with --parallel: {' or '.join(ACCELERATIONS)} (default {base.accelerate})")


def at_least(lo: int) -> Callable[[str], int]:
    """An argparse type: an integer ``>= lo`` (a count), else a usage error naming the flag."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {value}")
        return value

    parse.__name__ = f"integer >= {lo}"
    return parse


#: the bundled networks (fewstep.zoo.list() less the classifier)
_ZOO_MODELS = ("digits-vp-eps", "digits-flow", "digits-edm")


def model_arguments(sp: argparse.ArgumentParser, oracle_default: str = "gmm-d64") -> None:
    """What to sample from: a bundled network or an exact oracle on a noise schedule."""
    sp.add_argument("--model", default=None, help=f"a bundled trained network (fewstep.zoo: {', '.join(_ZOO_MODELS)})")
    sp.add_argument("--oracle", default=None, choices=sorted(ORACLES), help=f"a bundled exact oracle model (the default without --model: {oracle_default})")
    sp.add_argument("--noise-schedule", default="vp-linear", choices=sorted(SCHEDULES), help="the noise schedule of an oracle (default vp-linear)")


def sampling_arguments(sp: argparse.ArgumentParser, *, batch: int, batch_help: str, schedule_help: str, min_batch: int = 1) -> None:
    """The initial noise and the solver's grid: --schedule, --batch, --seed, --spacing."""
    sp.add_argument("--schedule", default=None, metavar="FILE.json",
                    help=f"{schedule_help}; a noise-schedule name here is read as --noise-schedule (fewstep 0.1.0 spelling)")
    sp.add_argument("--batch", type=at_least(min_batch), default=batch, help=f"{batch_help} (default {batch})")
    sp.add_argument("--seed", type=int, default=0,
                    help="seed of the initial noise and of a stochastic solver's Brownian noise (sample k is the same at any --batch)")
    sp.add_argument("--spacing", default=None, choices=sorted(SPACINGS), help="time grid of every preset run (default: each preset's own)")


def picture_arguments(sp: argparse.ArgumentParser, *, count: bool) -> None:
    """How a grid of samples is drawn (a .png / .jpg output)."""
    sp.add_argument("--grid-cols", type=at_least(1), default=None, help="columns of the picture's grid (default: ceil(sqrt(samples)))")
    sp.add_argument("--scale", type=at_least(1), default=None,
                    help="nearest-neighbour upscaling of each sample in the picture (default: to at least 64 pixels, 8 for 8x8 digits)")
    if count:
        sp.add_argument("--grid-samples", type=at_least(1), default=16, help="how many of the first samples the picture shows (default 16)")



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fewstep", description="Fast training-free sampling for diffusion and flow models (docs/cli.md).")
    p.add_argument("--version", action="version", version=f"fewstep {__version__}", help="print fewstep's version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="{demo,bench,sample,generate,evaluate,search}")
    compared = "samples compared (initial noises of the reference and of every solver)"

    d = sub.add_parser("demo", help="compare solvers at NFE 5/10/20/50 on a bundled model (or oracle); write a report")
    model_arguments(d, oracle_default=f"none: demo runs the network {DEMO_MODEL}")
    sampling_arguments(d, batch=256, batch_help=compared, schedule_help="a solver schedule file to compare as one more row", min_batch=2)
    d.add_argument("--solvers", nargs="+", default=DEMO_SOLVERS, help=f"solvers to compare (default: {' '.join(DEMO_SOLVERS)}); as for bench")
    d.add_argument("--out", default="reports/demo", help="the report folder (default reports/demo)")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="error vs NFE table and plot for chosen presets or schedule files")
    model_arguments(b)
    sampling_arguments(b, batch=256, batch_help=compared, schedule_help="a solver schedule file to compare as one more row", min_batch=2)
    b.add_argument("--solvers", nargs="+", default=["ddim", "dpmpp_2m", "unipc"],
                   help=f"preset names ({', '.join(preset_names())}), optionally with options as name:key=value,key=value, 'default', or "
                   "schedule .json files (default: ddim dpmpp_2m unipc); every one is checked before any model call")
    b.add_argument("--nfe", nargs="+", type=at_least(1), default=[5, 6, 8, 10, 15, 20, 50], help="the NFEs to run every preset at (default 5 6 8 10 15 20 50)")
    b.add_argument("--out", default="reports/bench", help="the report folder (default reports/bench)")
    b.add_argument("--eta", type=float, default=None, help="noise parameter of the stochastic presets given (those with an eta option); --seed keys their noise")
    parallel_arguments(b, "compare sequential sampling with parallel-in-time sampling (Picard, Anderson, secant) instead of the error table",
                       accelerate=False)
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("sample", help="draw samples with a solver; write them as a picture (.png, .jpg) or in model space (.npy, .safetensors)")
    model_arguments(s)
    sampling_arguments(s, batch=16, batch_help="number of samples", schedule_help="a solver schedule file to run (instead of --solver)")
    s.add_argument("--solver", default="default", help="'default' (the measured default for the model), a preset name (name:key=value,... for options) or a schedule .json file")
    s.add_argument("--nfe", type=at_least(1), default=10, help="model evaluations per sample for a preset or 'default' (a schedule file has its own; default 10)")
    s.add_argument("--out", default="reports/samples.npy",
                   help="the file to write, by its suffix: .png / .jpg / .jpeg a grid of the samples as images; .npy / .safetensors the samples in "
                   "model space, shaped (n, *sample_shape) (default reports/samples.npy)")
    picture_arguments(s, count=False)
    s.add_argument("--save-schedule", default=None, metavar="FILE.json", help="also write the solver schedule used as JSON")
    s.add_argument("--eta", type=float, default=None, help="noise parameter of a stochastic preset (one with an eta option); --seed keys its noise")
    parallel_arguments(s, "parallel-in-time sampling (rounds of one batched model call over a window of steps)")
    s.set_defaults(func=cmd_sample)

    gp = sub.add_parser("generate", help="generate samples 0..num-1 as resumable safetensors shards (torchrun: one process per worker)")
    model_arguments(gp)
    sampling_arguments(gp, batch=256, batch_help="samples per shard, each shard one model batch (not the number of samples: see --num-samples)",
                       schedule_help="a solver schedule file to run (instead of --solver)")
    gp.add_argument("--solver", default="default", help="as for sample: 'default', a preset (name:key=value,...) or a schedule .json file")
    gp.add_argument("--nfe", type=at_least(1), default=10, help="model evaluations per sample for a preset or 'default' (default 10)")
    gp.add_argument("--num-samples", "--num", dest="num", type=at_least(1), required=True,
                    help="number of samples (under torchrun write --num-samples: torchrun reads --num as its own --numa-binding)")
    gp.add_argument("--out", required=True, help="the folder of shards and manifest (re-running the same command resumes)")
    gp.add_argument("--preview", default=None, metavar="FILE.png", help="also write a grid of the first samples as a picture (.png, .jpg)")
    picture_arguments(gp, count=True)
    parallel_arguments(gp, "each shard by parallel-in-time sampling (the same samples within the tolerance)")
    gp.set_defaults(func=cmd_generate)

    ev = sub.add_parser("evaluate", help="digits metrics (feature / pixel Frechet distance, confidence) of a generation folder or a sample file, "
                        "beside as many real digits")
    ev.add_argument("path", metavar="PATH", help="a generation folder (fewstep generate) or a file written by fewstep sample (.npy, .safetensors)")
    ev.add_argument("--model", default=None, help="the digits network that made the samples (checked to be a bundled network; recorded in the output)")
    ev.add_argument("--grid", default=None, metavar="FILE.png", help="also write a grid of the first samples as a picture (.png, .jpg)")
    picture_arguments(ev, count=True)
    ev.set_defaults(func=cmd_evaluate)

    q = sub.add_parser("search", help="search a solver schedule (time grid and per-step strategies) for a model and NFE; resumable")
    model_arguments(q)
    q.add_argument("--nfe", type=at_least(1), required=True, help="model evaluations per sample of the searched schedule")
    q.add_argument("--out", required=True, help="the schedule file to write (JSON); its state goes to OUT.state.json unless --state")
    q.add_argument("--state", default=None, help="search state file: re-running the same command resumes from it")
    q.add_argument("--calibration", type=at_least(2), default=None,
                   help="calibration noises: the error minimised is measured on them (default: what the budget buys, 8-48; long search 256)")
    q.add_argument("--heldout", type=at_least(2), default=None, help="held-out noises, reported, never searched on (default: as many as --calibration; long search 256)")
    q.add_argument("--noise-seed", type=int, default=0, help="seed of the calibration and held-out noises (default 0)")
    q.add_argument("--seed", type=int, default=0, help="seed of the search's random generator (default 0)")
    add_budget_arguments(q)
    q.add_argument("--reference-nfe", type=at_least(4), default=None, help="NFE of the reference solves (default max(48, 8 NFE); long search 200)")
    q.add_argument("--cache-dir", default=None, help="where reference solutions are cached (default: $FEWSTEP_CACHE or ~/.cache/fewstep)")
    q.set_defaults(func=cmd_search)
    return p


def _schedule_file_argument(args: argparse.Namespace) -> None:
    """``--schedule FILE.json`` runs a solver schedule file (sample, generate: instead of ``--solver``;
    bench, demo: as one more row); ``--schedule NAME`` with a noise-schedule name keeps its 0.1.0 meaning."""
    value = getattr(args, "schedule", None)
    if value is None:
        return
    if value in SCHEDULES and not Path(value).is_file():
        args.noise_schedule = value
        return
    if args.command in ("sample", "generate"):
        args.solver = value
    elif args.command in ("bench", "demo"):
        args.solvers = [*args.solvers, value]
    else:
        raise ArgumentError(f"--schedule {value!r}: `fewstep {args.command}` takes no solver schedule file")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0, 2 for a usage or input error, 130 for an interrupted search)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: a usage error (2), --help or --version (0)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        _schedule_file_argument(args)
        return int(args.func(args))
    except (FewstepError, OSError) as exc:
        print(f"fewstep: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

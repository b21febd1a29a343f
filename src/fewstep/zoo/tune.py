"""Search solver schedules for a bundled model and ship them with it (``fewstep.search``).

    python -m fewstep.zoo.tune digits-vp-eps --nfe 4 5 6 8 10

For each NFE: a resumable search (state under ``--state-dir``) on 256 calibration noises, checked on
``--heldout`` fresh noises; the result is written to ``weights/tuned/NAME-nfeN.json`` and listed in
the model's card (file, SHA-256, calibration and held-out errors, the best preset's), atomically.
``fewstep.sample(fewstep.zoo.load(NAME), x_T, nfe=N)`` then runs it.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from ..atomic import write_atomic
from . import WEIGHTS, card, load


def register(name: str, nfe: int, plan: Any, root: Path = WEIGHTS) -> Path:
    """Write a searched schedule next to the model and list it in the card."""
    folder = root / "tuned"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-nfe{nfe}.json"
    text = plan.to_json()
    write_atomic(path, text)
    with open(folder / ".card.lock", "w") as lock:  # tune runs of one model for several NFEs may finish together
        fcntl.flock(lock, fcntl.LOCK_EX)
        _list_in_card(name, nfe, text, path, plan, root)
    return path


def _list_in_card(name: str, nfe: int, text: str, path: Path, plan: Any, root: Path) -> None:
    info = card(name, root)
    meta = plan.meta.get("search", {})
    base = meta.get("baseline") or {}
    entry = {"file": f"tuned/{path.name}", "sha256": hashlib.sha256(text.encode()).hexdigest(),
             "calibration_error": meta.get("calibration", {}).get("error"), "heldout_error": meta.get("heldout", {}).get("error"),
             "heldout_noises": meta.get("heldout", {}).get("noises"),
             "best_preset": f"{base.get('preset')} {base.get('options') or ''} ({base.get('spacing')})".strip(),
             "best_preset_heldout_error": base.get("heldout_error"), "model_evaluations": meta.get("budget", {}).get("model_evaluations")}
    info.setdefault("tuned_schedules", {})[str(nfe)] = entry
    write_atomic(root / f"{name}.json", json.dumps(info, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    from ..schedule_search import search
    from ..schedule_search.engine import add_budget_arguments

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6, 8, 10])
    ap.add_argument("--calibration", type=int, default=256)
    ap.add_argument("--heldout", type=int, default=1000)
    add_budget_arguments(ap, default_budget=None)  # the shipped schedules come from the long search
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--state-dir", default=None, help="search states (default: the reference cache folder)")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    model = load(args.name)
    from ..schedule_search.objective import default_cache_dir

    state_dir = Path(args.state_dir) if args.state_dir else (Path(args.cache_dir) if args.cache_dir else default_cache_dir())
    for nfe in args.nfe:
        plan, report = search(model, nfe, budget=args.budget, n_calibration=args.calibration, n_heldout=args.heldout, seed=args.seed,
                              generations=args.generations, refine_generations=args.refine_generations,
                              population=args.population, offspring=args.offspring, cache_dir=args.cache_dir,
                              state=state_dir / f"tune-{args.name}-nfe{nfe}.state.json", return_report=True,
                              log=lambda m: print(m, file=sys.stderr, flush=True))
        path = register(args.name, nfe, plan)
        meta = plan.meta["search"]
        print(f"{args.name} NFE {nfe}: held-out {meta['heldout']['error']:.4g} vs best preset {meta['baseline']['heldout_error']:.4g} "
              f"({meta['heldout']['error'] / meta['baseline']['heldout_error']:.3f}x); {meta['budget']['model_evaluations']} model evaluations, "
              f"{report.wall_s:.0f} s -> {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

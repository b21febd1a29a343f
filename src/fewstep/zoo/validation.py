"""The validation zoo: trained networks for judging defaults and autotuning on models they were not
chosen on. They differ in what matters to a sampler -- architecture (residual MLP, UNet, DiT),
parameterisation (eps, v, x0, flow velocity, EDM denoiser), noise schedule (DDPM linear, scaled
linear, cosine, flow matching with shift 1 and 3, EDM), dimension and shape (flat 64-vectors, 8x8
digits, digits upsampled to 16x16 and 32x32) and training length (an under-trained and a
well-trained copy of one model) -- and are all trained on scikit-learn's digits by
:func:`fewstep.zoo.train.train`, seeded, on a CPU.

The bundled models (``fewstep.zoo.load``) stay what they are; these are for measurement:

    python -m fewstep.zoo.validation build [NAME ...] --out DIR [--threads 2]   # trains what DIR lacks
    python -m fewstep.zoo.validation list

``load(name, root)`` returns a :class:`fewstep.Model` (weights checked against the SHA-256 in the
card); a missing model is a :class:`~fewstep.ZooError` naming the command that trains it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import ZooError
from ..models import Model
from .train import DIGITS_RMS, DiffusionConfig, train

__all__ = ["VALIDATION_CONFIGS", "NAMES", "build", "load", "main"]

_T_DISCRETE = 1e-3  # time_scale of networks fed DiscreteVP times 0..999
_UNET8 = {"channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1}
_UNET16 = {"channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "image_size": 16}
_UNET32 = {"channels": 16, "channel_mult": [1, 2, 4], "num_res_blocks": 1, "image_size": 32}
_DIT16 = {"image_size": 16, "patch": 2, "width": 96, "depth": 4, "heads": 4}
_DIT32 = {"image_size": 32, "patch": 4, "width": 96, "depth": 4, "heads": 4}
_MLP = {"dim": 64, "width": 256, "depth": 3}
_FAST = {"batch_size": 64, "warmup_steps": 100, "ema_decay": 0.995}

#: name -> training configuration; every entry differs from its neighbours in at least one property
#: a sampler cares about (see the module docstring)
VALIDATION_CONFIGS: dict[str, DiffusionConfig] = {
    "val-mlp-eps-linear": DiffusionConfig("discrete_vp_linear", "eps", {**_MLP, "time_scale": _T_DISCRETE}, "VectorMLP", "flat64",
                                          steps=4000, **_FAST),
    "val-mlp-flow": DiffusionConfig("flow_matching", "flow", {**_MLP, "time_scale": 1.0}, "VectorMLP", "flat64", steps=4000, **_FAST),
    "val-unet8-eps-linear-short": DiffusionConfig("discrete_vp_linear", "eps", {**_UNET8, "time_scale": _T_DISCRETE}, "DigitsUNet",
                                                  "digits8", steps=300, **{**_FAST, "ema_decay": 0.98}),
    "val-unet8-eps-linear-long": DiffusionConfig("discrete_vp_linear", "eps", {**_UNET8, "time_scale": _T_DISCRETE}, "DigitsUNet",
                                                 "digits8", steps=3000, **_FAST),
    "val-unet16-v-cosine": DiffusionConfig("discrete_vp_cosine", "v", {**_UNET16, "time_scale": _T_DISCRETE}, "DigitsUNet", "digits16",
                                           steps=1200, **_FAST),
    "val-dit16-x0-scaled": DiffusionConfig("discrete_vp_scaled_linear", "x0", {**_DIT16, "time_scale": _T_DISCRETE}, "DigitsTransformer",
                                           "digits16", steps=1200, **{**_FAST, "lr": 1e-3}),
    "val-unet16-flow-shift3": DiffusionConfig("flow_matching", "flow", {**_UNET16, "time_scale": 1.0}, "DigitsUNet", "digits16",
                                              flow_shift=3.0, steps=1200, **_FAST),
    "val-unet16-edm": DiffusionConfig("edm", "edm", {**_UNET16, "time_scale": 1.0, "sigma_data": DIGITS_RMS}, "EDMDigitsUNet", "digits16",
                                      t_sampling="lognormal", p_mean=0.5, steps=1200, **_FAST),
    "val-unet32-eps-linear": DiffusionConfig("discrete_vp_linear", "eps", {**_UNET32, "time_scale": _T_DISCRETE}, "DigitsUNet",
                                             "digits32", steps=1000, **_FAST),
    "val-dit32-v-scaled": DiffusionConfig("discrete_vp_scaled_linear", "v", {**_DIT32, "time_scale": _T_DISCRETE}, "DigitsTransformer",
                                          "digits32", steps=1200, **{**_FAST, "lr": 1e-3}),
}
NAMES: tuple[str, ...] = tuple(VALIDATION_CONFIGS)


def build(names: list[str] | tuple[str, ...] | None = None, out: str | Path = ".", *, seed: int = 0, force: bool = False,
          log_every: int = 250) -> dict[str, dict[str, Any]]:
    """Train the named validation models (default: all) into ``out``, skipping those whose card and
    weights are already there (``force`` retrains); returns the cards by name."""
    from . import card

    folder = Path(out)
    cards: dict[str, dict[str, Any]] = {}
    for name in names or NAMES:
        if name not in VALIDATION_CONFIGS:
            raise ZooError(f"unknown validation model {name!r}; known: {list(NAMES)}")
        if not force and (folder / f"{name}.json").is_file() and (folder / f"{name}.safetensors").is_file():
            cards[name] = card(name, folder)
            continue
        cards[name] = train(name, out=folder, seed=seed, log_every=log_every, configs=VALIDATION_CONFIGS)  # type: ignore[arg-type]
    return cards


def load(name: str, root: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Model:
    """A trained validation model from ``root`` as a :class:`fewstep.Model` (weights checked against
    their SHA-256); a :class:`~fewstep.ZooError` naming the build command when it is not there."""
    from . import load as zoo_load

    if name not in VALIDATION_CONFIGS:
        raise ZooError(f"unknown validation model {name!r}; known: {list(NAMES)}")
    if not (Path(root) / f"{name}.json").is_file():
        raise ZooError(f"validation model {name!r} is not built in {root}: python -m fewstep.zoo.validation build {name} --out {root}")
    model = zoo_load(name, root, device=device, dtype=dtype)
    model.tuned_schedules = {}  # none are shipped for these, by design
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fewstep.zoo.validation", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the models that the output folder lacks")
    b.add_argument("names", nargs="*", help=f"models to build (default: all of {', '.join(NAMES)})")
    b.add_argument("--out", required=True, help="folder for the weights and cards")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    b.add_argument("--force", action="store_true", help="retrain models that are already built")
    sub.add_parser("list", help="the models and what distinguishes them")
    args = p.parse_args(argv)
    if args.command == "list":
        for name, cfg in VALIDATION_CONFIGS.items():
            print(f"{name:28s} {cfg.net_class:18s} {cfg.prediction:5s} {cfg.schedule:26s} {cfg.data:8s} {cfg.steps} steps")
        return 0
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    build(args.names or None, args.out, seed=args.seed, force=args.force)
    print(f"validation zoo in {args.out}: built in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

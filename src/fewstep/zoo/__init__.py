"""Bundled trained models (offline): small networks trained on scikit-learn's 8x8 digits by
:mod:`fewstep.zoo.train`, stored as safetensors weights plus a JSON card each (no pickle).

    >>> model = fewstep.zoo.load("digits-vp-eps")          # a fewstep.Model
    >>> x = fewstep.sample(model, fewstep.initial_noise(model.schedule, (16, *model.sample_shape), 0), "unipc", nfe=10)
    >>> model.to_images(x)                                   # (16, 8, 8) pixel values 0..16
"""

from __future__ import annotations

import builtins
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..errors import ZooError
from ..models import Model
from ..schedules import schedule_from_config

__all__ = ["list", "load", "card", "load_network", "tuned_schedules", "WEIGHTS"]

#: where the bundled weights and cards live
WEIGHTS = Path(__file__).resolve().parent / "weights"
_REQUIRED = ("format", "version", "name", "weights", "sha256", "architecture")


def _card_path(name: str, root: Path) -> Path:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise ZooError(f"a zoo model name is a plain name like 'digits-vp-eps', got {name!r}")
    return root / f"{name}.json"


def list(root: str | Path | None = None) -> builtins.list[str]:  # noqa: A001  (the public name is zoo.list)
    """Names of the bundled models (diffusion/flow models and the digits classifier)."""
    folder = Path(root) if root is not None else WEIGHTS
    return sorted(p.stem for p in folder.glob("*.json"))


def card(name: str, root: str | Path | None = None) -> dict[str, Any]:
    """The model's JSON card: architecture, schedule, parameterisation, training, data split, metrics."""
    folder = Path(root) if root is not None else WEIGHTS
    path = _card_path(name, folder)
    if not path.is_file():
        raise ZooError(f"no zoo model {name!r} (no card {path}); bundled: {list(folder)}")
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ZooError(f"the card of {name!r} ({path}) is not valid JSON: {exc}") from None
    if not isinstance(info, dict) or info.get("format") != "fewstep-zoo-card":
        raise ZooError(f"{path} is not a fewstep zoo card (format field {info.get('format') if isinstance(info, dict) else None!r})")
    missing = [k for k in _REQUIRED if k not in info]
    if missing:
        raise ZooError(f"the card of {name!r} ({path}) lacks the fields {missing}")
    return info


def load_network(name: str, root: str | Path | None = None, *, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The bare torch module (eval mode) and its card; the weight file's SHA-256 must match the card."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .nets import build

    folder = Path(root) if root is not None else WEIGHTS
    info = card(name, folder)
    wpath = folder / str(info["weights"])
    if not wpath.is_file():
        raise ZooError(f"the weight file of {name!r} is missing: {wpath}")
    digest = hashlib.sha256(wpath.read_bytes()).hexdigest()
    if digest != info["sha256"]:
        raise ZooError(f"the weight file {wpath} is corrupted or not the one its card describes (sha256 {digest[:12]}..., card says {str(info['sha256'])[:12]}...)")
    arch = info["architecture"]
    try:
        net = build(arch["class"], arch["config"])
        state = load_file(str(wpath), device=str(device))
        net.load_state_dict(state, strict=True)
    except (KeyError, TypeError, RuntimeError, SafetensorError, ValueError) as exc:
        raise ZooError(f"cannot build {name!r} from {wpath}: {exc}") from None
    return net.to(device).eval(), info


def load(name: str, root: str | Path | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Model:
    """A bundled diffusion or flow model as a :class:`fewstep.Model`, with its noise schedule,
    parameterisation, ``sample_shape`` and ``to_images`` (digits: pixel values 0..16, shape (n, 8, 8))."""
    from .data import to_images

    net, info = load_network(name, root, device=device)
    if "schedule" not in info or "prediction" not in info:
        raise ZooError(f"zoo model {name!r} is not a diffusion or flow model (its card has no schedule); load it with load_network")
    net = net.to(dtype)
    schedule = schedule_from_config(info["schedule"])

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net(x.to(dtype), t.to(dtype)).to(x.dtype)

    model = Model(fn, schedule, info["prediction"], name=name, sample_shape=tuple(info["sample_shape"]), to_images=to_images,
                  identity=f"zoo:{name}:{str(info['sha256'])[:16]}")
    model.tuned_schedules = tuned_schedules(name, root)
    return model


def tuned_schedules(name: str, root: str | Path | None = None) -> dict[int, Any]:
    """The searched solver schedules a bundled model ships, by NFE (listed in its card under
    ``tuned_schedules`` with their SHA-256; made by ``python -m fewstep.zoo.tune``). A missing,
    damaged or mismatched file is a :class:`ZooError` naming it."""
    from ..errors import ScheduleFileError
    from ..solvers.plan import SolverSchedule

    folder = Path(root) if root is not None else WEIGHTS
    info = card(name, folder)
    entries = info.get("tuned_schedules", {})
    if not isinstance(entries, dict):
        raise ZooError(f"the card of {name!r} has a malformed 'tuned_schedules' field")
    out: dict[int, Any] = {}
    for nfe, entry in entries.items():
        try:
            path = folder / entry["file"]
            data = path.read_bytes()
            want = entry["sha256"]
        except (OSError, KeyError, TypeError) as exc:
            raise ZooError(f"tuned schedule NFE {nfe} of {name!r} is missing or malformed in its card: {exc}") from None
        if hashlib.sha256(data).hexdigest() != want:
            raise ZooError(f"tuned schedule {path} of {name!r} does not match the SHA-256 in the card (damaged or replaced)")
        try:
            plan = SolverSchedule.from_json(data.decode())
        except (ScheduleFileError, UnicodeDecodeError) as exc:
            raise ZooError(f"tuned schedule {path} of {name!r} is not a valid schedule file: {exc}") from None
        if plan.nfe != int(nfe):
            raise ZooError(f"tuned schedule {path} of {name!r} has NFE {plan.nfe}, listed as {nfe}")
        out[int(nfe)] = plan
    return out

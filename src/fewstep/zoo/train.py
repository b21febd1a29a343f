"""Reproducible training of the digits zoo models (CPU, fixed seeds), written as
``NAME.safetensors`` (EMA weights) plus a ``NAME.json`` model card.

    python -m fewstep.zoo.train NAME [--steps N] [--out DIR] [--seed S] [--device cpu] [--threads 2]

NAME is ``digits-vp-eps`` (eps prediction, DDPM linear betas), ``digits-flow`` (flow-matching
velocity), ``digits-edm`` (EDM-preconditioned denoiser, Karras et al. 2022), ``digits-classifier``
(a CNN for accuracy and Fréchet features) or ``all``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..schedules import EDM, DiscreteVP, FlowMatching, NoiseSchedule
from .data import DigitsSplit, load_digits_split
from .nets import NETWORKS, DigitsClassifier

__all__ = ["DiffusionConfig", "ClassifierConfig", "CONFIGS", "NAMES", "DEFAULT_OUT", "train", "main"]

DEFAULT_OUT = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class DiffusionConfig:
    """Hyper-parameters of a diffusion / flow-matching UNet run."""

    schedule: str  # "discrete_vp_linear" | "discrete_vp_scaled_linear" | "discrete_vp_cosine" | "flow_matching" | "edm"
    prediction: str  # "eps" | "v" | "x0" | "flow" | "edm"
    net: dict[str, Any] = field(default_factory=dict)
    net_class: str = ""  # a class of fewstep.zoo.nets (default: DigitsUNet, EDMDigitsUNet for prediction "edm")
    data: str = "digits8"  # "digits8" | "digits16" | "digits32" (bilinear upsampling of the 8x8 digits) | "flat64"
    flow_shift: float = 1.0  # FlowMatching(shift): training times t = shift u / (1 + (shift - 1) u), u ~ U(0, 1)
    t_sampling: str = "uniform"  # "uniform": t ~ U(training range); "lognormal": log sigma ~ N(p_mean, p_std) (EDM)
    p_mean: float = -1.2
    p_std: float = 1.2
    steps: int = 4500
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 200
    lr_schedule: str = "cosine"  # warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # with warm-up: decay_k = min(ema_decay, (1 + k) / (10 + k))
    heldout_fraction: float = 0.25
    storage_dtype: str = "float16"  # weights on disk (loaded into float32): 4 MB instead of 8


@dataclass(frozen=True)
class ClassifierConfig:
    """Hyper-parameters of the digits classifier run."""

    net: dict[str, Any] = field(default_factory=dict)
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 100
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    max_shift: int = 1  # augmentation: random translations by up to this many pixels (background fill)
    label_smoothing: float = 0.0  # (0.1 scored 100% but collapses the features to ~9 directions)
    heldout_fraction: float = 0.25
    storage_dtype: str = "float32"


_UNET = {"channels": 48, "channel_mult": [1, 2], "num_res_blocks": 2, "dropout": 0.0}
#: RMS of the train digits in model space (EDM's sigma_data: c_skip is optimal for E[x0^2] = sd^2)
DIGITS_RMS = 0.847
CONFIGS: dict[str, DiffusionConfig | ClassifierConfig] = {
    "digits-vp-eps": DiffusionConfig("discrete_vp_linear", "eps", {**_UNET, "time_scale": 1e-3}),
    "digits-flow": DiffusionConfig("flow_matching", "flow", {**_UNET, "time_scale": 1.0}),
    # log sigma ~ N(0, 1.2), not EDM's N(-1.2, 1.2): on 8x8 digits the structure forms at sigma ~ 1
    # (the VP and flow runs put their median training noise at sigma_ve ~ 3 and 1); N(-1.2, 1.2) gave
    # 3.1x the train-vs-held-out feature distance, against 1.8-1.9x for the other two
    "digits-edm": DiffusionConfig("edm", "edm", {**_UNET, "time_scale": 1.0, "sigma_data": DIGITS_RMS},
                                  t_sampling="lognormal", p_mean=0.0),
    "digits-classifier": ClassifierConfig({"channels": 32, "features": 128, "dropout": 0.3}),
}
NAMES: tuple[str, ...] = tuple(CONFIGS)


def _schedule(kind: str, flow_shift: float = 1.0) -> NoiseSchedule:
    if kind == "discrete_vp_linear":
        return DiscreteVP.linear()  # 1000 betas linear in [1e-4, 0.02]
    if kind == "discrete_vp_scaled_linear":
        return DiscreteVP.scaled_linear()  # Stable Diffusion's betas
    if kind == "discrete_vp_cosine":
        return DiscreteVP.cosine()  # diffusers' squaredcos_cap_v2
    if kind == "flow_matching":
        return FlowMatching(shift=flow_shift)
    if kind == "edm":
        return EDM(sigma_min=0.002, sigma_max=80.0, sigma_data=DIGITS_RMS)
    raise ValueError(f"unknown training schedule {kind!r}")


def _lr_lambda(cfg: DiffusionConfig | ClassifierConfig, steps: int) -> Callable[[int], float]:
    """Linear warm-up, then constant or cosine decay to ``min_lr_ratio`` (multiplier of ``lr``)."""
    warm = min(cfg.warmup_steps, max(steps // 10, 1))

    def factor(k: int) -> float:
        if k < warm:
            return (k + 1) / warm
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min((k - warm) / max(steps - warm, 1), 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class _EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, net: nn.Module, decay: float) -> None:
        self.net = copy.deepcopy(net).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for p_ema, p in zip(self.net.parameters(), net.parameters()):
            p_ema.lerp_(p, 1.0 - d)
        for b_ema, b in zip(self.net.buffers(), net.buffers()):
            b_ema.copy_(b)


class _Batches:
    """Epoch-wise shuffled mini-batches of indices from a seeded generator."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator) -> None:
        self.n, self.batch_size, self.gen = n, min(batch_size, n), gen
        self.order, self.pos = torch.randperm(n, generator=gen), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels in each direction, filling with -1 (background)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (b,), generator=gen) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(b)[:, None, None], 0, rows, cols][:, None]


def _fit(
    net: nn.Module, cfg: DiffusionConfig | ClassifierConfig, steps: int, loss_fn: Callable[[int], torch.Tensor],
    name: str, log_every: int,
) -> tuple[nn.Module, list[float]]:
    """The shared loop: AdamW, warm-up + decay, gradient clipping, EMA; returns (EMA net, losses)."""
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, steps))
    ema = _EMA(net, cfg.ema_decay)
    losses: list[float] = []
    start = time.perf_counter()
    net.train()
    for k in range(steps):
        loss = loss_fn(k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        ema.update(net, k)
        losses.append(loss.item())
        if (k + 1) % log_every == 0 or k + 1 == steps:
            recent = float(np.mean(losses[-log_every:]))
            print(f"[{name}] step {k + 1}/{steps}  loss {recent:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
    return ema.net, losses


def prepare_data(kind: str, x: torch.Tensor) -> torch.Tensor:
    """The digits (n, 1, 8, 8) in model space as a data set of kind ``digits8``, ``digits16`` /
    ``digits32`` (bilinear upsampling: smooth images whose structure sits at higher noise levels,
    the resolution effect of Hoogeboom et al. 2023) or ``flat64`` (vectors (n, 64))."""
    if kind == "digits8":
        return x
    if kind in ("digits16", "digits32"):
        return F.interpolate(x, size=int(kind[6:]), mode="bilinear", align_corners=False)
    if kind == "flat64":
        return x.reshape(x.shape[0], 64)
    raise ValueError(f"unknown data kind {kind!r}")


def _diffusion_loss(net: nn.Module, cfg: DiffusionConfig, sched: NoiseSchedule, data: torch.Tensor,
                    gen: torch.Generator, device: torch.device) -> Callable[[int], torch.Tensor]:
    """The training loss at ``x_t = alpha x0 + sigma eps``, t uniform (flow matching: shifted): MSE to
    eps (``eps``), to ``v = alpha eps - sigma x0`` (``v``), to x0 (``x0``) or to the velocity eps - x0
    (``flow``); for ``edm``, Karras et al.'s weighted denoising loss
    ``(sigma^2 + sd^2) / (sigma sd)^2 |D(x; sigma) - x0|^2`` with log sigma ~ N(p_mean, p_std)."""
    batches = _Batches(len(data), cfg.batch_size, gen)
    lo, hi = (0.0, sched.t_max) if isinstance(sched, DiscreteVP) else (0.0, 1.0)
    if cfg.t_sampling not in ("uniform", "lognormal") or (cfg.t_sampling == "lognormal") != (cfg.prediction == "edm"):
        raise ValueError(f"t_sampling {cfg.t_sampling!r} does not go with prediction {cfg.prediction!r}")

    def loss(_: int) -> torch.Tensor:
        x0 = data[batches.next()]
        eps = torch.randn(x0.shape, generator=gen)
        if cfg.t_sampling == "lognormal":
            t = torch.exp(cfg.p_mean + cfg.p_std * torch.randn(x0.shape[0], generator=gen, dtype=torch.float64))
        else:
            t = lo + (hi - lo) * torch.rand(x0.shape[0], generator=gen, dtype=torch.float64)
            if isinstance(sched, FlowMatching):
                t = sched.shift_times(t)
        view = (-1, *([1] * (x0.ndim - 1)))
        a, s = sched.alpha(t).float().reshape(view), sched.sigma(t).float().reshape(view)
        xt = a * x0 + s * eps
        out = net(xt.to(device), t.float().to(device))
        if cfg.prediction == "edm":
            sd = float(net.sigma_data)  # type: ignore[attr-defined]
            weight = ((s * s + sd * sd) / (s * sd) ** 2).to(device)
            return (weight * (out - x0.to(device)) ** 2).mean()
        targets = {"eps": lambda: eps, "v": lambda: a * eps - s * x0, "x0": lambda: x0, "flow": lambda: eps - x0}
        return F.mse_loss(out, targets[cfg.prediction]().to(device))

    return loss


def _classifier_loss(net: DigitsClassifier, cfg: ClassifierConfig, split: DigitsSplit,
                     gen: torch.Generator, device: torch.device) -> Callable[[int], torch.Tensor]:
    batches = _Batches(len(split.train_x), cfg.batch_size, gen)

    def loss(_: int) -> torch.Tensor:
        idx = batches.next()
        x = _random_shift(split.train_x[idx], cfg.max_shift, gen)
        return F.cross_entropy(net(x.to(device)), split.train_y[idx].to(device), label_smoothing=cfg.label_smoothing)

    return loss


@torch.no_grad()
def heldout_accuracy(net: DigitsClassifier, split: DigitsSplit, device: torch.device | str = "cpu") -> float:
    """Fraction of held-out digits classified correctly."""
    net.eval()
    pred = net(split.heldout_x.to(device)).argmax(1).cpu()
    return float((pred == split.heldout_y).float().mean())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_weights(net: nn.Module, path: Path, dtype: torch.dtype = torch.float32) -> None:
    """The state dict as safetensors, floating tensors stored as ``dtype`` (the loader casts them back)."""
    from safetensors.torch import save_file

    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})  # one key: safetensors orders metadata at random


def train(name: str, steps: int | None = None, out: str | Path | None = None, seed: int = 0,
          device: str = "cpu", log_every: int = 250, configs: dict[str, DiffusionConfig | ClassifierConfig] | None = None) -> dict[str, Any]:
    """Train model ``name`` of ``configs`` (default :data:`CONFIGS`), write ``NAME.safetensors`` +
    ``NAME.json`` into ``out`` (default: the package's ``zoo/weights/``) and return the card.
    ``steps`` overrides the config."""
    configs = CONFIGS if configs is None else configs
    if name not in configs:
        raise ValueError(f"unknown zoo model {name!r}; known: {list(configs)}")
    cfg = configs[name]
    steps = cfg.steps if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out_dir = DEFAULT_OUT if out is None else Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)

    torch.manual_seed(seed)
    np.random.seed(seed)
    gen = torch.Generator().manual_seed(seed)
    split = load_digits_split(seed=0, heldout_fraction=cfg.heldout_fraction)  # the split is fixed; seed is for training
    start = time.perf_counter()
    card: dict[str, Any] = {"format": "fewstep-zoo-card", "version": 1, "name": name, "weights": f"{name}.safetensors"}
    if isinstance(cfg, DiffusionConfig):
        sched = _schedule(cfg.schedule, cfg.flow_shift)
        net_class = cfg.net_class or ("EDMDigitsUNet" if cfg.prediction == "edm" else "DigitsUNet")
        net: nn.Module = NETWORKS[net_class](**cfg.net).to(dev)
        data = prepare_data(cfg.data, split.train_x)
        loss_fn = _diffusion_loss(net, cfg, sched, data, gen, dev)
    else:
        net = DigitsClassifier(**cfg.net).to(dev)
        loss_fn = _classifier_loss(net, cfg, split, gen, dev)
    print(f"[{name}] {type(net).__name__} {sum(p.numel() for p in net.parameters()):,} parameters, "
          f"{len(split.train_x)} training images, {steps} steps on {device}", flush=True)
    ema_net, losses = _fit(net, cfg, steps, loss_fn, name, max(1, log_every))
    wall = time.perf_counter() - start

    weights = out_dir / f"{name}.safetensors"
    save_weights(ema_net, weights, getattr(torch, cfg.storage_dtype))
    card.update({
        "sha256": _sha256(weights),
        "architecture": {"class": type(ema_net).__name__, "config": ema_net.config,
                         "parameters": int(sum(p.numel() for p in ema_net.parameters()))},
    })
    if isinstance(cfg, DiffusionConfig):
        card.update({"schedule": sched.config(), "prediction": cfg.prediction})
    card["sample_shape"] = list(prepare_data(cfg.data, split.train_x[:1]).shape[1:]) if isinstance(cfg, DiffusionConfig) else [1, 8, 8]
    card["data"] = {**split.describe(), "pixel_scale": "x = pixels / 8 - 1",
                    **({"transform": cfg.data} if isinstance(cfg, DiffusionConfig) and cfg.data != "digits8" else {})}
    card["training"] = {
        "hyperparameters": asdict(cfg), "seed": seed, "steps": steps,
        "final_loss": float(np.mean(losses[-200:])), "loss_window": min(200, steps),
        "weights_saved": f"EMA, stored as {cfg.storage_dtype}", "wall_s": round(wall, 1), "device": device, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
    }
    if isinstance(cfg, ClassifierConfig):
        card["metrics"] = {"heldout_accuracy": heldout_accuracy(ema_net, split, dev), "heldout_n": len(split.heldout_y)}
    (out_dir / f"{name}.json").write_text(json.dumps(card, indent=1) + "\n")
    print(f"[{name}] done in {wall:.0f}s: final loss {card['training']['final_loss']:.4f} -> {weights}", flush=True)
    return card


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fewstep.zoo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=[*NAMES, "all"])
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the model's config)")
    p.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend slightly on it)")
    p.add_argument("--log-every", type=int, default=250)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in NAMES if args.name == "all" else [args.name]:
        train(name, steps=args.steps, out=args.out, seed=args.seed, device=args.device, log_every=args.log_every)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

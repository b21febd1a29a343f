"""The models defaults and autotune are judged on, and the noises they are judged with.

A target is a model, a batch of keyed initial noises and the reference solutions of those noises:

* ``<oracle>@<schedule>``: an exact Gaussian-mixture oracle (:data:`ORACLES`: the bundled ones and
  validation mixtures that differ in dimension, number of modes, data scale and mode width) as a model
  of a noise schedule (:data:`SCHEDULES`); reference: DOP853 at rtol = atol = 1e-10;
* a network: the bundled digits networks (``digits-vp-eps``, ``digits-flow``, ``digits-edm``) or a
  validation-zoo network (``val-*``, :mod:`fewstep.zoo.validation`, built into ``benchmarks/zoo``);
  reference: UniPC at NFE 400 with its change from NFE 200 as the error bar.

Noise sets: ``judge`` (seed 0, sample indices 0..B-1: the noises every report is measured on, the
peers included) and ``fit`` (seed 7: the noises defaults are chosen on, never judged on). Every
reference is cached under ``benchmarks/.cache``.

:data:`GROUPS` says which targets share a model (an oracle's data on several schedules; the under-
and well-trained copies of one network): leave-one-model-out holds out a whole group.
"""

from __future__ import annotations

import _common  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

import hashlib
import math
import time
from typing import Any, Callable

import torch

import fewstep
from fewstep.oracle import GaussianMixture

from _common import CACHE, HERE, log
import quality as Q

ZOO_DIR = HERE / "zoo"
NOISE_SEEDS = {"judge": 0, "fit": 7}
NETWORK_REF_NFE = 400

#: schedule key -> (how reports name it, constructor)
SCHEDULES: dict[str, tuple[str, Callable[[], fewstep.NoiseSchedule]]] = {
    "vp": ("DiscreteVP.linear()", lambda: fewstep.DiscreteVP.linear()),
    "vp-scaled-linear": ("DiscreteVP.scaled_linear()", lambda: fewstep.DiscreteVP.scaled_linear()),
    "vp-cosine": ("DiscreteVP.cosine()", lambda: fewstep.DiscreteVP.cosine()),
    "linear-vp": ("LinearVP()", lambda: fewstep.LinearVP()),
    "cosine-vp": ("CosineVP()", lambda: fewstep.CosineVP()),
    "edm": ("EDM()", lambda: fewstep.EDM()),
    "flow": ("FlowMatching()", lambda: fewstep.FlowMatching()),
    "flow-shift3": ("FlowMatching(shift=3)", lambda: fewstep.FlowMatching(shift=3.0)),
}


def _tight(dim: int, seed: int) -> GaussianMixture:
    """Well separated, narrow modes: within-mode spread 0.05-0.1 against mean scale 0.8."""
    g = torch.Generator().manual_seed(seed)
    means = 0.8 * torch.randn(8, dim, generator=g, dtype=torch.float64)
    diag = (0.05 + 0.05 * torch.rand(8, dim, generator=g, dtype=torch.float64)) ** 2
    factors = 0.1 * torch.randn(8, dim, 2, generator=g, dtype=torch.float64)
    return GaussianMixture(torch.ones(8, dtype=torch.float64), means, diag, factors, name=f"gmm-d{dim}-tight")


#: oracle name -> constructor: the bundled oracles and validation mixtures
ORACLES: dict[str, Callable[[], GaussianMixture]] = {
    **{name: (lambda n=name: fewstep.bundled_oracle(n)) for name in ("gmm-d64", "gmm-d256", "gmm-d1024", "gmm-d3072", "digits-gmm")},
    "gmm-d3072-half": lambda: GaussianMixture.random(3072, 8, 4, seed=1, scale=0.5, name="gmm-d3072-half"),
    "gmm-d256-k32": lambda: GaussianMixture.random(256, 32, 4, seed=1, name="gmm-d256-k32"),
    "gmm-d1024-tight": lambda: _tight(1024, 2),
}

BUNDLED_NETWORKS = ("digits-vp-eps", "digits-flow", "digits-edm")


def is_validation_network(name: str) -> bool:
    return name.startswith("val-")


def load_network(name: str) -> fewstep.Model:
    """A bundled or validation-zoo network as a Model with no searched schedules (the defaults are
    measured as for a model nobody tuned)."""
    if is_validation_network(name):
        from fewstep.zoo.validation import load

        model = load(name, ZOO_DIR)
    else:
        model = fewstep.zoo.load(name)
    model.tuned_schedules = {}
    return model


def network_sha(name: str) -> str:
    from fewstep.zoo import card

    return str(card(name, ZOO_DIR if is_validation_network(name) else None)["sha256"])[:12]


def group_of(tid: str) -> str:
    """The model a target belongs to: an oracle's data (whatever the schedule), a network (the
    under- and well-trained copies of one network are one model)."""
    if "@" in tid:
        return "oracle:" + tid.split("@", 1)[0]
    return "net:" + tid.replace("-short", "").replace("-long", "")


def dimension(model: fewstep.Model) -> int:
    return int(math.prod(model.sample_shape or ()))


def _digits_metric() -> Callable[[torch.Tensor], float]:
    """Feature Fréchet distance of digit samples of any of the zoo's shapes (16x16 and 32x32 averaged
    down to 8x8, flat vectors reshaped) to the held-out digits."""
    from fewstep.zoo.evaluate import DigitsEvaluator

    evaluator = DigitsEvaluator()

    def metric(x: torch.Tensor) -> float:
        x = x.detach().to(torch.float32)
        if x.ndim == 2:
            x = x.reshape(-1, 1, 8, 8)
        elif x.shape[-1] != 8:
            x = torch.nn.functional.adaptive_avg_pool2d(x, 8)
        return float(evaluator.evaluate(x)["fd_features"])

    return metric


def build(tid: str, batch: int, noise_set: str = "judge") -> Q.Target:
    """The target ``tid`` on ``batch`` noises of ``noise_set`` (``judge`` or ``fit``), reference cached."""
    seed = NOISE_SEEDS[noise_set]
    t0 = time.perf_counter()
    if "@" in tid:
        name, key = tid.split("@", 1)
        label, make = SCHEDULES[key]
        sched = make()
        oracle = ORACLES[name]()
        model = oracle.as_model(sched)
        x_T = fewstep.initial_noise(sched, (batch, oracle.dim), seed, dtype=torch.float64)
        tag = hashlib.sha1(repr(sched.definition()).encode()).hexdigest()[:8]
        path = CACHE / f"ref-{name}-{key}-{tag}-b{batch}-s{seed}-rtol{Q.REF_RTOL:g}.npy"
        ref, info, cached = Q._cached(path, tuple(x_T.shape), lambda: (fewstep.reference_solution(model, x_T, rtol=Q.REF_RTOL, atol=Q.REF_RTOL), {}))
        lik = Q.LikGap(oracle, seed)
        describe = (f"Oracle {oracle!r} on `{label}`; batch {batch} of the {noise_set} noises (seed {seed}); reference DOP853 at "
                    f"rtol = atol = {Q.REF_RTOL:g}.")
        meta = {"dim": oracle.dim, "batch": batch, "seed": seed, "reference_file": path.name, "reference_cached": cached,
                "reference_s": info.get("compute_s")}
        target = Q.Target(tid, "oracle", model, oracle, sched, x_T, ref, lik, "lik gap (nats)", describe, meta)
    else:
        model = load_network(tid)
        sched = model.schedule
        x_T = fewstep.initial_noise(sched, (batch, *model.sample_shape), seed, dtype=torch.float64)
        path = CACHE / f"ref-net-{tid}-{network_sha(tid)}-b{batch}-s{seed}-unipc{NETWORK_REF_NFE}.npy"

        def compute() -> tuple[torch.Tensor, dict[str, Any]]:
            chk = fewstep.check_fine_reference(model, x_T, nfe=NETWORK_REF_NFE)
            return chk.solution, {"rms_change": chk.rms_change, "max_abs_change": chk.max_abs_change, "method": chk.method}

        log(f"[{tid}] {noise_set} batch {batch}: reference ...")
        ref, info, cached = Q._cached(path, tuple(x_T.shape), compute)
        describe = (f"Network `{tid}` ({model.prediction} prediction on `{sched!r}`, samples {tuple(model.sample_shape)}); batch "
                    f"{batch} of the {noise_set} noises (seed {seed}); reference {info.get('method')} (moves by "
                    f"{info.get('rms_change', float('nan')):.2g} RMS from half the NFE).")
        meta = {"dim": dimension(model), "batch": batch, "seed": seed, "reference_file": path.name, "reference_cached": cached,
                "reference_s": info.get("compute_s"), "reference_rms_change": info.get("rms_change")}
        target = Q.Target(tid, "zoo", model, model, sched, x_T, ref, _digits_metric(), "feature FD", describe, meta)
    target.meta["build_s"] = time.perf_counter() - t0
    return target


def all_target_ids() -> list[str]:
    """Every target of the defaults study: oracles on every schedule family and networks."""
    oracles = [f"gmm-d64@{k}" for k in SCHEDULES if k != "flow-shift3"] + [
        "digits-gmm@vp", "digits-gmm@flow", "gmm-d256@vp", "gmm-d256-k32@vp-cosine", "gmm-d1024@vp", "gmm-d1024@flow-shift3",
        "gmm-d1024-tight@vp", "gmm-d1024-tight@edm", "gmm-d3072@vp", "gmm-d3072-half@vp-scaled-linear", "gmm-d3072@flow",
    ]
    from fewstep.zoo.validation import NAMES

    return oracles + list(BUNDLED_NETWORKS) + list(NAMES)


def default_batch(tid: str, noise_set: str) -> int:
    """Judge: 256 for small oracles, 64 for d >= 1024 oracles and the 8x8 / flat networks, 32 for the
    16x16 / 32x32 networks (8,192-32,768 values per batch; every comparison is paired, on the same
    noises). Fit: 16 for the 16x16 / 32x32 networks, 32 for the others."""
    big = "@" not in tid and any(s in tid for s in ("16", "32"))
    if noise_set == "fit":
        return 16 if big else 32
    if "@" in tid:
        return 64 if any(f"d{d}" in tid for d in (1024, 3072)) else 256
    return 32 if big else 64


__all__ = ["SCHEDULES", "ORACLES", "ZOO_DIR", "NOISE_SEEDS", "build", "group_of", "all_target_ids", "default_batch", "load_network",
           "dimension"]

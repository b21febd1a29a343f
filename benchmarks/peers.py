"""The peers fewstep is measured against, driven on an exact oracle or a bundled network.

* diffusers schedulers, driven by a plain ``scale_model_input`` / ``step`` loop with the oracle's
  eps prediction;
* k-diffusion's deterministic samplers, with the oracle's exact denoiser ``D(x_ve, sigma)`` in the
  variance-exploding view ``x_ve = x / alpha``, ``sigma_ve = sigma_t / alpha_t``;
* for flow-matching models (``fewstep.FlowMatching``): diffusers' FlowMatchEuler / FlowMatchHeun and
  DPMSolverMultistep / UniPC in their flow mode (``use_flow_sigmas``, ``flow_prediction``), fed the
  velocity ``eps - x0`` at their sigma (= the flow time t);
* for EDM models (``fewstep.EDM``): diffusers' EDMEuler and EDMDPMSolverMultistep, fed the raw
  output of an EDM-preconditioned network that reproduces the model's x0 exactly (``edm_peers``).

``import k_diffusion`` pulls in torchvision (and PIL, safetensors, ...) through its ``__init__`` and
``utils``; only ``k_diffusion/sampling.py`` is needed, so it is loaded standalone with a minimal
``utils`` stub (``append_dims``, the one helper it uses). Install the wheel without its dependencies::

    pip install --no-deps k-diffusion torchsde torchdiffeq trampoline

Every peer is a :class:`Peer`: a family name, a list of option sets (the grid choices it is allowed
to pick the best of), and ``run(option, x_T, nfe) -> (x0, model evaluations used)``. ``x_T`` is the
VP-coordinate initial noise that fewstep and the reference start from.

How the oracle is queried (``model_mode``):

* ``"sigma"`` (default): each model call is answered at the noise level the scheduler itself uses
  for that call (``scheduler.sigmas[i]``, or ``alphas_cumprod[t]`` for DDIM / PNDM, which have no
  sigmas). The peer then integrates exactly the ODE it believes it is integrating; nothing but its
  own discretisation error is measured.
* ``"timestep"``: the model is called as a user's network would be, ``eps(x, t)`` at the
  scheduler's (possibly fractional, possibly rounded) timestep, with fewstep's interpolation of the
  discrete schedule between integer steps. Differences to ``"sigma"`` come from diffusers' own
  sigma <-> timestep mapping (log-sigma interpolation, rounding with Karras sigmas).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import fewstep

__all__ = ["Peer", "PeerContext", "diffusers_peers", "flow_peers", "edm_peers", "kdiffusion_peers", "load_k_sampling", "all_peers"]

SPACINGS = ("leading", "linspace", "trailing")


# ---------------------------------------------------------------------------------------------
# the oracle, as the peers see it
# ---------------------------------------------------------------------------------------------
@dataclass
class PeerContext:
    """The model the peers query, and the fewstep noise schedule it is sampled under.

    ``model`` is an exact oracle (a :class:`fewstep.GaussianMixture`, answered through its closed-form
    posterior at any (alpha, sigma)) or a :class:`fewstep.Model` (a network), answered at the time
    ``t(lambda)`` of the requested noise level with the state rescaled to that time's alpha (x0 and
    eps depend only on ``x / alpha`` and the log-SNR). Diffusers' schedulers need a ``DiscreteVP``.
    """

    model: "fewstep.GaussianMixture | fewstep.Model"
    sched: fewstep.NoiseSchedule
    model_mode: str = "sigma"
    calls: int = 0
    _eps_model: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.model_mode not in ("sigma", "timestep"):
            raise ValueError(f"model_mode must be 'sigma' or 'timestep', got {self.model_mode!r}")
        self.oracle = self.model if isinstance(self.model, fewstep.GaussianMixture) else None
        self._eps_model = self.oracle.as_model(self.sched, "eps") if self.oracle is not None else self.model
        if isinstance(self.sched, fewstep.DiscreteVP):
            n = self.sched.num_train_timesteps
            #: float64 alphas_cumprod of the very schedule fewstep and the reference use
            self.alphas_cumprod = (self.sched.alpha(torch.arange(n, dtype=torch.float64)) ** 2).to(torch.float64)

    @property
    def sigma_vp_max(self) -> float:
        return float(self.sched.sigma(float(self.sched.t_max)))

    @property
    def sigma_ve_max(self) -> float:
        return math.exp(-float(self.sched.lambda_(float(self.sched.t_max))))

    @property
    def sigma_ve_min(self) -> float:
        return math.exp(-float(self.sched.lambda_(float(self.sched.t_min))))

    def _posterior(self, x: torch.Tensor, alpha: float, sigma: float) -> fewstep.Prediction:
        """(x0, eps) of the state ``x`` at noise level (alpha, sigma); one model evaluation."""
        self.calls += 1
        if self.oracle is not None:
            one = torch.ones(x.shape[0], dtype=torch.float64)
            return self.oracle.posterior(x, alpha * one, sigma * one)
        t = float(self.sched.t_of_lambda(torch.tensor(math.log(alpha / sigma), dtype=torch.float64)))
        a_t = float(self.sched.alpha(t))
        return self.model.predict(x * (a_t / alpha), t)

    def predict_at(self, x: torch.Tensor, t: float) -> fewstep.Prediction:
        """(x0, eps) of the state ``x`` at the time ``t`` of the context's own schedule (flow matching and
        EDM: ``t = sigma``); one model evaluation. Needs no finite log-SNR, so it also answers at a
        pure-noise time (flow matching t = 1), where :meth:`_posterior`'s ``t(lambda)`` does not exist."""
        self.calls += 1
        if self.oracle is not None:
            tt = torch.tensor(float(t), dtype=torch.float64)
            one = torch.ones(x.shape[0], dtype=torch.float64)
            return self.oracle.posterior(x, float(self.sched.alpha(tt)) * one, float(self.sched.sigma(tt)) * one)
        return self.model.predict(x, float(t))

    def eps_at_sigma_ve(self, x: torch.Tensor, sigma_ve: float) -> torch.Tensor:
        """eps of the VP state ``x`` whose noise level is ``sigma_ve = sigma_t / alpha_t``."""
        a = 1.0 / math.sqrt(1.0 + sigma_ve * sigma_ve)
        return self._posterior(x, a, sigma_ve * a).eps.to(x.dtype)

    def eps_at_alphabar(self, x: torch.Tensor, alphabar: float) -> torch.Tensor:
        return self._posterior(x, math.sqrt(alphabar), math.sqrt(1.0 - alphabar)).eps.to(x.dtype)

    def eps_at_timestep(self, x: torch.Tensor, t: float) -> torch.Tensor:
        self.calls += 1
        return self._eps_model.predict(x, float(t)).eps.to(x.dtype)

    def denoiser(self, x_ve: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """k-diffusion's ``D(x, sigma)`` for the VE view: E[x0 | x_ve] (alpha = 1)."""
        return self._posterior(x_ve, 1.0, float(torch.as_tensor(sigma).reshape(-1)[0])).x0.to(x_ve.dtype)


# ---------------------------------------------------------------------------------------------
# peers
# ---------------------------------------------------------------------------------------------
@dataclass
class Peer:
    """A family of peer samplers with the option sets it may choose the best of."""

    name: str
    source: str  # "diffusers" | "k-diffusion"
    options: list[dict[str, Any]]
    runner: Callable[[PeerContext, dict[str, Any], torch.Tensor, int], tuple[torch.Tensor, int] | None]
    counterpart: str | None = None  # the fewstep preset implementing the same method
    min_nfe: int = 1

    def run(self, ctx: PeerContext, option: dict[str, Any], x_T: torch.Tensor, nfe: int) -> tuple[torch.Tensor, int] | None:
        """``(x0, NFE used)``, or ``None`` when this option is a duplicate (same grid as one already run)."""
        return self.runner(ctx, option, x_T, nfe)

    @staticmethod
    def option_label(option: dict[str, Any]) -> str:
        return ", ".join(f"{k}={v}" for k, v in option.items() if not k.startswith("_")) or "default"


# ---- diffusers ------------------------------------------------------------------------------
_VE_CLASSES = {"EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler"}


def _base_config(ctx: PeerContext) -> dict[str, Any]:
    # the model's own discrete schedule as diffusers' trained_betas (so that what a scheduler derives in
    # its constructor -- DPMSolverMultistep's lambdas for use_lu_lambdas, sigma ranges -- is that
    # schedule's); alphas_cumprod is replaced by the float64 values right after construction (as the
    # diffusers-agreement test does)
    abar = ctx.alphas_cumprod
    betas = 1.0 - abar / torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    return {"num_train_timesteps": ctx.sched.num_train_timesteps, "trained_betas": betas.tolist()}


def _make_scheduler(cls_name: str, ctx: PeerContext, option: dict[str, Any], extra: dict[str, Any]) -> Any:
    import diffusers

    cls = getattr(diffusers, cls_name)
    cfg = {**_base_config(ctx), **extra}
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters)
    for k, v in option.items():
        if k.startswith("_"):
            continue
        if k not in accepted:
            raise ValueError(f"{cls_name} has no option {k!r}")
        cfg[k] = v
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sch = cls(**cfg)
    sch.alphas_cumprod = ctx.alphas_cumprod.clone()
    if hasattr(sch, "final_alpha_cumprod") and cfg.get("set_alpha_to_one", False):
        sch.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return sch


def _grid_fingerprint(sch: Any) -> tuple:
    ts = tuple(float(t) for t in sch.timesteps)
    sg = tuple(round(float(s), 12) for s in sch.sigmas) if getattr(sch, "sigmas", None) is not None else ()
    return ts, sg


def _diffusers_runner(cls_name: str, extra: dict[str, Any], steps_for_nfe: Callable[[int], int]):
    seen: dict[tuple, tuple] = {}

    def run(ctx: PeerContext, option: dict[str, Any], x_T: torch.Tensor, nfe: int) -> tuple[torch.Tensor, int] | None:
        n = steps_for_nfe(nfe)
        if n < 1:
            raise ValueError(f"{cls_name} cannot run with NFE {nfe}")
        sch = _make_scheduler(cls_name, ctx, option, extra)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sch.set_timesteps(n)
        key = (id(ctx), x_T.shape, nfe, _grid_fingerprint(sch))
        if key in seen and seen[key] != tuple(sorted(option.items())):
            return None  # the same grid as another option: the same result
        seen[key] = tuple(sorted(option.items()))
        ve = cls_name in _VE_CLASSES
        has_sigmas = getattr(sch, "sigmas", None) is not None
        sigmas = [float(s) for s in sch.sigmas] if has_sigmas else None
        if ve:
            # diffusers' own usage: x = randn * init_noise_sigma; z = x_T / sigma(t_max) is that randn
            x = x_T * (float(sch.init_noise_sigma) / ctx.sigma_vp_max)
        else:
            x = x_T.clone()
        calls0 = ctx.calls
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, t in enumerate(sch.timesteps):
                inp = sch.scale_model_input(x, t)
                if ctx.model_mode == "timestep":
                    eps = ctx.eps_at_timestep(inp, float(t))
                elif has_sigmas:
                    eps = ctx.eps_at_sigma_ve(inp, sigmas[i])
                else:
                    eps = ctx.eps_at_alphabar(inp, float(ctx.alphas_cumprod[int(t)]))
                x = sch.step(eps, t, x).prev_sample
        return x.to(x_T.dtype), ctx.calls - calls0

    return run


def _diffusers_options(karras: bool, spacings: tuple[str, ...] = SPACINGS, *, lu_lambdas: bool = False) -> list[dict[str, Any]]:
    """Every grid option a user of the scheduler can pick: each ``timestep_spacing``, and where the
    scheduler has sigmas also Karras, exponential and beta sigmas (and Lu et al.'s uniform-lambda
    grid, ``use_lu_lambdas``, for DPMSolverMultistep). Options that give the same grid as one already
    run are skipped at run time."""
    opts: list[dict[str, Any]] = [{"timestep_spacing": s} for s in spacings]
    if karras:
        for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            opts += [{"timestep_spacing": s, flag: True} for s in spacings]
    if lu_lambdas:
        opts += [{"timestep_spacing": s, "use_lu_lambdas": True} for s in spacings]
    return opts


def diffusers_peers() -> list[Peer]:
    """The diffusers schedulers, each at every ``timestep_spacing`` (and Karras sigmas where they exist)."""
    same = lambda n: n  # noqa: E731  one model call per inference step
    peers = [
        Peer("diffusers DDIM", "diffusers", _diffusers_options(False),
             _diffusers_runner("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True}, same), "ddim"),
        Peer("diffusers DPMSolverMultistep 2M", "diffusers", _diffusers_options(True, lu_lambdas=True),
             _diffusers_runner("DPMSolverMultistepScheduler", {"solver_order": 2, "algorithm_type": "dpmsolver++"}, same), "dpmpp_2m"),
        Peer("diffusers DPMSolverMultistep 3M", "diffusers", _diffusers_options(True, lu_lambdas=True),
             _diffusers_runner("DPMSolverMultistepScheduler", {"solver_order": 3, "algorithm_type": "dpmsolver++"}, same), "dpmpp_3m"),
        # DPMSolverSinglestep has no timestep_spacing option (always linspace)
        Peer("diffusers DPMSolverSinglestep 2", "diffusers", [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True}],
             _diffusers_runner("DPMSolverSinglestepScheduler", {"solver_order": 2, "algorithm_type": "dpmsolver++"}, same), "dpmpp_2s"),
        Peer("diffusers DPMSolverSinglestep 3", "diffusers", [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True}],
             _diffusers_runner("DPMSolverSinglestepScheduler", {"solver_order": 3, "algorithm_type": "dpmsolver++"}, same), "dpm_solver_3"),
        Peer("diffusers UniPC 2 (bh2)", "diffusers", _diffusers_options(True),
             _diffusers_runner("UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2"}, same), "unipc"),
        Peer("diffusers UniPC 3 (bh2)", "diffusers", _diffusers_options(True),
             _diffusers_runner("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh2"}, same), "unipc"),
        Peer("diffusers DEIS 2", "diffusers", _diffusers_options(True),
             _diffusers_runner("DEISMultistepScheduler", {"solver_order": 2}, same), "deis"),
        Peer("diffusers DEIS 3", "diffusers", _diffusers_options(True),
             _diffusers_runner("DEISMultistepScheduler", {"solver_order": 3}, same), "deis"),
        # PLMS: n inference steps cost n + 1 model calls (the first step is a 2-call trapezoid)
        Peer("diffusers PNDM (PLMS)", "diffusers", _diffusers_options(False),
             _diffusers_runner("PNDMScheduler", {"skip_prk_steps": True, "set_alpha_to_one": True}, lambda n: n - 1), "pndm", min_nfe=3),
        Peer("diffusers Euler", "diffusers", _diffusers_options(True),
             _diffusers_runner("EulerDiscreteScheduler", {}, same), "euler"),
        # Heun: n steps cost 2n - 1 calls (Euler into sigma = 0); an even budget leaves one call unused
        Peer("diffusers Heun", "diffusers", _diffusers_options(True),
             _diffusers_runner("HeunDiscreteScheduler", {}, lambda n: (n + 1) // 2), "heun"),
        Peer("diffusers LMS", "diffusers", _diffusers_options(True),
             _diffusers_runner("LMSDiscreteScheduler", {}, same), "lms"),
    ]
    return peers


# ---- k-diffusion ----------------------------------------------------------------------------
_K_SAMPLING: types.ModuleType | None = None


def load_k_sampling() -> types.ModuleType:
    """``k_diffusion/sampling.py`` as a standalone module (without k_diffusion's ``__init__``)."""
    global _K_SAMPLING
    if _K_SAMPLING is not None:
        return _K_SAMPLING
    spec = importlib.util.find_spec("k_diffusion")  # locates the package; does not execute it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed: pip install --no-deps k-diffusion torchsde torchdiffeq trampoline")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    pkg_name = "_fewstep_bench_k_diffusion"
    pkg = types.ModuleType(pkg_name)
    pkg.__path__ = [str(pkg_dir)]  # type: ignore[attr-defined]
    sys.modules[pkg_name] = pkg
    utils = None
    try:  # the real utils.py, if it happens to import cleanly here
        uspec = importlib.util.spec_from_file_location(f"{pkg_name}.utils", pkg_dir / "utils.py")
        assert uspec is not None and uspec.loader is not None
        utils = importlib.util.module_from_spec(uspec)
        sys.modules[f"{pkg_name}.utils"] = utils
        uspec.loader.exec_module(utils)
    except Exception:  # torchvision / PIL / safetensors missing: a stub with the one helper sampling.py uses
        utils = types.ModuleType(f"{pkg_name}.utils")

        def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
            dims_to_append = target_dims - x.ndim
            if dims_to_append < 0:
                raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
            return x[(...,) + (None,) * dims_to_append]

        utils.append_dims = append_dims  # type: ignore[attr-defined]
        sys.modules[f"{pkg_name}.utils"] = utils
    pkg.utils = utils  # type: ignore[attr-defined]
    sspec = importlib.util.spec_from_file_location(f"{pkg_name}.sampling", pkg_dir / "sampling.py")
    assert sspec is not None and sspec.loader is not None
    mod = importlib.util.module_from_spec(sspec)
    sys.modules[f"{pkg_name}.sampling"] = mod
    sspec.loader.exec_module(mod)
    _K_SAMPLING = mod
    return mod


def k_diffusion_version() -> str:
    try:
        from importlib.metadata import version

        return version("k-diffusion")
    except Exception:  # pragma: no cover
        return "?"


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _k_sigmas(k: types.ModuleType, ctx: PeerContext, option: dict[str, Any], n: int) -> torch.Tensor:
    """k-diffusion's own grid builders, run in float64: ``n`` noise levels from sigma_max to sigma_min, then 0."""
    with _default_dtype(torch.float64):
        if option["sigmas"] == "karras":
            return k.get_sigmas_karras(n, ctx.sigma_ve_min, ctx.sigma_ve_max, rho=option.get("rho", 7.0)).to(torch.float64)
        if option["sigmas"] == "exponential":
            return k.get_sigmas_exponential(n, ctx.sigma_ve_min, ctx.sigma_ve_max).to(torch.float64)
    raise ValueError(f"unknown sigmas {option['sigmas']!r}")


def _no_noise(sigma: Any, sigma_next: Any) -> torch.Tensor:  # eta = 0: never used for anything but a zero multiple
    return torch.zeros(())


def _k_runner(fn_name: str, steps_for_nfe: Callable[[int], int], kwargs: dict[str, Any] | None = None):
    kwargs = dict(kwargs or {})

    def run(ctx: PeerContext, option: dict[str, Any], x_T: torch.Tensor, nfe: int) -> tuple[torch.Tensor, int]:
        k = load_k_sampling()
        n = steps_for_nfe(nfe)
        if n < 1:
            raise ValueError(f"{fn_name} cannot run with NFE {nfe}")
        sigmas = _k_sigmas(k, ctx, option, n)
        x = x_T.to(torch.float64) / float(ctx.sched.alpha(float(ctx.sched.t_max)))  # the VE view of the same noise
        calls0 = ctx.calls
        with _default_dtype(torch.float64):
            out = getattr(k, fn_name)(ctx.denoiser, x, sigmas, disable=True, **kwargs)
        return out.to(x_T.dtype), ctx.calls - calls0

    return run


def _k_dpm_fast(ctx: PeerContext, option: dict[str, Any], x_T: torch.Tensor, nfe: int) -> tuple[torch.Tensor, int]:
    """DPM-Solver-fast (uniform log-sigma steps from sigma_max to sigma_min, orders 3..3,2/1) with
    ``nfe - 1`` evaluations, then one denoiser call to reach sigma = 0 (DDIM's last step)."""
    k = load_k_sampling()
    if nfe < 2:
        raise ValueError("dpm_fast + denoise needs NFE >= 2")
    x = x_T.to(torch.float64) / float(ctx.sched.alpha(float(ctx.sched.t_max)))
    calls0 = ctx.calls
    with _default_dtype(torch.float64):
        x = k.sample_dpm_fast(ctx.denoiser, x, ctx.sigma_ve_min, ctx.sigma_ve_max, nfe - 1, disable=True)
        x = ctx.denoiser(x, torch.tensor(ctx.sigma_ve_min, dtype=torch.float64))
    return x.to(x_T.dtype), ctx.calls - calls0


def kdiffusion_peers() -> list[Peer]:
    """k-diffusion's deterministic samplers on Karras (rho = 7) and exponential sigmas.

    ``sample_dpmpp_2m_sde`` / ``sample_dpmpp_3m_sde`` with ``eta = 0`` are the deterministic
    DPM-Solver++(2M, Heun weights) / (3M) ODE solvers (the SDE terms vanish); ``sample_dpmpp_2s_ancestral``
    with ``eta = 0`` is DPM-Solver++(2S). The 0.1.1 wheel has no ``sample_ipndm`` / ``sample_deis``.
    """
    opts = [{"sigmas": "karras"}, {"sigmas": "exponential"}]
    same = lambda n: n  # noqa: E731
    two_stage = lambda n: (n + 1) // 2  # noqa: E731  n steps -> 2n - 1 calls (Euler into sigma = 0)
    quiet = {"eta": 0.0, "noise_sampler": _no_noise}
    return [
        Peer("k-diffusion euler", "k-diffusion", opts, _k_runner("sample_euler", same), "euler"),
        Peer("k-diffusion heun", "k-diffusion", opts, _k_runner("sample_heun", two_stage), "heun"),
        Peer("k-diffusion dpm_2", "k-diffusion", opts, _k_runner("sample_dpm_2", two_stage), "dpm_solver_2"),
        Peer("k-diffusion lms", "k-diffusion", opts, _k_runner("sample_lms", same), "lms"),
        Peer("k-diffusion dpmpp_2m", "k-diffusion", opts, _k_runner("sample_dpmpp_2m", same), "dpmpp_2m"),
        Peer("k-diffusion dpmpp_2m (heun, 2m_sde eta=0)", "k-diffusion", opts,
             _k_runner("sample_dpmpp_2m_sde", same, {**quiet, "solver_type": "heun"}), "dpmpp_2m"),
        Peer("k-diffusion dpmpp_3m (3m_sde eta=0)", "k-diffusion", opts, _k_runner("sample_dpmpp_3m_sde", same, quiet), "dpmpp_3m"),
        Peer("k-diffusion dpmpp_2s (2s_ancestral eta=0)", "k-diffusion", opts,
             _k_runner("sample_dpmpp_2s_ancestral", two_stage, quiet), "dpmpp_2s"),
        Peer("k-diffusion dpm_fast (+denoise)", "k-diffusion", [{"sigmas": "uniform log-sigma"}], _k_dpm_fast, "dpm_solver_3", min_nfe=2),
    ]


# ---- flow matching ------------------------------------------------------------------------------
#: diffusers' flow-matching mode of its multistep schedulers: ``sigma`` is the flow time t (alpha = 1 - t),
#: the model output is the velocity ``u = eps - x0`` (x0 = x - sigma u). ``flow_shift`` only warps the
#: grid (``shift t / (1 + (shift - 1) t)``); 1.0 leaves diffusers' own grid as it is.
_FLOW_MULTISTEP = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 1.0}


def _public(option: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in option.items() if not k.startswith("_")}


def _check_flow(ctx: PeerContext) -> None:
    sched = ctx.sched
    if not isinstance(sched, fewstep.FlowMatching) or float(sched.t_max) != 1.0:
        raise ValueError("diffusers' flow schedulers start from pure noise (t ~ 1): they need a FlowMatching schedule with t_max = 1")


def _flow_call_time(ctx: PeerContext, sch: Any, i: int, timestep: Any) -> float:
    """The flow time at which call ``i`` is answered: the scheduler's own ``sigmas[i]`` (= t; the
    sigma its step converts this output with), or with ``model_mode="timestep"`` ``timestep / 1000``,
    what a network conditioned on diffusers' timestep sees (DPMSolverMultistep and UniPC store
    ``int64(sigma * 1000)``, truncated)."""
    if ctx.model_mode == "timestep":
        return float(timestep) / float(sch.config.num_train_timesteps)
    return float(sch.sigmas[i])


def _flow_runner(cls_name: str, config: dict[str, Any], steps_for_nfe: Callable[[int], int] = lambda n: n):
    """A diffusers flow-matching scheduler driven by its ``step`` loop from ``x_T`` (pure noise, t = 1),
    each call answered with the velocity ``eps - x0`` at the time the scheduler assigns to it."""

    def run(ctx: PeerContext, option: dict[str, Any], x_T: torch.Tensor, nfe: int) -> tuple[torch.Tensor, int]:
        import diffusers

        _check_flow(ctx)
        n = steps_for_nfe(nfe)
        if n < 1:
            raise ValueError(f"{cls_name} cannot run with NFE {nfe}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sch = getattr(diffusers, cls_name)(num_train_timesteps=1000, **{**config, **_public(option)})  # an option overrides the config
            sch.set_timesteps(n)
        x = x_T.clone()  # diffusers' first sigma is ~1 (0.999 for DPMSolverMultistep): the same pure noise
        calls0 = ctx.calls
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, t in enumerate(sch.timesteps):
                pred = ctx.predict_at(x, _flow_call_time(ctx, sch, i, t))
                x = sch.step((pred.eps - pred.x0).to(x.dtype), t, x).prev_sample
        return x.to(x_T.dtype), ctx.calls - calls0

    return run


#: the grid knob users tune on flow schedulers: ``shift t / (1 + (shift - 1) t)`` (1.0 = diffusers' own grid,
#: the ``default`` option; the others are options of their own)
FLOW_SHIFTS = (0.5, 2.0, 3.0)


def _shifts(key: str) -> list[dict[str, Any]]:
    return [{key: s} for s in FLOW_SHIFTS]


def flow_peers() -> list[Peer]:
    """Peers for flow-matching models (FlowMatching, t_max = 1): diffusers' flow schedulers, shift 1 (and shifted).

    * ``FlowMatchEulerDiscreteScheduler``: its own grid (uniform t from 1 to 1/1000, then 0), Karras,
      exponential or beta sigmas (all in t itself).
    * ``FlowMatchHeunDiscreteScheduler``: uniform t from 1 to 1/1000, then an Euler step into 0
      (n steps, 2n - 1 calls); no grid options.
    * ``DPMSolverMultistepScheduler`` (dpmsolver++, orders 2 / 3) and ``UniPCMultistepScheduler`` (bh2,
      orders 2 / 3) with ``use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1``.
      With flow sigmas ``timestep_spacing`` has no effect (the grid is built from sigmas), DPMSolver's
      grid is uniform in t from 0.999 (it starts from the pure noise at t = 0.999), UniPC's is
      ``linspace(1, 1/1000, n + 1)[:-1]`` (first entry 1 - 1e-6), then 0. UniPC's ``use_karras_sigmas``
      maps the Karras VE sigmas of its (default) DDPM betas to ``t = s / (1 + s)``: t from 0.9937 to
      0.0099. Karras / exponential / beta / Lu sigmas are otherwise not converted to flow times (the VE
      sigmas, up to 157, are used as t: alpha < 0, NaN), so they are not offered.
    * Each also runs its uniform grid shifted, ``shift`` (FlowMatchEuler / FlowMatchHeun) or ``flow_shift``
      (DPMSolverMultistep / UniPC) in ``FLOW_SHIFTS``, the grid knob users tune (t -> shift t / (1 + (shift - 1) t);
      > 1 spends more steps near the noise end).
    """
    same = lambda n: n  # noqa: E731
    return [
        Peer("diffusers FlowMatchEuler", "diffusers",
             [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True}, *_shifts("shift")],
             _flow_runner("FlowMatchEulerDiscreteScheduler", {"shift": 1.0}), "euler"),
        # n steps cost 2n - 1 calls (Euler into t = 0); an even budget leaves one call unused
        Peer("diffusers FlowMatchHeun", "diffusers", [{}, *_shifts("shift")],
             _flow_runner("FlowMatchHeunDiscreteScheduler", {"shift": 1.0}, lambda n: (n + 1) // 2), "heun"),
        Peer("diffusers DPMSolverMultistep 2M (flow)", "diffusers", [{}, *_shifts("flow_shift")],
             _flow_runner("DPMSolverMultistepScheduler", {**_FLOW_MULTISTEP, "solver_order": 2, "algorithm_type": "dpmsolver++"}, same), "dpmpp_2m"),
        Peer("diffusers DPMSolverMultistep 3M (flow)", "diffusers", [{}, *_shifts("flow_shift")],
             _flow_runner("DPMSolverMultistepScheduler", {**_FLOW_MULTISTEP, "solver_order": 3, "algorithm_type": "dpmsolver++"}, same), "dpmpp_3m"),
        Peer("diffusers UniPC 2 (bh2, flow)", "diffusers", [{}, {"use_karras_sigmas": True}, *_shifts("flow_shift")],
             _flow_runner("UniPCMultistepScheduler", {**_FLOW_MULTISTEP, "solver_order": 2, "solver_type": "bh2"}, same), "unipc"),
        Peer("diffusers UniPC 3 (bh2, flow)", "diffusers", [{}, {"use_karras_sigmas": True}, *_shifts("flow_shift")],
             _flow_runner("UniPCMultistepScheduler", {**_FLOW_MULTISTEP, "solver_order": 3, "solver_type": "bh2"}, same), "unipc"),
    ]


# ---- EDM ----------------------------------------------------------------------------------------
def _edm_runner(cls_name: str, config: dict[str, Any]):
    """A diffusers EDM scheduler (sigma_min / sigma_max / sigma_data of the fewstep ``EDM`` schedule)
    driven by its ``scale_model_input`` / ``step`` loop from ``x_T = sigma_max z``.

    diffusers' EDM schedulers take the raw output ``F`` of an EDM-preconditioned network and form the
    denoiser themselves, ``D = c_skip(sigma) x + c_out(sigma) F`` (``precondition_outputs``,
    ``prediction_type="epsilon"``: c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)). The model's
    x0 at the call's sigma is turned into that F with the scheduler's own c_skip / c_out (the same
    float32 sigma), so each step sees the model's x0 exactly."""

    def run(ctx: PeerContext, option: dict[str, Any], x_T: torch.Tensor, nfe: int) -> tuple[torch.Tensor, int]:
        import diffusers

        sched = ctx.sched
        if not isinstance(sched, fewstep.EDM):
            raise ValueError(f"{cls_name} needs an EDM schedule")
        if nfe < 1:
            raise ValueError(f"{cls_name} cannot run with NFE {nfe}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sch = getattr(diffusers, cls_name)(sigma_min=sched.sigma_min, sigma_max=sched.sigma_max, sigma_data=sched.sigma_data,
                                               prediction_type="epsilon", **config, **_public(option))
            sch.set_timesteps(nfe)
        # x_T = sigma_max z, as fewstep and the reference start (diffusers' pipelines scale z by its
        # init_noise_sigma = sqrt(sigma_max^2 + 1), a VP habit; 1.00008 sigma_max at sigma_max = 80)
        x = x_T.clone()
        one, zero = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        calls0 = ctx.calls
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for t in sch.timesteps:
                sch.scale_model_input(x, t)  # c_in x, what the network would see with c_noise = t; sets the step index
                sigma = sch.sigmas[sch.step_index]
                # model_mode "timestep": the noise level a network reads from c_noise = log(sigma) / 4
                s_call = math.exp(4.0 * float(t)) if ctx.model_mode == "timestep" else float(sigma)
                x0 = ctx.predict_at(x, s_call).x0.to(x.dtype)
                c_skip = sch.precondition_outputs(one, zero, sigma)
                c_out = sch.precondition_outputs(zero, one, sigma)
                x = sch.step((x0 - c_skip * x) / c_out, t, x).prev_sample
        return x.to(x_T.dtype), ctx.calls - calls0

    return run


def edm_peers() -> list[Peer]:
    """Peers for EDM models: diffusers' ``EDMEulerScheduler`` and ``EDMDPMSolverMultistepScheduler``
    (dpmsolver++, midpoint, orders 2 / 3) on their ``sigma_schedule`` karras (rho 7) or exponential:
    n noise levels from sigma_max to sigma_min, then 0 (one call each)."""
    opts = [{"sigma_schedule": "karras"}, {"sigma_schedule": "exponential"}]
    return [
        Peer("diffusers EDMEuler", "diffusers", opts, _edm_runner("EDMEulerScheduler", {}), "euler"),
        Peer("diffusers EDMDPMSolverMultistep 2M", "diffusers", opts,
             _edm_runner("EDMDPMSolverMultistepScheduler", {"solver_order": 2, "algorithm_type": "dpmsolver++"}), "dpmpp_2m"),
        Peer("diffusers EDMDPMSolverMultistep 3M", "diffusers", opts,
             _edm_runner("EDMDPMSolverMultistepScheduler", {"solver_order": 3, "algorithm_type": "dpmsolver++"}), "dpmpp_3m"),
    ]


def all_peers(*, kdiffusion: bool = True, schedule: fewstep.NoiseSchedule | None = None) -> list[Peer]:
    """The peers that apply to models on ``schedule`` (default: the DDPM schedule of the oracles):
    diffusers' DDPM-family schedulers for a ``DiscreteVP``, its flow schedulers for ``FlowMatching``,
    its EDM schedulers for ``EDM``, k-diffusion's samplers wherever the start has a finite VE noise
    level (alpha(t_max) > 0)."""
    if schedule is None or isinstance(schedule, fewstep.DiscreteVP):
        peers = diffusers_peers()
    elif isinstance(schedule, fewstep.FlowMatching):
        peers = flow_peers()
    elif isinstance(schedule, fewstep.EDM):
        peers = edm_peers()
    else:
        peers = []
    if schedule is not None and float(schedule.alpha(float(schedule.t_max))) <= 0.0:
        kdiffusion = False  # k-diffusion starts at a finite sigma_max; a pure-noise start has none
    if kdiffusion:
        try:
            load_k_sampling()
            peers += kdiffusion_peers()
        except ImportError as exc:
            print(f"k-diffusion peers skipped: {exc}", file=sys.stderr)
    return peers

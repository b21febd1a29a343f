"""fewstep solvers inside diffusers pipelines: :class:`FewstepScheduler` (issue 17, part 1).

DDPM-style pipelines (betas) and flow-matching ones (``FlowMatchEulerDiscreteScheduler`` configs:
``shift``, dynamic shifting with ``mu``; the model time is ``sigma * num_train_timesteps``).

``pipe.scheduler = FewstepScheduler.from_pipeline(pipe, "dpmpp_2m")`` (or a
:class:`fewstep.SolverSchedule`): the pipeline's loop (``set_timesteps``, then per time step
``scale_model_input``, the model, ``step``) runs a fewstep solver schedule. The noise schedule is
the pipeline's own: its scheduler class is rebuilt from its config and its ``alphas_cumprod`` become
a :class:`fewstep.DiscreteVP` (the very numbers the model was trained with); ``prediction_type``
(epsilon, v_prediction, sample) becomes the fewstep parameterisation.

Each ``step`` answers the plan's pending model evaluation with the pipeline's model output and runs
the plan's affine combinations up to the next evaluation; ``prev_sample`` is that evaluation's input
(or the final sample). ``timesteps`` lists the model times of the plan's evaluations, so a pipeline
makes exactly ``nfe`` model calls. ``set_timesteps`` starts afresh: nothing carries over between
calls. The sample the pipeline passes to ``step`` is used as the evaluation's input, so pipelines
that edit latents between steps (inpainting) keep working.

diffusers is imported only here (``pip install fewstep[diffusers]``); the core never imports it.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Callable, Sequence

import torch

try:
    from diffusers import ConfigMixin, SchedulerMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerOutput
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError("fewstep.integrations.diffusers needs diffusers: pip install 'fewstep[diffusers]'") from exc

from ..errors import ArgumentError, SolverError
from ..models import Model
from ..executor import PlanRunner
from ..schedules import DiscreteVP, FlowMatching, NoiseSchedule
from ..solvers.compile import CompiledPlan, compile_plan
from ..solvers.plan import SolverSchedule
from ..solvers.presets import preset
from ..defaults import default_call

__all__ = ["FewstepScheduler", "PREDICTION_TYPES", "encode_prompt", "pipeline_model", "pipeline_schedule", "sample"]

#: diffusers' prediction_type -> fewstep's parameterisation
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}
#: config keys read from a pipeline's DDPM-style scheduler
VP_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr",
           "prediction_type", "timestep_spacing", "steps_offset")
#: config keys read from a pipeline's flow-matching scheduler (FlowMatchEulerDiscreteScheduler)
FLOW_KEYS = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
             "max_image_seq_len", "time_shift_type")


def _no_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - the pipeline calls its model
    raise SolverError("FewstepScheduler's model is the pipeline's: it answers through step()")


class FewstepScheduler(SchedulerMixin, ConfigMixin):  # type: ignore[misc]
    """A diffusers scheduler that runs a fewstep solver (a preset name with options, or a solver
    schedule saved as JSON) on the pipeline's DDPM-style noise schedule.

    Config: the pipeline scheduler's betas (``num_train_timesteps``, ``beta_start``, ``beta_end``,
    ``beta_schedule``, ``trained_betas``, ``rescale_betas_zero_snr``), its ``prediction_type``,
    ``timestep_spacing`` / ``steps_offset`` (used by ``spacing="diffusers"``), the class it came
    from (``base_scheduler``), and fewstep's ``solver`` (preset name; ``None``: the measured default
    call, :func:`fewstep.defaults.default_call`), ``solver_options`` (preset and grid options;
    ``spacing="diffusers"`` takes the base scheduler's own time steps for the NFE, ending at
    sigma = 0), ``schedule_json`` (a solver schedule instead of a preset), ``seed`` (stochastic
    presets; without it the pipeline's ``generator`` keys the noise, else a fresh seed is drawn per
    call, :meth:`_noise_key`) and ``data_dim`` (values per latent sample, which moves the default grid as
    :func:`fewstep.sample` does; :meth:`from_pipeline` reads it from the network's config)."""

    order = 1
    _compatibles: list[str] = []

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        rescale_betas_zero_snr: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        base_scheduler: str = "DDIMScheduler",
        kind: str = "vp",
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        solver: str | None = None,
        solver_options: dict[str, Any] | None = None,
        base_config: dict[str, Any] | None = None,
        schedule_json: str | None = None,
        seed: int | None = None,
        data_dim: int | None = None,
    ) -> None:
        if kind not in ("vp", "flow"):
            raise ArgumentError(f"kind must be 'vp' or 'flow', got {kind!r}")
        if kind == "flow":
            prediction_type = "flow_prediction"
        if prediction_type not in PREDICTION_TYPES:
            raise ArgumentError(f"prediction_type must be one of {sorted(PREDICTION_TYPES)}, got {prediction_type!r}")
        self._prediction = PREDICTION_TYPES[prediction_type]
        self._set_schedule(FlowMatching(shift=shift) if kind == "flow" else
                           DiscreteVP(self._base().alphas_cumprod.to(torch.float64), name=f"{base_scheduler}:{beta_schedule}"))
        self.init_noise_sigma = 1.0
        self.plan: SolverSchedule | None = None
        self._compiled: CompiledPlan | None = None
        self._runner: PlanRunner | None = None
        self.timesteps = torch.zeros(0)
        self.num_inference_steps: int | None = None
        self.autotune: Any = None  # an AutotuneOptions when from_pipeline(..., autotune=...) asked for it
        self.autotune_model: Model | None = None
        self.autotune_result: Any = None  # what autotune chose at the last set_timesteps
        self.latent_shape: tuple[int, ...] | None = None
        self.noise_seed: int | None = None  # what the last pipeline call's stochastic plan was keyed by (step)
        self.noise_indices: list[int] | None = None

    # ---- construction ----------------------------------------------------------------------------
    def _set_schedule(self, schedule: NoiseSchedule) -> None:
        self.schedule = schedule
        self.model = Model(_no_model, schedule, self._prediction, check_finite=False, name="pipeline model")

    @property
    def _time_scale(self) -> float:
        """Model time per fewstep time: flow pipelines pass ``sigma * num_train_timesteps``."""
        return float(self.config.num_train_timesteps) if self.config.kind == "flow" else 1.0

    def _base(self) -> Any:
        """The pipeline's original scheduler, rebuilt from its config (its noise levels and time steps)."""
        import diffusers

        keys = FLOW_KEYS if self.config.kind == "flow" else VP_KEYS
        cfg = dict(self.config.base_config) if self.config.base_config else {k: v for k, v in self.config.items() if k in keys}
        cls = getattr(diffusers, self.config.base_scheduler, None)
        if cls is None:
            raise ArgumentError(f"unknown diffusers scheduler class {self.config.base_scheduler!r}")
        return cls.from_config(cfg)

    @classmethod
    def from_pipeline(cls, pipe: Any, solver: str | SolverSchedule | None = None, *, seed: int | None = None, autotune: Any = False,
                      autotune_model: Model | None = None, **options: Any) -> "FewstepScheduler":
        """A scheduler for ``pipe`` (its ``scheduler.config`` gives the noise schedule and
        parameterisation) running ``solver``: a preset name with ``options``, ``None`` (the measured
        default call for the pipeline's schedule, NFE and latent size), or a
        :class:`fewstep.SolverSchedule` (made for this noise schedule; its NFE is fixed).

        ``autotune=True`` (or a :class:`fewstep.AutotuneOptions`): at each ``set_timesteps`` the grid
        (and without a named preset the preset) is autotuned for that NFE on the pipeline's network
        (:mod:`fewstep.autotune`; once, then cached by what the network computes). The network is
        tuned as :func:`pipeline_model` runs it: unconditionally, or pass ``autotune_model=
        pipeline_model(pipe, prompt_embeds=..., guidance_scale=...)`` for a conditional or guided one."""
        base = pipe.scheduler
        cfg = dict(base.config)
        if isinstance(base, FewstepScheduler):  # already swapped: keep its base
            base_name, kind, base_cfg = cfg["base_scheduler"], cfg["kind"], cfg.get("base_config")
            keep = {k: cfg[k] for k in (FLOW_KEYS if kind == "flow" else VP_KEYS) if k in cfg}
        else:
            base_name = type(base).__name__
            base_cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
            flow_dpm = bool(cfg.get("use_flow_sigmas"))  # DPMSolverMultistep & co. on flow sigmas
            kind = "flow" if flow_dpm or ("shift" in cfg and "beta_schedule" not in cfg) else "vp"
            if kind == "vp" and ("alphas_cumprod" not in dir(base) or "beta_schedule" not in cfg):
                raise ArgumentError(f"{base_name} is neither a DDPM-style (betas) nor a flow-matching scheduler")
            keep = {k: cfg[k] for k in (FLOW_KEYS if kind == "flow" else VP_KEYS) if k in cfg}
            if flow_dpm:
                keep["shift"] = float(cfg.get("flow_shift", 1.0))
        shape = _latent_shape(pipe)
        common = dict(base_scheduler=base_name, kind=kind, seed=seed, base_config=base_cfg,
                      data_dim=math.prod(shape) if shape is not None else None)
        if isinstance(solver, SolverSchedule):
            if options or autotune:
                raise ArgumentError("options and autotune apply to presets, not to a ready solver schedule")
            return cls(**keep, **common, schedule_json=solver.to_json())
        if solver is not None and not isinstance(solver, str):
            raise ArgumentError(f"solver must be a preset name, None or a SolverSchedule, got {type(solver).__name__}")
        out = cls(**keep, **common, solver=solver, solver_options=dict(options))
        out._check_solver()
        if autotune:
            from ..autotune import AutotuneOptions

            out.autotune = AutotuneOptions() if autotune is True else autotune
            if not isinstance(out.autotune, AutotuneOptions):
                raise ArgumentError(f"autotune must be True/False or a fewstep.AutotuneOptions, got {autotune!r}")
            if shape is None:
                raise ArgumentError("autotune needs the latent shape: the pipeline's network config has no in_channels / sample_size")
            if autotune_model is None:
                try:
                    autotune_model = pipeline_model(pipe)
                except ArgumentError as exc:
                    raise ArgumentError(f"{exc}; to autotune a conditional or guided pipeline pass autotune_model=pipeline_model(pipe, "
                                        "prompt_embeds=..., guidance_scale=...)") from None
            out.autotune_model = autotune_model
            out.latent_shape = shape
        return out

    # ---- the diffusers scheduler interface ---------------------------------------------------------
    def _diffusers_grid(self, nfe: int, mu: float | None) -> tuple[list[float], list[float]]:
        """The base scheduler's grid for ``nfe`` (fewstep times, ending at sigma = 0) and the model
        times it passes (flow schedulers of the DPM family round them to integers)."""
        base = self._base()
        if self.config.kind == "flow":
            kw: dict[str, Any] = {"mu": mu} if mu is not None else {}
            if getattr(self, "_pipeline_sigmas", None) is not None:
                base.set_timesteps(sigmas=self._pipeline_sigmas, **kw)
            else:
                base.set_timesteps(nfe, **kw)
            return [float(v) for v in base.sigmas.double()], [float(t) for t in base.timesteps]  # flow time = sigma
        base.set_timesteps(nfe)
        return [float(t) for t in base.timesteps] + [float(self.schedule.t_clean)], [float(t) for t in base.timesteps]

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None, mu: float | None = None,
                      sigmas: Sequence[float] | None = None, **kwargs: Any) -> None:
        """Build the plan for ``num_inference_steps`` model evaluations (a schedule file: its own NFE,
        which must match) and reset every state from a previous call. Flow pipelines with dynamic
        shifting pass ``mu`` (the shift is ``e^mu``). A pipeline's own ``sigmas`` (Flux passes them)
        set the NFE (their count) and, with ``spacing="diffusers"``, the grid; a preset's own grid
        ignores them."""
        if num_inference_steps is None:
            if sigmas is None:
                raise ArgumentError("set_timesteps needs num_inference_steps (or the pipeline's sigmas)")
            num_inference_steps = len(sigmas)
        self._pipeline_sigmas = None if sigmas is None else [float(v) for v in sigmas]
        if self.config.kind == "flow":
            shift = float(self.config.shift)
            if self.config.use_dynamic_shifting:
                if mu is None:
                    raise ArgumentError("this flow scheduler shifts dynamically: set_timesteps needs mu (as the pipeline passes it)")
                if self.config.time_shift_type != "exponential":
                    raise ArgumentError(f"time_shift_type {self.config.time_shift_type!r} is not supported (exponential is)")
                shift = math.exp(mu)
            self._set_schedule(FlowMatching(shift=shift))
        if self.config.schedule_json is not None:
            plan = SolverSchedule.from_json(self.config.schedule_json)
            if num_inference_steps != plan.nfe:
                raise SolverError(f"the solver schedule {plan.name!r} makes {plan.nfe} model evaluations; "
                                  f"the pipeline asked for num_inference_steps={num_inference_steps}")
        model_times: list[float] | None = None
        if self.config.schedule_json is None:
            opts = dict(self.config.solver_options or {})
            name = self.config.solver
            if self.autotune is not None:
                self.autotune_result = self._autotuned(num_inference_steps, name, opts)
                name, opts = self.autotune_result.preset, {**opts, **self.autotune_result.options}
            elif name is None:
                name, chosen = default_call(self.schedule, num_inference_steps, self.config.data_dim, self._prediction)
                opts = {**chosen, **opts}
            if opts.get("spacing") == "diffusers":
                opts["spacing"], model_times = self._diffusers_grid(num_inference_steps, mu)
            if self.config.data_dim is not None:
                opts.setdefault("data_dim", int(self.config.data_dim))
            opts.setdefault("model_prediction", self._prediction)
            plan = preset(name, num_inference_steps, self.schedule, **opts)
        self.plan = plan
        self._compiled = compile_plan(plan, self.schedule)
        from ..solvers.compile import Evaluate

        evals = [op.t for op in self._compiled.ops if isinstance(op, Evaluate)]
        times = [t * self._time_scale for t in evals]
        if model_times is not None and len(model_times) == len(evals) and all(abs(e - g) <= 1e-9 * max(1.0, abs(g)) for e, g in zip(evals, plan.times)):
            times = model_times  # one evaluation per step start: the model sees the base scheduler's own time steps
        dev = torch.device(device) if device is not None else None
        # float64 model times (integers and flow sigmas x 1000 exactly); MPS has no float64
        self.timesteps = torch.tensor(times, dtype=torch.float32 if dev is not None and dev.type == "mps" else torch.float64).to(dev, non_blocking=True)
        self._times = [float(v) for v in times]  # the host copy step() checks against (reading self.timesteps would wait for the device)
        self.sigmas = torch.tensor([float(self.schedule.sigma(t)) for t in plan.times], dtype=torch.float64)
        self.num_inference_steps = len(times)
        self._runner = None
        self._k = 0
        self._checks: list[tuple[torch.Tensor, float]] = []
        self.noise_seed: int | None = None
        self.noise_indices: list[int] | None = None

    def _check_solver(self) -> None:
        """Refuse an unknown preset or option now, not inside the pipeline's call: build the plan once
        at 20 evaluations (``spacing="diffusers"`` is checked when the NFE is known)."""
        opts = {k: v for k, v in dict(self.config.solver_options or {}).items() if not (k == "spacing" and v == "diffusers")}
        name = self.config.solver
        if name is None:
            name, chosen = default_call(self.schedule, 20, self.config.data_dim, self._prediction)
            opts = {**chosen, **opts}
        preset(name, 20, self.schedule, **opts)

    def _autotuned(self, nfe: int, name: str | None, opts: dict[str, Any]) -> Any:
        """The autotuned (preset, grid) for ``nfe`` on :attr:`autotune_model`."""
        from ..autotune import autotune
        from ..sample import sample
        from ..solvers.plan import schedule_fingerprint

        model = self.autotune_model
        assert model is not None
        if schedule_fingerprint(model.schedule) != schedule_fingerprint(self.schedule):
            raise ArgumentError("autotune_model runs on another noise schedule than this scheduler's (a flow pipeline's mu?): "
                                "build it with pipeline_model(pipe, mu=...) for the mu the pipeline passes")
        net = find_net(model)
        param = next(iter(net.parameters()), None) if net is not None else None
        return autotune(model, nfe, self.latent_shape, sample, preset=name, options=opts, config=self.autotune,
                        device=param.device if param is not None else None,
                        dtype=param.dtype if param is not None and param.is_floating_point() else torch.float32)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def set_begin_index(self, begin_index: int = 0) -> None:
        """img2img pipelines start part-way; fewstep plans start at their first time (only 0 is supported)."""
        if begin_index != 0:
            raise ArgumentError("FewstepScheduler runs its plan from the start (begin_index 0); for img2img build a preset with t_start=")

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, generator: Any = None,
             return_dict: bool = True, **kwargs: Any) -> SchedulerOutput | tuple[torch.Tensor]:
        """Answer the pending evaluation (at ``timestep``) with ``model_output`` and advance to the next."""
        if self._compiled is None:
            raise SolverError("call set_timesteps before step")
        if self._runner is None:
            seed, indices = None, None
            if self._compiled.stochastic:
                seed, indices = self._noise_key(generator, sample.shape[0])
            self.noise_seed, self.noise_indices = seed, indices
            self._runner = PlanRunner(self.model, sample, self._compiled, seed=seed, sample_indices=indices)
            self._op = self._runner.request()
        runner, op = self._runner, self._op
        if op is None:
            raise SolverError("step called after the last model evaluation of the plan")
        self._check_timestep(timestep, self._times[self._k])
        self._k += 1
        runner.set_pending_input(sample)  # the pipeline's latents are the evaluation's input
        runner.answer(model_output)
        self._op = runner.request()
        if self._op is None:
            self._flush_checks()
        prev = runner.result() if self._op is None else runner.pending_input
        prev = prev.to(sample.dtype)
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def _noise_key(self, generator: Any, batch: int) -> tuple[int, list[int] | None]:
        """Seed and sample indices of a stochastic plan's Brownian noise for this pipeline call:
        the config's ``seed`` when set (rows ``0..B-1``); else from the pipeline's ``generator``: one
        ``torch.Generator`` gives the seed (a digest of its current state: the same seeded generator,
        the same noise; it is not advanced, and its state is read on the host whatever its device);
        a list of them (one per sample, as diffusers allows) gives each row its own index (a digest
        of that row's generator), so sample k's noise follows its own generator as its latents do;
        without either, a fresh seed from torch's global generator (``torch.manual_seed`` repeats
        it). Recorded in :attr:`noise_seed` / :attr:`noise_indices`."""
        if self.config.seed is not None:
            return int(self.config.seed), None
        if isinstance(generator, torch.Generator):
            return _generator_digest(generator), None
        if isinstance(generator, (list, tuple)) and generator and all(isinstance(g, torch.Generator) for g in generator):
            if len(generator) != batch:
                raise ArgumentError(f"{len(generator)} generators for a batch of {batch}: give one, or one per sample")
            return 0, [_generator_digest(g) for g in generator]
        if generator is not None:
            raise ArgumentError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
        return int(torch.randint(0, 2**62, (1,)).item()), None  # a CPU draw: no device involved

    def _check_timestep(self, timestep: Any, expected: float) -> None:
        """``timestep`` must be the plan's next model time. A tensor on an accelerator is compared on
        the device and the comparisons are read once, after the last step (reading each would wait
        for the device at every step)."""
        tol = 1e-6 * max(1.0, abs(expected))
        if isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu":
            self._checks.append(((timestep.detach().reshape(-1)[:1].to(torch.float32 if timestep.device.type == "mps" else torch.float64)
                                  - expected).abs() <= tol, expected))
            return
        if abs(float(timestep) - expected) > tol:
            raise SolverError(f"step got timestep {float(timestep):g}; the plan's next evaluation is at {expected:g} "
                              "(use scheduler.timesteps in order)")

    def _flush_checks(self) -> None:
        checks, self._checks = self._checks, []
        if not checks:
            return
        ok = torch.cat([c for c, _ in checks]).cpu()
        if not bool(ok.all()):
            k = int((~ok).nonzero()[0, 0])
            raise SolverError(f"step got a timestep other than the plan's evaluation at {checks[k][1]:g} (use scheduler.timesteps in order)")

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``alpha_t x0 + sigma_t noise`` at the (per-sample) ``timesteps`` (img2img, training)."""
        t = torch.as_tensor(timesteps, dtype=torch.float64).to(original_samples.device).reshape(-1) / self._time_scale
        if t.numel() == 1:
            t = t.expand(original_samples.shape[0])
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        return (a.reshape(shape) * original_samples.double() + s.reshape(shape) * noise.double()).to(original_samples.dtype)

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)



def _generator_digest(g: torch.Generator) -> int:
    """A 62-bit number from a generator's current state (``get_state`` is host data on every device)."""
    state = g.get_state().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(g.device.type.encode() + state, digest_size=8).digest(), "little") >> 2


# ---- the direct path: a pipeline's denoiser as a fewstep model ------------------------------------------
def _latent_shape(pipe: Any) -> tuple[int, ...] | None:
    """(channels, height, width) of one latent sample, from the pipeline network's config."""
    net = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    cfg = getattr(net, "config", None)
    channels, size = getattr(cfg, "in_channels", None), getattr(cfg, "sample_size", None)
    if channels is None or size is None:
        return None
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (int(channels), *(int(v) for v in size))


def find_net(model: Model) -> Any:
    """The first torch module a model function computes with (:func:`fewstep.identity.find_modules`)."""
    from ..identity import find_modules

    mods = find_modules(model.fn)
    return mods[0] if mods else None


def pipeline_schedule(pipe: Any, mu: float | None = None) -> NoiseSchedule:
    """The noise schedule of ``pipe``'s scheduler config as a fewstep schedule (``mu``: a flow
    pipeline's dynamic shift, when its config asks for one)."""
    return _schedule_of(FewstepScheduler.from_pipeline(pipe, "ddim"), mu)


def _schedule_of(sch: FewstepScheduler, mu: float | None) -> NoiseSchedule:
    if sch.config.kind == "flow" and sch.config.use_dynamic_shifting:
        if mu is None:
            raise ArgumentError("this flow pipeline shifts its schedule dynamically: pass mu")
        return FlowMatching(shift=math.exp(mu))
    return sch.schedule


def _jsonable(v: Any) -> Any:
    """A scheduler config value as plain JSON (arrays and tensors as lists)."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "tolist"):
        return v.tolist()
    return v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)


class _PipelineModel(Model):
    """A :class:`Model` whose ``identity`` is computed when read (hashing a pipeline's weights
    costs about a second per GB, so plain sampling never pays for it); an ``identity`` set by
    hand replaces it."""

    _given: str | None = None
    _identity_of: Callable[[], str] | None = None

    @property  # type: ignore[override]
    def identity(self) -> str | None:
        if self._given is not None or self._identity_of is None:
            return self._given
        return self._identity_of()

    @identity.setter
    def identity(self, value: str | None) -> None:
        self._given = value


def pipeline_model(
    pipe: Any,
    *,
    guidance_scale: float = 1.0,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    pooled_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    mu: float | None = None,
) -> Model:
    """``pipe``'s denoiser (``pipe.unet``: ``UNet2DModel`` or ``UNet2DConditionModel``;
    ``pipe.transformer``: ``SD3Transformer2DModel``-style) as a :class:`fewstep.Model` on the
    pipeline's own schedule and parameterisation, with classifier-free guidance
    ``u + guidance_scale (c - u)`` in one doubled call when ``guidance_scale != 1`` (the negative
    embeddings default to zeros). Embeddings are per sample of the batch (``B`` rows); when the model
    is called on ``k B`` rows (parallel sampling: ``k`` time steps at once) they repeat ``k`` times.
    Prompts are given as embeddings (``pipe.encode_prompt(...)`` makes them).

    Its ``identity`` (what caches and resumes key it by, :func:`fewstep.identity.model_key`) is
    ``diffusers:<pipeline>.<net>:<digest>`` of the net's weights, the four embeddings, the guidance
    scale, ``mu`` and the noise-schedule part of the scheduler's config: two prompts or two
    guidance scales never share an identity. It is computed each time it is read (one pass over the
    weights), never while sampling."""
    sch = FewstepScheduler.from_pipeline(pipe, "ddim")
    schedule = _schedule_of(sch, mu)
    scale = float(sch._time_scale)
    net = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if net is None:
        raise ArgumentError("the pipeline has neither a transformer nor a unet")
    is_transformer = getattr(pipe, "transformer", None) is not None
    guided = guidance_scale != 1.0
    if prompt_embeds is None and (guided or is_transformer):
        raise ArgumentError("give prompt_embeds (pipe.encode_prompt makes them) for a conditional or guided model")

    def cond(x_rows: int, pos: torch.Tensor | None, neg: torch.Tensor | None) -> torch.Tensor | None:
        if pos is None:
            return None
        neg = torch.zeros_like(pos) if neg is None else neg
        if x_rows % pos.shape[0]:
            raise ArgumentError(f"the model was called on {x_rows} rows; its embeddings are for a batch of {pos.shape[0]} "
                                "(rows must be whole repeats of the batch)")
        rep = x_rows // pos.shape[0]
        pos_r, neg_r = pos.repeat(rep, *([1] * (pos.ndim - 1))), neg.repeat(rep, *([1] * (neg.ndim - 1)))
        return torch.cat([neg_r, pos_r]) if guided else pos_r

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t * scale  # float32 for half-precision latents (fewstep.Model's times): bfloat16 would round t = 999 to 1000
        xin, tin = (torch.cat([x, x]), torch.cat([tt, tt])) if guided else (x, tt)
        emb = cond(x.shape[0], prompt_embeds, negative_prompt_embeds)
        with torch.no_grad():
            if is_transformer:
                out = net(hidden_states=xin, timestep=tin, encoder_hidden_states=emb,
                          pooled_projections=cond(x.shape[0], pooled_prompt_embeds, negative_pooled_prompt_embeds)).sample
            elif emb is not None:
                out = net(xin, tin, encoder_hidden_states=emb).sample
            else:
                out = net(xin, tin).sample
        if guided:
            u, c = out.chunk(2)
            out = u + guidance_scale * (c - u)
        return out.to(x.dtype)

    kind = sch.config.kind
    sched_cfg = {k: _jsonable(v) for k, v in sch.config.items() if k in (FLOW_KEYS if kind == "flow" else VP_KEYS)}

    def identity() -> str:
        from ..identity import digest_tensor, weights_digest

        parts = {"net": [type(net).__name__, weights_digest(net)], "guidance_scale": float(guidance_scale), "mu": mu,
                 "embeddings": [None if e is None else digest_tensor(e) for e in (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                                                               negative_pooled_prompt_embeds)],
                 "scheduler": {"kind": kind, **sched_cfg}}
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
        return f"diffusers:{type(pipe).__name__}.{type(net).__name__}:{digest}"

    model = _PipelineModel(fn, schedule, sch._prediction, name=f"{type(pipe).__name__}.{type(net).__name__}")
    model._identity_of = identity
    return model


def encode_prompt(pipe: Any, prompt: Any, negative_prompt: Any, batch: int) -> dict[str, torch.Tensor]:
    """Prompt embeddings by the pipeline's own ``encode_prompt`` (Stable Diffusion: two tensors;
    SD3: four), one row per sample of the batch, as :func:`pipeline_model`'s keywords."""
    import inspect

    params = inspect.signature(pipe.encode_prompt).parameters
    kw: dict[str, Any] = {"prompt": prompt, "device": getattr(pipe, "device", None), "num_images_per_prompt": 1,
                          "do_classifier_free_guidance": True, "negative_prompt": negative_prompt}
    kw.update({k: None for k in ("prompt_2", "prompt_3") if k in params})
    with torch.no_grad():
        out = pipe.encode_prompt(**{k: v for k, v in kw.items() if k in params})
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")[: len(out)]
    emb = dict(zip(names, out))
    rows = emb["prompt_embeds"].shape[0]
    if batch % rows:
        raise ArgumentError(f"{rows} prompts for a batch of {batch}: give one prompt, or one per sample")
    return {k: v.repeat(batch // rows, *([1] * (v.ndim - 1))) for k, v in emb.items() if v is not None}


def _device_dtype(net: Any) -> tuple[torch.device, torch.dtype]:
    """Where the network computes and in which floating dtype (its first floating parameter; a
    network without parameters: the CPU in float32)."""
    for p in net.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


#: keyword arguments of :func:`sample` that go to :func:`pipeline_model`
CONDITIONING = ("guidance_scale", "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds", "mu")


def sample(
    pipe: Any,
    *,
    solver: str | SolverSchedule | None = None,
    nfe: int | None = None,
    latents: torch.Tensor | None = None,
    batch_size: int = 1,
    seed: int = 0,
    parallel: Any = False,
    return_info: bool = False,
    **kwargs: Any,
) -> Any:
    """Sample a pipeline's latents with fewstep directly (no scheduler loop): any preset or solver
    schedule, ``parallel=True`` (parallel-in-time sampling), stochastic presets keyed by ``seed``.
    ``prompt`` (and ``negative_prompt``) are encoded by the pipeline's ``encode_prompt``; the
    conditioning keywords (:data:`CONDITIONING`) go to :func:`pipeline_model`, the others to the
    preset (``spacing="diffusers"`` is not available here: pass a grid). ``latents``: the initial
    noise (default: ``fewstep.initial_noise`` of the pipeline's sample shape, keyed by ``seed``, on
    the network's device and in its dtype: ``pipe.to("cuda", torch.float16)`` samples float16 latents
    on the GPU; the solver's state stays float32, see :func:`fewstep.sample`).
    Returns the final latents (decode them as the pipeline would, e.g. with its VAE)."""
    from ..noise import initial_noise
    from ..sample import sample as fewstep_sample

    cond = {k: kwargs.pop(k) for k in CONDITIONING if k in kwargs}
    if "prompt" in kwargs:
        cond.update(encode_prompt(pipe, kwargs.pop("prompt"), kwargs.pop("negative_prompt", None), batch_size if latents is None else latents.shape[0]))
    model = pipeline_model(pipe, **cond)
    if latents is None:
        net = getattr(pipe, "transformer", None) or pipe.unet
        size = net.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        device, dtype = _device_dtype(net)
        latents = initial_noise(model.schedule, (batch_size, net.config.in_channels, *size), seed, device=device, dtype=dtype)
    return fewstep_sample(model, latents, solver, nfe=nfe, seed=seed, parallel=parallel, return_info=return_info, **kwargs)

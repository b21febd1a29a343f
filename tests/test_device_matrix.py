"""The device and dtype matrix (issue 28): every public sampling path as it runs on an accelerator,
proven on a CPU. docs/devices.md has the matrix and what each cell checks.

Columns:

* **device**: ``FEWSTEP_TEST_DEVICE`` (default ``meta``; ``cuda`` on the GPU day, set by
  ``benchmarks/gpu_session.sh``; ``cpu`` for a dry run). A ``meta`` tensor has a shape and a dtype
  but no values: an op mixing it with a tensor made on the wrong device fails, and a host read
  (``.item()``, ``bool()``, ``float()``, ``.tolist()``, ``.cpu()``) raises. The paths that read on
  purpose (NaN/Inf checks once per call, parallel sampling once per round) run under
  :class:`HostTraffic`, which answers those reads with a neutral value (0, ``True``) and counts them,
  with every host-to-device copy that would wait for the device: the counts are the host
  synchronisations the path would make on a GPU (on ``cuda`` the same mode counts without answering).
  ``search`` and ``generate`` need values (reference errors, the model probe, shards): with ``meta``
  they run on the CPU with a model asserting the device and dtype of every input.
* **bf16 / fp16**: a half-precision network and half-precision latents on the CPU (on the device
  too, where it has the kernels): the output has the input's dtype, is finite, and is close to the
  float32 run of the same network (fewstep keeps its state in float32; only the network sees half).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import pytest
import torch
from torch.overrides import TorchFunctionMode

import fewstep

DEVICE = torch.device(os.environ.get("FEWSTEP_TEST_DEVICE", "meta"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():  # pragma: no cover - asked for a GPU that is not there
    pytest.skip("FEWSTEP_TEST_DEVICE=cuda but no CUDA device", allow_module_level=True)
META = DEVICE.type == "meta"
HALF = [torch.bfloat16, torch.float16]
#: relative RMS difference from the float32 run allowed for a half-precision network (unit roundoff
#: 2^-8 for bfloat16, 2^-11 for float16, over a few model calls)
HALF_TOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}
D = 6


# ---- the host-traffic counter --------------------------------------------------------------------------
_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__complex__", "cpu", "numpy", "__array__", "nonzero"}


def _answer(name: str, t: torch.Tensor) -> Any:
    """A neutral value for a host read of a value-less tensor: zeros (``True`` for booleans)."""
    fill = True if t.dtype == torch.bool else 0
    host = torch.full(t.shape, fill, dtype=t.dtype)
    if name == "tolist":
        return host.tolist()
    if name in ("item", "__float__", "__int__", "__index__", "__complex__", "__bool__"):
        return {"__float__": float, "__int__": int, "__index__": int, "__complex__": complex, "__bool__": bool}.get(name, lambda v: v)(host.item())
    if name in ("numpy", "__array__"):
        return host.numpy()
    if name == "nonzero":
        return torch.zeros((0, t.ndim), dtype=torch.int64)
    return host


def _target(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.device | None:
    """The device a ``Tensor.to(...)`` call moves to (``None``: it keeps the tensor's device)."""
    for a in (*args, kwargs.get("device"), kwargs.get("other")):
        if isinstance(a, (str, torch.device)):
            return torch.device(a)
        if isinstance(a, torch.Tensor):
            return a.device
    return None


class HostTraffic(TorchFunctionMode):
    """Counts what would make the host wait for ``device``: ``reads`` (a value brought to the host)
    and ``uploads`` (a host-to-device copy that is not ``non_blocking``: on CUDA such a copy waits for
    the stream). ``answer=True`` (for ``meta``) answers reads with :func:`_answer`."""

    def __init__(self, device: torch.device = DEVICE, answer: bool = META) -> None:
        super().__init__()
        self.type, self.answer = device.type, answer
        self.reads: list[str] = []
        self.uploads: list[str] = []

    def _on(self, v: Any) -> bool:
        return isinstance(v, torch.Tensor) and v.device.type == self.type

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        first = args[0] if args else None
        if self.type != "cpu":
            if name in _READS and self._on(first):
                self.reads.append(name)
                if self.answer:
                    return _answer(name, first)
            elif name in ("to", "copy_") and isinstance(first, torch.Tensor):
                src, dst_probe = (args[1] if len(args) > 1 else kwargs.get("src"), first) if name == "copy_" else (first, None)
                non_blocking = bool(kwargs.get("non_blocking")) or any(a is True for a in args[1:])
                if name == "to":
                    target = _target(args[1:], kwargs)
                    if target is not None and first.device.type == "cpu" and target.type == self.type and not non_blocking:
                        self.uploads.append(f"to{tuple(first.shape)}")
                    elif target is not None and self._on(first) and target.type == "cpu":
                        self.reads.append("to(cpu)")
                        if self.answer:
                            dtype = next((a for a in (*args[1:], kwargs.get("dtype")) if isinstance(a, torch.dtype)), first.dtype)
                            return _answer("cpu", first).to(dtype)
                    return func(*args, **kwargs)
                if isinstance(src, torch.Tensor):
                    if src.device.type == "cpu" and self._on(dst_probe) and not non_blocking:
                        self.uploads.append(f"copy_{tuple(src.shape)}")
                    elif self._on(src) and isinstance(dst_probe, torch.Tensor) and dst_probe.device.type == "cpu":
                        self.reads.append("copy_(to cpu)")
            elif name in ("tensor", "as_tensor") and args and not isinstance(first, torch.Tensor):
                dev = kwargs.get("device")
                if dev is not None and torch.device(dev).type == self.type:
                    self.uploads.append(name)
        return func(*args, **kwargs)


def test_the_host_traffic_counter_sees_reads_and_uploads():
    x = torch.ones(3, device="meta")
    with HostTraffic(torch.device("meta"), answer=True) as ht:
        assert x.sum().item() == 0.0 and bool(x.sum() > 0) and x.tolist() == [0.0, 0.0, 0.0] and float(x[0]) == 0.0
        assert x.cpu().shape == (3,) and x.to("cpu").device.type == "cpu"
        torch.tensor([1.0, 2.0], device="meta")
        torch.ones(2).to("meta")
        torch.ones(2).to("meta", non_blocking=True)  # asynchronous: not counted
        torch.full((2,), 3.0, device="meta") * torch.tensor(2.0)  # a CPU scalar: a kernel argument
    assert len(ht.reads) == 6 and ht.uploads == ["tensor", "to(2,)"]


# ---- models --------------------------------------------------------------------------------------------
def _net(device: torch.device, dtype: torch.dtype) -> torch.nn.Linear:
    torch.manual_seed(0)
    lin = torch.nn.Linear(D, D)
    with torch.no_grad():
        lin.weight.mul_(0.5).add_(torch.eye(D))
    return lin.to(device=device, dtype=dtype)


def tiny_model(schedule: fewstep.NoiseSchedule, device: torch.device = DEVICE, dtype: torch.dtype = torch.float32, **kw: Any) -> fewstep.Model:
    """A Linear network on ``device`` in ``dtype`` predicting a bounded x0 (any schedule), asserting
    that every call gets its inputs on the network's device and in its dtype (times: float32 for a
    half-precision network, as :class:`fewstep.Model` documents)."""
    lin = _net(device, dtype)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert x.device.type == device.type and x.dtype == dtype, (x.device, x.dtype)
        assert t.device.type == device.type and t.dtype == (dtype if dtype in (torch.float32, torch.float64) else torch.float32), t.dtype
        return 2.0 * torch.tanh(0.1 * lin(x))

    return fewstep.Model(fn, schedule, "x0", name=f"linear-{device.type}-{str(dtype)[6:]}", **kw)


SCHEDULES = {"vp": fewstep.DiscreteVP.linear, "edm": fewstep.EDM, "flow": fewstep.FlowMatching}
#: one preset of every family (registry families), each on a schedule it is made for
PRESETS = [
    ("dpmpp_2m", "vp", {}),  # exponential multistep
    ("unipc", "flow", {}),  # exponential multistep, predictor-corrector
    ("dpm_solver_3", "vp", {}),  # singlestep DPM-Solver
    ("dpmpp_2s", "edm", {}),  # singlestep DPM-Solver++
    ("lms", "edm", {}),  # linear multistep
    ("ipndm", "vp", {}),  # linear multistep
    ("heun", "edm", {}),  # EDM / Heun
    ("edm_sde", "edm", {}),  # EDM with churn (a second Brownian channel)
    ("euler_ancestral", "vp", {}),  # ancestral
    ("dpmpp_2m_sde", "vp", {}),  # SDE
    ("sa_solver", "vp", {}),  # SA-Solver
    ("er_sde", "edm", {}),  # ER-SDE
    ("lcm", "vp", {}),  # LCM
]
IDS = [p[0] for p in PRESETS]
NFE = 6


def _noise(schedule: fewstep.NoiseSchedule, batch: int = 3, device: torch.device = DEVICE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return fewstep.initial_noise(schedule, (batch, D), 0, device=device, dtype=dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


# ---- sample(): every preset family on the device -----------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name,sched,opts", PRESETS, ids=IDS)
def test_sample_on_the_device(name, sched, opts, dtype):
    """Output on the input's device in its dtype; with the NaN/Inf check off no host read at all
    (bare ``meta`` fails on any); with it on (the default) exactly one, at the end of the call; and
    no host-to-device copy that waits for the device."""
    schedule = SCHEDULES[sched]()
    x = _noise(schedule, dtype=dtype)
    quiet, checked = tiny_model(schedule, dtype=dtype, check_finite=False), tiny_model(schedule, dtype=dtype)
    with HostTraffic(answer=False) as ht:  # bare: a read on meta raises
        out = fewstep.sample(quiet, x, name, nfe=NFE, seed=1, **opts)
    assert out.device == x.device and out.dtype == dtype and out.shape == x.shape
    if DEVICE.type != "cpu":
        assert ht.reads == [] and ht.uploads == []
        with HostTraffic() as ht:
            fewstep.sample(checked, x, name, nfe=NFE, seed=1, **opts)
        assert len(ht.reads) == 1 and ht.uploads == [], (ht.reads, ht.uploads)  # the one deferred NaN/Inf check
    else:
        assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,sched,opts", PRESETS, ids=IDS)
def test_sample_in_half_precision_is_close_to_float32(name, sched, opts, dtype):
    """A half-precision x_T and network (CPU): the samples come back in that dtype, finite, within a
    half-precision tolerance of the float32 run (the state and the noise stay float32)."""
    schedule = SCHEDULES[sched]()
    x32 = _noise(schedule, batch=4, device=torch.device("cpu"))
    ref = fewstep.sample(tiny_model(schedule, torch.device("cpu")), x32, name, nfe=NFE, seed=1, **opts)
    states: list[torch.dtype] = []
    out = fewstep.sample(tiny_model(schedule, torch.device("cpu"), dtype), x32.to(dtype), name, nfe=NFE, seed=1,
                         callback=lambda i, t, x: states.append(x.dtype), **opts)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    assert states and set(states) == {torch.float32}  # the solver's state: float32 (the network alone sees half)
    assert _rel(out, ref) < HALF_TOL[dtype], _rel(out, ref)


# ---- parallel sampling -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_sde"])
def test_parallel_on_the_device_reads_once_per_round(name, dtype):
    """Parallel-in-time sampling reads the window's residuals once per round (by design) and the
    NaN/Inf checks once per call; nothing else waits for the device."""
    schedule = fewstep.DiscreteVP.linear()
    x = _noise(schedule, dtype=dtype)
    opts = fewstep.ParallelOptions(window=4, max_batch=7)
    model = tiny_model(schedule, dtype=dtype)
    with HostTraffic() as ht:
        out, info = fewstep.sample(model, x, name, nfe=10, seed=1, parallel=opts, return_info=True)
    assert out.device == x.device and out.dtype == dtype
    rounds = info.extra["parallel"].rounds
    if DEVICE.type != "cpu":
        assert len(ht.reads) == rounds + 1, (ht.reads, rounds)
        # models.py's Model.output_rows builds each round's per-row times with torch.tensor(device=): one upload per call
        assert all(u == "tensor" for u in ht.uploads) and len(ht.uploads) <= info.calls, (ht.uploads, info.calls)


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_parallel_in_half_precision_matches_sequential(dtype):
    schedule = fewstep.DiscreteVP.linear()
    cpu = torch.device("cpu")
    model = tiny_model(schedule, cpu, dtype)
    x = _noise(schedule, batch=4, device=cpu, dtype=dtype)
    seq = fewstep.sample(model, x, "dpmpp_2m", nfe=12)
    par = fewstep.sample(model, x, "dpmpp_2m", nfe=12, parallel=fewstep.ParallelOptions(window=5, max_batch=9))
    assert par.dtype == dtype and fewstep.rmse(par.float(), seq.float()) < 10 * fewstep.ParallelOptions().tol


# ---- search and generate: they read values (reference solves, errors, files) ---------------------------
#: search and generate read sample values (reference errors to rank candidates, the model probe, the
#: shards): not possible on meta, so with FEWSTEP_TEST_DEVICE=meta they run on the CPU with a model
#: that asserts the device and dtype of every input (on CUDA: on the GPU)
VALUE_DEVICE = torch.device("cpu") if META else DEVICE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_search_tiny(tmp_path, dtype):
    """A tiny search on noises on the device in the given dtype: every model call gets its inputs
    there, and the searched schedule samples."""
    schedule = fewstep.DiscreteVP.linear()
    model = tiny_model(schedule, VALUE_DEVICE, dtype)
    model.identity = f"device-matrix-linear-{dtype}"
    cal = _noise(schedule, batch=8, device=VALUE_DEVICE, dtype=dtype)
    plan = fewstep.search(model, 4, calibration=cal, heldout=_noise(schedule, batch=8, device=VALUE_DEVICE, dtype=dtype) * 0.9,
                          cache_dir=tmp_path, generations=2, population=3, offspring=6, reference_nfe=24,
                          seed_presets=[("dpmpp_2m", {})], seed_spacings=["logistic"])
    out = fewstep.sample(model, cal, plan)
    assert plan.nfe == 4 and out.dtype == dtype and out.device.type == VALUE_DEVICE.type and bool(torch.isfinite(out).all())


def test_generate_tiny(tmp_path):
    """generate() samples float32 on the device it is given (its manifest records float32); a
    half-precision network runs inside the model function."""
    schedule = fewstep.DiscreteVP.linear()
    inner = tiny_model(schedule, VALUE_DEVICE, torch.bfloat16)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert x.device.type == VALUE_DEVICE.type and x.dtype == torch.float32
        return inner.fn(x.to(torch.bfloat16), t).float()

    model = fewstep.Model(fn, schedule, "x0", name="linear-bf16-in-fp32", sample_shape=(D,), identity="device-matrix-generate")
    info = fewstep.generate(model, num=5, out=tmp_path / "g", solver="dpmpp_2m_sde", nfe=4, batch_size=3, device=VALUE_DEVICE, progress=False)
    got = fewstep.load_samples(tmp_path / "g")
    assert info.generated == 2 and got.shape == (5, D) and got.dtype == torch.float32 and bool(torch.isfinite(got).all())


# ---- diffusers: the scheduler in a pipeline's loop and the direct path ---------------------------------


def _diffusers() -> Any:
    return pytest.importorskip("diffusers")


def _unet(device: torch.device, dtype: torch.dtype) -> Any:
    dif = _diffusers()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = dif.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                              down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                              norm_num_groups=4).eval()
        return net.to(device=device, dtype=dtype)


def _ddpm(device: torch.device, dtype: torch.dtype) -> Any:
    dif = _diffusers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = dif.DDPMPipeline(unet=_unet(device, dtype), scheduler=dif.DDIMScheduler(set_alpha_to_one=True, clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _loop(pipe: Any, scheduler: Any, latents: torch.Tensor, n: int, generator: Any = None) -> torch.Tensor:
    """A diffusers pipeline's denoising loop (set_timesteps on the execution device, the network,
    scheduler.step with the pipeline's generator)."""
    scheduler.set_timesteps(n, device=latents.device)
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = pipe.unet(latents, t).sample
        latents = scheduler.step(out, t, latents, generator=generator).prev_sample
    return latents


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", ["unipc", "dpmpp_2m_sde"])
def test_diffusers_scheduler_in_a_pipeline_loop_on_the_device(name, dtype):
    """timesteps on the execution device, latents and network there in the pipeline's dtype: the
    latents come back there in that dtype; the one host read per pipeline call checks the timesteps
    the pipeline passed, after the last step."""
    from fewstep.integrations.diffusers import FewstepScheduler

    pipe = _ddpm(DEVICE, dtype)
    sch = FewstepScheduler.from_pipeline(pipe, name)
    latents = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    with HostTraffic() as ht:
        out = _loop(pipe, sch, latents, 5, generator=torch.Generator().manual_seed(3))
    assert out.device == latents.device and out.dtype == dtype and out.shape == latents.shape
    assert sch.timesteps.device.type == DEVICE.type
    if DEVICE.type != "cpu":
        assert len(ht.reads) == 1 and ht.uploads == [], (ht.reads, ht.uploads)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=["fp32", "bf16", "fp16"])
def test_diffusers_direct_path_default_latents_on_the_network_device_and_dtype(dtype):
    """fewstep.integrations.diffusers.sample without latents: they are made where the network is and
    in its dtype (``pipe.to("cuda", torch.float16)``), and the samples come back there."""
    from fewstep.integrations.diffusers import sample as pipe_sample

    pipe = _ddpm(DEVICE, dtype)
    with HostTraffic() as ht:
        out = pipe_sample(pipe, solver="dpmpp_2m", nfe=4, batch_size=2)
    assert out.device.type == DEVICE.type and out.dtype == dtype and out.shape == (2, 3, 8, 8)
    if DEVICE.type != "cpu":
        assert len(ht.reads) == 1, ht.reads  # the deferred NaN/Inf check


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_diffusers_direct_path_in_half_precision_is_close_to_float32(dtype):
    """The tiny UNet in half precision against float32 (CPU), both through the direct path; the
    network sees the same float32 timesteps in both (bfloat16 would round t = 999 to 1000)."""
    from fewstep.integrations.diffusers import sample as pipe_sample

    cpu = torch.device("cpu")
    seen: dict[torch.dtype, list[torch.Tensor]] = {}
    outs = {}
    for dt in (torch.float32, dtype):
        pipe = _ddpm(cpu, dt)
        hook = pipe.unet.register_forward_pre_hook(lambda mod, args, dt=dt: seen.setdefault(dt, []).append(args[1].clone()))
        try:
            outs[dt] = pipe_sample(pipe, solver="unipc", nfe=5, batch_size=2)
        finally:
            hook.remove()
    assert outs[dtype].dtype == dtype and bool(torch.isfinite(outs[dtype]).all())
    assert all(torch.equal(a.double(), b.double()) for a, b in zip(seen[dtype], seen[torch.float32])), (seen[dtype][0], seen[torch.float32][0])
    assert _rel(outs[dtype], outs[torch.float32]) < HALF_TOL[dtype]


# ---- k-diffusion adapters ---------------------------------------------------------------------------
def _denoiser(device: torch.device, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    lin = _net(device, dtype)

    def D_(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:  # k-diffusion's D(x, sigma) -> x0
        assert x.device.type == device.type and x.dtype == dtype and sigma.device.type == device.type
        return 2.0 * torch.tanh(0.1 * lin(x) / (1.0 + sigma[:, None] ** 2) ** 0.5)

    return D_


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", ["heun", "dpmpp_2m_sde"])
def test_kdiffusion_adapters_on_the_device(name, dtype):
    """``sampler(...)`` with k-diffusion's calling convention and ``from_denoiser`` + ``sample`` on the
    device: sigmas given as host numbers need no read; sigmas on the device (not possible on meta:
    the plan is built from their values) are read once per call."""
    from fewstep.integrations.kdiffusion import from_denoiser, sampler

    sigmas = [80.0 * (0.002 / 80.0) ** (i / 5) for i in range(6)] + [0.0]
    x = 80.0 * torch.ones(2, D, device=DEVICE, dtype=dtype)
    den = _denoiser(DEVICE, dtype)
    with HostTraffic() as ht:
        out = sampler(name)(den, x, torch.tensor(sigmas, dtype=torch.float64), seed=2)
    assert out.device == x.device and out.dtype == dtype
    model = from_denoiser(den)
    model.check_finite = False
    with HostTraffic(answer=False) as bare:
        out2 = fewstep.sample(model, x, name, nfe=6, seed=2)
    assert out2.device == x.device and out2.dtype == dtype
    if DEVICE.type != "cpu":
        assert len(ht.reads) == 1 and ht.uploads == [] and bare.reads == [] and bare.uploads == []
    if not META:
        on_device = torch.tensor(sigmas, device=DEVICE)
        with HostTraffic() as ht:
            sampler(name)(den, x, on_device, seed=2)
        if DEVICE.type != "cpu":
            assert len(ht.reads) == 2, ht.reads  # the sigmas once, the NaN/Inf check once


def test_kdiffusion_adapters_in_half_precision_are_close_to_float32():
    from fewstep.integrations.kdiffusion import sampler

    cpu = torch.device("cpu")
    sigmas = [80.0 * (0.002 / 80.0) ** (i / 7) for i in range(8)] + [0.0]
    x = 80.0 * torch.randn(3, D, generator=torch.Generator().manual_seed(0))
    ref = sampler("dpmpp_2m")(_denoiser(cpu, torch.float32), x, sigmas)
    for dtype in HALF:
        out = sampler("dpmpp_2m")(_denoiser(cpu, dtype), x.to(dtype), sigmas)
        assert out.dtype == dtype and _rel(out, ref) < HALF_TOL[dtype]


# ---- the plan cache keys option values by value ---------------------------------------------------------
def test_the_plan_cache_keys_a_tensor_grid_by_its_values():
    """A tensor passed as ``spacing=`` and edited in place gives the new plan, not the cached one."""
    schedule = fewstep.DiscreteVP.linear()
    model = tiny_model(schedule, torch.device("cpu"))
    x = _noise(schedule, device=torch.device("cpu"))
    grid = torch.tensor([999.0, 600.0, 300.0, 0.0], dtype=torch.float64)
    _, first = fewstep.sample(model, x, "ddim", nfe=3, spacing=grid, return_info=True)
    grid[1] = 400.0
    _, second = fewstep.sample(model, x, "ddim", nfe=3, spacing=grid, return_info=True)
    assert first.plan.times[1] == 600.0 and second.plan.times[1] == 400.0
    _, third = fewstep.sample(model, x, "ddim", nfe=3, spacing=grid.clone(), return_info=True)  # equal values: the same plan
    assert third.plan is second.plan

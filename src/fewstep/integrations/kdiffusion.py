"""k-diffusion interop, both ways (issue 17, part 1); k-diffusion itself is never imported.

* :func:`from_denoiser`: a k-diffusion denoiser ``D(x, sigma)`` (VE variable ``x = x0 + sigma eps``,
  returning the denoised ``x0``; e.g. ``k_diffusion.external.CompVisDenoiser`` or an EDM network) as
  a :class:`fewstep.Model` on :class:`fewstep.EDM`, so every preset, searched schedule and parallel
  sampling run on it;
* :func:`sampler`: a fewstep preset as a ``k_diffusion.sampling.sample_*``-style function
  ``fn(model, x, sigmas, extra_args=None, callback=None, disable=None)``, on the caller's ``sigmas``
  (the same step count; a preset spends its own NFE on them, e.g. Heun 2 per step).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..errors import ArgumentError, FewstepError, SolverError
from ..models import Model
from ..sample import sample
from ..schedules import EDM
from ..solvers.plan import SolverSchedule
from ..solvers.presets import preset

__all__ = ["from_denoiser", "sampler", "plan_for_sigmas"]

Denoiser = Callable[..., torch.Tensor]


def from_denoiser(denoiser: Denoiser, *, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
                  name: str | None = None, **extra_args: Any) -> Model:
    """``denoiser(x, sigma, **extra_args) -> x0`` as a fewstep model (data prediction on ``EDM``;
    the model time is the noise level sigma, passed per sample). ``x_T`` for it is
    ``sigma_max * randn`` (``fewstep.initial_noise(model.schedule, ...)``)."""
    if not callable(denoiser):
        raise ArgumentError(f"denoiser must be callable D(x, sigma), got {type(denoiser).__name__}")
    sched = EDM(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return denoiser(x, t.to(x.dtype), **extra_args)

    return Model(fn, sched, "x0", name=name or getattr(denoiser, "__name__", type(denoiser).__name__))


def _host_floats(values: torch.Tensor | Sequence[float]) -> list[float]:
    """Noise levels as host floats: a tensor is read once (one host synchronisation on an
    accelerator, not one per element)."""
    if isinstance(values, torch.Tensor):
        return [float(v) for v in values.detach().to("cpu", torch.float64).reshape(-1).tolist()]
    return [float(v) for v in values]


def plan_for_sigmas(solver: str, sigmas: torch.Tensor | Sequence[float], schedule: EDM, **options: Any) -> SolverSchedule:
    """The preset on exactly the grid ``sigmas`` (decreasing, ending at 0): the largest NFE that gives
    ``len(sigmas) - 1`` steps (a multistep preset: one per step; Heun: two per step and one on the
    last, as k-diffusion's ``sample_heun``)."""
    grid = _host_floats(sigmas)
    steps = len(grid) - 1
    if steps < 1:
        raise ArgumentError("sigmas must hold at least two noise levels")
    last: FewstepError | None = None
    for nfe in range(4 * steps + 1, steps - 1, -1):
        try:
            plan = preset(solver, nfe, schedule, spacing=grid, **options)
        except FewstepError as exc:
            last = exc
            continue
        if plan.n_steps == steps:
            return plan
    raise SolverError(f"preset {solver!r} cannot run on these {steps} steps" + (f": {last}" if last else ""))


def sampler(solver: str | SolverSchedule, **options: Any) -> Callable[..., torch.Tensor]:
    """A k-diffusion-style sampling function running ``solver`` (a preset name with ``options``, or a
    solver schedule on the EDM schedule, which then ignores ``sigmas`` other than their ends)::

        fn(model, x, sigmas, extra_args=None, callback=None, disable=None, seed=None) -> x0

    ``model(x, sigma, **extra_args)`` is the denoiser, ``x = sigmas[0] * noise``; ``callback``
    receives ``{"x", "i", "sigma", "sigma_hat"}`` after each step (fewstep's states; no
    ``denoised``); ``seed`` keys a stochastic preset's Brownian noise (default: a fresh seed from
    torch's global generator, as k-diffusion's own samplers draw ``torch.randn_like``: ``torch.manual_seed``
    repeats it). ``sigmas`` may live on the device (``get_sigmas_karras(..., device=...)``): they are
    read to the host once per call to build the plan (k-diffusion's samplers read them at every step)."""

    def sample_fn(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor | Sequence[float], extra_args: dict[str, Any] | None = None,
                  callback: Callable[[dict[str, Any]], None] | None = None, disable: bool | None = None, seed: int | None = None) -> torch.Tensor:
        grid = _host_floats(sigmas)
        positive = [s for s in grid if s > 0]
        if not positive or grid[-1] != 0.0 and len(positive) < 2:
            raise ArgumentError("sigmas must be decreasing noise levels (k-diffusion appends a final 0)")
        wrapped = from_denoiser(model, sigma_min=min(positive) if grid[-1] == 0.0 else min(positive) / 2, sigma_max=grid[0], **(extra_args or {}))
        plan = solver if isinstance(solver, SolverSchedule) else plan_for_sigmas(solver, grid, wrapped.schedule, **options)
        def relay(i: int, t: float, xi: torch.Tensor) -> None:
            assert callback is not None
            callback({"x": xi, "i": i - 1, "sigma": t, "sigma_hat": t})

        return sample(wrapped, x, plan, callback=relay if callback is not None else None, progress=disable is False, seed=seed)  # type: ignore[return-value]

    sample_fn.__name__ = f"sample_fewstep_{solver if isinstance(solver, str) else solver.name}"
    return sample_fn

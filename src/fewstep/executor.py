"""The sequential executor of a compiled plan: :class:`PlanRunner` steps the plan's affine program,
the caller answering each model evaluation; :func:`run_plan` answers with one model call each.

Both sampling paths stand on it: :func:`fewstep.sample` runs :func:`run_plan`, and parallel-in-time
sampling (:mod:`fewstep.parallel`) replays the same program from a runner's snapshots.

A plan may have per-dimension coefficients (DPM-Solver-v3's, :mod:`fewstep.solvers.ems`): float64
tensors of the sample shape, cast to the working dtype and moved to the state's device once per
runner; such a plan may also require one model (its statistics' :func:`~fewstep.identity.model_key`)
and one sample shape, both checked before the first model call. Plans with scalar coefficients only
run the same loop as before.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .errors import ShapeError, SolverError
from .models import Model, prediction_coefficients
from .noise import NoiseSource, make_noise_source
from .solvers.compile import Combine, CompiledPlan, Evaluate

__all__ = ["PlanRunner", "run_plan", "Callback"]

#: ``callback(i, t_i, x_i)``: sees every grid state once, in its final form
Callback = Callable[[int, float, torch.Tensor], None]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


Key = tuple[str, int]  # ("state" | "out" | "x0" | "eps", index): a tensor the loop keeps


def _nonzero(c: Any) -> bool:
    return bool(torch.count_nonzero(c)) if isinstance(c, torch.Tensor) else c != 0.0


def _expand(model: Model, plan: CompiledPlan, fold: bool) -> list[list[tuple[Key, Any]]]:
    """Each Combine as ``sum_k c_k T_k`` over kept tensors. With ``fold`` the prediction conversion
    ``D = p X[state] + q out`` (:func:`~fewstep.models.prediction_coefficients`) is folded into the
    coefficients, so a step costs one multiply-add per distinct tensor and x0/eps are never formed.
    A coefficient is a float, or a float64 tensor of the sample shape (per-dimension weights)."""
    where: dict[int, Evaluate] = {}
    programs: list[list[tuple[Key, Any]]] = []
    for op in plan.ops:
        if isinstance(op, Evaluate):
            where[op.slot] = op
            continue
        acc: dict[Key, Any] = {("state", op.base): op.a}
        for slot, kind, c in op.terms:
            if fold:
                ev = where[slot]
                p0, q0, pe, qe = prediction_coefficients(model.prediction, ev.alpha, ev.sigma)
                p, q = (p0, q0) if kind == "x0" else (pe, qe)
                parts = [(("state", ev.state), p), (("out", slot), q)]
            else:
                parts = [((kind, slot), 1.0)]
            for key, w in parts:
                if w != 0.0:
                    acc[key] = acc.get(key, 0.0) + c * w
        programs.append([(k, w) for k, w in acc.items() if k == ("state", op.base) or _nonzero(w)])
    return programs


def _last_uses(plan: CompiledPlan, programs: list[list[tuple[Key, Any]]]) -> dict[Key, int]:
    last: dict[Key, int] = {("state", plan.output): len(plan.ops)}
    combines = iter(programs)
    for k, op in enumerate(plan.ops):
        keys = [("state", op.state)] if isinstance(op, Evaluate) else [key for key, _ in next(combines)]
        for key in keys:
            last[key] = max(last.get(key, -1), k)
    return last


class PlanRunner:
    """Stepwise execution of a compiled plan's affine program, the caller answering each model
    evaluation: :meth:`request` runs the combinations up to the next ``Evaluate`` and returns it
    (its input state is :attr:`pending_input`), :meth:`answer` takes the model's output there, and
    :meth:`result` is the final state. The sequential loop (:func:`run_plan`) answers with one model
    call per request; search answers many runners with one batched call (per-row times).

    Without thresholding (which is not affine) the answer is the model's raw output and the
    prediction conversion is folded into the combination coefficients (``fold``); with it the answer
    is a :class:`~fewstep.Prediction`. States are kept in float32 (or float64); the model sees the
    input dtype. Fresh noise (stochastic steps) comes from ``noise`` (default: the Brownian path of each
    ``(seed, sample index)``, :class:`~fewstep.noise.BrownianNoise`)."""

    def __init__(
        self,
        model: Model,
        x_T: torch.Tensor,
        plan: CompiledPlan,
        *,
        callback: Callback | None = None,
        seed: int | None = None,
        sample_indices: Sequence[int] | torch.Tensor | None = None,
        noise: NoiseSource | str | None = None,
    ) -> None:
        self.plan, self.callback, self.seed, self.sample_indices = plan, callback, seed, sample_indices
        self._noise_spec, self._noise_seed = noise, 0 if seed is None else seed
        self._sources: dict[int, NoiseSource] = {}
        if plan.stochastic and seed is None and (noise is None or isinstance(noise, str)):
            raise SolverError("this solver schedule draws noise; pass seed=")
        if plan.stochastic:
            self._source(0)  # a bad ``noise`` argument fails here, before any model call
        self.in_dtype = x_T.dtype
        self.work = _work_dtype(x_T.dtype)
        self.fold = model.threshold is None
        _check_requirements(model, x_T, plan)
        self._programs = _expand(model, plan, self.fold)
        self._last = _last_uses(plan, self._programs)
        #: per-dimension plans: each combination's bias, the coefficients on the state's device and dtype
        self._biases: list[torch.Tensor | None] | None = None
        if plan.per_dimension:
            dev = x_T.device
            cast = lambda c: c.to(device=dev, dtype=self.work) if isinstance(c, torch.Tensor) else c  # noqa: E731
            self._programs = [[(k, cast(c)) for k, c in prog] for prog in self._programs]
            self._biases = [cast(op.bias) for op in plan.ops if isinstance(op, Combine)]
            self._combine = self._combine_per_dimension  # type: ignore[method-assign]
        self._kept: dict[Key, torch.Tensor] = {("state", 0): x_T.to(self.work)}
        self._ci = 0  # index of the next combination program
        self._k = 0  # index of the next op
        self._pending: Evaluate | None = None

    def _source(self, channel: int) -> NoiseSource:
        """The noise source of one Brownian channel (0: step noise, 1: EDM churn), made on first use."""
        if channel not in self._sources:
            self._sources[channel] = make_noise_source(self._noise_spec, self._noise_seed, channel)
        return self._sources[channel]

    def _release(self, keys: Sequence[Key], k: int) -> None:
        for key in keys:
            if self._last.get(key, -1) <= k:
                self._kept.pop(key, None)

    def request(self) -> Evaluate | None:
        """Run the combinations up to the next evaluation and return it; ``None`` when finished."""
        if self._pending is not None:
            raise SolverError("the pending evaluation has not been answered")
        ops = self.plan.ops
        while self._k < len(ops):
            op = ops[self._k]
            if isinstance(op, Evaluate):
                self._pending = op
                return op
            self._combine(op, self._programs[self._ci])
            self._ci += 1
            self._k += 1
        return None

    @property
    def pending_state(self) -> torch.Tensor:
        """The pending evaluation's input in the working dtype (not a copy: do not change it in place)."""
        assert self._pending is not None
        return self._kept[("state", self._pending.state)]

    def set_pending_input(self, x: torch.Tensor) -> None:
        """Replace the pending evaluation's input (a caller that edits the state between steps, as
        diffusers pipelines may; the combinations read the new state from here on)."""
        assert self._pending is not None
        self._kept[("state", self._pending.state)] = x.to(self.work)

    @property
    def pending_input(self) -> torch.Tensor:
        assert self._pending is not None
        return self._kept[("state", self._pending.state)].to(self.in_dtype)

    def answer(self, out: torch.Tensor | Any) -> None:
        """The model's raw output (``fold``) or its :class:`~fewstep.Prediction` at the pending evaluation."""
        op = self._pending
        if op is None:
            raise SolverError("no evaluation is pending")
        if self.fold:
            self._kept[("out", op.slot)] = out.to(self.work)
        else:
            self._kept[("x0", op.slot)], self._kept[("eps", op.slot)] = out.x0.to(self.work), out.eps.to(self.work)
        self._release([("state", op.state)], self._k)
        self._pending = None
        self._k += 1

    def _combine(self, op: Combine, program: list[tuple[Key, Any]]) -> None:
        (key0, c0), rest = program[0], program[1:]
        x = self._kept[key0] * c0 if c0 != 1.0 else self._kept[key0].clone()
        for key, c in rest:
            x.add_(self._kept[key], alpha=c)
        self._finish(op, program, x)

    def _combine_per_dimension(self, op: Combine, program: list[tuple[Key, Any]]) -> None:
        """:meth:`_combine` where coefficients may be tensors of the sample shape (broadcast over the batch)."""
        (key0, c0), rest = program[0], program[1:]
        x = self._kept[key0] * c0 if isinstance(c0, torch.Tensor) or c0 != 1.0 else self._kept[key0].clone()
        for key, c in rest:
            if isinstance(c, torch.Tensor):
                x.addcmul_(self._kept[key], c)
            else:
                x.add_(self._kept[key], alpha=c)
        bias = self._biases[self._ci]  # type: ignore[index]
        if bias is not None:
            x.add_(bias)
        self._finish(op, program, x)

    def _finish(self, op: Combine, program: list[tuple[Key, Any]], x: torch.Tensor) -> None:
        for c, lam_from, lam_to, channel in op.noise:
            z = self._source(channel).increment(lam_from, lam_to, x.shape, indices=self.sample_indices, dtype=self.work, device=x.device)
            x.add_(z, alpha=c)
        self._kept[("state", op.target)] = x
        self._release([key for key, _ in program], self._k)
        if self.callback is not None and op.grid_index is not None:
            self.callback(op.grid_index, self.plan.times[op.grid_index], x)

    def snapshot(self) -> tuple[Any, ...]:
        """The runner's position and kept tensors (a shallow copy: kept tensors are never changed in
        place), for :meth:`restore`; parallel sampling replays the program from such a point."""
        return dict(self._kept), self._ci, self._k, self._pending

    def restore(self, snap: tuple[Any, ...]) -> None:
        kept, self._ci, self._k, self._pending = snap
        self._kept = dict(kept)

    @property
    def finished(self) -> bool:
        return self._k >= len(self.plan.ops) and self._pending is None

    def result(self) -> torch.Tensor:
        if self._k < len(self.plan.ops) or self._pending is not None:
            raise SolverError("the plan has not finished")
        return self._kept[("state", self.plan.output)].to(self.in_dtype)


def _check_requirements(model: Model, x_T: torch.Tensor, plan: CompiledPlan) -> None:
    """Refuse, before any model call, samples of another shape than the plan's per-dimension
    coefficients, and a model other than the one the plan's statistics were computed for."""
    if plan.sample_shape is not None and tuple(x_T.shape[1:]) != tuple(plan.sample_shape):
        raise ShapeError(f"this plan's DPM-Solver-v3 statistics are for samples of shape {tuple(plan.sample_shape)}, "
                         f"got a batch of shape {tuple(x_T.shape)}: compute statistics for this model and shape")
    if plan.model_key is not None:
        from .identity import model_key

        key = model_key(model)
        if key != plan.model_key:
            raise SolverError(f"this plan's DPM-Solver-v3 statistics were computed for another model ({plan.model_key!r}), not "
                              f"{model.name!r} ({key!r}): compute them for this model (fewstep.model_statistics(model, ...))")


def run_plan(
    model: Model,
    x_T: torch.Tensor,
    plan: CompiledPlan,
    *,
    callback: Callback | None = None,
    progress: bool = False,
    seed: int | None = None,
    sample_indices: Sequence[int] | torch.Tensor | None = None,
    noise: NoiseSource | str | None = None,
) -> torch.Tensor:
    """Execute the affine program of a compiled plan, one model call per evaluation
    (:class:`PlanRunner`); sample indices for keyed noise default to 0..B-1."""
    from tqdm.auto import tqdm

    runner = PlanRunner(model, x_T, plan, callback=callback, seed=seed, sample_indices=sample_indices, noise=noise)
    with tqdm(total=plan.nfe, desc="sampling", unit="eval", disable=not progress, leave=False) as bar:
        while (op := runner.request()) is not None:
            x_in = runner.pending_input
            runner.answer(model.output(x_in, op.t, op.alpha, op.sigma) if runner.fold else model.predict(x_in, op.t))
            bar.update(1)
    return runner.result()

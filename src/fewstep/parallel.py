"""Parallel-in-time sampling: fixed-point iteration over a sliding window of steps (DESIGN 2).

A sampler is a recurrence: evaluation ``j`` of the model reads a state ``X_j`` that the plan's affine
program builds from the starting noise, fresh noise and the outputs ``D_i = model(X_i)`` of the
evaluations before it. Sequentially that takes ``M`` rounds of one model call. Here the inputs of a
window of ``W`` evaluations are *guessed*, the model runs on all of them in **one batched call**, and
the program (the plan's own affine combinations, multistep, corrector and stochastic ones included:
a weighted prefix scan) recomputes every input from those outputs: ``X <- g(X)``. The fixed point of
``g`` is exactly the sequential trajectory (Shih et al. 2023, ParaDiGMS; Tang et al. 2024, ParaTAA).

Each round (:class:`_Engine`):

1. ``D_j = model(X_j)`` for the window ``[a, b)`` in one call (micro-batches of whole evaluations, at
   most ``max_batch`` rows);
2. replay the program from the last frozen point with those outputs: ``g_j`` for the window, and
   for the evaluations entering it the inputs that holding the last output constant gives;
3. ``r_j = rms(g_j - X_j) / scale_j`` per sample (``scale_j``: the state's noise level sigma), the
   largest over the batch; the window start ``a`` moves past every leading evaluation with
   ``r_j <= tol``: their outputs are accepted and the program's state there becomes the new
   starting point. ``g_a`` is exact (its inputs are all accepted), so the next round accepts at
   least one evaluation: at most ``M + 1`` rounds, and window 1 (or ``tol = 0``) is the sequential
   loop exactly;
4. next iterate: Picard ``X_j = g_j``, or **triangular Anderson acceleration** (``"taa"``, ParaTAA):
   ``X_j = g_j - dG_j gamma_j`` with ``gamma_j = argmin || f_(<=j) - dF_(<=j) gamma ||`` over the last
   ``history`` differences of the residuals ``f = g - X`` of the window's evaluations up to ``j``
   only (so step ``j`` never looks at later steps, as the recurrence does not), weighted by
   ``1 / scale^2``, solved per sample from prefix sums of small Gram matrices. Its fixed points are
   those of ``g``; the first open evaluation always takes the exact ``g_a``;
   or the **secant quasi-Newton** replay (``"secant"``): Newton's method on the triangular system
   ``X = g(X)`` linearises each output, ``D_j(x) ~ D_j + J_j (x - X_j)``, and solves the linear
   system by forward substitution, which is the replay itself with the outputs ``D_j + J_j (g_j -
   X_j)``. Each Jacobian ``J_j`` is replaced by a per-sample scalar: the secant ``<dD, dX> / |dX|^2``
   of the last two evaluations at that step (before the second one, the value that data of unit
   variance would give, a Gaussian prior). No extra model calls; the fixed point is unchanged
   (at the sequential trajectory ``g_j = X_j`` and the correction vanishes). For
   :func:`parallel_solve` the slope starts at 1, which is ParaDiGMS's cumulative-sum form.

Stochastic plans draw exactly the sequential run's noise: it is keyed by each combination's
log-SNR interval (:mod:`fewstep.noise`) and memoised across replays. :func:`parallel_solve` runs
the same engine on any recurrence ``x_(i+1) = F_i(x_i)`` given as a batched callable.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch

from .errors import ArgumentError, ShapeError, SolverError
from .executor import PlanRunner
from .models import Model, Prediction, prediction_coefficients
from .noise import make_noise_source
from .solvers.compile import CompiledPlan, Evaluate

__all__ = ["ParallelOptions", "ParallelInfo", "parallel_solve", "run_plan_parallel", "ACCELERATIONS"]

ACCELERATIONS = ("secant", "taa", "picard")
#: default tolerance on ``rms(change) / sigma`` per evaluation (docs/parallel.md: measured)
DEFAULT_TOL = 1e-3
#: default window (evaluations per round; ``None`` = the whole trajectory): on digits-vp-eps, 100-step
#: DDIM with the secant replay took 18 rounds and 4.1 evaluations per step with 32, 16 rounds and 7.0
#: with the whole trajectory, 27 and 1.9 with 8 (docs/parallel.md)
DEFAULT_WINDOW: int | None = 32
#: default acceleration of sampling (docs/parallel.md: fewer rounds than Anderson and Picard for every
#: solver and N measured on digits-vp-eps); parallel_solve keeps Anderson (as fast on its test recurrence)
DEFAULT_ACCELERATE = "secant"
#: Anderson memory (differences of iterates; 1 = ParaTAA's default memory of two iterates): more
#: measured slower on the digits and oracle targets (docs/parallel.md)
DEFAULT_HISTORY = 1
#: Tikhonov term of the least squares, relative to the trace of its Gram matrix
ANDERSON_REG = 1e-3
#: the first round's inputs without a warm start; default "gaussian" (never more rounds measured, docs/parallel.md)
FIRST_WINDOWS = ("gaussian", "held")
DEFAULT_FIRST_WINDOW = "gaussian"


@dataclass(frozen=True)
class ParallelOptions:
    """Settings of parallel-in-time sampling.

    ``window``: evaluations per round (default 32; ``None``: all of them); ``tol``: the largest accepted change
    of an evaluation's input between rounds, as RMS over the sample's elements divided by the noise
    level sigma at that evaluation (0: iterate to the exact fixed point); ``accelerate``: ``"secant"``
    (the secant quasi-Newton replay, the default: fewest rounds measured), ``"taa"`` (triangular
    Anderson) or ``"picard"``; ``history``: Anderson's memory; ``max_batch``: the most
    rows (samples x evaluations) per model call (micro-batches bound memory; ``None``: no limit),
    rounded down to whole evaluations of the batch (a call holds ``k B`` rows, the ``B`` samples at
    ``k`` evaluations in order, at least one evaluation: per-sample conditioning repeats ``k`` times);
    ``max_rounds``: stop after this many rounds (``None``: never needed, the iteration ends within
    ``M + 1`` rounds); ``record``: keep every evaluation's final input in the info (for
    ``warm_start``); ``first_window``: the inputs of the first round without a warm start,
    ``"gaussian"`` (the exact trajectory for data of unit variance, a whole window evaluated in round
    one; the default: fewer or equal rounds in every case measured) or ``"held"`` (round one evaluates
    ``x_T`` alone, the next window holds its output)."""

    window: int | None = DEFAULT_WINDOW
    tol: float = DEFAULT_TOL
    accelerate: str = DEFAULT_ACCELERATE
    history: int = DEFAULT_HISTORY
    max_batch: int | None = None
    max_rounds: int | None = None
    record: bool = False
    first_window: str = DEFAULT_FIRST_WINDOW

    def __post_init__(self) -> None:
        if self.first_window not in FIRST_WINDOWS:
            raise ArgumentError(f"first_window must be one of {FIRST_WINDOWS}, got {self.first_window!r}")
        if self.window is not None and (not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1):
            raise ArgumentError(f"window must be a positive integer or None, got {self.window!r}")
        tol = self.tol
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not 0.0 <= float(tol) < math.inf:
            raise ArgumentError(f"tol must be a finite number >= 0, got {tol!r}")
        if self.accelerate not in ACCELERATIONS:
            raise ArgumentError(f"accelerate must be one of {ACCELERATIONS}, got {self.accelerate!r}")
        if not isinstance(self.history, int) or isinstance(self.history, bool) or not 1 <= self.history <= 16:
            raise ArgumentError(f"history must be an integer in 1..16, got {self.history!r}")
        for name in ("max_batch", "max_rounds"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ArgumentError(f"{name} must be a positive integer or None, got {v!r}")


@dataclass
class ParallelInfo:
    """What a parallel run did. ``evaluations``: model evaluations per sample in all rounds (the
    sequential run needs ``sequential_evaluations``); ``residuals[k]``: the largest scaled change in
    round ``k``'s window; ``windows[k]``: its ``(start, end)``; ``accepted[k]``: evaluations accepted
    after it; ``inputs``: the final input of every evaluation (with ``record=True``)."""

    rounds: int
    evaluations: int
    model_calls: int
    sequential_evaluations: int
    converged: bool
    residuals: list[float] = field(default_factory=list)
    windows: list[tuple[int, int]] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    inputs: list[torch.Tensor] | None = None
    options: ParallelOptions | None = None


class _Program(Protocol):
    """A recurrence the engine iterates: evaluation ``j`` reads ``X_j`` and yields ``D_j``."""

    n_evals: int

    def first_input(self) -> torch.Tensor: ...

    def scale(self, j: int) -> float: ...

    def evaluate(self, js: Sequence[int], xs: Sequence[torch.Tensor], max_batch: int | None) -> list[Any]: ...

    def prior_slopes(self, j: int) -> tuple[float, ...]:
        """The secant replay's slope of each output component of evaluation ``j`` before any secant."""
        ...

    def initial_guess(self, x0: torch.Tensor, js: Sequence[int]) -> dict[int, torch.Tensor]:
        """Guesses of the inputs ``js`` before any evaluation (may be empty)."""
        ...

    def replay(self, a: int, outputs: dict[int, Any], b: int, slopes: _SecantSlopes | None = None) -> dict[int, torch.Tensor]:
        """From the accepted point ``a``, answer evaluations ``a..b-1`` with ``outputs`` (linearised at
        the replay's inputs with ``slopes``); the inputs ``g_a..g_b`` (``g_b`` only if ``b < n_evals``)."""
        ...

    def accept(self, c: int) -> None:
        """Make the replay's point ``c`` (evaluation ``c`` pending, or the end) the new start."""
        ...

    def extend(self, upto: int) -> dict[int, torch.Tensor]:
        """Continue the last replay past its window holding the last output: inputs ``b+1..upto-1``."""
        ...

    def result(self) -> torch.Tensor: ...


def _rms_per_sample(d: torch.Tensor) -> torch.Tensor:
    return d.reshape(d.shape[0], -1).pow(2).mean(1).sqrt()


def _inner(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-sample inner products over the elements: ``(B, m, n) x (B, m', n) -> (B, m, m')``."""
    return torch.einsum("bmn,bkn->bmk", u, v)


def _parts(out: Any) -> tuple[torch.Tensor, ...]:
    return (out.x0, out.eps) if isinstance(out, Prediction) else (out,)


class _SecantSlopes:
    """Per evaluation, sample and output component, a scalar estimate ``s`` of the model's Jacobian
    along the last change of the evaluation's input: ``s = <D - D', X - X'> / |X - X'|^2`` from its
    last two evaluations (a prior before the second; the last slope when the input did not move).
    :meth:`linearised` gives ``D_j + s (x - X_j)``, the output at the replay's input ``x`` to first
    order (the secant quasi-Newton replay, module docstring)."""

    def __init__(self, prior: Callable[[int], tuple[float, ...]]) -> None:
        self.prior = prior
        self._last: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        self._slope: dict[int, tuple[torch.Tensor, ...]] = {}

    def observe(self, js: Sequence[int], xs: Sequence[torch.Tensor], outs: Sequence[Any]) -> None:
        for j, x, out in zip(js, xs, outs):
            parts = _parts(out)
            bsz = x.shape[0]
            prev = self._last.get(j)
            if prev is None:
                slope = tuple(torch.full((bsz,), v, dtype=torch.float64, device=x.device) for v in self.prior(j))
            else:
                dx = (x - prev[0]).reshape(bsz, -1).double()
                den = dx.square().sum(1)
                moved = den > 0
                slope = tuple(
                    torch.where(moved, torch.nan_to_num((dx * (d - d0).reshape(bsz, -1).double()).sum(1) / den.clamp_min(1e-300),
                                                        nan=0.0, posinf=0.0, neginf=0.0), old)
                    for d, d0, old in zip(parts, prev[1], self._slope[j]))
            self._slope[j] = slope
            self._last[j] = (x, parts)

    def linearised(self, j: int, out: Any, x: torch.Tensor) -> Any:
        at, _ = self._last[j]
        step = x - at
        parts = tuple(d + s.to(d.dtype).view(-1, *[1] * (d.ndim - 1)) * step.to(d.dtype) for d, s in zip(_parts(out), self._slope[j]))
        return Prediction(*parts) if isinstance(out, Prediction) else parts[0]

    def forget(self, upto: int) -> None:
        """Drop the evaluations before ``upto`` (accepted: never evaluated again)."""
        for j in [k for k in self._last if k < upto]:
            del self._last[j], self._slope[j]


class _Engine:
    def __init__(self, program: _Program, opts: ParallelOptions) -> None:
        self.p, self.o = program, opts

    def run(self, warm: Sequence[torch.Tensor] | None) -> ParallelInfo:
        p, o = self.p, self.o
        m_total = p.n_evals
        width = o.window or m_total
        info = ParallelInfo(0, 0, 0, m_total, False, options=o)
        x: dict[int, torch.Tensor] = {0: p.first_input()}
        first = range(1, min(width, m_total))
        if warm is not None:
            for j in first:
                x[j] = warm[j].to(x[0])
        elif o.first_window == "gaussian":  # the first window from the program's prior guess (if it has one)
            x.update(p.initial_guess(x[0], first))
        hist: deque[tuple[int, torch.Tensor, torch.Tensor]] = deque(maxlen=o.history + 1)  # (first row, x, g) per round
        a = 0
        rows = 0
        limit = o.max_rounds or m_total + 1
        slopes = _SecantSlopes(p.prior_slopes) if o.accelerate == "secant" else None
        while a < m_total:
            if info.rounds >= limit:
                return self._finish(info, rows, converged=False)
            b = a
            while b < min(a + width, m_total) and b in x:
                b += 1
            js = list(range(a, b))
            xs = [x[j] for j in js]
            outs = p.evaluate(js, xs, o.max_batch)
            rows += len(js)
            outputs = dict(zip(js, outs))
            if slopes is not None:
                slopes.observe(js, xs, outs)
            g = p.replay(a, outputs, b, slopes)
            scales = {j: p.scale(j) for j in js}
            # one host synchronisation per round: the window's residuals, read together
            res = dict(zip(js, torch.stack([(_rms_per_sample(g[j] - x[j]) / scales[j]).max() for j in js]).tolist()))
            c = a
            while c < b and res[c] <= o.tol:
                c += 1
            if c == a and a == 0 and b == 1:
                c = 1  # round 0 without a warm start: X_0 is the exact start (its residual is 0)
            info.rounds += 1
            info.residuals.append(max(res.values()))
            info.windows.append((a, b))
            info.accepted.append(c - a)
            p.accept(c)
            if slopes is not None:
                slopes.forget(c)
            if o.record:
                info.inputs = (info.inputs or []) + [x[j] for j in range(a, c)]
            if c >= m_total:
                break
            new_end = min(c + width, m_total)
            if new_end > b + 1 and warm is None:
                g.update(p.extend(new_end))
            if warm is not None:  # evaluations entering the window start from the previous trajectory
                g.update({j: warm[j].to(x[a]) for j in range(b + 1, new_end)})
            x = self._next_iterate(x, g, hist, c, b, new_end, scales)
            a = c
        return self._finish(info, rows, converged=True)

    @staticmethod
    def _finish(info: ParallelInfo, rows: int, converged: bool) -> ParallelInfo:
        info.evaluations = rows
        info.converged = converged
        return info

    def _next_iterate(self, x: dict[int, torch.Tensor], g: dict[int, torch.Tensor], hist: deque[tuple[int, torch.Tensor, torch.Tensor]],
                      c: int, b: int, new_end: int, scales: dict[int, float]) -> dict[int, torch.Tensor]:
        """Inputs of the next round's window ``[c, new_end)``: ``g`` (Picard; the first one exact, the
        entrants from holding the last output), or its Anderson-corrected form, computed for the
        whole window at once (a few batched kernels per round, whatever the window)."""
        nxt = {j: g[j] for j in range(c, new_end)}
        if self.o.accelerate != "taa":  # Picard, or the secant replay (its correction is in g already)
            return nxt
        n_open = b - c
        if n_open > 0:
            hist.append((c, torch.stack([x[j] for j in range(c, b)]), torch.stack([g[j] for j in range(c, b)])))
        if n_open < 2 or len(hist) < 2:
            return nxt
        m = self.o.history
        dtype = torch.float64
        shape = g[c].shape
        dev = g[c].device

        def aligned(entry: tuple[int, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """A past round's (x, g) on the rows c..b-1 (zeros where it had no such row) and the row mask."""
            start, xs, gs = entry
            lo, hi = max(c, start), min(b, start + xs.shape[0])
            xa = torch.zeros((n_open, *shape), dtype=dtype, device=dev)
            ga = torch.zeros_like(xa)
            mask = torch.zeros(n_open, dtype=dtype, device=dev)
            if hi > lo:
                xa[lo - c:hi - c] = xs[lo - start:hi - start].to(dtype)
                ga[lo - c:hi - c] = gs[lo - start:hi - start].to(dtype)
                mask[lo - c:hi - c] = 1.0
            return xa.reshape(n_open, shape[0], -1), ga.reshape(n_open, shape[0], -1), mask

        rounds = [aligned(e) for e in list(hist)[-(m + 1):]]  # oldest first
        f = [ga - xa for xa, ga, _ in rounds]
        depth = len(rounds) - 1
        df = torch.stack([(f[-1 - l] - f[-2 - l]) * (rounds[-1 - l][2] * rounds[-2 - l][2])[:, None, None] for l in range(depth)], 2)  # (L, B, d, n)
        dg = torch.stack([(rounds[-1 - l][1] - rounds[-2 - l][1]) * (rounds[-1 - l][2] * rounds[-2 - l][2])[:, None, None] for l in range(depth)], 2)
        w = torch.tensor([1.0 / scales[j] ** 2 for j in range(c, b)], dtype=dtype).to(dev, non_blocking=True)[:, None, None]  # no wait for the device
        # triangular: evaluation j solves with the prefix sums over c..j (its own and earlier steps only)
        gram = torch.cumsum(w[..., None] * torch.einsum("lbmn,lbkn->lbmk", df, df), 0)
        rhs = torch.cumsum(w * torch.einsum("lbmn,lbn->lbm", df, f[-1]), 0)
        reg = ANDERSON_REG * gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300)[..., None, None]
        eye = torch.eye(depth, dtype=dtype, device=dev)
        gamma = torch.linalg.solve_ex(gram + reg * eye, rhs.unsqueeze(-1))[0].squeeze(-1)  # _ex: no error check, no sync
        gamma = torch.nan_to_num(gamma, nan=0.0, posinf=0.0, neginf=0.0)
        gamma[0] = 0.0  # the first open evaluation takes the exact g (its inputs are all accepted)
        new = rounds[-1][1] - torch.einsum("lbm,lbmn->lbn", gamma, dg)
        for k, j in enumerate(range(c + 1, b), start=1):
            nxt[j] = new[k].reshape(shape).to(g[j].dtype)
        return nxt


# ---- the compiled plan as a program ------------------------------------------------------------------
class _MemoNoise:
    """A noise source that returns the same tensor when asked for the same interval again (replays
    re-run the program's combinations; the noise is the sequential run's, drawn once)."""

    def __init__(self, spec: Any, seed: int, capacity: int) -> None:
        self.spec, self.seed, self.capacity = spec, seed, capacity
        self._sources: dict[int, Any] = {}
        self._memo: OrderedDict[tuple[float, float, int], torch.Tensor] = OrderedDict()

    def increment(self, lam_from: float, lam_to: float, shape: Sequence[int], *, channel: int = 0, **kw: Any) -> torch.Tensor:
        key = (lam_from, lam_to, channel)
        hit = self._memo.get(key)
        if hit is not None:
            self._memo.move_to_end(key)
            return hit
        if channel not in self._sources:
            self._sources[channel] = make_noise_source(self.spec, self.seed, channel)
        z = self._sources[channel].increment(lam_from, lam_to, shape, **kw)
        self._memo[key] = z
        if len(self._memo) > self.capacity:
            self._memo.popitem(last=False)
        return z


class _PlanProgram:
    def __init__(self, model: Model, x_T: torch.Tensor, plan: CompiledPlan, *, seed: int | None,
                 sample_indices: Sequence[int] | torch.Tensor | None, noise: Any, window: int) -> None:
        self.model, self.plan = model, plan
        evals = [op for op in plan.ops if isinstance(op, Evaluate)]
        self.evals = evals
        self.n_evals = len(evals)
        src = None
        if plan.stochastic:
            if seed is None and (noise is None or isinstance(noise, str)):
                raise SolverError("this solver schedule draws noise; pass seed=")
            per_eval = max(1, sum(len(op.noise) for op in plan.ops if not isinstance(op, Evaluate)) // max(1, self.n_evals) + 1)
            src = _MemoNoise(noise, 0 if seed is None else seed, capacity=4 * per_eval * (window + 4))
        self.runner = PlanRunner(model, x_T, plan, seed=seed, sample_indices=sample_indices, noise=src)
        first = self.runner.request()
        if first is None:
            raise SolverError("the plan evaluates the model nowhere; nothing to run in parallel")
        self.start = self.runner.snapshot()
        self.snaps: dict[int, tuple[Any, ...]] = {}
        self._last_out: Any = None
        self._pos = 0

    def first_input(self) -> torch.Tensor:
        return self.runner.pending_state

    def scale(self, j: int) -> float:
        return max(self.evals[j].sigma, 1e-12)

    def initial_guess(self, x0: torch.Tensor, js: Sequence[int]) -> dict[int, torch.Tensor]:
        """The first window's inputs as the exact trajectory for data of unit variance: the probability
        flow maps ``x_T`` to ``x_t = sqrt(alpha_t^2 + sigma_t^2) / sqrt(alpha_T^2 + sigma_T^2) x_T``."""
        ev = self.evals
        r0 = math.hypot(ev[0].alpha, ev[0].sigma)
        return {j: x0 * (math.hypot(ev[j].alpha, ev[j].sigma) / r0) for j in js}

    def prior_slopes(self, j: int) -> tuple[float, ...]:
        """The output's slope for data of unit variance: ``E[x0 | x] = k x``, ``k = alpha / (alpha^2 +
        sigma^2)``, ``E[eps | x] = sigma / (alpha^2 + sigma^2) x``; the raw output (``x0 = p0 x + q0
        out``) then has slope ``(k - p0) / q0``."""
        a, sg = self.evals[j].alpha, self.evals[j].sigma
        n = a * a + sg * sg
        if not self.runner.fold:
            return a / n, sg / n
        p0, q0, _, _ = prediction_coefficients(self.model.prediction, a, sg)
        return ((a / n - p0) / q0 if q0 else 0.0,)

    def evaluate(self, js: Sequence[int], xs: Sequence[torch.Tensor], max_batch: int | None) -> list[Any]:
        model, runner = self.model, self.runner
        bsz = xs[0].shape[0]
        stacked = torch.cat([xx.to(runner.in_dtype) for xx in xs])
        t_rows = [self.evals[j].t for j in js for _ in range(bsz)]
        al_rows = [self.evals[j].alpha for j in js for _ in range(bsz)]
        si_rows = [self.evals[j].sigma for j in js for _ in range(bsz)]
        # whole evaluations per call: a model may condition row r on sample r % B (per-sample prompts,
        # class labels), which a call cut inside an evaluation's batch would misalign
        step = stacked.shape[0] if max_batch is None else max(bsz, max_batch // bsz * bsz)
        parts: list[Any] = []
        for r0 in range(0, stacked.shape[0], step):
            sl = slice(r0, r0 + step)
            if runner.fold:
                parts.append(model.output_rows(stacked[sl], t_rows[sl], al_rows[sl], si_rows[sl]))
            else:
                parts.append(model.predict(stacked[sl], torch.tensor(t_rows[sl], dtype=torch.float64).to(stacked.device, non_blocking=True)))
        if runner.fold:
            out = torch.cat(parts)
            return list(out.split(bsz))
        x0 = torch.cat([pr.x0 for pr in parts]).split(bsz)
        eps = torch.cat([pr.eps for pr in parts]).split(bsz)
        return [Prediction(u, v) for u, v in zip(x0, eps)]

    def replay(self, a: int, outputs: dict[int, Any], b: int, slopes: _SecantSlopes | None = None) -> dict[int, torch.Tensor]:
        runner = self.runner
        runner.restore(self.start)
        self.snaps = {}
        g: dict[int, torch.Tensor] = {}
        j = a
        while True:
            g[j] = runner.pending_state
            self.snaps[j] = runner.snapshot()
            if j >= b:
                break
            out = outputs[j] if slopes is None else slopes.linearised(j, outputs[j], g[j])
            runner.answer(out)
            self._last_out = out
            if runner.request() is None:
                self.snaps[j + 1] = runner.snapshot()
                break
            j += 1
        self._pos = j
        return g

    def accept(self, c: int) -> None:
        self.start = self.snaps[c]

    def extend(self, upto: int) -> dict[int, torch.Tensor]:
        runner = self.runner
        g: dict[int, torch.Tensor] = {}
        j = self._pos  # the runner is at evaluation j (its input already in the replay's g)
        while j + 1 < upto:
            runner.answer(self._last_out)
            if runner.request() is None:
                break
            j += 1
            g[j] = runner.pending_state
        return g

    def result(self) -> torch.Tensor:
        self.runner.restore(self.start)
        if not self.runner.finished:  # pragma: no cover - accept(M) ends the plan
            raise SolverError("parallel sampling stopped before the end of the plan")
        return self.runner.result()


def run_plan_parallel(
    model: Model,
    x_T: torch.Tensor,
    plan: CompiledPlan,
    options: ParallelOptions | None = None,
    *,
    seed: int | None = None,
    sample_indices: Sequence[int] | torch.Tensor | None = None,
    noise: Any = None,
    warm_start: ParallelInfo | Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ParallelInfo]:
    """Run a compiled plan by parallel-in-time iteration (module docstring); the samples and what it
    did. ``warm_start``: a previous run's :class:`ParallelInfo` recorded with ``record=True`` (or its
    ``inputs``): the iteration starts from that trajectory (same plan and batch shape)."""
    o = options or ParallelOptions()
    prog = _PlanProgram(model, x_T, plan, seed=seed, sample_indices=sample_indices, noise=noise, window=o.window or plan.nfe)
    warm = _warm_inputs(warm_start, prog.n_evals, x_T.shape)
    calls0 = model.calls
    info = _Engine(prog, o).run(warm)
    info.model_calls = model.calls - calls0
    if not info.converged:
        raise SolverError(f"parallel sampling did not converge in {info.rounds} rounds (max_rounds={o.max_rounds})")
    return prog.result().to(x_T.dtype), info


def _warm_inputs(warm: ParallelInfo | Sequence[torch.Tensor] | None, n: int, shape: torch.Size) -> list[torch.Tensor] | None:
    if warm is None:
        return None
    inputs = warm.inputs if isinstance(warm, ParallelInfo) else list(warm)
    if inputs is None:
        raise ArgumentError("warm_start needs the inputs of a previous run: run it with ParallelOptions(record=True)")
    if len(inputs) != n:
        raise ShapeError(f"warm_start has {len(inputs)} evaluation inputs; this plan evaluates the model {n} times")
    if any(tuple(t.shape) != tuple(shape) for t in inputs):
        raise ShapeError(f"warm_start inputs must have the batch's shape {tuple(shape)}")
    return list(inputs)


# ---- any recurrence -----------------------------------------------------------------------------------
StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _RecurrenceProgram:
    """``x_(i+1) = F_i(x_i)``: evaluation ``i`` reads state ``i`` and yields state ``i + 1``. The
    replay sums increments, ``g_(j+1) = g_j + (F_j(X_j) - X_j)`` (ParaDiGMS's cumulative-sum form):
    an error in ``X_j`` reaches ``g_(j+1)`` only through ``F_j - identity``, which is small for the
    small steps of an integrator (the plain ``g_(j+1) = F_j(X_j)`` would pass it on whole). The
    secant replay generalises it: ``g_(j+1) = F_j(X_j) + s_j (g_j - X_j)``, the slope ``s_j``
    starting at 1 (this form) and then the secant of step ``j``'s last two evaluations."""

    def __init__(self, step_fn: StepFn, x0: torch.Tensor, n_steps: int, scale: float | Sequence[float]) -> None:
        self.fn, self.n_evals = step_fn, n_steps
        self.scales = [float(scale)] * n_steps if isinstance(scale, (int, float)) else [float(s) for s in scale]
        if len(self.scales) != n_steps or not all(s > 0 and math.isfinite(s) for s in self.scales):
            raise ArgumentError(f"scale must be a positive number or {n_steps} positive numbers")
        self.start_state, self.start_index = x0, 0
        self._g: dict[int, torch.Tensor] = {}
        self.calls = 0

    def first_input(self) -> torch.Tensor:
        return self.start_state

    def scale(self, j: int) -> float:
        return self.scales[j]

    def prior_slopes(self, j: int) -> tuple[float, ...]:
        return (1.0,)  # F_j ~ identity: the cumulative-sum form

    def initial_guess(self, x0: torch.Tensor, js: Sequence[int]) -> dict[int, torch.Tensor]:
        return {}  # nothing known of F before it is evaluated

    def evaluate(self, js: Sequence[int], xs: Sequence[torch.Tensor], max_batch: int | None) -> list[torch.Tensor]:
        self._inputs = dict(zip(js, xs))
        stacked = torch.stack(list(xs))  # (K, B, ...)
        steps = torch.tensor(list(js), dtype=torch.int64)
        step = max_batch or len(js) * xs[0].shape[0]
        per = max(1, step // xs[0].shape[0])
        outs = []
        for k0 in range(0, len(js), per):
            out = self.fn(stacked[k0:k0 + per], steps[k0:k0 + per])
            self.calls += 1
            if not isinstance(out, torch.Tensor) or out.shape != stacked[k0:k0 + per].shape:
                raise ShapeError(f"step_fn must return a tensor shaped like its input {tuple(stacked[k0:k0 + per].shape)}, "
                                 f"got {getattr(out, 'shape', type(out).__name__)}")
            if not bool(torch.isfinite(out).all()):
                raise ShapeError(f"step_fn returned NaN/Inf at steps {steps[k0:k0 + per].tolist()}")
            outs.extend(out.unbind(0))
        return outs

    def replay(self, a: int, outputs: dict[int, torch.Tensor], b: int, slopes: _SecantSlopes | None = None) -> dict[int, torch.Tensor]:
        g = {a: self.start_state}
        for j in range(a, b):
            if slopes is None:
                g[j + 1] = g[j] + (outputs[j] - self._inputs[j])
            else:
                g[j + 1] = slopes.linearised(j, outputs[j], g[j])
        self._g = g
        self._b = b
        return {j: v for j, v in g.items() if j < self.n_evals}

    def accept(self, c: int) -> None:
        self.start_state, self.start_index = self._g[c], c

    def extend(self, upto: int) -> dict[int, torch.Tensor]:
        return {j: self._g[self._b] for j in range(self._b + 1, upto)}

    def result(self) -> torch.Tensor:
        return self.start_state


def parallel_solve(
    step_fn: StepFn,
    x0: torch.Tensor,
    n_steps: int,
    *,
    window: int | None = None,
    tol: float = DEFAULT_TOL,
    accelerate: str = "taa",
    history: int = DEFAULT_HISTORY,
    scale: float | Sequence[float] = 1.0,
    max_batch: int | None = None,
    max_rounds: int | None = None,
    warm_start: ParallelInfo | Sequence[torch.Tensor] | None = None,
    record: bool = False,
) -> tuple[torch.Tensor, ParallelInfo]:
    """``x_n`` of the recurrence ``x_(i+1) = F_i(x_i)`` by parallel-in-time iteration.

    ``step_fn(x, steps)`` evaluates several steps at once: ``x`` is ``(K, B, ...)`` (state ``i`` of
    each of ``B`` problems, for ``K`` steps), ``steps`` the ``K`` step indices; it returns the next
    states, shaped like ``x``. ``scale``: the size of an acceptable change per step (the tolerance is
    ``tol * scale`` on the RMS change of a state; one number or one per step). Same guarantees as
    sampling: window 1 or ``tol = 0`` is the sequential recurrence; at most ``n_steps + 1`` rounds."""
    if not isinstance(x0, torch.Tensor) or x0.ndim < 1:
        raise ShapeError("x0 must be a tensor shaped (batch, ...)")
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 1:
        raise ArgumentError(f"n_steps must be a positive integer, got {n_steps!r}")
    o = ParallelOptions(window=window, tol=tol, accelerate=accelerate, history=history, max_batch=max_batch, max_rounds=max_rounds, record=record)
    prog = _RecurrenceProgram(step_fn, x0, n_steps, scale)
    warm = _warm_inputs(warm_start, n_steps, x0.shape)
    info = _Engine(prog, o).run(warm)
    info.model_calls = prog.calls
    if not info.converged:
        raise SolverError(f"parallel_solve did not converge in {info.rounds} rounds (max_rounds={max_rounds})")
    return prog.result(), info

"""What identifies a model for caches and resumes: its weights, its code, and what it computes.

Reference caches, search states and generation folders are keyed by :func:`model_key`: the
model's prediction type, noise-schedule fingerprint and thresholding, plus either the ``identity=``
string the user gave :class:`fewstep.Model` (the bundled models give ``zoo:<name>:<weights sha>``)
or, without one, the SHA-256 of the weights of every torch module the model function computes with
(:func:`find_modules`) and a digest of the function's code and the plain values it closes over.
The name is shown for readability only.

A key can still collide (an ``identity=`` string reused for another checkpoint, a lambda reading a
global that changed), so each cache entry also stores a :class:`Probe`: the model's x0 predictions
on a fixed keyed input at three times, compact and in float64. Reading an entry takes the probe
again and compares; an entry whose probe differs was written by a model that computes something
else (a reference cache is then recomputed with an :class:`IdentityWarning`; a search state or a
generation folder is refused).
"""

from __future__ import annotations

import dis
import functools
import hashlib
import json
import math
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .errors import ArgumentError
from .models import Model, to_prediction
from .noise import _hash32, keyed_noise
from .solvers.plan import schedule_fingerprint

__all__ = ["weights_digest", "digest_tensor", "find_modules", "walk_callable", "modules_device", "model_key", "Probe", "probe_for", "IdentityWarning", "PROBE_LAMBDAS",
           "PROBE_SEED", "PROBE_SIZE", "PROBE_RTOL"]

#: the half log-SNRs ``log(alpha / sigma)`` the probe evaluates the model at (clipped to the schedule)
PROBE_LAMBDAS: tuple[float, ...] = (-2.0, 0.0, 2.0)
#: the seed of the probe's keyed input and of its projection
PROBE_SEED = 20250925
#: at most this many numbers are stored per probe time (a fixed random projection of the outputs)
PROBE_SIZE = 64
#: default tolerance, relative to the largest RMS of the probe's outputs (see :meth:`Probe.matches`)
PROBE_RTOL = 1e-2
_RTOL_BY_DTYPE = {torch.float16: 2e-2, torch.bfloat16: 5e-2}

_MAX_DEPTH = 6  # nesting levels followed from the model function
_MAX_ITEMS = 256  # items looked at per list / tuple / dict / object
_SMALL_TENSOR = 1 << 16  # closure tensors up to this many elements enter the code digest by value
#: packages whose functions are not searched through their globals (their closures still are)
_LIBRARIES = frozenset({"torch", "numpy", "scipy", "builtins", "functools", "typing", "math", "diffusers", "transformers",
                        "safetensors", "einops", "k_diffusion", "accelerate", "collections", "abc", "inspect"})
_SCALARS = (bool, int, float, complex, str, bytes, type(None))


class IdentityWarning(UserWarning):
    """A cache entry was written by a model that computes something else (it is recomputed)."""


# ---- weights --------------------------------------------------------------------------------------
def _hash_tensor(h: Any, t: torch.Tensor, name: str) -> None:
    if t.device.type == "meta":
        raise ArgumentError(f"{name!r} is on the meta device (no values to identify the model by): load the weights first, "
                            "or give fewstep.Model an identity= string")
    t = t.detach()
    if t.is_sparse:
        t = t.to_dense()
    if t.is_quantized:
        t = t.dequantize()
    h.update(f"{name}\0{str(t.dtype)}\0{tuple(t.shape)}\0".encode())
    flat = t.to("cpu").contiguous().reshape(-1)
    try:
        h.update(flat.view(torch.uint8).numpy())
    except (RuntimeError, TypeError):  # a dtype without a byte view: its float64 values
        h.update(flat.to(torch.float64).numpy().tobytes())


def digest_tensor(x: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's dtype, shape and raw bytes (e.g. prompt embeddings)."""
    if not isinstance(x, torch.Tensor):
        raise ArgumentError(f"digest_tensor needs a tensor, got {type(x).__name__}")
    h = hashlib.sha256()
    _hash_tensor(h, x, "")
    return h.hexdigest()


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 (hex) of ``module.state_dict()`` in its order: every parameter's and persistent
    buffer's name, dtype, shape and raw bytes (moved to the CPU; any dtype, bfloat16 included).
    Raises :class:`~fewstep.ArgumentError` for a tensor on the ``meta`` device (no values).
    Costs one pass over the weights (about 8 ms for the 8 MB of float32
    weights of the bundled digits networks on one CPU core: ~1 GB/s)."""
    if not isinstance(module, torch.nn.Module):
        raise ArgumentError(f"weights_digest needs a torch.nn.Module, got {type(module).__name__}")
    h = hashlib.sha256()
    for name, value in module.state_dict().items():
        if isinstance(value, torch.Tensor):
            _hash_tensor(h, value, name)
        else:  # extra state (get_extra_state)
            h.update(f"{name}\0{value!r}\0".encode())
    return h.hexdigest()


# ---- what a model function computes with -----------------------------------------------------------
def _library(obj: Any) -> bool:
    return str(getattr(obj, "__module__", None) or "").split(".")[0] in _LIBRARIES


def _stored_names(code: types.CodeType) -> set[str]:
    """Names the code rebinds (``nonlocal`` / ``global`` assignments): counters, not settings."""
    out = {i.argval for i in dis.get_instructions(code) if i.opname in ("STORE_DEREF", "STORE_GLOBAL", "DELETE_DEREF", "DELETE_GLOBAL")}
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            out |= _stored_names(c)
    return out


def _global_names(code: types.CodeType) -> list[str]:
    names = list(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names += _global_names(c)
    return list(dict.fromkeys(names))


def _code_text(code: types.CodeType) -> str:
    """The code's bytecode, constants and names (not its file or line numbers), as text."""
    def const(c: Any) -> str:
        if isinstance(c, types.CodeType):
            return _code_text(c)
        if isinstance(c, frozenset):
            return "frozenset(" + ",".join(sorted(const(v) for v in c)) + ")"
        if isinstance(c, tuple):
            return "(" + ",".join(const(v) for v in c) + ")"
        return repr(c)

    return f"{getattr(code, 'co_qualname', code.co_name)}:{code.co_code.hex()}:{','.join(code.co_names)}:{','.join(const(c) for c in code.co_consts)}"


def _value_text(v: Any) -> str | None:
    """A plain value's text for the code digest (a small tensor by its bytes), else None."""
    if isinstance(v, _SCALARS):
        return f"{type(v).__name__}:{v!r}"
    if isinstance(v, torch.Tensor):
        if v.device.type == "meta" or v.numel() > _SMALL_TENSOR:
            return f"tensor:{v.dtype}:{tuple(v.shape)}"
        return f"tensor:{digest_tensor(v)[:16]}"
    return None


class _Walk:
    """Depth-limited, cycle-safe walk from a model function to the modules and code it uses."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.modules: list[torch.nn.Module] = []
        self.code: list[str] = []
        self._keep: list[Any] = []  # objects whose ids are in ``seen`` stay alive during the walk

    def visit(self, obj: Any, depth: int) -> None:
        if depth > _MAX_DEPTH or isinstance(obj, _SCALARS) or isinstance(obj, (torch.Tensor, types.ModuleType, type)):
            return
        if id(obj) in self.seen:
            return
        self.seen.add(id(obj))
        self._keep.append(obj)
        if isinstance(obj, torch.nn.Module):
            self.modules.append(obj)
        elif isinstance(obj, types.MethodType):
            self.visit(obj.__self__, depth + 1)
            self.visit(obj.__func__, depth + 1)
        elif isinstance(obj, functools.partial):
            self.code.append(f"partial:{','.join(sorted(obj.keywords))}")
            for v in (obj.func, *obj.args, *obj.keywords.values()):
                self._value(v, depth + 1)
        elif isinstance(obj, types.FunctionType):
            self._function(obj, depth)
        elif isinstance(obj, (list, tuple)):
            for v in obj[:_MAX_ITEMS]:
                self.visit(v, depth + 1)
        elif isinstance(obj, dict):
            for v in list(obj.values())[:_MAX_ITEMS]:
                self.visit(v, depth + 1)
        else:
            try:
                attrs = object.__getattribute__(obj, "__dict__")
            except (AttributeError, TypeError):  # no instance attributes (slots, C objects)
                attrs = None
            if isinstance(attrs, dict):
                for v in list(attrs.values())[:_MAX_ITEMS]:
                    self.visit(v, depth + 1)
            call = getattr(type(obj), "__call__", None)
            if isinstance(call, types.FunctionType) and not _library(call):  # a callable object's own __call__
                self.visit(call, depth + 1)

    def _value(self, v: Any, depth: int, name: str = "", rebound: set[str] | frozenset[str] = frozenset()) -> None:
        text = _value_text(v) if name not in rebound else None
        if text is not None:
            self.code.append(f"{name}={text}")
        self.visit(v, depth)

    def _function(self, fn: types.FunctionType, depth: int) -> None:
        code = fn.__code__
        library = _library(fn)
        rebound = _stored_names(code)
        if not library:
            self.code.append(_code_text(code))
        for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
            try:
                self._value(cell.cell_contents, depth + 1, name, rebound)
            except ValueError:  # an empty cell
                continue
        for v in fn.__defaults__ or ():
            self._value(v, depth + 1, "default")
        for k, v in (fn.__kwdefaults__ or {}).items():
            self._value(v, depth + 1, k)
        if not library:
            for name in _global_names(code):
                if name in fn.__globals__:
                    self._value(fn.__globals__[name], depth + 1, name, rebound)
        wrapped = fn.__dict__.get("__wrapped__")
        if wrapped is not None:
            self.visit(wrapped, depth + 1)

    def outermost_modules(self) -> list[torch.nn.Module]:
        """The modules found, less those inside another one found (its weights cover them)."""
        inner: set[int] = set()
        for m in self.modules:
            inner.update(id(s) for s in m.modules() if s is not m)
        return [m for m in self.modules if id(m) not in inner]


def walk_callable(fn: Callable[..., Any]) -> _Walk:
    """Everything ``fn`` reaches (modules, functions, objects), as :func:`find_modules` describes."""
    w = _Walk()
    w.visit(fn, 0)
    return w


def find_modules(fn: Callable[..., Any]) -> list[torch.nn.Module]:
    """The torch modules ``fn`` computes with, in a fixed order of discovery: ``fn`` itself if it is
    a module; a bound method's object; a ``functools.partial``'s function and arguments;
    ``__wrapped__``; closure cells, default arguments and the module-level globals the function's
    code names (followed into the functions, partials, containers and objects found there, to a
    depth of 6, each object once); the attributes of plain objects (a callable object's modules,
    a captured ``self``). A module inside another module found is left out (its weights are the
    outer one's)."""
    return walk_callable(fn).outermost_modules()


def model_key(model: Model) -> str:
    """The string caches and resumes key ``model`` by.

    With ``model.identity`` (the ``identity=`` given to :class:`fewstep.Model`): that string, the
    prediction type, the schedule fingerprint and the thresholding. Without: the name (for reading
    only), the same three, the SHA-256 of the weights of :func:`find_modules` ``(model.fn)`` and a
    digest of the code of the functions reached and of the plain values (numbers, strings, small
    tensors) they close over. Recomputed on every call, so weights changed in place give another
    key: one pass over the weights (about 8 ms for the 8 MB of weights of the bundled digits networks,
    roughly 1 s per GB on a CPU, plus the copy from an accelerator); name an ``identity=`` to skip it."""
    if not isinstance(model, Model):
        raise ArgumentError(f"model must be a fewstep.Model, got {type(model).__name__}")
    tail = f"{model.prediction}|{schedule_fingerprint(model.schedule)}"
    if model.threshold is not None:
        t = model.threshold
        tail += f"|threshold:{t.kind},{t.max_value!r},{t.ratio!r}"
    if model.identity:
        return f"{model.identity}|{tail}"
    walk = walk_callable(model.fn)
    mods = walk.outermost_modules()
    weights = hashlib.sha256("\n".join(f"{type(m).__qualname__}:{weights_digest(m)}" for m in mods).encode()).hexdigest()[:16] if mods else "none"
    code = hashlib.sha256("\n".join(walk.code).encode()).hexdigest()[:16]
    return f"{model.name}|{tail}|weights:{weights}|code:{code}"


# ---- the behaviour probe ------------------------------------------------------------------------------
def modules_device(modules: Sequence[torch.nn.Module]) -> torch.device | None:
    """The device of the first parameter or buffer of ``modules`` (None when they hold none)."""
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            return t.device
    return None


def _param_rtol(modules: Sequence[torch.nn.Module]) -> float:
    """The probe tolerance the weights' dtypes allow (half-precision weights: looser)."""
    return max([PROBE_RTOL] + [_RTOL_BY_DTYPE.get(t.dtype, PROBE_RTOL) for m in modules for t in m.parameters()])


@functools.lru_cache(maxsize=2)
def _sketch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The count sketch of :func:`_project`: each element's bucket, its sign (True: minus), the
    buckets' counts."""
    h = _hash32(torch.arange(n, dtype=torch.int32) ^ (seed & 0x7FFFFFFF))
    bucket = (h & (PROBE_SIZE - 1)).long()
    counts = torch.bincount(bucket, minlength=PROBE_SIZE).clamp(min=1).to(torch.float64)
    return bucket, (h & PROBE_SIZE) != 0, counts


def _project(y: torch.Tensor, seed: int) -> list[float]:
    """``y`` (float64, flat) itself when short, else a count sketch: element ``i`` goes, with a
    sign, to one of ``PROBE_SIZE`` buckets by an integer hash of ``(seed, i)`` (fixed arithmetic,
    no random generator), and each bucket's signed sum is divided by the root of its count, so
    each number, and the RMS of a difference, has the scale of the RMS of ``y`` (one pass)."""
    n = y.numel()
    if n <= PROBE_SIZE:
        return y.tolist()
    bucket, minus, counts = _sketch(n, seed)
    sums = torch.zeros(PROBE_SIZE, dtype=torch.float64).index_add_(0, bucket, torch.where(minus, -y, y))
    return (sums / counts.sqrt()).tolist()


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


@dataclass
class Probe:
    """A model's x0 predictions on a fixed input, compactly: what a cache entry checks its model by.

    ``take`` evaluates the model ``rows`` x ``len(times)`` times (3 calls of ``rows`` rows):
    the keyed standard normal noise of ``seed`` (``fewstep.keyed_noise``, one draw per time),
    scaled to the marginal ``sqrt(alpha^2 + sigma^2)`` of unit-variance data at half log-SNR
    -2, 0 and 2 (clipped to the schedule's times), converted to x0. Per time it keeps at most 64
    numbers (a fixed random projection, a count sketch, of all ``rows`` outputs when they have
    more values) and
    their RMS, in float64. It depends on the sample shape, dtype and ``rows``, never on the batch
    size the model is sampled with. Cost: the 6 evaluations (about 55 ms for a bundled digits
    network on one CPU core) plus the projection (tens of milliseconds per million output values)."""

    shape: tuple[int, ...]
    times: tuple[float, ...]
    values: tuple[tuple[float | None, ...], ...]
    rms: tuple[float | None, ...]
    rows: int = 2
    seed: int = PROBE_SEED
    dtype: str = "float32"
    rtol: float = PROBE_RTOL
    evaluations: int = field(default=0, compare=False)

    @classmethod
    def take(cls, model: Model, sample_shape: Sequence[int], *, rows: int = 2, seed: int = PROBE_SEED,
             device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Probe":
        """Probe ``model`` on samples of ``sample_shape`` (without the batch), in ``dtype`` (default
        float32, fewstep's noise dtype) on ``device`` (default: that of the model's parameters,
        else the CPU)."""
        if not isinstance(model, Model):
            raise ArgumentError(f"model must be a fewstep.Model, got {type(model).__name__}")
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
            raise ArgumentError(f"rows must be a positive integer, got {rows!r}")
        shape = tuple(int(s) for s in sample_shape)
        dt = dtype or torch.float32
        modules = find_modules(model.fn)
        dev = torch.device(device) if device is not None else (modules_device(modules) or torch.device("cpu"))
        sched = model.schedule
        lo, hi = sorted((float(sched.t_min), float(sched.t_max)))
        times = []
        for lam in PROBE_LAMBDAS:
            t = float(sched.t_of_lambda(torch.tensor(lam, dtype=torch.float64)))
            times.append(min(hi, max(lo, t)) if math.isfinite(t) else (hi if lam < 0 else lo))
        values, rms = [], []
        before = model.evaluations
        with torch.no_grad():
            for k, t in enumerate(times):
                t64 = torch.full((rows,), t, dtype=torch.float64, device=dev)
                alpha, sigma = sched._alpha(t64), sched._sigma(t64)
                scale = float(torch.sqrt(alpha[0] ** 2 + sigma[0] ** 2))
                z = keyed_noise((rows, *shape), seed, step=k, dtype=torch.float64)
                x = (scale * z).to(device=dev, dtype=dt)
                x0 = to_prediction(model.prediction, model.raw(x, t64), x, alpha, sigma).x0
                y = x0.detach().to("cpu", torch.float64).reshape(-1)
                values.append(tuple(_finite_or_none(v) for v in _project(y, seed + 1)))
                rms.append(_finite_or_none(float(y.square().mean().sqrt())))
        if not model._sampling:
            model.guard.flush()
        rtol = max(_param_rtol(modules), _RTOL_BY_DTYPE.get(dt, PROBE_RTOL))
        return cls(shape, tuple(times), tuple(values), tuple(rms), rows, seed, str(dt).replace("torch.", ""), rtol,
                   model.evaluations - before)

    def matches(self, other: "Probe", rtol: float | None = None) -> bool:
        """Whether ``other`` probes a model that computes the same: same input (shape, times, rows,
        seed), and at every time the RMS over the stored numbers of their difference, and the
        difference of the RMS, at most ``rtol`` times the largest RMS of either probe (default: the
        larger ``rtol`` of the two: 1e-2, or 2e-2 / 5e-2 for float16 / bfloat16 weights or input).

        Why 1e-2: the same model on another device, BLAS, thread count or with TF32 matmuls differs
        by 1e-7..1e-3 of the output's scale (float32 / TF32 rounding through the network, amplified
        up to ``sigma / alpha = e^2`` in x0 at the noisiest probe time); a retrained network, another
        checkpoint or another function differs by far more than 1% of its outputs."""
        if not isinstance(other, Probe):
            return False
        if (self.shape, self.rows, self.seed) != (other.shape, other.rows, other.seed) or len(self.times) != len(other.times):
            return False
        if any(abs(a - b) > 1e-9 * max(1.0, abs(a)) for a, b in zip(self.times, other.times)):
            return False
        tol = max(self.rtol, other.rtol) if rtol is None else float(rtol)
        finite = [r for r in (*self.rms, *other.rms) if r is not None]
        scale = max(finite, default=0.0)
        for va, vb, ra, rb in zip(self.values, other.values, self.rms, other.rms):
            if len(va) != len(vb) or (ra is None) != (rb is None) or any((a is None) != (b is None) for a, b in zip(va, vb)):
                return False
            diffs = [(a - b) ** 2 for a, b in zip(va, vb) if a is not None and b is not None]
            d = math.sqrt(sum(diffs) / len(diffs)) if diffs else 0.0
            if d > tol * scale or (ra is not None and rb is not None and abs(ra - rb) > tol * scale):
                return False
        return True

    def difference(self, other: "Probe") -> float:
        """The largest RMS difference over the probe times, relative to the largest RMS (inf when
        the probes are not comparable): what :meth:`matches` compares with ``rtol``."""
        if not isinstance(other, Probe) or (self.shape, self.rows, self.seed, len(self.times)) != (other.shape, other.rows, other.seed, len(other.times)):
            return float("inf")
        scale = max([r for r in (*self.rms, *other.rms) if r is not None], default=0.0)
        worst = 0.0
        for va, vb, ra, rb in zip(self.values, other.values, self.rms, other.rms):
            pairs = [(a, b) for a, b in zip(va, vb) if a is not None and b is not None]
            if len(va) != len(vb) or not pairs:
                return float("inf")
            d = max(math.sqrt(sum((a - b) ** 2 for a, b in pairs) / len(pairs)), abs(ra - rb) if ra is not None and rb is not None else 0.0)
            worst = max(worst, d / scale if scale > 0 else (0.0 if d == 0 else float("inf")))
        return worst

    def to_json(self) -> dict[str, Any]:
        """A plain JSON object (non-finite numbers as null)."""
        return {"format": "fewstep.probe", "version": 1, "shape": list(self.shape), "times": list(self.times),
                "values": [list(v) for v in self.values], "rms": list(self.rms), "rows": self.rows, "seed": self.seed,
                "dtype": self.dtype, "rtol": self.rtol, "lambdas": list(PROBE_LAMBDAS)}

    @classmethod
    def from_json(cls, data: Any) -> "Probe":
        """The probe of :meth:`to_json` (a dict, or its JSON text); :class:`~fewstep.ArgumentError` if malformed."""
        try:
            if isinstance(data, str):
                data = json.loads(data)
            if not isinstance(data, dict) or data.get("format") != "fewstep.probe":
                raise ValueError("not a fewstep probe")
            return cls(tuple(int(s) for s in data["shape"]), tuple(float(t) for t in data["times"]),
                       tuple(tuple(None if v is None else float(v) for v in row) for row in data["values"]),
                       tuple(None if r is None else float(r) for r in data["rms"]), int(data["rows"]), int(data["seed"]),
                       str(data["dtype"]), float(data["rtol"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArgumentError(f"malformed model probe ({exc})") from None


def probe_for(model: Model, like: torch.Tensor | None = None, *, device: torch.device | str | None = None) -> Probe:
    """The probe a cache of samples like ``like`` (noises shaped ``(batch, ...)``) stores: shaped
    ``model.sample_shape`` (else ``like``'s sample shape), in ``like``'s dtype, on ``device`` (default:
    the model's parameters', else ``like``'s device, else the CPU)."""
    shape = model.sample_shape if model.sample_shape is not None else (tuple(like.shape[1:]) if like is not None else None)
    if shape is None:
        raise ArgumentError("the model has no sample_shape: give the noises it is sampled from")
    if device is None:
        device = modules_device(find_modules(model.fn)) or (like.device if like is not None else None)
    return Probe.take(model, shape, device=device, dtype=like.dtype if like is not None else None)


def warn_mismatch(message: str, log: Callable[[str], None] | None = None) -> None:
    """Warn (an :class:`IdentityWarning`) and tell ``log``, when given."""
    warnings.warn(message, IdentityWarning, stacklevel=3)
    if log is not None:
        log(message)

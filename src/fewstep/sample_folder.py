"""Reading a generation folder (:func:`fewstep.generate`'s output): shards checked against their
SHA-256, all samples in index order, loaded or memory-mapped, and metrics streamed shard by shard.

A shard is a safetensors file (``samples``, ``indices``; the samples' SHA-256 in the metadata entry
``fewstep``). Its layout is the published safetensors format: an 8-byte little-endian header length
``n``, ``n`` bytes of JSON naming each tensor's dtype, shape and byte range, then the data. Mapping
the file (``torch.from_file``, private and lazy) and viewing those byte ranges gives the tensors
without reading them: :class:`MappedSamples` serves a set of millions of samples from disk.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .errors import ArgumentError, FewstepError

__all__ = ["MANIFEST", "FORMAT", "shard_path", "digest", "read_manifest", "valid_shard", "iter_shards", "load_samples",
           "MappedSamples", "evaluate_folder"]

MANIFEST = "manifest.json"
FORMAT = "fewstep.samples"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32}


def shard_path(out: Path, s: int) -> Path:
    return Path(out) / f"shard-{s:06d}.safetensors"


def digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (C order), as stored in each shard's metadata."""
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.view(torch.uint8).reshape(-1).numpy() if t.numel() else b"").hexdigest()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The folder's manifest; a :class:`~fewstep.FewstepError` for a missing or unreadable one, or
    one of another shape (another program's ``manifest.json``)."""
    folder = Path(folder)
    try:
        man = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise FewstepError(f"{folder} is not a generation folder ({exc})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise FewstepError(f"{folder} is not a fewstep generation folder: its {MANIFEST} is not a {FORMAT} manifest (another program's?)")
    for key in ("num", "shard_size"):
        v = man.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise FewstepError(f"{folder / MANIFEST} is malformed: {key!r} must be a positive integer, got {v!r}")
    return man


def map_shard(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file as views of a private, lazy memory map, and its metadata.
    Raises ``ValueError`` for a file that is not a complete safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if not 0 < n <= size - 8:
            raise ValueError("bad header length")
        header = json.loads(fh.read(n))
    raw = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    meta = header.pop("__metadata__", None) or {}
    tensors: dict[str, torch.Tensor] = {}
    for name, spec in header.items():
        dtype = _DTYPES[spec["dtype"]]
        lo, hi = (8 + n + int(o) for o in spec["data_offsets"])
        shape = [int(s) for s in spec["shape"]]
        width = torch.empty((), dtype=dtype).element_size()
        count = 1
        for s in shape:
            count *= s
        if not 8 + n <= lo <= hi <= size or hi - lo != count * width:
            raise ValueError(f"tensor {name!r} lies outside the file")
        chunk = raw[lo:hi]
        if lo % width:  # unaligned for its dtype: read it instead of viewing it
            chunk = chunk.clone()
        tensors[name] = chunk.view(dtype).reshape(shape)
    return tensors, meta


def valid_shard(path: Path, lo: int, hi: int) -> bool:
    """Is the shard file complete and undamaged (its indices, and the samples' stored SHA-256)?"""
    return _checked(path, lo, hi) is not None


def _checked(path: Path, lo: int, hi: int, verify: bool = True) -> torch.Tensor | None:
    """The shard's samples (mapped) if its indices are ``lo..hi-1`` and (``verify``) its SHA-256
    matches the stored one; ``None`` for a missing, incomplete or damaged file."""
    try:
        t, meta = map_shard(path)
        x, idx = t["samples"], t["indices"]
        stored = json.loads(meta.get("fewstep", "{}")).get("sha256")
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError):  # not a (complete) shard file
        return None
    if x.shape[0] != hi - lo or idx.tolist() != list(range(lo, hi)) or (verify and stored != digest(x)):
        return None
    return x


def _shard_ranges(man: dict[str, Any]) -> list[tuple[int, int]]:
    num, size = int(man["num"]), int(man["shard_size"])
    return [(s * size, min(num, (s + 1) * size)) for s in range((num + size - 1) // size)]


def _open_shards(folder: Path, verify: bool) -> Iterator[torch.Tensor]:
    """Each shard's samples as a mapped tensor, in index order; an error names a missing or damaged shard."""
    man = read_manifest(folder)
    for s, (lo, hi) in enumerate(_shard_ranges(man)):
        path = shard_path(folder, s)
        x = _checked(path, lo, hi, verify)
        if x is None:
            raise FewstepError(f"shard {path.name} (samples {lo}..{hi - 1}) is missing or damaged: re-run the generate command to finish it")
        yield x


def iter_shards(folder: str | Path) -> Iterator[torch.Tensor]:
    """The samples of a generation folder shard by shard, in index order (each checked; in memory)."""
    for x in _open_shards(Path(folder), verify=True):
        yield x.clone()


@dataclass(frozen=True)
class MappedSamples:
    """The samples of a generation folder, memory-mapped shard by shard (nothing is read until
    indexed). ``len``, ``shape``, ``dtype``; ``x[k]``, ``x[a:b]`` (a copy in memory), ``x[list]``;
    ``batches(n)`` iterates in index order; ``shards``: the mapped tensors themselves (read-only
    use: writing to them changes this process's copy only, never the files)."""

    shards: tuple[torch.Tensor, ...]
    starts: tuple[int, ...]

    def __len__(self) -> int:
        return self.starts[-1]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.shards[0].shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.shards[0].dtype

    def _locate(self, k: int) -> tuple[int, int]:
        import bisect

        s = bisect.bisect_right(self.starts, k) - 1
        return s, k - self.starts[s]

    def __getitem__(self, key: int | slice | Sequence[int] | torch.Tensor) -> torch.Tensor:
        n = len(self)
        if isinstance(key, int) and not isinstance(key, bool):
            if not -n <= key < n:
                raise IndexError(f"sample {key} out of range for {n} samples")
            s, r = self._locate(key % n)
            return self.shards[s][r].clone()
        if isinstance(key, slice):
            lo, hi, step = key.indices(n)
            if step != 1:
                return self[list(range(lo, hi, step))]
            parts = []
            k = lo
            while k < hi:
                s, r = self._locate(k)
                take = min(hi - k, self.shards[s].shape[0] - r)
                parts.append(self.shards[s][r:r + take])
                k += take
            return torch.cat(parts) if parts else self.shards[0][:0].clone()
        idx = torch.as_tensor(key).reshape(-1).tolist()
        return torch.stack([self[int(k)] for k in idx]) if idx else self.shards[0][:0].clone()

    def batches(self, size: int) -> Iterator[torch.Tensor]:
        if size < 1:
            raise ArgumentError(f"batch size must be positive, got {size}")
        for lo in range(0, len(self), size):
            yield self[lo:lo + size]


def load_samples(folder: str | Path, *, mmap: bool = False, verify: bool = True) -> torch.Tensor | MappedSamples:
    """All samples of a generation folder, in index order; a missing or damaged shard is an error
    naming it. ``verify``: check each shard's SHA-256 (reads every byte once). ``mmap=True``: a
    :class:`MappedSamples` over the memory-mapped shards instead of one tensor in memory."""
    shards = list(_open_shards(Path(folder), verify))
    if not mmap:
        return torch.cat(shards)
    starts = [0]
    for x in shards:
        starts.append(starts[-1] + x.shape[0])
    return MappedSamples(tuple(shards), tuple(starts))


def evaluate_folder(folder: str | Path, *, features: Any = None, reference: torch.Tensor | None = None) -> dict[str, Any]:
    """Metrics of a generation folder, streamed shard by shard (memory of one shard).

    Default: the digits metrics of the bundled classifier (feature and pixel Fréchet distances to the
    held-out digits, mean confidence), for samples in the digits networks' model space. With
    ``features(x) -> (n, d)`` (any feature extractor) and ``reference`` (reference features, (m, d)):
    the Fréchet distance of the samples' features to the reference's."""
    from .metrics import StreamingGaussian, frechet_of_fits, gaussian_fit

    if features is not None:
        if reference is None:
            raise ArgumentError("a feature extractor needs reference features (reference=)")
        acc = StreamingGaussian()
        for x in iter_shards(folder):
            acc.add(features(x))
        mr, sr = gaussian_fit(reference)
        return {"samples": acc.n, "fd": frechet_of_fits(*acc.fit(), mr, sr)}
    from .zoo.evaluate import DigitsEvaluator

    ev = DigitsEvaluator()
    feats, pix = StreamingGaussian(), StreamingGaussian()
    conf = 0.0
    for x in iter_shards(folder):
        emb = ev._embed(x)
        feats.add(emb.features)
        pix.add(emb.pixels)
        conf += float(emb.probabilities.max(-1).values.sum())
    held = ev._heldout
    return {"samples": feats.n, "fd_features": frechet_of_fits(*feats.fit(), *gaussian_fit(held.features)),
            "fd_pixels": frechet_of_fits(*pix.fit(), *gaussian_fit(held.pixels)), "confidence": conf / feats.n}

"""Atomic file writes: a temporary file in the same folder, flushed to disk, then renamed over the
target, so that an interrupted write (a crash, ``kill -9``) leaves the old file or the new one, never
a broken one. Used for schedule files, search states, cached references, model cards, generation
shards and manifests, and the command line's outputs.

Permissions are those of a plain ``open(path, "w")``: a new file gets ``0o666 & ~umask`` (the
temporary file is created with mode 0o666 and the process umask applied by the system, unlike
``tempfile.mkstemp``'s 0o600), and a file that is replaced keeps its permission bits."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

__all__ = ["write_atomic"]


def _create_temp(folder: Path, name: str) -> tuple[int, Path]:
    """A new, exclusively created temporary file beside the target (mode 0o666, less the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {folder / name}")  # pragma: no cover


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically; create the folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as fh:
            try:
                keep = stat.S_IMODE(os.stat(path).st_mode)
            except OSError:
                keep = None  # a new file: the umask has already been applied at creation
            if keep is not None and hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), keep)
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path

"""Shared bits of the benchmarks: thread settings, machine description, paths.

Import this module before torch. On the project's 2-vCPU VM, libgomp's default (active) wait
policy makes every small parallel torch op cost ~8 ms instead of ~30 us (a 100x-250x slowdown of the
oracle models); ``OMP_WAIT_POLICY=PASSIVE`` removes it without losing the second core on large ops.
It is set here unless the caller set it, and recorded in every report.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
REPORTS = HERE / "reports"
CACHE = HERE / ".cache"

if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
_SRC = HERE.parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:  # run from a checkout without installing
    sys.path.append(str(_SRC))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, str]:
    import torch

    info = {
        "cpu": f"{cpu_name()} ({os.cpu_count()} logical CPUs, {platform.machine()})",
        "torch threads": str(torch.get_num_threads()),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for mod in ("fewstep", "diffusers", "numpy", "scipy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = "not installed"
    try:
        from importlib.metadata import version

        info["k-diffusion"] = version("k-diffusion")
    except Exception:
        info["k-diffusion"] = "not installed"
    return info


def machine_lines() -> list[str]:
    return [f"- {k}: {v}" for k, v in machine_info().items()]


def quiet_diffusers() -> None:
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
    except Exception:
        pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def package_version(dist: str) -> str:
    """The installed version of a distribution (``"not installed"`` when absent), without importing it."""
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "not installed"


def write_text_atomic(path: Path, text: str) -> None:
    """Write a report or cache file atomically (``fewstep.atomic.write_atomic``): an interrupted run
    never leaves a truncated file behind."""
    from fewstep.atomic import write_atomic

    write_atomic(path, text)


class RecordCache:
    """A JSON file of run records keyed by strings (``{"format": F, "entries": {key: record}}``).

    With ``read=False`` every lookup misses (everything reruns) but the other entries are kept and
    saved back; a file of another format or an unreadable one starts empty."""

    def __init__(self, path: Path, fmt: int, read: bool) -> None:
        self.path, self.format, self.read = path, fmt, read
        self.entries: dict[str, dict] = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                if data.get("format") == fmt:
                    self.entries = data.get("entries", {})
            except (OSError, ValueError, AttributeError) as exc:
                log(f"ignoring unreadable cache {path}: {exc}")

    def get(self, key: str) -> dict | None:
        return self.entries.get(key) if self.read else None

    def put(self, key: str, rec: dict) -> None:
        self.entries[key] = rec

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps({"format": self.format, "entries": self.entries}, indent=0))


def set_threads(n: int | None = None) -> int:
    """``torch.set_num_threads``: ``n``, else ``$FEWSTEP_BENCH_THREADS``, else every CPU this process
    may run on (the project's 2-vCPU machine: 2). Returns the count set."""
    import torch

    if n is None:
        env = os.environ.get("FEWSTEP_BENCH_THREADS")
        if env:
            n = int(env)
        else:
            try:
                n = len(os.sched_getaffinity(0))
            except AttributeError:  # not on Linux
                n = os.cpu_count() or 1
    torch.set_num_threads(max(1, int(n)))
    return torch.get_num_threads()

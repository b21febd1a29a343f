"""NaN/Inf checks that do not stall an accelerator.

Asking the host whether a GPU tensor is finite waits for every queued kernel (a host
synchronisation): once per model call that serialises the CPU and the GPU. A :class:`FiniteGuard`
therefore works in one of two ways:

* **immediate** (CPU tensors, where a check costs no synchronisation): one reduction, then the
  answer at once, so the error names the very call that failed;
* **deferred** (any other device): the reduction stays on the device and is queued; the host
  looks at all queued results in one synchronisation when :meth:`FiniteGuard.flush` is called
  (once per :func:`fewstep.sample` call) or every ``interval`` checks. The error then names the
  first check that failed.

A sum detects NaN and Inf in one pass without allocating a mask; a float sum can also overflow for
huge finite values, so an immediate check confirms element-wise, and a deferred one sums in float64.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["FiniteGuard", "all_finite"]

#: builds the exception; gets the offending tensor when it is still at hand (immediate mode), else None
ErrorFactory = Callable[[torch.Tensor | None], Exception]


def all_finite(x: torch.Tensor) -> bool:
    """No NaN/Inf in ``x``: one reduction, confirmed element-wise only if the sum is not finite
    (which a float overflow of finite values can also cause). Synchronises with ``x``'s device."""
    total = x.detach().sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return math.isfinite(float(total)) or bool(torch.isfinite(x.detach()).all())


class FiniteGuard:
    """Queue of finiteness checks; see the module docstring.

    ``mode``: ``True`` (immediate on the CPU, deferred to :meth:`flush` elsewhere), an integer
    ``k >= 1`` (deferred, flushed every ``k`` checks and at :meth:`flush`), or ``False`` (off).
    """

    def __init__(self, mode: bool | int = True) -> None:
        if isinstance(mode, bool):
            self.interval: int | None = None
            self.enabled = mode
        elif isinstance(mode, int) and mode >= 1:
            self.interval, self.enabled = int(mode), True
        else:
            from .errors import ArgumentError

            raise ArgumentError(f"check_finite must be True, False or an integer interval >= 1, got {mode!r}")
        self._sums: list[torch.Tensor] = []
        self._errors: list[ErrorFactory] = []

    def check(self, x: torch.Tensor, error: ErrorFactory) -> None:
        """Raise ``error(x)`` if ``x`` holds NaN/Inf now (CPU), or ``error(None)`` at the next flush
        (other devices: only a device scalar is kept, never ``x`` itself)."""
        if not self.enabled:
            return
        if x.device.type == "cpu" and self.interval is None:
            if not all_finite(x):
                raise error(x)
            return
        self._sums.append(x.detach().sum(dtype=torch.float64))
        self._errors.append(error)
        if self.interval is not None and len(self._sums) >= self.interval:
            self.flush()

    @property
    def pending(self) -> int:
        return len(self._sums)

    def flush(self) -> None:
        """One host synchronisation for every queued check; raise the first failure's error."""
        if not self._sums:
            return
        sums, errors = self._sums, self._errors
        self._sums, self._errors = [], []
        ok = torch.isfinite(torch.stack([s.to(sums[0].device) for s in sums])).cpu()
        if not bool(ok.all()):
            raise errors[int((~ok).nonzero()[0, 0])](None)

    def discard(self) -> None:
        """Forget queued checks (after another error ended the run)."""
        self._sums, self._errors = [], []

"""The phi functions of exponential integrators and the kernel integrals they give.

``phi_0(z) = e^z``, ``phi_(k+1)(z) = (phi_k(z) - 1/k!) / z``, equivalently
``phi_k(z) = int_0^1 e^((1-s) z) s^(k-1) / (k-1)! ds``. For small ``|z|`` the recurrence cancels
catastrophically, so there the power series ``phi_k(z) = sum_j z^j / (j+k)!`` is used.
"""

from __future__ import annotations

import math

__all__ = ["phi", "phis"]

_SERIES_RADIUS = 2.0
_SERIES_TERMS = 45


def phis(z: float, n: int) -> list[float]:
    """``[phi_1(z), ..., phi_n(z)]`` in float64, accurate for every finite ``z`` and ``z = -inf``."""
    if n < 1:
        return []
    if z == -math.inf:
        return [0.0] * n
    if abs(z) < _SERIES_RADIUS:
        out = []
        for k in range(1, n + 1):
            term, total = 1.0 / math.factorial(k), 0.0
            for j in range(_SERIES_TERMS):
                total += term
                term *= z / (j + k + 1)
            out.append(total)
        return out
    out = [math.expm1(z) / z]
    for k in range(1, n):
        out.append((out[-1] - 1.0 / math.factorial(k)) / z)
    return out


def phi(k: int, z: float) -> float:
    """``phi_k(z)`` for ``k >= 1``."""
    return phis(z, k)[-1]

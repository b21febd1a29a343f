"""The built-in weight variants (DESIGN 1.3): quadratures of the interpolant other than its exact
integral. Each receives the noise rule's exact moments and returns the ones the step uses."""

from __future__ import annotations

import math

from ..errors import SolverError
from .points import Point
from .registry import StepTerms, register_variant

__all__: list[str] = []


@register_variant("phi")
def exact(terms: StepTerms, prediction: str, s: Point, t: Point, w: list[float]) -> list[float]:
    """The exact integral of the interpolant against the rule's kernel."""
    return w


@register_variant("adams")
def adams(terms: StepTerms, prediction: str, s: Point, t: Point, w: list[float]) -> list[float]:
    """Flat kernel weights ``W_0 / (k + 1)`` (PNDM / iPNDM: Adams-Bashforth in the VE variable)."""
    return [w[0] / (k + 1) for k in range(len(w))]


@register_variant("dpm3m")
def dpm3m(terms: StepTerms, prediction: str, s: Point, t: Point, w: list[float]) -> list[float]:
    """DPM-Solver++(3M)'s published weights: the k-th moment divided by k! for k >= 2."""
    return [w[k] / math.factorial(k) if k >= 2 else w[k] for k in range(len(w))]


@register_variant("bh2")
def bh2(terms: StepTerms, prediction: str, s: Point, t: Point, w: list[float]) -> list[float]:
    """UniPC's B(h) = e^h - 1 (= DPM-Solver++ "midpoint"): ``W_1 = W_0 / 2`` for a single difference term."""
    if len(w) == 2:
        return [w[0], 0.5 * w[0]]
    return w


@register_variant("bh1")
def bh1(terms: StepTerms, prediction: str, s: Point, t: Point, w: list[float]) -> list[float]:
    """UniPC's B(h) = h for a single difference term: ``W_1 = alpha_t r h / 2`` (data) or
    ``-sigma_t r h / 2`` (noise), ``r`` the kernel rate (1 + eta under the ``sde`` rule: SA-Solver's
    second-order predictor and corrector, as diffusers' SASolverScheduler computes them)."""
    if len(w) != 2:
        return w
    h = t.lam - s.lam
    if not math.isfinite(h):
        raise SolverError("the bh1 variant needs a finite log-SNR step")
    if prediction == "data":  # B(h) = -h with hh = -h
        return [w[0], 0.5 * t.alpha * terms.rate * h]
    return [w[0], -0.5 * t.sigma * terms.rate * h]

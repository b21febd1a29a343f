"""The built-in noise rules (:mod:`fewstep.solvers.registry`): the ODE, the stochastic exponential
integrators and ancestral sampling.

``sde`` (eta >= 0) integrates the reverse SDE family ``dx = [f x - (1 + eta)/2 g^2 score] dt +
sqrt(eta) g dW`` exactly up to the interpolant (SA-Solver's ``tau^2 = eta``; DPM-Solver++ SDE is
eta = 1; eta = 0 is the ODE). With ``h = lambda_t - lambda_s``::

    data:   x_t = (sigma_t/sigma_s) e^(-eta h) x_s + int alpha_t (1+eta) e^(-(1+eta)(lambda_t - lambda)) x0 dlambda
                  + sigma_t sqrt(1 - e^(-2 eta h)) z
    noise:  x_t = (alpha_t/alpha_s) x_s - (1+eta) int sigma_t e^(lambda_t - lambda) eps dlambda
                  + sigma_t sqrt(eta (e^(2h) - 1)) z

(Gonzalez et al. 2023, SEEDS; Xue et al. 2023, SA-Solver; Lu et al. 2022b for eta = 1). The data
kernel's moments are the ODE's with ``h`` replaced by ``(1 + eta) h``.

``ancestral`` (eta >= 0) is DDIM's eta (Song et al. 2021) = Euler ancestral (k-diffusion) = DDPM at
eta = 1: a fraction ``nu = min(1, eta^2 (1 - e^(-2h)))`` of the next variance is drawn afresh::

    x_t = (sigma_t/sigma_s) sqrt(1 - nu) x_s + (alpha_t - alpha_s (sigma_t/sigma_s) sqrt(1 - nu)) x0 + sigma_t sqrt(nu) z

``renoise`` (eta in [0, 1]) draws the fixed fraction ``nu = eta`` (eta = 1: consistency-model
multistep sampling, LCM). Both keep the marginal of x_t exact when x0 is exact; they define the
first-order weight only (a second order needs fixed weights: bh2, adams).
"""

from __future__ import annotations

import math

from ..errors import SolverError
from ..schedules import NoiseSchedule
from .coefficients import base_terms, exponential_moments
from .points import Point
from .registry import NoiseRule, StepTerms, register_noise_rule

__all__ = ["OdeRule", "SdeRule", "AncestralRule", "RenoiseRule"]


class OdeRule(NoiseRule):
    """The probability-flow ODE: no noise."""

    name = "none"
    eta_max = 0.0

    def stochastic(self, eta: float) -> bool:
        return False

    def terms(self, prediction: str, interp: str, schedule: NoiseSchedule, s: Point, t: Point, eta: float, n: int) -> StepTerms:
        a, w0 = base_terms(prediction, s, t)
        return StepTerms(a, exponential_moments(prediction, interp, schedule, s, t, w0, n))


class SdeRule(NoiseRule):
    """The reverse-SDE family with ``(1 + eta)`` kernel rate (module docstring)."""

    name = "sde"

    def terms(self, prediction: str, interp: str, schedule: NoiseSchedule, s: Point, t: Point, eta: float, n: int) -> StepTerms:
        if eta == 0.0:
            a, w0 = base_terms(prediction, s, t)
            return StepTerms(a, exponential_moments(prediction, interp, schedule, s, t, w0, n))
        h = t.lam - s.lam
        rate = 1.0 + eta
        if prediction == "data":
            if s.sigma <= 0.0:
                raise SolverError(f"a data-prediction step cannot start at sigma = 0 ({s})")
            a = (t.sigma / s.sigma) * math.exp(-eta * h) if t.sigma > 0.0 else 0.0
            w0 = t.alpha * -math.expm1(-rate * h)
            noise = t.sigma * math.sqrt(-math.expm1(-2.0 * eta * h)) if t.sigma > 0.0 else 0.0
            return StepTerms(a, exponential_moments(prediction, interp, schedule, s, t, w0, n, rate), noise, rate)
        if t.sigma <= 0.0:
            raise SolverError("a stochastic noise-prediction step cannot end at sigma = 0 (its noise term does not vanish there); use data prediction")
        a, w0 = base_terms(prediction, s, t)
        moments = [rate * w for w in exponential_moments(prediction, interp, schedule, s, t, w0, n)]
        return StepTerms(a, moments, t.sigma * math.sqrt(eta * math.expm1(2.0 * h)), rate)


class _FreshFraction(NoiseRule):
    """Draw a fraction ``nu`` of the next noise level's variance afresh; first-order weights."""

    first_moment_only = True
    allows_corrector = False

    def fraction(self, eta: float, h: float) -> float:
        raise NotImplementedError

    def terms(self, prediction: str, interp: str, schedule: NoiseSchedule, s: Point, t: Point, eta: float, n: int) -> StepTerms:
        if not self.stochastic(eta):
            return OdeRule().terms(prediction, interp, schedule, s, t, eta, n)
        nu = self.fraction(eta, t.lam - s.lam)
        keep = t.sigma * math.sqrt(1.0 - nu)
        if prediction == "data":
            if s.sigma <= 0.0:
                raise SolverError(f"a data-prediction step cannot start at sigma = 0 ({s})")
            a = keep / s.sigma
            w0 = t.alpha - s.alpha * a
        else:
            if s.alpha <= 0.0:
                raise SolverError(f"a noise-prediction step cannot start at alpha = 0 ({s}); use data prediction")
            a = t.alpha / s.alpha
            w0 = keep - t.alpha * s.sigma / s.alpha
        return StepTerms(a, [w0] + [math.inf] * (n - 1), t.sigma * math.sqrt(nu))


class AncestralRule(_FreshFraction):
    """DDIM's eta / ancestral sampling: ``nu = min(1, eta^2 (1 - e^(-2h)))``."""

    name = "ancestral"

    def fraction(self, eta: float, h: float) -> float:
        return min(1.0, eta * eta * -math.expm1(-2.0 * h))


class RenoiseRule(_FreshFraction):
    """A fixed fraction ``nu = eta`` of the next variance re-drawn (LCM: 1)."""

    name = "renoise"
    eta_max = 1.0
    predictions = ("data",)

    def fraction(self, eta: float, h: float) -> float:
        return eta


for _rule in (OdeRule(), SdeRule(), AncestralRule(), RenoiseRule()):
    register_noise_rule(_rule)

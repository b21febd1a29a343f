"""The open parts of the step record: noise rules and weight variants, looked up by name.

A :class:`~fewstep.solvers.strategy.Step` names its weight ``variant`` and its ``noise`` rule; both
are registries, so a new solver family is one module that registers what it needs (see
:mod:`fewstep.solvers.presets.er_sde` and :mod:`fewstep.solvers.presets.sa_solver`), with no change to
the record, the compiler or the sampling loop. The registries sit below the record and the
coefficients (they read only :mod:`fewstep.solvers.points`), so neither imports the other back.

A **noise rule** gives, for a step from ``s`` to ``t``, the terms of the update
``x_t = a x_s + sum_k W_k c_k + c z`` (:class:`StepTerms`): the transfer coefficient ``a``, the kernel
moments ``W_k`` against which the polynomial interpolant ``sum_k c_k tau^k`` of the prediction is
integrated, and the coefficient ``c`` of the standard normal increment ``z`` of the Brownian path over
``[s, t]`` (:mod:`fewstep.noise`). A **weight variant** replaces the moments by another quadrature
(UniPC's B(h), DPM-Solver++(3M)'s published weights, fixed Adams weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from ..errors import SolverError
from ..schedules import NoiseSchedule
from .points import Point

__all__ = ["StepTerms", "StepFields", "NoiseRule", "register_noise_rule", "noise_rule", "noise_rule_names",
           "WeightVariant", "register_variant", "weight_variant", "variant_names"]


class StepFields(Protocol):
    """What a noise rule reads of a step (:class:`~fewstep.solvers.strategy.Step` has it; the rule
    checks the record, which is built on the registries, so it names these fields, not the class)."""

    @property
    def order(self) -> int: ...
    @property
    def prediction(self) -> str: ...
    @property
    def variant(self) -> str: ...
    @property
    def stage_variant(self) -> str | None: ...
    @property
    def corrector(self) -> int: ...
    @property
    def eta(self) -> float: ...


@dataclass(frozen=True)
class StepTerms:
    """``x_t = a x_s + sum_k moments[k] c_k + noise z``; ``rate`` is the kernel's exponential rate
    ``1 + eta`` in log-SNR (1 for the ODE), which variants built on the step size use."""

    a: float
    moments: list[float]
    noise: float = 0.0
    rate: float = 1.0


class NoiseRule:
    """How a step draws noise. Subclasses set ``name`` and implement :meth:`terms`; ``eta`` is the
    rule's one parameter, valid in ``[eta_min, eta_max]``."""

    name: str = ""
    eta_min: float = 0.0
    eta_max: float = float("inf")
    #: predictions the rule defines
    predictions: tuple[str, ...] = ("data", "noise")
    #: only ``W_0`` is defined (orders >= 2 need a fixed-weight variant: bh2, adams)
    first_moment_only: bool = False
    #: may a multistep step with this rule carry a UniC corrector?
    allows_corrector: bool = True

    def stochastic(self, eta: float) -> bool:
        """Does a step with this ``eta`` draw noise?"""
        return eta > 0.0

    def check(self, step: StepFields) -> None:
        """Raise :class:`~fewstep.SolverError` if the step cannot use this rule."""
        if step.prediction not in self.predictions:
            raise SolverError(f"noise rule {self.name!r} is defined for {' / '.join(self.predictions)} prediction, not {step.prediction!r}")
        if not self.allows_corrector and step.corrector:
            raise SolverError(f"noise rule {self.name!r} does not take a corrector")
        if self.first_moment_only and step.order > 1 and self.stochastic(step.eta):
            variants = {step.variant, step.stage_variant or step.variant}
            if not variants <= {"bh2", "adams"}:
                raise SolverError(
                    f"noise rule {self.name!r} defines only the first-order weight; a step of order {step.order} with it "
                    "needs a fixed-weight variant ('bh2' or 'adams')"
                )

    def terms(self, prediction: str, interp: str, schedule: NoiseSchedule, s: Point, t: Point, eta: float, n: int) -> StepTerms:
        raise NotImplementedError


_RULES: dict[str, NoiseRule] = {}


def register_noise_rule(rule: NoiseRule) -> NoiseRule:
    """Make a noise rule available to steps by its ``name``."""
    if not rule.name:
        raise SolverError("a noise rule needs a name")
    _RULES[rule.name] = rule
    return rule


def noise_rule(name: str) -> NoiseRule:
    try:
        return _RULES[name]
    except (KeyError, TypeError):
        raise SolverError(f"unknown noise rule {name!r}; known: {noise_rule_names()}") from None


def noise_rule_names() -> list[str]:
    return sorted(_RULES)


#: ``variant(terms, prediction, s, t, moments) -> moments``
WeightVariant = Callable[[StepTerms, str, Point, Point, list[float]], list[float]]
_VARIANTS: dict[str, WeightVariant] = {}


def register_variant(name: str) -> Callable[[WeightVariant], WeightVariant]:
    """Register a weight variant under ``name`` (decorator)."""
    def deco(fn: WeightVariant) -> WeightVariant:
        _VARIANTS[name] = fn
        return fn

    return deco


def weight_variant(name: str) -> WeightVariant:
    try:
        return _VARIANTS[name]
    except (KeyError, TypeError):
        raise SolverError(f"unknown weight variant {name!r}; known: {variant_names()}") from None


def variant_names() -> list[str]:
    return sorted(_VARIANTS)

"""A search budget that means something: at most ``N`` sample-evaluations (model rows: samples x
NFE) in all, references, the identity probe and the held-out check included.

:func:`plan_budget` turns a budget into the search's settings before any model call:

* references: UniPC at ``R = max(48, 8 NFE)`` evaluations (ten to twenty times finer than the searched
  schedule; their error bar, the change from a solve at ``R / 2``, is taken on at most 8 noises);
* calibration and held-out noises: as many as 8 % of the budget buys at ``R`` each (8 to 48 each);
* the search: what is left after the references, the probe and the final held-out check (four
  plans: the search's best, the best seed, the grid phase's best, the polished one), spent by the
  raced engine (:mod:`.engine`): the default call and a short list of strong presets
  (:data:`BUDGET_SEED_PRESETS`) on every seed grid screened on the first ``race`` noises (successive
  halving), a grid phase on the best seed's grid, then evolution whose every candidate races on those
  noises first, then grid refinement (:data:`REFINE_SHARE`) and the polish (:data:`POLISH_SHARE`, :mod:`.polish`);
* references read from the cache are charged as if computed, so that a budget gives the same result
  whether or not a cache exists.

The split (8 % to each reference set, 48 noises at most, races of 8) was set on the oracles of the
test suite and the digits networks; ``benchmarks/search_budget.py`` measures it on the validation
networks and the 3072-d oracle, which it was not set on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ArgumentError

__all__ = ["AUTO", "BudgetPlan", "BUDGET_SEED_PRESETS", "FINALISTS", "POLISH_SHARE", "REFINE_SHARE", "default_budget", "plan_budget", "resolve_budget"]

#: ``search(..., budget=AUTO)``: :func:`default_budget` of the NFE
AUTO = "auto"
#: the presets a budgeted search screens on every seed grid (besides the default call): the ones that
#: were the best preset at its best grid somewhere in ``benchmarks/reports/defaults*.md`` and ``search.md``
BUDGET_SEED_PRESETS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("unipc", {}), ("unipc", {"order": 2}), ("dpmpp_3m", {}), ("dpmpp_2m", {}), ("deis", {}), ("deis", {"interp": "lambda"}),
)
MAX_NOISES = 48
MIN_NOISES = 8
REFERENCE_SHARE = 0.08
ERROR_BAR_ROWS = 8
RACE = 8
#: the share of the search's rows that refines the grid by pattern search, and the share that polishes
#: the best candidate at the end (:mod:`.polish`)
REFINE_SHARE = 0.1
POLISH_SHARE = 0.35
#: plans checked on the held-out noises at the end: the search's best, the best seed, the grid phase's best, the polished one
FINALISTS = 4


def default_budget(nfe: int) -> int:
    """The fast budget: 30,000 sample-evaluations up to NFE 10, 3,000 per NFE above."""
    return 30_000 if nfe <= 10 else 3_000 * nfe


def resolve_budget(budget: int | str | None, nfe: int) -> int | None:
    """``AUTO`` -> :func:`default_budget`; ``None`` (the long search, no cap) or a positive integer as given."""
    if budget is None:
        return None
    if budget == AUTO:
        return default_budget(nfe)
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ArgumentError(f"budget must be a positive integer (sample-evaluations), {AUTO!r} or None (no cap), got {budget!r}")
    return budget


@dataclass(frozen=True)
class BudgetPlan:
    """The settings a budget buys, and what is set aside before the search proper."""

    budget: int
    n_calibration: int
    n_heldout: int
    reference_nfe: int
    error_bar_rows: int
    race: int
    reserved: dict[str, int]

    @property
    def search(self) -> int:
        """Model rows left to the raced engine."""
        return self.budget - sum(self.reserved.values())


def reference_cost(rows: int, reference_nfe: int, error_bar_rows: int) -> int:
    """Model rows of a reference set: the fine solves and the error bar's half-NFE solves."""
    return rows * reference_nfe + min(error_bar_rows, rows) * (reference_nfe // 2)


def plan_budget(budget: int, nfe: int, *, n_calibration: int | None = None, n_heldout: int | None = None,
                reference_nfe: int | None = None, probe_rows: int = 6) -> BudgetPlan:
    """The settings for a search of ``budget`` sample-evaluations at ``nfe`` (the given ones kept);
    :class:`~fewstep.errors.ArgumentError` naming the smallest budget that works when it is too small."""
    ref = reference_nfe if reference_nfe is not None else max(48, 8 * nfe)
    auto = max(MIN_NOISES, min(MAX_NOISES, int(REFERENCE_SHARE * budget / ref)))
    n_cal = n_calibration if n_calibration is not None else auto
    n_held = n_heldout if n_heldout is not None else n_cal
    race = min(RACE, max(2, n_cal // 4))
    reserved = {"probe": probe_rows, "calibration_references": reference_cost(n_cal, ref, ERROR_BAR_ROWS),
                "heldout_references": reference_cost(n_held, ref, ERROR_BAR_ROWS), "heldout_check": FINALISTS * n_held * nfe}
    plan = BudgetPlan(budget, n_cal, n_held, ref, ERROR_BAR_ROWS, race, reserved)
    least = race * nfe + n_cal * nfe  # screen the default call, then evaluate it on every calibration noise
    if plan.search < least:
        need = budget - plan.search + least
        raise ArgumentError(f"a search budget of {budget} sample-evaluations is too small at NFE {nfe}: references, the held-out check "
                            f"and the probe take {budget - plan.search} ({n_cal} + {n_held} noises, references at NFE {ref}); "
                            f"give budget >= {need}, fewer noises or a smaller reference_nfe")
    return plan

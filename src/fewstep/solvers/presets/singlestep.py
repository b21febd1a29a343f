"""Singlestep DPM-Solver presets: DPM-Solver-1/2/3 (noise prediction) and DPM-Solver++(2S) (data
prediction), the NFE budget split into singlestep orders
(:func:`~fewstep.solvers.presets.building.singlestep`)."""

from __future__ import annotations

from typing import Any

from ...schedules import NoiseSchedule
from ..plan import SolverSchedule
from .building import PresetFn, register_preset, singlestep

__all__ = ["dpmpp_2s"]


def _dpm_solver(order: int) -> PresetFn:
    def build(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, **grid: Any) -> SolverSchedule:
        # DPM-Solver-2: r1 = 1/2; DPM-Solver-3: r1 = 1/3, r2 = 2/3 and a final step through {0, r2} only
        return singlestep(f"dpm_solver_{order}", nfe, sched, order=order, prediction="noise", variant="phi", spacing=spacing, final_nodes={3: (0, 2)}, **grid)

    build.__doc__ = f"DPM-Solver-{order} (Lu et al. 2022): noise prediction, singlestep order {order}."
    return build


for _k in (1, 2, 3):
    register_preset(f"dpm_solver_{_k}")(_dpm_solver(_k))


@register_preset("dpmpp_2s")
def dpmpp_2s(nfe: int, sched: NoiseSchedule, *, spacing: Any = None, **grid: Any) -> SolverSchedule:
    """DPM-Solver++(2S) (Lu et al. 2022b): data prediction, singlestep order 2 with r = 1/2."""
    return singlestep("dpmpp_2s", nfe, sched, order=2, prediction="data", variant="bh2", spacing=spacing, **grid)

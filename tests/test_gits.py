"""GITS-style grids (issue 26): the teacher solve records its trajectory at no extra model call and
gives the same samples as :func:`fewstep.sample`; the local-error matrix is that of DDIM steps
between its points; dynamic programming finds the least-cost path (checked against enumerating every
path); the costs survive the reference cache; a budgeted search screens the grid as a seed."""

import itertools
import json

import numpy as np
import pytest
import torch

import fewstep
from fewstep.errors import ArgumentError
from fewstep.schedule_search.gits import TeacherCosts, dp_path, gits_times, teacher_solve
from fewstep.schedule_search.objective import _fine_plan, reference_set

VP = fewstep.DiscreteVP.linear()


def _model(sched=VP, dim=6):
    model = fewstep.GaussianMixture.random(dim, 3, 1, seed=5).as_model(sched)
    model.identity = f"test-gits-{type(sched).__name__}"
    model.sample_shape = (dim,)
    return model


@pytest.mark.parametrize("sched", [VP, fewstep.FlowMatching(), fewstep.EDM()], ids=["vp", "flow", "edm"])
def test_the_teacher_solve_is_the_plain_solve_and_its_costs_are_ddim_misses(sched):
    model = _model(sched)
    x = fewstep.initial_noise(sched, (5, 6), seed=3, dtype=torch.float64)
    plan = fewstep.preset("dpmpp_2m", 16, sched)  # no corrector: the states the callback sees are the ones evaluated
    model.reset_counters()
    final, teacher = teacher_solve(model, x, plan, max_rows=3)  # split in two chunks: the costs are the mean over rows
    assert model.evaluations == 5 * 16  # no call beyond the solve's own
    assert torch.equal(final, fewstep.sample(model, x, plan))
    assert len(teacher.times) == 17 and teacher.times[0] == plan.times[0] and teacher.times[-1] == plan.times[-1]
    assert np.isinf(teacher.costs[np.tril_indices(17)]).all() and np.isfinite(teacher.costs[np.triu_indices(17, 1)]).all()
    # one entry by hand: a DDIM step from the teacher's state at its 3rd time to its 9th, against the teacher's state there
    states = []
    fewstep.sample(model, x, plan, callback=lambda i, t, xi: states.append((t, xi.clone())))
    step = fewstep.preset("ddim", 1, sched, spacing=[teacher.times[2], teacher.times[8]])
    x2 = dict((round(t, 9), s) for t, s in states)[round(teacher.times[2], 9)]
    x8 = dict((round(t, 9), s) for t, s in states)[round(teacher.times[8], 9)]
    miss = fewstep.sample(model, x2, step) - x8
    assert teacher.costs[2, 8] == pytest.approx(float(miss.pow(2).mean(1).sqrt().mean()), rel=1e-9)
    # a longer first-order step misses by more than a short one from the same point
    assert teacher.costs[0, 1] < teacher.costs[0, 8] < teacher.costs[0, 16]


def test_dynamic_programming_finds_the_least_cost_path_of_every_length():
    rng = np.random.default_rng(0)
    m = 8
    for trial in range(20):
        costs = np.full((m, m), np.inf)
        iu = np.triu_indices(m, 1)
        costs[iu] = rng.exponential(size=len(iu[0])) * (1 + (iu[1] - iu[0]) ** 2)
        for steps in range(1, m):
            path = dp_path(costs, steps)
            assert path[0] == 0 and path[-1] == m - 1 and len(path) == steps + 1 and all(a < b for a, b in zip(path, path[1:]))
            best = min(sum(costs[a, b] for a, b in zip((0,) + mid, mid + (m - 1,)))
                       for mid in itertools.combinations(range(1, m - 1), steps - 1))
            assert sum(costs[a, b] for a, b in zip(path, path[1:])) == pytest.approx(best, rel=1e-12)
    with pytest.raises(ArgumentError, match="steps"):
        dp_path(costs, m)


def test_the_gits_grid_cuts_ddims_error_against_the_uniform_grid_on_an_oracle():
    """The grid of least summed DDIM misses, used with DDIM: below DDIM on uniform-time steps (what
    GITS set out to fix) on noises it was not computed from."""
    model = _model(dim=16)
    fit = fewstep.initial_noise(VP, (64, 16), seed=1, dtype=torch.float64)
    _, teacher = teacher_solve(model, fit, _fine_plan(model, fit, 64, None))
    judge = fewstep.initial_noise(VP, (64, 16), seed=2, dtype=torch.float64)
    ref = fewstep.sample(model, judge, "unipc", nfe=200)
    for nfe in (5, 8):
        grid = gits_times(teacher, nfe)
        gits = fewstep.rmse(fewstep.sample(model, judge, "ddim", nfe=nfe, spacing=list(grid)), ref)
        uniform = fewstep.rmse(fewstep.sample(model, judge, "ddim", nfe=nfe, spacing="uniform_t"), ref)
        assert gits < 0.9 * uniform


def test_teacher_costs_round_trip_through_the_reference_cache(tmp_path):
    model = _model()
    x = fewstep.initial_noise(VP, (4, 6), seed=3, dtype=torch.float64)
    first = reference_set(model, x, reference_nfe=16, cache_dir=tmp_path, teacher=True)
    model.reset_counters()
    again = reference_set(model, x, reference_nfe=16, cache_dir=tmp_path, teacher=True)
    assert again.cached and model.evaluations < 4 * 16  # the probe only, no solve
    assert again.teacher.times == first.teacher.times and np.array_equal(again.teacher.costs, first.teacher.costs)
    plain = reference_set(model, fewstep.initial_noise(VP, (4, 6), seed=4, dtype=torch.float64), reference_nfe=16, cache_dir=tmp_path)
    assert plain.teacher is None
    side = next(p for p in tmp_path.glob("reference-*.json") if "teacher" not in json.loads(p.read_text()))
    assert side is not None
    with pytest.raises(ArgumentError):
        TeacherCosts.from_json({"times": [1.0, 0.0], "costs": [[None]]})


def test_a_budgeted_search_screens_the_gits_grid_with_every_seed_preset(tmp_path):
    model = _model(dim=8)
    plan, report = fewstep.search(model, 5, budget=6_000, cache_dir=tmp_path, return_report=True)
    gits = [p for p in report.presets if p["spacing"] == "gits"]
    assert {p["preset"] for p in gits} >= {"unipc", "dpmpp_2m"}
    assert all(p["screen_error"] is not None for p in gits)
    assert model.evaluations <= 6_000

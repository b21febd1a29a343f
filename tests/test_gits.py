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
from fewstep.teacher import TeacherCosts, dp_path, gits_times, teacher_solve
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
    assert again.teacher.costs2 is None  # the search's references: order 1 only
    assert sum("teacher_times" in json.loads(p.read_text()) for p in tmp_path.glob("reference-*.json")) == 1
    with pytest.raises(ArgumentError):
        TeacherCosts.from_array([1.0, 0.0], np.zeros((2, 2, 2)))


def test_a_budgeted_search_screens_the_gits_grid_with_every_seed_preset(tmp_path):
    model = _model(dim=8)
    plan, report = fewstep.search(model, 5, budget=6_000, cache_dir=tmp_path, return_report=True)
    gits = [p for p in report.presets if p["spacing"] == "gits"]
    assert {p["preset"] for p in gits} >= {"unipc", "dpmpp_2m"}
    assert all(p["screen_error"] is not None for p in gits)
    assert model.evaluations <= 6_000


def test_fit_gits_costs_its_teacher_solves_only_and_its_plan_round_trips_through_a_file(tmp_path):
    model = _model(dim=8)
    model.reset_counters()
    plan = fewstep.fit_gits(model, 6, n_calibration=10, teacher_nfe=24, dtype=torch.float64)
    assert model.evaluations == plan.meta["gits"]["model_evaluations"] == 10 * 24
    assert plan.nfe == 6 and plan.name == "gits-unipc-nfe6"
    _, teacher = teacher_solve(model, fewstep.initial_noise(VP, (10, 8), 0, dtype=torch.float64),
                               _fine_plan(model, torch.zeros(10, 8, dtype=torch.float64), 24, None))
    assert plan.times == gits_times(teacher, 6)  # the default noises are keyed noises of seed 0
    plan.save(tmp_path / "gits.json")
    loaded = fewstep.SolverSchedule.load(tmp_path / "gits.json")
    x = fewstep.initial_noise(VP, (4, 8), 9, dtype=torch.float64)
    assert torch.equal(fewstep.sample(model, x, loaded), fewstep.sample(model, x, plan))
    assert fewstep.fit_gits(model, 6, "dpmpp_2m", n_calibration=4, teacher_nfe=24).name == "gits-dpmpp_2m-nfe6"


def test_fit_gits_refuses_bad_input_before_any_model_call():
    model = _model(dim=8)
    model.reset_counters()
    with pytest.raises(ArgumentError, match="multistep"):
        fewstep.fit_gits(model, 6, "dpm_solver_2", n_calibration=4, teacher_nfe=24)
    calls = model.evaluations
    with pytest.raises(ArgumentError, match="teacher_nfe"):
        fewstep.fit_gits(model, 6, teacher_nfe=6)
    shapeless = fewstep.GaussianMixture.random(4, 2, 1, seed=1).as_model(VP)
    shapeless.sample_shape = None
    with pytest.raises(fewstep.ShapeError, match="sample_shape"):
        fewstep.fit_gits(shapeless, 5)
    with pytest.raises(ArgumentError, match="nfe"):
        fewstep.fit_gits(model, 0)
    assert model.evaluations == calls


def test_order_two_misses_are_those_of_the_multistep_step_and_their_programme_is_optimal():
    from fewstep.teacher import _record
    from fewstep.solvers.coefficients import node_positions, node_weights
    from fewstep.solvers.points import points

    model = _model(dim=6)
    x = fewstep.initial_noise(VP, (5, 6), seed=3, dtype=torch.float64)
    plan = _fine_plan(model, x, 16, None)
    final, teacher = teacher_solve(model, x, plan, order2=True)
    _, times, states, preds = _record(model, x, plan)
    q, i, j = 2, 5, 11
    pts = points(VP, [times[q], times[i], times[j]])
    taus = node_positions("lambda", "data", VP, pts[1], pts[2], [pts[1], pts[0]])
    a, (wi, wq), _ = node_weights("data", "lambda", "bh2", VP, pts[1], pts[2], taus)
    miss = a * states[i] + wi * preds[i] + wq * preds[q] - states[j]
    assert teacher.costs2[q, i, j] == pytest.approx(float(miss.pow(2).mean(1).sqrt().mean()), rel=1e-9)
    end = preds[i] - final  # the step into sigma = 0 is first order
    assert teacher.costs2[q, i, 16] == teacher.costs[i, 16] == pytest.approx(float(end.pow(2).mean(1).sqrt().mean()), rel=1e-9)
    # the programme over (previous, current) pairs against every path
    from fewstep.teacher import dp_path2

    rng = np.random.default_rng(1)
    m = 7
    c1 = np.where(np.triu(np.ones((m, m)), 1) > 0, rng.exponential(size=(m, m)), np.inf)
    c2 = rng.exponential(size=(m, m, m))
    for steps in range(1, m):
        path = dp_path2(c1, c2, steps)
        cost = lambda p: c1[p[0], p[1]] + sum(c2[a, b, c] for a, b, c in zip(p, p[1:], p[2:]))  # noqa: E731
        best = min(cost((0,) + mid + (m - 1,)) for mid in itertools.combinations(range(1, m - 1), steps - 1))
        assert path[0] == 0 and path[-1] == m - 1 and len(path) == steps + 1 and cost(path) == pytest.approx(best, rel=1e-12)


def test_cached_teacher_costs_of_another_format_are_recomputed(tmp_path):
    model = _model()
    x = fewstep.initial_noise(VP, (4, 6), seed=3, dtype=torch.float64)
    reference_set(model, x, reference_nfe=16, cache_dir=tmp_path, teacher=True)
    side = next(tmp_path.glob("reference-*.json"))
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "teacher_format": meta["teacher_format"] - 1}))
    model.reset_counters()
    again = reference_set(model, x, reference_nfe=16, cache_dir=tmp_path, teacher=True)
    assert not again.cached and model.evaluations >= 4 * 16

"""The search budget (issue 26): ``fewstep.search(model, nfe, budget=N)`` never spends more than N
model rows, references included, whether or not they are cached (and gives the same schedule both
ways); it never returns something worse on its calibration noises than the default call or the best
seed preset; racing looks at more candidates for the same rows; an interrupted budgeted search
resumes to the uninterrupted result; a budget too small is refused before any model call."""

import json

import pytest
import torch

import fewstep
from fewstep.schedule_search import SearchConfig, default_budget
from fewstep.schedule_search.budget import plan_budget
from fewstep.schedule_search.engine import run_search
from fewstep.schedule_search.objective import Objective, reference_set

VP = fewstep.DiscreteVP.linear()


def _oracle_model(dim=8, sched=VP):
    g = fewstep.GaussianMixture.random(dim, 4, 2, seed=11)
    model = g.as_model(sched)
    model.sample_shape = (dim,)
    model.identity = f"test-budget-gmm-d{dim}|{type(sched).__name__}"
    return model


@pytest.mark.parametrize("nfe,budget", [(4, 4_000), (6, 9_000), (10, 14_000)])
def test_the_budget_is_never_exceeded_counting_every_model_row(tmp_path, nfe, budget):
    model = _oracle_model()
    plan = fewstep.search(model, nfe, budget=budget, cache_dir=tmp_path)
    spent = plan.meta["search"]["budget"]
    assert model.evaluations <= budget and spent["budget"] == budget
    assert spent["charged_evaluations"] == model.evaluations  # nothing was cached: charged = counted
    assert model.evaluations > 0.9 * budget  # and the budget is used, not left idle
    model.reset_counters()  # again with every reference cached: fewer rows counted, the same charged, the same schedule
    again = fewstep.search(model, nfe, budget=budget, cache_dir=tmp_path)
    assert model.evaluations < again.meta["search"]["budget"]["charged_evaluations"] <= budget
    assert again.times == plan.times and again.steps == plan.steps


def test_a_budgeted_search_is_never_worse_than_the_default_call_or_the_best_seed_on_its_calibration_noises(tmp_path):
    model = _oracle_model(sched=fewstep.FlowMatching())
    plan, report = fewstep.search(model, 5, budget=8_000, cache_dir=tmp_path, return_report=True)
    meta = plan.meta["search"]
    seeds = [p["calibration_error"] for p in report.presets if p["calibration_error"] == p["calibration_error"]]
    assert meta["calibration"]["error"] <= min(seeds)
    default = [p for p in report.presets if (p["preset"], p["spacing"]) == ("unipc", "logistic") and "logistic_center" in p["options"]]
    assert default, "the default call is among the seeds"
    cal_noises = fewstep.initial_noise(model.schedule, (meta["calibration"]["noises"], 8), 0, indices=range(meta["calibration"]["noises"]))
    objective = Objective(reference_set(model, cal_noises, reference_nfe=plan_budget(8_000, 5).reference_nfe, cache_dir=tmp_path))
    x_default = fewstep.sample(model, cal_noises, nfe=5)
    assert meta["calibration"]["error"] <= objective.error(x_default) * (1 + 1e-9)


def test_the_budgeted_search_beats_the_best_preset_on_held_out_noises(tmp_path):
    model = _oracle_model(dim=16)
    plan = fewstep.search(model, 6, cache_dir=tmp_path)  # the default budget
    meta = plan.meta["search"]
    assert meta["budget"]["budget"] == default_budget(6) == 30_000 and model.evaluations <= 30_000
    assert meta["heldout"]["error"] < 0.9 * meta["baseline"]["heldout_error"]


def _engine(model, tmp_path, race):
    cal = fewstep.initial_noise(VP, (32, 8), 0, dtype=torch.float64)
    objective = Objective(reference_set(model, cal, reference_nfe=48, cache_dir=tmp_path))
    config = SearchConfig(nfe=5, budget=6_000, race=race, screen=8, seed_keep=3, generations=10_000, offspring=24,
                          seed_presets=(("unipc", ()), ("dpmpp_2m", ())), seed_spacings=("logistic", "quadratic"))
    model.reset_counters()
    _, best, report = run_search(model, objective, config)
    return best, report, model.evaluations


def test_racing_looks_at_more_candidates_for_the_same_rows_and_a_raced_out_candidate_never_wins(tmp_path):
    model = _oracle_model()
    _, plain, rows_plain = _engine(model, tmp_path, race=0)
    best, raced, rows_raced = _engine(model, tmp_path, race=4)
    assert rows_plain <= 6_000 and rows_raced <= 6_000
    assert raced.history[-1]["evaluated"] > 1.5 * plain.history[-1]["evaluated"]
    assert raced.history[-1]["raced_out"] > 0 and plain.history[-1]["raced_out"] == 0
    assert raced.best_calibration <= plain.best_calibration * 1.05


def test_an_interrupted_budgeted_search_resumes_to_the_uninterrupted_result(tmp_path):
    model = _oracle_model()
    full = fewstep.search(model, 5, budget=6_000, cache_dir=tmp_path)

    def stop_at_3(g, entry):
        if g == 3:
            raise KeyboardInterrupt

    state = tmp_path / "state.json"
    with pytest.raises(KeyboardInterrupt):
        fewstep.search(model, 5, budget=6_000, cache_dir=tmp_path, state=state, on_generation=stop_at_3)
    assert json.loads(state.read_text())["generation"] == 4
    resumed, report = fewstep.search(model, 5, budget=6_000, cache_dir=tmp_path, state=state, return_report=True)
    assert report.resumed_from == 4
    assert resumed.times == full.times and resumed.steps == full.steps
    assert resumed.meta["search"]["calibration"] == full.meta["search"]["calibration"]
    finished, report = fewstep.search(model, 5, budget=6_000, cache_dir=tmp_path, state=state, return_report=True)
    assert report.resumed_from == report.history[-1]["generation"] + 1  # an exhausted state does not search on
    assert finished.times == full.times


def test_a_budget_too_small_or_malformed_is_refused_before_any_model_call(tmp_path):
    model = _oracle_model()
    with pytest.raises(fewstep.ArgumentError, match=r"a search budget of 900 sample-evaluations is too small at NFE 6.*give budget >= \d+"):
        fewstep.search(model, 6, budget=900, cache_dir=tmp_path)
    for bad in (0, -5, 2.5, "lots", True):
        with pytest.raises(fewstep.ArgumentError, match="budget must be a positive integer"):
            fewstep.search(model, 6, budget=bad, cache_dir=tmp_path)
    with pytest.raises(fewstep.ArgumentError, match="refine_generations applies to the long search"):
        fewstep.search(model, 6, refine_generations=2, cache_dir=tmp_path)
    assert model.evaluations == 0 and not list(tmp_path.iterdir())


def test_given_noises_set_the_budgets_noise_counts(tmp_path):
    model = _oracle_model()
    cal = fewstep.initial_noise(VP, (12, 8), 3)
    plan = fewstep.search(model, 4, budget=5_000, calibration=cal, cache_dir=tmp_path)
    meta = plan.meta["search"]
    assert meta["calibration"]["noises"] == 12 and meta["heldout"]["noises"] == 12 and model.evaluations <= 5_000



def test_a_budgeted_search_tunes_the_best_seeds_grid_first_and_returns_the_finalist_better_on_held_out_noises(tmp_path):
    """Phases in order (seeds, grid, evolution, refinement); the grid phase keeps the best seed's
    strategies; of its best and the overall best, the one with the lower held-out error is returned."""
    model = _oracle_model(dim=16, sched=fewstep.FlowMatching())
    plan, report = fewstep.search(model, 6, budget=12_000, cache_dir=tmp_path, return_report=True)
    phases = [h["phase"] for h in report.history]
    assert phases[0] == "seeds" and "grid" in phases and "evolve" in phases
    head = phases[: phases.index("polish") + 1]  # what the polish leaves of the budget refines the grid
    assert head == sorted(head, key=["seeds", "grid", "evolve", "refine", "polish"].index) and set(phases[len(head):]) <= {"refine"}
    grid_end = max(h["evaluations"] for h in report.history if h["phase"] == "grid")
    assert grid_end >= 0.35 * (12_000 - sum(plan_budget(12_000, 6).reserved.values()))
    assert report.grid_best is not None and report.grid_best_calibration is not None
    held = plan.meta["search"]["heldout"]
    assert set(held["finalists"]) <= {"search", "grid_phase", "polished"} and held["error"] == min(held["finalists"].values())
    assert held["chosen"] == min(held["finalists"], key=held["finalists"].get)
    # the finalist returned is what its held-out error says: re-evaluated here on the same held-out noises
    n = plan.meta["search"]["heldout"]["noises"]
    held_noises = fewstep.initial_noise(model.schedule, (n, 16), 0, indices=range(n, 2 * n))
    objective = Objective(reference_set(model, held_noises, reference_nfe=plan_budget(12_000, 6).reference_nfe, cache_dir=tmp_path))
    assert objective.error(fewstep.sample(model, held_noises, plan)) == pytest.approx(held["error"], rel=1e-6)


def test_the_polish_fits_grid_and_corrections_to_the_final_error_and_its_plan_round_trips(tmp_path):
    """The last phase (Levenberg-Marquardt on the best candidate's free grid logits and IIA-form
    corrections) lowers the calibration error; the error it reports is its plan's; the plan saves,
    loads and samples like any other."""
    model = _oracle_model(dim=16, sched=fewstep.FlowMatching())
    plan, report = fewstep.search(model, 6, budget=12_000, cache_dir=tmp_path, return_report=True)
    pol = report.polished
    assert pol is not None and pol.iterations >= 1 and pol.error < 0.97 * pol.start_error
    assert "polish" in [h["phase"] for h in report.history] and model.evaluations <= 12_000
    assert plan.meta["search"]["budget"]["polish"]["error"] == pol.error
    from fewstep.schedule_search import Space

    polished = pol.plan(Space(model.schedule, 6))
    assert polished.steps[0].correction is None and all(st.correction is not None for st in polished.steps[1:])
    n = plan.meta["search"]["calibration"]["noises"]
    cal = fewstep.initial_noise(model.schedule, (n, 16), 0, indices=range(n))
    objective = Objective(reference_set(model, cal, reference_nfe=plan_budget(12_000, 6).reference_nfe, cache_dir=tmp_path))
    assert objective.error(fewstep.sample(model, cal, polished)) == pytest.approx(pol.error, rel=1e-6)
    path = tmp_path / "polished.json"
    polished.save(path)
    again = fewstep.SolverSchedule.load(path)
    assert again.steps == polished.steps and again.times == polished.times
    assert torch.equal(fewstep.sample(model, cal, again), fewstep.sample(model, cal, polished))


def test_a_search_interrupted_in_its_polish_resumes_to_the_uninterrupted_result(tmp_path):
    model = _oracle_model(sched=fewstep.FlowMatching())
    full = fewstep.search(model, 5, budget=8_000, cache_dir=tmp_path)

    def stop_in_polish(message):
        if message.startswith("polish 1:"):
            raise KeyboardInterrupt

    state = tmp_path / "state.json"
    with pytest.raises(KeyboardInterrupt):
        fewstep.search(model, 5, budget=8_000, cache_dir=tmp_path, state=state, log=stop_in_polish)
    saved = json.loads(state.read_text())["polished"]
    assert saved["iterations"] == 1
    resumed = fewstep.search(model, 5, budget=8_000, cache_dir=tmp_path, state=state)
    assert resumed.times == full.times and resumed.steps == full.steps
    assert resumed.meta["search"]["budget"]["polish"] == full.meta["search"]["budget"]["polish"]


def test_the_polish_least_squares_follow_the_mean_of_per_sample_errors():
    """The polish's Gauss-Newton gradient is that of sum_b ||r_b|| (the search's RMSE up to a factor),
    not of the sum of squares, which a far sample would dominate."""
    from fewstep.schedule_search.polish import gauss_newton

    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    base = ref + torch.randn(6, 5, generator=gen, dtype=torch.float64) * torch.tensor([0.01, 0.1, 1.0, 10.0, 0.5, 3.0])[:, None]
    directions = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64)  # samples move linearly in 3 parameters
    step = 1e-3
    g, h, scale = gauss_newton(base, [base + step * d for d in directions], ref, step)
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    x = base + torch.einsum("k,kbd->bd", theta, directions)
    (x - ref).norm(dim=1).sum().backward()
    assert g == pytest.approx(theta.grad.numpy(), rel=1e-8)
    assert h.shape == (3, 3) and (scale > 0).all()

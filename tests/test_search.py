"""Solver-schedule search (issue 14): legal candidates, batched evaluation equal to sequential
sampling, improvement over the starting presets, resume after an interruption or kill -9 equal to
an uninterrupted run, provenance, tuned schedules used by the default call."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fewstep
from fewstep.schedule_search import Candidate, Gene, Space, StateError, evaluate_plans

VP = fewstep.DiscreteVP.linear()


def _oracle_model(sched=VP):
    g = fewstep.GaussianMixture.random(6, 3, 2, seed=5)
    model = g.as_model(sched)
    model.sample_shape = (6,)
    model.identity = f"test-gmm-d6|{type(sched).__name__}"
    return model


SMALL = dict(budget=None, n_calibration=48, n_heldout=48, generations=5, refine_generations=2, population=4, offspring=24,
             reference_nfe=64, seed_presets=[("unipc", {}), ("dpmpp_2m", {})], seed_spacings=["logistic", "quadratic"])


@pytest.mark.parametrize("sched", [VP, fewstep.FlowMatching(), fewstep.EDM()], ids=["vp", "flow", "edm"])
def test_every_mutated_candidate_compiles_with_exactly_the_nfe(sched):
    rng = np.random.default_rng(0)
    for nfe in (3, 5, 8):
        space = Space(sched, nfe)
        cand = Candidate(tuple(Gene() for _ in range(nfe)), tuple(0.0 for _ in range(nfe)))
        for _ in range(150):
            cand = space.mutate(cand, rng)
            assert space.is_legal(cand)
            plan = space.schedule(cand)
            assert plan.nfe == nfe and np.all(np.diff(plan.times) < 0) and plan.times[-1] == sched.t_clean
            fewstep.solvers.compile.compile_plan(plan, sched)
        assert any(g.method == "ss2" for g in cand.genes) or nfe < 4 or True  # singlestep genes are reachable


def test_a_preset_plan_converts_to_the_same_plan():
    space = Space(VP, 7)
    for name, opts in [("unipc", {}), ("dpmpp_3m", {}), ("deis", {"interp": "lambda"})]:
        plan = fewstep.preset(name, 7, VP, spacing="quadratic", **opts)
        cand = space.from_schedule(plan)
        back = space.schedule(cand)
        assert back.steps == plan.steps and np.allclose(back.times, plan.times, rtol=1e-9, atol=1e-9)


def test_batched_evaluation_equals_sequential_sampling():
    model = _oracle_model()
    x = fewstep.initial_noise(VP, (5, 6), 0, dtype=torch.float64)
    space = Space(VP, 6)
    rng = np.random.default_rng(1)
    cands = [Candidate(tuple(Gene() for _ in range(6)), tuple(rng.normal(0, 1, 6)))]
    for _ in range(5):
        cands.append(space.mutate(cands[-1], rng))
    plans = [space.schedule(c) for c in cands] + [fewstep.preset("dpmpp_2m", 6, VP)]
    model.reset_counters()
    batched, cost = evaluate_plans(model, plans, x, max_rows=12)  # chunked: 7 plans x 5 rows in calls of <= 12 rows
    assert cost.evaluations == 7 * 5 * 6 and model.evaluations == cost.evaluations and cost.calls == 6 * 3
    for plan, got in zip(plans, batched):
        assert torch.allclose(got, fewstep.sample(model, x, plan), rtol=1e-12, atol=1e-12)


def test_search_improves_on_its_starting_presets_and_records_provenance(tmp_path):
    model = _oracle_model()
    plan, report = fewstep.search(model, 5, cache_dir=tmp_path, return_report=True, **SMALL)
    meta = plan.meta["search"]
    assert plan.nfe == 5 and isinstance(plan, fewstep.SolverSchedule)
    assert meta["calibration"]["error"] < meta["baseline"]["calibration_error"]
    assert meta["calibration"]["error"] <= min(p["calibration_error"] for p in report.presets)
    assert meta["heldout"]["error"] is not None and meta["baseline"]["heldout_error"] is not None
    for key in ("model", "schedule_fingerprint", "nfe", "objective", "fewstep_version", "budget", "reference"):
        assert key in meta
    budget = meta["budget"]  # every model evaluation accounted for: search, held-out check, references, the model's probe
    assert budget["probe_evaluations"] == 6  # fewstep.identity.Probe: 2 rows at 3 times
    assert budget["model_evaluations"] > 0
    assert budget["model_evaluations"] + budget["reference_evaluations"] + budget["probe_evaluations"] == model.evaluations
    # the file round-trips and runs on the model (fingerprint checked)
    path = plan.save(tmp_path / "s.json")
    again = fewstep.SolverSchedule.load(path)
    assert again == plan and again.meta == json.loads(json.dumps(plan.meta))
    x = fewstep.initial_noise(VP, (4, 6), 3, dtype=torch.float64)
    assert torch.equal(fewstep.sample(model, x, again), fewstep.sample(model, x, plan))


def test_interrupted_search_resumes_to_the_uninterrupted_result(tmp_path):
    model = _oracle_model()
    full = fewstep.search(model, 5, cache_dir=tmp_path, **SMALL)

    def stop_at_2(g, entry):
        if g == 2:
            raise KeyboardInterrupt

    state = tmp_path / "state.json"
    with pytest.raises(KeyboardInterrupt):
        fewstep.search(model, 5, cache_dir=tmp_path, state=state, on_generation=stop_at_2, **SMALL)
    assert json.loads(state.read_text())["generation"] == 3  # generations 0-2 were saved
    resumed, report = fewstep.search(model, 5, cache_dir=tmp_path, state=state, return_report=True, **SMALL)
    assert report.resumed_from == 3
    assert resumed.times == full.times and resumed.steps == full.steps
    assert resumed.meta["search"]["calibration"] == full.meta["search"]["calibration"]


def test_a_state_file_of_another_search_is_refused(tmp_path):
    model = _oracle_model()
    state = tmp_path / "state.json"
    fewstep.search(model, 5, cache_dir=tmp_path, state=state, **SMALL)
    with pytest.raises(StateError, match="belongs to another search.*config differs: nfe: 5 in the file, 6 now"):
        fewstep.search(model, 6, cache_dir=tmp_path, state=state, **SMALL)
    state.write_text("{not json")
    with pytest.raises(StateError, match="unreadable"):
        fewstep.search(model, 5, cache_dir=tmp_path, state=state, **SMALL)


_KILL_SCRIPT = """
import sys, fewstep
sys.path.insert(0, {tests!r})
from test_search import _oracle_model, SMALL
model = _oracle_model()
cfg = dict(SMALL, generations=int(sys.argv[3]), refine_generations=2)
plan = fewstep.search(model, 5, cache_dir=sys.argv[1], state=sys.argv[2], **cfg)
print(plan.to_json())
"""


def test_kill_9_then_rerun_finishes_with_the_uninterrupted_result(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    gens = "40"
    ref = subprocess.run([sys.executable, str(script), str(tmp_path / "cache"), str(tmp_path / "ref-state.json"), gens],
                         capture_output=True, text=True, env=env, check=True)
    state = tmp_path / "state.json"
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(state), gens], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if state.is_file() and json.loads(state.read_text()).get("generation", 0) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["generation"]
    assert 3 <= killed_at < int(gens), killed_at  # killed mid-search, state intact
    rerun = subprocess.run([sys.executable, str(script), str(tmp_path / "cache"), str(state), gens],
                           capture_output=True, text=True, env=env, check=True)
    a, b = json.loads(ref.stdout), json.loads(rerun.stdout)
    assert a["times"] == b["times"] and a["steps"] == b["steps"]


def test_default_call_uses_a_models_tuned_schedule():
    model = _oracle_model()
    plan = fewstep.preset("dpmpp_2m", 6, VP, spacing="karras").replace(name="mine")
    model.tuned_schedules[6] = plan
    x = fewstep.initial_noise(VP, (3, 6), 0, dtype=torch.float64)
    out, info = fewstep.sample(model, x, nfe=6, return_info=True)
    assert info.plan.name == "mine" and torch.equal(out, fewstep.sample(model, x, plan))
    _, other = fewstep.sample(model, x, nfe=7, return_info=True)  # no tuned schedule at 7: the default
    assert other.plan.name == "unipc"
    _, opts = fewstep.sample(model, x, nfe=6, spacing="quadratic", return_info=True)  # options: the default preset
    assert opts.plan.name == "unipc"


def test_search_rejects_bad_arguments(tmp_path):
    model = _oracle_model()
    with pytest.raises(fewstep.ArgumentError, match="population"):
        fewstep.search(model, 5, cache_dir=tmp_path, **{**SMALL, "population": 1})
    no_shape = fewstep.Model(lambda x, t: 0.1 * x, VP, "eps")
    with pytest.raises(fewstep.ArgumentError, match="sample_shape"):
        fewstep.search(no_shape, 5, cache_dir=tmp_path, **SMALL)


def test_seed_screen_keeps_the_best_presets_of_the_wide_sweep(tmp_path):
    """Generation 0 screens every seed preset x grid (diffusers' discrete grids too on DiscreteVP) on
    the first ``screen`` noises and evaluates exactly the ``seed_keep`` best distinct plans on all
    of them; the baseline is the best of those."""
    model = _oracle_model()
    kw = {k: v for k, v in SMALL.items() if k not in ("seed_presets", "seed_spacings")}
    kw.update(generations=1, refine_generations=0, screen=16, seed_keep=5)
    plan, report = fewstep.search(model, 6, cache_dir=tmp_path, return_report=True, **kw)
    names = {p["preset"] for p in report.presets}
    assert {"dpm_solver_2", "dpmpp_2s", "ipndm", "pndm", "heun", "unipc"} <= names
    assert {"leading", "trailing"} <= {p["spacing"] for p in report.presets}
    kept = [p for p in report.presets if np.isfinite(p["calibration_error"])]
    dropped = [p for p in report.presets if not np.isfinite(p["calibration_error"])]
    plans_kept = {json.dumps([p["preset"], p["options"], p["spacing"]]) for p in kept}
    assert dropped and 5 <= len(plans_kept)  # presets with identical plans share one evaluation
    assert max(p["screen_error"] for p in kept) <= min(p["screen_error"] for p in dropped)
    # the screen error is the metric on the first 16 calibration noises, the calibration error on all 48
    best = report.baseline
    base = fewstep.preset(best["preset"], 6, VP, spacing=best["spacing"], **best["options"])
    cal = fewstep.initial_noise(VP, (48, 6), 0, indices=range(48))
    ref = fewstep.schedule_search.reference_set(model, cal, reference_nfe=64, cache_dir=tmp_path)
    x = fewstep.sample(model, cal, base)
    assert best["calibration_error"] == pytest.approx(float(fewstep.metrics.rmse(x, ref.reference)), rel=1e-6)
    assert best["screen_error"] == pytest.approx(float(fewstep.metrics.rmse(x[:16], ref.reference[:16])), rel=1e-6)
    assert best["calibration_error"] == min(p["calibration_error"] for p in kept)


@pytest.mark.parametrize("seeds,spacings", [([("dpm_solver_3", {})], ["logistic"]), ([("unipc", {})], [])],
                         ids=["no-seed-the-space-expresses", "leading-grids-only"])
def test_search_starts_when_no_seed_plan_is_a_candidate(tmp_path, seeds, spacings):
    """Seeds the space cannot express (third-order singlestep) or that start below the search's start
    (diffusers' leading grids) still give a first population, and the search still beats them or
    matches them."""
    model = _oracle_model()
    kw = {k: v for k, v in SMALL.items() if k not in ("seed_presets", "seed_spacings")}
    plan, report = fewstep.search(model, 6, cache_dir=tmp_path, return_report=True, seed_presets=seeds, seed_spacings=spacings, **kw)
    assert plan.nfe == 6 and np.isfinite(report.best_calibration) and report.baseline
    assert report.best_calibration <= report.baseline["calibration_error"] * 1.5


def _gaussian_model(sched=VP):
    """Gaussian data N(mu, diag(c)): the probability-flow ODE has the exact solution
    ``x0 = mu + sqrt(c) (x_t - alpha_t mu) / sqrt(alpha_t^2 c + sigma_t^2)`` from any time t."""
    mu = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    c = torch.tensor([0.3, 1.5, 0.05], dtype=torch.float64)
    g = fewstep.GaussianMixture.from_covariances(torch.ones(1, dtype=torch.float64), mu[None], torch.diag(c)[None])
    model = g.as_model(sched)
    model.sample_shape = (3,)
    model.identity = "test-gaussian-d3"

    def exact(x, t):
        a, s = float(sched.alpha(t)), float(sched.sigma(t))
        return mu + c.sqrt() * (x.to(torch.float64) - a * mu) / (a * a * c + s * s).sqrt()

    return model, exact


def test_references_are_solved_from_the_start_time_of_the_noises(tmp_path):
    """Noises at t_start < t_max: the references solve the ODE from t_start (the exact solution of
    Gaussian data), in a cache entry of their own (before: integrated from t_max, an 8% RMS wrong
    target, under the key of a solve from t_max), in search() too."""
    from fewstep.schedule_search import reference_set
    from fewstep.schedule_search.objective import reference_cache_path

    model, exact = _gaussian_model()
    ts = 500.0
    x = fewstep.initial_noise(VP, (48, 3), 0, t_start=ts, dtype=torch.float64)
    want = exact(x, ts)
    ref = reference_set(model, x, reference_nfe=64, cache_dir=tmp_path, t_start=ts)
    assert fewstep.rmse(ref.reference, want) < 1e-4 * fewstep.rmse(want, torch.zeros_like(want))
    assert ref.t_start == ts and ref.reference_nfe == 64 and "from t = 500" in ref.method
    assert not reference_set(model, x, reference_nfe=64, cache_dir=tmp_path).cached  # from t_max: another entry
    assert reference_set(model, x, reference_nfe=64, cache_dir=tmp_path, t_start=ts).cached
    # search() hands its t_start to the references of its noises
    kw = dict(SMALL, generations=2, refine_generations=1)
    fewstep.search(model, 4, cache_dir=tmp_path / "s", t_start=ts, **kw)
    cal = fewstep.initial_noise(VP, (48, 3), 0, t_start=ts, indices=range(48))
    path = reference_cache_path(model, cal, reference_nfe=64, t_start=ts, cache_dir=tmp_path / "s")
    assert path.is_file()
    stored = torch.from_numpy(np.load(path))
    assert fewstep.rmse(stored, exact(cal, ts)) < 1e-4 * fewstep.rmse(exact(cal, ts), torch.zeros(48, 3, dtype=torch.float64))


def test_cached_references_come_back_on_the_noises_device_and_dtype(tmp_path, monkeypatch):
    """A cache hit gives the references on the noises' device and in their dtype, like a fresh solve
    (before: on the CPU, so a resumed GPU search failed in its metric). The device is the meta
    device here: the entry written from CPU noises is read for the same noises on ``meta``."""
    from fewstep.schedule_search import objective, reference_set

    model = _oracle_model()
    x = fewstep.initial_noise(VP, (8, 6), 0)
    fresh = reference_set(model, x, reference_nfe=16, cache_dir=tmp_path)
    assert not fresh.cached and fresh.reference.dtype == torch.float32
    hit = reference_set(model, x.double(), reference_nfe=16, cache_dir=tmp_path)  # the same values: the same entry
    assert hit.cached and hit.reference.dtype == torch.float64 and torch.allclose(hit.reference.float(), fresh.reference)
    meta = x.to("meta")
    digest = objective.tensor_digest
    monkeypatch.setattr(objective, "tensor_digest", lambda t: digest(x) if t.device.type == "meta" else digest(t))  # meta has no values
    probe = fewstep.identity.probe_for(model, x)
    on_meta = reference_set(model, meta, reference_nfe=16, cache_dir=tmp_path, probe=probe)
    assert on_meta.cached and on_meta.reference.device == meta.device and on_meta.reference.dtype == torch.float32
    half = reference_set(model, meta.to(torch.bfloat16), reference_nfe=16, cache_dir=tmp_path, probe=probe)
    assert half.cached and half.reference.device.type == "meta" and half.reference.dtype == torch.bfloat16


def test_default_noises_are_drawn_where_the_model_is_and_held_out_ones_like_the_calibration_ones():
    """Default calibration noises lie on the device of the model's weights; default held-out noises
    take the calibration noises' dtype and device, also for a model with a sample_shape (before:
    both float32 on the CPU, beside a model or calibration noises on a GPU). The device: ``meta``."""
    from fewstep.schedule_search import _noises

    model = _oracle_model()
    like = torch.zeros(3, 6, dtype=torch.float64, device="meta")
    held = _noises(model, None, 4, 0, 3, "heldout", None, like=like)
    assert held.shape == (4, 6) and held.dtype == torch.float64 and held.device.type == "meta"
    net = torch.nn.Linear(6, 6, device="meta")
    on_meta = fewstep.Model(lambda x, t: net(x), VP, "eps", sample_shape=(6,), identity="meta-net")
    cal = _noises(on_meta, None, 4, 0, 0, "calibration", None)
    assert cal.shape == (4, 6) and cal.dtype == torch.float32 and cal.device.type == "meta"


def test_a_state_records_the_reference_nfe_and_the_metrics_code(tmp_path):
    """Another reference NFE, or another metric under the same name (every lambda is ``<lambda>``),
    is another search: its state is refused; the same metric resumes."""
    model = _oracle_model()
    state = tmp_path / "state.json"
    kw = dict(SMALL, generations=2, refine_generations=1)
    mean_abs = lambda a, b: float((a - b).abs().mean())  # noqa: E731
    max_abs = lambda a, b: float((a - b).abs().max())  # noqa: E731
    fewstep.search(model, 5, cache_dir=tmp_path, state=state, metric=mean_abs, **kw)
    with pytest.raises(StateError, match="metric_code differs"):
        fewstep.search(model, 5, cache_dir=tmp_path, state=state, metric=max_abs, **kw)
    with pytest.raises(StateError, match="reference_nfe differs"):
        fewstep.search(model, 5, cache_dir=tmp_path, state=state, metric=mean_abs, **{**kw, "reference_nfe": 32})
    _, report = fewstep.search(model, 5, cache_dir=tmp_path, state=state, metric=mean_abs, return_report=True, **kw)
    assert report.resumed_from == 2
    from fewstep.schedule_search.engine import metric_identity

    assert metric_identity(None) == "rmse" and metric_identity(mean_abs) != metric_identity(max_abs)
    assert metric_identity(mean_abs) == metric_identity(lambda a, b: float((a - b).abs().mean()))  # the same code


T_BAD = 399.0  # a time of the uniform_t / trailing grids at NFE 5, on no other seed grid


def _overflowing_model():
    """The oracle, except that its output overflows (inf) at times near T_BAD."""
    base = _oracle_model()
    inner = base.fn

    def fn(x, t):
        out = inner(x, t)
        bad = (t.to(torch.float64) - T_BAD).abs() < 1e-2
        return torch.where(bad.reshape(-1, *([1] * (out.ndim - 1))), out * torch.finfo(out.dtype).max * 2, out)  # overflow

    return fewstep.Model(fn, VP, base.prediction, sample_shape=(6,), identity="test-gmm-d6-overflowing")


def test_a_candidate_whose_model_output_overflows_scores_infinity_and_the_search_goes_on(tmp_path):
    """Plans evaluated together: one whose grid meets the overflow drops out (all NaN, infinite
    error), the others are unchanged; a search whose seed grids include it finishes (before: the
    model's ModelOutputError from the batched call ended the whole search)."""
    model = _overflowing_model()
    x = fewstep.initial_noise(VP, (5, 6), 0, dtype=torch.float64)
    bad, good = fewstep.preset("unipc", 5, VP, spacing="uniform_t"), fewstep.preset("unipc", 5, VP, spacing="logistic")
    assert T_BAD in bad.times and T_BAD not in good.times
    with pytest.raises(fewstep.ModelOutputError):
        fewstep.sample(model, x, bad)  # the model's guard is still on outside the search
    (out_bad, out_good), _ = evaluate_plans(model, [bad, good], x)
    assert torch.isnan(out_bad).all() and torch.equal(out_good, fewstep.sample(model, x, good))
    assert model.guard.enabled  # restored
    kw = {**SMALL, "seed_spacings": ["logistic", "uniform_t"], "generations": 3, "refine_generations": 1}
    plan, report = fewstep.search(model, 5, cache_dir=tmp_path, return_report=True, **kw)
    errors = {p["spacing"]: p["calibration_error"] for p in report.presets}
    assert errors["uniform_t"] == float("inf") and np.isfinite(errors["logistic"]) and np.isfinite(report.best_calibration)


def test_a_model_that_overflows_on_every_seed_plan_is_a_clear_error():
    """Every candidate scoring infinity is the model's fault, not a candidate's: a clear error, not a
    search that returns a schedule of infinite error."""
    from fewstep.schedule_search import Objective, SearchConfig
    from fewstep.schedule_search.engine import run_search
    from fewstep.schedule_search.objective import ReferenceSet

    model = fewstep.Model(lambda x, t: x * float("inf"), VP, "eps", sample_shape=(6,), identity="test-inf")
    x = fewstep.initial_noise(VP, (8, 6), 0)
    objective = Objective(calibration=ReferenceSet(x, torch.zeros_like(x), 0.0, "zeros"))
    config = SearchConfig(nfe=5, population=2, offspring=4, generations=2, refine_generations=1, screen=4, seed_keep=2,
                          seed_presets=(("unipc", ()),), seed_spacings=("logistic",))
    with pytest.raises(fewstep.SolverError, match="every seed plan diverged"):
        run_search(model, objective, config)


@pytest.mark.parametrize("seed", [-1, 1.5, "3", True, None])
def test_search_config_validates_the_seed(seed):
    with pytest.raises(fewstep.ArgumentError, match="seed"):
        fewstep.schedule_search.SearchConfig(nfe=5, seed=seed)


def test_crossover_of_parents_with_different_singlestep_layouts_stays_legal():
    """Uniform crossover of [ss2, ms, ms] and [ms, ss2, ms] (both NFE 4) can pick [ms, ms, ms] (NFE 3):
    such a child is never bred (it once stopped a budgeted search with 'candidate has NFE 3')."""
    space = Space(VP, 4)
    ms, ss2 = Gene(), Gene(method="ss2")
    a, b = Candidate((ss2, ms, ms), (0.0, 0.1, 0.2)), Candidate((ms, ss2, ms), (0.2, 0.1, 0.0))
    assert space.is_legal(a) and space.is_legal(b)
    rng = np.random.default_rng(0)
    for _ in range(200):
        child = space.crossover(a, b, rng)
        assert space.is_legal(child)
        space.schedule(space.mutate(child, rng))

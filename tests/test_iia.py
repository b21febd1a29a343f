"""IIA, improved integration approximation (Zhang, Niwa & Kleijn, ICLR 2024): per-step correction
coefficients fitted by least squares against a fine integration, stored as ``Step.correction``.

1. the record: an all-zero correction compiles to the very same program (bit-identical samples); a
   correction is the affine term ``c (D_i - D_(i-1))`` of the step's result, the corrected state of a
   UniPC step; fitted plans round-trip through schedule files; malformed records are refused;
2. the fit: its cost is what ``meta["iia"]`` says and what the model counted; each step's fit does not
   increase its distance to the target; on an exact Gaussian-mixture oracle IIA-DDIM (the paper's
   step target) and IIA-DPM-Solver++(2M) (trajectory target) beat their base solvers at NFE 5-10 on
   noises other than the calibration ones, and with the step target IIA-DPM-Solver++(2M) is IIA-DDIM;
   a fitted plan runs in search's batched evaluator and in parallel sampling.
"""

from __future__ import annotations

import json

import pytest
import torch

import fewstep
from fewstep import SolverSchedule, Step
from fewstep.errors import ArgumentError, ScheduleFileError, SolverError
from fewstep.schedule_search.evaluate import evaluate_plans
from fewstep.solvers.compile import Combine, compile_plan

SCHED = fewstep.DiscreteVP.linear()
DIM = 4


@pytest.fixture(scope="module")
def model():
    return fewstep.GaussianMixture.random(DIM, 3, 1, seed=0).as_model(SCHED, "eps")


@pytest.fixture(scope="module")
def held_out(model):
    """Noises of another seed than the calibration's (seed 1), and their exact solutions."""
    x_T = fewstep.initial_noise(SCHED, (256, DIM), 2, dtype=torch.float64)
    return x_T, fewstep.reference_solution(model, x_T, rtol=1e-10, atol=1e-10)


def _with_corrections(plan, correction):
    """Every step that can read far enough back gets ``correction``."""
    depth = max(len(c) for c in correction)
    return plan.replace(steps=tuple(st.with_(correction=correction) if i >= depth else st for i, st in enumerate(plan.steps)))


# ---- 1. the record ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "unipc", "dpmpp_2s", "deis"])
def test_zero_corrections_give_the_original_program_and_bit_identical_samples(model, name):
    plan = fewstep.preset(name, 6, SCHED)
    zero = _with_corrections(plan, ((0.0, 0.0), (0.0,)))
    assert zero != plan and all(st.correction is not None for st in zero.steps[2:])
    assert compile_plan(zero, SCHED).ops == compile_plan(plan, SCHED).ops
    x_T = fewstep.initial_noise(SCHED, (16, DIM), 3)
    assert torch.equal(fewstep.sample(model, x_T, zero), fewstep.sample(model, x_T, plan))


def test_a_correction_adds_its_differences_of_predictions_to_the_steps_result(model):
    """DDIM on 3 steps, step 1 corrected by one difference, step 2 by two: written out by hand."""
    plan = fewstep.preset("ddim", 3, SCHED)
    c1, c2 = ((0.3,), (-0.2,)), ((0.1, -0.4), (0.05, 0.7))
    fitted = plan.with_step(1, plan.steps[1].with_(correction=c1)).with_step(2, plan.steps[2].with_(correction=c2))
    x = fewstep.initial_noise(SCHED, (5, DIM), 4, dtype=torch.float64)
    t = plan.times
    al = [float(SCHED.alpha(v)) for v in t]
    sg = [float(SCHED.sigma(v)) for v in t]
    preds = []
    for i in range(3):
        p = model.predict(x, t[i])
        preds.append(p)
        x = al[i + 1] * p.x0 + sg[i + 1] * p.eps  # DDIM
        corr = fitted.steps[i].correction
        if corr is not None:
            for kind, coefs in zip(("x0", "eps"), corr):
                for k, c in enumerate(coefs, 1):
                    x = x + c * (getattr(preds[i - k + 1], kind) - getattr(preds[i - k], kind))
    got = fewstep.sample(model, fewstep.initial_noise(SCHED, (5, DIM), 4, dtype=torch.float64), fitted)
    torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-10)


def test_a_corrector_steps_correction_goes_to_its_corrected_state():
    plan = fewstep.preset("unipc", 6, SCHED)
    corrected = plan.with_step(2, plan.steps[2].with_(correction=((0.5,), (0.25,))))
    base, new = compile_plan(plan, SCHED), compile_plan(corrected, SCHED)
    differ = [(a, b) for a, b in zip(base.ops, new.ops) if a != b]
    assert len(differ) == 1
    a, b = differ[0]
    assert isinstance(b, Combine) and b.grid_index == 3  # the corrected state at times[3], not the predictor's
    s2, s1 = new.starts[2], new.starts[1]
    assert b.terms[len(a.terms):] == ((s2, "x0", 0.5), (s1, "x0", -0.5), (s2, "eps", 0.25), (s1, "eps", -0.25))


def test_a_fitted_plan_round_trips_through_its_file_and_samples_the_same(model, tmp_path):
    plan = fewstep.fit_iia(model, fewstep.preset("dpmpp_2m", 5, SCHED), n_calibration=16, seed=1, substeps=4, differences=2)
    path = plan.save(tmp_path / "iia.json")
    again = SolverSchedule.load(path)
    assert again == plan and again.meta == plan.meta and again.name == "iia-dpmpp_2m"
    assert [st.correction for st in again.steps] == [st.correction for st in plan.steps]
    assert json.loads(path.read_text())["steps"][3]["correction"] == {"x0": list(plan.steps[3].correction[0]),
                                                                     "eps": list(plan.steps[3].correction[1])}
    x_T = fewstep.initial_noise(SCHED, (16, DIM), 7)
    assert torch.equal(fewstep.sample(model, x_T, again), fewstep.sample(model, x_T, plan))
    assert "correction=x0[" in plan.describe()


def _file(correction, step=2):
    d = fewstep.preset("ddim", 4, SCHED).to_dict()
    d["steps"][step]["correction"] = correction
    return d


@pytest.mark.parametrize("correction,step,message", [
    ({"x0": [0.1]}, 2, "exactly the keys"),
    ({"x0": [0.1], "eps": [0.2], "v": [0.0]}, 2, "exactly the keys"),
    ({"x0": 0.1, "eps": 0.2}, 2, "lists of numbers"),
    ([0.1, 0.2], 2, "lists of numbers"),
    ("iia", 2, "lists of numbers"),
    ({"x0": ["a"], "eps": []}, 2, "finite numbers"),
    ({"x0": [True], "eps": []}, 2, "finite numbers"),
    ({"x0": [10**400], "eps": []}, 2, "finite numbers"),
    ({"x0": [0.1, 0.1, 0.1, 0.1], "eps": []}, 3, "at most 3"),
    ({"x0": [0.1], "eps": [0.2]}, 0, "step 0 has an IIA correction"),
    ({"x0": [0.1, 0.2], "eps": []}, 1, "only 1 exist"),
])
def test_malformed_correction_records_are_refused_with_a_clear_error(correction, step, message):
    with pytest.raises(ScheduleFileError, match="correction") as err:
        SolverSchedule.from_dict(_file(correction, step))
    assert message in str(err.value)


def test_non_finite_corrections_are_refused_in_files_and_in_python():
    text = json.dumps(_file({"x0": [0.5], "eps": [0.0]})).replace("0.5", "NaN")
    with pytest.raises(ScheduleFileError, match="NaN"):
        SolverSchedule.from_json(text)
    with pytest.raises(SolverError, match="finite numbers"):
        Step(correction=((float("inf"),), ()))
    assert Step(correction={"x0": 0.5, "eps": [1, 2]}).correction == ((0.5,), (1.0, 2.0))


# ---- 2. the fit -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target,first", [("step", 1), ("trajectory", 0)])
def test_the_fits_cost_is_counted_and_recorded(model, target, first):
    plan = fewstep.preset("unipc", 5, SCHED)
    before = model.evaluations
    fitted = fewstep.fit_iia(model, plan, n_calibration=12, seed=1, substeps=3, target=target)
    spent = model.evaluations - before
    info = fitted.meta["iia"]
    # the plan's own evaluations, then 3 fine unipc steps per fitted interval, per calibration sample
    assert spent == info["model_evaluations"] == 12 * (plan.nfe + 3 * (plan.n_steps - first))
    assert info["fine_evaluations"] == 12 * 3 * (plan.n_steps - first) and info["evaluations_per_sample"] == spent / 12
    assert (info["base"], info["target"], info["n_calibration"], info["seed"]) == ("unipc", target, 12, 1)
    assert fitted.steps[0].correction is None and all(st.correction is not None for st in fitted.steps[1:])
    for fit in info["fits"]:  # least squares over the batch: never further from the target than the step alone
        assert fit["mse_after"] <= fit["mse_before"] * (1 + 1e-9)
    assert {k: v for k, v in fitted.meta.items() if k != "iia"} == plan.meta


# measured (eps model of GaussianMixture.random(4, 3, 1, seed=0) on DiscreteVP.linear, 64 calibration noises
# of seed 1, 256 held-out noises of seed 2, 8 unipc substeps): IIA / base RMSE at NFE 5, 6, 8, 10 was
# ddim (step target) 0.38, 0.32, 0.24, 0.19; dpmpp_2m (trajectory target) 0.28, 0.26, 0.32, 0.36.
# With the paper's step target IIA-DPM-Solver++(2M) spans the same corrections as IIA-DDIM and is not
# better than DPM-Solver++(2M) (0.84, 0.95, 1.07, 0.94): not asserted. Nor is the trajectory target in
# general: on the bundled gmm-d64 oracle its dpmpp_2m ratios were 0.59, 0.94, 1.57, 0.14.
@pytest.mark.parametrize("name,target", [("ddim", "step"), ("dpmpp_2m", "trajectory")])
@pytest.mark.parametrize("nfe", [5, 6, 8, 10])
def test_iia_beats_its_base_solver_on_held_out_noises(model, held_out, name, target, nfe):
    x_T, ref = held_out
    plan = fewstep.preset(name, nfe, SCHED)
    fitted = fewstep.fit_iia(model, plan, n_calibration=64, seed=1, target=target, dtype=torch.float64)
    base_err = fewstep.rmse(fewstep.sample(model, x_T, plan), ref)
    iia_err = fewstep.rmse(fewstep.sample(model, x_T, fitted), ref)
    assert iia_err < 0.5 * base_err, (name, nfe, iia_err / base_err)


def test_iia_dpm_solver_pp_2m_spans_the_same_updates_as_iia_ddim(model, held_out):
    """DPM-Solver++(2M)'s second-order term is a multiple of x0_i - x0_(i-1): with one difference per
    prediction both fits reach the same corrected steps, so the same samples (up to rounding)."""
    x_T, _ = held_out
    fits = [fewstep.fit_iia(model, fewstep.preset(name, 6, SCHED), n_calibration=32, seed=1, substeps=4, dtype=torch.float64)
            for name in ("ddim", "dpmpp_2m")]
    assert fits[0].times == fits[1].times and fits[0].steps != fits[1].steps
    torch.testing.assert_close(fewstep.sample(model, x_T, fits[1]), fewstep.sample(model, x_T, fits[0]), rtol=1e-7, atol=1e-9)


def test_a_fitted_plan_runs_in_the_batched_evaluator_of_search(model):
    fitted = fewstep.fit_iia(model, fewstep.preset("unipc", 6, SCHED), n_calibration=8, seed=1, substeps=3)
    x_T = fewstep.initial_noise(SCHED, (8, DIM), 5, dtype=torch.float64)
    (batched, plain), _ = evaluate_plans(model, [fitted, fewstep.preset("unipc", 6, SCHED)], x_T)
    torch.testing.assert_close(batched, fewstep.sample(model, x_T, fitted), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(batched, plain)
    parallel = fewstep.sample(model, x_T, fitted, parallel=True)
    torch.testing.assert_close(parallel, batched, rtol=1e-4, atol=1e-4)


def test_fit_refuses_what_it_cannot_fit(model):
    with pytest.raises(ArgumentError, match="deterministic"):
        fewstep.fit_iia(model, fewstep.preset("ddpm", 5, SCHED))
    with pytest.raises(ArgumentError, match="target"):
        fewstep.fit_iia(model, fewstep.preset("ddim", 5, SCHED), target="global")
    with pytest.raises(ArgumentError, match="differences"):
        fewstep.fit_iia(model, fewstep.preset("ddim", 5, SCHED), differences=4)
    with pytest.raises(ArgumentError, match="substeps"):
        fewstep.fit_iia(model, fewstep.preset("ddim", 5, SCHED), substeps=1)
    with pytest.raises(ArgumentError, match="SolverSchedule"):
        fewstep.fit_iia(model, "ddim")

"""Solver schedules as JSON: round trips (hypothesis), hand edits, and malformed files."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fewstep
from fewstep import SolverSchedule, Step
from fewstep.errors import ScheduleFileError, SolverError

VARIANTS = ["phi", "bh1", "bh2", "dpm3m", "adams"]


@st.composite
def steps(draw, index):
    method = draw(st.sampled_from(["multistep", "singlestep"]))
    prediction = draw(st.sampled_from(["data", "noise"]))
    variant = draw(st.sampled_from(VARIANTS))
    interp = draw(st.sampled_from(["lambda", "t", "flat"]))
    if method == "multistep":
        order = draw(st.integers(1, min(4, index + 1)))
        history = draw(st.permutations(list(range(1, index + 1)))) if index else []
        corrector = draw(st.sampled_from([0] + list(range(2, order + 2)))) if order >= 1 else 0
        return Step(order=order, prediction=prediction, variant=variant, interp=interp, history=tuple(history[: order - 1]),
                    uniform_nodes=draw(st.booleans()), corrector=corrector)
    order = draw(st.integers(1, 4))
    stages = sorted(draw(st.lists(st.floats(0.01, 1.0), min_size=order - 1, max_size=order - 1, unique=True)))
    final = None
    if order > 1 and draw(st.booleans()):
        final = (0, order - 1)
    return Step(order=order, prediction=prediction, method="singlestep", variant=variant, interp=interp,
                stages=tuple(stages), final_nodes=final, stage_variant=draw(st.sampled_from([None] + VARIANTS)))


@st.composite
def schedules(draw):
    n = draw(st.integers(1, 8))
    times = sorted(draw(st.lists(st.floats(-1.0, 999.0, allow_nan=False), min_size=n + 1, max_size=n + 1, unique=True)), reverse=True)
    plan_steps = [draw(steps(i)) for i in range(n)]
    if plan_steps[-1].corrector:
        plan_steps[-1] = plan_steps[-1].with_(corrector=0)
    meta = draw(st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5), st.floats(allow_nan=False, allow_infinity=False)), max_size=3))
    return SolverSchedule(times=tuple(times), steps=tuple(plan_steps), name=draw(st.text(max_size=10)), schedule=draw(st.one_of(st.none(), st.text(max_size=8))), meta=meta)


@settings(max_examples=150, deadline=None)
@given(schedules())
def test_json_round_trip(plan):
    back = SolverSchedule.from_json(plan.to_json())
    assert back == plan and back.meta == plan.meta and back.nfe == plan.nfe


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=5), max_leaves=20))
def test_loader_rejects_arbitrary_json_with_a_clear_error(obj):
    try:
        SolverSchedule.from_dict(obj)
    except ScheduleFileError:
        pass


def _valid_dict():
    sched = fewstep.DiscreteVP.linear()
    return fewstep.preset("unipc", 6, sched).to_dict()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_loader_rejects_corrupted_fields_with_a_clear_error(data):
    d = _valid_dict()
    target = data.draw(st.sampled_from(["top", "step"]))
    junk = data.draw(st.one_of(st.none(), st.booleans(), st.integers(-5, 2000), st.floats(), st.text(max_size=4), st.lists(st.integers(-2, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
    if target == "top":
        key = data.draw(st.sampled_from(sorted(d) + ["surprise"]))
        d[key] = junk
    else:
        step = d["steps"][data.draw(st.integers(0, len(d["steps"]) - 1))]
        key = data.draw(st.sampled_from(sorted(step) + ["surprise"]))
        step[key] = junk
    try:
        SolverSchedule.from_dict(json.loads(json.dumps(d, allow_nan=True)))
    except ScheduleFileError:
        pass


def test_preset_dump_edit_load(tmp_path):
    sched = fewstep.DiscreteVP.linear()
    plan = fewstep.preset("dpmpp_2m", 8, sched)
    path = plan.save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    data["steps"][3]["order"] = 1  # hand edit: a first-order step in the middle
    data["steps"][3]["history"] = []
    path.write_text(json.dumps(data))
    edited = SolverSchedule.load(path)
    assert edited.steps[3] == Step(order=1, prediction="data", variant="bh2")
    g = fewstep.GaussianMixture.random(4, 2, 1, seed=0)
    x = fewstep.sample(g.as_model(sched), fewstep.initial_noise(sched, (3, 4), 0), edited)
    assert x.shape == (3, 4)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d.pop("times"), "missing field"),
        (lambda d: d.update(extra=1), "unknown field"),
        (lambda d: d.update(format="something"), "not a fewstep solver schedule"),
        (lambda d: d.update(version=99), "unsupported solver schedule version"),
        (lambda d: d.update(times="fast"), "'times' must be a list"),
        (lambda d: d["steps"][0].update(order="2"), "order must be an integer"),
        (lambda d: d["steps"][1].update(wings=2), "unknown step field"),
        (lambda d: d["steps"][0].update(order=3, history=[]), "reads 2 previous steps but only 0 exist"),
        (lambda d: d["times"].reverse(), "strictly decreasing"),
        (lambda d: d["steps"].pop(), "need 6 steps"),
    ],
)
def test_malformed_files_name_the_problem(tmp_path, mutate, match):
    d = _valid_dict()
    mutate(d)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ScheduleFileError, match=match):
        SolverSchedule.load(p)


def test_non_json_and_nan_are_rejected(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"format": "fewstep.solver_schedule", "version": 1, "times": [NaN, 0], "steps": []}')
    with pytest.raises(ScheduleFileError, match="NaN"):
        SolverSchedule.load(p)
    with pytest.raises(ScheduleFileError, match="cannot read"):
        SolverSchedule.load(tmp_path / "missing.json")


def test_schedule_made_for_another_noise_schedule_is_refused():
    plan = fewstep.preset("ddim", 5, fewstep.DiscreteVP.linear())
    g = fewstep.GaussianMixture.random(4, 2, 1, seed=0)
    with pytest.raises(SolverError, match="made for noise schedule"):
        fewstep.sample(g.as_model(fewstep.DiscreteVP.scaled_linear()), fewstep.initial_noise(fewstep.EDM(), (2, 4)), plan)


def test_save_is_atomic(tmp_path, monkeypatch):
    plan = fewstep.preset("ddim", 5, fewstep.EDM())
    path = plan.save(tmp_path / "p.json")
    before = path.read_text()
    monkeypatch.setattr(SolverSchedule, "to_json", lambda self: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        plan.save(path)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["p.json"]

"""Solver schedules as JSON: round trips (hypothesis), hand edits, and malformed files."""

import dataclasses
import json
import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import fewstep
from fewstep import SolverSchedule, Step
from fewstep.errors import ScheduleFileError, SolverError
from fewstep.solvers.plan import FORMAT, FORMAT_VERSION
from fewstep.solvers.strategy import INTERPS, MAX_CORRECTION_DIFFERENCES, MAX_ORDER, METHODS, PREDICTIONS
from fewstep.solvers.registry import noise_rule_names
from fewstep.solvers.strategy import VARIANTS as ALL_VARIANTS

VARIANTS = ["phi", "bh1", "bh2", "dpm3m", "adams"]


@st.composite
def corrections(draw, index):
    """None, or an IIA correction reading at most ``index`` previous steps."""
    if not index or draw(st.booleans()):
        return None
    coefs = st.lists(st.floats(-1e3, 1e3, allow_nan=False), max_size=min(index, MAX_CORRECTION_DIFFERENCES))
    return (tuple(draw(coefs)), tuple(draw(coefs)))


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
                    uniform_nodes=draw(st.booleans()), corrector=corrector, correction=draw(corrections(index)))
    order = draw(st.integers(1, 4))
    stages = sorted(draw(st.lists(st.floats(0.01, 1.0), min_size=order - 1, max_size=order - 1, unique=True)))
    final = None
    if order > 1 and draw(st.booleans()):
        final = (0, order - 1)
    return Step(order=order, prediction=prediction, method="singlestep", variant=variant, interp=interp,
                stages=tuple(stages), final_nodes=final, stage_variant=draw(st.sampled_from([None] + VARIANTS)),
                correction=draw(corrections(index)))


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


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _list_of(ok):
    return lambda v: isinstance(v, list) and all(ok(x) for x in v)


def _one_of(options):
    return lambda v: isinstance(v, str) and v in options


def _or_none(ok):
    return lambda v: v is None or ok(v)


def _finite(v):
    try:
        return _number(v) and math.isfinite(float(v))
    except OverflowError:
        return False


def _correction(v):
    return (isinstance(v, dict) and set(v) == {"x0", "eps"}
            and all(_list_of(_finite)(c) and len(c) <= MAX_CORRECTION_DIFFERENCES for c in v.values()))


# The file format's contract for each field's value taken alone. A file that breaks it anywhere must
# be rejected; one that meets it may still be rejected for how its fields combine (times not
# decreasing, a history the step's order cannot use, ...), or load.
TOP_CONTRACT = {
    "format": lambda v: v == FORMAT,
    "version": lambda v: _integer(v) and v == FORMAT_VERSION,
    "name": lambda v: isinstance(v, str),
    "schedule": _or_none(lambda v: isinstance(v, str)),
    "meta": lambda v: isinstance(v, dict),
    "times": _list_of(_number),
    "steps": lambda v: _list_of(lambda x: isinstance(x, dict))(v) and len(v) >= 1,
}
REQUIRED = ("format", "version", "times", "steps")
STEP_CONTRACT = {
    "order": lambda v: _integer(v) and 1 <= v <= MAX_ORDER,
    "prediction": _one_of(PREDICTIONS),
    "method": _one_of(METHODS),
    "variant": _one_of(ALL_VARIANTS),
    "interp": _one_of(INTERPS),
    "history": _list_of(_integer),
    "uniform_nodes": lambda v: isinstance(v, bool),
    "stages": _list_of(_number),
    "stage_variant": _or_none(_one_of(ALL_VARIANTS)),
    "final_nodes": _or_none(_list_of(_integer)),
    "corrector": lambda v: _integer(v) and v >= 0,
    "corrector_variant": _or_none(_one_of(ALL_VARIANTS)),
    "noise": _one_of(tuple(noise_rule_names())),
    "eta": lambda v: _number(v) and 0.0 <= v,
    "churn": lambda v: _number(v) and 0.0 <= v < math.inf,
    "churn_noise": lambda v: _number(v) and 0.0 <= v < math.inf,
    "correction": _or_none(_correction),
}


def _violations(obj):
    """Where ``obj`` breaks the per-field contract (empty: it may load)."""
    if not isinstance(obj, dict):
        return ["<not an object>"]
    bad = [k for k in REQUIRED if k not in obj]
    bad += [k for k, v in obj.items() if k not in TOP_CONTRACT or not TOP_CONTRACT[k](v)]
    if not bad:
        if len(obj["times"]) != len(obj["steps"]) + 1:
            bad.append("len(times) != len(steps) + 1")
        for i, step in enumerate(obj["steps"]):
            bad += [f"steps[{i}].{k}" for k, v in step.items() if k not in STEP_CONTRACT or not STEP_CONTRACT[k](v)]
    return bad


def _check_loader(obj):
    """The loader's contract for any input: ScheduleFileError, or a SolverSchedule that is the input
    and round-trips (as a dict and as JSON); an input that breaks a field's contract is rejected.
    Any other exception propagates and fails the test. Returns the plan or None."""
    bad = _violations(obj)
    try:
        plan = SolverSchedule.from_dict(obj)
    except ScheduleFileError:
        return None
    assert not bad, f"accepted a file that breaks the contract at {bad}: {obj!r}"
    assert plan.times == tuple(float(t) for t in obj["times"])
    assert (plan.name, plan.schedule, plan.meta) == (obj.get("name", "custom"), obj.get("schedule"), obj.get("meta", {}))
    for step, given_fields in zip(plan.steps, obj["steps"], strict=True):
        loaded = {"churn": step.churn, "churn_noise": step.churn_noise, "correction": None, **step.to_dict()}  # written only when set
        derived = {"history": [], "stages": []}  # empty: the order's default nodes
        assert all(loaded[k] == v for k, v in given_fields.items() if derived.get(k, ...) != v), (loaded, given_fields)
    back = SolverSchedule.from_dict(plan.to_dict())
    assert back == plan and back.meta == plan.meta
    again = SolverSchedule.from_json(plan.to_json())
    assert again == plan and again.meta == plan.meta
    return plan


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=5), max_leaves=20)


@st.composite
def near_schedules(draw):
    """Objects with the right format and version and small, often valid, fields, so that the checks
    behind the first ones and the load-and-round-trip branch are exercised too."""
    n = draw(st.integers(1, 3))
    times = draw(st.lists(st.integers() | st.floats(allow_nan=False), min_size=n + 1, max_size=n + 1, unique=True))
    if draw(st.integers(0, 3)):
        times = sorted(times, reverse=True)
    step_value = JSON_VALUES | st.integers(0, 4) | st.sampled_from(["data", "noise", "singlestep", "bh2", "t"])
    steps = [draw(st.dictionaries(st.sampled_from(sorted(STEP_CONTRACT) + ["wings"]), step_value, max_size=2)) for _ in range(n)]
    obj = {"format": FORMAT, "version": FORMAT_VERSION, "times": times, "steps": steps}
    optional = {"name": st.text(max_size=6), "schedule": st.none() | st.text(max_size=6),
                "meta": st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=3)}
    for key, values in optional.items():
        if draw(st.booleans()):
            obj[key] = draw(values)
    if not draw(st.integers(0, 3)):  # one field (or an unknown one) replaced by anything
        obj[draw(st.sampled_from(sorted(obj) + ["surprise"]))] = draw(JSON_VALUES)
    return obj


def _file(**fields):
    return {"format": FORMAT, "version": FORMAT_VERSION, "times": [1.0, 0.0], "steps": [{}], **fields}


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES | near_schedules())
# what a JSON file can hold beyond the random search's reach: integers too large for a float
# (``1`` followed by 400 zeros is valid JSON and parses to an int), and 1e400, which parses to inf
@example(_file(times=[10**400, 0]))
@example(_file(steps=[{"stages": [10**400]}]))
@example(_file(steps=[{"noise": "sde", "eta": 10**400}]))
@example(_file(meta={"a": float("inf")}))
def test_loader_rejects_arbitrary_json_with_a_clear_error(obj):
    _check_loader(obj)


def test_loader_rejects_oversized_integer_literals_with_a_clear_error():
    """Valid JSON that Python's json refuses to parse: integer literals over 4300 digits raise a
    plain ValueError (not JSONDecodeError) from json.loads."""
    huge = "1" * 5000
    for text in (huge, '{"format": "%s", "version": 1, "times": [%s, 0], "steps": [{}]}' % (FORMAT, huge)):
        with pytest.raises(ScheduleFileError):
            SolverSchedule.from_json(text)


def _valid_dict():
    sched = fewstep.DiscreteVP.linear()
    d = fewstep.preset("unipc", 6, sched).to_dict()
    d["steps"][0].update(churn=0.25, churn_noise=1.01)  # written only when set: make the fuzzer see them
    d["steps"][2]["correction"] = {"x0": [0.1, -0.05], "eps": [0.02]}
    return d


def test_contract_covers_every_field():
    d = _valid_dict()
    assert set(TOP_CONTRACT) == set(d) and set(STEP_CONTRACT) == {f.name for f in dataclasses.fields(Step)}
    assert not _violations(d) and _check_loader(d) is not None


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
    obj = json.loads(json.dumps(d, allow_nan=True))
    if _violations(obj):
        with pytest.raises(ScheduleFileError):
            SolverSchedule.from_dict(obj)
    else:
        _check_loader(obj)


@pytest.mark.parametrize(
    "mutate,loads",
    [
        (lambda d: d.update(meta={}), True),
        (lambda d: d.update(name="ab"), True),
        (lambda d: d.update(schedule=None), True),
        (lambda d: d["steps"][2].update(variant="bh1"), True),
        (lambda d: d.update(version=True), False),
        (lambda d: d.update(version=1.0), False),
        (lambda d: d.update(times=d["times"][:-1]), False),
        (lambda d: d.update(times=[1, 0]), False),
        (lambda d: d["steps"][0].update(uniform_nodes=0), False),
        (lambda d: d["steps"][0].update(order=True), False),
        (lambda d: d["steps"][0].update(surprise=None), False),
    ],
)
def test_loader_contract_examples(mutate, loads):
    d = _valid_dict()
    mutate(d)
    assert bool(_violations(d)) is not loads
    if loads:
        assert _check_loader(d) is not None
    else:
        with pytest.raises(ScheduleFileError):
            SolverSchedule.from_dict(d)


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

"""Exact NFE for every preset x option x spacing x schedule family x NFE 1-50 (issue 13).

Property: a preset either builds a plan whose sampling calls the model exactly ``nfe`` times and
gives finite samples, or refuses with a :class:`fewstep.FewstepError` that says why (an NFE below
the strategy's minimum names the minimum; a spacing that does not apply to the schedule names it).

``make test`` runs 600 derandomized examples (the same every run); ``FEWSTEP_NFE_EXAMPLES=6000
pytest tests/test_nfe_property.py`` searches with fresh random examples (it found the
one-evaluation DPM-Solver-from-pure-noise plan of two steps).
"""

import os
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fewstep
from conftest import ALL_SCHEDULES

_SCHEDULES = {k: f() for k, f in ALL_SCHEDULES.items()}
_ORACLE = fewstep.GaussianMixture.random(2, 2, 1, seed=0)
_MODELS = {k: _ORACLE.as_model(s, "x0") for k, s in _SCHEDULES.items()}
_NOISE = {k: fewstep.initial_noise(s, (2, 2), 0, dtype=torch.float64) for k, s in _SCHEDULES.items()}

SPACINGS = ["uniform_t", "quadratic", "uniform_lambda", "karras", "leading", "trailing", "linspace", "leading_multistep", None]
BOOL = st.booleans()
LOF = st.sampled_from([None, True, False])
WARMUP = st.sampled_from(["lower_order", "singlestep"])
FINAL = st.sampled_from([None, 1, 2, 3])

OPTIONS = {
    "ddim": st.fixed_dictionaries({"prediction": st.sampled_from(["data", "noise"])}),
    "dpm_solver_1": st.just({}),
    "dpm_solver_2": st.just({}),
    "dpm_solver_3": st.just({}),
    "dpmpp_2s": st.just({}),
    "dpmpp_2m": st.fixed_dictionaries({"solver_type": st.sampled_from(["midpoint", "heun"]), "lower_order_final": LOF, "warmup": WARMUP, "final_order": FINAL}),
    "dpmpp_3m": st.fixed_dictionaries({"solver_type": st.sampled_from(["midpoint", "heun"]), "lower_order_final": LOF, "warmup": WARMUP,
                                        "weights": st.sampled_from(["exact", "published"]), "final_order": FINAL}),
    "unipc": st.fixed_dictionaries({"order": st.integers(1, 4), "variant": st.sampled_from(["bh1", "bh2"]), "corrector": BOOL,
                                     "prediction": st.sampled_from(["data", "noise"]), "lower_order_final": LOF, "warmup": WARMUP, "final_order": FINAL}),
    "deis": st.fixed_dictionaries({"order": st.integers(1, 4), "interp": st.sampled_from(["t", "lambda"]), "lower_order_final": LOF, "warmup": WARMUP, "final_order": FINAL}),
    "lms": st.fixed_dictionaries({"order": st.integers(1, 4), "lower_order_final": BOOL, "warmup": WARMUP, "final_order": FINAL}),
    "ipndm": st.fixed_dictionaries({"order": st.integers(1, 4), "warmup": WARMUP}),
    "euler": st.fixed_dictionaries({}, optional={"s_churn": st.floats(0.0, 100.0), "s_tmin": st.floats(0.0, 1.0), "s_noise": st.floats(0.9, 1.1)}),
    "heun": st.fixed_dictionaries({}, optional={"s_churn": st.floats(0.0, 100.0), "s_tmax": st.floats(1.0, 100.0), "s_noise": st.floats(0.9, 1.1)}),
    "edm_sde": st.fixed_dictionaries({}, optional={"s_churn": st.floats(0.0, 100.0)}),
    "pndm": st.just({}),
    "plms": st.just({}),
    "lcm": st.fixed_dictionaries({"renoise": st.floats(0.0, 1.0)}),
    "ddpm": st.fixed_dictionaries({"eta": st.floats(0.0, 2.0)}),
    "euler_ancestral": st.fixed_dictionaries({"eta": st.floats(0.0, 2.0)}),
    "dpmpp_2m_sde": st.fixed_dictionaries({"eta": st.floats(0.0, 2.0), "solver_type": st.sampled_from(["midpoint", "heun"]),
                                           "lower_order_final": st.sampled_from([None, True, False])}),
    "dpmpp_3m_sde": st.fixed_dictionaries({"eta": st.floats(0.0, 2.0), "weights": st.sampled_from(["exact", "published"]),
                                           "lower_order_final": st.sampled_from([None, True, False])}),
    "sa_solver": st.fixed_dictionaries({"order": st.integers(1, 3), "corrector_order": st.integers(1, 3), "tau": st.floats(0.0, 2.0),
                                         "corrector": BOOL, "lower_order_final": BOOL}),
    "er_sde": st.fixed_dictionaries({"order": st.integers(1, 3), "eta": st.floats(0.0, 2.0), "lower_order_final": LOF}),
    "dpmpp_sde": st.fixed_dictionaries({"eta": st.floats(0.0, 2.0), "r": st.floats(0.1, 0.9)}),
    # without statistics= it runs the degenerate form (and warns): the NFE rules are the same
    "dpm_solver_v3": st.fixed_dictionaries({"order": st.integers(1, 3), "predictor_pseudo": BOOL, "corrector": BOOL, "corrector_pseudo": BOOL,
                                            "lower_order_final": BOOL}),
}


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_every_preset_has_an_option_strategy(data):
    assert sorted(OPTIONS) == fewstep.preset_names()
    name = data.draw(st.sampled_from(sorted(OPTIONS)))
    assert set(data.draw(OPTIONS[name])) <= set(fewstep.preset_options(name)), name  # only options the preset has


@st.composite
def requests(draw):
    name = draw(st.sampled_from(sorted(OPTIONS)))
    opts = {k: v for k, v in draw(OPTIONS[name]).items() if v is not None}
    spacing = draw(st.sampled_from(SPACINGS))
    if spacing is not None:
        opts["spacing"] = spacing
    family = draw(st.sampled_from(sorted(_SCHEDULES)))
    return name, opts, family, draw(st.integers(1, 50))


@settings(max_examples=int(os.environ.get("FEWSTEP_NFE_EXAMPLES", "600")), deadline=None, derandomize=not os.environ.get("FEWSTEP_NFE_EXAMPLES"), suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_nfe_is_exact_or_refused_with_the_reason(request):
    name, opts, family, nfe = request
    sched, model, x = _SCHEDULES[family], _MODELS[family], _NOISE[family]
    try:
        plan = fewstep.preset(name, nfe, sched, **opts)
    except fewstep.FewstepError as exc:
        msg = str(exc)
        discrete_only = opts.get("spacing") in ("leading", "trailing", "linspace", "leading_multistep") and not isinstance(sched, fewstep.DiscreteVP)
        m = re.search(r"nfe >= (\d+)", msg)
        if m is not None:
            assert int(m.group(1)) > nfe, msg
            return
        assert discrete_only and "DiscreteVP" in msg, f"{name} {opts} {family} nfe={nfe}: refused without a reason: {msg}"
        return
    assert plan.nfe == nfe, (name, opts, family, nfe, plan.describe())
    model.reset_counters()
    out = fewstep.sample(model, x, plan, seed=0)
    assert model.calls == nfe and model.evaluations == nfe * x.shape[0], (name, opts, family, nfe)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "unipc", "deis"])
def test_singlestep_warmup_on_flow_from_pure_noise_keeps_the_budget(name):
    """The reported bug: warmup='singlestep' on FlowMatching built 6-evaluation plans at nfe=10."""
    plan = fewstep.preset(name, 10, fewstep.FlowMatching(), warmup="singlestep")
    assert plan.nfe == 10

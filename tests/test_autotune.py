"""Autotune on first use: bounded cost, deterministic, cached by what the model computes, and it does
pick a better grid where the default is clearly off."""

import json
import math
import warnings

import pytest
import torch

import fewstep
from fewstep.autotune import AutotuneOptions, candidates, clear_autotune_cache
from fewstep.oracle import GaussianMixture


@pytest.fixture(autouse=True)
def _fresh_memory():
    clear_autotune_cache()
    yield
    clear_autotune_cache()


def far_data_model(scale: float = 6.0) -> fewstep.Model:
    """Data far larger than unit scale: its structure forms at much higher noise than the default grid
    expects, so a grid centred at higher noise is clearly better."""
    oracle = GaussianMixture.random(16, 4, 2, seed=3, scale=scale, name="far")
    return oracle.as_model(fewstep.DiscreteVP.linear(), name="far")


def opts(tmp_path, **kw):
    return AutotuneOptions(cache_dir=tmp_path, **kw)


def test_cost_within_budget_and_reported(tmp_path):
    model = far_data_model()
    x = fewstep.initial_noise(model.schedule, (4, 16), 0, dtype=torch.float64)
    for nfe in (5, 10):
        e0 = model.evaluations
        _, info = fewstep.sample(model, x, nfe=nfe, autotune=opts(tmp_path, budget=1500), return_info=True)
        tune = info.extra["autotune"]
        spent = model.evaluations - e0 - x.shape[0] * nfe  # minus the call's own sampling
        assert spent == tune["evaluations"] <= 1500
        assert tune["samples"] >= 4 and not tune["cached"]


def test_deterministic_for_a_seed_and_seed_matters(tmp_path):
    model = far_data_model()
    x = fewstep.initial_noise(model.schedule, (2, 16), 0, dtype=torch.float64)
    a = fewstep.sample(model, x, nfe=6, autotune=opts(tmp_path / "a", budget=1200), return_info=True)[1].extra["autotune"]
    clear_autotune_cache()
    b = fewstep.sample(model, x, nfe=6, autotune=opts(tmp_path / "b", budget=1200), return_info=True)[1].extra["autotune"]
    assert a["choice"] == b["choice"] and a["options"] == b["options"] and a["evaluations"] == b["evaluations"]
    files = [json.loads(p.read_text()) for p in (tmp_path / "a").glob("autotune-*.json")] + [json.loads(p.read_text()) for p in (tmp_path / "b").glob("autotune-*.json")]
    assert len(files) == 2 and files[0]["errors"] == files[1]["errors"]
    clear_autotune_cache()
    c = fewstep.sample(model, x, nfe=6, autotune=opts(tmp_path / "c", budget=1200, seed=5), return_info=True)[1].extra["autotune"]
    assert json.loads(next((tmp_path / "c").glob("autotune-*.json")).read_text())["errors"] != files[0]["errors"]
    assert c["evaluations"] == a["evaluations"]


def test_picks_a_better_grid_on_heldout_noises(tmp_path):
    model = far_data_model()
    held = fewstep.initial_noise(model.schedule, (64, 16), 11, dtype=torch.float64)
    ref = fewstep.reference_solution(model, held, rtol=1e-9, atol=1e-9)
    x_tuned, info = fewstep.sample(model, held, nfe=6, autotune=opts(tmp_path), return_info=True)
    x_default = fewstep.sample(model, held, nfe=6)
    assert info.extra["autotune"]["choice"] != "default"
    assert float(fewstep.rmse(x_tuned, ref)) < 0.8 * float(fewstep.rmse(x_default, ref))


def test_reused_from_memory_then_from_disk_with_a_probe(tmp_path):
    model = far_data_model()
    x = fewstep.initial_noise(model.schedule, (3, 16), 0, dtype=torch.float64)
    first = fewstep.sample(model, x, nfe=5, autotune=opts(tmp_path), return_info=True)[1].extra["autotune"]
    again = fewstep.sample(model, x, nfe=5, autotune=opts(tmp_path), return_info=True)[1].extra["autotune"]
    assert again["cached"] and again["evaluations"] == 0 and again["options"] == first["options"]
    assert again["tuning_evaluations"] == first["evaluations"]
    clear_autotune_cache()  # a new process: the choice comes from the file, checked by the identity probe
    disk = fewstep.sample(model, x, nfe=5, autotune=opts(tmp_path), return_info=True)[1].extra["autotune"]
    assert disk["cached"] and 0 < disk["evaluations"] <= 8 and disk["options"] == first["options"]
    other = fewstep.sample(model, x, nfe=6, autotune=opts(tmp_path), return_info=True)[1].extra["autotune"]
    assert not other["cached"]  # another NFE is another choice


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8, dtype=torch.float64)

    def forward(self, x, t):
        return 0.1 * self.lin(x) * torch.sigmoid(t[:, None] / 500.0)


def test_weights_changed_in_place_tune_again(tmp_path):
    torch.manual_seed(0)
    net = Tiny()
    model = fewstep.Model(net, fewstep.DiscreteVP.linear(), "eps")
    x = fewstep.initial_noise(model.schedule, (2, 8), 0, dtype=torch.float64)
    o = opts(tmp_path, budget=800)
    assert not fewstep.sample(model, x, nfe=4, autotune=o, return_info=True)[1].extra["autotune"]["cached"]
    assert fewstep.sample(model, x, nfe=4, autotune=o, return_info=True)[1].extra["autotune"]["cached"]
    with torch.no_grad():
        net.lin.weight.mul_(3.0)
    assert not fewstep.sample(model, x, nfe=4, autotune=o, return_info=True)[1].extra["autotune"]["cached"]


def test_cache_of_another_model_under_the_same_key_is_detected_by_its_probe(tmp_path):
    a = fewstep.Model(lambda x, t: 0.3 * x, fewstep.DiscreteVP.linear(), "eps", identity="same")
    b = fewstep.Model(lambda x, t: -0.3 * x, fewstep.DiscreteVP.linear(), "eps", identity="same")
    x = fewstep.initial_noise(a.schedule, (2, 8), 0, dtype=torch.float64)
    o = opts(tmp_path, budget=800)
    fewstep.sample(a, x, nfe=4, autotune=o)
    clear_autotune_cache()
    with pytest.warns(fewstep.identity.IdentityWarning, match="probe"):
        tune = fewstep.sample(b, x, nfe=4, autotune=o, return_info=True)[1].extra["autotune"]
    assert not tune["cached"]


def test_model_level_setting_and_searched_schedules_first(tmp_path):
    model = far_data_model()
    model.autotune = opts(tmp_path, budget=1000)
    x = fewstep.initial_noise(model.schedule, (2, 16), 0, dtype=torch.float64)
    assert "autotune" in fewstep.sample(model, x, nfe=5, return_info=True)[1].extra
    assert "autotune" not in fewstep.sample(model, x, nfe=5, autotune=False, return_info=True)[1].extra
    model.tuned_schedules[5] = fewstep.preset("ddim", 5, model.schedule)
    _, info = fewstep.sample(model, x, nfe=5, return_info=True)
    assert "autotune" not in info.extra and info.plan.name == "ddim"


def test_named_preset_tunes_only_its_grid(tmp_path):
    model = far_data_model()
    x = fewstep.initial_noise(model.schedule, (2, 16), 0, dtype=torch.float64)
    _, info = fewstep.sample(model, x, "dpmpp_2m", nfe=6, autotune=opts(tmp_path, budget=1500), return_info=True)
    assert info.extra["autotune"]["preset"] == "dpmpp_2m" and info.plan.meta["preset"] == "dpmpp_2m"
    labels = [c[0] for c in candidates(model.schedule, 6, 16, "dpmpp_2m")]
    assert all(c[1] == "dpmpp_2m" for c in candidates(model.schedule, 6, 16, "dpmpp_2m")) and "default" in labels


def test_bad_requests_are_clear_errors(tmp_path):
    model = far_data_model()
    x = fewstep.initial_noise(model.schedule, (2, 16), 0, dtype=torch.float64)
    with pytest.raises(fewstep.ArgumentError, match="chooses the grid"):
        fewstep.sample(model, x, nfe=6, spacing="karras", autotune=opts(tmp_path))
    with pytest.raises(fewstep.ArgumentError, match="draws noise"):
        fewstep.sample(model, x, "dpmpp_2m_sde", nfe=6, seed=0, autotune=opts(tmp_path))
    with pytest.raises(fewstep.ArgumentError, match="raise the budget"):
        fewstep.sample(model, x, nfe=100, autotune=opts(tmp_path))
    with pytest.raises(fewstep.ArgumentError, match="budget"):
        AutotuneOptions(budget=0)
    with pytest.raises(fewstep.ArgumentError, match="autotune must be"):
        fewstep.sample(model, x, nfe=6, autotune="yes")
    assert model.evaluations == 0  # refused before any model call


def test_unwritable_cache_keeps_the_choice_in_memory(tmp_path):
    model = far_data_model()
    x = fewstep.initial_noise(model.schedule, (2, 16), 0, dtype=torch.float64)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fewstep.sample(model, x, nfe=5, autotune=opts(blocker / "sub", budget=1000))
    assert any("could not write" in str(w.message) for w in caught)
    assert fewstep.sample(model, x, nfe=5, autotune=opts(blocker / "sub", budget=1000), return_info=True)[1].extra["autotune"]["cached"]


def test_confidence_is_the_bootstrap_share_of_resamples_the_candidate_wins():
    from fewstep.autotune import confidence_better

    d = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert confidence_better(0.5 * d, d, 0) == 1.0 and confidence_better(2.0 * d, d, 0) == 0.0
    assert confidence_better(d, d, 0) == 1.0 and confidence_better(None, d, 0) == 0.0
    mixed = torch.tensor([0.1, 1.8, 0.1, 1.8, 0.1, 1.8, 0.1, 1.7])  # lower in total, by chance of two samples
    c = confidence_better(mixed, d, 0)
    assert 0.2 < c < 0.9 and c == confidence_better(mixed, d, 0) and c != confidence_better(mixed, d, 1)


@pytest.mark.parametrize("consistent", [True, False])
def test_a_candidate_replaces_the_default_only_when_better_with_confidence(tmp_path, consistent):
    """A runner that makes one candidate the most accurate in total: on every sample (it is chosen), or
    by a lucky few samples while worse on most (the default stays, the winner is recorded)."""
    from fewstep.autotune import autotune

    model = far_data_model()
    n_seen = []

    def run(m, noises, name, nfe, autotune=False, **o):
        n = noises.shape[0]
        n_seen.append(n)
        if nfe > 20:  # the reference
            return torch.zeros_like(noises)
        base = torch.ones(n, 1, dtype=noises.dtype).expand_as(noises).clone()
        if o.get("logistic_center") == cands[1][2]["logistic_center"] and name == cands[1][1]:
            if consistent:
                return 0.9 * base
            lucky = torch.ones(n, 1, dtype=noises.dtype)
            lucky[: n // 2] = 1.08
            lucky[0] = 0.05  # one sample far better: the total wins, half the samples lose
            return lucky.expand_as(noises).clone()
        return 2.0 * base if name != cands[0][1] or o != cands[0][2] else base

    cands = candidates(model.schedule, 6, 16, None, model.prediction)
    res = autotune(model, 6, (16,), run, config=opts(tmp_path, budget=2000))
    assert res.extra["most_accurate"] == cands[1][0]
    if consistent:
        assert res.label == cands[1][0] and res.extra["confidence"] == 1.0
    else:
        assert res.label == "default" and res.extra["confidence"] < 0.9


def test_sample_tunes_the_gits_grid_of_its_reference_solve_too_within_the_budget(tmp_path):
    """Through fewstep.sample the reference solve records its trajectory, and the default preset on the
    GITS grid of that trajectory is one more candidate, paid for inside the budget; the reference is
    the same fine solve as without it."""
    from fewstep.autotune import autotune
    from fewstep.sample import _teacher_reference, sample
    from fewstep.teacher import gits_times

    model = far_data_model()
    model.reset_counters()
    res = autotune(model, 6, (16,), sample, config=opts(tmp_path, budget=2000), teacher=_teacher_reference)
    assert "gits" in res.errors and math.isfinite(res.errors["gits"])
    assert model.evaluations <= 2000 and res.evaluations == model.evaluations
    noises = fewstep.initial_noise(model.schedule, (res.samples, 16), AutotuneOptions().seed)
    cands = candidates(model.schedule, 6, 16, None, model.prediction)
    ref_opts = {k: cands[0][2][k] for k in ("spacing", "logistic_center", "logistic_scale")} | {"lower_order_final": False}
    reference, costs = _teacher_reference(model, noises, "unipc", res.reference_nfe, ref_opts)
    assert torch.equal(reference, sample(model, noises, "unipc", nfe=res.reference_nfe, **ref_opts))
    plan = fewstep.preset(cands[0][1], 6, model.schedule, spacing=list(gits_times(costs, 6)),
                          **{k: v for k, v in cands[0][2].items() if k not in ("spacing", "logistic_center", "logistic_scale")})
    err = float((sample(model, noises, plan).double() - reference.double()).pow(2).mean(1).sqrt().mean())
    assert res.errors["gits"] == pytest.approx(err, rel=1e-9)
    # a caller's t_start: no GITS candidate (its grid starts where the teacher does)
    res2 = autotune(model, 6, (16,), sample, options={"t_start": 900.0}, config=opts(tmp_path / "b", budget=2000), teacher=_teacher_reference)
    assert "gits" not in res2.errors


@pytest.mark.parametrize("nfe", [5, 15])
@pytest.mark.parametrize("family", ["discrete-eps", "flow", "edm"])
def test_candidates_include_the_peers_grid_families_once_each(nfe, family):
    """Besides the logistic neighbours: the default preset on uniform log-SNR (diffusers' exponential
    sigmas) and on the DMN grid, and the time-quadratic grid with UniPC-2; no run twice; on every
    schedule family."""
    from fewstep.autotune import FAMILY_GRIDS

    sched, prediction = {"discrete-eps": (fewstep.DiscreteVP.linear(), "eps"), "flow": (fewstep.FlowMatching(shift=3.0), "flow"),
                         "edm": (fewstep.EDM(), "x0")}[family]
    cands = candidates(sched, nfe, 64, None, prediction)
    runs = [(name, json.dumps(o, sort_keys=True)) for _, name, o in cands]
    assert len(set(runs)) == len(runs) and len({c[0] for c in cands}) == len(cands)
    default_name, default_opts = cands[0][1], cands[0][2]
    for spacing, o in FAMILY_GRIDS:
        own = {k: v for k, v in default_opts.items() if k not in ("spacing", "logistic_center", "logistic_scale")}
        want = ({**own, "spacing": spacing} if o is None else {**o, "spacing": spacing})
        assert any(c[2] == want and c[1] == ("unipc" if o is not None else default_name) for c in cands), (spacing, o)
    for _, name, o in cands:  # each is a plan the library builds at this NFE
        assert fewstep.preset(name, nfe, sched, **o).nfe <= nfe

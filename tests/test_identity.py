"""Behaviour-keyed model identity (issue 25, item 1): caches and resumes are keyed by what a model
computes (its weights, code and a probe of its outputs), never by its name alone."""

from __future__ import annotations

import functools
import json
import types
import warnings

import pytest
import torch

import fewstep
from fewstep.generate import MANIFEST
from fewstep.identity import IdentityWarning, Probe, find_modules, model_key, probe_for, weights_digest
from fewstep.schedule_search import StateError, reference_set

VP = fewstep.DiscreteVP.linear()
NOISES = fewstep.initial_noise(VP, (4, 3), 0, dtype=torch.float64)
TINY = dict(budget=None, n_calibration=8, n_heldout=8, generations=2, refine_generations=1, population=2, offspring=4, reference_nfe=16,
            seed_presets=[("unipc", {})], seed_spacings=["logistic"], screen=4, seed_keep=2)


def _fine(model, x, nfe=16):
    return fewstep.sample(model, x, "unipc", nfe=nfe, lower_order_final=False)


def _linear(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 3, dtype=torch.float64)


# ---- references -------------------------------------------------------------------------------------
def test_two_models_of_one_name_never_share_references(tmp_path):
    a = fewstep.Model(lambda x, t: 0.1 * x, VP, "eps", name="net")
    b = fewstep.Model(lambda x, t: 0.4 * x - 0.1, VP, "eps", name="net")
    ra = reference_set(a, NOISES, reference_nfe=16, cache_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IdentityWarning)  # told apart by their keys, not only by the probe
        rb = reference_set(b, NOISES, reference_nfe=16, cache_dir=tmp_path)
        assert not rb.cached
        assert torch.allclose(rb.reference, _fine(b, NOISES), rtol=0, atol=1e-12)
        assert not torch.allclose(rb.reference, ra.reference, atol=1e-3)
        assert reference_set(a, NOISES, reference_nfe=16, cache_dir=tmp_path).cached  # each keeps its own entry
    assert a.name == b.name and model_key(a) != model_key(b)

    def make(scale):  # one code, other closure values
        return fewstep.Model(lambda x, t: scale * x, VP, "eps", name="net")

    assert model_key(make(0.1)) != model_key(make(0.2)) and model_key(make(0.1)) == model_key(make(0.1))


def test_weights_changed_in_place_give_a_new_key_and_fresh_references(tmp_path):
    net = _linear()
    model = fewstep.Model(lambda x, t: 0.1 * net(x), VP, "eps", name="lin")
    key0, state0 = model_key(model), {k: v.clone() for k, v in net.state_dict().items()}
    r0 = reference_set(model, NOISES, reference_nfe=16, cache_dir=tmp_path)
    with torch.no_grad():
        net.weight.add_(0.5)
    r1 = reference_set(model, NOISES, reference_nfe=16, cache_dir=tmp_path)
    assert not r1.cached and torch.allclose(r1.reference, _fine(model, NOISES), atol=1e-12)
    assert not torch.allclose(r1.reference, r0.reference, atol=1e-4)
    assert model_key(model) != key0
    net.load_state_dict(_linear(seed=1).state_dict())  # another checkpoint into the same module
    assert model_key(model) not in (key0,)
    net.load_state_dict(state0)  # back to the first weights: the first entry again
    assert model_key(model) == key0 and reference_set(model, NOISES, reference_nfe=16, cache_dir=tmp_path).cached


def test_an_entry_of_another_model_under_the_same_key_is_caught_by_its_probe(tmp_path):
    a = fewstep.Model(lambda x, t: 0.1 * x, VP, "eps", name="m", identity="my-checkpoint")
    b = fewstep.Model(lambda x, t: 0.3 * x, VP, "eps", name="m", identity="my-checkpoint")  # the same identity= reused
    assert model_key(a) == model_key(b)
    reference_set(a, NOISES, reference_nfe=16, cache_dir=tmp_path)
    logged = []
    with pytest.warns(IdentityWarning, match=r"reference-\w+\.npy was written by a model that computes something else"):
        rb = reference_set(b, NOISES, reference_nfe=16, cache_dir=tmp_path, log=logged.append)
    assert not rb.cached and any("computes something else" in m for m in logged)
    assert torch.allclose(rb.reference, _fine(b, NOISES), atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # overwritten: b reads its own entry quietly
        assert reference_set(b, NOISES, reference_nfe=16, cache_dir=tmp_path).cached
    side = json.loads(next(tmp_path.glob("reference-*.json")).read_text())
    assert Probe.from_json(side["probe"]).matches(probe_for(b, NOISES))


# ---- resumes ------------------------------------------------------------------------------------------
def test_a_search_state_of_another_model_is_refused(tmp_path):
    a = fewstep.Model(lambda x, t: 0.1 * x, VP, "eps", name="m", identity="ckpt", sample_shape=(3,))
    b = fewstep.Model(lambda x, t: 0.3 * x, VP, "eps", name="m", identity="ckpt", sample_shape=(3,))
    state = tmp_path / "state.json"
    fewstep.search(a, 4, cache_dir=tmp_path / "a", state=state, **TINY)
    assert "probe" in json.loads(state.read_text())
    _, report = fewstep.search(a, 4, cache_dir=tmp_path / "a", state=state, return_report=True, **TINY)  # the same model resumes
    assert report.resumed_from == TINY["generations"]
    with pytest.raises(StateError, match=r"state\.json' was written by a different model"):
        fewstep.search(b, 4, cache_dir=tmp_path / "b", state=state, **TINY)
    c = fewstep.Model(lambda x, t: 0.1 * x, VP, "eps", name="m", sample_shape=(3,))  # no identity: another key
    with pytest.raises(StateError, match="model differs"):
        fewstep.search(c, 4, cache_dir=tmp_path / "c", state=state, **TINY)


def test_a_generation_folder_of_another_model_is_refused(tmp_path):
    kw = dict(num=4, solver="ddim", nfe=4, batch_size=2, progress=False)
    a = fewstep.Model(lambda x, t: 0.1 * x, VP, "eps", name="m", identity="ckpt", sample_shape=(2,))
    b = fewstep.Model(lambda x, t: 0.3 * x, VP, "eps", name="m", identity="ckpt", sample_shape=(2,))
    c = fewstep.Model(lambda x, t: 0.2 * x, VP, "eps", name="m", sample_shape=(2,))
    out = tmp_path / "g"
    info = fewstep.generate(a, out=out, **kw)
    assert info.extra["probe_evaluations"] == 6
    assert fewstep.generate(a, out=out, **kw).reused == 2
    with pytest.raises(fewstep.ArgumentError, match="holds another run.*model.*probe"):
        fewstep.generate(b, out=out, **kw)
    with pytest.raises(fewstep.ArgumentError, match=r"holds another run \(differs in model\)"):
        fewstep.generate(c, out=out, **kw)
    # a manifest written before probes: trusted only through an explicit identity= it recorded
    man = json.loads((out / MANIFEST).read_text())
    del man["probe"]
    man["model"] = "ckpt"
    (out / MANIFEST).write_text(json.dumps(man))
    assert fewstep.generate(a, out=out, **kw).reused == 2
    man["model"] = "m"
    (out / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(fewstep.ArgumentError, match="differs in model"):
        fewstep.generate(fewstep.Model(lambda x, t: 0.1 * x, VP, "eps", name="m", sample_shape=(2,)), out=out, **kw)


# ---- the probe and the key ---------------------------------------------------------------------------
def test_probe_is_small_counted_json_and_tells_models_apart():
    a = fewstep.Model(lambda x, t: 0.1 * x, VP, "eps")
    p = Probe.take(a, (3,), dtype=torch.float64)
    assert p.evaluations == 6 and a.evaluations == 6 and a.calls == 3
    assert Probe.from_json(json.loads(json.dumps(p.to_json()))) == p
    assert p.matches(Probe.take(a, (3,), dtype=torch.float32))  # float32 rounding is within the tolerance
    assert not p.matches(Probe.take(fewstep.Model(lambda x, t: 0.15 * x, VP, "eps"), (3,), dtype=torch.float64))
    assert not p.matches(Probe.take(a, (4,), dtype=torch.float64))  # not comparable: another input
    big = Probe.take(fewstep.Model(lambda x, t: torch.tanh(x), fewstep.FlowMatching(), "flow"), (4, 8, 8))
    assert all(len(v) == 64 for v in big.values) and len(big.times) == 3  # projected, on the schedule's times
    lo, hi = VP.t_min, VP.t_max
    assert all(lo <= t <= hi for t in p.times) and p.times[0] > p.times[1] > p.times[2]


def test_model_key_follows_identity_threshold_and_never_the_name_alone():
    f = lambda x, t: 0.1 * x  # noqa: E731
    plain = fewstep.Model(f, VP, "eps", name="same")
    assert "weights:none" in model_key(plain) and "same" in model_key(plain)
    assert model_key(fewstep.Model(f, VP, "eps", name="other")) != model_key(plain)  # the name is shown (readability)
    assert model_key(fewstep.Model(f, VP, "v", name="same")) != model_key(plain)
    assert model_key(fewstep.Model(f, fewstep.FlowMatching(), "eps", name="same")) != model_key(plain)
    assert model_key(fewstep.Model(f, VP, "eps", name="same", threshold=fewstep.Threshold())) != model_key(plain)
    ident = fewstep.Model(f, VP, "eps", name="same", identity="ckpt-1")
    assert model_key(ident).startswith("ckpt-1|eps|")
    zoo = fewstep.zoo.load("digits-vp-eps")
    assert model_key(zoo).startswith(zoo.identity + "|eps|")


def test_weights_digest_covers_dtypes_and_refuses_the_meta_device():
    net = _linear()
    d = weights_digest(net)
    assert len(d) == 64 and d == weights_digest(_linear()) and d != weights_digest(_linear(seed=1))
    with torch.no_grad():
        net.bias[0] += 1e-12
    assert weights_digest(net) != d
    assert len({d, weights_digest(net.to(torch.float16)), weights_digest(_linear().to(torch.bfloat16))}) == 3
    with torch.device("meta"):
        ghost = torch.nn.Linear(3, 3)
    with pytest.raises(fewstep.ArgumentError, match="meta device"):
        weights_digest(ghost)


class _Wrapper:
    def __init__(self, net):
        self.net = net

    def __call__(self, x, t):
        return self.net(x)


_GLOBAL_NET = _linear(seed=3)


def _uses_global(x, t):
    return _GLOBAL_NET(x)


def test_find_modules_looks_through_methods_closures_partials_globals_and_objects():
    a, b, c = _linear(1), _linear(2), torch.nn.Sequential(_linear(4))

    def closure(x, t):
        return a(x) + b(x)

    def with_default(x, t, net=b):
        return net(x)

    def with_kwargs(x, t, *, net):
        return net(x)

    class Holder:
        def __init__(self):
            self.net = c

        def as_fn(self):
            def fn(x, t):
                return self.net(x)  # a captured self
            return fn

    @functools.wraps(closure)
    def decorated(x, t):
        return closure(x, t)

    assert find_modules(a) == [a]
    assert find_modules(a.forward) == [a]
    assert find_modules(closure) == [a, b]
    assert find_modules(functools.partial(with_kwargs, net=b)) == [b]
    assert find_modules(with_default) == [b]
    assert find_modules(_uses_global) == [_GLOBAL_NET]
    assert find_modules(_Wrapper(a)) == [a]
    assert find_modules(Holder().as_fn()) == [c]  # c[0] is inside c: left out
    assert find_modules(decorated) == [a, b]
    assert find_modules(types.MethodType(lambda self, x, t: self(x), b)) == [b]
    nets = [a, b]
    assert find_modules(lambda x, t: nets[0](x) + nets[1](x)) == [a, b]  # in a captured list
    assert find_modules(lambda x, t: 0.1 * x) == []


# ---- the search without sample_shape; diffusers ------------------------------------------------------
def test_search_with_calibration_noises_on_a_model_without_sample_shape(tmp_path):
    model = fewstep.GaussianMixture.random(3, 2, 1, seed=1).as_model(VP)
    model.sample_shape = None
    x = fewstep.initial_noise(VP, (8, 3), 0)
    plan = fewstep.search(model, 4, calibration=x, cache_dir=tmp_path, **{k: v for k, v in TINY.items() if k != "n_calibration"})
    assert plan.nfe == 4 and plan.meta["search"]["heldout"]["noises"] == 8
    held = fewstep.initial_noise(VP, (8, 3), 0, indices=range(8, 16))  # drawn like x, after its sample indices
    assert reference_set(model, held, reference_nfe=16, cache_dir=tmp_path).cached


def test_pipeline_model_identity_covers_prompt_guidance_and_weights():
    diffusers = pytest.importorskip("diffusers")
    from fewstep.integrations.diffusers import pipeline_model

    torch.manual_seed(0)
    net = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                          num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                          pooled_projection_dim=8, out_channels=4).eval()
    pipe = types.SimpleNamespace(transformer=net, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    g = torch.Generator().manual_seed(5)
    emb, emb2, pooled = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g), torch.randn(2, 8, generator=g)

    def ident(**kw):
        m = pipeline_model(pipe, **{"prompt_embeds": emb, "pooled_prompt_embeds": pooled, "guidance_scale": 3.0, **kw})
        return m.identity, model_key(m)

    base = ident()
    assert base[0].startswith("diffusers:SimpleNamespace.SD3Transformer2DModel:") and base == ident()
    assert ident(guidance_scale=4.0)[0] != base[0] and ident(guidance_scale=4.0)[1] != base[1]
    assert ident(prompt_embeds=emb2)[0] != base[0] and ident(prompt_embeds=emb2)[1] != base[1]
    assert ident(negative_prompt_embeds=emb2)[0] != base[0]
    assert ident(mu=0.5)[0] != base[0]
    with torch.no_grad():
        next(net.parameters()).add_(1e-3)
    assert ident()[0] != base[0]
    m = pipeline_model(pipe, prompt_embeds=emb, pooled_prompt_embeds=pooled)
    m.identity = "mine"  # set by hand: replaces the computed one
    assert model_key(m).startswith("mine|flow|")

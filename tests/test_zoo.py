"""The bundled trained models: offline loading from safetensors + JSON cards, clear errors for
damaged files, a working forward pass and sampler run, and the digits metrics."""

import json
import shutil

import pytest
import torch

import fewstep
from fewstep import zoo
from fewstep.cli import main

DIFFUSION = ["digits-vp-eps", "digits-flow", "digits-edm"]


def test_list_names_every_bundled_model():
    names = zoo.list()
    assert set(DIFFUSION + ["digits-classifier"]) <= set(names)


@pytest.mark.parametrize("name", DIFFUSION)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_load_gives_a_ready_model(name, dtype):
    model = zoo.load(name, dtype=dtype)
    assert isinstance(model, fewstep.Model) and model.sample_shape == (1, 8, 8)
    info = zoo.card(name)
    assert model.prediction == info["prediction"] and model.schedule == fewstep.schedules.schedule_from_config(info["schedule"])
    x = fewstep.initial_noise(model.schedule, (3, 1, 8, 8), 0, dtype=dtype)
    p = model.predict(x, float(model.schedule.t_max) * 0.5)
    assert p.x0.shape == x.shape and p.x0.dtype == dtype
    out = fewstep.sample(model, x, "dpmpp_2m", nfe=10)
    img = model.to_images(out)
    assert img.shape == (3, 8, 8) and float(img.min()) >= 0.0 and float(img.max()) <= 16.0


def _copy(tmp_path, name):
    """A model's card, weights and the tuned schedules its card lists, into ``tmp_path``."""
    for suffix in (".json", ".safetensors"):
        shutil.copy(zoo.WEIGHTS / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    for entry in (zoo.card(name).get("tuned_schedules") or {}).values():
        (tmp_path / entry["file"]).parent.mkdir(exist_ok=True)
        shutil.copy(zoo.WEIGHTS / entry["file"], tmp_path / entry["file"])
    return tmp_path


def test_corrupted_weights_are_refused(tmp_path):
    root = _copy(tmp_path, "digits-vp-eps")
    w = root / "digits-vp-eps.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(fewstep.errors.ZooError, match="corrupted"):
        zoo.load("digits-vp-eps", root)


def test_missing_weights_and_bad_cards_are_clear_errors(tmp_path):
    root = _copy(tmp_path, "digits-flow")
    (root / "digits-flow.safetensors").unlink()
    with pytest.raises(fewstep.errors.ZooError, match="missing"):
        zoo.load("digits-flow", root)
    (root / "broken.json").write_text("{not json")
    with pytest.raises(fewstep.errors.ZooError, match="not valid JSON"):
        zoo.load("broken", root)
    card = json.loads((zoo.WEIGHTS / "digits-flow.json").read_text())
    del card["sha256"]
    (root / "nohash.json").write_text(json.dumps(card))
    with pytest.raises(fewstep.errors.ZooError, match="sha256"):
        zoo.load("nohash", root)
    with pytest.raises(fewstep.errors.ZooError, match="no zoo model 'nope'.*digits"):
        zoo.load("nope")
    with pytest.raises(fewstep.errors.ZooError, match="plain name"):
        zoo.load("../etc/passwd")
    with pytest.raises(fewstep.errors.ZooError, match="not a diffusion"):
        zoo.load("digits-classifier")


@pytest.fixture(scope="module")
def evaluator():
    from fewstep.zoo.evaluate import DigitsEvaluator

    return DigitsEvaluator()


def test_digits_metrics_are_zero_on_the_reference_and_large_on_noise(evaluator):
    held = evaluator.split.heldout_x
    same = evaluator.evaluate(held)
    base = evaluator.baseline()
    assert abs(same["fd_features"]) < 1e-6 * base["fd_features"] and abs(same["fd_pixels"]) < 1e-6 * base["fd_pixels"]
    assert base["heldout_accuracy"] > 0.9 and base["fd_features"] > 0
    noise = evaluator.evaluate(torch.randn_like(held).clamp(-1, 1))
    assert noise["fd_features"] > 10 * base["fd_features"] and noise["fd_pixels"] > 10 * base["fd_pixels"]


def test_demo_on_a_bundled_network_writes_image_grids(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--batch", "8", "--solvers", "ddim", "unipc", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "digits-vp-eps" in report and "| unipc | 10 |" in report and "samples.png" in report
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_quality_records_its_figures_in_the_card(tmp_path):
    from fewstep.zoo import evaluate

    root = _copy(_copy(tmp_path, "digits-flow"), "digits-classifier")
    assert evaluate.main(["digits-flow", "--root", str(root), "--n", "24", "--nfe", "4", "--write"]) == 0
    m = zoo.card("digits-flow", root)["metrics"]
    assert m["samples"] == 24 and m["nfe"] == 4 and m["solver"] == "unipc"
    assert m["fd_features_ratio"] == pytest.approx(m["fd_features"] / m["train_vs_heldout"]["fd_features"])
    assert 0.0 <= m["confidence"] <= 1.0
    zoo.load("digits-flow", root)  # the card still matches its weights


def test_fine_reference_starts_from_pure_noise_on_flow_models():
    model = zoo.load("digits-flow", dtype=torch.float64)
    x = fewstep.initial_noise(model.schedule, (2, 1, 8, 8), 0, dtype=torch.float64)
    chk = fewstep.check_fine_reference(model, x, nfe=8)  # lambda(t_max = 1) = -inf: uniform t, not uniform lambda
    assert "uniform_t" in chk.method and torch.isfinite(chk.solution).all() and chk.rms_change > 0


def test_tuned_schedules_are_checked_and_run_by_the_default_call(tmp_path):
    """A searched schedule registered with a bundled model is listed in its card with its SHA-256,
    attached on load and run by sample(model, x_T, nfe=N); a damaged, replaced or hostile file is a
    ZooError naming it, never silently used."""
    from fewstep.zoo.tune import register

    root = _copy(tmp_path, "digits-vp-eps")
    info = json.loads((root / "digits-vp-eps.json").read_text())
    info.pop("tuned_schedules", None)
    (root / "digits-vp-eps.json").write_text(json.dumps(info))
    model = zoo.load("digits-vp-eps", root)
    plan = fewstep.preset("dpmpp_2m", 5, model.schedule, spacing="quadratic").replace(name="my-tuned")
    path = register("digits-vp-eps", 5, plan, root=root)
    entry = zoo.card("digits-vp-eps", root)["tuned_schedules"]["5"]
    assert entry["file"] == f"tuned/{path.name}" and len(entry["sha256"]) == 64
    tuned = zoo.load("digits-vp-eps", root)
    assert tuned.tuned_schedules[5] == plan
    x = fewstep.initial_noise(tuned.schedule, (2, 1, 8, 8), 0)
    _, info5 = fewstep.sample(tuned, x, nfe=5, return_info=True)
    assert info5.plan.name == "my-tuned"
    text = path.read_text()
    path.write_text(text.replace('"my-tuned"', '"my-tuneD"'))  # one byte changed
    with pytest.raises(fewstep.ZooError, match="does not match the SHA-256"):
        zoo.load("digits-vp-eps", root)
    hostile = '{"format": "fewstep.solver_schedule", "version": 1, "times": [1e999, 0], "steps": [{}]}'
    path.write_text(hostile)
    card = json.loads((root / "digits-vp-eps.json").read_text())
    import hashlib

    card["tuned_schedules"]["5"]["sha256"] = hashlib.sha256(hostile.encode()).hexdigest()
    (root / "digits-vp-eps.json").write_text(json.dumps(card))
    with pytest.raises(fewstep.ZooError, match="not a valid schedule file"):
        zoo.load("digits-vp-eps", root)
    path.unlink()
    with pytest.raises(fewstep.ZooError, match="missing or malformed"):
        zoo.load("digits-vp-eps", root)

"""The digits zoo: networks, the data split and the training entry point (a few steps only)."""

import hashlib
import json

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
safetensors_torch = pytest.importorskip("safetensors.torch")

import fewstep  # noqa: E402
from fewstep.zoo import nets  # noqa: E402
from fewstep.zoo.data import load_digits_split, to_images, to_model_space  # noqa: E402
from fewstep.zoo.train import NAMES, main, train  # noqa: E402


@pytest.fixture(scope="module")
def split():
    return load_digits_split()


def test_unet_shapes_and_rebuild():
    net = nets.DigitsUNet(channels=16, channel_mult=(1, 2), num_res_blocks=1, time_scale=1e-3)
    x, t = torch.randn(5, 1, 8, 8), torch.rand(5) * 999
    assert torch.equal(net(x, t), torch.zeros(5, 1, 8, 8))  # zero-initialised output conv
    torch.nn.init.normal_(net.conv_out.weight)
    out = net(x, t)
    assert out.shape == (5, 1, 8, 8) and out.dtype == torch.float32 and torch.isfinite(out).all()
    twin = nets.build("DigitsUNet", json.loads(json.dumps(net.config)))
    twin.load_state_dict(net.state_dict())
    assert torch.allclose(twin(x, t), out)
    assert not torch.allclose(net(x, t + 100), out)  # time conditioning reaches the output


def test_edm_preconditioning():
    net = nets.EDMDigitsUNet(channels=16, channel_mult=(1, 2), num_res_blocks=1, sigma_data=0.8)
    x, sigma = torch.randn(4, 1, 8, 8), torch.tensor([0.01, 0.5, 2.0, 80.0])
    c_skip = (0.64 / (sigma**2 + 0.64)).reshape(-1, 1, 1, 1)
    assert torch.allclose(net(x, sigma), c_skip * x)  # F = 0 at initialisation: D = c_skip x
    torch.nn.init.normal_(net.conv_out.weight)
    d = net(x, sigma)
    assert not torch.allclose(d, c_skip * x) and torch.allclose(net(x, torch.tensor(1e-6)), x, atol=1e-4)  # D -> x as sigma -> 0
    twin = nets.build("EDMDigitsUNet", json.loads(json.dumps(net.config)))
    twin.load_state_dict(net.state_dict())
    assert torch.allclose(twin(x, sigma), d)


def test_classifier_shapes():
    net = nets.build("DigitsClassifier", {"channels": 8, "features": 64})
    x = torch.randn(7, 1, 8, 8)
    assert net.features(x).shape == (7, 64)
    logits = net(x)
    assert logits.shape == (7, 10) and logits.dtype == torch.float32
    assert nets.DigitsClassifier(**net.config).config == net.config


def test_build_rejects_unknown_class():
    with pytest.raises(ValueError, match="'os.system'"):
        nets.build("os.system", {})


def test_pixel_round_trip():
    p = np.random.default_rng(0).integers(0, 17, size=(6, 8, 8))
    x = to_model_space(p)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert torch.equal(to_images(x), torch.as_tensor(p, dtype=torch.float32))
    assert torch.equal(to_images(x.reshape(6, 64)), to_images(x.reshape(6, 1, 8, 8)))
    assert to_images(torch.full((2, 64), 5.0)).max() == 16.0
    with pytest.raises(ValueError):
        to_images(torch.zeros(3, 10))


def test_split_deterministic_disjoint_stratified(split):
    again = load_digits_split()
    assert np.array_equal(split.heldout_idx, again.heldout_idx) and torch.equal(split.train_x, again.train_x)
    assert not np.array_equal(split.heldout_idx, load_digits_split(seed=1).heldout_idx)
    assert len(np.intersect1d(split.train_idx, split.heldout_idx)) == 0
    assert len(split.train_idx) + len(split.heldout_idx) == 1797
    assert split.train_x.shape == (len(split.train_idx), 1, 8, 8) and split.train_x.dtype == torch.float32
    assert split.heldout_y.dtype == torch.int64 and split.train_x.min() >= -1 and split.train_x.max() <= 1
    for label in range(10):
        n_held, n_all = int((split.heldout_y == label).sum()), int((split.train_y == label).sum()) + int((split.heldout_y == label).sum())
        assert abs(n_held - 0.25 * n_all) <= 0.5
    d = split.describe()
    text = ",".join(map(str, sorted(split.heldout_idx.tolist())))
    assert d["heldout_sha256"] == hashlib.sha256(text.encode()).hexdigest() and d["n_heldout"] == len(split.heldout_idx)
    json.dumps(d)


@pytest.mark.parametrize("name", NAMES)
def test_training_entry_point(name, tmp_path):
    card = train(name, steps=3, out=tmp_path, log_every=10)
    on_disk = json.loads((tmp_path / f"{name}.json").read_text())
    assert on_disk == json.loads(json.dumps(card))
    weights = tmp_path / card["weights"]
    assert card["format"] == "fewstep-zoo-card" and card["version"] == 1 and card["name"] == name
    assert card["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    arch = card["architecture"]
    net = nets.build(arch["class"], arch["config"])
    net.load_state_dict(safetensors_torch.load_file(str(weights)))
    assert arch["parameters"] == sum(p.numel() for p in net.parameters())
    assert card["sample_shape"] == [1, 8, 8] and card["data"]["pixel_scale"] == "x = pixels / 8 - 1"
    tr = card["training"]
    assert tr["steps"] == 3 and tr["seed"] == 0 and np.isfinite(tr["final_loss"]) and tr["device"] == "cpu"
    assert {"wall_s", "torch", "hyperparameters"} <= set(tr)
    stored = safetensors_torch.load_file(str(weights))  # stored as the config says, loaded back as float32
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {getattr(torch, tr["hyperparameters"]["storage_dtype"])}
    loaded, _ = fewstep.zoo.load_network(name, tmp_path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.zeros(2, 1, 8, 8)
    if name == "digits-classifier":
        assert 0.0 <= card["metrics"]["heldout_accuracy"] <= 1.0 and "schedule" not in card
        assert net(x).shape == (2, 10)
    else:
        sched = fewstep.schedules.schedule_from_config(card["schedule"])
        assert card["prediction"] == {"digits-vp-eps": "eps", "digits-flow": "flow", "digits-edm": "edm"}[name]
        model = fewstep.Model(lambda x, t: net(x, t), sched, card["prediction"], sample_shape=(1, 8, 8))
        x_T = fewstep.initial_noise(sched, (4, 1, 8, 8), 0)
        with torch.no_grad():
            assert torch.isfinite(fewstep.sample(model, x_T, "ddim", nfe=2)).all()


@pytest.mark.parametrize("name", ["digits-flow", "digits-classifier"])
def test_training_is_reproducible(name, tmp_path):
    a = train(name, steps=2, out=tmp_path / "a", log_every=10)
    b = train(name, steps=2, out=tmp_path / "b", log_every=10)
    assert a["sha256"] == b["sha256"]
    assert train(name, steps=2, out=tmp_path / "c", seed=1, log_every=10)["sha256"] != a["sha256"]


def test_training_rejects_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="digits-nope"):
        train("digits-nope", steps=1, out=tmp_path)
    with pytest.raises(SystemExit):
        main(["digits-nope"])


# ---- the validation zoo (trained for measurement; the bundled models stay what they are) ----------
from fewstep.zoo import validation  # noqa: E402
from fewstep.zoo.train import prepare_data  # noqa: E402


def test_transformer_and_mlp_shapes_and_rebuild():
    dit = nets.DigitsTransformer(image_size=16, patch=4, width=32, depth=2, heads=2, time_scale=1e-3)
    x, t = torch.randn(3, 1, 16, 16), torch.rand(3) * 999
    assert torch.equal(dit(x, t), torch.zeros(3, 1, 16, 16))  # zero-initialised output layer
    torch.nn.init.normal_(dit.out.weight)
    torch.nn.init.normal_(dit.ada_out.weight)
    for block in dit.blocks:
        torch.nn.init.normal_(block.ada.weight, std=0.1)
    out = dit(x, t)
    assert out.shape == x.shape and not torch.allclose(dit(x, t + 300), out)  # time reaches the output
    # patches go back where they came from: a change in one patch moves mostly that patch's pixels
    twin = nets.build("DigitsTransformer", json.loads(json.dumps(dit.config)))
    twin.load_state_dict(dit.state_dict())
    assert torch.allclose(twin(x, t), out)
    mlp = nets.VectorMLP(dim=64, width=32, depth=2)
    v = torch.randn(5, 64)
    assert torch.equal(mlp(v, torch.rand(5)), torch.zeros(5, 64))
    torch.nn.init.normal_(mlp.out.weight)
    twin = nets.build("VectorMLP", json.loads(json.dumps(mlp.config)))
    twin.load_state_dict(mlp.state_dict())
    assert mlp(v, torch.rand(5)).shape == (5, 64) and torch.allclose(twin(v, torch.full((5,), 0.3)), mlp(v, torch.full((5,), 0.3)))
    with pytest.raises(ValueError, match="patch"):
        nets.DigitsTransformer(image_size=10, patch=4)


def test_transformer_puts_each_patch_back_where_it_came_from():
    """Without blocks every token sees only its own patch: changing one input patch changes exactly
    the pixels of that patch in the output (the un-patching is the inverse of the patching)."""
    torch.manual_seed(0)
    dit = nets.DigitsTransformer(image_size=8, patch=2, width=8, depth=0, heads=2)
    torch.nn.init.normal_(dit.out.weight)
    x = torch.randn(1, 1, 8, 8)
    y = x.clone()
    y[0, 0, 2:4, 4:6] += 1.0  # patch (row 1, column 2)
    with torch.no_grad():
        changed = (dit(y, torch.zeros(1)) - dit(x, torch.zeros(1))).abs()[0, 0] > 1e-6
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:4, 4:6] = True
    assert torch.equal(changed, expected)


def test_prepare_data_shapes_and_range(split):
    x = split.train_x[:6]
    assert prepare_data("digits8", x) is x
    for size in (16, 32):
        up = prepare_data(f"digits{size}", x)
        assert up.shape == (6, 1, size, size) and up.min() >= -1 and up.max() <= 1
        down = torch.nn.functional.avg_pool2d(up, size // 8)  # the same digit, smoothed: strongly correlated with it
        assert torch.corrcoef(torch.stack([down.flatten(), x.flatten()]))[0, 1] > 0.9
    assert prepare_data("flat64", x).shape == (6, 64)
    with pytest.raises(ValueError, match="data kind"):
        prepare_data("digits64", x)
    assert to_images(prepare_data("digits16", x)).shape == (6, 16, 16)


def test_validation_zoo_covers_what_matters_to_a_sampler():
    cfgs = validation.VALIDATION_CONFIGS
    assert len(cfgs) >= 8
    assert {c.net_class for c in cfgs.values()} >= {"VectorMLP", "DigitsUNet", "DigitsTransformer", "EDMDigitsUNet"}
    assert {c.prediction for c in cfgs.values()} == {"eps", "v", "x0", "flow", "edm"}
    assert {c.schedule for c in cfgs.values()} >= {"discrete_vp_linear", "discrete_vp_scaled_linear", "discrete_vp_cosine", "flow_matching", "edm"}
    assert {c.flow_shift for c in cfgs.values() if c.schedule == "flow_matching"} >= {1.0, 3.0}
    assert {c.data for c in cfgs.values()} == {"flat64", "digits8", "digits16", "digits32"}
    short, long = cfgs["val-unet8-eps-linear-short"], cfgs["val-unet8-eps-linear-long"]
    assert short.steps * 5 <= long.steps and short.net == long.net and short.prediction == long.prediction
    keys = [(c.net_class, c.prediction, c.schedule, c.data, c.flow_shift, c.steps) for c in cfgs.values()]
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("name", ["val-mlp-flow", "val-dit16-x0-scaled", "val-unet16-flow-shift3"])
def test_validation_model_trains_loads_and_samples(name, tmp_path):
    card = train(name, steps=2, out=tmp_path, log_every=10, configs=validation.VALIDATION_CONFIGS)
    cfg = validation.VALIDATION_CONFIGS[name]
    assert card["prediction"] == cfg.prediction and card["architecture"]["class"] == cfg.net_class
    assert card["sample_shape"] == list(prepare_data(cfg.data, torch.zeros(1, 1, 8, 8)).shape[1:])
    model = validation.load(name, tmp_path)
    assert model.tuned_schedules == {} and model.sample_shape == tuple(card["sample_shape"])
    if cfg.schedule == "flow_matching":
        assert model.schedule.shift == cfg.flow_shift
    x_T = fewstep.initial_noise(model.schedule, (2, *model.sample_shape), 0)
    assert torch.isfinite(fewstep.sample(model, x_T, nfe=3)).all()
    assert validation.build([name], tmp_path)[name]["sha256"] == card["sha256"]  # built already: not retrained


def test_validation_load_names_the_build_command(tmp_path):
    with pytest.raises(fewstep.ZooError, match="python -m fewstep.zoo.validation build val-mlp-flow"):
        validation.load("val-mlp-flow", tmp_path)
    with pytest.raises(fewstep.ZooError, match="unknown validation model"):
        validation.load("val-nope", tmp_path)

"""The command line writes pictures: ``--out`` decides the format by its suffix, a picture is a grid of
the samples (decoded here: its size and every tile), and the ``.npy`` / ``.safetensors`` outputs hold
model-space samples that ``fewstep evaluate`` reads like a generation folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fewstep
from fewstep.cli import main

DIGITS = ["--model", "digits-vp-eps", "--solver", "ddim", "--nfe", "3", "--seed", "5"]
PAD = 2  # white pixels between and around the tiles (fewstep.report.write_image_grid)


def _expected_tiles(x: np.ndarray) -> np.ndarray:
    """Model-space digits (n, 1, 8, 8) in [-1, 1] as grey levels 0..255 (pixels 0..16 read as 0..1)."""
    return np.round(np.clip((x[:, 0].astype(np.float64) + 1.0) / 2.0, 0.0, 1.0) * 255.0)


def _check_grid(png: Path, x: np.ndarray, cols: int, scale: int) -> None:
    """The decoded picture is the samples, tile k at row k // cols, column k % cols, and white elsewhere."""
    img = np.asarray(Image.open(png))
    n, h, w = x.shape[0], 8 * scale, 8 * scale
    rows = -(-n // cols)
    assert img.dtype == np.uint8 and img.shape == (rows * (h + PAD) + PAD, cols * (w + PAD) + PAD)
    want = _expected_tiles(x)
    seen = np.zeros(img.shape, bool)
    for k in range(n):
        r, c = divmod(k, cols)
        y0, x0 = PAD + r * (h + PAD), PAD + c * (w + PAD)
        tile = img[y0:y0 + h, x0:x0 + w].astype(np.float64)
        expect = np.kron(want[k], np.ones((scale, scale)))  # nearest-neighbour upscaling
        assert np.abs(tile - expect).max() <= 1  # float32 rounding of the network's outputs at a .5 boundary at most
        assert (tile == expect).mean() > 0.97
        seen[y0:y0 + h, x0:x0 + w] = True
    assert (img[~seen] == 255).all()  # padding and empty slots


def test_sample_writes_a_png_grid_whose_tiles_are_the_samples(tmp_path, capsys):
    npy, png = tmp_path / "x.npy", tmp_path / "grid.png"
    assert main(["sample", *DIGITS, "--batch", "6", "--out", str(npy)]) == 0
    x = np.load(npy)
    assert x.shape == (6, 1, 8, 8)  # model space, (n, *sample_shape)
    capsys.readouterr()
    assert main(["sample", *DIGITS, "--batch", "6", "--out", str(png), "--grid-cols", "4", "--scale", "1"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"written to {png}")
    _check_grid(png, x, cols=4, scale=1)
    big = tmp_path / "big.png"
    assert main(["sample", *DIGITS, "--batch", "6", "--out", str(big), "--grid-cols", "3", "--scale", "8"]) == 0
    _check_grid(big, x, cols=3, scale=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.png", "grid.png", "x.npy"]  # exactly the files named
    jpg = tmp_path / "grid.JPEG"
    assert main(["sample", *DIGITS, "--batch", "6", "--out", str(jpg)]) == 0
    assert jpg.read_bytes()[:2] == b"\xff\xd8" and Image.open(jpg).size == (3 * (64 + PAD) + PAD, 2 * (64 + PAD) + PAD)  # default scale 8


def test_out_suffix_is_checked_before_any_model_call(tmp_path, capsys, monkeypatch):
    def no_model_call(*args, **kwargs):
        raise AssertionError("the model was called")

    monkeypatch.setattr(fewstep.Model, "__call__", no_model_call)
    monkeypatch.setattr(fewstep.Model, "predict", no_model_call, raising=False)
    monkeypatch.setattr("fewstep.cli.sample", no_model_call)
    out = tmp_path / "samples.txt"
    assert main(["sample", *DIGITS, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "samples.txt" in err and ".png" in err and ".npy" in err and ".safetensors" in err
    assert main(["sample", "--oracle", "gmm-d2", "--out", str(tmp_path / "x.png")]) == 2  # an oracle's samples are not images
    assert "not images" in capsys.readouterr().err
    assert main(["sample", *DIGITS, "--out", str(tmp_path / "x.npy"), "--scale", "2"]) == 2  # grid flags need a picture
    assert not list(tmp_path.iterdir())


def test_safetensors_output_and_evaluate_reads_a_sample_file(tmp_path, capsys):
    from safetensors.torch import load_file

    from fewstep.zoo.evaluate import DigitsEvaluator

    npy, st = tmp_path / "x.npy", tmp_path / "x.safetensors"
    assert main(["sample", *DIGITS, "--batch", "8", "--out", str(npy)]) == 0
    assert main(["sample", *DIGITS, "--batch", "8", "--out", str(st)]) == 0
    x = torch.from_numpy(np.load(npy))
    stored = load_file(str(st))
    assert torch.equal(stored["samples"], x) and stored["indices"].tolist() == list(range(8))
    model = fewstep.zoo.load("digits-vp-eps")
    x_T = fewstep.initial_noise(model.schedule, (8, *model.sample_shape), 5)
    assert torch.allclose(x, fewstep.sample(model, x_T, "ddim", nfe=3), atol=1e-5)  # exactly what fewstep.sample returns
    capsys.readouterr()
    grid = tmp_path / "eval.png"
    assert main(["evaluate", str(st), "--grid", str(grid), "--grid-samples", "5", "--grid-cols", "5", "--scale", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    ev = DigitsEvaluator()
    assert res["file"] == str(st) and res["samples"] == 8
    assert res["fd_features"] == pytest.approx(ev.evaluate(x)["fd_features"], rel=1e-6)
    # the floor: as many real train digits
    assert res["real_digits"]["samples"] == 8
    assert res["real_digits"]["fd_features"] == pytest.approx(ev.evaluate(ev.split.train_x[:8])["fd_features"], rel=1e-9)
    _check_grid(grid, x[:5].numpy(), cols=5, scale=1)


def test_generate_preview_and_evaluate_grid_of_a_folder(tmp_path, capsys):
    out, preview, grid = tmp_path / "gen", tmp_path / "preview.png", tmp_path / "eval.png"
    assert main(["generate", *DIGITS, "--num-samples", "7", "--batch", "4", "--out", str(out), "--preview", str(preview),
                 "--grid-samples", "5", "--grid-cols", "2", "--scale", "1"]) == 0
    assert f"written to {preview}" in capsys.readouterr().out
    x = fewstep.load_samples(out).numpy()
    _check_grid(preview, x[:5], cols=2, scale=1)
    assert main(["evaluate", str(out), "--grid", str(grid), "--grid-cols", "4", "--scale", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["samples"] == 7 and res["real_digits"]["samples"] == 7 and res["real_digits"]["fd_features"] > 0
    _check_grid(grid, x, cols=4, scale=1)  # the first 16 or all
    assert main(["generate", "--oracle", "gmm-d2", "--num-samples", "4", "--out", str(tmp_path / "g2"), "--preview", str(tmp_path / "p.png")]) == 2
    assert "not images" in capsys.readouterr().err and not (tmp_path / "g2").exists()


def test_evaluate_refuses_pixel_files_of_fewstep_0_1(tmp_path, capsys):
    old = tmp_path / "old.npy"
    np.save(old, np.full((4, 8, 8), 8.0))
    assert main(["evaluate", str(old)]) == 2
    assert "(n, 1, 8, 8)" in capsys.readouterr().err


@pytest.mark.parametrize("shape", [(3, 5, 4), (1, 5, 4), (5, 4)])
def test_a_user_models_image_shaped_samples_are_read_in_minus_one_to_one(tmp_path, shape):
    """Any model whose sample_shape is (C, H, W) with C 1 or 3, or (H, W): values in [-1, 1] (clamped)
    become grey levels / RGB 0..255; other shapes are refused."""
    from fewstep.report import images_of, write_image_grid

    model = fewstep.Model(lambda x, t: x, fewstep.FlowMatching(), "x0", sample_shape=shape)
    x = torch.linspace(-1.2, 1.2, 3 * int(np.prod(shape))).reshape(3, *shape)
    path = write_image_grid(images_of(model, x), tmp_path / "u.png", cols=2, scale=2)
    img = np.asarray(Image.open(path))
    want = np.round(np.clip((x.numpy().astype(np.float64) + 1) / 2, 0, 1) * 255)
    want = np.moveaxis(want, 1, -1) if len(shape) == 3 and shape[0] == 3 else want.reshape(3, 5, 4)
    h, w = 10, 8
    assert img.shape[:2] == (2 * (h + PAD) + PAD, 2 * (w + PAD) + PAD) and img.ndim == (3 if shape[0] == 3 else 2)
    for k in range(3):
        r, c = divmod(k, 2)
        tile = img[PAD + r * (h + PAD):PAD + r * (h + PAD) + h, PAD + c * (w + PAD):PAD + c * (w + PAD) + w]
        assert np.array_equal(tile[::2, ::2], want[k]) and np.array_equal(tile[1::2, 1::2], want[k])
    with pytest.raises(fewstep.ArgumentError, match="not images"):
        images_of(fewstep.Model(lambda x, t: x, fewstep.FlowMatching(), "x0", sample_shape=(2, 5, 4)))

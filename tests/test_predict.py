"""``raypets predict`` on real Ray: a tree of mixed images -> HDF5 softmax the rmldnn tutorial's code reads."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import save_image
from PIL import Image

from raypets.checkpoints import RAY_RUN_NAME, save_state
from raypets.cli import main
from raypets.errors import UserError
from raypets.keras_json import REFERENCE_NETWORK
from raypets.model import XceptionUNet
from raypets.rmldnn import inference_settings
from raypets.stages.predict import list_inputs, png_names

SIZE = 64
TUTORIAL = Path(__file__).parent / "data" / "config_pets_inference.json"
# name -> (height, width, format, mode): the real archive's kinds of files, and a sub-folder
IMAGES = {
    "Abyssinian_142.jpg": (40, 56, "JPEG", "RGB"),
    "gif_named.jpg": (33, 47, "GIF", "P"),
    "rgba.png": (50, 30, "PNG", "RGBA"),
    "gray.jpg": (45, 45, "JPEG", "L"),
    "dogs/beagle_1.png": (64, 80, "PNG", "RGB"),
    "dogs/small.bmp": (20, 24, "BMP", "RGB"),
}
TRUNCATED = "dogs/truncated.jpg"


def _checkpoint(path: Path, seed: int = 0, num_classes: int = 3) -> Path:
    """Random weights whose BatchNorm statistics fit 0-255 inputs (one train-mode pass), so outputs are not flat."""
    torch.manual_seed(seed)
    model = XceptionUNet(num_classes=num_classes)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # running stats = this batch's
    with torch.no_grad():
        model.train()(torch.rand(4, 3, SIZE, SIZE) * 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["predict", *args, "--no-progress"])
    return code, out.getvalue(), err.getvalue()


def _arrays(path: Path) -> dict[str, np.ndarray]:
    found = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: found.update({name: obj[()]}) if isinstance(obj, h5py.Dataset) else None)
    return found


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    for name, (height, width, fmt, mode) in IMAGES.items():
        save_image(root / "in" / name, rng.integers(0, 256, (height, width, 3), dtype=np.uint8), fmt, mode)
    good = save_image(root / "whole.jpg", rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).read_bytes()
    (root / "in" / TRUNCATED).write_bytes(good[: len(good) // 2])
    (root / "in" / "notes.txt").write_text("not an image")
    save_image(root / "in" / ".hidden.jpg", np.zeros((8, 8, 3), np.uint8))
    _checkpoint(root / "model_checkpoint_1.pt")
    return root


@pytest.fixture(scope="module")
def predicted(tree, ray_local) -> tuple[Path, int, str]:
    out = tree / "predictions"
    code, printed, _ = _cli("--checkpoint", str(tree / "model_checkpoint_1.pt"), str(tree / "in"), str(out),
                            "--size", str(SIZE), "--batch-size", "4", "--masks", "--overlays")
    return out, code, printed


def _plain_probs(weights: Path, image: Path, size: int = SIZE, mean: float = 0.0, std: float = 1 / 255) -> np.ndarray:
    """The reference: PIL to RGB, bilinear resize, one plain forward of the state_dict, softmax."""
    model = XceptionUNet()
    model.load_state_dict(torch.load(weights, weights_only=True))
    pixels = np.array(Image.open(image).convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    x = (torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255 - mean) / std
    with torch.no_grad():
        return torch.softmax(model.eval()(x), dim=1)[0].numpy()


def test_each_readable_image_is_one_dataset_at_its_path(predicted, tree):
    out, code, printed = predicted
    assert code == 1  # one file skipped
    assert sorted(os.listdir(out)) == ["errors.csv", "masks", "output_1.h5", "overlays", "predictions.h5"]
    assert not list(tree.glob(".predictions*"))  # no staging folder left behind
    arrays = _arrays(out / "output_1.h5")
    assert sorted(arrays) == sorted(IMAGES)
    for probs in arrays.values():
        assert probs.shape == (3, SIZE, SIZE) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    with h5py.File(out / "output_1.h5") as f:
        assert list(f.attrs["class_names"]) == ["pet", "background", "border"]
        assert list(f.attrs["network_size"]) == [SIZE, SIZE] and f.attrs["precision"] == "single"
        assert f.attrs["checkpoint"] == str((tree / "model_checkpoint_1.pt").resolve())
        for name, (height, width, *_) in IMAGES.items():
            assert list(f[name].attrs["original_size"]) == [height, width]
    with h5py.File(out / "predictions.h5") as index:  # the single entry point finds every prediction by path
        for name, probs in arrays.items():
            np.testing.assert_array_equal(index[name][()], probs)
    with open(out / "errors.csv") as f:
        assert [row[:2] for row in csv.reader(f)] == [["file", "reason"], [TRUNCATED, "truncated image data"]]
    assert "predicted 6 image(s)" in printed and "1 skipped" in printed and "truncated image data" in printed
    assert "ignored 2 hidden or non-image file(s)" in printed


def test_probabilities_match_a_plain_forward(predicted, tree):
    arrays = _arrays(predicted[0] / "output_1.h5")
    for name, probs in arrays.items():
        plain = _plain_probs(tree / "model_checkpoint_1.pt", tree / "in" / name)
        np.testing.assert_allclose(probs, plain, atol=1e-4)
        assert (probs.argmax(0) == plain.argmax(0)).mean() > 0.999
    assert len(np.unique(arrays["Abyssinian_142.jpg"].argmax(0))) > 1  # a real check: not one class everywhere


def test_masks_and_overlays_have_the_original_sizes(predicted):
    out = predicted[0]
    arrays = _arrays(out / "output_1.h5")
    for name, (height, width, *_) in IMAGES.items():
        png = Path(name).with_suffix(".png")
        mask = np.asarray(Image.open(out / "masks" / png))
        assert mask.shape == (height, width) and set(np.unique(mask)) <= {0, 1, 2}
        net = arrays[name].argmax(0)
        rows = ((np.arange(height) + 0.5) * SIZE / height).astype(int)  # nearest: the pixel centres
        cols = ((np.arange(width) + 0.5) * SIZE / width).astype(int)
        assert (mask == net[rows][:, cols]).mean() > 0.95  # PIL rounds some ties the other way
        overlay = Image.open(out / "overlays" / png)
        assert overlay.size == (width, height) and overlay.mode == "RGB"


def test_the_tutorial_reading_code_runs_verbatim(predicted):
    snippet = """
import h5py as h5
import matplotlib.pyplot as plt

file = h5.File('./predictions/output_1.h5', 'r')
pred = file['Abyssinian_142.jpg'][()].transpose(1,2,0).argmax(2)
plt.imshow(pred, interpolation='nearest', cmap='gray')
plt.show()
print(pred.shape)
"""
    done = subprocess.run([sys.executable, "-c", snippet], cwd=predicted[0].parent, capture_output=True, text=True,
                          env={**os.environ, "MPLBACKEND": "Agg"}, check=True)
    assert done.stdout.strip() == f"({SIZE}, {SIZE})"


def test_rerun_gives_identical_arrays_and_half_precision_halves_the_file(predicted, tree):
    out = predicted[0]
    first = _arrays(out / "output_1.h5")
    ckpt = str(tree / "model_checkpoint_1.pt")
    code, _, err = _cli("--checkpoint", ckpt, str(tree / "in"), str(out), "--size", str(SIZE))
    assert code == 2 and err.strip() == f"raypets: error: {out}: exists and is not empty; pass --overwrite to " \
                                        "replace the prediction output there"
    assert _cli("--checkpoint", ckpt, str(tree / "in"), str(out), "--size", str(SIZE), "--batch-size", "4",
                "--overwrite")[0] == 1
    again = _arrays(out / "output_1.h5")
    assert again.keys() == first.keys() and all(np.array_equal(again[k], first[k]) for k in first)
    assert not (out / "masks").exists()  # replaced, not merged

    half = tree / "half"
    assert _cli("--checkpoint", ckpt, str(tree / "in"), str(half), "--size", str(SIZE), "--precision", "half",
                "--workers", "1")[0] == 1
    halved = _arrays(half / "output_1.h5")
    assert all(halved[k].dtype == np.float16 and np.allclose(halved[k], first[k], atol=1e-3) for k in first)
    ratio = (half / "output_1.h5").stat().st_size / (out / "output_1.h5").stat().st_size
    assert 0.45 < ratio < 0.56, ratio


def test_run_folder_brings_its_normalisation_and_class_names(tree, tmp_path, ray_local):
    """A training run folder: its Ray checkpoint's settings (normalize, the data manifest's classes) apply."""
    folder = tmp_path / "run" / RAY_RUN_NAME / "checkpoint_000000"
    weights = torch.load(_checkpoint(tmp_path / "weights.pt", seed=1), weights_only=True)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"classes": ["cat", "bg", "edge"]}))
    config = {"normalize_mean": 0.5, "normalize_std": 0.25, "data": str(shards)}
    folder.mkdir(parents=True)
    save_state(folder, weights=weights, optimizer={}, epoch=2, step=20, config=config)
    image = tree / "in" / "Abyssinian_142.jpg"
    code, printed, _ = _cli("--checkpoint", str(tmp_path / "run"), str(image), str(tmp_path / "out"), "--size", "32",
                            "--workers", "1")
    assert code == 0 and "0 skipped" in printed
    with h5py.File(tmp_path / "out" / "predictions.h5") as f:
        assert list(f.attrs["class_names"]) == ["cat", "bg", "edge"]
        assert f.attrs["checkpoint"] == str((folder / "model_checkpoint_2.pt").resolve())
        plain = _plain_probs(folder / "model_checkpoint_2.pt", image, 32, mean=0.5, std=0.25)
        np.testing.assert_allclose(f["Abyssinian_142.jpg"][()], plain, atol=1e-4)


def test_the_tutorial_inference_config_is_read_unchanged(tree, tmp_path, ray_local):
    shutil.copyfile(TUTORIAL, tmp_path / "config_pets_inference.json")
    shutil.copyfile(REFERENCE_NETWORK, tmp_path / "network_xception2D.json")
    (tmp_path / "model_pets_segmentation").mkdir()
    shutil.copyfile(tree / "model_checkpoint_1.pt", tmp_path / "model_pets_segmentation" / "model_checkpoint_30.pt")
    (tmp_path / "samples").mkdir()
    for name in ("Abyssinian_142.jpg", "rgba.png"):
        shutil.copyfile(tree / "in" / name, tmp_path / "samples" / name)
    settings = inference_settings(tmp_path / "config_pets_inference.json")
    assert settings == {"network": None, "checkpoint": tmp_path / "model_pets_segmentation/model_checkpoint_30.pt",
                        "input": tmp_path / "samples", "output": tmp_path / "predictions", "batch_size": 16,
                        "normalize": (0.0, 0.003921568), "size": (160, 160)}
    code, printed, _ = _cli("--config", str(tmp_path / "config_pets_inference.json"), "--size", "32", "--workers", "1")
    assert code == 0 and "predicted 2 image(s)" in printed
    arrays = _arrays(tmp_path / "predictions" / "output_1.h5")
    assert sorted(arrays) == ["Abyssinian_142.jpg", "rgba.png"] and arrays["rgba.png"].shape == (3, 32, 32)


@pytest.mark.parametrize(("change", "message"), [
    ({"neural_network.data.shuffle": True}, "unsupported key neural_network.data.shuffle"),
    ({"neural_network.checkpoints.save": "x"}, "unsupported key neural_network.checkpoints.save"),
    ({"neural_network.data.hdf5_precision": "double"}, "hdf5_precision must be \"single\" or \"half\""),
    ({"neural_network.data.transforms": [{"random_horizontal_flip": True}]},
     "transform 'random_horizontal_flip' is not supported for inference"),
])
def test_config_keys_it_cannot_honour_are_named(tmp_path, change, message):
    config = json.loads(TUTORIAL.read_text())
    (dotted, value), = change.items()
    *parents, last = dotted.split(".")
    section = config
    for key in parents:
        section = section[key]
    section[last] = value
    shutil.copyfile(REFERENCE_NETWORK, tmp_path / "network_xception2D.json")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        inference_settings(tmp_path / "config.json")


def test_user_mistakes_end_in_one_clear_message(tree, tmp_path):
    ckpt = str(tree / "model_checkpoint_1.pt")
    wrong = _checkpoint(tmp_path / "five_classes.pt", num_classes=5)
    state = torch.load(wrong, weights_only=True)
    state["up1.residual.weight"] = torch.zeros(7, 7, 1, 1)
    torch.save(state, wrong)
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    cases = [
        ((str(wrong), str(tree / "in"), str(tmp_path / "o1")), "five_classes.pt: the weights do not fit"),
        ((ckpt, str(tmp_path / "empty"), str(tmp_path / "o2")), "empty: no image files found"),
        ((ckpt, str(tmp_path / "texts"), str(tmp_path / "o3")), "1 other file(s) ignored"),
        ((ckpt, str(tmp_path / "nope"), str(tmp_path / "o4")), "nope: input does not exist"),
        ((str(tmp_path / "none.pt"), str(tree / "in"), str(tmp_path / "o5")), "none.pt: checkpoint does not exist"),
    ]
    for (checkpoint, source, out), message in cases:
        code, _, err = _cli("--checkpoint", checkpoint, source, out, "--size", "32")
        assert code == 2 and err.count("\n") == 1 and err.startswith("raypets: error: ") and message in err, err
        assert not Path(out).exists()
    code, _, err = _cli("--checkpoint", ckpt, str(tree / "in"), str(tmp_path / "o6"), "--size", "40")
    assert code == 2 and "height 40 is not a multiple of 16" in err
    code, _, err = _cli(str(tree / "in"))
    assert code == 2 and "needs CHECKPOINT, OUTPUT" in err


def test_file_lists_and_png_names(tmp_path):
    for name in ("a/x.jpg", "a/x.png", "b/y.jpg", "b/.z.jpg"):
        save_image(tmp_path / "data" / name, np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "data" / "b" / "notes.txt").write_text("x")
    listing = tmp_path / "data" / "list.txt"
    listing.write_text("# inputs\na/x.jpg\nb/y.jpg\n\nb/notes.txt\na/x.jpg\n" + str(tmp_path / "data" / "a/x.png"))
    inputs = list_inputs(listing)
    assert inputs.names == ["a/x.jpg", "a/x.png", "b/y.jpg"] and inputs.ignored == 1
    assert list_inputs(tmp_path / "data").names == ["a/x.jpg", "a/x.png", "b/y.jpg"]
    assert list_inputs(tmp_path / "data" / "b" / "y.jpg").names == ["y.jpg"]
    assert png_names(["a/x.jpg", "a/x.png", "b/y.jpg"]) == ["a/x.jpg.png", "a/x.png.png", "b/y.png"]

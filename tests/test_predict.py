"""``raypets predict`` on real Ray: a tree of mixed images and hostile files -> sharded HDF5 softmax that the rmldnn
tutorial's code reads, masks and overlays at the original size, every bad file listed."""

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
from helpers import HOSTILE, ROTATED_STORED, hostile_corpus, save_image
from PIL import Image
from torch.nn import functional

from raypets.checkpoints import RAY_RUN_NAME, save_state
from raypets.cli import main
from raypets.data.sources import list_inputs
from raypets.errors import UserError
from raypets.keras_json import REFERENCE_NETWORK
from raypets.model import XceptionUNet
from raypets.rmldnn import inference_settings
from raypets.show import dataset_names
from raypets.stages.predict import png_names

SIZE = 64
TUTORIAL = Path(__file__).parent / "data" / "config_pets_inference.json"
# name -> (height, width, format, mode): the real archive's kinds of files, a sub-folder, one 3x the network size
IMAGES = {
    "Abyssinian_142.jpg": (40, 56, "JPEG", "RGB"),
    "gif_named.jpg": (33, 47, "GIF", "P"),
    "rgba.png": (50, 30, "PNG", "RGBA"),
    "gray.jpg": (45, 45, "JPEG", "L"),
    "dogs/beagle_1.png": (64, 80, "PNG", "RGB"),
    "dogs/small.bmp": (20, 24, "BMP", "RGB"),
    "big.png": (150, 200, "PNG", "RGB"),
}
TRUNCATED = "dogs/truncated.jpg"
# Every file predict must write, by name (bytes: not all are UTF-8), with its original size as a viewer shows it.
PREDICTED = {**{name.encode(): shape[:2] for name, shape in IMAGES.items()},
             b"depth16.png": (30, 40), b"rotated.jpg": ROTATED_STORED[::-1], b"caf\xe9.jpg": (36, 28)}
SKIPPED = {TRUNCATED.encode(): "truncated image data", **{n: r for n, r in HOSTILE.items() if r}}


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


def _arrays(path: Path) -> dict[bytes, np.ndarray]:
    """Every prediction a file holds (through predictions.h5's links), by name."""
    with h5py.File(path) as f:
        return {name: f[name][()] for name in dataset_names(f)}


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
    hostile_corpus(root / "in")
    _checkpoint(root / "model_checkpoint_1.pt")
    return root


@pytest.fixture(scope="module")
def predicted(tree, ray_local) -> tuple[Path, int, str, str]:
    """Predicted in batches of 4 by 2 writers: two HDF5 files."""
    out = tree / "predictions"
    code, printed, err = _cli("--checkpoint", str(tree / "model_checkpoint_1.pt"), str(tree / "in"), str(out),
                              "--size", str(SIZE), "--batch-size", "4", "--masks", "--overlays", "--writers", "2")
    return out, code, printed, err


def _plain_probs(weights: Path, image: Path, size: int = SIZE, mean: float = 0.0, std: float = 1 / 255) -> np.ndarray:
    """The reference: PIL to RGB, bilinear resize, one plain forward of the state_dict, softmax."""
    model = XceptionUNet()
    model.load_state_dict(torch.load(weights, weights_only=True))
    pixels = np.array(Image.open(image).convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    x = (torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255 - mean) / std
    with torch.no_grad():
        return torch.softmax(model.eval()(x), dim=1)[0].numpy()


def test_each_readable_image_is_one_dataset_and_each_bad_file_a_listed_skip(predicted, tree):
    out, code, printed, err = predicted
    assert code == 1 and "Traceback" not in printed + err  # files skipped, no traceback
    assert sorted(os.listdir(out)) == ["_SUCCESS", "errors.csv", "masks", "output_1.h5", "output_2.h5", "overlays",
                                       "predictions.h5", "repairs.csv"]
    assert not list(tree.glob(".predictions*"))  # no staging folder left behind
    shards = [_arrays(out / f"output_{k}.h5") for k in (1, 2)]
    assert shards[0] and shards[1] and not shards[0].keys() & shards[1].keys()
    arrays = _arrays(out / "predictions.h5")  # the single entry point finds every prediction by its name
    assert sorted(arrays) == sorted(PREDICTED) == sorted([*shards[0], *shards[1]])
    assert all(np.array_equal(arrays[name], {**shards[0], **shards[1]}[name]) for name in arrays)
    for probs in arrays.values():
        assert probs.shape == (3, SIZE, SIZE) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    with h5py.File(out / "predictions.h5") as f:
        assert list(f.attrs["class_names"]) == ["pet", "background", "border"]
        assert list(f.attrs["network_size"]) == [SIZE, SIZE] and f.attrs["precision"] == "single"
        assert f.attrs["checkpoint"] == str((tree / "model_checkpoint_1.pt").resolve())
        for name, size in PREDICTED.items():
            assert tuple(f[name].attrs["original_size"]) == size, name
        assert f["rotated.jpg"].attrs["repair"] == "EXIF orientation 6 applied"
    with open(out / "errors.csv", "rb") as f:  # names with their own bytes
        rows = list(csv.reader(io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape")))
    assert rows[0] == ["file", "reason", "detail"]
    assert {os.fsencode(row[0]): row[1] for row in rows[1:]} == SKIPPED
    assert "predicted 10 image(s)" in printed and "7 skipped" in printed and "(2 hdf5 file(s))" in printed
    for reason in set(SKIPPED.values()):
        assert reason in printed
    assert "ignored 2 hidden or non-image file(s)" in printed and "repaired 5 image(s)" in printed


def test_probabilities_match_a_plain_forward(predicted, tree):
    arrays = _arrays(predicted[0] / "predictions.h5")
    for name in IMAGES:
        plain = _plain_probs(tree / "model_checkpoint_1.pt", tree / "in" / name)
        np.testing.assert_allclose(arrays[name.encode()], plain, atol=1e-4)
        assert (arrays[name.encode()].argmax(0) == plain.argmax(0)).mean() > 0.999
    assert len(np.unique(arrays[b"Abyssinian_142.jpg"].argmax(0))) > 1  # a real check: not one class everywhere


def test_16_bit_images_are_scaled_by_their_range_and_exif_is_applied(predicted, tree):
    arrays = _arrays(predicted[0] / "predictions.h5")
    depth = np.asarray(Image.open(tree / "in" / "depth16.png"), np.float32)
    grey = np.rint((depth - 1000) * (255 / 59000)).astype(np.uint8)  # 1000 -> 0, 60000 -> 255: not clipped white
    save_image(tree / "depth8.png", np.stack([grey] * 3, -1))
    np.testing.assert_allclose(arrays[b"depth16.png"], _plain_probs(tree / "model_checkpoint_1.pt",
                                                                    tree / "depth8.png"), atol=1e-4)
    upright = Image.open(tree / "in" / "rotated.jpg").transpose(Image.Transpose.ROTATE_270)  # orientation 6
    upright.save(tree / "upright.png")
    np.testing.assert_allclose(arrays[b"rotated.jpg"], _plain_probs(tree / "model_checkpoint_1.pt",
                                                                    tree / "upright.png"), atol=1e-4)
    repairs = (predicted[0] / "repairs.csv").read_text()
    assert "depth16.png,I;16 scaled to 8 bits (range 1000..60000); L converted to RGB" in repairs


def test_masks_are_the_probabilities_resized_bilinearly_then_the_argmax(predicted):
    out = predicted[0]
    arrays = _arrays(out / "predictions.h5")
    for name, (height, width) in PREDICTED.items():
        png = os.fsdecode(png_names([name])[0])
        mask = np.asarray(Image.open(out / "masks" / png))
        probs = torch.from_numpy(arrays[name])[None]
        smooth = functional.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)
        np.testing.assert_array_equal(mask, smooth[0].argmax(0).numpy())
        overlay = Image.open(out / "overlays" / png)
        assert overlay.size == (width, height) and overlay.mode == "RGB"
    big = np.asarray(Image.open(out / "masks" / "big.png"))
    blocky = functional.interpolate(torch.from_numpy(arrays[b"big.png"].argmax(0))[None, None].float(),
                                    size=big.shape, mode="nearest")[0, 0].numpy()
    assert 0 < (big != blocky).mean() < 0.5  # the old way: the argmax enlarged nearest, in 3x3 blocks


def test_the_tutorial_reading_code_runs_verbatim_on_each_file(predicted):
    snippet = """
import h5py as h5
import matplotlib.pyplot as plt

file = h5.File('./predictions/output_{k}.h5', 'r')
pred = file['{name}'][()].transpose(1,2,0).argmax(2)
plt.imshow(pred, interpolation='nearest', cmap='gray')
plt.show()
print(pred.shape)
"""
    with h5py.File(predicted[0] / "output_2.h5") as second:
        name = next(key for key in second if isinstance(key, str) and key.endswith(".png"))
    for k, key in ((1, "Abyssinian_142.jpg"), (2, name)):
        done = subprocess.run([sys.executable, "-c", snippet.format(k=k, name=key)], cwd=predicted[0].parent,
                              capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg"}, check=True)
        assert done.stdout.strip() == f"({SIZE}, {SIZE})"


def test_show_draws_the_hostile_names_at_their_original_size(predicted, tree):
    grid = tree / "grid.png"
    assert main(["show", str(predicted[0]), "--images", str(tree / "in"), "--rows", "20", "--out", str(grid)]) == 0
    assert Image.open(grid).size == (3 * 260, len(PREDICTED) * 260)  # input, overlay, prediction


def test_rerun_gives_identical_arrays_and_half_precision_halves_the_file(predicted, tree):
    out = predicted[0]
    first = _arrays(out / "predictions.h5")
    ckpt = str(tree / "model_checkpoint_1.pt")
    code, _, err = _cli("--checkpoint", ckpt, str(tree / "in"), str(out), "--size", str(SIZE))
    assert code == 2 and err.strip() == f"raypets: error: {out}: exists and is not empty; pass --overwrite to " \
                                        "replace the prediction output there"
    assert _cli("--checkpoint", ckpt, str(tree / "in"), str(out), "--size", str(SIZE), "--batch-size", "4",
                "--overwrite")[0] == 1
    again = _arrays(out / "output_1.h5")  # one writer: one file
    assert again.keys() == first.keys() and all(np.array_equal(again[k], first[k]) for k in first)
    assert not (out / "masks").exists()  # replaced, not merged

    half = tree / "half"
    assert _cli("--checkpoint", ckpt, str(tree / "in"), str(half), "--size", str(SIZE), "--hdf5-precision", "half",
                "--workers", "1")[0] == 1
    halved = _arrays(half / "output_1.h5")
    assert all(halved[k].dtype == np.float16 and np.allclose(halved[k], first[k], atol=1e-3) for k in first)
    ratio = (half / "output_1.h5").stat().st_size / (out / "output_1.h5").stat().st_size
    assert 0.45 < ratio < 0.56, ratio


def test_png_format_writes_class_id_masks_only(tree, tmp_path, ray_local):
    out = tmp_path / "png"
    code, printed, _ = _cli("--checkpoint", str(tree / "model_checkpoint_1.pt"), str(tree / "in" / "dogs"), str(out),
                            "--size", str(SIZE), "--format", "png", "--workers", "1")
    assert code == 1 and "predicted 2 image(s)" in printed
    assert sorted(os.listdir(out)) == ["_SUCCESS", "errors.csv", "masks"]
    for name in ("beagle_1", "small"):
        height, width = IMAGES[f"dogs/{name}.{'png' if name == 'beagle_1' else 'bmp'}"][:2]
        assert np.asarray(Image.open(out / "masks" / f"{name}.png")).shape == (height, width)


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
    assert sorted(arrays) == [b"Abyssinian_142.jpg", b"rgba.png"] and arrays[b"rgba.png"].shape == (3, 32, 32)


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
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(f"{tree / 'in' / 'gray.jpg'}\ns3://bucket/a.jpg\n")
    for flags, message in [(("--format", "png", "--probabilities"), "--probabilities needs --format parquet"),
                           (("--cpu", "--precision", "fp16"), "--precision fp16 needs a GPU"),
                           (("--max-pixels", "0"), "--max-pixels and --max-file-mb must be positive")]:
        code, _, err = _cli("--checkpoint", ckpt, str(tree / "in"), str(tmp_path / "o7"), *flags)
        assert code == 2 and message in err, err
    code, _, err = _cli("--checkpoint", ckpt, str(mixed), str(tmp_path / "o8"))
    assert code == 2 and "an input list names files of 2 filesystems (local files, s3://bucket)" in err


def test_file_lists_and_png_names(tmp_path):
    for name in ("a/x.jpg", "a/x.png", "b/y.jpg", "b/.z.jpg"):
        save_image(tmp_path / "data" / name, np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "data" / "b" / "notes.txt").write_text("x")
    listing = tmp_path / "data" / "list.txt"
    listing.write_text("# inputs\na/x.jpg\nb/y.jpg\n\nb/notes.txt\na/x.jpg\n" + str(tmp_path / "data" / "a/x.png"))
    (tmp_path / "data" / "list.csv").write_text("id,path\n1,a/x.jpg\n2,b/y.jpg\n")
    (tmp_path / "data" / "bare.csv").write_text("b/y.jpg,cat\n")

    def names(source: Path) -> list[bytes]:
        return [s.name for s in list_inputs(source).sources]

    assert names(listing) == [b"a/x.jpg", b"a/x.png", b"b/y.jpg"] and list_inputs(listing).ignored == 1
    assert names(tmp_path / "data") == [b"a/x.jpg", b"a/x.png", b"b/y.jpg"]
    assert names(tmp_path / "data" / "b" / "y.jpg") == [b"y.jpg"]
    assert names(tmp_path / "data" / "list.csv") == [b"a/x.jpg", b"b/y.jpg"]
    assert names(tmp_path / "data" / "bare.csv") == [b"y.jpg"]
    assert png_names([b"a/x.jpg", b"a/x.png", b"b/y.jpg", b"caf\xe9.jpg"]) == [
        b"a/x.jpg.png", b"a/x.png.png", b"b/y.png", b"caf\xe9.png"]

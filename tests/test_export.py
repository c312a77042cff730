"""``raypets export``: the ONNX file in onnxruntime and the TorchScript file give ``raypets predict``'s softmax."""

from __future__ import annotations

import contextlib
import io
import json
from importlib.metadata import version
from pathlib import Path

import h5py
import numpy as np
import onnxruntime
import pytest
import torch
from helpers import ray_checkpoint_folder, save_image, state_dict_file

import raypets
from raypets.checkpoints import STATE_FILE
from raypets.cli import main
from raypets.data.decode import decode_image, resize_image
from raypets.redaction import redact

# TorchScript is deprecated since torch 2.9 and says so at each load; it still loads and runs (the test's point).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
SIZE = 32
# name -> (height, width, mode): two images of other sizes than the network's, one of them RGBA (repaired to RGB)
IMAGES = {"cat.jpg": (40, 56, "RGB"), "dog.png": (50, 30, "RGBA")}
SECRET = "s3://KEY:SECRET@bucket/run?endpoint_override=127.0.0.1:9000"


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def _pixels(path: Path) -> np.ndarray:
    """The network-size uint8 RGB pixels raypets predict feeds its model."""
    return resize_image(decode_image(path.read_bytes(), path.name).pixels, (SIZE, SIZE))


def _runners(folder: Path) -> dict:
    """Each exported file loaded once, as a function of uint8 (N, H, W, 3) images."""
    session = onnxruntime.InferenceSession(folder / "model.onnx", providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(folder / "model.ts")

    def torchscript(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return scripted(torch.from_numpy(images)).numpy()

    return {"onnx": lambda images: session.run(["probs"], {"image": images})[0], "torchscript": torchscript}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A Ray checkpoint (the default recipe's network, with U-Net skips; normalisation 0.5/0.25, classes from its
    data's manifest, a run folder at a URI with keys) exported at 32 px in both formats; the root holds ``ckpt``,
    ``in`` (two images) and ``out``."""
    root = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    for name, (height, width, mode) in IMAGES.items():
        save_image(root / "in" / name, rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode=mode)
    (root / "shards").mkdir()
    (root / "shards" / "manifest.json").write_text(json.dumps({"classes": ["cat", "bg", "edge"]}))
    config = {"normalize_mean": 0.5, "normalize_std": 0.25, "data": str(root / "shards"), "run_dir": SECRET}
    ray_checkpoint_folder(root / "ckpt", epoch=2, seed=0, config=config, skips=True)
    state = torch.load(root / "ckpt" / STATE_FILE, weights_only=True)
    torch.save({**state, "config": config}, root / "ckpt" / STATE_FILE)  # keys kept, as older raypets saved them
    code, printed, _ = _cli("export", "--checkpoint", str(root / "ckpt"), str(root / "out"), "--size", str(SIZE))
    assert code == 0, printed
    assert "model.onnx" in printed and "(cat, bg, edge)" in printed
    return root


def test_onnx_and_torchscript_give_predicts_softmax(exported, tmp_path, ray_local):
    code, _, _ = _cli("predict", "--checkpoint", str(exported / "ckpt"), str(exported / "in"), str(tmp_path / "pred"),
                      "--size", str(SIZE), "--workers", "1", "--no-progress")
    assert code == 0
    with h5py.File(tmp_path / "pred" / "predictions.h5") as f:
        predicted = np.stack([f[name][()] for name in IMAGES])
    images = np.stack([_pixels(exported / "in" / name) for name in IMAGES])
    for run in _runners(exported / "out").values():
        probs = run(images)
        assert probs.shape == predicted.shape == (2, 3, SIZE, SIZE) and probs.dtype == np.float32
        assert np.abs(probs - predicted).max() <= 1e-3
    assert predicted.min() > 0.05 and predicted.max() < 0.95  # a real check: the softmax is nowhere saturated


def test_the_batch_is_dynamic_and_the_shapes_declared(exported):
    images = np.random.default_rng(1).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    for run in _runners(exported / "out").values():
        three = run(images)
        one = [run(images[i: i + 1]) for i in range(3)]
        assert three.shape == (3, 3, SIZE, SIZE) and one[0].shape == (1, 3, SIZE, SIZE)
        np.testing.assert_allclose(three, np.concatenate(one), atol=1e-5)
        np.testing.assert_allclose(three.sum(axis=1), 1.0, atol=1e-5)
    session = onnxruntime.InferenceSession(exported / "out" / "model.onnx", providers=["CPUExecutionProvider"])
    (image,), (probs,) = session.get_inputs(), session.get_outputs()
    assert (image.name, image.type, image.shape) == ("image", "tensor(uint8)", ["batch", SIZE, SIZE, 3])
    assert (probs.name, probs.type, probs.shape) == ("probs", "tensor(float)", ["batch", 3, SIZE, SIZE])


def test_model_json_says_what_the_files_hold_and_keeps_no_secret(exported):
    assert sorted(p.name for p in (exported / "out").iterdir()) == ["model.json", "model.onnx", "model.ts"]
    text = (exported / "out" / "model.json").read_text()
    info = json.loads(text)
    assert info["files"] == {"onnx": "model.onnx", "torchscript": "model.ts"}
    assert info["classes"] == ["cat", "bg", "edge"] and info["size"] == [SIZE, SIZE]
    assert info["input"]["shape"] == ["batch", SIZE, SIZE, 3] and info["output"]["shape"] == ["batch", 3, SIZE, SIZE]
    assert (info["normalize"]["mean"], info["normalize"]["std"]) == (0.5, 0.25)
    assert info["checkpoint"] == str((exported / "ckpt" / "model_checkpoint_2.pt").resolve()) and info["epoch"] == 2
    assert info["training"]["data"] == str(exported / "shards") and info["training"]["run_dir"] == redact(SECRET)
    assert "SECRET" not in text and "KEY" not in text
    contract = {key: info[key] for key in ("classes", "size", "normalize")}
    session = onnxruntime.InferenceSession(exported / "out" / "model.onnx", providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["raypets"]) == contract
    files = {"model.json": ""}
    torch.jit.load(exported / "out" / "model.ts", _extra_files=files)
    assert json.loads(files["model.json"]) == contract


def test_one_format_from_a_plain_state_dict_and_the_output_rules(tmp_path):
    state_dict_file(tmp_path / "model_checkpoint_1.pt", seed=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.json").write_text("{}")  # an earlier export's
    args = ("export", "--checkpoint", str(tmp_path / "model_checkpoint_1.pt"), str(out), "--size", str(SIZE),
            "--format", "torchscript")
    code, _, err = _cli(*args)
    assert code == 2 and err == f"raypets: error: {out}: exists and is not empty; pass --overwrite to replace the " \
                                "model export there\n"
    code, _, _ = _cli(*args, "--overwrite")
    assert code == 0 and sorted(p.name for p in out.iterdir()) == ["model.json", "model.ts"]
    info = json.loads((out / "model.json").read_text())
    assert info["files"] == {"torchscript": "model.ts"} and info["classes"] == ["pet", "background", "border"]
    assert (info["normalize"]["mean"], info["normalize"]["std"], info["training"]) == (0.0, 1 / 255, None)
    images = np.random.default_rng(2).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    with torch.no_grad():
        assert torch.jit.load(out / "model.ts")(torch.from_numpy(images)).shape == (2, 3, SIZE, SIZE)

    (out / "notes.txt").write_text("mine")
    for extra, message in [
        (("--overwrite",), f"{out}: --overwrite only replaces a model export"),
        (("--size", "40"), "--size: XceptionUNet input height 40 is not a multiple of 16"),
    ]:
        code, _, err = _cli(*args, *extra)
        assert code == 2 and err.startswith(f"raypets: error: {message}") and err.count("\n") == 1, err
    code, _, err = _cli("export", "--checkpoint", str(tmp_path / "missing.pt"), str(tmp_path / "new"))
    assert code == 2 and err == f"raypets: error: {tmp_path / 'missing.pt'}: checkpoint does not exist\n"


def test_version_and_the_stage_functions_at_the_top_level():
    with pytest.raises(SystemExit) as exited, contextlib.redirect_stdout(io.StringIO()) as printed:
        main(["--version"])
    assert exited.value.code == 0 and printed.getvalue() == f"raypets {version('raypets')}\n"
    assert raypets.__version__ == version("raypets")
    from raypets.exporter import export
    from raypets.stages.predict import predict
    from raypets.stages.train import train

    assert (raypets.export, raypets.predict, raypets.train) == (export, predict, train)
    assert {"prepare", "train", "tune", "evaluate", "predict", "export"} <= set(raypets.__all__) <= set(dir(raypets))
    with pytest.raises(AttributeError, match="no attribute 'serve'"):
        raypets.serve  # noqa: B018

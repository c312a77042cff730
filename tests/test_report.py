"""The tutorial's input | prediction | ground-truth figure from a predictions folder. No Ray."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from helpers import random_pair, save_image
from PIL import Image

from raypets.cli import main
from raypets.outputs import DONE


def _predictions(folder, names, rng):
    """A predictions.h5 as raypets predict lays it out: one (C, H, W) softmax per relative path."""
    folder.mkdir(parents=True)
    with h5py.File(folder / "predictions.h5", "w") as file:
        for name in names:
            logits = rng.normal(size=(3, 32, 32))
            file[name] = (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float32)
    (folder / DONE).touch()


def test_show_draws_a_row_per_sample_with_input_prediction_and_truth(tmp_path):
    rng = np.random.default_rng(0)
    names = ["b.jpg", "a.jpg", "cats/c.png"]
    for name in names:
        image, mask = random_pair(rng)
        save_image(tmp_path / "images" / name, image)
        save_image((tmp_path / "masks" / name).with_suffix(".png"), mask - 1)
    _predictions(tmp_path / "out", names, rng)
    grid = tmp_path / "grid.png"
    assert main(["show", str(tmp_path / "out"), "--images", str(tmp_path / "images"),
                 "--truth", str(tmp_path / "masks"), "--rows", "2", "--out", str(grid)]) == 0
    width, height = Image.open(grid).size
    assert (width, height) == (4 * 260, 2 * 260)  # input, overlay, prediction, truth; 2 rows of 2.6 in at 100 dpi
    only_predictions = tmp_path / "pred.png"
    assert main(["show", str(tmp_path / "out"), "--out", str(only_predictions)]) == 0
    assert Image.open(only_predictions).size == (260, 3 * 260)
    assert main(["show", str(tmp_path / "out"), "--out", str(grid)]) == 2  # never replaced unasked
    assert Image.open(grid).size == (4 * 260, 2 * 260)
    assert main(["show", str(tmp_path / "out"), "--out", str(grid), "--overwrite"]) == 0
    assert Image.open(grid).size == (260, 3 * 260)


def test_show_names_what_is_missing(tmp_path, capsys):
    assert main(["show", str(tmp_path), "--out", str(tmp_path / "g.png")]) == 2
    assert "no predictions.h5" in capsys.readouterr().err
    _predictions(tmp_path / "out", ["a.jpg"], np.random.default_rng(1))
    assert main(["show", str(tmp_path / "out"), "--truth", str(tmp_path), "--out", str(tmp_path / "g.png")]) == 2
    assert "no ground-truth mask for a.jpg" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()
    (tmp_path / "out" / DONE).unlink()  # as a predict that died, or an output still being copied into place
    assert main(["show", str(tmp_path / "out"), "--out", str(tmp_path / "g.png")]) == 2
    assert "no _SUCCESS: raypets predict did not finish writing it" in capsys.readouterr().err


@pytest.mark.parametrize("rows", [0, -1])
def test_show_needs_at_least_one_row(tmp_path, rows, capsys):
    _predictions(tmp_path / "out", ["a.jpg"], np.random.default_rng(2))
    assert main(["show", str(tmp_path / "out"), "--rows", str(rows), "--out", str(tmp_path / "g.png")]) == 2
    assert "--rows" in capsys.readouterr().err

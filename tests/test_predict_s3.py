"""``raypets predict`` with its input and output in an object store (a moto S3 server): read by the tasks from a
prefix or a list, written by them as Parquet at a URI or as sharded HDF5."""

from __future__ import annotations

import contextlib
import csv
import io

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import save_image
from PIL import Image
from test_storage import bucket  # noqa: F401 - the moto server fixture

from raypets import storage
from raypets.cli import main
from raypets.model import XceptionUNet
from raypets.show import dataset_names

# name under the prefix -> (height, width)
PHOTOS = {"a.jpg": (40, 56), "b.png": (33, 47), "dogs/c.jpg": (64, 48), "dogs/d.png": (20, 24)}


@pytest.fixture(scope="module")
def photos(bucket, tmp_path_factory):  # noqa: F811
    """The photos (and one empty file) under ``in/photos/`` in the bucket, a list of them beside, a checkpoint."""
    root = tmp_path_factory.mktemp("s3predict")
    rng = np.random.default_rng(1)
    for name, size in PHOTOS.items():
        save_image(root / "photos" / name, rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    (root / "photos" / "empty.jpg").write_bytes(b"")
    storage.upload(root / "photos", bucket.uri("in/photos"))
    storage.write_text(bucket.uri("in/list.csv"), "path,label\n" + "".join(f"photos/{n},x\n" for n in PHOTOS))
    torch.manual_seed(0)
    torch.save(XceptionUNet().state_dict(), root / "model.pt")
    return root


def _predict(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["predict", *args, "--size", "32", "--no-progress"])
    return code, out.getvalue()


def test_a_prefix_predicts_into_parquet_at_a_uri(bucket, photos, ray_local):  # noqa: F811
    out = bucket.uri("out/parquet")
    code, printed = _predict("--checkpoint", str(photos / "model.pt"), bucket.uri("in/photos/"), out,
                             "--format", "parquet", "--probabilities", "--batch-size", "2")
    assert code == 1 and "predicted 4 image(s)" in printed and "skipped 1: empty file" in printed
    assert storage.entries(out) == {"predictions", "errors.csv", "_SUCCESS"}
    fs, path = storage.filesystem(storage.join(out, "predictions"))
    table = pq.read_table(path, filesystem=fs)
    assert sorted(table["name"].to_pylist()) == sorted(PHOTOS)  # every image once, named relative to the prefix
    for row in table.to_pylist():
        mask = np.asarray(Image.open(io.BytesIO(row["mask"])))
        assert mask.shape == PHOTOS[row["name"]] == (row["height"], row["width"]) and mask.max() <= 2
        assert np.asarray(row["probs"]).shape == (3, 32, 32)
    errors = list(csv.reader(io.StringIO(storage.read_text(storage.join(out, "errors.csv")))))
    assert errors == [["file", "reason", "detail"], ["empty.jpg", "empty file", ""]]


def test_a_list_at_a_uri_predicts_into_local_hdf5_shards(bucket, photos, tmp_path, ray_local):  # noqa: F811
    out = tmp_path / "h5"
    code, printed = _predict("--checkpoint", str(photos / "model.pt"), bucket.uri("in/list.csv"), str(out),
                             "--writers", "2", "--batch-size", "1")
    assert code == 0 and "(2 hdf5 file(s))" in printed
    with h5py.File(out / "output_1.h5") as first, h5py.File(out / "output_2.h5") as second:
        names = [*dataset_names(first), *dataset_names(second)]
        assert sorted(names) == sorted(n.encode() for n in PHOTOS)  # every image once
        name = dataset_names(second)[0].decode()
        pred = second[name][()].transpose(1, 2, 0).argmax(2)  # rmldnn's reading snippet
        assert pred.shape == (32, 32)

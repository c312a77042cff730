"""``raypets prepare`` on real Ray with real files: layouts, the archive's defects, splits, accounting, round trip."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import ROTATED_STORED, hostile_corpus, random_pair, save_image

from raypets.cli import main
from raypets.data.decode import decode_image, decode_mask, resize_image, resize_mask
from raypets.data.sources import display_name
from raypets.data.synth import synthesize
from raypets.errors import UserError
from raypets.stages import prepare as prepare_module
from raypets.stages.prepare import PrepareConfig, hash_split, prepare
from raypets.stages.shards import load_split, read_manifest

SIZE = (32, 32)


def add_defects(src: Path) -> dict[str, str]:
    """Add the Oxford archive's kinds of bad files to an oxford-layout folder; file -> expected skip reason
    (None: repaired and used)."""
    rng = np.random.default_rng(7)
    images, trimaps = src / "images", src / "annotations" / "trimaps"
    expected: dict[str, str | None] = {}

    def pair(stem: str, fmt: str, mode: str | None = None, suffix: str = ".jpg", trimap=None):
        image, trimap_ = random_pair(rng)
        save_image(images / f"{stem}{suffix}", image, fmt, mode)
        save_image(trimaps / f"{stem}.png", trimap_ if trimap is None else trimap)

    (images / "Abyssinian_100.mat").write_bytes(b"MATLAB 5.0 MAT-file\x00" * 8)
    expected["images/Abyssinian_100.mat"] = "not an image file"
    for stem, fmt, mode in (("Egyptian_Mau_139", "GIF", "P"), ("Egyptian_Mau_14", "PNG", "RGBA"),
                            ("beagle_gray", "JPEG", "L"), ("beagle_cmyk", "JPEG", "CMYK")):
        pair(stem, fmt, mode)
        expected[f"images/{stem}.jpg"] = expected[f"annotations/trimaps/{stem}.png"] = None
    pair("beagle_116", "JPEG")
    data = (images / "beagle_116.jpg").read_bytes()
    (images / "beagle_116.jpg").write_bytes(data[: len(data) // 2])
    expected["images/beagle_116.jpg"] = "truncated image data"
    expected["annotations/trimaps/beagle_116.png"] = "partner skipped"
    pair("pug_empty", "JPEG")
    (images / "pug_empty.jpg").write_bytes(b"")
    expected["images/pug_empty.jpg"] = "empty file"
    expected["annotations/trimaps/pug_empty.png"] = "partner skipped"
    save_image(images / "boxer_nomask.jpg", random_pair(rng)[0])
    expected["images/boxer_nomask.jpg"] = "image without mask"
    save_image(trimaps / "boxer_noimage.png", random_pair(rng)[1])
    expected["annotations/trimaps/boxer_noimage.png"] = "mask without image"
    pair("pug_size", "JPEG", trimap=random_pair(rng, 20, 20)[1])
    expected["annotations/trimaps/pug_size.png"] = "mask size differs from image"
    expected["images/pug_size.jpg"] = "partner skipped"
    pair("pug_values", "JPEG", trimap=random_pair(rng, values=(0, 2, 7))[1])
    expected["annotations/trimaps/pug_values.png"] = "mask values out of range"
    expected["images/pug_values.jpg"] = "partner skipped"
    (trimaps / "._Abyssinian_1.png").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)
    expected["annotations/trimaps/._Abyssinian_1.png"] = "AppleDouble metadata file"
    return expected


@pytest.fixture(scope="module")
def oxford(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("oxford") / "pets"
    synthesize(src, n=24, size=(48, 40), seed=3)
    return src


@pytest.fixture(scope="module")
def defective(tmp_path_factory, ray_local) -> tuple[Path, Path, dict]:
    """An oxford folder with every defect, prepared once (with an rmldnn export) in tasks of 6 pairs, as a large set
    is: each split's rows are spread over several tasks, some with a skipped pair among them."""
    root = tmp_path_factory.mktemp("defective")
    src = root / "pets"
    synthesize(src, n=24, size=(48, 40), seed=3)
    expected = add_defects(src)
    out = root / "shards"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prepare_module, "PAIRS_PER_TASK", 6)
        prepare(PrepareConfig(src, out, size=SIZE, test_fraction=0.25, export_rmldnn=root / "rmldnn"))
    assert len(list((out / "train").glob("*.parquet"))) >= 4
    return src, out, expected


def files_under(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*") if p.is_file()]


def test_every_file_is_counted_once(defective):
    src, out, _ = defective
    manifest = read_manifest(out)
    on_disk = files_under(src / "images", src / "annotations" / "trimaps")
    skipped = [s["file"] for s in manifest["skipped"]]
    assert len(skipped) == len(set(skipped))
    assert manifest["files"]["candidates"] == len(on_disk)
    used = 2 * (manifest["counts"]["train"] + manifest["counts"]["test"])
    assert manifest["files"]["used"] == used
    assert used + len(skipped) == len(on_disk)
    names = set(load_split(out, "train")["name"]) | set(load_split(out, "test")["name"])
    used_files = {f"images/{n}" for n in names} | {f"annotations/trimaps/{n.rsplit('.', 1)[0]}.png" for n in names}
    assert used_files.isdisjoint(skipped)
    assert used_files | set(skipped) == {p.relative_to(src).as_posix() for p in on_disk}


def test_each_defect_is_skipped_or_repaired(defective):
    _, out, expected = defective
    manifest = read_manifest(out)
    reasons = {s["file"]: s["reason"] for s in manifest["skipped"]}
    for file, reason in expected.items():
        assert reasons.get(file) == reason, file
    repaired = {r["file"]: r["repair"] for r in manifest["repaired"]}
    assert repaired["images/Egyptian_Mau_139.jpg"] == "GIF data named .jpg; P converted to RGB"
    assert repaired["images/Egyptian_Mau_14.jpg"] == "PNG data named .jpg; RGBA converted to RGB"
    assert repaired["images/beagle_cmyk.jpg"] == "CMYK converted to RGB"
    assert repaired["images/beagle_gray.jpg"] == "L converted to RGB"
    assert manifest["skip_reasons"]["partner skipped"] == 4
    assert manifest["counts"]["train"] + manifest["counts"]["test"] == 24 + 4


def test_round_trip_matches_decoding_the_source(defective):
    src, out, _ = defective
    for split in ("train", "test"):
        shard = load_split(out, split)
        assert shard["image"].shape[1:] == (*SIZE, 3) and shard["image"].dtype == np.uint8
        assert shard["mask"].shape[1:] == SIZE and shard["mask"].dtype == np.uint8
        for name, image, mask, height, width in zip(shard["name"], shard["image"], shard["mask"], shard["height"],
                                                    shard["width"], strict=True):
            decoded = decode_image((src / "images" / name).read_bytes(), name)
            trimap = decode_mask((src / "annotations" / "trimaps" / f"{name[:-4]}.png").read_bytes(), (1, 2, 3), 1)
            assert (height, width) == decoded.pixels.shape[:2] == (40, 48)
            np.testing.assert_array_equal(image, resize_image(decoded.pixels, SIZE))
            np.testing.assert_array_equal(mask, resize_mask(trimap, SIZE))


def test_manifest_records_source_split_classes_and_frequencies(defective):
    src, out, _ = defective
    manifest = read_manifest(out)
    assert manifest["layout"] == "oxford" and manifest["source"] == str(src.resolve())
    assert manifest["classes"] == ["pet", "background", "border"]
    assert manifest["image_size"] == {"height": 32, "width": 32}
    assert manifest["split"] == {"rule": "hash", "test_fraction": 0.25, "seed": 0}
    train = load_split(out, "train")
    counts = np.bincount(train["mask"].ravel(), minlength=3)
    assert list(manifest["class_pixels"]["train"].values()) == counts.tolist()
    assert sum(manifest["class_frequency"]["train"].values()) == pytest.approx(1.0)
    assert all(counts > 0)  # trimaps shifted to 0 pet / 1 background / 2 border, all present


def test_split_is_the_name_hash(defective):
    _, out, _ = defective
    for split in ("train", "test"):
        assert {hash_split(n, 0, 0.25) for n in load_split(out, split)["name"]} == {split}


def test_adding_images_moves_none_of_the_old_ones():
    names = [f"Abyssinian_{i}.jpg" for i in range(2000)]
    old = {n: hash_split(n, 0, 0.1) for n in names[:1000]}
    assert all(hash_split(n, 0, 0.1) == s for n, s in old.items())
    assert 0.07 < sum(s == "test" for s in old.values()) / len(old) < 0.13
    assert any(hash_split(n, 1, 0.1) != s for n, s in old.items())  # the seed salts the hash


def test_rerun_and_grown_dataset_keep_the_split(oxford, tmp_path, ray_local):
    prepare(PrepareConfig(oxford, tmp_path / "a", size=SIZE, test_fraction=0.3))
    grown = tmp_path / "grown"
    synthesize(grown, n=30, size=(48, 40), seed=3)  # the first 24 images are those of `oxford`
    prepare(PrepareConfig(grown, tmp_path / "b", size=SIZE, test_fraction=0.3))
    before = {s: set(load_split(tmp_path / "a", s)["name"]) for s in ("train", "test")}
    after = {s: set(load_split(tmp_path / "b", s)["name"]) for s in ("train", "test")}
    assert before["test"] and before["train"]
    assert before["train"] <= after["train"] and before["test"] <= after["test"]


def test_official_split_follows_the_lists(oxford, tmp_path, ray_local):
    prepare(PrepareConfig(oxford, tmp_path / "o", size=SIZE, split="official"))
    lists = {s: {line.split()[0] for line in (oxford / "annotations" / f).read_text().splitlines()
                 if line and not line.startswith("#")} for s, f in (("train", "trainval.txt"), ("test", "test.txt"))}
    for split in ("train", "test"):
        assert {n[:-4] for n in load_split(tmp_path / "o", split)["name"]} == lists[split]
    assert read_manifest(tmp_path / "o")["split"]["rule"] == "official"


def test_rmldnn_export_prepares_back_identically(defective, tmp_path):
    _, out, _ = defective
    export = out.parent / "rmldnn"
    assert {p.name for p in export.iterdir()} == {"training", "testing"}
    masks = sorted((export / "training" / "masks").iterdir())
    assert masks and set(np.unique(np.asarray(__import__("PIL.Image").Image.open(masks[0])))) <= {0, 1, 2}
    again = prepare(PrepareConfig(export, tmp_path / "again", size=SIZE))
    assert again["layout"] == "rmldnn" and again["split"]["rule"] == "given"
    assert again["counts"] == read_manifest(out)["counts"] and again["files"]["skipped"] == 0
    for split in ("train", "test"):
        a, b = load_split(out, split), load_split(tmp_path / "again", split)
        assert [n[:-4] for n in a["name"]] == [n[:-4] for n in b["name"]]
        np.testing.assert_array_equal(a["mask"], b["mask"])
        np.testing.assert_array_equal(a["image"], b["image"])  # JPEGs copied as-is, repaired ones as PNG


def test_pairs_layout_with_sub_folders(tmp_path, ray_local):
    rng = np.random.default_rng(0)
    for rel in ("cats/a", "cats/b", "dogs/a", "c"):
        image, mask = random_pair(rng, values=(0, 1, 2))
        save_image(tmp_path / "src" / "images" / f"{rel}.png", image)
        save_image(tmp_path / "src" / "masks" / f"{rel}.png", mask)
    manifest = prepare(PrepareConfig(tmp_path / "src", tmp_path / "out", layout="pairs", size=SIZE,
                                     test_fraction=0.0))
    assert manifest["layout"] == "pairs" and manifest["counts"] == {"train": 4, "test": 0}
    train = load_split(tmp_path / "out", "train")
    assert list(train["name"]) == ["c.png", "cats/a.png", "cats/b.png", "dogs/a.png"]
    assert set(np.unique(train["mask"])) == {0, 1, 2}


def test_strict_fails_on_the_first_skip_and_writes_nothing(oxford, tmp_path, ray_local):
    src = tmp_path / "src"
    synthesize(src, n=6, size=(48, 40), seed=1)
    data = next((src / "images").glob("*.jpg"))
    data.write_bytes(data.read_bytes()[:200])
    with pytest.raises(UserError, match=f"--strict: images/{data.name}: truncated image data"):
        prepare(PrepareConfig(src, tmp_path / "out", size=SIZE, strict=True))
    assert not (tmp_path / "out").exists()
    (src / "images" / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="--strict: images/notes.txt: not an image file"):
        prepare(PrepareConfig(src, tmp_path / "out", size=SIZE, strict=True))


def test_no_usable_pair_is_a_clear_error(tmp_path):
    save_image(tmp_path / "src" / "images" / "a.jpg", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "src" / "annotations" / "trimaps").mkdir(parents=True)
    with pytest.raises(UserError, match=r"no usable image/mask pairs \(1 image without mask\)"):
        prepare(PrepareConfig(tmp_path / "src", tmp_path / "out"))


def test_existing_output_is_never_mixed(oxford, tmp_path, ray_local):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="exists and is not empty; pass --overwrite"):
        prepare(PrepareConfig(oxford, out))
    with pytest.raises(UserError, match="it also holds mine.txt"):
        prepare(PrepareConfig(oxford, out, overwrite=True))
    (out / "mine.txt").unlink()
    prepare(PrepareConfig(oxford, out, size=SIZE))
    first = json.loads((out / "manifest.json").read_text())
    prepare(PrepareConfig(oxford, out, size=(16, 16), overwrite=True))
    assert read_manifest(out)["image_size"] == {"height": 16, "width": 16} != first["image_size"]
    assert load_split(out, "train")["image"].shape[1:3] == (16, 16)


def test_cli_prints_a_summary_and_errors_in_one_line(oxford, tmp_path, ray_local, capsys):
    assert main(["prepare", str(oxford), str(tmp_path / "out"), "--size", "32", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"prepared {tmp_path / 'out'}: " in printed and "files: 48 found, 48 used, 0 skipped" in printed
    assert main(["prepare", str(tmp_path / "nope"), str(tmp_path / "out2")]) == 2
    assert capsys.readouterr().err.strip() == f"raypets: error: {tmp_path / 'nope'}: dataset folder does not exist"


def test_hostile_files_are_skipped_with_their_reasons_and_the_good_pairs_used(tmp_path, ray_local):
    """The hostile corpus as images of the pairs layout, each with a mask, beside good pairs and a FIFO mask."""
    src = tmp_path / "src"
    expected = hostile_corpus(src / "images")
    rng = np.random.default_rng(5)
    sizes = {b"depth16.png": (30, 40), b"rotated.jpg": ROTATED_STORED, b"caf\xe9.jpg": (36, 28)}
    for name in expected:
        stem = os.fsdecode(name).rsplit(".", 1)[0]
        height, width = sizes.get(name, (8, 8))
        save_image(src / "masks" / f"{stem}.png", random_pair(rng, width, height, values=(0, 1, 2))[1])
    for stem in ("good_1", "good_2", "fifo_mask"):
        image, mask = random_pair(rng, values=(0, 1, 2))
        save_image(src / "images" / f"{stem}.jpg", image)
        if stem != "fifo_mask":
            save_image(src / "masks" / f"{stem}.png", mask)
    os.mkfifo(src / "masks" / "fifo_mask.png")
    manifest = prepare(PrepareConfig(src, tmp_path / "out", layout="pairs", size=SIZE, test_fraction=0.0))
    reasons = {s["file"]: s["reason"] for s in manifest["skipped"]}
    for name, reason in expected.items():
        shown = f"images/{display_name(name)}"
        assert reasons.get(shown) == reason, shown
        if reason:
            assert reasons[f"masks/{display_name(name).rsplit('.', 1)[0]}.png"] == "partner skipped"
    assert reasons["masks/fifo_mask.png"] == "not a regular file"
    assert reasons["images/fifo_mask.jpg"] == "partner skipped"
    train = load_split(tmp_path / "out", "train")
    assert sorted(train["name"]) == ["caf\\xe9.jpg", "depth16.png", "good_1.jpg", "good_2.jpg", "rotated.jpg"]
    depth = train["image"][list(train["name"]).index("depth16.png")]
    assert depth.min() < 10 and depth.max() > 245  # scaled by its range, not clipped to white
    assert manifest["files"] == {"candidates": 2 * len(expected) + 6, "used": 10, "skipped": 2 * len(expected) - 4}

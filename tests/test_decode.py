"""Ray-free decoding, repair and resizing, and the discovery of pairs in each layout."""

from __future__ import annotations

import io

import numpy as np
import pytest
from helpers import random_pair, save_image
from PIL import Image

from raypets.data.decode import DecodeError, decode_image, decode_mask, parse_size, resize_image, resize_mask
from raypets.data.layouts import detect_layout, discover
from raypets.errors import UserError


def encode(pixels: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    img = Image.fromarray(pixels)
    buf = io.BytesIO()
    (img.convert(mode) if mode else img).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(("fmt", "mode", "repair"), [
    ("JPEG", None, ""),
    ("GIF", "P", "GIF data named .jpg; P converted to RGB"),
    ("PNG", "RGBA", "PNG data named .jpg; RGBA converted to RGB"),
    ("JPEG", "L", "L converted to RGB"),
    ("JPEG", "CMYK", "CMYK converted to RGB"),
    ("BMP", None, "BMP data named .jpg"),
])
def test_any_format_and_mode_is_repaired_to_rgb(fmt, mode, repair):
    pixels = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    decoded = decode_image(encode(pixels, fmt, mode), "x.jpg")
    assert decoded.pixels.shape == (10, 12, 3) and decoded.pixels.dtype == np.uint8
    assert decoded.repair == repair


def test_rgba_keeps_the_colour_of_opaque_pixels():
    pixels = np.zeros((4, 4, 4), np.uint8)
    pixels[..., 0], pixels[..., 3] = 200, 255
    decoded = decode_image(encode(pixels, "PNG"), "a.png")
    assert (decoded.pixels[..., 0] == 200).all() and decoded.repair == "RGBA converted to RGB"


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty file"),
    (b"MATLAB 5.0 MAT-file" * 10, "not an image file"),
])
def test_unusable_bytes_name_their_reason(data, reason):
    with pytest.raises(DecodeError) as err:
        decode_image(data, "a.jpg")
    assert err.value.reason == reason


def test_truncated_jpeg_is_reported_as_truncated():
    data = encode(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG")
    with pytest.raises(DecodeError, match="truncated image data"):
        decode_image(data[: len(data) // 2], "a.jpg")


def test_mask_values_are_checked_and_shifted():
    trimap = np.array([[1, 2], [3, 2]], np.uint8)
    np.testing.assert_array_equal(decode_mask(encode(trimap, "PNG"), (1, 2, 3), 1), trimap - 1)
    with pytest.raises(DecodeError, match=r"mask values out of range: outside \{1, 2, 3\}: 0, 7"):
        decode_mask(encode(np.array([[0, 7], [1, 2]], np.uint8), "PNG"), (1, 2, 3), 1)


def test_mask_saved_as_rgb_grey_is_accepted_but_colour_is_not():
    ids = np.array([[0, 1], [2, 1]], np.uint8)
    np.testing.assert_array_equal(decode_mask(encode(np.stack([ids] * 3, -1), "PNG"), (0, 1, 2)), ids)
    colour = np.stack([ids, ids, ids[::-1]], -1)
    with pytest.raises(DecodeError, match="colour channels that differ"):
        decode_mask(encode(colour, "PNG"), (0, 1, 2))


def test_palette_mask_keeps_its_indices():
    img = Image.fromarray(np.array([[0, 1], [2, 2]], np.uint8), mode="P")
    img.putpalette([0, 0, 0, 255, 255, 255, 128, 128, 128])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    np.testing.assert_array_equal(decode_mask(buf.getvalue(), (0, 1, 2)), [[0, 1], [2, 2]])


def test_resize_masks_nearest_never_invents_a_class():
    mask = np.zeros((37, 53), np.uint8)
    mask[:, 20:] = 2
    small = resize_mask(mask, (16, 16))
    assert small.shape == (16, 16) and set(np.unique(small)) == {0, 2}
    image = resize_image(np.full((37, 53, 3), 9, np.uint8), (16, 24))
    assert image.shape == (16, 24, 3) and (image == 9).all()


def test_parse_size():
    assert parse_size("160") == (160, 160)
    assert parse_size("192x128") == (128, 192)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size("big")


def test_layouts_are_detected_and_unknown_ones_explained(tmp_path):
    (tmp_path / "o" / "images").mkdir(parents=True)
    (tmp_path / "o" / "annotations" / "trimaps").mkdir(parents=True)
    (tmp_path / "r" / "training" / "inputs").mkdir(parents=True)
    (tmp_path / "p" / "images").mkdir(parents=True)
    (tmp_path / "p" / "masks").mkdir(parents=True)
    assert [detect_layout(tmp_path / x) for x in "orp"] == ["oxford", "rmldnn", "pairs"]
    with pytest.raises(UserError, match="no known dataset layout. Expected one of: oxford"):
        detect_layout(tmp_path)
    with pytest.raises(UserError, match="the rmldnn layout needs the folder training/masks/"):
        discover(tmp_path / "r")


def test_pairs_match_by_relative_path_and_leftovers_are_skipped(tmp_path):
    rng = np.random.default_rng(0)
    image, mask = random_pair(rng, values=(0, 1, 2))
    for rel in ("a.jpg", "a.png", "sub/b.jpg", "c.jpg", ".DS_Store", "notes.txt"):
        (tmp_path / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "images" / rel).write_bytes(b"x")
    for rel in ("a.png", "sub/b.png", "d.png", "._a.png"):
        save_image(tmp_path / "masks" / rel, mask)
    found = discover(tmp_path, "pairs")
    assert [(p.name, p.image, p.mask) for p in found.pairs] == [
        ("a.jpg", "images/a.jpg", "masks/a.png"), ("sub/b.jpg", "images/sub/b.jpg", "masks/sub/b.png")]
    assert {s.file: s.reason for s in found.skipped} == {
        "images/a.png": "duplicate name", "images/c.jpg": "image without mask", "images/.DS_Store": "hidden file",
        "images/notes.txt": "not an image file", "masks/d.png": "mask without image",
        "masks/._a.png": "AppleDouble metadata file"}
    assert found.files == 10 == 2 * len(found.pairs) + len(found.skipped)

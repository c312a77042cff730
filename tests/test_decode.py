"""Ray-free decoding, repair and resizing, and the discovery of pairs in each layout."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from helpers import bomb_png, random_pair, save_image
from PIL import Image

from raypets.data.decode import DecodeError, decode_image, decode_mask, parse_size, resize_image, resize_mask
from raypets.data.layouts import detect_layout, discover
from raypets.data.sources import read_and_decode, read_source
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


def _jpeg(width: int, height: int, orientation: int = 1) -> bytes:
    """A smooth JPEG (a gradient, as photos are), stored ``width`` x ``height``, with an EXIF orientation."""
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    pixels = np.stack([x, y, (x + y) / 2], -1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90, exif=exif)
    return buf.getvalue()


def test_draft_decodes_a_jpeg_at_the_smallest_scale_at_least_the_target():
    data = _jpeg(500, 375)
    full = decode_image(data, "a.jpg")
    small = decode_image(data, "a.jpg", draft=(160, 160))
    assert full.pixels.shape == (375, 500, 3) and small.pixels.shape == (188, 250, 3)  # 1/2: 1/4 would be < 160
    assert small.original_size == full.original_size == (375, 500)
    difference = np.abs(resize_image(small.pixels, (160, 160)).astype(int) - resize_image(full.pixels, (160, 160)))
    assert difference.mean() < 3
    png = encode(np.zeros((375, 500, 3), np.uint8), "PNG")
    assert decode_image(png, "a.png", draft=(160, 160)).pixels.shape == (375, 500, 3)  # only JPEGs have scales


def test_exif_orientation_is_applied_and_the_draft_follows_it():
    data = _jpeg(640, 160, orientation=6)  # stored wide, shown tall
    assert decode_image(data, "a.jpg").pixels.shape == (160, 640, 3)  # predict orients, prepare does not
    shown = decode_image(data, "a.jpg", orient=True)
    assert shown.pixels.shape == (640, 160, 3) and shown.original_size == (640, 160)
    assert shown.repair == "EXIF orientation 6 applied"
    drafted = decode_image(data, "a.jpg", orient=True, draft=(320, 80))  # at least 320 high, 80 wide as shown
    assert drafted.pixels.shape == (320, 80, 3) and drafted.original_size == (640, 160)


@pytest.mark.parametrize(("mode", "values"), [("I;16", np.array([[1000, 30000], [60000, 45000]], np.uint16)),
                                              ("I", np.array([[-5, 0], [70000, 100]], np.int32)),
                                              ("F", np.array([[0.25, 0.5], [1.0, 0.75]], np.float32))])
def test_wide_images_are_scaled_to_8_bits_by_their_range(mode, values):
    img = Image.fromarray(values)
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    decoded = decode_image(buf.getvalue(), "a.tif")
    grey = decoded.pixels[..., 0].astype(float)
    expected = (values.astype(float) - values.min()) * 255 / (values.max() - values.min())
    np.testing.assert_allclose(grey, expected, atol=0.51)
    assert decoded.repair.startswith(f"{img.mode} scaled to 8 bits (range ")


def test_images_over_the_pixel_limit_are_refused_from_their_header(tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png").read_bytes()
    assert len(bomb) < 100_000
    with pytest.raises(DecodeError, match="too many pixels: 20000x20000 = 400,000,000 pixels, over the limit of "
                                          "89,478,485; --max-pixels raises it"):
        decode_image(bomb, "bomb.png")
    data = encode(np.zeros((100, 100, 3), np.uint8), "PNG")
    with pytest.raises(DecodeError, match="too many pixels: 100x100"):
        decode_image(data, "a.png", max_pixels=9_999)
    assert decode_image(data, "a.png", max_pixels=10_000).pixels.shape == (100, 100, 3)
    with pytest.raises(DecodeError, match="too many pixels"):
        decode_mask(data[:], (0,), max_pixels=9_999)


def test_files_that_must_not_be_read_are_refused_with_their_reason(tmp_path):
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "folder.jpg").mkdir()
    with open(tmp_path / "huge.jpg", "wb") as huge:
        huge.truncate(2**31)
    (tmp_path / "ok.jpg").write_bytes(b"12345")
    cases = {"gone.jpg": "dangling symlink", "pipe.jpg": "not a regular file", "folder.jpg": "not a regular file",
             "huge.jpg": "file too large", "missing.jpg": "file not found"}
    for name, reason in cases.items():
        with pytest.raises(DecodeError) as err:
            read_source("", os.fsencode(tmp_path / name), 2**20)
        assert err.value.reason == reason, name
    assert read_source("", os.fsencode(tmp_path / "ok.jpg"), 5) == b"12345"
    with pytest.raises(DecodeError, match="file too large: 5 bytes, over the limit of 4"):
        read_source("", os.fsencode(tmp_path / "ok.jpg"), 4)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_file_is_refused_as_permission_denied(tmp_path):
    (tmp_path / "secret.jpg").write_bytes(b"x")
    (tmp_path / "secret.jpg").chmod(0)
    with pytest.raises(DecodeError, match="permission denied"):
        read_source("", os.fsencode(tmp_path / "secret.jpg"), 2**20)


def test_a_decoders_unexpected_exception_is_a_reason_not_a_crash(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")

    def broken(data: bytes):
        return 1 / 0

    with pytest.raises(DecodeError, match="undecodable image data: ZeroDivisionError: division by zero"):
        read_and_decode("", os.fsencode(tmp_path / "a.jpg"), 2**20, broken)

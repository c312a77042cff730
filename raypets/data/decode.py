"""Decoding, repair and resizing of images and masks. No Ray here.

Images of any format and mode are repaired to RGB (the Oxford archive has GIF and RGBA PNG data behind ``.jpg``
names, grayscale and CMYK JPEGs); what cannot be decoded raises :class:`DecodeError` with a short reason that the
preparation manifest and the prediction error list record. Images are resized bilinear, masks nearest.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"})

# The format PIL reports for the data a suffix promises.
_SUFFIX_FORMATS = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".bmp": "BMP",
    ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP",
}


class DecodeError(ValueError):
    """A file that cannot be used: ``reason`` is a short category (summaries count by it), ``detail`` the rest."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image at its original size and what was repaired to get it (empty when nothing)."""

    pixels: np.ndarray  # uint8 (H, W, 3)
    repair: str
    source_format: str


def parse_size(text: str | int | tuple[int, int]) -> tuple[int, int]:
    """``160`` or ``"160"`` -> (160, 160); ``"192x128"`` (width x height) -> (128, 192) as (height, width)."""
    if isinstance(text, tuple):
        height, width = text
    elif isinstance(text, int):
        height = width = text
    else:
        parts = str(text).lower().split("x")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"size must be N or WIDTHxHEIGHT, got {text!r}")
        width, height = int(parts[0]), int(parts[-1])
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return height, width


def _open(data: bytes) -> Image.Image:
    if not data:
        raise DecodeError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError:
        raise DecodeError("not an image file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        if "truncated" in str(err).lower():
            raise DecodeError("truncated image data") from None
        raise DecodeError("undecodable image data", str(err)) from None
    return img


def decode_image(data: bytes, name: str = "") -> DecodedImage:
    """Decode image bytes to RGB, repairing format/mode mismatches; ``name`` only informs the repair note."""
    img = _open(data)
    notes = []
    suffix = PurePath(name).suffix.lower()
    expected = _SUFFIX_FORMATS.get(suffix)
    if expected and img.format and img.format != expected:
        notes.append(f"{img.format} data named {suffix}")
    if img.mode != "RGB":
        notes.append(f"{img.mode} converted to RGB")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
        img = img.convert("RGB")
    return DecodedImage(np.asarray(img, dtype=np.uint8), "; ".join(notes), img.format or "")


def decode_mask(data: bytes, valid: tuple[int, ...], offset: int = 0) -> np.ndarray:
    """Decode a class-id mask (H, W) uint8, check its values are in ``valid`` and subtract ``offset``.

    Palette masks keep their indices; RGB masks are accepted when their channels agree (grayscale saved as RGB).
    """
    img = _open(data)
    if img.mode in ("RGB", "RGBA"):
        arr = np.asarray(img)[..., :3]
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise DecodeError("mask has colour channels that differ", "expected one class id per pixel")
        arr = arr[..., 0]
    elif img.mode == "LA":
        arr = np.asarray(img)[..., 0]
    else:  # L, P, I, I;16, 1
        arr = np.asarray(img)
    values = np.unique(arr)
    bad = sorted(set(values.tolist()) - set(valid))
    if bad:
        shown = ", ".join(str(v) for v in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise DecodeError("mask values out of range", f"outside {{{', '.join(map(str, valid))}}}: {shown}")
    return (arr.astype(np.int64) - offset).astype(np.uint8)


def resize_image(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an RGB uint8 array to (height, width)."""
    height, width = size
    if pixels.shape[:2] == (height, width):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a class-id mask to (height, width): never invents a class."""
    height, width = size
    if mask.shape == (height, width):
        return mask
    return np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))

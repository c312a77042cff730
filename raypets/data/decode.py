"""Decoding, repair and resizing of images and masks. No Ray here.

Images of any format and mode are repaired to RGB (the Oxford archive has GIF and RGBA PNG data behind ``.jpg``
names, grayscale and CMYK JPEGs; 16- and 32-bit data is scaled to 8 bits by its range, not clipped); what cannot be
decoded raises :class:`DecodeError` with a short reason that the preparation manifest and the prediction error list
record. An image over ``max_pixels`` is refused from its header, before its pixels are decoded (a "decompression
bomb" of a few KB can hold 400 M pixels). JPEGs may be decoded straight at a reduced DCT scale (``draft``): the
smallest scale at least a target size, 1.7x the decodes per core when a photo is about 3x the network size.
Images are resized bilinear, masks nearest.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"})
# PIL's own limit (it warns above it): about 0.27 GB of RGB pixels.
DEFAULT_MAX_PIXELS = 89_478_485
TOO_MANY_PIXELS = "too many pixels"
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # scaled to 8 bits by their range
_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees
_ORIENTATION = 0x0112

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
    """An RGB image, what was repaired to get it (empty when nothing), and its size as a viewer shows it (after
    the EXIF orientation, when applied): ``pixels`` may be smaller, decoded at a reduced JPEG scale."""

    pixels: np.ndarray  # uint8 (h, w, 3)
    repair: str
    source_format: str
    original_size: tuple[int, int]  # (height, width)


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


@contextmanager
def _decoding(max_pixels: int | None) -> Iterator[None]:
    """PIL's errors while opening and loading, as a :class:`DecodeError` with its reason. PIL's own pixel check
    (each GIF frame's ``load`` has one too) raises above ``max_pixels`` here (None: off) and never warns. PIL keeps
    its limit in a module global: one decode at a time per process, as Ray runs them."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None if max_pixels is None else max_pixels / 2  # PIL raises above twice its limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except DecodeError:
        raise
    except Image.DecompressionBombError:
        raise DecodeError(TOO_MANY_PIXELS, f"a frame over {max_pixels:,} pixels; --max-pixels raises it") from None
    except UnidentifiedImageError:
        raise DecodeError("not an image file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        if "truncated" in str(err).lower():
            raise DecodeError("truncated image data") from None
        raise DecodeError("undecodable image data", str(err)) from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


@contextmanager
def any_failure_as_decode_error() -> Iterator[None]:
    """A decoder's unexpected exception inside as a :class:`DecodeError` naming it: one bad file must never cost
    more than its own result (predict's other files, serve's other requests)."""
    try:
        yield
    except DecodeError:
        raise
    except Exception as err:  # noqa: BLE001
        raise DecodeError("undecodable image data", f"{type(err).__name__}: {err}") from None


def _check_pixels(img: Image.Image, max_pixels: int) -> None:
    width, height = img.size
    if width * height > max_pixels:
        raise DecodeError(TOO_MANY_PIXELS, f"{width}x{height} = {width * height:,} pixels, over the limit of "
                          f"{max_pixels:,}; --max-pixels raises it")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The image of ``data``, not yet decoded (its header read and its size checked)."""
    if not data:
        raise DecodeError("empty file")
    with _decoding(None):  # the header only; its size is checked next, with a message naming it
        img = Image.open(io.BytesIO(data))
    _check_pixels(img, max_pixels)
    return img


def _load(img: Image.Image, max_pixels: int) -> Image.Image:
    with _decoding(max_pixels):
        img.load()
    return img


def decode_image(data: bytes, name: str = "", *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft: tuple[int, int] | None = None, orient: bool = False) -> DecodedImage:
    """Decode image bytes to RGB, repairing format/mode mismatches; ``name`` only informs the repair note.

    ``draft`` (height, width): a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) still at least that
    size. ``orient``: the EXIF orientation is applied (and recorded as a repair), so pixels are as a viewer shows
    them.
    """
    img = _open(data, max_pixels)
    notes = []
    suffix = PurePath(name).suffix.lower()
    expected = _SUFFIX_FORMATS.get(suffix)
    if expected and img.format and img.format != expected:
        notes.append(f"{img.format} data named {suffix}")
    with _decoding(max_pixels):  # a PNG's EXIF may follow its pixels: reading it loads them (a truncated file fails)
        orientation = img.getexif().get(_ORIENTATION, 1) if orient else 1
    width, height = img.size
    if orientation in _SWAPS_AXES:
        width, height = height, width
    if draft and img.format == "JPEG":
        target = draft[::-1] if orientation in _SWAPS_AXES else draft  # in the stored pixels' axes
        img.draft(img.mode, (target[1], target[0]))
    source_format = img.format or ""
    img = _load(img, max_pixels)
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
        notes.append(f"EXIF orientation {orientation} applied")
    if img.mode in _WIDE_MODES:
        img, note = _to_8_bits(img)
        notes.append(note)
    if img.mode != "RGB":
        notes.append(f"{img.mode} converted to RGB")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
        img = img.convert("RGB")
    return DecodedImage(np.asarray(img, dtype=np.uint8), "; ".join(notes), source_format, (height, width))


def decode_to_size(data: bytes, size: tuple[int, int], *, name: str = "",
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, DecodedImage]:
    """What ``raypets predict`` and ``raypets serve`` feed the model for one file: its pixels decoded (JPEGs at the
    draft scale for ``size``, the EXIF orientation applied) and resized bilinear to ``size`` (height, width); and
    the decoded image, whose ``original_size`` the mask is given at."""
    decoded = decode_image(data, name, max_pixels=max_pixels, draft=size, orient=True)
    return resize_image(decoded.pixels, size), decoded


def _to_8_bits(img: Image.Image) -> tuple[Image.Image, str]:
    """A 16-bit, 32-bit or float image as 8-bit grey, its lowest value 0 and its highest 255 (PIL's
    ``convert`` would clip every value over 255 to white)."""
    values = np.asarray(img, dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    scale = 255 / (high - low) if high > low else 0.0
    grey = np.rint((values - low) * scale).astype(np.uint8)
    return Image.fromarray(grey), f"{img.mode} scaled to 8 bits (range {low:g}..{high:g})"


def decode_mask(data: bytes, valid: tuple[int, ...], offset: int = 0, *,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a class-id mask (H, W) uint8, check its values are in ``valid`` and subtract ``offset``.

    Palette masks keep their indices; RGB masks are accepted when their channels agree (grayscale saved as RGB).
    """
    img = _load(_open(data, max_pixels), max_pixels)
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

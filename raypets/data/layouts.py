"""Find image/mask pairs in the dataset layouts ``prepare`` reads. No Ray, no decoding.

- **oxford**: ``images/*.jpg`` + ``annotations/trimaps/*.png`` (values 1 pet, 2 background, 3 border) and
  ``annotations/{trainval,test}.txt``;
- **rmldnn**: ``training/{inputs,masks}`` + ``testing/{inputs,masks}``, masks in {0, 1, 2}, split as given;
- **pairs**: ``images/`` + ``masks/`` matched by path without suffix, masks in {0, 1, 2}.

Every file found under the layout's folders is accounted for: it is part of a pair, or it is skipped with a reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from raypets.data.decode import IMAGE_SUFFIXES
from raypets.errors import UserError

LAYOUTS = ("oxford", "rmldnn", "pairs")


@dataclass(frozen=True)
class Pair:
    """One image and its mask. ``name`` is the image path relative to its images root (the shard key)."""

    name: str
    image: str  # path relative to the source root
    mask: str
    split: str | None = None  # given by the layout (rmldnn), else decided later


@dataclass(frozen=True)
class Skip:
    """A candidate file that is not used: ``reason`` is a short category, ``detail`` says more."""

    file: str  # path relative to the source root
    reason: str
    detail: str = ""


@dataclass
class Discovery:
    layout: str
    mask_values: tuple[int, ...]  # values a mask may hold before the offset is subtracted
    mask_offset: int
    pairs: list[Pair] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    files: int = 0  # every candidate file found, paired or skipped


def detect_layout(src: Path) -> str:
    """Name the layout of ``src`` or fail with a message listing what each layout looks like."""
    if (src / "images").is_dir() and (src / "annotations" / "trimaps").is_dir():
        return "oxford"
    if (src / "training" / "inputs").is_dir():
        return "rmldnn"
    if (src / "images").is_dir() and (src / "masks").is_dir():
        return "pairs"
    raise UserError(
        f"{src}: no known dataset layout. Expected one of: oxford (images/ + annotations/trimaps/), "
        "rmldnn (training/{inputs,masks}/ + testing/{inputs,masks}/), pairs (images/ + masks/)"
    )


def discover(src: Path, layout: str = "auto") -> Discovery:
    """List the pairs and the skipped files of ``src`` in ``layout`` (``auto`` detects it)."""
    if not src.is_dir():
        raise UserError(f"{src}: dataset folder does not exist")
    if layout == "auto":
        layout = detect_layout(src)
    if layout == "oxford":
        found = Discovery("oxford", (1, 2, 3), 1)
        _pair_folders(src, "images", "annotations/trimaps", None, found)
    elif layout == "rmldnn":
        found = Discovery("rmldnn", (0, 1, 2), 0)
        for folder, split in (("training", "train"), ("testing", "test")):
            if (src / folder).is_dir():
                _pair_folders(src, f"{folder}/inputs", f"{folder}/masks", split, found)
    elif layout == "pairs":
        found = Discovery("pairs", (0, 1, 2), 0)
        _pair_folders(src, "images", "masks", None, found)
    else:
        raise UserError(f"unknown layout {layout!r}; choose auto, {', '.join(LAYOUTS)}")
    for sub in _required_folders(layout):
        if not (src / sub).is_dir():
            raise UserError(f"{src}: the {layout} layout needs the folder {sub}/")
    found.pairs.sort(key=lambda p: p.name)
    return found


def official_split(src: Path) -> dict[str, str]:
    """Image stem -> "train"/"test" from the Oxford archive's ``annotations/{trainval,test}.txt``."""
    split = {}
    for filename, name in (("trainval.txt", "train"), ("test.txt", "test")):
        path = src / "annotations" / filename
        if not path.is_file():
            raise UserError(f"{path}: missing; --split official needs the archive's trainval.txt and test.txt")
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                split[line.split()[0]] = name
    return split


def _required_folders(layout: str) -> tuple[str, ...]:
    return {
        "oxford": ("images", "annotations/trimaps"),
        "rmldnn": ("training/inputs", "training/masks"),
        "pairs": ("images", "masks"),
    }[layout]


def _files(root: Path) -> list[str]:
    """Every file below ``root``, as sorted POSIX paths relative to it."""
    out = []
    for dirpath, _, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        out.extend((rel / f).as_posix() for f in filenames)
    return sorted(out)


def _unusable(rel: str) -> tuple[str, str] | None:
    """(reason, detail) for a file that cannot be an image or mask by its name alone."""
    base = rel.rsplit("/", 1)[-1]
    if base.startswith("._"):
        return "AppleDouble metadata file", "macOS ._* resource fork"
    if base.startswith("."):
        return "hidden file", ""
    suffix = Path(base).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        return "not an image file", f"suffix {suffix or '(none)'}"
    return None


def _pair_folders(src: Path, images: str, masks: str, split: str | None, found: Discovery) -> None:
    """Pair files of ``src/images`` with files of ``src/masks`` by relative path without suffix."""
    mask_by_key: dict[str, str] = {}
    for rel in _files(src / masks) if (src / masks).is_dir() else []:
        found.files += 1
        key = rel.rsplit(".", 1)[0]
        problem = _unusable(rel)
        if problem is None and key in mask_by_key:
            problem = "duplicate name", f"another mask for {key}: {masks}/{mask_by_key[key]}"
        if problem:
            found.skipped.append(Skip(f"{masks}/{rel}", *problem))
        else:
            mask_by_key[key] = rel
    image_by_key: dict[str, str] = {}
    for rel in _files(src / images):
        found.files += 1
        key = rel.rsplit(".", 1)[0]
        problem = _unusable(rel)
        if problem is None and key in image_by_key:
            problem = "duplicate name", f"another image for {key}: {images}/{image_by_key[key]}"
        if problem is None and key not in mask_by_key:
            problem = "image without mask", f"looked for {masks}/{key}.*"
        if problem:
            found.skipped.append(Skip(f"{images}/{rel}", *problem))
            continue
        image_by_key[key] = rel
        found.pairs.append(Pair(rel, f"{images}/{rel}", f"{masks}/{mask_by_key[key]}", split))
    for key, rel in mask_by_key.items():
        if key not in image_by_key:
            found.skipped.append(Skip(f"{masks}/{rel}", "mask without image"))

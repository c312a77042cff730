"""A procedural pets-like dataset written in the official Oxford-IIIT Pet layout (no Ray).

Image i depends only on (seed, i): a larger ``n`` keeps every earlier image byte for byte.
Pictures come from :mod:`raypets.data.render`.
"""

from __future__ import annotations

import io
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from raypets.data.render import render_sample
from raypets.errors import UserError
from raypets.outputs import check_output_folder

CATS = ("Abyssinian", "Bengal", "Birman", "Bombay", "British_Shorthair", "Egyptian_Mau", "Maine_Coon",
        "Persian", "Ragdoll", "Russian_Blue", "Siamese", "Sphynx")
DOGS = ("american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle", "boxer", "chihuahua",
        "english_cocker_spaniel", "english_setter", "german_shorthaired", "great_pyrenees", "havanese",
        "japanese_chin", "keeshond", "leonberger", "miniature_pinscher", "newfoundland", "pomeranian", "pug",
        "saint_bernard", "samoyed", "scottish_terrier", "shiba_inu", "staffordshire_bull_terrier",
        "wheaten_terrier", "yorkshire_terrier")
BREEDS = tuple(sorted(CATS + DOGS, key=str.lower))  # CLASS-ID i+1, as in the official list.txt
LIST_HEADER = (  # verbatim from the official list.txt, typos included
    "#Image CLASS-ID SPECIES BREED ID\n"
    "#ID: 1:37 Class ids\n"
    "#SPECIES: 1:Cat 2:Dog\n"
    "#BREED ID: 1-25:Cat 1:12:Dog\n"
    "#All images with 1st letter as captial are cat images\n"
    "#images with small first letter are dog images\n"
)
DEFECT_K0 = 10_000  # defect files are named <Breed>_<DEFECT_K0 + j>, beyond any regular image number
_PAIRED_DEFECTS = (("gif", "Egyptian_Mau"), ("png_rgba", "Abyssinian"), ("grayscale", "Bombay"),
                   ("cmyk", "Siamese"), ("truncated", "beagle"), ("empty", "chihuahua"))
_CHUNK = 32  # images per worker task
Row = tuple[tuple[str, int, int, int], bool]  # ((name, CLASS-ID, SPECIES, BREED-ID), in trainval)

@dataclass(frozen=True)
class SynthSummary:
    """What `synthesize` wrote; `defects` maps a path relative to `out` to its defect kind."""

    out: Path
    images: int
    cats: int
    dogs: int
    defects: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        kinds = ", ".join(sorted(set(self.defects.values())))
        extra = f", plus {len(self.defects)} defect files ({kinds})" if self.defects else ""
        return f"synthesized {self.images} images ({self.cats} cats, {self.dogs} dogs) in {self.out}{extra}"


def breed_entry(i: int) -> tuple[str, int, int, int]:
    """Name, CLASS-ID, SPECIES and BREED-ID of regular image i (breeds cycled in class-id order)."""
    return _entry(BREEDS[i % len(BREEDS)], i // len(BREEDS) + 1)


def _entry(breed: str, k: int) -> tuple[str, int, int, int]:
    species = CATS if breed in CATS else DOGS
    return f"{breed}_{k}", BREEDS.index(breed) + 1, 1 if breed in CATS else 2, species.index(breed) + 1


def synthesize(out: Path, n: int = 200, size: tuple[int, int] = (320, 240), seed: int = 0,
               defects: bool = False, workers: int | None = None) -> SynthSummary:
    """Write n pets-like images, trimaps and list files in the Oxford-IIIT Pet layout under `out`.

    `size` is (width, height). With `defects`, extra files reproduce the real archive's defect kinds.
    `workers` processes render in parallel (default: the usable CPUs); the bytes never depend on it.
    They are spawned, so a calling script needs the usual ``if __name__ == "__main__":`` guard.
    """
    out = Path(out)
    check_output_folder(out, "synthetic dataset", flag=None)
    width, height = size
    if n < 1 or width < 16 or height < 16 or seed < 0:
        raise UserError(f"synth needs --n >= 1, a --size of at least 16x16 and --seed >= 0; got n={n}, "
                        f"size={width}x{height}, seed={seed}")
    if defects and n > (DEFECT_K0 - 1) * len(BREEDS):
        raise UserError(f"--defects names its files <Breed>_{DEFECT_K0} and up; --n {n} would collide with them")
    (out / "images").mkdir(parents=True)
    (out / "annotations" / "trimaps").mkdir(parents=True)
    chunks = [range(a, min(a + _CHUNK, n)) for a in range(0, n, _CHUNK)]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(workers or usable, len(chunks))
    if workers > 1:  # spawn, not fork: the caller may run threads (Ray)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(partial(_write_range, out, size=size, seed=seed), chunks))
    else:
        for chunk in chunks:
            _write_range(out, chunk, size, seed)
    rows = [(breed_entry(i), i % 2 == 0) for i in range(n)]
    cats = sum(entry[2] == 1 for entry, _ in rows)
    written = _write_defects(out, rows, size, seed) if defects else {}
    _write_lists(out / "annotations", rows)
    return SynthSummary(out, n, cats, n - cats, written)


def _write_range(out: Path, indices: range, size: tuple[int, int], seed: int) -> None:
    """Render and save regular images `indices` and their trimaps."""
    for i in indices:
        name, _, species, _ = breed_entry(i)
        rgb, trimap = render_sample(np.random.default_rng([seed, i]), *size, cat=species == 1)
        Image.fromarray(rgb).save(out / "images" / f"{name}.jpg", quality=90)
        Image.fromarray(trimap, "L").save(out / "annotations" / "trimaps" / f"{name}.png", compress_level=1)


def _write_lists(annotations: Path, rows: list[Row]) -> None:
    """list.txt with the official header, and the trainval/test split files, sorted by class then number."""
    rows = sorted(rows, key=lambda r: (r[0][1], int(r[0][0].rsplit("_", 1)[1])))
    line = {entry: " ".join(map(str, entry)) + "\n" for entry, _ in rows}
    (annotations / "list.txt").write_text(LIST_HEADER + "".join(line[e] for e, _ in rows))
    (annotations / "trainval.txt").write_text("".join(line[e] for e, trainval in rows if trainval))
    (annotations / "test.txt").write_text("".join(line[e] for e, trainval in rows if not trainval))


def _write_defects(out: Path, rows: list[Row], size: tuple[int, int], seed: int) -> dict[str, str]:
    """The real archive's defect kinds as extra files, real pairs appended to `rows`; returns path -> kind."""
    images, trimaps, first = out / "images", out / "annotations" / "trimaps", rows[0][0][0]
    # A MATLAB file and an AppleDouble file beside the first regular image, as in the archive.
    header = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: Mon Jan  2 12:00:00 2012"
    (images / f"{first}.mat").write_bytes(header.ljust(116) + bytes(8) + b"\x00\x01IM" + bytes(64))
    (trimaps / f"._{first}.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X".ljust(4096, b"\x00"))
    written = {f"images/{first}.mat": "mat", f"annotations/trimaps/._{first}.png": "appledouble"}
    for j, (kind, breed) in enumerate((*_PAIRED_DEFECTS, ("no_trimap", "pug"), ("no_image", "boxer"))):
        entry = _entry(breed, DEFECT_K0 + j)
        # [seed, j, 1] never equals a regular [seed, i]: SeedSequence pads with zeros, not ones.
        rgb, trimap = render_sample(np.random.default_rng([seed, j, 1]), *size, cat=entry[2] == 1)
        image, mask = images / f"{entry[0]}.jpg", trimaps / f"{entry[0]}.png"
        if kind != "no_image":
            image.write_bytes(_defect_bytes(kind, rgb))
        if kind != "no_trimap":
            Image.fromarray(trimap, "L").save(mask)
        written[(mask if kind == "no_image" else image).relative_to(out).as_posix()] = kind
        if kind not in ("no_trimap", "no_image"):
            rows.append((entry, j % 2 == 0))
    return written


def _defect_bytes(kind: str, rgb: np.ndarray) -> bytes:
    """What a defective `.jpg` of this kind holds (a regular JPEG for no_trimap)."""
    if kind == "empty":
        return b""
    image, buf = Image.fromarray(rgb), io.BytesIO()
    if kind == "gif":
        image.convert("P", palette=Image.Palette.ADAPTIVE).save(buf, "GIF")
    elif kind == "png_rgba":
        image.convert("RGBA").save(buf, "PNG")
    else:
        image.convert({"grayscale": "L", "cmyk": "CMYK"}.get(kind, "RGB")).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    return data[: len(data) // 2] if kind == "truncated" else data

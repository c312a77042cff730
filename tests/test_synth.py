"""The procedural pets dataset: official layout, trimaps, determinism, difficulty and defect files."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raypets.data.synth import render_sample, synthesize
from raypets.errors import UserError

HEADER = [
    "#Image CLASS-ID SPECIES BREED ID",
    "#ID: 1:37 Class ids",
    "#SPECIES: 1:Cat 2:Dog",
    "#BREED ID: 1-25:Cat 1:12:Dog",
    "#All images with 1st letter as captial are cat images",
    "#images with small first letter are dog images",
]
# CLASS-ID, SPECIES, BREED-ID of some breeds in the official list.txt
OFFICIAL = {"Abyssinian": (1, 1, 1), "american_bulldog": (2, 2, 1), "Bengal": (6, 1, 2), "boxer": (9, 2, 5),
            "British_Shorthair": (10, 1, 5), "Maine_Coon": (21, 1, 7), "Sphynx": (34, 1, 12),
            "yorkshire_terrier": (37, 2, 25)}
SIZE = (64, 48)


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def rows(path: Path) -> list[tuple[str, int, int, int]]:
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            name, *ids = line.split()
            assert len(ids) == 3, line
            out.append((name, *map(int, ids)))
    return out


def erode(mask: np.ndarray, r: int) -> np.ndarray:
    """Pixels whose whole (2r+1)-square lies in `mask`."""
    h, w = mask.shape
    padded, out = np.pad(mask, r), mask.copy()
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out &= padded[dy:dy + h, dx:dx + w]
    return out


@pytest.fixture(scope="module")
def pets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "pets"
    summary = synthesize(out, n=40, size=SIZE, seed=0, workers=1)
    assert (summary.out, summary.images, summary.cats + summary.dogs) == (out, 40, 40)
    assert summary.cats == sum(p.name[0].isupper() for p in (out / "images").glob("*.jpg"))
    assert summary.defects == {}
    return out


def test_layout_and_list_files_follow_the_official_archive(pets: Path) -> None:
    images = sorted((pets / "images").iterdir())
    trimaps = sorted((pets / "annotations" / "trimaps").iterdir())
    assert len(images) == 40 and [p.suffix for p in images] == [".jpg"] * 40
    assert [p.stem for p in trimaps] == [p.stem for p in images] and {p.suffix for p in trimaps} == {".png"}
    for image, trimap in zip(images, trimaps, strict=True):
        with Image.open(image) as im, Image.open(trimap) as tm:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", SIZE)
            assert (tm.format, tm.mode, tm.size) == ("PNG", "L", SIZE)

    lines = (pets / "annotations" / "list.txt").read_text().splitlines()
    assert lines[:6] == HEADER and not any(line.startswith("#") for line in lines[6:])
    listed = rows(pets / "annotations" / "list.txt")
    assert sorted(name for name, *_ in listed) == [p.stem for p in images]
    breeds = {name.rsplit("_", 1)[0]: ids for name, *ids in listed}
    assert len(breeds) == 37 and sorted(ids[0] for ids in breeds.values()) == list(range(1, 38))
    assert all((ids[1] == 1) == name[0].isupper() for name, ids in breeds.items())
    assert {b: tuple(ids) for b, ids in breeds.items() if b in OFFICIAL} == OFFICIAL

    trainval, test = rows(pets / "annotations" / "trainval.txt"), rows(pets / "annotations" / "test.txt")
    assert len(trainval) == len(test) == 20
    assert sorted(trainval + test) == sorted(listed)


def test_trimaps_have_pet_background_and_a_thin_border_between(pets: Path) -> None:
    large = [render_sample(np.random.default_rng([0, i]), 400, 300)[1] for i in range(3)]  # half-size path
    small = [np.asarray(Image.open(p)) for p in sorted((pets / "annotations" / "trimaps").iterdir())]
    for i, trimap in enumerate(small + large):
        assert set(np.unique(trimap)) == {1, 2, 3}, i
        pet, background = trimap == 1, trimap == 2
        for a, b in ((pet, background), (background, pet)):
            assert not (a[1:] & b[:-1]).any() and not (a[:, 1:] & b[:, :-1]).any(), i
        width = 3 if i < len(small) else 5  # the band is 2r px wide, r = 1 here and 2 at 400 x 300
        assert not erode(trimap == 3, width).any(), f"{i}: border band wider than a few pixels"


def test_pets_vary_in_size_and_position() -> None:
    shares, touching = [], []
    for i in range(40):
        rgb, trimap = render_sample(np.random.default_rng([5, i]), *SIZE)
        assert (rgb.shape, trimap.shape) == ((48, 64, 3), (48, 64)) and rgb.dtype == trimap.dtype == np.uint8
        pet = trimap != 2
        shares.append(pet.mean())
        touching.append(pet[0].any() or pet[-1].any() or pet[:, 0].any() or pet[:, -1].any())
    assert min(shares) < 0.25 and max(shares) > 0.45 and 0.2 < np.mean(shares) < 0.6
    assert 0 < sum(touching) < 40


def test_colour_alone_does_not_separate_pet_from_background() -> None:
    def pixels(seed: int) -> tuple[np.ndarray, np.ndarray]:
        samples = [render_sample(np.random.default_rng([seed, i]), *SIZE) for i in range(40)]
        keep = [trimap != 3 for _, trimap in samples]
        rgb = np.concatenate([s[0][k] for s, k in zip(samples, keep, strict=True)]).astype(np.int64)
        return rgb, np.concatenate([s[1][k] == 1 for s, k in zip(samples, keep, strict=True)])

    (x, y), (x_test, y_test) = pixels(1), pixels(2)
    means = x[y].mean(0), x[~y].mean(0)
    nearest_mean = ((x_test - means[0]) ** 2).sum(1) < ((x_test - means[1]) ** 2).sum(1)
    bins = x // 32 @ np.array([64, 8, 1])  # the best per-pixel colour rule on an 8x8x8 colour grid
    pet_bin = np.bincount(bins[y], minlength=512) > np.bincount(bins[~y], minlength=512)
    colour_bins = pet_bin[x_test // 32 @ np.array([64, 8, 1])]
    prior = max(y_test.mean(), 1 - y_test.mean())  # always answering the larger class
    assert (nearest_mean == y_test).mean() < 0.85 and (colour_bins == y_test).mean() < 0.85
    assert (colour_bins == y_test).mean() < prior + 0.05, "colour says more than the class sizes"


def test_image_i_depends_only_on_seed_and_i(tmp_path: Path) -> None:
    first = files(synthesize(tmp_path / "a", n=12, size=(48, 40), seed=3, workers=1).out)
    assert files(synthesize(tmp_path / "b", n=12, size=(48, 40), seed=3, workers=1).out) == first
    more = files(synthesize(tmp_path / "c", n=17, size=(48, 40), seed=3, workers=1).out)
    regular = [k for k in first if k.startswith(("images/", "annotations/trimaps/"))]
    assert len(regular) == 24 and all(more[k] == first[k] for k in regular)
    for split in ("trainval.txt", "test.txt"):  # adding images moves none of the old ones
        assert set(rows(tmp_path / "a/annotations" / split)) <= set(rows(tmp_path / "c/annotations" / split))
    other = files(synthesize(tmp_path / "d", n=12, size=(48, 40), seed=4, workers=1).out)
    assert all(other[k] != first[k] for k in regular if k.startswith("images/"))


def test_parallel_workers_write_the_same_bytes(tmp_path: Path) -> None:
    serial = synthesize(tmp_path / "serial", n=40, size=(32, 32), seed=1, workers=1)
    parallel = synthesize(tmp_path / "parallel", n=40, size=(32, 32), seed=1, workers=2)
    assert files(parallel.out) == files(serial.out)


def test_defects_are_extra_files_of_each_real_kind(tmp_path: Path) -> None:
    clean = files(synthesize(tmp_path / "clean", n=10, size=(48, 40), seed=0, workers=1).out)
    summary = synthesize(tmp_path / "bad", n=10, size=(48, 40), seed=0, defects=True, workers=1)
    written = files(summary.out)
    assert all(written[k] == v for k, v in clean.items() if not k.endswith(".txt"))
    kinds = {kind: summary.out / path for path, kind in summary.defects.items()}
    assert sorted(kinds) == sorted(["mat", "appledouble", "gif", "png_rgba", "grayscale", "cmyk", "truncated",
                                    "empty", "no_trimap", "no_image"])
    paired = ("gif", "png_rgba", "grayscale", "cmyk", "truncated", "empty")  # image and trimap both present
    assert set(written) - set(clean) == {p.relative_to(summary.out).as_posix() for p in kinds.values()} | {
        f"annotations/trimaps/{kinds[k].stem}.png" for k in paired}

    assert kinds["mat"].read_bytes().startswith(b"MATLAB 5.0 MAT-file")
    assert kinds["mat"].with_suffix(".jpg").exists()  # in images/, beside a real image, as in the archive
    assert kinds["appledouble"].name.startswith("._")
    assert kinds["appledouble"].read_bytes()[:4] == b"\x00\x05\x16\x07"
    for kind, (fmt, mode) in {"gif": ("GIF", "P"), "png_rgba": ("PNG", "RGBA"), "grayscale": ("JPEG", "L"),
                              "cmyk": ("JPEG", "CMYK")}.items():
        assert kinds[kind].suffix == ".jpg"
        with Image.open(kinds[kind]) as im:
            assert (im.format, im.mode) == (fmt, mode), kind
    with Image.open(kinds["truncated"]) as im, pytest.raises(OSError):
        im.load()
    assert kinds["empty"].stat().st_size == 0
    assert not (summary.out / "annotations" / "trimaps" / f"{kinds['no_trimap'].stem}.png").exists()
    assert kinds["no_image"].parent.name == "trimaps"
    assert not (summary.out / "images" / f"{kinds['no_image'].stem}.jpg").exists()

    listed = {name for name, *_ in rows(summary.out / "annotations" / "list.txt")}
    clean_listed = {name for name, *_ in rows(tmp_path / "clean" / "annotations" / "list.txt")}
    assert listed == clean_listed | {kinds[k].stem for k in paired}
    split = rows(summary.out / "annotations/trainval.txt") + rows(summary.out / "annotations/test.txt")
    assert {name for name, *_ in split} == listed


def test_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="taken: exists and is not empty"):
        synthesize(tmp_path / "taken", n=1, size=(32, 32))
    assert files(tmp_path / "taken") == {"keep.txt": b"mine"}
    (tmp_path / "empty").mkdir()
    summary = synthesize(tmp_path / "empty", n=1, size=(32, 32))
    assert "\n" not in str(summary) and "1 images" in str(summary) and str(tmp_path / "empty") in str(summary)

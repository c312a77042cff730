"""The Ray Data preparation pipeline: image/mask pairs -> Parquet shards per split + ``manifest.json``.

The driver lists file paths only (:mod:`raypets.data.layouts`); Ray tasks read, decode, repair, check and resize
each pair in one UDF and write the rows of each split as Parquet (a Datasink fused with the UDF), so the driver
never holds the images and the data is read once. A bad pair becomes a row with a reason instead of an exception;
the driver gets back only the small per-file metadata the manifest records. Every candidate file ends up counted
once: used in a split, or skipped with a reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections import Counter
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import WriteResult

from raypets import storage
from raypets.classes import CLASS_NAMES
from raypets.data.decode import DecodedImage, DecodeError, decode_image, decode_mask, resize_image, resize_mask
from raypets.data.layouts import Discovery, Pair, Skip, discover, official_split
from raypets.data.sources import DEFAULT_MAX_FILE_MB, display_name, read_and_decode
from raypets.errors import UserError
from raypets.outputs import check_output_folder, staged_output
from raypets.redaction import redact
from raypets.stages.runtime import data_context, init_ray
from raypets.stages.shards import read_manifest
from raypets.storage import Location

if TYPE_CHECKING:
    from ray.data._internal.execution.interfaces import TaskContext

SPLITS = ("train", "test")
SHARD_COLUMNS = ["name", "image", "mask", "height", "width"]
MANIFEST_VERSION = 1
PARTNER_SKIPPED = "partner skipped"
PAIRS_PER_TASK = 128  # ~1.3 s of work a task here; 16 tasks for 2,000 pairs
_EXPORT_FOLDERS = {"train": "training", "test": "testing"}
# What a prepared folder holds; `prepare --overwrite` replaces only a folder made of these.
PREPARED_ENTRIES = frozenset({*SPLITS, "manifest.json"})
EXPORT_ENTRIES = frozenset(_EXPORT_FOLDERS.values())


@dataclass(frozen=True)
class PrepareConfig:
    """Settings of ``raypets prepare``, checked when built; :func:`prepare` checks the folders they name (and
    :func:`raypets.data.layouts.discover` the layout)."""

    src: Path
    out: Location  # a folder or a URI (s3://...)
    layout: str = "auto"
    size: tuple[int, int] = (160, 160)  # (height, width)
    split: str = "hash"
    test_fraction: float = 0.1
    seed: int = 0
    strict: bool = False
    overwrite: bool = False
    export_rmldnn: Path | None = None

    def __post_init__(self) -> None:
        if self.split not in ("hash", "official"):
            raise UserError(f"unknown split rule {self.split!r}; choose hash or official")
        if not 0.0 <= self.test_fraction < 1.0:
            raise UserError(f"--test-fraction must be in [0, 1), got {self.test_fraction}")
        if min(self.size) < 1:
            raise UserError(f"--size must be positive, got {self.size}")


def hash_split(name: str, seed: int, test_fraction: float) -> str:
    """Deterministic split of one name: stable across runs, and adding names moves none of the old ones."""
    digest = hashlib.sha256(f"{seed}/{name}".encode("utf-8", "surrogateescape")).digest()  # any file name's bytes
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def prepare(cfg: PrepareConfig, *, address: str | None = None) -> dict:
    """Prepare ``cfg.src`` into ``cfg.out`` and return the manifest (also written as ``out/manifest.json``).

    The output (and the export) is built where no reader sees it half-written (:func:`raypets.outputs.staged_output`),
    so a failed or ``--strict`` run leaves an earlier output as it was, at a URI (``s3://...``) too; ``manifest.json``,
    written last, marks the shards complete.
    """
    if not cfg.src.is_dir():
        raise UserError(f"{cfg.src}: dataset folder does not exist")
    check_output_folder(cfg.out, "prepared dataset", ours=PREPARED_ENTRIES, overwrite=cfg.overwrite)
    if cfg.export_rmldnn is not None:
        check_output_folder(cfg.export_rmldnn, "rmldnn export", ours=EXPORT_ENTRIES, overwrite=cfg.overwrite)
    found = discover(cfg.src, cfg.layout)
    pairs, skipped = _assign_splits(cfg, found)
    if cfg.strict and skipped:
        _fail_strict(skipped)
    if not pairs:
        raise UserError(f"{cfg.src}: no usable image/mask pairs ({_reasons_line(skipped)})")

    init_ray(address)
    export = staged_output(cfg.export_rmldnn) if cfg.export_rmldnn else nullcontext()
    with staged_output(cfg.out, marker="manifest.json") as out, export as export_folder:
        sink = _ShardSink(str(out))
        # One fused operator: Ray Data's per-operator reservations (made for pipelines of several) only held its
        # tasks back, starting one at a time with gaps between them.
        with data_context(op_resource_reservation_enabled=False):
            _decode_dataset(cfg, found, pairs, export_folder).write_datasink(sink)
        used = [row for row in sink.rows if not row["reason"]]
        for row in sink.rows:
            if row["reason"]:
                skipped += [Skip(row["skip_file"], row["reason"], row["detail"]),
                            Skip(row["partner"], PARTNER_SKIPPED, row["skip_file"])]
        if cfg.strict and skipped:
            _fail_strict(skipped)
        if not used:
            raise UserError(f"{cfg.src}: no usable image/mask pairs ({_reasons_line(skipped)})")
        _check_visible(sink.files, out, cfg.out)
        manifest = _manifest(cfg, found, used, skipped, sink.class_pixels)
        storage.write_text(storage.join(out, "manifest.json"), json.dumps(manifest, indent=2) + "\n")
    return manifest


def ensure_shards(src: Path, shards: Location, size: tuple[int, int], *, address: str | None = None) -> None:
    """Prepare the rmldnn-layout folder ``src`` into ``shards`` at ``size``, unless that was done already."""
    if storage.is_file(storage.join(shards, "manifest.json")):
        manifest = read_manifest(shards)
        if manifest["source"] != str(src.resolve()) or (manifest["image_size"]["height"],
                                                         manifest["image_size"]["width"]) != tuple(size):
            raise UserError(f"{shards}: holds shards of {manifest['source']} at another size; remove it or pass --data")
        return
    print(describe_manifest(prepare(PrepareConfig(src, shards, layout="rmldnn", size=size), address=address), shards))


class _ShardSink(Datasink):
    """Writes each decoded block's rows into ``out/<split>/`` (a folder or a URI) as Parquet and returns their small
    metadata.

    Runs in the Ray tasks that decode (fused with the UDF); the driver gets back only names, skip reasons and
    class pixel counts, in :meth:`on_write_complete`.
    """

    def __init__(self, out: Location) -> None:
        self.out = out
        self.rows: list[dict] = []
        self.files: list[str] = []  # ``<split>/<name>``, as the tasks wrote them
        self.class_pixels = {split: np.zeros(len(CLASS_NAMES), np.int64) for split in SPLITS}

    def write(self, blocks: Iterable[Block], ctx: TaskContext) -> tuple[list[dict], dict, list[str]]:
        import pyarrow.parquet as pq

        filesystem, root = storage.filesystem(self.out)
        rows, files, pixels = [], [], {split: np.zeros(len(CLASS_NAMES), np.int64) for split in SPLITS}
        for index, block in enumerate(blocks):
            table = BlockAccessor.for_block(block).to_arrow()
            splits = table["split"].to_numpy(zero_copy_only=False)
            for split in SPLITS:
                part = _rows(table, np.flatnonzero(splits == split))
                if part.num_rows:
                    files.append(f"{split}/part-{ctx.task_idx:05d}-{index:03d}.parquet")
                    path = f"{root}/{files[-1]}"
                    if filesystem is None:
                        Path(path).parent.mkdir(parents=True, exist_ok=True)
                    pq.write_table(part.select(SHARD_COLUMNS), path, filesystem=filesystem)
                    pixels[split] += part["class_pixels"].combine_chunks().to_numpy().sum(axis=0)
            rows += table.select(_META_COLUMNS).to_pylist()
        return rows, pixels, files

    def on_write_complete(self, write_result: WriteResult) -> None:
        for rows, pixels, files in write_result.write_returns:
            self.rows += rows
            self.files += files
            for split in SPLITS:
                self.class_pixels[split] += pixels[split]


def _check_visible(files: list[str], out: Location, target: Location) -> None:
    """One clear error when shard files the tasks wrote into ``out`` are not there from here: tasks on other nodes
    wrote them to their own disks (a local OUT on a cluster), and the manifest would name what no node can read."""
    present = {f"{split}/{name}" for split in SPLITS for name in storage.entries(storage.join(out, split))}
    unseen = sorted(set(files) - present)
    if unseen:
        raise UserError(f"{target}: {len(unseen)} of the {len(files)} shard files the Ray tasks wrote are not there "
                        f"from the driver (first {unseen[0]}): tasks on other nodes wrote them to their own disks. "
                        "OUT must be on storage every node sees at the same path (a shared file system) or a URI")


def _rows(table, indices: np.ndarray):
    """The rows of ``table`` at ``indices``: a zero-copy slice when they follow each other (the pairs come sorted by
    split, so a block's rows of a split are one run unless a skipped pair breaks it)."""
    if len(indices) and indices[-1] - indices[0] + 1 == len(indices):
        return table.slice(int(indices[0]), len(indices))
    return table.take(indices)


def _assign_splits(cfg: PrepareConfig, found: Discovery) -> tuple[list[Pair], list[Skip]]:
    """Give each pair its split: the layout's, the official lists', or the name hash."""
    skipped = list(found.skipped)
    if found.layout == "rmldnn":
        return found.pairs, skipped
    if cfg.split == "hash":
        return [_with_split(p, hash_split(p.name, cfg.seed, cfg.test_fraction)) for p in found.pairs], skipped
    if found.layout != "oxford":
        raise UserError(f"--split official needs the oxford layout, {cfg.src} is {found.layout}")
    official = official_split(cfg.src)
    pairs = []
    for pair in found.pairs:
        split = official.get(pair.name.rsplit(".", 1)[0])
        if split:
            pairs.append(_with_split(pair, split))
        else:
            detail = "listed in neither trainval.txt nor test.txt"
            skipped += [Skip(pair.image, "not in the official split", detail),
                        Skip(pair.mask, "not in the official split", detail)]
    return pairs, skipped


def _with_split(pair: Pair, split: str) -> Pair:
    return Pair(pair.name, pair.image, pair.mask, split)


def _decode_dataset(cfg: PrepareConfig, found: Discovery, pairs: list[Pair], export: Path | None):
    import ray

    root = cfg.src.resolve()
    # Paths travel as bytes (file names need not be UTF-8), names as text with such bytes written \xNN.
    rows = [{"name": display_name(p.name), "image_path": display_name(p.image), "mask_path": display_name(p.mask),
             "image_file": os.fsencode(root / p.image), "mask_file": os.fsencode(root / p.mask), "split": p.split}
            for p in sorted(pairs, key=lambda p: p.split)]  # stable: listing order within a split
    # Each block is one task that decodes it in one call and writes it.
    items = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / PAIRS_PER_TASK))
    return items.map_batches(
        _decode_batch,
        batch_size=None,
        fn_kwargs={
            "size": cfg.size,
            "mask_values": found.mask_values,
            "mask_offset": found.mask_offset,
            "export": str(export) if export else None,
        },
    )


_META_COLUMNS = ["name", "split", "image_path", "repair", "skip_file", "reason", "detail", "partner"]


def _decode_batch(batch: dict[str, np.ndarray], *, size: tuple[int, int], mask_values: tuple[int, ...],
                  mask_offset: int, export: str | None) -> dict[str, np.ndarray]:
    """Ray Data UDF: read, decode, check, resize (and optionally export) each pair of the batch.

    A pair that cannot be used becomes a row with split "skipped", blank pixels and the reason.
    """
    rows = []
    for name, image_rel, mask_rel, image_file, mask_file, split in zip(
            batch["name"], batch["image_path"], batch["mask_path"], batch["image_file"], batch["mask_file"],
            batch["split"], strict=True):
        row = {"name": name, "split": split, "image_path": image_rel, "repair": "", "skip_file": "",
               "reason": "", "detail": "", "partner": "", "height": 0, "width": 0}
        try:
            decoded, truth = _load_pair((image_rel, bytes(image_file)), (mask_rel, bytes(mask_file)), mask_values,
                                        mask_offset, None if export else size)
        except _PairError as err:
            row.update(split="skipped", skip_file=err.file, partner=err.partner, reason=err.cause.reason,
                       detail=err.cause.detail, image=np.zeros((*size, 3), np.uint8), mask=np.zeros(size, np.uint8))
        else:
            if export:
                _export_pair(Path(export) / _EXPORT_FOLDERS[split], name, os.fsdecode(bytes(image_file)), decoded,
                             truth)
            row.update(image=resize_image(decoded.pixels, size), mask=resize_mask(truth, size),
                       height=truth.shape[0], width=truth.shape[1], repair=decoded.repair)
        row["class_pixels"] = np.bincount(row["mask"].ravel(), minlength=len(CLASS_NAMES))
        rows.append(row)
    return {key: (np.stack if key in ("image", "mask", "class_pixels") else np.asarray)([r[key] for r in rows])
            for key in rows[0]}


class _PairError(Exception):
    """``file`` of a pair cannot be used because of ``cause``; ``partner`` is the pair's other file."""

    def __init__(self, file: str, partner: str, cause: DecodeError) -> None:
        super().__init__(f"{file}: {cause}")
        self.file, self.partner, self.cause = file, partner, cause


def _load_pair(image: tuple[str, bytes], mask: tuple[str, bytes], mask_values: tuple[int, ...], mask_offset: int,
               draft: tuple[int, int] | None):
    """Decode one image (repaired to RGB; a JPEG at the smallest DCT scale at least ``draft``) and its mask at full
    size, checking that they fit together. ``image`` and ``mask`` are (name, path)."""
    decoded = _decoded(image, mask[0], lambda data: decode_image(data, image[0], draft=draft))
    truth = _decoded(mask, image[0], lambda data: decode_mask(data, mask_values, mask_offset))
    if truth.shape != decoded.original_size:
        (mh, mw), (ih, iw) = truth.shape, decoded.original_size
        raise _PairError(mask[0], image[0],
                         DecodeError("mask size differs from image", f"mask {mw}x{mh}, image {iw}x{ih}"))
    return decoded, truth


def _decoded(file: tuple[str, bytes], partner: str, decode):
    """``decode`` of the bytes of ``file`` (name, path); any failure as a :class:`_PairError` naming the file."""
    try:
        return read_and_decode("", file[1], DEFAULT_MAX_FILE_MB * 2**20, decode)
    except DecodeError as err:
        raise _PairError(file[0], partner, err) from None


def _export_pair(folder: Path, name: str, source: str, image: DecodedImage, mask: np.ndarray) -> None:
    """Write one pair in rmldnn's layout at full size: the image as it was (or as PNG once repaired), the mask
    as a single-channel PNG of class ids."""
    stem = name.rsplit(".", 1)[0]
    image_path = folder / "inputs" / (name if not image.repair else f"{stem}.png")
    mask_path = folder / "masks" / f"{stem}.png"
    for path in (image_path, mask_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    if image.repair:
        Image.fromarray(image.pixels).save(image_path)
    else:
        shutil.copyfile(source, image_path)
    Image.fromarray(mask, mode="L").save(mask_path)


def _manifest(cfg: PrepareConfig, found: Discovery, used: list[dict], skipped: list[Skip],
              class_pixels: dict[str, np.ndarray]) -> dict:
    counts = {split: sum(r["split"] == split for r in used) for split in SPLITS}
    pixels = {split: dict(zip(CLASS_NAMES, map(int, class_pixels[split]), strict=True)) for split in SPLITS}
    if found.files != 2 * len(used) + len(skipped):
        raise RuntimeError(f"file accounting broken: {found.files} found, {2 * len(used)} used, "
                           f"{len(skipped)} skipped")
    height, width = cfg.size
    return {
        "version": MANIFEST_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": str(cfg.src.resolve()),
        "layout": found.layout,
        "image_size": {"height": height, "width": width},
        "split": {"rule": "given" if found.layout == "rmldnn" else cfg.split,
                  "test_fraction": cfg.test_fraction, "seed": cfg.seed},
        "classes": list(CLASS_NAMES),
        "mask_values": {"source": list(found.mask_values), "offset": found.mask_offset},
        "counts": counts,
        "files": {"candidates": found.files, "used": 2 * len(used), "skipped": len(skipped)},
        "skip_reasons": dict(Counter(s.reason for s in skipped).most_common()),
        "skipped": [asdict(s) for s in sorted(skipped, key=lambda s: s.file)],
        "repaired": sorted(({"file": r["image_path"], "repair": r["repair"]} for r in used if r["repair"]),
                           key=lambda r: r["file"]),
        "class_pixels": pixels,
        "class_frequency": {split: {name: n / max(sum(pixels[split].values()), 1) for name, n in pixels[split].items()}
                            for split in SPLITS},
        "columns": {"name": "image path relative to the images root", "image": "uint8 (H, W, 3) RGB",
                    "mask": "uint8 (H, W) class ids", "height": "original image height",
                    "width": "original image width"},
        "export_rmldnn": str(cfg.export_rmldnn.resolve()) if cfg.export_rmldnn else None,
    }


def _reasons_line(skipped: list[Skip]) -> str:
    counts = Counter(s.reason for s in skipped)
    return "; ".join(f"{n} {reason}" for reason, n in counts.most_common()) or "no candidate files"


def _fail_strict(skipped: list[Skip]) -> None:
    first = min(skipped, key=lambda s: (s.reason == PARTNER_SKIPPED, s.file))  # name the file at fault
    detail = f" ({first.detail})" if first.detail else ""
    raise UserError(f"--strict: {first.file}: {first.reason}{detail}; {len(skipped)} file(s) would be skipped")


def describe_manifest(manifest: dict, out: Location) -> str:
    """The few lines ``raypets prepare`` prints: counts per split and skips per reason."""
    counts, files = manifest["counts"], manifest["files"]
    lines = [f"prepared {out}: {counts['train']} train + {counts['test']} test pairs at "
             f"{manifest['image_size']['width']}x{manifest['image_size']['height']} ({manifest['layout']} layout)",
             f"files: {files['candidates']} found, {files['used']} used, {files['skipped']} skipped"]
    lines += [f"  skipped {n}: {reason}" for reason, n in manifest["skip_reasons"].items()]
    if manifest["repaired"]:
        lines.append(f"  repaired {len(manifest['repaired'])} image(s) to RGB (listed in manifest.json)")
    return redact("\n".join(lines))

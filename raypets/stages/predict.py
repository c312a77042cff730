"""``raypets predict``: batch inference with Ray Data, from a tree of images to HDF5 softmax predictions.

The driver lists the files and loads the checkpoint once (a wrong one fails here, before any Ray work). Then a CPU
stage reads, decodes (any format and mode, repaired to RGB) and resizes each image; a file that cannot be decoded
becomes a row with its reason instead of an exception. An actor pool holds the model (one GPU per actor, or CPU
actors, into which Ray Data then fuses the decode stage) and skips those rows; :class:`raypets.stages.hdf5.HDF5Sink`
writes the softmax of the others and lists the rest. Batches are formed in input order, so a re-run gives the same
floats. The output is built where no reader sees it half-written (:func:`raypets.outputs.staged_output`: a hidden
``.OUTPUT.partial`` folder, or a local temp folder uploaded to an OUTPUT URI). The checkpoint may be a URI.
"""

from __future__ import annotations

import csv
import os
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image
from ray.data import ActorPoolStrategy
from torch import nn

from raypets import storage
from raypets.checkpoints import checkpoint_classes, load_model, resolve_checkpoint
from raypets.config import DEVICES
from raypets.data.decode import IMAGE_SUFFIXES, DecodeError, decode_image, resize_image, resize_mask
from raypets.errors import UserError
from raypets.inference import ModelRunner
from raypets.model import require_image_size
from raypets.outputs import check_output_folder, staged_output
from raypets.stages.hdf5 import INDEX_FILE, OUTPUT_FILE, HDF5Sink
from raypets.stages.runtime import cpu_share, init_ray, use_gpus
from raypets.storage import Location

PRECISIONS = {"single": "float32", "half": "float16"}
ERRORS_FILE = "errors.csv"
PREDICT_ENTRIES = frozenset({OUTPUT_FILE, INDEX_FILE, ERRORS_FILE, "masks", "overlays"})
# Overlay tint of each class id (the class named "background" is left untinted).
PALETTE = np.array([(255, 64, 32), (32, 96, 255), (255, 224, 0), (0, 200, 80), (200, 0, 200), (0, 200, 200)], np.uint8)


@dataclass(frozen=True)
class PredictConfig:
    """Settings of ``raypets predict``; ``normalize`` (mean, std) and ``network`` override the checkpoint's."""

    checkpoint: Location  # a path or a URI, as output
    input: Path
    output: Location
    batch_size: int = 16
    workers: int | None = None  # model actors; default one per GPU on a GPU cluster, else 2
    device: str = "auto"
    precision: str = "single"
    size: tuple[int, int] = (160, 160)  # network input (height, width)
    normalize: tuple[float, float] | None = None
    network: Path | None = None
    masks: bool = False
    overlays: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.workers is None or self.workers >= 1, f"--workers must be at least 1, got {self.workers}"),
            (self.device in DEVICES, f"unknown device {self.device!r}; choose {', '.join(DEVICES)}"),
            (self.precision in PRECISIONS, f"unknown precision {self.precision!r}; choose single or half"),
            (self.normalize is None or self.normalize[1] > 0, f"normalize std must be positive: {self.normalize}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        require_image_size(*self.size, "--size")


@dataclass(frozen=True)
class Inputs:
    """The image files to predict: absolute paths, their names in the output, and the files left out."""

    paths: list[str]
    names: list[str]
    ignored: int  # hidden files and files without an image suffix


def list_inputs(source: Path, exclude: Path | None = None) -> Inputs:
    """Image files under folder ``source`` (recursive), or named by ``source``: one image, or a text file listing
    one path per line (relative to the list's folder; ``#`` comments). Names are paths relative to the folder, or to
    the deepest folder holding every listed file. Hidden files and folders and other suffixes are left out."""
    if source.is_dir():
        root = source.resolve()
        candidates = [p for p in sorted(root.rglob("*")) if not p.is_dir()]
        if exclude is not None:
            candidates = [p for p in candidates if not p.is_relative_to(exclude.resolve())]
    elif source.suffix.lower() in IMAGE_SUFFIXES:
        root, candidates = source.resolve().parent, [source.resolve()]
    else:
        try:
            lines = source.read_text().splitlines()
        except (UnicodeDecodeError, OSError) as err:
            raise UserError(f"{source}: neither a folder, an image nor a text list of image paths ({err})") from None
        listed = {(source.parent / line.strip()).resolve() for line in lines if line.strip()[:1] not in ("", "#")}
        candidates = sorted(listed)
        root = Path(os.path.commonpath([p.parent for p in candidates])) if candidates else source.parent
    images = [p for p in candidates if p.suffix.lower() in IMAGE_SUFFIXES
              and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return Inputs([str(p) for p in images], [p.relative_to(root).as_posix() for p in images],
                  len(candidates) - len(images))


def png_names(names: list[str]) -> list[str]:
    """Mask/overlay file names: ``a/b.jpg`` -> ``a/b.png``, or ``a/b.jpg.png`` when another input shares the stem."""
    stems = Counter(str(Path(name).with_suffix("")) for name in names)
    return [str(Path(name).with_suffix(".png")) if stems[str(Path(name).with_suffix(""))] == 1 else f"{name}.png"
            for name in names]


def predict(cfg: PredictConfig, *, address: str | None = None) -> dict:
    """Predict every image of ``cfg.input`` into ``cfg.output``; return the summary (see :func:`describe_predictions`).
    """
    started = time.perf_counter()
    if not cfg.input.exists():
        raise UserError(f"{cfg.input}: input does not exist")
    check_output_folder(cfg.output, "prediction output", ours=PREDICT_ENTRIES, overwrite=cfg.overwrite)
    uri = storage.is_uri(cfg.output)
    inputs = list_inputs(cfg.input, exclude=None if uri else cfg.output)
    if not inputs.paths:
        raise UserError(f"{cfg.input}: no image files found ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                        f"{inputs.ignored} other file(s) ignored")
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    model = load_model(checkpoint, network=cfg.network)
    with torch.inference_mode():
        num_classes = model(torch.zeros(1, 3, *cfg.size)).shape[1]
    classes = checkpoint_classes(checkpoint, num_classes)
    init_ray(address)
    workers = cfg.workers or default_workers(cfg.device)
    use_gpu = use_gpus(cfg.device, workers, "model actor")
    attrs = {"class_names": list(classes), "network_size": list(cfg.size), "precision": cfg.precision,
             "checkpoint": checkpoint.uri or str(checkpoint.weights.resolve())}
    hook = partial(write_pngs, masks=cfg.masks, overlays=cfg.overlays,
                   background=classes.index("background") if "background" in classes else -1)
    with staged_output(cfg.output, local=True) as staging:  # h5py writes local files
        sink = HDF5Sink(staging, attrs, on_row=hook if cfg.masks or cfg.overlays else None)
        rows = [{"path": path, "key": key, "png": png}
                for path, key, png in zip(inputs.paths, inputs.names, png_names(inputs.names), strict=True)]
        data = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // cfg.batch_size, 1000)))
        data.context.execution_options.preserve_order = True  # the same batches every run: the same floats
        # The decode stage asks for the CPUs of a model actor: beside CPU actors Ray Data then fuses it into them
        # (each decodes its own batches, no extra process or object-store copy: faster on 2 cores); beside GPU
        # actors (which also ask for a GPU) it stays a pool of CPU tasks that keeps the GPUs fed.
        actor_cpus = 1 if use_gpu else cpu_share(workers)
        decoded = data.map_batches(_decode_batch, batch_size=cfg.batch_size, fn_kwargs={"size": cfg.size},
                                   num_cpus=actor_cpus)
        predicted = decoded.map_batches(
            Predictor, batch_size=cfg.batch_size, compute=ActorPoolStrategy(size=workers),
            fn_constructor_kwargs={"model": model, "num_classes": num_classes, "use_gpu": use_gpu,
                                   "normalize": cfg.normalize or checkpoint.normalize, "workers": workers,
                                   "dtype": PRECISIONS[cfg.precision]},
            num_cpus=actor_cpus, num_gpus=1 if use_gpu else 0)
        predicted.write_datasink(sink, concurrency=1)
        with open(staging / ERRORS_FILE, "w", newline="") as out:
            csv.writer(out).writerows([("file", "reason", "detail"), *sink.errors])
    seconds = time.perf_counter() - started
    return {"output": str(cfg.output), "written": len(sink.written), "ignored": inputs.ignored,
            "skipped": dict(Counter(reason for _, reason, _ in sink.errors).most_common()),
            "seconds": seconds, "images_per_s": len(sink.written) / seconds, "workers": workers,
            "device": "gpu" if use_gpu else "cpu"}


def describe_predictions(summary: dict) -> str:
    """The lines ``raypets predict`` prints: written, skipped per reason, ignored, speed."""
    skipped = sum(summary["skipped"].values())
    lines = [f"predicted {summary['written']} image(s) into {summary['output']} in {summary['seconds']:.1f} s "
             f"({summary['images_per_s']:.1f} images/s, {summary['workers']} {summary['device']} model actor(s)); "
             f"{skipped} skipped" + (f", listed in {ERRORS_FILE}" if skipped else "")]
    lines += [f"  skipped {n}: {reason}" for reason, n in summary["skipped"].items()]
    if summary["ignored"]:
        lines.append(f"  ignored {summary['ignored']} hidden or non-image file(s)")
    return "\n".join(lines)


def default_workers(device: str) -> int:
    """One actor per GPU of the cluster; else two CPU actors sharing the cores (on 2 cores, two single-threaded
    processes predicted faster than one with two threads)."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if device != "cpu" and gpus:
        return gpus
    return 1 if device == "gpu" else 2


def _decode_batch(batch: dict[str, np.ndarray], *, size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Ray Data UDF: read, decode and resize each file; one that fails gets blank pixels, size 0 and its reason."""
    images, sizes, reasons, details = [], [], [], []
    for path, key in zip(batch["path"], batch["key"], strict=True):
        pixels, reason, detail = np.zeros((0, 0, 3), np.uint8), "", ""
        try:
            pixels = decode_image(Path(path).read_bytes(), key).pixels
        except DecodeError as err:
            reason, detail = err.reason, err.detail
        except OSError as err:
            reason, detail = "unreadable file", err.strerror or str(err)
        images.append(resize_image(pixels, size) if pixels.size else np.zeros((*size, 3), np.uint8))
        sizes.append(pixels.shape[:2])
        reasons.append(reason)
        details.append(detail)
    sizes = np.array(sizes, np.int64).reshape(-1, 2)
    return {**batch, "image": np.stack(images), "height": sizes[:, 0], "width": sizes[:, 1],
            "reason": np.array(reasons, dtype=object), "detail": np.array(details, dtype=object)}


class Predictor(ModelRunner):
    """Ray Data actor holding the model: uint8 images -> softmax probabilities (N, C, H, W) in ``dtype``.

    The softmax is float32 before the cast. Rows with a decode ``reason`` are not fed to the model; they get zeros
    and stay in the batch so the sink can list them.
    """

    def __init__(self, model: nn.Module, num_classes: int, normalize: tuple[float, float], use_gpu: bool,
                 workers: int, dtype: str) -> None:
        super().__init__(model, normalize, use_gpu, workers)
        self.num_classes = num_classes
        self.dtype = np.dtype(dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["reason"] == ""
        images = batch.pop("image")
        probs = np.zeros((len(images), self.num_classes, *images.shape[1:3]), self.dtype)
        if ok.any():
            probs[ok] = torch.softmax(self.logits(images[ok]).float(), dim=1).cpu().numpy()
        return {**batch, "probs": probs}


def write_pngs(row: dict, folder: Path, *, masks: bool, overlays: bool, background: int) -> None:
    """The class-id mask of one prediction at the image's original size (nearest), and/or its colour overlay."""
    mask = resize_mask(row["probs"].argmax(0).astype(np.uint8), (int(row["height"]), int(row["width"])))
    if masks:
        _save(mask, folder / "masks" / row["png"])
    if overlays:
        pixels = decode_image(Path(row["path"]).read_bytes(), row["key"]).pixels
        tinted = (pixels.astype(np.uint16) + PALETTE[mask % len(PALETTE)]) // 2
        overlay = np.where((mask == background)[..., None], pixels, tinted).astype(np.uint8)
        _save(overlay, folder / "overlays" / row["png"])


def _save(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)

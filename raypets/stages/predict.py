"""``raypets predict``: batch inference with Ray Data, from images anywhere to HDF5, Parquet or PNG predictions.

The driver lists the files (:mod:`raypets.data.sources`: a folder, a list, an object-store prefix; names only) and
loads the checkpoint once (a wrong one fails here, before any Ray work). Then a CPU stage reads, decodes (JPEGs at
the smallest DCT scale at least the network size; any format and mode repaired to RGB; the EXIF orientation
applied) and resizes each image where it runs; a file that cannot be read or decoded becomes a row with its reason
instead of an exception, so one bad file never costs the others. An actor pool holds the model (one GPU per
actor, or CPU actors, into which Ray Data then fuses the decode stage), skips those rows, and turns the others into
softmax probabilities and, when an output needs them, class-id masks at each image's original size (the
probabilities resized bilinearly, then the argmax). A sink of :mod:`raypets.stages.prediction_sinks` writes them in
parallel tasks straight to OUTPUT and lists the rest. Batches are formed in input order, so a re-run gives the same
floats. OUTPUT is built in a hidden ``.OUTPUT.partial`` folder (or prefix) beside it and put in place at the end,
``_SUCCESS`` last (:func:`raypets.outputs.staged_output`): a reader takes an output without it for unfinished.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np
import ray
import torch
from ray.data import ActorPoolStrategy
from torch import nn

from raypets import storage
from raypets.checkpoints import Checkpoint, checkpoint_classes, load_model, resolve_checkpoint
from raypets.config import DEVICES
from raypets.data.decode import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, DecodeError, decode_to_size
from raypets.data.sources import DEFAULT_MAX_FILE_MB, list_inputs, read_and_decode
from raypets.errors import UserError
from raypets.inference import ModelRunner, full_size_mask
from raypets.model import require_image_size
from raypets.outputs import DONE, check_output_folder, staged_output
from raypets.precision import PRECISIONS, resolve_precision
from raypets.redaction import redact
from raypets.stages.hdf5 import HDF5Sink
from raypets.stages.prediction_sinks import ParquetSink, PngSink, PredictionSink, put_bytes
from raypets.stages.runtime import cpu_share, data_context, init_ray, use_gpus
from raypets.storage import Location

FORMATS = ("hdf5", "parquet", "png")
HDF5_PRECISIONS = {"single": "float32", "half": "float16"}
ERRORS_FILE, REPAIRS_FILE = "errors.csv", "repairs.csv"
# What an earlier predict output holds; `--overwrite` replaces only a folder made of these.
_OURS = re.compile(rf"(output_\d+\.h5|predictions\.h5|errors\.csv|repairs\.csv|masks|overlays|predictions|{DONE})")
CPU_BATCH, GPU_BATCH = 16, 128  # images per model call by default
ROWS_PER_FILE = 128  # at most, per output_<k>.h5 or part-<k>.parquet: a write task starts once it has them


@dataclass(frozen=True)
class PredictConfig:
    """Settings of ``raypets predict``; ``normalize`` (mean, std) and ``network`` override the checkpoint's."""

    checkpoint: Location  # a path or a URI, as input and output
    input: Location
    output: Location
    batch_size: int | None = None  # default CPU_BATCH, GPU_BATCH on GPU actors
    workers: int | None = None  # model actors; default one per GPU on a GPU cluster, else 2
    device: str = "auto"
    precision: str = "auto"  # autocast: bf16/fp16 on a GPU, fp32 on a CPU
    hdf5_precision: str = "single"
    size: tuple[int, int] = (160, 160)  # network input (height, width)
    normalize: tuple[float, float] | None = None
    network: Path | None = None
    format: str = "hdf5"
    writers: int = 1  # write tasks at once; also the fewest output files
    probabilities: bool = False  # parquet: also the softmax
    masks: bool = False
    overlays: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_mb: float = DEFAULT_MAX_FILE_MB
    overwrite: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size is None or self.batch_size >= 1, f"--batch-size must be at least 1: {self.batch_size}"),
            (self.workers is None or self.workers >= 1, f"--workers must be at least 1, got {self.workers}"),
            (self.writers >= 1, f"--writers must be at least 1, got {self.writers}"),
            (self.device in DEVICES, f"unknown device {self.device!r}; choose {', '.join(DEVICES)}"),
            (self.precision in PRECISIONS, f"unknown precision {self.precision!r}; choose {', '.join(PRECISIONS)}"),
            (self.hdf5_precision in HDF5_PRECISIONS,
             f"unknown HDF5 precision {self.hdf5_precision!r}; choose single or half"),
            (self.format in FORMATS, f"unknown format {self.format!r}; choose {', '.join(FORMATS)}"),
            (not self.probabilities or self.format == "parquet", "--probabilities needs --format parquet"),
            (self.max_pixels >= 1 and self.max_file_mb > 0, "--max-pixels and --max-file-mb must be positive"),
            (self.normalize is None or self.normalize[1] > 0, f"normalize std must be positive: {self.normalize}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        require_image_size(*self.size, "--size")

    @property
    def max_bytes(self) -> int:
        return int(self.max_file_mb * 2**20)

    @property
    def needs_masks(self) -> bool:
        return self.format != "hdf5" or self.masks or self.overlays

    @property
    def needs_probs(self) -> bool:
        return self.format == "hdf5" or self.probabilities


def png_names(names: list[bytes]) -> list[bytes]:
    """Mask/overlay file names: ``a/b.jpg`` -> ``a/b.png``, or ``a/b.jpg.png`` when another input shares the stem."""
    paths = [PurePosixPath(os.fsdecode(name)) for name in names]
    stems = Counter(path.with_suffix("") for path in paths)
    return [os.fsencode(path.with_suffix(".png") if stems[path.with_suffix("")] == 1 else f"{path}.png")
            for path in paths]


def predict(cfg: PredictConfig, *, address: str | None = None) -> dict:
    """Predict every image of ``cfg.input`` into ``cfg.output``; return the summary (see :func:`describe_predictions`).
    """
    started = time.perf_counter()
    check_output_folder(cfg.output, "prediction output", ours=_ours(cfg.output), overwrite=cfg.overwrite)
    inputs = list_inputs(cfg.input, exclude=None if storage.is_uri(cfg.output) else Path(cfg.output))
    if not inputs.sources:
        raise UserError(f"{cfg.input}: no image files found ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                        f"{inputs.ignored} other file(s) ignored")
    if cfg.device == "cpu":
        resolve_precision(cfg.precision, torch.device("cpu"))  # one clear error for fp16 on CPU, before any work
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    model = load_model(checkpoint, network=cfg.network)
    with torch.inference_mode():
        num_classes = model.eval()(torch.zeros(1, 3, 16, 16)).shape[1]
    classes = checkpoint_classes(checkpoint, num_classes)
    init_ray(address)
    workers = cfg.workers or default_workers(cfg.device)
    use_gpu = use_gpus(cfg.device, workers, "model actor")
    if not use_gpu:
        resolve_precision(cfg.precision, torch.device("cpu"))
    rows = [{"root": s.root, "path": s.path, "key": s.name, "png": png}
            for s, png in zip(inputs.sources, png_names([s.name for s in inputs.sources]), strict=True)]
    actors = {"model": model, "num_classes": num_classes, "use_gpu": use_gpu, "workers": workers,
              "normalize": cfg.normalize or checkpoint.normalize, "precision": cfg.precision,
              "dtype": HDF5_PRECISIONS[cfg.hdf5_precision], "probs": cfg.needs_probs, "masks": cfg.needs_masks}
    with staged_output(cfg.output, marker=DONE) as out:
        sink = _sink(cfg, out, classes, checkpoint, images=len(rows))
        batch_size = cfg.batch_size or (GPU_BATCH if use_gpu else CPU_BATCH)
        _pipeline(cfg, rows, actors, batch_size).write_datasink(sink, concurrency=cfg.writers)
        _write_csv(out, ERRORS_FILE, ("file", "reason", "detail"), sink.errors)
        if sink.repaired:
            _write_csv(out, REPAIRS_FILE, ("file", "repair"), sorted(sink.repaired.items()))
        storage.write_text(storage.join(out, DONE), "")  # last: the output is complete
    seconds = time.perf_counter() - started
    return {"output": str(cfg.output), "format": cfg.format, "written": len(sink.written), "ignored": inputs.ignored,
            "skipped": dict(Counter(reason for _, reason, _ in sink.errors).most_common()),
            "repaired": len(sink.repaired), "files": len(set(sink.written.values()) - {""}), "seconds": seconds,
            "images_per_s": len(sink.written) / seconds, "workers": workers, "device": "gpu" if use_gpu else "cpu"}


def _pipeline(cfg: PredictConfig, rows: list[dict], actors: dict, batch_size: int) -> ray.data.Dataset:
    """The files of ``rows`` decoded and predicted, in input order, by actors made with ``actors``."""
    # Ray Data's per-operator reservations only held tasks back here (as in prepare). Blocks of at most one batch
    # (Ray Data splits evenly): no one-image batch after each block's 16.
    with data_context(op_resource_reservation_enabled=False):
        data = ray.data.from_items(rows, override_num_blocks=min(math.ceil(len(rows) / batch_size), 1000))
    data.context.execution_options.preserve_order = True  # the same batches every run: the same floats
    # The decode stage asks for the CPUs of a model actor: beside CPU actors Ray Data then fuses it into them (each
    # decodes its own batches, no extra process or object-store copy: faster on 2 cores); beside GPU actors (which
    # also ask for a GPU) it stays a pool of CPU tasks that keeps the GPUs fed.
    actor_cpus = 1 if actors["use_gpu"] else cpu_share(actors["workers"])
    decoded = data.map_batches(_decode_batch, batch_size=batch_size, num_cpus=actor_cpus,
                               fn_kwargs={"size": cfg.size, "max_pixels": cfg.max_pixels, "max_bytes": cfg.max_bytes})
    return decoded.map_batches(Predictor, batch_size=batch_size, compute=ActorPoolStrategy(size=actors["workers"]),
                               fn_constructor_kwargs=actors, num_cpus=actor_cpus,
                               num_gpus=1 if actors["use_gpu"] else 0)


def describe_predictions(summary: dict) -> str:
    """The lines ``raypets predict`` prints: written, skipped per reason, repaired, ignored, speed."""
    skipped = sum(summary["skipped"].values())
    files = f" ({summary['files']} {summary['format']} file(s))" if summary.get("files") else ""
    lines = [f"predicted {summary['written']} image(s) into {summary['output']}{files} in {summary['seconds']:.1f} s "
             f"({summary['images_per_s']:.1f} images/s, {summary['workers']} {summary['device']} model actor(s)); "
             f"{skipped} skipped" + (f", listed in {ERRORS_FILE}" if skipped else "")]
    lines += [f"  skipped {n}: {reason}" for reason, n in summary["skipped"].items()]
    if summary.get("repaired"):
        lines.append(f"  repaired {summary['repaired']} image(s) (listed in {REPAIRS_FILE})")
    if summary["ignored"]:
        lines.append(f"  ignored {summary['ignored']} hidden or non-image file(s)")
    return redact("\n".join(lines))


def default_workers(device: str, on_cpu: int = 2) -> int:
    """One worker per GPU of the cluster; else ``on_cpu`` CPU workers sharing the cores (for predict's actors two: on
    2 cores, two single-threaded processes predicted faster than one with two threads)."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if device != "cpu" and gpus:
        return gpus
    return 1 if device == "gpu" else on_cpu


def _ours(output: Location) -> frozenset[str]:
    return frozenset(entry for entry in storage.entries(output) if _OURS.fullmatch(entry))


def _sink(cfg: PredictConfig, out: Location, classes: list[str], checkpoint: Checkpoint,
          images: int) -> PredictionSink:
    """The sink of ``cfg.format``; each write task takes at least 1/``cfg.writers`` of the rows, at most
    ``ROWS_PER_FILE`` (once blocks add up to that many)."""
    common = {"rows_per_file": min(ROWS_PER_FILE, math.ceil(images / cfg.writers)), "masks": cfg.masks,
              "overlays": cfg.overlays, "background": classes.index("background") if "background" in classes else -1,
              "max_pixels": cfg.max_pixels, "max_bytes": cfg.max_bytes}
    if cfg.format == "parquet":
        return ParquetSink(out, probabilities=cfg.probabilities, **common)
    if cfg.format == "png":
        return PngSink(out, **{**common, "rows_per_file": None})
    attrs = {"class_names": list(classes), "network_size": list(cfg.size), "precision": cfg.hdf5_precision,
             "autocast": cfg.precision, "checkpoint": redact(checkpoint.uri or str(checkpoint.weights.resolve()))}
    return HDF5Sink(out, attrs, **common)


def _write_csv(out: Location, name: str, header: tuple[str, ...], rows: list[tuple]) -> None:
    """A CSV whose first column is a file name, written with that name's own bytes (not all names are UTF-8)."""
    text = io.StringIO()
    csv.writer(text).writerows([header, *((os.fsdecode(first), *rest) for first, *rest in rows)])
    put_bytes(out, name, text.getvalue().encode("utf-8", "surrogateescape"))


def _decode_batch(batch: dict[str, np.ndarray], *, size: tuple[int, int], max_pixels: int,
                  max_bytes: int) -> dict[str, np.ndarray]:
    """Ray Data UDF: read, decode and resize each file; one that fails gets blank pixels, size 0 and its reason."""
    images, sizes, repairs, reasons, details = [], [], [], [], []
    for root, path, key in zip(batch["root"], batch["path"], batch["key"], strict=True):
        pixels, original, repair, reason, detail = None, (0, 0), "", "", ""
        try:
            pixels, decoded = read_and_decode(str(root), bytes(path), max_bytes, partial(
                decode_to_size, size=size, name=os.fsdecode(bytes(key)), max_pixels=max_pixels))
            original, repair = decoded.original_size, decoded.repair
        except DecodeError as err:
            reason, detail = err.reason, err.detail
        images.append(pixels if pixels is not None else np.zeros((*size, 3), np.uint8))
        sizes.append(original)
        repairs.append(repair)
        reasons.append(reason)
        details.append(detail)
    sizes = np.array(sizes, np.int64).reshape(-1, 2)
    return {**batch, "image": np.stack(images), "height": sizes[:, 0], "width": sizes[:, 1],
            "repair": np.array(repairs, dtype=object), "reason": np.array(reasons, dtype=object),
            "detail": np.array(details, dtype=object)}


class Predictor(ModelRunner):
    """Ray Data actor holding the model: uint8 images -> ``probs``, the softmax (N, C, H, W) in ``dtype`` (float32
    until the cast, which happens on the model's device), and/or ``mask``, the class ids at each image's original
    size. Rows with a decode ``reason`` are not fed to the model; they stay in the batch so the sink lists them."""

    def __init__(self, model: nn.Module, num_classes: int, normalize: tuple[float, float], use_gpu: bool,
                 workers: int, precision: str, dtype: str, probs: bool, masks: bool) -> None:
        super().__init__(model, normalize, use_gpu, workers, precision)
        self.num_classes = num_classes
        self.dtype = getattr(torch, dtype)  # the cast happens on the device, before the copy back
        self.np_dtype = np.dtype(dtype)
        self.keep_probs, self.keep_masks = probs, masks

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.flatnonzero(batch["reason"] == "")
        images = batch.pop("image")
        probs = self.probabilities(images[ok]) if len(ok) else None
        if self.keep_probs:
            batch["probs"] = _scatter(probs.to(self.dtype).cpu().numpy() if len(ok) else None, ok,
                                      (len(images), self.num_classes, *images.shape[1:3]), self.np_dtype)
        if self.keep_masks:
            masks = np.empty(len(images), dtype=object)
            masks[:] = [np.zeros((0, 0), np.uint8)] * len(images)
            for j, i in enumerate(ok):
                size = (int(batch["height"][i]), int(batch["width"][i]))
                masks[i] = full_size_mask(probs[j], size).cpu().numpy()
            batch["mask"] = masks
        return batch


def _scatter(values: np.ndarray | None, rows: np.ndarray, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """``values`` at ``rows`` of a zero array of ``shape`` (no copy when every row has a value)."""
    if values is not None and len(rows) == shape[0]:
        return values
    out = np.zeros(shape, dtype)
    if values is not None:
        out[rows] = values
    return out

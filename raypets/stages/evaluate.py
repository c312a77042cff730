"""``raypets evaluate``: a checkpoint's metrics over a prepared split, with Ray Data and the training accumulator.

Model actors score batches of the split into confusion matrices; the driver sums them into one
:class:`~raypets.metrics.ConfusionMatrix`, so the numbers are those the training run reports for its test split.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import ray
import torch

from raypets.checkpoints import load_model, resolve_checkpoint
from raypets.errors import UserError
from raypets.inference import ModelRunner
from raypets.metrics import ConfusionMatrix, format_metric
from raypets.model import require_image_size
from raypets.outputs import check_output_file
from raypets.precision import PRECISIONS, resolve_precision
from raypets.redaction import redact
from raypets.stages.runtime import cpu_share, init_ray, use_gpus
from raypets.stages.shards import open_split, read_manifest
from raypets.storage import Location


class _Scorer(ModelRunner):
    """A model actor: a batch of the split in, its confusion matrix (flattened, one row) out."""

    def __init__(self, model: torch.nn.Module, normalize: tuple[float, float], classes: list[str], use_gpu: bool,
                 actors: int, precision: str) -> None:
        super().__init__(model, normalize, use_gpu, actors, precision)
        self.classes = classes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        logits = self.logits(batch["image"])
        if logits.shape[1] != len(self.classes):
            raise UserError(f"the checkpoint predicts {logits.shape[1]} classes, the data has {len(self.classes)}")
        matrix = ConfusionMatrix(len(self.classes), self.classes, device=self.device)
        matrix.update(logits, torch.from_numpy(batch["mask"]).to(self.device).long())
        return {"matrix": matrix.matrix.cpu().numpy().reshape(1, -1)}


def evaluate(checkpoint: Location, data: Location, split: str = "test", *, batch_size: int = 32, workers: int = 1,
             device: str = "auto", precision: str = "auto", network: Path | None = None,
             address: str | None = None) -> dict:
    """Metrics of ``checkpoint`` on ``split`` of the prepared ``data`` (either may be a URI): the keys of
    ``ConfusionMatrix.compute`` plus ``checkpoint``, ``data``, ``split`` and ``images``. ``precision``: the
    autocast of the forward pass (:mod:`raypets.precision`)."""
    if batch_size < 1 or workers < 1:
        raise UserError("--batch-size and --workers must be at least 1")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    if device == "cpu":
        resolve_precision(precision, torch.device("cpu"))  # one clear error for fp16 on a CPU, before any work
    resolved = resolve_checkpoint(checkpoint)
    manifest = read_manifest(data)
    size = manifest["image_size"]
    require_image_size(size["height"], size["width"], str(data))
    model = load_model(resolved, network=network)  # a checkpoint that does not fit fails here, before any Ray work
    classes = list(manifest["classes"])
    dataset = open_split(data, split, columns=["image", "mask"], manifest=manifest)

    init_ray(address)
    use_gpu = use_gpus(device, workers, "actor")
    if not use_gpu:
        resolve_precision(precision, torch.device("cpu"))  # one clear error for fp16 on CPU, before the actors
    matrices = dataset.map_batches(
        _Scorer, fn_constructor_args=(model, resolved.normalize, classes, use_gpu, workers, precision),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=1 if use_gpu else 0,
        num_cpus=1 if use_gpu else cpu_share(workers),
    )
    total = ConfusionMatrix(len(classes), classes)
    for batch in matrices.iter_batches(batch_size=None, batch_format="numpy"):
        total.matrix += torch.from_numpy(batch["matrix"].sum(0).reshape(len(classes), len(classes)))
    result = total.compute()
    return {"checkpoint": redact(resolved.uri or str(resolved.weights)), "data": redact(str(data)), "split": split,
            "images": result["total_pixels"] // (size["height"] * size["width"]), **result}


def format_metrics(result: dict) -> str:
    """A per-class table of Dice, IoU and pixel counts, then the means, as a person reads it."""
    lines = [f"{result['checkpoint']} on {result['data']} ({result['split']}, {result['images']} images)",
             f"{'class':<12}{'Dice':>8}{'IoU':>8}{'true px':>12}{'pred px':>12}"]
    for name in result["dice"]:
        lines.append(f"{name:<12}{format_metric(result['dice'][name]):>8}{format_metric(result['iou'][name]):>8}"
                     f"{result['true_pixels'][name]:>12}{result['pred_pixels'][name]:>12}")
    lines.append(f"{'mean':<12}{format_metric(result['mean_dice']):>8}{format_metric(result['mean_iou']):>8}")
    lines.append(f"pixel accuracy {format_metric(result['pixel_accuracy'])}")
    return "\n".join(lines)


def write_json(result: dict, path: Path, overwrite: bool = False) -> None:
    """The result as JSON (NaN as null); an existing file is replaced only when asked."""
    check_output_file(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_nan_to_none(result), indent=2) + "\n")


def _nan_to_none(value):
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value

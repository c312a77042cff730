"""``raypets evaluate``: a checkpoint's metrics over a prepared split, with Ray Data and the training accumulator.

Model actors score the split's images into one confusion matrix each; the driver sums them into one
:class:`~raypets.metrics.ConfusionMatrix`, so the numbers are those the training run reports for its test split,
and keeps each image's mean Dice to list the worst.
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
from raypets.inference import TTA, ModelRunner, tta_probabilities
from raypets.metrics import ConfusionMatrix, format_metric, image_matrices, mean_dice, nan_last
from raypets.model import require_image_size
from raypets.outputs import check_output_file
from raypets.precision import PRECISIONS, resolve_precision
from raypets.redaction import redact
from raypets.stages.runtime import cpu_share, init_ray, use_gpus
from raypets.stages.shards import open_split, read_manifest
from raypets.storage import Location

WORST = 10  # images listed by their mean Dice, lowest first


class _Scorer(ModelRunner):
    """A model actor: a batch of the split in, each image's name and confusion matrix (flattened) out."""

    def __init__(self, model: torch.nn.Module, normalize: tuple[float, float], classes: list[str], use_gpu: bool,
                 actors: int, precision: str, tta: str) -> None:
        super().__init__(model, normalize, use_gpu, actors, precision)
        self.classes, self.tta = classes, tta

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        probs = tta_probabilities(self, batch["image"], self.tta)
        if probs.shape[1] != len(self.classes):
            raise UserError(f"the checkpoint predicts {probs.shape[1]} classes, the data has {len(self.classes)}")
        target = torch.from_numpy(batch["mask"]).to(self.device)
        matrices = image_matrices(probs.argmax(1), target, len(self.classes))
        return {"name": batch["name"], "matrix": matrices.cpu().numpy().reshape(len(target), -1)}


def evaluate(checkpoint: Location, data: Location, split: str = "test", *, batch_size: int = 32, workers: int = 1,
             device: str = "auto", precision: str = "auto", tta: str = "none", network: Path | None = None,
             address: str | None = None) -> dict:
    """Metrics of ``checkpoint`` on ``split`` of the prepared ``data`` (either may be a URI): the keys of
    ``ConfusionMatrix.compute`` plus ``checkpoint``, ``data``, ``split``, ``images``, ``tta``,
    ``confusion_matrix`` (rows truth, columns prediction, in class order), ``per_image`` ({name: mean Dice}) and
    ``worst`` (the ``WORST`` lowest, as [name, mean Dice]). ``precision``: the autocast of the forward pass
    (:mod:`raypets.precision`); ``tta``: one of ``TTA``."""
    if batch_size < 1 or workers < 1:
        raise UserError("--batch-size and --workers must be at least 1")
    if tta not in TTA:
        raise UserError(f"unknown test-time augmentation {tta!r}; choose {', '.join(TTA)}")
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
    dataset = open_split(data, split, columns=["name", "image", "mask"], manifest=manifest)

    init_ray(address)
    use_gpu = use_gpus(device, workers, "actor")
    if not use_gpu:
        resolve_precision(precision, torch.device("cpu"))  # one clear error for fp16 on CPU, before the actors
    matrices = dataset.map_batches(
        _Scorer, fn_constructor_args=(model, resolved.normalize, classes, use_gpu, workers, precision, tta),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=1 if use_gpu else 0,
        num_cpus=1 if use_gpu else cpu_share(workers),
    )
    total = ConfusionMatrix(len(classes), classes)
    per_image = {}
    for batch in matrices.iter_batches(batch_size=None, batch_format="numpy"):
        images = torch.from_numpy(batch["matrix"]).reshape(-1, len(classes), len(classes))
        total.matrix += images.sum(0)
        per_image.update(zip(map(_text, batch["name"]), mean_dice(images).tolist(), strict=True))
    result = total.compute()
    ranked = sorted(per_image.items(), key=lambda item: (nan_last(item[1]), item[0]))  # worst first
    return {"checkpoint": redact(resolved.uri or str(resolved.weights)), "data": redact(str(data)), "split": split,
            "images": len(per_image), "tta": tta, **result, "confusion_matrix": total.matrix.tolist(),
            "per_image": dict(sorted(per_image.items())), "worst": [list(item) for item in ranked[:WORST]]}


def _text(name: str | bytes) -> str:
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


def format_metrics(result: dict) -> str:
    """A per-class table of Dice, IoU and pixel counts, then the means, as a person reads it."""
    lines = [f"{result['checkpoint']} on {result['data']} ({result['split']}, {result['images']} images)",
             f"{'class':<12}{'Dice':>8}{'IoU':>8}{'true px':>12}{'pred px':>12}"]
    for name in result["dice"]:
        lines.append(f"{name:<12}{format_metric(result['dice'][name]):>8}{format_metric(result['iou'][name]):>8}"
                     f"{result['true_pixels'][name]:>12}{result['pred_pixels'][name]:>12}")
    lines.append(f"{'mean':<12}{format_metric(result['mean_dice']):>8}{format_metric(result['mean_iou']):>8}")
    lines.append(f"pixel accuracy {format_metric(result['pixel_accuracy'])}"
                 + (f" (test-time augmentation: {result['tta']})" if result["tta"] != "none" else ""))
    lines.append("worst images by mean Dice: " + ", ".join(f"{name} {format_metric(dice)}"
                                                           for name, dice in result["worst"]))
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

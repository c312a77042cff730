"""Segmentation metrics from a confusion matrix summed over a whole test set and across workers.

rmldnn's test "accuracy" is the mean per-class Dice, which is ``mean_dice`` here; ``pixel_accuracy`` is the
fraction of counted pixels predicted right.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from raypets.classes import class_names as default_names


class ConfusionMatrix:
    """An int64 (C, C) confusion matrix, rows = truth, columns = prediction, kept on the device of the data.

    ``class_names`` default to :func:`raypets.classes.class_names`. Pixels whose target
    equals ``ignore_index`` are not counted.
    """

    def __init__(
        self,
        num_classes: int = 3,
        class_names: Sequence[str] | None = None,
        ignore_index: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is None:
            class_names = default_names(num_classes)
        if len(class_names) != num_classes or len(set(class_names)) != num_classes:
            raise ValueError(f"need {num_classes} distinct class names, got {list(class_names)}")
        self.num_classes = num_classes
        self.class_names = tuple(class_names)
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Zero the counts."""
        self.matrix.zero_()

    def update(self, pred: Tensor, target: Tensor, check_values: bool = True) -> None:
        """Count a batch: ``pred`` logits (N, C, H, W) (argmax over C) or ids (N, H, W); ``target`` ids.

        ``check_values=False`` skips the range check of the ids, which reads a value back to the host (for a loop
        whose targets were checked when prepared)."""
        c = self.num_classes
        if pred.ndim == target.ndim + 1:
            if pred.shape[1] != c:
                raise ValueError(f"logits have {pred.shape[1]} classes, expected {c}")
            pred = pred.argmax(1)
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} does not match target {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError("class ids must be integers; pass logits with a class dimension or integer ids")
        pred, target = pred.long().flatten(), target.long().flatten()
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            pred, target = pred[keep], target[keep]
        if check_values and bool(((pred < 0) | (pred >= c) | (target < 0) | (target >= c)).any()):
            raise ValueError(f"class ids must be in [0, {c}) (or ignore_index={self.ignore_index} in target)")
        self.matrix = self.matrix.to(target.device)
        self.matrix += torch.bincount(target * c + pred, minlength=c * c).reshape(c, c)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add ``other``'s counts to these (same classes required); returns self."""
        if other.class_names != self.class_names:
            raise ValueError(f"cannot merge classes {other.class_names} into {self.class_names}")
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        return self.copy().merge(other)

    def copy(self) -> ConfusionMatrix:
        out = ConfusionMatrix(self.num_classes, self.class_names, self.ignore_index, self.matrix.device)
        out.matrix.copy_(self.matrix)
        return out

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the matrix over the default process group when torch.distributed is initialized; returns self.

        Under NCCL a matrix still on the CPU (no update on this rank) moves to the current GPU first.
        """
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend() == "nccl" and self.matrix.device.type != "cuda":
                self.matrix = self.matrix.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)
        return self

    def compute(self) -> dict[str, Any]:
        """Metrics as plain Python numbers.

        Keys: ``dice`` and ``iou`` ({class name: value}), ``mean_dice``, ``mean_iou``, ``pixel_accuracy``,
        ``true_pixels`` and ``pred_pixels`` ({class name: count}), ``total_pixels``.
        Per class, from the matrix: dice = 2·TP / (2·TP + FP + FN), iou = TP / (TP + FP + FN). A class with
        no pixels in truth nor prediction has NaN dice and iou and is left out of the means (unlike the Dice
        loss, which scores it 1). Means and pixel accuracy are NaN when nothing was counted. ``mean_dice`` is
        rmldnn's test "accuracy".
        """
        m = self.matrix.detach().cpu().double()
        tp, true, pred = m.diagonal(), m.sum(1), m.sum(0)
        dice, iou = class_dice(m), class_iou(m)
        total = int(m.sum())
        names = self.class_names
        return {
            "dice": dict(zip(names, dice.tolist(), strict=True)),
            "iou": dict(zip(names, iou.tolist(), strict=True)),
            "mean_dice": _nanmean(dice),
            "mean_iou": _nanmean(iou),
            "pixel_accuracy": float(tp.sum()) / total if total else math.nan,
            "true_pixels": dict(zip(names, [int(v) for v in true.tolist()], strict=True)),
            "pred_pixels": dict(zip(names, [int(v) for v in pred.tolist()], strict=True)),
            "total_pixels": total,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: ``num_classes``, ``class_names``, ``ignore_index``, ``matrix`` (lists)."""
        return {
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "ignore_index": self.ignore_index,
            "matrix": self.matrix.cpu().tolist(),
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> ConfusionMatrix:
        """The inverse of :meth:`to_dict` (matrix on the CPU)."""
        out = cls(state["num_classes"], state["class_names"], state["ignore_index"])
        matrix = torch.tensor(state["matrix"], dtype=torch.int64)
        if matrix.shape != out.matrix.shape:
            raise ValueError(f"matrix shape {tuple(matrix.shape)} does not match {out.num_classes} classes")
        out.matrix = matrix
        return out


def class_dice(matrix: Tensor) -> Tensor:
    """Per-class Dice of a (..., C, C) confusion matrix (rows truth): 2·TP / (2·TP + FP + FN), NaN for a class
    absent from truth and prediction."""
    m = matrix.double()
    tp, true, pred = m.diagonal(dim1=-2, dim2=-1), m.sum(-1), m.sum(-2)
    return torch.where(true + pred > 0, 2 * tp / (true + pred), torch.nan)


def class_iou(matrix: Tensor) -> Tensor:
    """Per-class IoU of a (..., C, C) confusion matrix: TP / (TP + FP + FN), NaN as :func:`class_dice`."""
    m = matrix.double()
    tp, true, pred = m.diagonal(dim1=-2, dim2=-1), m.sum(-1), m.sum(-2)
    union = true + pred - tp
    return torch.where(union > 0, tp / union, torch.nan)


def image_matrices(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """One int64 (C, C) confusion matrix per image: ``pred`` and ``target`` class ids (N, H, W) -> (N, C, C)."""
    n, c = target.shape[0], num_classes
    codes = target.long().reshape(n, -1) * c + pred.long().reshape(n, -1) + (torch.arange(n, device=target.device)
                                                                              * c * c)[:, None]
    return torch.bincount(codes.flatten(), minlength=n * c * c).reshape(n, c, c)


def mean_dice(matrices: Tensor) -> Tensor:
    """Mean over classes of :func:`class_dice`, leaving out the NaN ones: (..., C, C) -> (...)."""
    return class_dice(matrices).nanmean(-1)


def _nanmean(values: Tensor) -> float:
    """Mean of the non-NaN values, NaN when there are none."""
    kept = values[~values.isnan()]
    return float(kept.mean()) if kept.numel() else math.nan


def nan_last(value: float, *, descending: bool = False) -> tuple[bool, float]:
    """Sort key of a metric value: ascending (``descending``: the highest first), a NaN (nothing to score) last."""
    return (True, 0.0) if math.isnan(value) else (False, -value if descending else value)


def format_metric(value: float | None) -> str:
    """A metric as the tables print it: 4 decimals, ``n/a`` for a missing or NaN value."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"

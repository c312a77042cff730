"""Segmentation losses on logits (N, C, H, W) and class-id targets (N, H, W), as rmldnn defines them.

All losses compute in float32, also under bf16/fp16 autocast, and take ``ignore_index`` (pixels whose target
equals it count nowhere; ``None``: every pixel counts). Target values are checked unless ``check_values=False``
(a training loop whose targets were checked when prepared: the check reads a value back to the host each call).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SOURCES = ("softmax", "sigmoid", "log_softmax")

Weight = Tensor | Sequence[float] | None


def _as_weight(weight: Weight) -> Tensor | None:
    """Per-class weights as a 1-D float32 tensor (non-negative, positive sum), or None."""
    if weight is None:
        return None
    w = torch.as_tensor(weight, dtype=torch.float32).detach().clone()
    if w.ndim != 1 or w.numel() == 0:
        raise ValueError(f"weight must be 1-D with one value per class, got shape {tuple(w.shape)}")
    if bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"weight must be non-negative with a positive sum, got {w.tolist()}")
    return w


def _check_target(logits: Tensor, target: Tensor, ignore_index: int | None, values: bool = True) -> None:
    """Raise ValueError unless ``target`` holds class ids in [0, C) (or ``ignore_index``) of logits' shape."""
    if logits.ndim < 3:
        raise ValueError(f"logits must be (N, C, H, W), got shape {tuple(logits.shape)}")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class ids, got dtype {target.dtype}")
    if not values:
        return
    num_classes = logits.shape[1]
    bad = (target < 0) | (target >= num_classes)
    if ignore_index is not None:
        bad &= target != ignore_index
    if bool(bad.any()):
        values = sorted(set(target[bad].unique().tolist()))[:10]
        allowed = f"[0, {num_classes})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
        raise ValueError(f"target values must be class ids in {allowed}; found {values}")


def class_sums(probs: Tensor, target: Tensor, ignore_index: int | None = None) -> tuple[Tensor, ...]:
    """Per-class soft sums over the whole batch, each (C,): intersection ``sum(p*t)``, ``sum(p)``, ``sum(t)``.

    ``t`` is the one-hot target; pixels whose target equals ``ignore_index`` are left out of every sum.
    """
    num_classes = probs.shape[1]
    dims = (0, *range(2, probs.ndim))
    if ignore_index is None:
        onehot = F.one_hot(target.long(), num_classes).movedim(-1, 1).to(probs.dtype)
    else:
        valid = (target != ignore_index).unsqueeze(1)
        onehot = F.one_hot(target.long().masked_fill(~valid.squeeze(1), 0), num_classes).movedim(-1, 1)
        onehot = onehot.to(probs.dtype) * valid
        probs = probs.where(valid, 0.0)
    return (probs * onehot).sum(dims), probs.sum(dims), onehot.sum(dims)


class _OverlapLoss(nn.Module):
    """1 − weighted mean over classes of a soft overlap score; subclasses define ``score``."""

    def __init__(
        self,
        source: str = "softmax",
        eps: float = 1e-7,
        ignore_index: int | None = None,
        weight: Weight = None,
        check_values: bool = True,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.source = source
        self.eps = eps
        self.ignore_index = ignore_index
        self.check_values = check_values
        self.register_buffer("weight", _as_weight(weight))

    def probabilities(self, logits: Tensor) -> Tensor:
        """``source``(logits): softmax or sigmoid over the class dimension."""
        if self.source == "sigmoid":
            return torch.sigmoid(logits)
        if self.source == "log_softmax":
            return logits.log_softmax(1).exp()
        return logits.softmax(1)

    def score(self, intersection: Tensor, pred_sum: Tensor, true_sum: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_target(logits, target, self.ignore_index, self.check_values)
        num_classes = logits.shape[1]
        if self.weight is not None and self.weight.numel() != num_classes:
            raise ValueError(f"weight has {self.weight.numel()} values but logits have {num_classes} classes")
        with torch.autocast(logits.device.type, enabled=False):
            probs = self.probabilities(logits.float())
            scores = self.score(*class_sums(probs, target, self.ignore_index))
            if self.weight is None:
                return 1.0 - scores.mean()
            weight = self.weight.to(scores.device)
            return 1.0 - (scores * weight).sum() / weight.sum()

    def extra_repr(self) -> str:
        return f"source={self.source!r}, eps={self.eps}, ignore_index={self.ignore_index}"


class DiceLoss(_OverlapLoss):
    """rmldnn's Dice loss: 1 − soft Dice between ``source``(logits) and the one-hot target.

    With ``p`` the probabilities, ``t`` the one-hot target, sums over the whole batch (N, H, W), per class c::

        dice_c = (2 * sum(p_c * t_c) + eps) / (sum(p_c) + sum(t_c) + eps)
        loss   = 1 - sum_c(w_c * dice_c) / sum_c(w_c)          (w_c = 1 without ``weight``)

    so a perfect prediction gives 0, and a class absent from both target and prediction has dice 1.

    ``source``: ``"softmax"`` over C (default), ``"sigmoid"`` (each class independently), or ``"log_softmax"``
    (probabilities ``exp(log_softmax(logits))``, accepted because rmldnn configs name it; numerically a
    stable softmax, so the same loss as ``"softmax"``).
    """

    def score(self, intersection: Tensor, pred_sum: Tensor, true_sum: Tensor) -> Tensor:
        return (2.0 * intersection + self.eps) / (pred_sum + true_sum + self.eps)


class JaccardLoss(_OverlapLoss):
    """Soft Jaccard (IoU) loss, with the conventions of :class:`DiceLoss`. Per class c::

        iou_c = (sum(p_c * t_c) + eps) / (sum(p_c) + sum(t_c) - sum(p_c * t_c) + eps)
        loss  = 1 - sum_c(w_c * iou_c) / sum_c(w_c)
    """

    def score(self, intersection: Tensor, pred_sum: Tensor, true_sum: Tensor) -> Tensor:
        return (intersection + self.eps) / (pred_sum + true_sum - intersection + self.eps)


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """torch's cross-entropy on logits (mean over counted pixels), in float32; ``ignore_index=None``: none.

    ``weight`` is torch's per-class weight (the mean is then weighted, as in torch).
    """

    def __init__(self, ignore_index: int | None = None, weight: Weight = None) -> None:
        ignore = -100 if ignore_index is None else ignore_index  # torch's default, a value no class id takes
        super().__init__(weight=_as_weight(weight), ignore_index=ignore)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        with torch.autocast(logits.device.type, enabled=False):
            return super().forward(logits.float(), target.long())


class DiceCELoss(nn.Module):
    """``dice_weight * DiceLoss + ce_weight * CrossEntropyLoss``, sharing ``ignore_index`` and ``weight``."""

    def __init__(
        self,
        source: str = "softmax",
        eps: float = 1e-7,
        ignore_index: int | None = None,
        weight: Weight = None,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        check_values: bool = True,
    ) -> None:
        super().__init__()
        if dice_weight < 0 or ce_weight < 0:
            raise ValueError(f"dice_weight and ce_weight must be >= 0, got {dice_weight} and {ce_weight}")
        self.dice = DiceLoss(source=source, eps=eps, ignore_index=ignore_index, weight=weight,
                             check_values=check_values)
        self.ce = CrossEntropyLoss(ignore_index=ignore_index, weight=weight)
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.dice_weight * self.dice(logits, target) + self.ce_weight * self.ce(logits, target)


# One registry: the name a TrainConfig, a sweep or an rmldnn config gives -> the loss. Cross-entropy losses take
# logits through a softmax; ``nll`` on logits is cross-entropy (rmldnn's nll follows a log_softmax).
LOSSES: dict[str, type[nn.Module]] = {
    "dice": DiceLoss, "jaccard": JaccardLoss, "ce": CrossEntropyLoss, "nll": CrossEntropyLoss, "dice+ce": DiceCELoss,
}
LOSS_ALIASES = {"cross_entropy": "ce"}  # rmldnn's spelling


def loss_name(name: str) -> str:
    """The registry key of ``name`` (case-insensitive, aliases resolved); ValueError listing the accepted ones."""
    key = name.strip().lower()
    key = LOSS_ALIASES.get(key, key)
    if key not in LOSSES:
        accepted = ", ".join([*LOSSES, *LOSS_ALIASES])
        raise ValueError(f"unknown loss {name!r}; accepted (case-insensitive): {accepted}")
    return key


def make_loss(
    name: str,
    *,
    source: str = "softmax",
    ignore_index: int | None = None,
    weight: Weight = None,
    check_values: bool = True,
    **kw: float,
) -> nn.Module:
    """The loss ``name`` (see :data:`LOSSES`). Cross-entropy needs ``source`` softmax or log_softmax (and checks
    its targets itself). ``kw`` goes to the loss's constructor (``eps``; ``dice_weight``, ``ce_weight``)."""
    cls = LOSSES[loss_name(name)]
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    if cls in (CrossEntropyLoss, DiceCELoss) and source == "sigmoid":
        raise ValueError(f"loss {name!r} uses softmax cross-entropy; source must be softmax or log_softmax")
    if cls is CrossEntropyLoss:
        return cls(ignore_index=ignore_index, weight=weight, **kw)
    return cls(source=source, ignore_index=ignore_index, weight=weight, check_values=check_values, **kw)

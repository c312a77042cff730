"""A loaded model placed for inference: the one forward pass that ``evaluate`` and ``predict`` actors and ``serve``
replicas share, class-id masks at an image's own size, their PNG bytes and class fractions. No Ray here."""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional

from raypets.model import to_inputs
from raypets.precision import Precision, require_cuda, resolve_precision


class ModelRunner:
    """Holds ``model`` on the GPU (``use_gpu``) or the CPU, channels_last (on CPU too: 1.7x faster forward than
    contiguous here), and turns uint8 (N, H, W, 3) images into logits under ``precision``'s autocast (``auto``:
    bf16 or fp16 on a GPU, fp32 on a CPU). Ray Data actor classes build on it; ``actors`` is their pool's size,
    which shares the node's cores as torch threads."""

    def __init__(self, model: nn.Module, normalize: tuple[float, float], use_gpu: bool, actors: int,
                 precision: str = "auto") -> None:
        if use_gpu:
            require_cuda()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // actors))
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.precision: Precision = resolve_precision(precision, self.device)
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.mean, self.std = normalize
        self.use_gpu = use_gpu

    def logits(self, images: np.ndarray) -> torch.Tensor:
        with warnings.catch_warnings():  # Arrow's arrays are read-only; nothing writes to this view of them
            warnings.simplefilter("ignore", UserWarning)
            pixels = torch.from_numpy(images)
        x = to_inputs(pixels.to(self.device, non_blocking=True), self.mean, self.std, channels_last=True)
        with torch.inference_mode(), self.precision.autocast():
            return self.model(x)

    def probabilities(self, images: np.ndarray) -> torch.Tensor:
        """The softmax (N, C, H, W), float32 on the model's device, of uint8 (N, H, W, 3) images."""
        return torch.softmax(self.logits(images).float(), dim=1)


def full_size_mask(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Class ids (H, W) uint8 at ``size`` (height, width) from the probabilities (C, h, w) at network resolution:
    the probabilities resized bilinearly, then the argmax (smooth edges, where enlarging the argmax nearest would
    give blocks)."""
    if tuple(probs.shape[1:]) != tuple(size):
        probs = functional.interpolate(probs[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return probs.argmax(0).to(torch.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    """A mask or an image as PNG bytes (fast compression): the files ``predict --masks`` writes, ``serve`` answers."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def class_fractions(mask: np.ndarray, classes: list[str]) -> dict[str, float]:
    """The share of ``mask``'s pixels of each class, by name (they add up to 1)."""
    counts = np.bincount(mask.ravel(), minlength=len(classes))
    return {name: float(count / mask.size) for name, count in zip(classes, counts, strict=True)}


TTA = ("none", "flip")  # test-time augmentation: none, or the average with the left-right mirrored image


def tta_probabilities(runner: ModelRunner, images: np.ndarray, tta: str = "none") -> torch.Tensor:
    """``runner``'s softmax of uint8 (N, H, W, 3) ``images``; ``tta="flip"`` averages it with the softmax of the
    images mirrored left-right (mirrored back)."""
    probs = runner.probabilities(images)
    if tta == "flip":
        probs = (probs + runner.probabilities(np.ascontiguousarray(images[:, :, ::-1])).flip(-1)) / 2
    return probs


# Overlay colours by class id (background left untinted).
PALETTE = np.array([(255, 64, 32), (32, 96, 255), (255, 224, 0), (0, 200, 80), (200, 0, 200), (0, 200, 200)], np.uint8)


def overlay(pixels: np.ndarray, mask: np.ndarray, background: int = -1) -> np.ndarray:
    """The uint8 RGB image (H, W, 3) with each pixel of class id ``mask`` (H, W) half-tinted in its ``PALETTE``
    colour, except those of class ``background``."""
    tinted = (pixels.astype(np.uint16) + PALETTE[mask % len(PALETTE)]) // 2
    return np.where((mask == background)[..., None], pixels, tinted).astype(np.uint8)

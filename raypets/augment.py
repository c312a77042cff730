"""Training augmentation of whole batches, on the device the batch is on: flips, a random resized crop with a small
rotation, and colour jitter, each sample its own draw. No Ray here.

Images and masks move together through one affine map per sample: the image resampled bilinearly, the mask by
nearest neighbour, so every mask pixel keeps a class id it had (never a blend, never a new class). Outside the
source the sampling reflects back into it. All draws come from a CPU ``torch.Generator``: the same seed gives the
same batch on any device, which is what makes a resumed run repeat its epochs. Flips alone draw exactly as rmldnn's
``random_horizontal_flip`` / ``random_vertical_flip`` always did here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional

RATIO = (3 / 4, 4 / 3)  # the crop's aspect ratios, as torchvision's RandomResizedCrop draws them


@dataclass(frozen=True)
class Augmentation:
    """``hflip``/``vflip``: probabilities; ``crop_scale``: the smallest share of the image's area a crop keeps (1:
    no crop); ``rotate``: the largest rotation in degrees; ``color_jitter``: the largest relative change of
    brightness, contrast and saturation (0: none)."""

    hflip: float = 0.0
    vflip: float = 0.0
    crop_scale: float = 1.0
    rotate: float = 0.0
    color_jitter: float = 0.0

    @property
    def geometric(self) -> bool:
        return self.crop_scale < 1.0 or self.rotate > 0.0


def augment(images: torch.Tensor, masks: torch.Tensor, aug: Augmentation, gen: torch.Generator):
    """``images`` float (N, 3, H, W) in [0, 1] and ``masks`` integer (N, H, W), augmented alike."""
    images, masks = random_flips(images, masks, aug, gen)
    if aug.geometric:
        images, masks = random_affine(images, masks, aug, gen)
    if aug.color_jitter:
        images = color_jitter(images, aug.color_jitter, gen)
    return images, masks


def random_flips(images: torch.Tensor, masks: torch.Tensor, aug: Augmentation, gen: torch.Generator):
    """Each sample flipped left-right with probability ``hflip``, then up-down with ``vflip``."""
    for prob, dim in ((aug.hflip, -1), (aug.vflip, -2)):
        if prob:
            flip = (torch.rand(images.shape[0], generator=gen) < prob).to(images.device, non_blocking=True)
            images = torch.where(flip[:, None, None, None], images.flip(dim), images)
            masks = torch.where(flip[:, None, None], masks.flip(dim), masks)
    return images, masks


def random_affine(images: torch.Tensor, masks: torch.Tensor, aug: Augmentation, gen: torch.Generator):
    """A random resized crop (area share in [``crop_scale``, 1], aspect ratio in ``RATIO``) turned by up to
    ``rotate`` degrees, scaled back to the full size."""
    height, width = images.shape[-2:]
    theta = affine_matrices(images.shape[0], aug, gen, height / width).to(images.device, non_blocking=True)
    grid = functional.affine_grid(theta, list(images.shape), align_corners=False)
    images = functional.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    picked = functional.grid_sample(masks[:, None].float(), grid.to(torch.float32), mode="nearest",
                                    padding_mode="reflection", align_corners=False)
    return images, picked[:, 0].round().to(masks.dtype)


def affine_matrices(n: int, aug: Augmentation, gen: torch.Generator, aspect: float = 1.0) -> torch.Tensor:
    """(n, 2, 3) maps from output to source coordinates (both in [-1, 1]), for ``functional.affine_grid``; the
    rotation turns pixels, not the normalised square, of an image ``aspect`` (height / width) tall."""
    area = aug.crop_scale + (1.0 - aug.crop_scale) * torch.rand(n, generator=gen, dtype=torch.float64)
    log_ratio = math.log(RATIO[0]) + math.log(RATIO[1] / RATIO[0]) * torch.rand(n, generator=gen,
                                                                                 dtype=torch.float64)
    ratio = torch.minimum(torch.maximum(log_ratio.exp(), area), 1 / area)  # the crop fits inside the image
    width, height = (area * ratio).sqrt(), (area / ratio).sqrt()
    centre_x = (1.0 - width) * (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1)
    centre_y = (1.0 - height) * (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1)
    angle = torch.deg2rad(aug.rotate * (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1))
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos * width, -sin * height * aspect, centre_x], -1),
                         torch.stack([sin * width / aspect, cos * height, centre_y], -1)], 1)
    return theta.float()


def color_jitter(images: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation each scaled by a factor in [1 - ``strength``, 1 + ``strength``], per
    sample, as torchvision's ColorJitter defines them; the result clipped to [0, 1]."""
    factors = (1 - strength + 2 * strength * torch.rand(3, images.shape[0], 1, 1, 1, generator=gen))
    brightness, contrast, saturation = factors.to(images.device, non_blocking=True)
    images = (images * brightness).clamp(0, 1)
    mean = _gray(images).mean(dim=(-3, -2, -1), keepdim=True)
    images = (mean + contrast * (images - mean)).clamp(0, 1)
    gray = _gray(images)
    return (gray + saturation * (images - gray)).clamp(0, 1)


def _gray(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma (N, 1, H, W), torchvision's rgb_to_grayscale."""
    r, g, b = images.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b)[:, None]

"""The Xception-style U-Net of the Keras pets example (rmldnn's `network_xception2D.json`), in PyTorch.

`from_keras_json` (re-exported from `raypets.keras_json`) builds the same network, or any other supported Keras
functional graph, from its JSON description.
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from raypets.errors import UserError
from raypets.keras_json import KerasJsonError, from_keras_json
from raypets.layers import KerasConv2d, KerasConvTranspose2d, KerasMaxPool2d, KerasSeparableConv2d

__all__ = [
    "DownBlock",
    "KerasJsonError",
    "UpBlock",
    "XceptionUNet",
    "build_network",
    "check_image_size",
    "count_bn_statistics",
    "count_parameters",
    "from_keras_json",
    "normalize",
    "to_inputs",
    "to_unit",
]

DOWN_CHANNELS = (64, 128, 256)
UP_CHANNELS = (256, 128, 64, 32)
ENTRY_CHANNELS = 32
SIZE_MULTIPLE = 16  # the encoder halves the input four times


def _batch_norm(channels: int, momentum: float, eps: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=eps, momentum=momentum)


class DownBlock(nn.Module):
    """ReLU, SeparableConv 3x3, BN, ReLU, SeparableConv 3x3, BN, MaxPool 3x3/2 "same", plus a 1x1/2 projection
    of the block input, added."""

    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float, bn_eps: float) -> None:
        super().__init__()
        self.sep1 = KerasSeparableConv2d(in_channels, out_channels, 3)
        self.bn1 = _batch_norm(out_channels, bn_momentum, bn_eps)
        self.sep2 = KerasSeparableConv2d(out_channels, out_channels, 3)
        self.bn2 = _batch_norm(out_channels, bn_momentum, bn_eps)
        self.pool = KerasMaxPool2d(3, 2, "same")
        self.residual = KerasConv2d(in_channels, out_channels, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.sep1(F.relu(x)))
        y = self.bn2(self.sep2(F.relu(y)))
        return self.pool(y) + self.residual(x)


class UpBlock(nn.Module):
    """ReLU, ConvTranspose 3x3, BN, ReLU, ConvTranspose 3x3, BN, Upsample x2 (nearest), plus a 1x1 conv of the
    upsampled block input, added."""

    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float, bn_eps: float) -> None:
        super().__init__()
        self.deconv1 = KerasConvTranspose2d(in_channels, out_channels, 3)
        self.bn1 = _batch_norm(out_channels, bn_momentum, bn_eps)
        self.deconv2 = KerasConvTranspose2d(out_channels, out_channels, 3)
        self.bn2 = _batch_norm(out_channels, bn_momentum, bn_eps)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.residual = KerasConv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.deconv1(F.relu(x)))
        y = self.bn2(self.deconv2(F.relu(y)))
        return self.upsample(y) + self.residual(self.upsample(x))


class XceptionUNet(nn.Module):
    """Keras `get_model((160, 160), 3)` of the pets example, layer for layer; returns logits (N, C, H, W).

    entry: Conv 32 3x3/2 "same", BN, ReLU; down1..3: `DownBlock` 64/128/256; up1..4: `UpBlock` 256/128/64/32;
    head: Conv 3x3 to `num_classes`. Skips are additive only. The Keras model's final softmax is left to the loss.
    At 3 classes: 2,055,203 trainable parameters and 3,776 BatchNorm running statistics.

    ``skips`` adds what the Keras model lacks, U-Net's encoder-to-decoder skips: up1..up3's outputs each plus a 1x1
    conv of the encoder's output at the same scale (down2, down1, entry), so the decoder sees fine detail again
    (+43,456 parameters).

    Keras conventions: TensorFlow "same" padding (asymmetric where the total is odd), Glorot-uniform kernels and
    zero biases, BatchNorm momentum 0.99 / eps 1e-3, i.e. torch `momentum=0.01`. The momentum is a parameter
    because 0.01 makes the running statistics lag far behind early in training (torch's default is 0.1).
    H and W must be multiples of 16.
    """

    def __init__(
        self, num_classes: int = 3, in_channels: int = 3, bn_momentum: float = 0.01, bn_eps: float = 1e-3,
        skips: bool = False,
    ) -> None:
        super().__init__()
        self.entry = nn.Sequential(
            OrderedDict(
                conv=KerasConv2d(in_channels, ENTRY_CHANNELS, 3, stride=2),
                bn=_batch_norm(ENTRY_CHANNELS, bn_momentum, bn_eps),
                relu=nn.ReLU(),
            )
        )
        channels = (ENTRY_CHANNELS, *DOWN_CHANNELS)
        self.down1, self.down2, self.down3 = (
            DownBlock(c_in, c_out, bn_momentum, bn_eps) for c_in, c_out in pairwise(channels)
        )
        channels = (DOWN_CHANNELS[-1], *UP_CHANNELS)
        self.up1, self.up2, self.up3, self.up4 = (
            UpBlock(c_in, c_out, bn_momentum, bn_eps) for c_in, c_out in pairwise(channels)
        )
        encoder = (DOWN_CHANNELS[-2], DOWN_CHANNELS[-3], ENTRY_CHANNELS)  # the outputs up1..up3 meet, deepest first
        self.skips = nn.ModuleList(KerasConv2d(c_in, c_out, 1)
                                   for c_in, c_out in zip(encoder, UP_CHANNELS[:3], strict=True)) if skips else None
        self.head = KerasConv2d(UP_CHANNELS[-1], num_classes, 3)  # last, in the weights too (checkpoints reads it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"XceptionUNet expects an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
        check_image_size(x.shape[-2], x.shape[-1])
        encoded = [self.entry(x)]
        for block in (self.down1, self.down2, self.down3):
            encoded.append(block(encoded[-1]))
        x = encoded.pop()
        for i, block in enumerate((self.up1, self.up2, self.up3, self.up4)):
            x = block(x)
            if self.skips is not None and encoded:
                x = x + self.skips[i](encoded.pop())
        return self.head(x)


def has_unet_skips(state: dict) -> bool:
    """Whether the weights ``state`` are of ``XceptionUNet(skips=True)``."""
    return any(key.startswith("skips.") for key in state)


def build_network(num_classes: int, network: Path | None = None, bn_momentum: float = 0.01,
                  skips: bool = False) -> nn.Module:
    """The built-in XceptionUNet (with U-Net ``skips`` if asked), or the Keras-JSON network file ``network``, with
    ``bn_momentum``."""
    if network is None:
        return XceptionUNet(num_classes=num_classes, bn_momentum=bn_momentum, skips=skips)
    return from_keras_json(network, bn_momentum=bn_momentum)


def to_inputs(images: torch.Tensor, mean: float, std: float, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) as rmldnn's normalize gives it: (x/255 - mean) / std."""
    return normalize(to_unit(images), mean, std, channels_last)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return images.permute(0, 3, 1, 2).float() / 255.0


def normalize(x: torch.Tensor, mean: float, std: float, channels_last: bool = False) -> torch.Tensor:
    """Images in [0, 1] as the network takes them: (x - mean) / std."""
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def check_image_size(height: int, width: int) -> None:
    """Raise a ValueError naming the nearest valid sizes unless height and width are multiples of 16."""
    for axis, size in (("height", height), ("width", width)):
        if size % SIZE_MULTIPLE:
            lower = size // SIZE_MULTIPLE * SIZE_MULTIPLE
            nearest = f"{lower} or {lower + SIZE_MULTIPLE}" if lower else f"{SIZE_MULTIPLE}"
            raise ValueError(
                f"XceptionUNet input {axis} {size} is not a multiple of {SIZE_MULTIPLE} "
                f"(image {height}x{width}): resize or pad it to {nearest}"
            )


def require_image_size(height: int, width: int, where: str) -> None:
    """:func:`check_image_size` as one UserError naming ``where`` the size comes from (a data folder, a flag)."""
    try:
        check_image_size(height, width)
    except ValueError as err:
        raise UserError(f"{where}: {err}") from None


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameter elements; BatchNorm running statistics are buffers, not counted."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_bn_statistics(model: nn.Module) -> int:
    """Number of BatchNorm running-mean and running-variance elements (`num_batches_tracked` not counted)."""
    return sum(
        m.running_mean.numel() + m.running_var.numel()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    )

"""Keras-compatible building blocks shared by `raypets.model` and `raypets.keras_json`.

TensorFlow's "same" padding is asymmetric when the total padding is odd: the extra row/column goes at the
bottom/right (a 3x3 stride-2 convolution of 160 px pads 0 on top and 1 at the bottom), while torch pads
symmetrically. These layers reproduce the TensorFlow alignment exactly, use torch's native padding whenever it
coincides (the common symmetric case) and initialise kernels as Keras does (Glorot-uniform, zero biases).
`Activation`, `Add` and `Concatenate` are the parameter-free Keras layers that `raypets.keras_json` wires up.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Pair = tuple[int, int]


def pair(value: int | tuple[int, ...] | list[int]) -> Pair:
    """`3` -> `(3, 3)`; `[3, 5]` -> `(3, 5)`."""
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def same_padding(size: int, kernel: int, stride: int = 1, dilation: int = 1) -> Pair:
    """TensorFlow "same" padding `(before, after)` of one spatial axis; the odd extra goes after."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def _same_pads(x: torch.Tensor, kernel: Pair, stride: Pair, dilation: Pair = (1, 1)) -> tuple[int, int, int, int]:
    """`(left, right, top, bottom)` "same" padding of an NCHW tensor, in `F.pad` order."""
    top, bottom = same_padding(x.shape[-2], kernel[0], stride[0], dilation[0])
    left, right = same_padding(x.shape[-1], kernel[1], stride[1], dilation[1])
    return left, right, top, bottom


def _check_padding(padding: str) -> str:
    if padding not in ("same", "valid"):
        raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
    return padding


def glorot_uniform_(weight: torch.Tensor, fan_in: int, fan_out: int) -> torch.Tensor:
    """Keras `GlorotUniform`: U(-l, l) with l = sqrt(6 / (fan_in + fan_out)), in place."""
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        return weight.uniform_(-limit, limit)


class KerasConv2d(nn.Conv2d):
    """`nn.Conv2d` with Keras padding ("same" as TensorFlow aligns it, or "valid") and Keras initialisation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Pair,
        stride: int | Pair = 1,
        padding: str = "same",
        dilation: int | Pair = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)
        self.keras_padding = _check_padding(padding)

    def reset_parameters(self) -> None:
        """Glorot-uniform kernel (Keras fans: receptive field x channels), zero bias."""
        receptive = self.weight.shape[2] * self.weight.shape[3]
        glorot_uniform_(self.weight, self.weight.shape[1] * receptive, self.weight.shape[0] * receptive)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, keras_padding={self.keras_padding}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding: Pair = (0, 0)
        if self.keras_padding == "same":
            left, right, top, bottom = _same_pads(x, self.kernel_size, self.stride, self.dilation)
            if left == right and top == bottom:
                padding = (top, left)
            else:
                x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


class KerasDepthwiseConv2d(KerasConv2d):
    """Keras `DepthwiseConv2D`: one `depth_multiplier`-wide filter bank per input channel."""

    def __init__(
        self,
        channels: int,
        kernel_size: int | Pair,
        depth_multiplier: int = 1,
        stride: int | Pair = 1,
        padding: str = "same",
        dilation: int | Pair = 1,
        bias: bool = True,
    ) -> None:
        super().__init__(channels, channels * depth_multiplier, kernel_size, stride, padding, dilation, channels, bias)

    def reset_parameters(self) -> None:
        """Glorot-uniform with the fans of Keras's (kh, kw, channels, multiplier) depthwise kernel, zero bias."""
        receptive = self.weight.shape[2] * self.weight.shape[3]
        multiplier = self.out_channels // self.in_channels
        glorot_uniform_(self.weight, receptive * self.in_channels, receptive * multiplier)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class KerasSeparableConv2d(nn.Module):
    """Keras `SeparableConv2D`: a depthwise convolution without bias, then a 1x1 pointwise one with bias."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Pair,
        stride: int | Pair = 1,
        padding: str = "same",
        dilation: int | Pair = 1,
        depth_multiplier: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.depthwise = KerasDepthwiseConv2d(
            in_channels, kernel_size, depth_multiplier, stride, padding, dilation, bias=False
        )
        self.pointwise = KerasConv2d(in_channels * depth_multiplier, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def deconv_output_length(
    size: int, kernel: int, stride: int, padding: str, output_padding: int | None = None, dilation: int = 1
) -> int:
    """Output length of one axis of a Keras `Conv2DTranspose` (`keras.utils.conv_utils.deconv_output_length`)."""
    effective = (kernel - 1) * dilation + 1
    if output_padding is None:
        if padding == "same":
            return size * stride
        return size * stride + max(effective - stride, 0)
    pad = effective // 2 if padding == "same" else 0
    return (size - 1) * stride + effective - 2 * pad + output_padding


class KerasConvTranspose2d(nn.ConvTranspose2d):
    """`nn.ConvTranspose2d` aligned as TensorFlow's `conv2d_transpose` (the gradient of a Keras convolution).

    The output is the full transposed convolution cropped by the "same" padding the matching forward
    convolution would use (zero-extended where Keras's output length exceeds it), so "same" gives
    `size * stride` pixels as in Keras. `output_padding` is Keras's option (None or a per-axis int).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Pair,
        stride: int | Pair = 1,
        padding: str = "same",
        output_padding: int | Pair | None = None,
        dilation: int | Pair = 1,
        bias: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, 0, 1, bias, dilation)
        self.keras_padding = _check_padding(padding)
        self.keras_output_padding = None if output_padding is None else pair(output_padding)

    def reset_parameters(self) -> None:
        """Glorot-uniform kernel, zero bias (as Keras)."""
        receptive = self.weight.shape[2] * self.weight.shape[3]
        glorot_uniform_(self.weight, self.weight.shape[0] * receptive, self.weight.shape[1] * receptive)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, keras_padding={self.keras_padding}, "
            f"keras_output_padding={self.keras_output_padding}"
        )

    def _crop(self, size: int, axis: int) -> Pair:
        """Rows/columns to drop `(before, after)` from the full transposed output; negative means add zeros."""
        kernel, stride, dilation = self.kernel_size[axis], self.stride[axis], self.dilation[axis]
        extra = None if self.keras_output_padding is None else self.keras_output_padding[axis]
        length = deconv_output_length(size, kernel, stride, self.keras_padding, extra, dilation)
        full = (size - 1) * stride + (kernel - 1) * dilation + 1
        before = max(full - length, 0) // 2 if self.keras_padding == "same" else 0
        return before, full - before - length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self._crop(x.shape[-2], 0)
        left, right = self._crop(x.shape[-1], 1)
        extra = (top - bottom, left - right)
        if all(0 <= e < max(s, d) for e, s, d in zip(extra, self.stride, self.dilation, strict=True)):
            return F.conv_transpose2d(x, self.weight, self.bias, self.stride, (top, left), extra, 1, self.dilation)
        y = F.conv_transpose2d(x, self.weight, None, self.stride, 0, 0, 1, self.dilation)
        y = F.pad(y, (-left, -right, -top, -bottom))
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


class _KerasPool2d(nn.Module):
    """Pool size, stride (default: the pool size) and Keras padding of a Keras pooling layer."""

    def __init__(self, pool_size: int | Pair, stride: int | Pair | None = None, padding: str = "valid") -> None:
        super().__init__()
        self.pool_size = pair(pool_size)
        self.stride = self.pool_size if stride is None else pair(stride)
        self.keras_padding = _check_padding(padding)

    def extra_repr(self) -> str:
        return f"pool_size={self.pool_size}, stride={self.stride}, keras_padding={self.keras_padding}"


class KerasMaxPool2d(_KerasPool2d):
    """Keras `MaxPooling2D`; "same" pads with -inf, the odd extra at the bottom/right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding: Pair = (0, 0)
        if self.keras_padding == "same":
            left, right, top, bottom = _same_pads(x, self.pool_size, self.stride)
            if left == right and top == bottom:
                padding = (top, left)
            else:
                x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, self.pool_size, self.stride, padding)


class KerasAvgPool2d(_KerasPool2d):
    """Keras `AveragePooling2D`; with "same" the padded positions are left out of each average, as in TF."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = (0, 0, 0, 0)
        if self.keras_padding == "same":
            pads = _same_pads(x, self.pool_size, self.stride)
        if not any(pads):
            return F.avg_pool2d(x, self.pool_size, self.stride)
        ones = torch.ones((1, 1, *x.shape[-2:]), dtype=x.dtype, device=x.device)
        sums = F.avg_pool2d(F.pad(x, pads), self.pool_size, self.stride, divisor_override=1)
        counts = F.avg_pool2d(F.pad(ones, pads), self.pool_size, self.stride, divisor_override=1)
        return sums / counts


def _softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=1)


def _linear(x: torch.Tensor) -> torch.Tensor:
    return x


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": _linear,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "softmax": _softmax,
    "tanh": torch.tanh,
    "elu": F.elu,
    "selu": F.selu,
    "softplus": F.softplus,
    "swish": F.silu,
    "silu": F.silu,
    "gelu": F.gelu,
}


class Activation(nn.Module):
    """A Keras `Activation` layer (softmax over the channel dim)."""

    def __init__(self, function: str) -> None:
        super().__init__()
        self.function = function

    def extra_repr(self) -> str:
        return self.function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.function](x)


class Add(nn.Module):
    """A Keras `Add` layer: the element-wise sum of equally shaped tensors."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if any(x.shape != xs[0].shape for x in xs):
            raise ValueError(f"Add of tensors with different shapes {[tuple(x.shape) for x in xs]}")
        return torch.stack(xs).sum(0) if len(xs) > 2 else xs[0] + xs[1]


class Concatenate(nn.Module):
    """A Keras `Concatenate` layer along torch dim `dim`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def extra_repr(self) -> str:
        return f"dim={self.dim}"

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, self.dim)

"""XceptionUNet and the Keras-compatible layers it is built from."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raypets.layers import (
    KerasAvgPool2d,
    KerasConv2d,
    KerasConvTranspose2d,
    KerasDepthwiseConv2d,
    KerasMaxPool2d,
    KerasSeparableConv2d,
    same_padding,
)
from raypets.model import XceptionUNet, check_image_size, count_bn_statistics, count_parameters


@pytest.fixture(scope="module")
def model() -> XceptionUNet:
    torch.manual_seed(0)
    return XceptionUNet().eval()


def test_parameter_and_running_statistic_counts(model: XceptionUNet) -> None:
    assert count_parameters(model) == 2_055_203
    assert count_parameters(model, trainable_only=False) == 2_055_203
    assert count_bn_statistics(model) == 3_776
    frozen = XceptionUNet()
    frozen.head.requires_grad_(False)
    assert count_parameters(frozen) == 2_055_203 - (3 * 3 * 32 * 3 + 3)


def test_submodules_are_named_readably(model: XceptionUNet) -> None:
    names = [name for name, _ in model.named_children()]
    assert names == ["entry", "down1", "down2", "down3", "up1", "up2", "up3", "up4", "head"]
    keys = model.state_dict().keys()
    assert {"entry.conv.weight", "down1.sep1.depthwise.weight", "up4.deconv2.weight", "head.bias"} <= set(keys)


def test_unet_skips_add_each_encoder_scale_to_the_decoder_and_change_nothing_else(model: XceptionUNet) -> None:
    skips = XceptionUNet(skips=True).eval()
    assert count_parameters(skips) == 2_055_203 + (128 * 256 + 256) + (64 * 128 + 128) + (32 * 64 + 64)
    assert skips.load_state_dict(model.state_dict(), strict=False).missing_keys == [
        f"skips.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    x = torch.rand(2, 3, 64, 96) * 255
    with torch.no_grad():
        for conv in skips.skips:
            conv.weight.zero_()
        torch.testing.assert_close(skips(x), model(x))  # skips of zero: the tutorial's network
        for conv in skips.skips:  # each skip on its own reaches the output
            nn.init.normal_(conv.weight)
            assert not torch.allclose(skips(x), model(x))
            conv.weight.zero_()


@pytest.mark.parametrize(("height", "width"), [(32, 32), (64, 96), (160, 160)])
def test_output_is_logits_of_input_size(model: XceptionUNet, height: int, width: int) -> None:
    with torch.no_grad():
        out = model(torch.rand(1, 3, height, width) * 255)
    assert out.shape == (1, 3, height, width)
    assert not torch.allclose(out.sum(1), torch.ones(1, height, width))  # no softmax inside


def test_classes_and_input_channels_are_parameters() -> None:
    net = XceptionUNet(num_classes=5, in_channels=1).eval()
    with torch.no_grad():
        assert net(torch.rand(2, 1, 32, 48)).shape == (2, 5, 32, 48)


def test_size_not_multiple_of_16_is_a_clear_error(model: XceptionUNet) -> None:
    with pytest.raises(ValueError, match=r"height 100 .*multiple of 16.*96 or 112"):
        model(torch.zeros(1, 3, 100, 96))
    with pytest.raises(ValueError, match=r"width 8 .*to 16$"):
        check_image_size(32, 8)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        model(torch.zeros(3, 32, 32))
    check_image_size(160, 48)


def test_batch_norm_converted_from_keras_with_momentum_parameter() -> None:
    norms = [m for m in XceptionUNet().modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 15
    assert {(m.momentum, m.eps) for m in norms} == {(0.01, 1e-3)}
    faster = [m for m in XceptionUNet(bn_momentum=0.1).modules() if isinstance(m, nn.BatchNorm2d)]
    assert {m.momentum for m in faster} == {0.1}


def test_keras_initialisation(model: XceptionUNet) -> None:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    assert all(m.bias is None or not m.bias.any() for m in convs)
    limit = math.sqrt(6 / (9 * 3 + 9 * 32))  # Glorot-uniform of the entry conv's (3, 3, 3, 32) kernel
    weight = model.entry.conv.weight
    assert weight.abs().max() <= limit
    assert weight.abs().max() > 0.9 * limit
    # Keras's depthwise kernel (3, 3, channels, multiplier) has its own fans, unlike torch's grouped weight.
    depthwise = KerasDepthwiseConv2d(4, 3, depth_multiplier=3)
    keras_limit, torch_fans_limit = math.sqrt(6 / (9 * 4 + 9 * 3)), math.sqrt(6 / (9 + 9 * 12))
    assert torch_fans_limit < depthwise.weight.abs().max() <= keras_limit


def test_train_mode_updates_statistics_and_eval_mode_is_per_image() -> None:
    torch.manual_seed(1)
    net = XceptionUNet(bn_momentum=0.1)
    x = torch.randn(4, 3, 32, 32) * 50 + 100
    net.train()
    with torch.no_grad():
        batch_out = net(x)
        first_alone = net(x[:1])
    assert net.entry.bn.num_batches_tracked == 2
    assert net.entry.bn.running_mean.abs().sum() > 0
    assert not torch.allclose(batch_out[:1], first_alone, atol=1e-4)  # batch statistics
    net.eval()
    stats = net.entry.bn.running_mean.clone()
    with torch.no_grad():
        assert torch.allclose(net(x)[:1], net(x[:1]), atol=1e-4)
    assert torch.equal(stats, net.entry.bn.running_mean)


def test_backward_reaches_every_parameter() -> None:
    torch.manual_seed(2)
    net = XceptionUNet().train()
    logits = net(torch.rand(2, 3, 32, 32) * 255)
    F.cross_entropy(logits, torch.randint(0, 3, (2, 32, 32))).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert net.head.weight.grad.abs().sum() > 0 and net.entry.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "expected"),
    [(160, 3, 2, (0, 1)), (80, 3, 2, (0, 1)), (80, 1, 2, (0, 0)), (7, 3, 2, (1, 1)), (8, 4, 1, (1, 2))],
)
def test_same_padding_puts_the_odd_pixel_last(size: int, kernel: int, stride: int, expected: tuple) -> None:
    assert same_padding(size, kernel, stride) == expected


def test_strided_same_conv_aligns_like_tensorflow() -> None:
    conv = KerasConv2d(1, 1, 3, stride=2, bias=False)
    nn.init.ones_(conv.weight)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = conv(x)
    # TF pads 0 above/left and 1 below/right: the first window is rows 0-2, columns 0-2.
    assert out[0, 0, 0, 0] == x[0, 0, :3, :3].sum()
    assert out[0, 0, 1, 1] == x[0, 0, 2:, 2:].sum()
    assert not torch.equal(out, F.conv2d(x, conv.weight, stride=2, padding=1))


def test_same_max_pool_pads_with_minus_infinity() -> None:
    x = -torch.rand(1, 2, 6, 6) - 1
    out = KerasMaxPool2d(3, 2, "same")(x)
    assert out.shape == (1, 2, 3, 3)
    assert torch.equal(out, F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=-math.inf), 3, 2))
    assert (out < 0).all()


def test_same_average_pool_leaves_padding_out_of_the_mean() -> None:
    out = KerasAvgPool2d(3, 2, "same")(torch.full((1, 1, 6, 6), 5.0))
    assert out.shape == (1, 1, 3, 3)
    assert torch.allclose(out, torch.full_like(out, 5.0))


def test_separable_conv_is_depthwise_without_bias_then_pointwise() -> None:
    conv = KerasSeparableConv2d(32, 64, 3)
    assert conv.depthwise.bias is None
    assert count_parameters(conv) == 3 * 3 * 32 + 32 * 64 + 64


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize(("kernel", "stride"), [(3, 1), (3, 2), (4, 2)])
@pytest.mark.parametrize("size", [7, 8])
def test_transposed_conv_is_the_adjoint_of_the_conv(padding: str, kernel: int, stride: int, size: int) -> None:
    """TF's conv2d_transpose is the gradient of conv2d: <convT(y), x> == <y, conv(x)> with the same kernel."""
    torch.manual_seed(3)
    conv = KerasConv2d(2, 3, kernel, stride, padding, bias=False)
    x = torch.randn(1, 2, size, size)
    y = torch.randn_like(conv(x))
    pad = kernel // 2 if padding == "same" else 0
    output_padding = size - (y.shape[-1] - 1) * stride - kernel + 2 * pad
    assert output_padding >= 0
    deconv = KerasConvTranspose2d(3, 2, kernel, stride, padding, output_padding, bias=False)
    deconv.weight.data.copy_(conv.weight.data)
    back = deconv(y)
    assert back.shape == x.shape
    assert torch.allclose((back * x).sum(), (y * conv(x)).sum(), rtol=1e-4, atol=1e-4)


def test_transposed_conv_same_multiplies_size_by_stride() -> None:
    deconv = KerasConvTranspose2d(2, 2, 3, stride=2)
    assert deconv(torch.randn(1, 2, 5, 7)).shape == (1, 2, 10, 14)
    assert KerasConvTranspose2d(2, 2, 3, stride=2, padding="valid")(torch.randn(1, 2, 5, 5)).shape[-1] == 11


def test_overfits_a_handful_of_samples_with_dice():
    """Training works end to end in plain PyTorch: Dice loss on 4 fixed 32x32 samples falls well down."""
    from raypets.data.render import render_sample
    from raypets.losses import DiceLoss

    torch.manual_seed(0)
    samples = [render_sample(np.random.default_rng([7, i]), 32, 32) for i in range(4)]
    x = torch.stack([torch.tensor(rgb).permute(2, 0, 1).float() / 255 for rgb, _ in samples])
    y = torch.stack([torch.from_numpy(trimap.astype(np.int64) - 1) for _, trimap in samples])
    model, loss_fn = XceptionUNet(bn_momentum=0.1), DiceLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    losses = []
    for _ in range(60):
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < 0.25, losses[::10]

"""The model runner that predict's and evaluate's actors share, and masks at an image's own size. No Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raypets.errors import UserError
from raypets.inference import PALETTE, ModelRunner, full_size_mask, overlay
from raypets.model import XceptionUNet


@pytest.fixture(scope="module")
def model() -> XceptionUNet:
    torch.manual_seed(0)
    return XceptionUNet().eval()


def test_the_precision_is_the_autocast_of_the_forward_pass(model):
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    images.flags.writeable = False  # as Arrow hands them over
    exact = ModelRunner(model, (0.0, 1 / 255), use_gpu=False, actors=1).logits(images)
    assert exact.dtype == torch.float32  # auto on a CPU: fp32
    bf16 = ModelRunner(model, (0.0, 1 / 255), use_gpu=False, actors=1, precision="bf16").logits(images)
    assert bf16.dtype == torch.bfloat16
    assert (bf16.float().argmax(1) == exact.argmax(1)).float().mean() > 0.9
    with pytest.raises(UserError, match="--precision fp16 needs a GPU"):
        ModelRunner(model, (0.0, 1 / 255), use_gpu=False, actors=1, precision="fp16")


def test_full_size_masks_are_the_bilinear_probabilities_argmax():
    probs = torch.zeros(2, 2, 2)
    probs[0] = torch.tensor([[1.0, 0.6], [0.6, 0.0]])  # class 0 in three corners, class 1 in the fourth
    probs[1] = 1 - probs[0]
    mask = full_size_mask(probs, (4, 4))
    assert mask.dtype == torch.uint8
    assert mask.tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 1], [0, 1, 1, 1]]  # a diagonal edge, where the
    # argmax enlarged nearest is a 2x2 block: [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert full_size_mask(probs, (2, 2)).tolist() == [[0, 0], [0, 1]]


def test_an_overlay_tints_every_class_but_the_background():
    pixels = np.full((2, 3, 3), 100, np.uint8)
    mask = np.array([[0, 1, 2], [1, 1, 0]], np.uint8)
    out = overlay(pixels, mask, background=1)
    assert out.dtype == np.uint8 and out.shape == pixels.shape
    assert (out[mask == 1] == 100).all()
    for row, col in ((0, 0), (0, 2)):
        assert (out[row, col] == (100 + PALETTE[mask[row, col]].astype(int)) // 2).all()

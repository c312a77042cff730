"""Augmentation keeps masks exact and aligned with their images, repeats with its seed, and leaves flips-only runs
as they were."""

from __future__ import annotations

import pytest
import torch

from raypets.augment import Augmentation, augment, color_jitter

STRONG = Augmentation(hflip=0.5, vflip=0.5, crop_scale=0.4, rotate=15, color_jitter=0.3)


def _batch(n: int = 6, height: int = 48, width: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of three classes in blocks, and images whose every channel is the mask's class / 2."""
    gen = torch.Generator().manual_seed(1)
    coarse = torch.randint(0, 3, (n, height // 8, width // 8), generator=gen)
    masks = coarse.repeat_interleave(8, 1).repeat_interleave(8, 2)
    return masks[:, None].float().expand(n, 3, height, width) / 2, masks


def test_masks_keep_their_classes_and_stay_aligned_with_the_images():
    images, masks = _batch()
    out_images, out_masks = augment(images, masks, Augmentation(crop_scale=0.4, rotate=15, hflip=0.5),
                                    torch.Generator().manual_seed(0))
    assert out_masks.dtype == masks.dtype and out_masks.shape == masks.shape
    assert set(out_masks.unique().tolist()) <= {0, 1, 2}
    assert not torch.equal(out_masks, masks)  # it moved
    # Inside a class region (away from its edges and the image's, where bilinear and nearest sampling differ)
    # image = class / 2.
    pooled = torch.nn.functional.max_pool2d(out_masks[:, None].float(), 5, 1, 2)
    floor = -torch.nn.functional.max_pool2d(-out_masks[:, None].float(), 5, 1, 2)
    inner = (pooled == floor)[:, 0]
    inner[:, :2] = inner[:, -2:] = inner[:, :, :2] = inner[:, :, -2:] = False
    assert inner.float().mean() > 0.3
    assert torch.allclose(out_images[:, 0][inner], out_masks[inner].float() / 2, atol=1e-4)


def test_the_same_seed_gives_the_same_batch():
    images, masks = _batch()
    first = augment(images, masks, STRONG, torch.Generator().manual_seed(7))
    again = augment(images, masks, STRONG, torch.Generator().manual_seed(7))
    other = augment(images, masks, STRONG, torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[1], other[1])


def test_flips_alone_draw_as_rmldnn_flips_did():
    """The draws of the flips-only augmentation every earlier run used: one uniform per sample per flip."""
    images, masks = _batch()
    out_images, out_masks = augment(images, masks, Augmentation(hflip=0.5, vflip=0.5), torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    h, v = torch.rand(len(masks), generator=gen) < 0.5, torch.rand(len(masks), generator=gen) < 0.5
    for i in range(len(masks)):
        expected = masks[i].flip(-1) if h[i] else masks[i]
        expected = expected.flip(-2) if v[i] else expected
        assert torch.equal(out_masks[i], expected)
    assert torch.equal(out_images[:, 0] * 2, out_masks.float())


def test_nothing_asked_changes_nothing():
    images, masks = _batch()
    out_images, out_masks = augment(images, masks, Augmentation(), torch.Generator().manual_seed(0))
    assert torch.equal(out_images, images) and torch.equal(out_masks, masks)


def test_a_full_crop_without_rotation_is_the_identity_map():
    """crop_scale just under 1 with no rotation samples (almost exactly) the source grid: the maths of the map."""
    images, masks = _batch()
    out_images, out_masks = augment(images, masks, Augmentation(crop_scale=0.999999), torch.Generator().manual_seed(0))
    assert (out_masks == masks).float().mean() > 0.99


def test_color_jitter_stays_in_range_and_keeps_gray_gray():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 16, 16, generator=gen)
    out = color_jitter(images, 0.5, gen)
    assert out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, images)
    gray = torch.rand(4, 1, 16, 16, generator=gen).expand(4, 3, 16, 16)
    out = color_jitter(gray, 0.5, gen)
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-6) and torch.allclose(out[:, 1], out[:, 2], atol=1e-6)


@pytest.mark.parametrize("setting", [{"crop_scale": 0.0}, {"rotate": -1}, {"color_jitter": 1.0}])
def test_settings_out_of_range_are_one_clear_error(tmp_path, setting):
    from raypets.config import TrainConfig
    from raypets.errors import UserError

    with pytest.raises(UserError, match=f"--{next(iter(setting)).replace('_', '-')}"):
        TrainConfig(data=tmp_path, run_dir=tmp_path, **setting)

import pytest
import torch

from raypets.losses import (
    CrossEntropyLoss,
    DiceCELoss,
    DiceLoss,
    JaccardLoss,
    make_loss,
)

# A worked 2x2 example, 3 classes. Per pixel (row-major): truth and probabilities (p0, p1, p2).
#   (0,0) truth 0: (0.7, 0.2, 0.1)    (0,1) truth 1: (0.1, 0.8, 0.1)
#   (1,0) truth 1: (0.2, 0.6, 0.2)    (1,1) truth 2: (0.3, 0.3, 0.4)
# Per class, I = sum(p*t), P = sum(p), T = sum(t); dice = 2I / (P + T), iou = I / (P + T - I), eps negligible:
#   class 0: I = 0.7,         P = 0.7+0.1+0.2+0.3 = 1.3, T = 1: dice = 1.4/2.3 = 14/23, iou = 0.7/1.6 = 7/16
#   class 1: I = 0.8+0.6=1.4, P = 0.2+0.8+0.6+0.3 = 1.9, T = 2: dice = 2.8/3.9 = 28/39, iou = 1.4/2.5 = 14/25
#   class 2: I = 0.4,         P = 0.1+0.1+0.2+0.4 = 0.8, T = 1: dice = 0.8/1.8 = 4/9,   iou = 0.4/1.4 = 2/7
TARGET = torch.tensor([[[0, 1], [1, 2]]])
PROBS = torch.tensor(
    [[[0.7, 0.1], [0.2, 0.3]], [[0.2, 0.8], [0.6, 0.3]], [[0.1, 0.1], [0.2, 0.4]]], dtype=torch.float64
).unsqueeze(0)  # (1, 3, 2, 2)
DICE = (14 / 23, 28 / 39, 4 / 9)
IOU = (7 / 16, 14 / 25, 2 / 7)


def softmax_logits() -> torch.Tensor:
    """Logits whose softmax is PROBS: log-probabilities plus a different constant at each pixel."""
    shift = torch.tensor([[[[3.0, -1.0], [0.5, 7.0]]]], dtype=torch.float64)
    return (PROBS.log() + shift).float()


def sigmoid_logits() -> torch.Tensor:
    """Logits whose per-class sigmoid is PROBS."""
    return torch.logit(PROBS).float()


def random_batch(seed: int = 0, n: int = 2, c: int = 3, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=g), torch.randint(0, c, (n, size, size), generator=g)


def test_dice_worked_example():
    loss = DiceLoss()(softmax_logits(), TARGET)
    assert loss.item() == pytest.approx(1 - sum(DICE) / 3, abs=1e-6)  # 0.409637...


@pytest.mark.parametrize("c", [0, 1, 2])
def test_dice_and_jaccard_worked_example_per_class(c):
    only_c = [1.0 if k == c else 0.0 for k in range(3)]  # a weight that selects one class
    assert DiceLoss(weight=only_c)(softmax_logits(), TARGET).item() == pytest.approx(1 - DICE[c], abs=1e-6)
    assert JaccardLoss(weight=only_c)(softmax_logits(), TARGET).item() == pytest.approx(1 - IOU[c], abs=1e-6)


def test_jaccard_worked_example():
    loss = JaccardLoss()(softmax_logits(), TARGET)
    assert loss.item() == pytest.approx(1 - sum(IOU) / 3, abs=1e-6)


def test_dice_weighted_average_over_classes():
    loss = DiceLoss(weight=[1.0, 2.0, 1.0])(softmax_logits(), TARGET)
    assert loss.item() == pytest.approx(1 - (DICE[0] + 2 * DICE[1] + DICE[2]) / 4, abs=1e-6)


def test_dice_sigmoid_source():
    logits = sigmoid_logits()
    assert DiceLoss(source="sigmoid")(logits, TARGET).item() == pytest.approx(1 - sum(DICE) / 3, abs=1e-6)
    assert DiceLoss(source="softmax")(logits, TARGET).item() != pytest.approx(1 - sum(DICE) / 3, abs=1e-3)


def test_log_softmax_source_equals_softmax():
    logits, target = random_batch()
    expected = DiceLoss(source="softmax")(logits, target)
    torch.testing.assert_close(DiceLoss(source="log_softmax")(logits, target), expected)


def test_perfect_prediction_is_zero_and_disjoint_is_one():
    target = torch.tensor([[[0, 1, 2], [2, 1, 0]]])
    perfect = 100.0 * torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    assert DiceLoss()(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    disjoint = 100.0 * torch.nn.functional.one_hot((target + 1) % 3, 3).permute(0, 3, 1, 2).float()
    assert DiceLoss()(disjoint, target).item() == pytest.approx(1.0, abs=1e-6)


def test_absent_class_scores_one():
    # Only class 0 in truth and (almost surely) in prediction: classes 1 and 2 have dice (0+eps)/(0+eps) = 1.
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    logits = torch.tensor([100.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert DiceLoss()(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_is_over_whole_batch_not_mean_of_images():
    # Image 1 has only class 0, image 2 only class 1; a batch-wide Dice is not the mean of per-image losses.
    logits, _ = random_batch(n=2)
    target = torch.stack([torch.zeros(8, 8, dtype=torch.long), torch.ones(8, 8, dtype=torch.long)])
    whole = DiceLoss()(logits, target)
    per_image = (DiceLoss()(logits[:1], target[:1]) + DiceLoss()(logits[1:], target[1:])) / 2
    assert abs(whole.item() - per_image.item()) > 1e-3
    probs = logits.softmax(1)
    onehot = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    inter, card = (probs * onehot).sum((0, 2, 3)), (probs + onehot).sum((0, 2, 3))
    assert whole.item() == pytest.approx(1 - ((2 * inter + 1e-7) / (card + 1e-7)).mean().item(), abs=1e-6)


@pytest.mark.parametrize("cls", [DiceLoss, JaccardLoss, DiceCELoss, CrossEntropyLoss])
def test_gradient_flows(cls):
    logits, target = random_batch()
    logits.requires_grad_(True)
    cls()(logits, target).backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", [DiceLoss, JaccardLoss, DiceCELoss, CrossEntropyLoss])
def test_ignore_index_excludes_pixels(cls):
    logits, target = random_batch()
    target[0, :3] = 255
    ignored = (target == 255).unsqueeze(1).expand_as(logits)
    loss_fn = cls(ignore_index=255)
    base = logits.clone().requires_grad_(True)
    loss = loss_fn(base, target)
    loss.backward()
    changed = logits.clone()
    changed[ignored] = 50.0 * torch.randn(int(ignored.sum()))
    torch.testing.assert_close(loss_fn(changed, target), loss.detach())
    assert base.grad[ignored].abs().max() == 0
    assert base.grad[~ignored].abs().max() > 0


@pytest.mark.parametrize("cls", [DiceLoss, JaccardLoss, DiceCELoss, CrossEntropyLoss])
def test_ignore_index_equals_loss_over_kept_pixels(cls):
    logits, target = random_batch(n=1)
    target[0, :, :2] = -1
    expected = cls()(logits[..., 2:].contiguous(), target[..., 2:].contiguous())
    torch.testing.assert_close(cls(ignore_index=-1)(logits, target), expected)


def test_float32_under_bf16_autocast():
    logits, target = random_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = DiceLoss()(logits.bfloat16(), target)
    assert loss.dtype == torch.float32
    expected = DiceLoss()(logits.bfloat16().float(), target)
    torch.testing.assert_close(loss, expected)


def test_dice_ce_combines_terms():
    logits, target = random_batch()
    dice, ce = DiceLoss()(logits, target), torch.nn.functional.cross_entropy(logits, target)
    torch.testing.assert_close(DiceCELoss()(logits, target), dice + ce)
    weighted = DiceCELoss(dice_weight=0.5, ce_weight=2.0)(logits, target)
    torch.testing.assert_close(weighted, 0.5 * dice + 2.0 * ce)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("Dice", DiceLoss),
        ("dice", DiceLoss),
        ("DICE", DiceLoss),
        ("Jaccard", JaccardLoss),
        ("jaccard", JaccardLoss),
        ("ce", CrossEntropyLoss),
        ("cross_entropy", CrossEntropyLoss),
        ("nll", CrossEntropyLoss),
        ("NLL", CrossEntropyLoss),
        ("dice+ce", DiceCELoss),
        ("Dice+CE", DiceCELoss),
    ],
)
def test_make_loss_names(name, cls):
    assert type(make_loss(name)) is cls


def test_make_loss_passes_options():
    logits, target = random_batch()
    target[0, 0] = 7
    loss = make_loss("Dice", source="sigmoid", ignore_index=7, weight=[1, 1, 2], eps=1.0)
    expected = DiceLoss(source="sigmoid", ignore_index=7, weight=[1, 1, 2], eps=1.0)(logits, target)
    torch.testing.assert_close(loss(logits, target), expected)
    nll = make_loss("nll", source="log_softmax", ignore_index=7)
    torch.testing.assert_close(
        nll(logits, target), torch.nn.functional.cross_entropy(logits, target, ignore_index=7)
    )


def test_make_loss_unknown_name_lists_accepted():
    accepted = r"dice, jaccard, ce, nll, dice\+ce, cross_entropy"
    with pytest.raises(ValueError, match=rf"unknown loss 'focal'; accepted \(case-insensitive\): {accepted}"):
        make_loss("focal")


def test_make_loss_rejects_sigmoid_cross_entropy():
    with pytest.raises(ValueError, match="source"):
        make_loss("ce", source="sigmoid")


@pytest.mark.parametrize(
    ("kwargs", "logits_shape", "target", "match"),
    [
        ({"weight": [1.0, 2.0]}, (1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), "weight has 2 values"),
        ({}, (1, 3, 2, 2), torch.zeros(1, 2, 3, dtype=torch.long), "target shape"),
        ({}, (1, 3, 2, 2), torch.zeros(1, 2, 2), "integer class ids"),
        ({}, (1, 3, 2, 2), torch.tensor([[[0, 1], [3, 2]]]), r"\[0, 3\); found \[3\]"),
        ({"ignore_index": 255}, (1, 3, 2, 2), torch.tensor([[[0, 255], [-1, 2]]]), r"found \[-1\]"),
    ],
)
def test_dice_validation(kwargs, logits_shape, target, match):
    with pytest.raises(ValueError, match=match):
        DiceLoss(**kwargs)(torch.zeros(logits_shape), target)


def test_constructor_validation():
    with pytest.raises(ValueError, match="unknown source 'softmin'"):
        DiceLoss(source="softmin")
    with pytest.raises(ValueError, match="non-negative"):
        DiceLoss(weight=[1.0, -1.0, 1.0])

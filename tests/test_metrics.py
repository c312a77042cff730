import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raypets.metrics import ConfusionMatrix

# A worked example, 8 pixels as 2 images of 2x2, rows = truth, columns = prediction:
#   truth 0: predicted 0, 0, 1 -> [2, 1, 0]
#   truth 1: predicted 1, 1, 2 -> [0, 2, 1]
#   truth 2: predicted 2, 0    -> [1, 0, 1]
TRUTH = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2]).view(2, 2, 2)
PRED = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0]).view(2, 2, 2)
MATRIX = [[2, 1, 0], [0, 2, 1], [1, 0, 1]]
# dice = 2TP / (row + col): pet 4/6, background 4/6, border 2/4; iou = TP / (row + col - TP): 2/4, 2/4, 1/3.
DICE = {"pet": 2 / 3, "background": 2 / 3, "border": 1 / 2}
IOU = {"pet": 1 / 2, "background": 1 / 2, "border": 1 / 3}


def one_hot_logits(ids: torch.Tensor, num_classes: int = 3) -> torch.Tensor:
    """Logits (N, C, H, W) whose argmax is ``ids``, with noise that never changes the argmax."""
    noise = torch.rand(*ids.shape, num_classes, generator=torch.Generator().manual_seed(0))
    return (torch.nn.functional.one_hot(ids, num_classes) * 2.0 + noise).permute(0, 3, 1, 2)


def random_data(seed: int, n: int = 4, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 3, (n, size, size), generator=g)


def test_worked_example():
    cm = ConfusionMatrix()
    cm.update(PRED, TRUTH)
    assert cm.matrix.dtype == torch.int64
    assert cm.matrix.tolist() == MATRIX
    result = cm.compute()
    assert result["dice"] == pytest.approx(DICE)
    assert result["iou"] == pytest.approx(IOU)
    assert result["mean_dice"] == pytest.approx(11 / 18)  # (2/3 + 2/3 + 1/2) / 3
    assert result["mean_iou"] == pytest.approx(4 / 9)  # (1/2 + 1/2 + 1/3) / 3
    assert result["pixel_accuracy"] == pytest.approx(5 / 8)
    assert result["true_pixels"] == {"pet": 3, "background": 3, "border": 2}
    assert result["pred_pixels"] == {"pet": 3, "background": 3, "border": 2}
    assert result["total_pixels"] == 8


def test_logits_and_class_ids_agree():
    from_ids, from_logits = ConfusionMatrix(), ConfusionMatrix()
    from_ids.update(PRED, TRUTH)
    from_logits.update(one_hot_logits(PRED), TRUTH)
    assert from_logits.matrix.tolist() == MATRIX
    assert from_logits.compute() == from_ids.compute()


def test_updates_accumulate_and_reset():
    cm = ConfusionMatrix()
    cm.update(PRED[:1], TRUTH[:1])
    cm.update(PRED[1:], TRUTH[1:])
    assert cm.matrix.tolist() == MATRIX
    cm.reset()
    assert cm.matrix.sum() == 0


def test_merge_equals_one_accumulator():
    (logits_a, truth_a), (logits_b, truth_b) = random_data(1), random_data(2)
    a, b, whole = ConfusionMatrix(), ConfusionMatrix(), ConfusionMatrix()
    a.update(logits_a, truth_a)
    b.update(logits_b, truth_b)
    whole.update(torch.cat([logits_a, logits_b]), torch.cat([truth_a, truth_b]))
    summed = a + b
    assert summed.matrix.tolist() == whole.matrix.tolist()
    assert a.matrix.tolist() != whole.matrix.tolist()  # __add__ leaves its operands alone
    assert a.merge(b) is a
    assert a.matrix.tolist() == whole.matrix.tolist()
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(ConfusionMatrix(2))


def test_absent_class_is_nan_and_left_out_of_means():
    cm = ConfusionMatrix()
    cm.update(torch.tensor([[0, 1, 1, 1]]), torch.tensor([[0, 0, 1, 1]]))  # no border pixel anywhere
    result = cm.compute()
    assert math.isnan(result["dice"]["border"]) and math.isnan(result["iou"]["border"])
    # pet: 2*1 / (2 + 1) = 2/3, background: 2*2 / (2 + 3) = 4/5; iou 1/2 and 2/3.
    assert result["mean_dice"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert result["mean_iou"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_nothing_counted_gives_nan():
    result = ConfusionMatrix().compute()
    assert math.isnan(result["mean_dice"]) and math.isnan(result["pixel_accuracy"])
    assert result["total_pixels"] == 0


def test_ignore_index_skips_pixels():
    truth = TRUTH.clone().flatten()
    pred = PRED.clone().flatten()
    truth = torch.cat([truth, torch.tensor([255, 255])]).view(1, 2, 5)
    pred = torch.cat([pred, torch.tensor([0, 2])]).view(1, 2, 5)
    cm = ConfusionMatrix(ignore_index=255)
    cm.update(pred, truth)
    assert cm.matrix.tolist() == MATRIX
    assert cm.compute()["total_pixels"] == 8
    with pytest.raises(ValueError, match="class ids"):
        ConfusionMatrix().update(pred, truth)


def test_class_names_parameter_and_validation():
    cm = ConfusionMatrix(2, class_names=("cat", "sky"))
    cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))
    assert set(cm.compute()["dice"]) == {"cat", "sky"}
    assert tuple(ConfusionMatrix(2).compute()["dice"]) == ("class_0", "class_1")
    with pytest.raises(ValueError, match="distinct class names"):
        ConfusionMatrix(3, class_names=("a", "b"))
    ids = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="logits have 4 classes"):
        ConfusionMatrix().update(torch.zeros(1, 4, 2, 2), ids)
    with pytest.raises(ValueError, match="does not match"):
        ConfusionMatrix().update(torch.zeros(1, 2, 3, dtype=torch.long), ids)


def test_json_round_trip(tmp_path):
    cm = ConfusionMatrix(ignore_index=255)
    cm.update(PRED, TRUTH)
    path = tmp_path / "cm.json"
    path.write_text(json.dumps(cm.to_dict()))
    loaded = ConfusionMatrix.from_dict(json.loads(path.read_text()))
    assert loaded.matrix.tolist() == MATRIX
    assert loaded.class_names == cm.class_names and loaded.ignore_index == 255
    assert loaded.compute() == cm.compute()


def test_all_reduce_without_process_group_is_a_no_op():
    cm = ConfusionMatrix()
    cm.update(PRED, TRUTH)
    assert cm.all_reduce() is cm
    assert cm.matrix.tolist() == MATRIX


def _all_reduce_worker(rank: int, init_file: str, out_file: str, halves: list) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cm = ConfusionMatrix()
        cm.update(*halves[rank])
        cm.all_reduce()
        if rank == 0:
            Path(out_file).write_text(json.dumps(cm.to_dict()))
    finally:
        dist.destroy_process_group()


def test_all_reduce_across_two_gloo_processes(tmp_path):
    halves = [random_data(3), random_data(4)]
    out_file = tmp_path / "rank0.json"
    mp.spawn(_all_reduce_worker, args=(str(tmp_path / "init"), str(out_file), halves), nprocs=2)
    reduced = ConfusionMatrix.from_dict(json.loads(out_file.read_text()))
    whole, rank0_only = ConfusionMatrix(), ConfusionMatrix()
    whole.update(torch.cat([halves[0][0], halves[1][0]]), torch.cat([halves[0][1], halves[1][1]]))
    rank0_only.update(*halves[0])
    assert reduced.matrix.tolist() == whole.matrix.tolist()
    assert reduced.matrix.tolist() != rank0_only.matrix.tolist()


def test_per_image_matrices_are_each_images_own_confusion_matrix():
    from raypets.metrics import image_matrices, mean_dice

    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randint(0, 3, (4, 9, 7), generator=gen), torch.randint(0, 3, (4, 9, 7), generator=gen)
    target[2] = 1  # an image of one class: the others' Dice is left out of its mean
    pred[2] = 1
    matrices = image_matrices(pred, target, 3)
    for i in range(4):
        one = ConfusionMatrix(3)
        one.update(pred[i:i + 1], target[i:i + 1])
        assert torch.equal(matrices[i], one.matrix)
        assert mean_dice(matrices[i]).item() == pytest.approx(one.compute()["mean_dice"])
    assert mean_dice(matrices)[2].item() == 1.0


def test_nan_last_ranks_either_way_with_nothing_to_score_last():
    from raypets.metrics import nan_last

    values = [0.5, float("nan"), 0.9, 0.1]
    ascending, descending = sorted(values, key=nan_last), sorted(values, key=lambda v: nan_last(v, descending=True))
    assert ascending[:3] == [0.1, 0.5, 0.9] and math.isnan(ascending[3])
    assert descending[:3] == [0.9, 0.5, 0.1] and math.isnan(descending[3])

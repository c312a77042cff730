"""``raypets evaluate`` on real Ray: the numbers training reported for a checkpoint, from any form of CKPT."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from raypets.checkpoints import load_model, resolve_checkpoint
from raypets.cli import main
from raypets.config import saved_settings
from raypets.metrics import ConfusionMatrix
from raypets.model import to_inputs
from raypets.runlog import read_metrics
from raypets.stages.shards import load_split


def test_a_run_folder_evaluates_to_the_test_metrics_training_reported_for_its_best_epoch(quick_demo, tmp_path,
                                                                                        capsys):
    run, shards = quick_demo["out"] / "train", quick_demo["out"] / "shards"
    saved = {int(path.stem.rsplit("_", 1)[1]) for path in run.glob("ray_train/checkpoint_*/model_checkpoint_*.pt")}
    best = max((m for m in read_metrics(run) if m["epoch"] in saved),  # the checkpoint a run folder stands for
               key=lambda m: (m["mean_dice"], m["epoch"]))
    out = tmp_path / "eval.json"
    precision = saved_settings(run / "run.json")["precision"]  # the demo trains in bf16 on CPUs that compute it
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(shards), "--out", str(out), "--batch-size", "5",
                 "--workers", "2", "--precision", precision]) == 0
    result = json.loads(out.read_text())
    assert result["checkpoint"].endswith(f"model_checkpoint_{best['epoch']}.pt")
    for key in ("mean_dice", "mean_iou", "pixel_accuracy"):
        assert result[key] == pytest.approx(best[key], abs=1e-4), key
    for name, value in result["dice"].items():
        assert value == pytest.approx(best[f"dice_{name}"], abs=1e-4), name
    assert result["images"] == json.loads((shards / "manifest.json").read_text())["counts"]["test"]
    table = capsys.readouterr().out
    assert "pet" in table and "border" in table and f"{best['mean_dice']:.4f}" in table
    matrix = torch.tensor(result["confusion_matrix"])
    assert int(matrix.sum()) == result["total_pixels"]
    assert matrix.sum(1).tolist() == list(result["true_pixels"].values())
    test = load_split(shards, "test")
    assert sorted(result["per_image"]) == sorted(test["name"].tolist())
    dice = {name: math.nan if value is None else value for name, value in result["per_image"].items()}
    assert [name for name, _ in result["worst"]] == sorted(dice, key=lambda n: (dice[n], n))[:10]
    assert f"worst images by mean Dice: {result['worst'][0][0]}" in table


def plain_probabilities(checkpoint: str, images: torch.Tensor, flip: bool) -> torch.Tensor:
    """The checkpoint's softmax in plain PyTorch; ``flip``: averaged with that of the mirrored images."""
    resolved = resolve_checkpoint(Path(checkpoint))
    model = load_model(resolved).eval()
    with torch.no_grad():
        probs = model(to_inputs(images, *resolved.normalize)).softmax(1)
        if flip:
            probs = (probs + model(to_inputs(images.flip(2), *resolved.normalize)).softmax(1).flip(-1)) / 2
    return probs


def test_tta_flip_scores_the_average_of_the_image_and_its_mirror(quick_demo, tmp_path):
    run, shards = quick_demo["out"] / "train", quick_demo["out"] / "shards"
    results = {}
    for tta in ("none", "flip"):
        out = tmp_path / f"{tta}.json"
        assert main(["evaluate", "--checkpoint", str(run), "--data", str(shards), "--out", str(out), "--tta", tta,
                     "--batch-size", "7"]) == 0
        results[tta] = json.loads(out.read_text())
    test = load_split(shards, "test")
    matrix = ConfusionMatrix()
    matrix.update(plain_probabilities(results["flip"]["checkpoint"], torch.from_numpy(test["image"]), flip=True),
                  torch.from_numpy(test["mask"]).long())
    assert results["flip"]["tta"] == "flip"
    assert results["flip"]["mean_dice"] == pytest.approx(matrix.compute()["mean_dice"], abs=1e-4)
    assert results["flip"]["confusion_matrix"] != results["none"]["confusion_matrix"]


def test_evaluate_mistakes_are_one_clear_message(quick_demo, tmp_path, capsys):
    shards = str(quick_demo["out"] / "shards")
    checkpoint = str(quick_demo["out"] / "train")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope.pt"), "--data", shards]) == 2
    assert "nope.pt: checkpoint does not exist" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", checkpoint, "--data", shards, "--split", "valid"]) == 2
    assert "no split 'valid'" in capsys.readouterr().err
    out = tmp_path / "taken.json"
    out.write_text("{}")
    assert main(["evaluate", "--checkpoint", checkpoint, "--data", shards, "--out", str(out)]) == 2
    assert "taken.json: exists" in capsys.readouterr().err and out.read_text() == "{}"

"""``raypets evaluate`` on real Ray: the numbers training reported for a checkpoint, from any form of CKPT."""

from __future__ import annotations

import json

import pytest

from raypets.cli import main
from raypets.runlog import read_metrics


def test_a_run_folder_evaluates_to_the_test_metrics_training_reported_for_its_best_epoch(quick_demo, tmp_path,
                                                                                        capsys):
    run, shards = quick_demo["out"] / "train", quick_demo["out"] / "shards"
    best = max(read_metrics(run), key=lambda m: m["mean_dice"])  # the checkpoint a run folder stands for
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(shards), "--out", str(out), "--batch-size", "5",
                 "--workers", "2"]) == 0
    result = json.loads(out.read_text())
    assert result["checkpoint"].endswith(f"model_checkpoint_{best['epoch']}.pt")
    for key in ("mean_dice", "mean_iou", "pixel_accuracy"):
        assert result[key] == pytest.approx(best[key], abs=1e-4), key
    for name, value in result["dice"].items():
        assert value == pytest.approx(best[f"dice_{name}"], abs=1e-4), name
    assert result["images"] == json.loads((shards / "manifest.json").read_text())["counts"]["test"]
    table = capsys.readouterr().out
    assert "pet" in table and "border" in table and f"{best['mean_dice']:.4f}" in table


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

"""``raypets evaluate`` on real Ray: the numbers training reported for a checkpoint, from any form of CKPT."""

from __future__ import annotations

import json

import pytest

from raypets.cli import main


def test_evaluate_gives_the_training_runs_final_test_metrics(trained_run, tmp_path, capsys):
    final = trained_run["final"]
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", final["checkpoint"], "--data", str(trained_run["shards"]),
                 "--out", str(out), "--batch-size", "5", "--workers", "2"]) == 0
    result = json.loads(out.read_text())
    for key in ("mean_dice", "mean_iou", "pixel_accuracy"):
        assert result[key] == pytest.approx(final[key], abs=1e-4), key
    for name, value in result["dice"].items():
        assert value == pytest.approx(final[f"dice_{name}"], abs=1e-4), name
    assert result["images"] == json.loads((trained_run["shards"] / "manifest.json").read_text())["counts"]["test"]
    table = capsys.readouterr().out
    assert "pet" in table and "border" in table and f"{final['mean_dice']:.4f}" in table


def test_evaluate_mistakes_are_one_clear_message(trained_run, tmp_path, capsys):
    shards = str(trained_run["shards"])
    checkpoint = trained_run["final"]["model_checkpoint"]
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope.pt"), "--data", shards]) == 2
    assert "nope.pt: checkpoint does not exist" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", checkpoint, "--data", shards, "--split", "valid"]) == 2
    assert "no split 'valid'" in capsys.readouterr().err
    out = tmp_path / "taken.json"
    out.write_text("{}")
    assert main(["evaluate", "--checkpoint", checkpoint, "--data", shards, "--out", str(out)]) == 2
    assert "taken.json: exists" in capsys.readouterr().err and out.read_text() == "{}"

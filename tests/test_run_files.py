"""A run's own files: damaged logs, settings a resume must keep, outputs a new run must not replace. No Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raypets.cli import main
from raypets.config import TrainConfig
from raypets.errors import UserError
from raypets.runlog import RunLog, check_resume, read_metrics, run_settings, save_run_settings
from raypets.stages.train import train

MANIFEST = {"counts": {"train": 8, "test": 2}, "classes": ["pet", "background", "border"],
            "image_size": {"height": 32, "width": 32}}


def test_a_metrics_line_cut_short_by_a_crash_is_left_out(tmp_path):
    records = [{"epoch": 1, "mean_dice": 0.5}, {"epoch": 2, "mean_dice": 0.6}]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"epoch": 3, "mean_di')
    assert read_metrics(tmp_path) == records
    log = RunLog(tmp_path, "raypets")
    (tmp_path / "raypets_test.txt").write_text("# header\n1 0.5 0.9 0.4 0.5\n2 0.4 0.9 0.5 0.6\n3 0.3 0.")
    log.start(last_epoch=2)  # what a resume from epoch 2's checkpoint does
    assert read_metrics(tmp_path) == records and metrics.read_text().endswith("}\n")
    assert [line[0] for line in (tmp_path / "raypets_test.txt").read_text().splitlines()[1:]] == ["1", "2"]
    metrics.write_text('{"epoch": 1\n' + json.dumps(records[1]) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl: line 1 is not a JSON record"):
        read_metrics(tmp_path)


def test_resume_refuses_another_network_classes_or_size(tmp_path):
    cfg = TrainConfig(data=tmp_path, run_dir=tmp_path)
    save_run_settings(tmp_path, run_settings(cfg.to_dict(), MANIFEST))
    check_resume(tmp_path, run_settings({**cfg.to_dict(), "epochs": 50}, MANIFEST))  # more epochs: fine
    bigger = {**MANIFEST, "image_size": {"height": 64, "width": 64}}
    with pytest.raises(UserError, match=r"--resume would continue a run with another image_size \(image_size "
                                        r"\{'height': 32, 'width': 32\} there, \{'height': 64, 'width': 64\} now\)"):
        check_resume(tmp_path, run_settings(cfg.to_dict(), bigger))
    with pytest.raises(UserError, match="another network, classes"):
        check_resume(tmp_path, run_settings({**cfg.to_dict(), "network": "other.json"}, {**MANIFEST, "classes": ["a"]}))


def test_a_new_run_never_replaces_files_another_run_left(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps(MANIFEST))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "model_checkpoint_30.pt").write_bytes(b"rmldnn's")
    with pytest.raises(UserError, match=r"run/checkpoints: exists, and this run would replace it; pass --overwrite"):
        train(TrainConfig(data=shards, run_dir=run))
    assert (run / "checkpoints" / "model_checkpoint_30.pt").read_bytes() == b"rmldnn's"


def test_synth_mistakes_are_one_line(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "s"), "--n", "0"]) == 2
    assert capsys.readouterr().err == "raypets: error: synth needs --n >= 1, a --size of at least 16x16 and --seed " \
                                      ">= 0; got n=0, size=320x240, seed=0\n"
    assert not Path(tmp_path / "s", "images").exists()

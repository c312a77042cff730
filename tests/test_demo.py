"""``raypets demo --quick`` end to end on real Ray: every stage's artefacts, and a report that shows each of them."""

from __future__ import annotations

import base64
import csv
import html
import json
import re
import shlex

import yaml
from PIL import Image

from raypets.cli import build_parser, main
from raypets.precision import cpu_computes_bf16
from raypets.runlog import read_metrics

COMMANDS = ["synth", "prepare", "tune", "train", "evaluate", "predict", "show", "export"]
MODEL = ["model/model.onnx", "model/model.ts", "model/model.json"]  # the test extra has onnx: both formats
FIGURES = ["sweep/mean_dice_vs_lr.png", "train/loss.png", "train/dice.png", "grid.png"]


def test_quick_demo_runs_every_stage_and_reports_each(quick_demo, capsys):
    argv, out, printed = quick_demo["argv"], quick_demo["out"], quick_demo["printed"]
    for path in ["raw/annotations/trimaps", "shards/manifest.json", "rmldnn/testing/masks", "train/metrics.jsonl",
                 "sweep.yaml", "sweep/trials.csv", "sweep/best.json", "evaluate_test.json",
                 "predictions/predictions.h5", "demo.json", "report.md", "report.html", *FIGURES, *MODEL]:
        assert (out / path).exists(), path
    assert list((out / "train" / "checkpoints").glob("model_checkpoint_*.pt"))
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    evaluation = json.loads((out / "evaluate_test.json").read_text())
    summary = json.loads((out / "demo.json").read_text())
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()

    def in_both(*cells: str) -> bool:
        return "| " + " | ".join(cells) + " |" in md and "".join(f"<td>{html.escape(c)}</td>" for c in cells) in page

    # dataset: counts, files and class frequencies as manifest.json has them
    for split, count in manifest["counts"].items():
        assert in_both(split, str(count))
    files = manifest["files"]
    assert f"{files['candidates']} found, {files['used']} used, {files['skipped']} skipped" in md
    assert manifest["skip_reasons"]  # synth --defects: the real archive's kinds of bad files
    for reason, count in manifest["skip_reasons"].items():
        assert in_both(reason, str(count))
    for name in manifest["classes"]:
        assert in_both(name, *(f"{manifest['class_frequency'][s][name]:.4f}" for s in ("train", "test")))
    # training: one table row per epoch of metrics.jsonl
    history = read_metrics(out / "train")
    assert [m["epoch"] for m in history] == [1, 2]
    for m in history:
        assert in_both(str(m["epoch"]), f"{m['train_loss']:.4f}", f"{m['test_loss']:.4f}", f"{m['mean_dice']:.4f}")
    # per-class test metrics: raypets evaluate's JSON, cell for cell
    for name, dice in evaluation["dice"].items():
        assert in_both(name, f"{dice:.4f}", f"{evaluation['iou'][name]:.4f}", str(evaluation["true_pixels"][name]),
                       str(evaluation["pred_pixels"][name]))
    assert in_both("mean", f"{evaluation['mean_dice']:.4f}", f"{evaluation['mean_iou']:.4f}")
    assert evaluation["images"] == manifest["counts"]["test"] == summary["predict"]["written"]
    # the sweep: both trials ran to the end, each a row of the table
    trials = list(csv.DictReader((out / "sweep" / "trials.csv").open()))
    assert sorted(float(t["lr"]) for t in trials) == [1e-3, 3e-3] and {t["status"] for t in trials} == {"done"}
    # on CPUs that multiply bf16 natively the demo trains in bf16 (faster than fp32 there); elsewhere as auto says
    spec = yaml.safe_load((out / "sweep.yaml").read_text())
    assert spec["train"]["precision"] == ("bf16" if cpu_computes_bf16() else "auto")
    for t in trials:
        assert in_both(t["rank"], t["trial_id"], f"{float(t['lr']):g}", f"{float(t['mean_dice']):.4f}")
    assert (out / "sweep.yaml").read_text().strip() in md
    # figures: linked beside report.md, embedded in report.html (self-contained: nothing else is loaded); the
    # exported model's files linked from both
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources == [f"data:image/png;base64,{base64.b64encode((out / f).read_bytes()).decode()}" for f in FIGURES]
    assert all(f"]({f})" in md for f in FIGURES)
    assert re.findall(r'href="([^"]*)"', page) == MODEL and all(f"[{f}]({f})" in md for f in MODEL)
    rows = min(4, manifest["counts"]["test"])
    assert Image.open(out / "grid.png").size == (4 * 260, rows * 260)  # input | overlay | prediction | truth
    # timings of every stage
    assert list(summary["timings"]) == ["ray.init", *COMMANDS]
    for stage, seconds in summary["timings"].items():
        assert in_both(stage, f"{seconds:.1f}")
    # the commands to reproduce it: in the report, valid raypets commands, with the run's own settings
    commands = summary["commands"]
    assert [shlex.split(c)[1] for c in commands] == COMMANDS
    parsed = [build_parser().parse_args(shlex.split(c)[1:]) for c in commands]
    assert all(c in md and html.escape(c) in page for c in [*commands, summary["demo_command"]])
    train = parsed[COMMANDS.index("train")]  # the sweep's winner, for the demo's epochs
    assert (train.from_file, train.run_dir, train.epochs) == (out / "sweep" / "best.json", out / "train", len(history))
    best = json.loads((out / "sweep" / "best.json").read_text())
    assert json.loads((out / "train" / "run.json").read_text())["train"]["lr"] == best["params"]["lr"]
    assert parsed[COMMANDS.index("evaluate")].out == out / "evaluate_test.json"
    assert f"test mean Dice {evaluation['mean_dice']:.4f}" in printed

    before = (out / "report.md").stat().st_mtime_ns
    assert main(argv) == 2
    assert f"{out}: exists and is not empty" in capsys.readouterr().err
    assert (out / "report.md").stat().st_mtime_ns == before

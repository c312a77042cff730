"""The report of ``raypets demo``: ``report.md`` and ``report.html`` built from the files the run left on disk.

Both are rendered from one list of blocks (headings, text, tables, figures, code), so they say the same; the HTML
embeds its PNGs as base64 and stands alone, the Markdown links them beside it. No Ray here.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from dataclasses import dataclass
from pathlib import Path

from raypets.metrics import format_metric as _num
from raypets.runlog import read_metrics

SWEEP_COLUMNS = ("rank", "trial_id", "lr", "mean_dice", "best_epoch", "epochs_run", "stopped_early", "status")
STYLE = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.2em .6em}"
         "pre{background:#f4f4f4;padding:.8em;overflow-x:auto}img{max-width:100%}figcaption{color:#555}")


@dataclass(frozen=True)
class DemoFolders:
    """Where each stage of ``raypets demo`` writes, under one folder."""

    root: Path
    raw: Path  # the synthetic dataset (Oxford layout), when no --data
    shards: Path  # prepared shards and manifest.json
    rmldnn: Path  # the tutorial's training/ and testing/ {inputs,masks} folders
    run: Path  # the training run
    sweep_file: Path
    sweep: Path  # the sweep's run folder
    evaluation: Path  # raypets evaluate's JSON
    predictions: Path  # raypets predict's output
    grid: Path  # input | overlay | prediction | ground truth
    model: Path  # raypets export's files
    summary: Path  # demo.json: settings, timings, commands
    markdown: Path
    html: Path

    @classmethod
    def under(cls, root: Path) -> DemoFolders:
        names = ("raw", "shards", "rmldnn", "train", "sweep.yaml", "sweep", "evaluate_test.json", "predictions",
                 "grid.png", "model", "demo.json", "report.md", "report.html")
        return cls(root, *(root / name for name in names))

    @property
    def test_images(self) -> Path:
        return self.rmldnn / "testing" / "inputs"

    @property
    def test_masks(self) -> Path:
        return self.rmldnn / "testing" / "masks"


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]


@dataclass(frozen=True)
class Figure:
    path: Path
    caption: str


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Link:
    target: str  # a file beside the report, by its relative path


Block = Heading | Text | Table | Figure | Code | Link


def write_report(folders: DemoFolders) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` from the demo's artefacts; return their paths."""
    blocks = build(folders)
    folders.markdown.write_text(to_markdown(blocks, folders.root))
    folders.html.write_text(to_html(blocks))
    return folders.markdown, folders.html


def build(folders: DemoFolders) -> list[Block]:
    """Every section of the report, in order."""
    summary = json.loads(folders.summary.read_text())
    manifest = json.loads((folders.shards / "manifest.json").read_text())
    evaluation = json.loads(folders.evaluation.read_text())
    return [*_overview(summary, evaluation, manifest), *_dataset(manifest), *_sweep(folders), *_training(folders.run),
            *_test_metrics(evaluation, manifest), *_predictions(folders, summary),
            *_model(folders, summary), *_timings(summary), *_reproduce(summary)]


# --- sections -----------------------------------------------------------------------------------------------------

def _overview(summary: dict, evaluation: dict, manifest: dict) -> list[Block]:
    return [Heading("raypets demo", 1),
            Text(f"Data: {summary['source']}. {summary['workers']} Ray Train worker(s), device {summary['device']}. "
                 f"Finished in {summary['total_s']:.0f} s with a test mean Dice of {_num(evaluation['mean_dice'])} "
                 f"(an all-background prediction scores {_num(_background_dice(manifest))} on this test split).")]


def _dataset(manifest: dict) -> list[Block]:
    size, split, files = manifest["image_size"], manifest["split"], manifest["files"]
    frequency = manifest["class_frequency"]
    blocks = [Heading("Dataset"),
              Text(f"{manifest['source']} ({manifest['layout']} layout), prepared at {size['width']}x{size['height']}; "
                   f"split rule {split['rule']} (test fraction {split['test_fraction']}, seed {split['seed']})."),
              Table(("split", "pairs"), [(name, str(n)) for name, n in manifest["counts"].items()]),
              Text(f"Files: {files['candidates']} found, {files['used']} used, {files['skipped']} skipped; "
                   f"{len(manifest['repaired'])} repaired to RGB.")]
    if manifest["skip_reasons"]:
        blocks.append(Table(("skip reason", "files"), [(r, str(n)) for r, n in manifest["skip_reasons"].items()]))
    blocks.append(Table(("class", *(f"{s} frequency" for s in frequency)),
                        [(name, *(_num(frequency[s][name]) for s in frequency)) for name in manifest["classes"]]))
    return blocks


def _training(run: Path) -> list[Block]:
    history = read_metrics(run)
    best = max(history, key=lambda m: m["mean_dice"] if m["mean_dice"] is not None else -1.0)
    return [Heading("Training"),
            Text(f"{len(history)} epoch(s) in {run}; best test mean Dice {_num(best['mean_dice'])} at epoch "
                 f"{best['epoch']}."),
            Figure(run / "loss.png", "train and test loss per epoch"),
            Figure(run / "dice.png", "test Dice per epoch, mean and per class"),
            Table(("epoch", "train loss", "test loss", "mean Dice", "images/s"),
                  [(str(m["epoch"]), _num(m["train_loss"]), _num(m["test_loss"]), _num(m["mean_dice"]),
                    f"{m['images_per_s']:.1f}") for m in history])]


def _test_metrics(evaluation: dict, manifest: dict) -> list[Block]:
    rows = [(name, _num(evaluation["dice"][name]), _num(evaluation["iou"][name]),
             str(evaluation["true_pixels"][name]), str(evaluation["pred_pixels"][name])) for name in evaluation["dice"]]
    rows.append(("mean", _num(evaluation["mean_dice"]), _num(evaluation["mean_iou"]), "", ""))
    return [Heading("Test metrics"),
            Text(f"raypets evaluate: {evaluation['checkpoint']} on the {evaluation['split']} split "
                 f"({evaluation['images']} images)."),
            Table(("class", "Dice", "IoU", "true pixels", "predicted pixels"), rows),
            Text(f"Pixel accuracy {_num(evaluation['pixel_accuracy'])}. A prediction of background everywhere would "
                 f"score mean Dice {_num(_background_dice(manifest))}.")]


def _sweep(folders: DemoFolders) -> list[Block]:
    with (folders.sweep / "trials.csv").open(newline="") as f:
        trials = list(csv.DictReader(f))
    blocks = [Heading("Learning-rate sweep"), Text(f"raypets tune with {folders.sweep_file.name}:"),
              Code(folders.sweep_file.read_text().strip()),
              Table(SWEEP_COLUMNS, [tuple(_cell(c, row[c]) for c in SWEEP_COLUMNS) for row in trials])]
    best_file = folders.sweep / "best.json"
    if best_file.is_file():
        best = json.loads(best_file.read_text())
        blocks.append(Text(f"Best: trial {best['trial_id']} (lr {best['params']['lr']:g}), mean Dice "
                           f"{_num(best['value'])} at epoch {best['epoch']}."))
    plot = folders.sweep / "mean_dice_vs_lr.png"
    if plot.is_file():
        blocks.append(Figure(plot, "each trial's best test mean Dice against its learning rate"))
    return blocks


def _predictions(folders: DemoFolders, summary: dict) -> list[Block]:
    predicted = summary["predict"]
    return [Heading("Predictions"),
            Text(f"raypets predict wrote {predicted['written']} test image(s) into {folders.predictions} "
                 f"({sum(predicted['skipped'].values())} skipped). Each row: input | prediction overlaid on it | "
                 "prediction | ground truth, class ids 0 pet (black), 1 background (gray), 2 border (white); in the "
                 "overlay pet red, border yellow."),
            Figure(folders.grid, "input | overlay | prediction | ground truth")]


def _model(folders: DemoFolders, summary: dict) -> list[Block]:
    exported = summary["export"]
    files = [*exported["files"].values(), "model.json"]
    return [Heading("Exported model"),
            Text(f"raypets export wrote the trained model for runtimes without raypets ({', '.join(exported['files'])}"
                 f"; uint8 RGB images of {exported['size'][0]}x{exported['size'][1]} in, softmax out); model.json "
                 "says what the files hold:"),
            *(Link(f"{folders.model.relative_to(folders.root).as_posix()}/{name}") for name in files)]


def _timings(summary: dict) -> list[Block]:
    rows = [(stage, f"{seconds:.1f}") for stage, seconds in summary["timings"].items()]
    return [Heading("Timings"), Table(("stage", "seconds"), [*rows, ("total", f"{summary['total_s']:.1f}")])]


def _reproduce(summary: dict) -> list[Block]:
    return [Heading("Reproduce"),
            Text("The same run, stage by stage (into a fresh folder: each command refuses to overwrite):"),
            Code("\n".join(summary["commands"])),
            Text("Or in one command:"), Code(summary["demo_command"])]


def _background_dice(manifest: dict) -> float:
    """Mean Dice of predicting background everywhere on the test split: 2f / (1 + f) for background (pixel
    frequency f), 0 for the other classes."""
    f = manifest["class_frequency"]["test"]["background"]
    return 2 * f / (1 + f) / len(manifest["classes"])



def _cell(column: str, text: str) -> str:
    """A trials.csv value as written, the learning rate and the metric shortened."""
    if column == "lr":
        return f"{float(text):g}"
    return _num(float(text)) if column == "mean_dice" and text else text


# --- rendering ----------------------------------------------------------------------------------------------------

def to_markdown(blocks: list[Block], root: Path) -> str:
    """Markdown; figures link their PNGs relative to ``root`` (the report's folder)."""
    parts = []
    for block in blocks:
        match block:
            case Heading(text, level):
                parts.append(f"{'#' * level} {text}")
            case Text(text):
                parts.append(text)
            case Table(header, rows):
                lines = [header, tuple("---" for _ in header), *rows]
                parts.append("\n".join("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |"
                                       for line in lines))
            case Figure(path, caption):
                parts.append(f"![{caption}]({path.relative_to(root).as_posix()})")
            case Code(text):
                parts.append(f"```\n{text}\n```")
            case Link(target):
                parts.append(f"- [{target}]({target})")
    return "\n\n".join(parts) + "\n"


def to_html(blocks: list[Block]) -> str:
    """One self-contained HTML page: the PNGs inline as base64 data URIs."""
    body = []
    for block in blocks:
        match block:
            case Heading(text, level):
                body.append(f"<h{level}>{html.escape(text)}</h{level}>")
            case Text(text):
                body.append(f"<p>{html.escape(text)}</p>")
            case Table(header, rows):
                head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
                cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
            case Figure(path, caption):
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
            case Code(text):
                body.append(f"<pre><code>{html.escape(text)}</code></pre>")
            case Link(target):  # beside report.html: a link, not something the page loads
                body.append(f'<p><a href="{html.escape(target)}">{html.escape(target)}</a></p>')
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>raypets demo</title>'
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")

"""``raypets demo``: the whole pipeline on Ray in one command, every stage a call of its public function, timed.

synth (unless ``--data``) -> prepare -> a learning-rate sweep of short trials -> training the winner's settings
(``raypets train --from best.json``) for the full epochs -> evaluate -> predict over the test images -> the input |
overlay | prediction | ground truth grid -> export (ONNX and TorchScript) -> ``report.md`` and ``report.html``, all
in one fresh folder laid out as :class:`raypets.demo_report.DemoFolders` says. Each stage also gives its equivalent
``raypets`` command for the report.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from raypets.config import DEFAULT_RECIPE, RECIPES, TrainConfig, saved_settings
from raypets.data.synth import synthesize
from raypets.demo_report import DemoFolders, write_report
from raypets.errors import UserError
from raypets.exporter import ExportConfig, export
from raypets.outputs import check_output_folder
from raypets.precision import cpu_computes_bf16
from raypets.show import show_predictions
from raypets.stages.evaluate import evaluate, format_metrics, write_json
from raypets.stages.predict import PredictConfig, default_workers, describe_predictions, predict
from raypets.stages.prepare import PrepareConfig, describe_manifest, prepare
from raypets.stages.runtime import init_ray, set_progress_bars, use_gpus
from raypets.stages.train import train
from raypets.stages.tune import tune
from raypets.sweep_config import load_sweep

# Logical CPUs of a local Ray start: a Tune trial's driver, its Train workers and Ray Data's tasks each hold a slot,
# more than the 2 cores of a laptop (the test suite and the benchmarks declare 4 for the same reason).
LOCAL_CPUS = max(4, os.cpu_count() or 1)
DEVICE_FLAGS = {"auto": [], "cpu": ["--cpu"], "gpu": ["--gpu"]}
GPUS_PER_WORKER = {"auto": None, "cpu": 0, "gpu": 1}
CHECKPOINT_EVERY = 4  # epochs, in the training run


@dataclass(frozen=True)
class Settings:
    """The sizes of one demo: its data, the training run, the sweep and the grid."""

    images: int  # synthetic images (without --data)
    raw_size: tuple[int, int]  # synthetic (width, height)
    size: int  # network input, pixels a side
    test_fraction: float
    epochs: int
    batch_size: int
    test_batch_size: int
    warmup_steps: int
    sweep_lrs: tuple[float, ...]
    sweep_epochs: int
    rows: int  # samples in the grid
    workers: int | None = None  # Ray Train workers unless --workers says; None: one per GPU, else one
    recipe: str = DEFAULT_RECIPE  # raypets train --recipe
    augmentation: dict = field(default_factory=dict)  # TrainConfig's augmentation fields that differ from the recipe

    def training(self) -> dict:
        """The TrainConfig settings of the sweep's trials (the run trains the winner's for ``epochs``)."""
        return {**RECIPES[self.recipe], **self.augmentation, "epochs": self.sweep_epochs,
                "batch_size": self.batch_size, "test_batch_size": self.test_batch_size,
                "warmup_steps": self.warmup_steps}


QUICK = Settings(images=24, raw_size=(64, 48), size=32, test_fraction=0.25, epochs=2, batch_size=8, test_batch_size=8,
                 warmup_steps=2, sweep_lrs=(1e-3, 3e-3), sweep_epochs=1, rows=4,
                 workers=1)  # a smoke test spends its time starting processes: one worker starts fewer
# 12 epochs of 340 images underfit: smaller batches help, and the recipe's crop and rotation slow them down; bf16
# (where native) makes 96 px cost about what 64 px did (docs/benchmarks.md, "Demo").
SYNTHETIC = Settings(images=400, raw_size=(192, 144), size=96, test_fraction=0.15, epochs=12, batch_size=8,
                     test_batch_size=32, warmup_steps=20, sweep_lrs=(5e-4, 1e-3, 2e-3), sweep_epochs=2, rows=6,
                     augmentation={"crop_scale": 1.0, "rotate": 0.0})
TUTORIAL = Settings(images=0, raw_size=(0, 0), size=160, test_fraction=0.1, epochs=30, batch_size=64,
                    test_batch_size=128, warmup_steps=100, sweep_lrs=(3e-4, 1e-3, 3e-3), sweep_epochs=5, rows=6)


@dataclass(frozen=True)
class _Demo:
    """What every stage needs; ``facts`` collects what the report shows beyond the files (predict's summary)."""

    folders: DemoFolders
    settings: Settings
    data: Path | None
    workers: int
    device: str
    progress: bool
    address: str | None
    facts: dict = field(default_factory=dict)


def run_demo(out: Path, *, data: Path | None = None, workers: int | None = None, device: str = "auto",
             quick: bool = False, address: str | None = None, progress: bool = True) -> dict:
    """Run every stage into the fresh folder ``out`` and write its report. ``data``: a dataset folder (any layout
    ``prepare`` reads) instead of synthetic images; ``workers``: Ray Train workers (default one per GPU, else one).

    Returns demo.json's content plus ``mean_dice`` (the test split's) and the report's paths.
    """
    _check_args(out, data, workers)
    settings = QUICK if quick else TUTORIAL if data else SYNTHETIC
    folders = DemoFolders.under(out)
    folders.root.mkdir(parents=True, exist_ok=True)
    set_progress_bars(progress)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with _stage(timings, "ray.init"):
        init_ray(address, num_cpus=LOCAL_CPUS)  # every later stage finds Ray running and joins it
    # one Train worker per GPU, else one: on CPUs it trains as fast as two with a core each, and starts sooner
    workers = workers or settings.workers or default_workers(device, on_cpu=1)
    demo = _Demo(folders, settings, data, workers, device, progress, address)
    commands = []
    for name, stage in STAGES[1:] if data else STAGES:
        with _stage(timings, name):
            commands.append(_command(stage(demo)))
    synthetic = f"{settings.images} synthetic images and the real archive's kinds of bad files (raypets synth)"
    summary = {"source": str(data.resolve()) if data else synthetic,
               "workers": demo.workers, "device": device, "quick": quick, "settings": asdict(settings),
               "timings": timings, "total_s": time.perf_counter() - started, "commands": commands,
               "demo_command": _command(_demo_args(out, data, demo.workers, device, quick, address)),
               **demo.facts}
    folders.summary.write_text(json.dumps(summary, indent=2) + "\n")
    markdown, html = write_report(folders)
    print(f"raypets demo: wrote {markdown} and {html}", flush=True)
    mean_dice = json.loads(folders.evaluation.read_text())["mean_dice"]
    return {**summary, "mean_dice": mean_dice, "report_md": str(markdown), "report_html": str(html)}


def _check_args(out: Path, data: Path | None, workers: int | None) -> None:
    """One clear error before any work: ``out`` must be new or empty, ``data`` a folder, ``workers`` positive."""
    check_output_folder(out, "demo", flag=None)
    if data is not None and not data.is_dir():
        raise UserError(f"{data}: dataset folder does not exist")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")


@contextmanager
def _stage(timings: dict[str, float], name: str) -> Iterator[None]:
    print(f"raypets demo: {name}", flush=True)
    started = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - started
    print(f"raypets demo: {name} took {timings[name]:.1f} s", flush=True)


def _command(args: list) -> str:
    """``raypets ARGS`` as one shell line."""
    return shlex.join(["raypets", *map(str, args)])


def _demo_args(out: Path, data: Path | None, workers: int, device: str, quick: bool, address: str | None) -> list:
    return ["demo", "--out", out, *(["--data", data] if data else []), "--workers", workers, *DEVICE_FLAGS[device],
            *(["--quick"] if quick else []), *_address(address)]


def _address(address: str | None) -> list[str]:
    return ["--address", address] if address else []


def _flags(settings: dict) -> list[str]:
    """``{"batch_size": 16}`` -> ``["--batch-size", "16"]``."""
    return [part for key, value in settings.items() for part in (f"--{key.replace('_', '-')}", str(value))]


# --- the stages: each runs and returns its equivalent raypets command's arguments ---------------------------------

def _synth(demo: _Demo) -> list:
    width, height = demo.settings.raw_size
    print(synthesize(demo.folders.raw, n=demo.settings.images, size=(width, height), defects=True))
    return ["synth", demo.folders.raw, "--n", demo.settings.images, "--size", f"{width}x{height}", "--defects"]


def _prepare(demo: _Demo) -> list:
    folders, settings = demo.folders, demo.settings
    cfg = PrepareConfig(src=demo.data or folders.raw, out=folders.shards, size=(settings.size, settings.size),
                        test_fraction=settings.test_fraction, export_rmldnn=folders.rmldnn)
    print(describe_manifest(prepare(cfg), cfg.out))
    return ["prepare", cfg.src, cfg.out, "--size", settings.size, "--test-fraction", settings.test_fraction,
            "--export-rmldnn", folders.rmldnn, *_address(demo.address)]


def _train(demo: _Demo) -> list:
    """The sweep's winner, trained for the demo's epochs: what ``raypets train --from best.json`` does."""
    folders, best = demo.folders, demo.folders.sweep / "best.json"
    flags = {"epochs": demo.settings.epochs, "checkpoint_every": CHECKPOINT_EVERY}  # a trial checkpoints every epoch
    final = train(TrainConfig.from_dict({**saved_settings(best), "run_dir": folders.run, **flags}))
    print(f"finished epoch {final['epoch']}: test mean Dice {final['mean_dice']:.4f}")
    return ["train", "--from", best, "--run-dir", folders.run, *_flags(flags), *_address(demo.address)]


def _tune(demo: _Demo) -> list:
    folders, settings = demo.folders, demo.settings
    spec = {"metric": "mean_dice", "mode": "max", "samples": 1, "scheduler": {"type": "fifo"},
            "train": {**settings.training(), "device": demo.device, "precision": _precision(demo)},
            "space": {"lr": {"grid": list(settings.sweep_lrs)}}}
    folders.sweep_file.write_text("# raypets demo's learning-rate sweep: every trial runs to the end (FIFO)\n"
                                 + yaml.safe_dump(spec, sort_keys=False))
    gpus = GPUS_PER_WORKER[demo.device]
    sweep = load_sweep(folders.sweep_file, folders.shards, workers=demo.workers, gpus_per_worker=gpus)
    print(tune(sweep, folders.sweep, progress=demo.progress)["table"])
    return ["tune", "--data", folders.shards, "--space", folders.sweep_file, "--run-dir", folders.sweep,
            "--workers-per-trial", demo.workers, *(["--gpus-per-worker", gpus] if gpus is not None else []),
            *_address(demo.address)]


def _precision(demo: _Demo) -> str:
    """The training precision: bf16 where the run trains on CPUs that compute it natively, else ``auto``."""
    return "bf16" if not use_gpus(demo.device, demo.workers) and cpu_computes_bf16() else "auto"


def _evaluate(demo: _Demo) -> list:
    folders = demo.folders
    result = evaluate(folders.run, folders.shards, "test", device=demo.device)
    print(format_metrics(result))
    write_json(result, folders.evaluation)
    return ["evaluate", "--checkpoint", folders.run, "--data", folders.shards, "--out", folders.evaluation,
            *DEVICE_FLAGS[demo.device], *_address(demo.address)]


def _predict(demo: _Demo) -> list:
    folders, size = demo.folders, demo.settings.size
    summary = predict(PredictConfig(checkpoint=folders.run, input=folders.test_images, output=folders.predictions,
                                    size=(size, size), device=demo.device))
    print(describe_predictions(summary))
    demo.facts["predict"] = summary
    return ["predict", "--checkpoint", folders.run, folders.test_images, folders.predictions, "--size", size,
            *DEVICE_FLAGS[demo.device], *_address(demo.address)]


def _export(demo: _Demo) -> list:
    folders, size = demo.folders, demo.settings.size
    fmt = "all" if importlib.util.find_spec("onnx") else "torchscript"  # ONNX needs the export extra
    info = export(ExportConfig(checkpoint=folders.run, out=folders.model, format=fmt, size=(size, size)))
    demo.facts["export"] = {"files": info["files"], "size": info["size"]}
    return ["export", "--checkpoint", folders.run, folders.model, "--format", fmt, "--size", size]


def _show(demo: _Demo) -> list:
    folders = demo.folders
    show_predictions(folders.predictions, folders.grid, images=folders.test_images, truth=folders.test_masks,
                     rows=demo.settings.rows)
    return ["show", folders.predictions, "--images", folders.test_images, "--truth", folders.test_masks,
            "--rows", demo.settings.rows, "--out", folders.grid]


STAGES: list[tuple[str, Callable[[_Demo], list]]] = [
    ("synth", _synth), ("prepare", _prepare), ("tune", _tune), ("train", _train), ("evaluate", _evaluate),
    ("predict", _predict), ("show", _show), ("export", _export)]

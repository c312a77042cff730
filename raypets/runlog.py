"""A training run's logs in rmldnn's spirit: ``<name>_train.txt``, ``<name>_test.txt`` and ``metrics.jsonl``.

Written by rank 0 only. A resumed run first drops the lines of epochs after its checkpoint, so an epoch that was
logged but not checkpointed before a crash is not logged twice. A run at a URI (``s3://...``) is logged in a local
temp folder: the logs are downloaded at the start and uploaded after each epoch; :meth:`RunLog.close` removes the
folder.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

from raypets import storage
from raypets.errors import UserError
from raypets.redaction import redact
from raypets.storage import Location

RUN_FILE = "run.json"  # the run's settings, classes and image size: what --resume must not change
# What a resumed run must share with the run it continues: its weights would not fit, or mean other things.
FIXED_ON_RESUME = ("network", "classes", "image_size")
TRAIN_HEADER = "# epoch batch time_s loss grad_norm lr"
TEST_HEADER = "# epoch test_loss pixel_accuracy mean_iou mean_dice"


class RunLog:
    def __init__(self, run_dir: Location, name: str) -> None:
        self.run_dir = run_dir
        self._temp = Path(tempfile.mkdtemp(prefix="raypets-log-")) if storage.is_uri(run_dir) else None
        folder = self._temp or Path(run_dir)
        self.train = folder / f"{name}_train.txt"
        self.test = folder / f"{name}_test.txt"
        self.metrics = folder / "metrics.jsonl"
        folder.mkdir(parents=True, exist_ok=True)

    def start(self, last_epoch: int) -> None:
        """Keep the lines of epochs up to ``last_epoch`` (0: none) and write the headers when new."""
        self._sync(download=True)
        for path, header in ((self.train, TRAIN_HEADER), (self.test, TEST_HEADER)):
            kept = [line for line in _lines(path) if (_epoch_of(line) or last_epoch + 1) <= last_epoch]
            path.write_text("".join(f"{line}\n" for line in [header, *kept]))
        kept = [json.dumps(record) for record in _records(self.metrics) if record["epoch"] <= last_epoch]
        self.metrics.write_text("".join(f"{line}\n" for line in kept))
        self._sync()

    def batches(self, epoch: int, rows: list[tuple[float, float, float, float]]) -> None:
        """The train log's lines of one epoch: (seconds into the epoch, loss, gradient norm, lr) per batch."""
        with self.train.open("a") as f:
            f.writelines(f"{epoch} {index} {seconds:.3f} {loss:.6f} {norm:.6f} {lr:.6g}\n"
                         for index, (seconds, loss, norm, lr) in enumerate(rows, start=1))

    def epoch(self, metrics: dict) -> None:
        with self.test.open("a") as f:
            f.write(f"{metrics['epoch']} {metrics['test_loss']:.6f} {metrics['pixel_accuracy']:.6f} "
                    f"{metrics['mean_iou']:.6f} {metrics['mean_dice']:.6f}\n")
        with self.metrics.open("a") as f:
            f.write(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v)
                                for k, v in metrics.items()}) + "\n")
        self._sync()

    def close(self) -> None:
        """Remove the local folder of a run at a URI (everything in it was uploaded after each epoch)."""
        if self._temp:
            shutil.rmtree(self._temp, ignore_errors=True)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _sync(self, download: bool = False) -> None:
        """For a run at a URI: fetch the run's logs into the local folder, or upload them there."""
        if not self._temp:
            return
        for path in (self.train, self.test, self.metrics):
            remote = storage.join(self.run_dir, path.name)
            if not download:
                storage.upload(path, remote)
            elif storage.is_file(remote):
                storage.download(remote, path.parent)


KEPT_FILE = "kept_checkpoints.json"  # which Ray checkpoints --keep left, and why


def run_outputs(name: str, checkpoint_dir: str) -> list[str]:
    """What a training run writes into its folder besides Ray's checkpoints (``name``: its logs' prefix)."""
    return [f"{name}_train.txt", f"{name}_test.txt", "metrics.jsonl", RUN_FILE, KEPT_FILE, "loss.png", "dice.png",
            checkpoint_dir]


def run_settings(train: dict, manifest: dict) -> dict:
    """What ``RUN/run.json`` holds: the TrainConfig (as a dict) and the classes and image size of its data."""
    return {"network": train.get("network"), "classes": manifest["classes"], "image_size": manifest["image_size"],
            "train": train}


def save_run_settings(run_dir: Location, settings: dict) -> None:
    storage.write_text(storage.join(run_dir, RUN_FILE), json.dumps(redact(settings), indent=2) + "\n")


def check_resume(run_dir: Location, settings: dict) -> None:
    """One clear error when resuming ``run_dir`` with settings that would corrupt it (another network, other
    classes, another image size); runs from before ``run.json`` existed are not checked."""
    path = storage.join(run_dir, RUN_FILE)
    if not storage.is_file(path):
        return
    saved, settings = storage.read_json(path), redact(settings)
    changed = [key for key in FIXED_ON_RESUME if saved.get(key) != settings[key]]
    if changed:
        differences = "; ".join(f"{key} {saved.get(key)} there, {settings[key]} now" for key in changed)
        raise UserError(f"{run_dir}: --resume would continue a run with another {', '.join(changed)} "
                        f"({differences}); start it in another --run-dir")


def read_metrics(run_dir: Location) -> list[dict]:
    """Every epoch's metrics of a run (a folder or a URI), in order."""
    return _records(storage.join(run_dir, "metrics.jsonl"))


def _records(path: Location) -> list[dict]:
    """The JSON lines of ``path``. A last line cut short (a full disk, a killed process: its epoch was not
    checkpointed, so a resumed run trains it again) is left out; a bad line before it is one error naming it."""
    lines = _lines(path)
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise UserError(f"{path}: line {number} is not a JSON record; the run's metrics are damaged") from None
    return records


def _epoch_of(line: str) -> int | None:
    """The epoch a text-log line starts with; None for a header or a line cut short."""
    first = line.split(maxsplit=1)[0]
    return int(first) if first.isdigit() else None


def _lines(path: Location) -> list[str]:
    return [line for line in storage.read_text(path).splitlines() if line.strip()] if storage.is_file(path) else []

"""A training run's logs in rmldnn's spirit: ``<name>_train.txt``, ``<name>_test.txt`` and ``metrics.jsonl``.

Written by rank 0 only. A resumed run first drops the lines of epochs after its checkpoint, so an epoch that was
logged but not checkpointed before a crash is not logged twice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

TRAIN_HEADER = "# epoch batch time_s loss grad_norm lr"
TEST_HEADER = "# epoch test_loss pixel_accuracy mean_iou mean_dice"


class RunLog:
    def __init__(self, run_dir: Path, name: str) -> None:
        self.train = run_dir / f"{name}_train.txt"
        self.test = run_dir / f"{name}_test.txt"
        self.metrics = run_dir / "metrics.jsonl"
        run_dir.mkdir(parents=True, exist_ok=True)

    def start(self, last_epoch: int) -> None:
        """Keep the lines of epochs up to ``last_epoch`` (0: none) and write the headers when new."""
        for path, header in ((self.train, TRAIN_HEADER), (self.test, TEST_HEADER)):
            kept = [line for line in _lines(path) if not line.startswith("#") and int(line.split()[0]) <= last_epoch]
            path.write_text("".join(f"{line}\n" for line in [header, *kept]))
        kept = [line for line in _lines(self.metrics) if json.loads(line)["epoch"] <= last_epoch]
        self.metrics.write_text("".join(f"{line}\n" for line in kept))

    def batch(self, epoch: int, batch: int, seconds: float, loss: float, grad_norm: float, lr: float) -> None:
        with self.train.open("a") as f:
            f.write(f"{epoch} {batch} {seconds:.3f} {loss:.6f} {grad_norm:.6f} {lr:.6g}\n")

    def epoch(self, metrics: dict) -> None:
        with self.test.open("a") as f:
            f.write(f"{metrics['epoch']} {metrics['test_loss']:.6f} {metrics['pixel_accuracy']:.6f} "
                    f"{metrics['mean_iou']:.6f} {metrics['mean_dice']:.6f}\n")
        with self.metrics.open("a") as f:
            f.write(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v)
                                for k, v in metrics.items()}) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    """Every epoch's metrics of a run, in order."""
    return [json.loads(line) for line in _lines(run_dir / "metrics.jsonl")]


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

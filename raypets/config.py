"""Settings of ``raypets train`` (and of each trial of a sweep), checked when built, before any Ray work. No Ray and
no I/O here: the files the settings name are checked by the stage that reads them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from raypets import storage
from raypets.augment import Augmentation
from raypets.errors import UserError
from raypets.losses import LOSSES
from raypets.optim import OPTIMIZERS, check_lr_schedule, learning_rate
from raypets.precision import PRECISIONS
from raypets.storage import Location
from raypets.tracking import check_names

DEVICES = ("auto", "cpu", "gpu")
DATA_CACHES = ("auto", "memory", "stream")

# Where the default recipe deviates from the tutorial's literal one, and why (README "Training"): a linear LR
# warm-up stops the Dice loss collapsing to all-background early, and torch's BN momentum keeps the running
# statistics close enough that eval-mode predictions are not blank for the first epochs. ``strong`` adds
# augmentation (raypets.augment) and a cosine decay of the LR; docs/benchmarks.md compares the three.
RECIPES = {
    "robust": {"warmup_steps": 100, "bn_momentum": 0.1},
    "tutorial": {"warmup_steps": 0, "bn_momentum": 0.01},
    "strong": {"warmup_steps": 100, "bn_momentum": 0.1, "hflip": 0.5, "crop_scale": 0.5, "rotate": 10.0,
               "color_jitter": 0.2, "lr_scheduler": {"type": "cosine"}, "unet_skips": True},
}
# ``raypets train``'s recipe: ``strong`` beat ``robust`` in mean and worst seed at both sizes of the study in
# docs/benchmarks.md. A run from an rmldnn ``--config`` file keeps ``robust``, the tutorial's recipe made robust.
DEFAULT_RECIPE, CONFIG_FILE_RECIPE = "strong", "robust"


TRAIN_PATHS = ("data", "run_dir", "network", "init_weights")  # the TrainConfig fields that name files


@dataclass(frozen=True)
class TrainConfig:
    """Settings of ``raypets train``: the tutorial's defaults, made robust where the literal recipe collapses.

    ``batch_size`` and ``test_batch_size`` are global, as in rmldnn: each of the N workers takes 1/N.
    Inputs are fed as ``(pixel / 255 - normalize_mean) / normalize_std``; the tutorial's std 1/255 gives 0-255.
    """

    data: Location  # a folder or a URI, as run_dir
    run_dir: Location
    workers: int = 1
    device: str = "auto"
    gpus_per_worker: float = 1.0  # a fraction shares a GPU between one-worker runs (a sweep's trials)
    precision: str = "auto"  # raypets.precision: bf16 on GPUs that have it, fp16 on older ones, fp32 on a CPU
    sync_bn: bool = False
    compile: bool = False
    data_cache: str = "auto"  # memory: splits read once into the object store; stream: read each epoch
    epochs: int = 30
    batch_size: int = 64
    test_batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "rmsprop"
    loss: str = "dice"
    loss_source: str = "softmax"
    lr_scheduler: dict | None = None
    weight_decay: float | None = None  # None: the optimizer's own default (AdamW 0.01, the others 0)
    class_weights: list[float] | None = None  # per class, for the loss (Dice, cross-entropy or both)
    warmup_steps: int = RECIPES["robust"]["warmup_steps"]
    bn_momentum: float = RECIPES["robust"]["bn_momentum"]
    hflip: float = 0.0
    vflip: float = 0.0
    crop_scale: float = 1.0  # random resized crop: the smallest share of the area kept (1: none)
    rotate: float = 0.0  # random rotation up to this many degrees
    color_jitter: float = 0.0  # brightness, contrast, saturation each scaled by up to 1 +- this
    normalize_mean: float = 0.0
    normalize_std: float = 1 / 255
    network: Path | None = None  # a Keras-JSON file; None: the built-in XceptionUNet
    unet_skips: bool = False  # the built-in network with U-Net's encoder-to-decoder skips (model.XceptionUNet)
    init_weights: Path | None = None
    checkpoint_every: int = 5
    keep: int | None = None
    progress_every: float = 30.0  # seconds between rank 0's progress lines within an epoch; 0: none
    tracking: list[str] = field(default_factory=list)  # raypets.tracking.TRACKERS rank 0 logs to
    max_failures: int = 2
    resume: bool = False
    overwrite: bool = False  # replace logs and checkpoints of another run in run_dir (not a Ray run: --resume)
    seed: int = 0
    name: str = "raypets"
    checkpoint_dir: str = "checkpoints"

    def __post_init__(self) -> None:
        checks = [
            (self.workers >= 1, f"--workers must be at least 1, got {self.workers}"),
            (self.device in DEVICES, f"unknown device {self.device!r}; choose {', '.join(DEVICES)}"),
            (0 < self.gpus_per_worker <= 1 or float(self.gpus_per_worker).is_integer() and self.gpus_per_worker > 0,
             f"GPUs per worker must be a fraction in (0, 1] or a whole number, got {self.gpus_per_worker:g}"),
            (self.gpus_per_worker >= 1 or self.workers == 1,
             f"{self.gpus_per_worker:g} of a GPU per worker needs one worker per run ({self.workers} asked): two "
             "NCCL ranks cannot share a GPU"),
            (self.precision in PRECISIONS, f"unknown precision {self.precision!r}; choose {', '.join(PRECISIONS)}"),
            (self.data_cache in DATA_CACHES,
             f"unknown data cache {self.data_cache!r}; choose {', '.join(DATA_CACHES)}"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= self.workers,
             f"--batch-size {self.batch_size} is global and must be at least --workers {self.workers}"),
            (self.test_batch_size >= self.workers,
             f"--test-batch-size {self.test_batch_size} is global and must be at least --workers {self.workers}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose {', '.join(OPTIMIZERS)}"),
            (self.loss in LOSSES, f"unknown loss {self.loss!r}; choose {', '.join(LOSSES)}"),
            (self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (0.0 <= self.bn_momentum <= 1.0, f"--bn-momentum must be in [0, 1], got {self.bn_momentum}"),
            (0.0 <= self.hflip <= 1.0 and 0.0 <= self.vflip <= 1.0, "flip probabilities must be in [0, 1]"),
            (0.0 < self.crop_scale <= 1.0, f"--crop-scale must be in (0, 1], got {self.crop_scale}"),
            (0.0 <= self.rotate <= 180.0, f"--rotate must be in [0, 180] degrees, got {self.rotate}"),
            (0.0 <= self.color_jitter < 1.0, f"--color-jitter must be in [0, 1), got {self.color_jitter}"),
            (self.weight_decay is None or self.weight_decay >= 0,
             f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.class_weights is None or (len(self.class_weights) > 0 and min(self.class_weights) >= 0
                                            and sum(self.class_weights) > 0),
             f"--class-weights must be non-negative with a positive sum, got {self.class_weights}"),
            (self.normalize_std > 0, f"normalize std must be positive, got {self.normalize_std}"),
            (self.checkpoint_every >= 1, f"--checkpoint-every must be at least 1, got {self.checkpoint_every}"),
            (self.keep is None or self.keep >= 1, f"--keep must be at least 1, got {self.keep}"),
            (self.progress_every >= 0, f"--progress-every must be >= 0 seconds, got {self.progress_every}"),
            (self.max_failures >= -1, f"--max-failures must be -1 (forever) or more, got {self.max_failures}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if self.lr_scheduler is not None:
            check_lr_schedule(self.lr_scheduler)
        check_names(self.tracking)

    def lr_at(self, step: int, epoch: int, steps_per_epoch: int) -> float:
        """The learning rate at global ``step`` (0-based) of ``epoch`` (1-based); the warm-up lasts at most one
        epoch of ``steps_per_epoch`` steps (tiny data would otherwise warm up for several epochs)."""
        warmup = min(self.warmup_steps, steps_per_epoch)
        return learning_rate(self.lr, warmup, self.lr_scheduler, step, epoch, self.epochs)

    def steps_per_epoch(self, train_images: int) -> int:
        """Optimizer steps in an epoch of ``train_images``: each worker has an equal share, in batches of its
        share of the global batch."""
        return max(1, math.ceil(train_images // self.workers / (self.batch_size // self.workers)))

    def augmentation(self) -> Augmentation:
        return Augmentation(self.hflip, self.vflip, self.crop_scale, self.rotate, self.color_jitter)

    def absolute(self) -> TrainConfig:
        """The same settings with absolute paths: Ray Train runs its workers in another folder."""
        return replace(self, **{k: storage.absolute(getattr(self, k)) for k in TRAIN_PATHS if getattr(self, k)})

    def to_dict(self) -> dict:
        """Plain JSON types, for Ray's loop config and for checkpoints."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"unknown training setting(s): {', '.join(unknown)}")
        return cls(**{k: storage.parse(v) if k in TRAIN_PATHS and v is not None else v for k, v in values.items()})


NEW_RUN_ONLY = ("run_dir", "resume", "overwrite")  # settings a run takes from its command line, never from a file


def saved_settings(path: Location) -> dict:
    """The training settings saved in ``path`` (``raypets train --from``): a sweep's best.json (its best trial's),
    a run's run.json, or what ``raypets train --print-config`` printed; without those of ``NEW_RUN_ONLY``. A data
    URI saved without its keys reads with the keys of ``path`` when both are in the same bucket."""
    saved = storage.read_json(path)
    settings = saved.get("config") or saved.get("train") or saved if isinstance(saved, dict) else None
    if not isinstance(settings, dict) or "data" not in settings:
        raise UserError(f"{path}: holds no training settings (a sweep's best.json, a run's run.json, or what "
                        "raypets train --print-config printed)")
    settings = {key: value for key, value in settings.items() if key not in NEW_RUN_ONLY}
    unknown = sorted(set(settings) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise UserError(f"{path}: unknown training setting(s): {', '.join(unknown)}")
    return {**settings, "data": storage.reuse_credentials(settings["data"], path)}

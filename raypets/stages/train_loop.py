"""The per-worker training loop that Ray Train's ``TorchTrainer`` runs on each worker (Train V2 API).

It reads top to bottom: restore, then per epoch train on this worker's shard, evaluate on its share of the test
split, all-reduce the metrics, checkpoint every ``checkpoint_every`` epochs, report. The driver that starts it is
:mod:`raypets.stages.train`; this module imports only what a worker needs.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from raypets import storage
from raypets.augment import augment
from raypets.checkpoints import load_init_weights, load_state, save_state
from raypets.config import TrainConfig
from raypets.losses import make_loss
from raypets.metrics import ConfusionMatrix
from raypets.model import build_network, normalize, to_inputs, to_unit
from raypets.optim import make_optimizer
from raypets.precision import Precision, require_cuda, resolve_precision
from raypets.runlog import RunLog
from raypets.tracking import open_trackers

COLLAPSE_SHARE = 0.999  # one class predicted on this share of the test pixels counts as a collapse


# --- the per-worker loop -------------------------------------------------------------------------------------

def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The network ``cfg`` trains, freshly initialised."""
    return build_network(num_classes, cfg.network, cfg.bn_momentum, cfg.unet_skips)


def train_loop_per_worker(config: dict) -> None:
    cfg = TrainConfig.from_dict(config["cfg"])
    classes = config["classes"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = config["use_gpu"]
    if use_gpu:
        require_cuda()
        torch.backends.cudnn.benchmark = True  # fixed input sizes: cuDNN picks its fastest kernels once
    device = ray.train.torch.get_device()
    precision = resolve_precision(cfg.precision, device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    torch.manual_seed(cfg.seed)
    # Ray Train logs every report at INFO through a logger outside ray.train (LoggingConfig misses it): rank 0's
    # epoch line says it already.
    logging.getLogger().setLevel(logging.WARNING)

    model = build_model(cfg, len(classes))
    state = _restore(ray.train.get_checkpoint())
    if state:
        model.load_state_dict(state["model"])
    elif cfg.init_weights:
        load_init_weights(model, cfg.init_weights, cfg.network)
    if cfg.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = ray.train.torch.prepare_model(model.to(memory_format=torch.channels_last))
    if cfg.compile:
        model = torch.compile(model)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaled)
    if state:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
    # The shards' masks were checked when prepared: checking them again would read back to the host every step.
    loss_fn = make_loss(cfg.loss, source=cfg.loss_source, weight=cfg.class_weights, check_values=False)
    start_epoch = state["epoch"] + 1 if state else 1
    step = state["step"] if state else 0
    steps_per_epoch = cfg.steps_per_epoch(config["train_images"])
    progress = Progress(cfg.progress_every, config["train_images"], cfg.epochs, world) if rank == 0 else None
    with (RunLog(cfg.run_dir, cfg.name) if rank == 0 else nullcontext() as log,  # rank 0 alone logs the run
          open_trackers(cfg.tracking, cfg.run_dir, config["tracking"], start_epoch - 1) if rank == 0
          else nullcontext() as trackers):
        if log:
            log.start(last_epoch=start_epoch - 1)
        train_shard = ray.train.get_dataset_shard("train")
        test_shard = ray.train.get_dataset_shard("test")
        # An epoch's time runs from the previous epoch's report to this one's, the wait for that report included:
        # it is everything the epoch costs. Its images/s count the training alone.
        epoch_started = time.perf_counter()
        for epoch in range(start_epoch, cfg.epochs + 1):
            train_started = time.perf_counter()
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1_009 + rank)  # same on resume
            batches = train_shard.iter_torch_batches(
                batch_size=cfg.batch_size // world, local_shuffle_buffer_size=max(cfg.batch_size, 256),
                local_shuffle_seed=cfg.seed * 1_000 + epoch, prefetch_batches=2, pin_memory=use_gpu)
            trained = train_epoch(model, batches, optimizer, scaler, loss_fn, cfg, precision, epoch=epoch,
                                  step=step, steps_per_epoch=steps_per_epoch, gen=gen, record=log is not None,
                                  progress=progress)
            step = trained.step
            _all_reduce(trained.sums)
            train_loss = _mean(trained.sums)  # reads back to the host: the epoch's device work is done after it
            train_time = time.perf_counter() - train_started
            test = score_test_split(model, test_shard, cfg, classes, precision, loss_fn, world)
            metrics = {
                "epoch": epoch, "train_loss": train_loss, **test,
                "lr": cfg.lr_at(max(step - 1, 0), epoch, steps_per_epoch),
                "images_per_s": trained.sums[1].item() / train_time,
                "epoch_time_s": time.perf_counter() - epoch_started,
            }
            if log:
                log.batches(epoch, trained.batches())
                log.epoch(metrics)
                trackers.epoch(metrics)
                # Not print(): Ray Train's patched print tees a worker's stdout to its logger too (two lines each).
                sys.stdout.write(epoch_line(metrics, cfg.epochs) + "\n")
                sys.stdout.flush()
            epoch_started = time.perf_counter()
            saved = rank == 0 and (epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs)
            with _checkpoint(model, optimizer, cfg, epoch, step) if saved else nullcontext() as checkpoint:
                ray.train.report(metrics, checkpoint=checkpoint)


@dataclass
class TrainedEpoch:
    """What one epoch of training leaves: ``sums`` (loss * images, images) on the device, the global ``step``, and
    each batch's time, loss, gradient norm and learning rate for the train log (losses and norms on the device)."""

    sums: torch.Tensor
    step: int
    seconds: list[float] = field(default_factory=list)
    losses: list[torch.Tensor] = field(default_factory=list)
    norms: list[torch.Tensor] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)

    def batches(self) -> list[tuple[float, float, float, float]]:
        """(seconds, loss, grad_norm, lr) per batch, read back to the host in one transfer."""
        if not self.losses:
            return []
        losses, norms = torch.stack([torch.stack(self.losses).float(), torch.stack(self.norms).float()]).tolist()
        return list(zip(self.seconds, losses, norms, self.lrs, strict=True))


@dataclass
class Progress:
    """Rank 0's line every ``every_s`` seconds of an epoch (none when 0): images done, images/s, when the epoch and
    the run will end. From the batches' sizes and the clock alone, so it reads nothing back from the device; the
    other workers' images are counted as this one's (each has 1/``world`` of the split)."""

    every_s: float
    epoch_images: int  # the train split, all workers
    epochs: int
    world: int
    epoch: int = 0
    done: int = 0
    started: float = 0.0
    last: float = 0.0

    def start(self, epoch: int) -> None:
        self.epoch, self.done, self.started = epoch, 0, time.monotonic()
        self.last = self.started

    def add(self, images: int) -> None:
        self.done += images * self.world
        now = time.monotonic()
        if not self.every_s or now - self.last < self.every_s:
            return
        self.last = now
        rate = self.done / max(now - self.started, 1e-9)
        epoch_left = max(self.epoch_images - self.done, 0) / rate
        run_left = epoch_left + (self.epochs - self.epoch) * self.epoch_images / rate
        sys.stdout.write(f"epoch {self.epoch}/{self.epochs}: {min(self.done, self.epoch_images)}/{self.epoch_images} "
                         f"images, {rate:.1f} img/s, epoch ends in {_duration(epoch_left)}, run in "
                         f"{_duration(run_left)} (training alone)\n")
        sys.stdout.flush()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def train_epoch(model: nn.Module, batches: Iterable[dict], optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, loss_fn: nn.Module, cfg: TrainConfig, precision: Precision, *,
                epoch: int, step: int, steps_per_epoch: int, gen: torch.Generator, record: bool,
                progress: Progress | None = None) -> TrainedEpoch:
    """One pass over ``batches``, augmented with draws from ``gen``, without reading anything back to the host
    (fp16's loss scaler aside, which checks for overflow each step): per-batch values stay on the device until the
    epoch ends. ``record``: keep them for the train log; ``progress``: print rank 0's progress lines."""
    model.train()
    started = time.perf_counter()
    if progress:
        progress.start(epoch)
    device = next(model.parameters()).device
    trained = TrainedEpoch(torch.zeros(2, dtype=torch.float64, device=device), step)
    for batch in batches:
        x, y = training_tensors(batch, cfg, gen)
        lr = cfg.lr_at(trained.step, epoch, steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with precision.autocast():
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        scaler.step(optimizer)
        scaler.update()
        trained.sums[0] += loss.detach().double() * len(x)
        trained.sums[1] += len(x)
        trained.step += 1
        if progress:
            progress.add(len(x))
        if record:
            trained.seconds.append(time.perf_counter() - started)
            trained.losses.append(loss.detach())
            trained.norms.append(grad_norm)
            trained.lrs.append(lr)
    return trained


def score_test_split(model: nn.Module, test_shard, cfg: TrainConfig, classes: list[str], precision: Precision,
                     loss_fn: nn.Module, world: int) -> dict:
    """Metrics over the whole test split: each worker scores its own share (the shares cover every image once),
    then the sums are all-reduced.

    The forward runs on the unwrapped module: workers may see different numbers of batches, and DDP's forward
    would wait for the others.
    """
    model = _unwrap(model)
    _broadcast_buffers(model)
    model.eval()
    device = next(model.parameters()).device
    matrix = ConfusionMatrix(len(classes), class_names=tuple(classes), device=device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in test_shard.iter_torch_batches(batch_size=max(1, cfg.test_batch_size // world),
                                                   prefetch_batches=2):
            x, y = batch_tensors(batch, cfg)
            with precision.autocast():
                logits = model(x)
            sums[0] += loss_fn(logits, y).double() * len(x)
            sums[1] += len(x)
            matrix.update(logits, y, check_values=False)
    _all_reduce(sums)
    result = matrix.all_reduce().compute()
    predicted = result["pred_pixels"]
    top = max(predicted, key=predicted.get)
    collapsed = predicted[top] >= COLLAPSE_SHARE * max(result["total_pixels"], 1)
    return {
        "test_loss": _mean(sums),
        "mean_dice": result["mean_dice"], "mean_iou": result["mean_iou"],
        "pixel_accuracy": result["pixel_accuracy"],
        **{f"dice_{name}": value for name, value in result["dice"].items()},
        **{f"iou_{name}": value for name, value in result["iou"].items()},
        "collapsed": top if collapsed else "",
    }


def epoch_line(metrics: dict, epochs: int) -> str:
    """One line a person reads per epoch; a collapse is shouted, not trained through silently."""
    per_class = " ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items() if k.startswith("dice_"))
    line = (f"epoch {metrics['epoch']}/{epochs}  train loss {metrics['train_loss']:.4f}  test loss "
            f"{metrics['test_loss']:.4f}  mean Dice {metrics['mean_dice']:.4f} ({per_class})  mIoU "
            f"{metrics['mean_iou']:.4f}  pixel acc {metrics['pixel_accuracy']:.4f}  "
            f"{metrics['images_per_s']:.1f} img/s  {metrics['epoch_time_s']:.1f} s")
    if metrics["collapsed"]:
        line += f"  COLLAPSED: the test predictions are all {metrics['collapsed']}"
    return line


def training_tensors(batch: dict, cfg: TrainConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A shard batch augmented (:mod:`raypets.augment`), as :func:`batch_tensors` gives it."""
    images, masks = augment(to_unit(batch["image"]), batch["mask"].long(), cfg.augmentation(), gen)
    return normalize(images, cfg.normalize_mean, cfg.normalize_std, channels_last=True), masks


def batch_tensors(batch: dict, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A shard batch (already on the worker's device) as channels_last model inputs and int64 class-id targets.

    channels_last on the CPU too: the network's convolutions run 1.5-1.7x faster in it there (docs/benchmarks.md).
    """
    return to_inputs(batch["image"], cfg.normalize_mean, cfg.normalize_std, channels_last=True), batch["mask"].long()


def _mean(sums: torch.Tensor) -> float:
    """The per-image mean of (sum of loss * n, sum of n)."""
    return (sums[0] / sums[1].clamp(min=1)).item()


def _all_reduce(tensor: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)


def _broadcast_buffers(model: nn.Module) -> None:
    """Give every worker rank 0's BatchNorm statistics, the ones its checkpoint saves: DDP broadcasts them at the start
    of each forward, so after an epoch's last step each worker's differ by what its own last batch added."""
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _unwrap(model: nn.Module) -> nn.Module:
    """The network inside ``torch.compile``'s and DDP's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextmanager
def _checkpoint(model, optimizer, cfg: TrainConfig, epoch: int, step: int) -> Iterator[ray.train.Checkpoint]:
    """A Ray checkpoint of this epoch, in a temp folder removed once Ray has persisted it (or failed to); the plain
    state_dict also goes to ``RUN/<checkpoint_dir>/`` (rmldnn's place)."""
    with tempfile.TemporaryDirectory(prefix="raypets-ckpt-") as folder:
        state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
        weights = save_state(Path(folder), weights=state, optimizer=optimizer.state_dict(), epoch=epoch, step=step,
                             config=cfg.to_dict())
        storage.upload(weights, storage.join(cfg.run_dir, cfg.checkpoint_dir, weights.name))
        yield ray.train.Checkpoint.from_directory(folder)


def _restore(checkpoint: ray.train.Checkpoint | None) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return load_state(Path(folder))

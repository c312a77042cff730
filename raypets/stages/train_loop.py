"""The per-worker training loop that Ray Train's ``TorchTrainer`` runs on each worker (Train V2 API).

It reads top to bottom: restore, then per epoch train on this worker's shard, evaluate on its share of the test
split, all-reduce the metrics, checkpoint every ``checkpoint_every`` epochs, report. The driver that starts it is
:mod:`raypets.stages.train`; this module imports only what a worker needs.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from raypets import storage
from raypets.checkpoints import load_state, save_state
from raypets.config import TrainConfig
from raypets.losses import make_loss
from raypets.metrics import ConfusionMatrix
from raypets.model import build_network, to_inputs
from raypets.optim import make_optimizer
from raypets.runlog import RunLog

COLLAPSE_SHARE = 0.999  # one class predicted on this share of the test pixels counts as a collapse


def random_flips(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, gen: torch.Generator):
    """rmldnn's random_horizontal_flip / random_vertical_flip, per sample, on images and masks alike."""
    for prob, dim in ((cfg.hflip, -1), (cfg.vflip, -2)):
        if prob:
            flip = (torch.rand(x.shape[0], generator=gen) < prob).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(dim), x)
            y = torch.where(flip[:, None, None], y.flip(dim), y)
    return x, y


# --- the per-worker loop -------------------------------------------------------------------------------------

def train_loop_per_worker(config: dict) -> None:
    cfg = TrainConfig.from_dict(config["cfg"])
    classes = config["classes"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = config["use_gpu"]
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    torch.manual_seed(cfg.seed)
    # Ray Train logs every report at INFO through a logger outside ray.train (LoggingConfig misses it): rank 0's
    # epoch line says it already.
    logging.getLogger().setLevel(logging.WARNING)

    model = build_network(len(classes), cfg.network, cfg.bn_momentum)
    state = _restore(ray.train.get_checkpoint())
    if state:
        model.load_state_dict(state["model"])
    elif cfg.init_weights:
        model.load_state_dict(torch.load(cfg.init_weights, map_location="cpu", weights_only=True))
    if use_gpu:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr)
    if state:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
    loss_fn = make_loss(cfg.loss, source=cfg.loss_source)
    start_epoch = state["epoch"] + 1 if state else 1
    step = state["step"] if state else 0
    log = RunLog(cfg.run_dir, cfg.name) if rank == 0 else None
    if log:
        log.start(last_epoch=start_epoch - 1)

    train_shard = ray.train.get_dataset_shard("train")
    test_data = ray.train.get_dataset_shard("test")
    for epoch in range(start_epoch, cfg.epochs + 1):
        started = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1_009 + rank)  # same on resume
        model.train()
        loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # sum of loss * n, n
        batches = train_shard.iter_torch_batches(
            batch_size=cfg.batch_size // world, local_shuffle_buffer_size=max(cfg.batch_size, 256),
            local_shuffle_seed=cfg.seed * 1_000 + epoch)
        for batch_index, batch in enumerate(batches, start=1):
            x, y = random_flips(*_tensors(batch, cfg, device, use_gpu), cfg, gen)
            lr = cfg.lr_at(step, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_gpu):
                loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            optimizer.step()
            loss_sum += _weighted(loss.detach(), len(x), device)
            step += 1
            if log:
                log.batch(epoch, batch_index, time.perf_counter() - started, loss.item(), grad_norm.item(), lr)
        train_time = time.perf_counter() - started
        _all_reduce(loss_sum)
        test = test_metrics(model, test_data, cfg, classes, device, use_gpu, loss_fn, rank, world)
        metrics = {
            "epoch": epoch, "train_loss": _mean(loss_sum), **test,
            "lr": cfg.lr_at(max(step - 1, 0), epoch), "images_per_s": loss_sum[1].item() / train_time,
            "epoch_time_s": time.perf_counter() - started,
        }
        checkpoint_dir = None
        if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
            checkpoint_dir = _save(model, optimizer, cfg, epoch, step) if rank == 0 else None
        if log:
            log.epoch(metrics)
            # Not print(): Ray Train's patched print tees a worker's stdout to its logger too (two lines each).
            sys.stdout.write(epoch_line(metrics, cfg.epochs) + "\n")
            sys.stdout.flush()
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    if log:
        log.close()


def test_metrics(model, test_data, cfg: TrainConfig, classes: list[str], device, use_gpu: bool, loss_fn, rank: int,
             world: int) -> dict:
    """Metrics over the whole test split: each worker takes every world-th batch, then all-reduce.

    The forward runs on the unwrapped module: workers may see different numbers of batches, and DDP's forward
    would wait for the others.
    """
    model = _unwrap(model)
    _broadcast_buffers(model)
    model.eval()
    matrix = ConfusionMatrix(len(classes), class_names=tuple(classes), device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for index, batch in enumerate(test_data.iter_torch_batches(batch_size=max(1, cfg.test_batch_size // world))):
            if index % world != rank:
                continue
            x, y = _tensors(batch, cfg, device, use_gpu)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_gpu):
                logits = model(x)
            loss_sum += _weighted(loss_fn(logits, y), len(x), device)
            matrix.update(logits, y)
    _all_reduce(loss_sum)
    result = matrix.all_reduce().compute()
    predicted = result["pred_pixels"]
    top = max(predicted, key=predicted.get)
    collapsed = predicted[top] >= COLLAPSE_SHARE * max(result["total_pixels"], 1)
    return {
        "test_loss": _mean(loss_sum),
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


def _tensors(batch: dict, cfg: TrainConfig, device, use_gpu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A shard batch as model inputs and int64 class-id targets on ``device``."""
    x = to_inputs(batch["image"].to(device), cfg.normalize_mean, cfg.normalize_std, use_gpu)
    return x, batch["mask"].to(device).long()


def _weighted(loss: torch.Tensor, count: int, device) -> torch.Tensor:
    """(loss * count, count): summed over batches and workers, it gives the per-image mean."""
    return torch.stack([loss.double() * count, torch.tensor(count, dtype=torch.float64, device=device)])


def _mean(sums: torch.Tensor) -> float:
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
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _save(model, optimizer, cfg: TrainConfig, epoch: int, step: int) -> str:
    """A new checkpoint folder for Ray; the plain state_dict also goes to ``RUN/<checkpoint_dir>/`` (rmldnn's place)."""
    folder = tempfile.mkdtemp(prefix="raypets-ckpt-")
    weights = save_state(Path(folder), weights={k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()},
                         optimizer=optimizer.state_dict(), epoch=epoch, step=step, config=cfg.to_dict())
    storage.upload(weights, storage.join(cfg.run_dir, cfg.checkpoint_dir, weights.name))
    return folder


def _restore(checkpoint: ray.train.Checkpoint | None) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return load_state(Path(folder))

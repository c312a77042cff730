"""Distributed training with Ray Train: the per-worker loop and the ``TorchTrainer`` around it (Train V2 API).

The loop reads top to bottom: restore, then per epoch train on this worker's shard, evaluate on its share of the
test split, all-reduce the metrics, checkpoint every ``checkpoint_every`` epochs, report.
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
from raypets.checkpoints import RAY_RUN_NAME, STATE_FILE, ray_checkpoint
from raypets.config import PrepareConfig, TrainConfig
from raypets.data.prepare import format_summary, prepare
from raypets.data.shards import open_split, read_manifest
from raypets.errors import UserError
from raypets.losses import make_loss
from raypets.metrics import ConfusionMatrix
from raypets.model import build_network, check_image_size, count_parameters, to_inputs
from raypets.report import plot_curves
from raypets.runlog import RunLog, read_metrics
from raypets.runtime import cpu_share, data_context, init_ray, use_gpus
from raypets.storage import Location

COLLAPSE_SHARE = 0.999  # one class predicted on this share of the test pixels counts as a collapse


# --- the model, optimizer and learning rate: plain PyTorch -------------------------------------------------

def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """torch's defaults for each optimizer (RMSprop alpha 0.99, eps 1e-8: what rmldnn's log shows)."""
    kinds = {"rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
             "sgd": torch.optim.SGD}
    return kinds[cfg.optimizer](params, lr=cfg.lr)


def learning_rate(cfg: TrainConfig, step: int, epoch: int) -> float:
    """LR at global ``step`` (0-based) in ``epoch`` (1-based): linear warm-up, then the epoch schedule."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    spec = cfg.lr_scheduler
    if spec:
        done = epoch - 1  # epochs completed before this one
        kind = spec["type"].lower()
        if kind == "step":
            lr *= spec["gamma"] ** (done // spec["step_size"])
        elif kind == "multistep":
            lr *= spec["gamma"] ** sum(done >= m for m in spec["milestones"])
        else:
            lr *= spec["gamma"] ** done
    return lr


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
    optimizer = make_optimizer(cfg, model.parameters())
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
            lr = learning_rate(cfg, step, epoch)
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
        test = evaluate(model, test_data, cfg, classes, device, use_gpu, loss_fn, rank, world)
        metrics = {
            "epoch": epoch, "train_loss": _mean(loss_sum), **test,
            "lr": learning_rate(cfg, max(step - 1, 0), epoch), "images_per_s": loss_sum[1].item() / train_time,
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


def evaluate(model, test_data, cfg: TrainConfig, classes: list[str], device, use_gpu: bool, loss_fn, rank: int,
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
    """Write a checkpoint folder: the plain state_dict (loadable without Ray) and the resume state.

    The state_dict is also copied to ``RUN/<checkpoint_dir>/model_checkpoint_<epoch>.pt`` (rmldnn's place).
    """
    folder = tempfile.mkdtemp(prefix="raypets-ckpt-")
    weights = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    name = f"model_checkpoint_{epoch}.pt"
    torch.save(weights, Path(folder) / name)
    torch.save({"optimizer": optimizer.state_dict(), "epoch": epoch, "step": step,
                "torch_rng": torch.get_rng_state(), "config": cfg.to_dict(), "weights": name},
               Path(folder) / STATE_FILE)
    storage.upload(Path(folder) / name, storage.join(cfg.run_dir, cfg.checkpoint_dir, name))
    return folder


def _restore(checkpoint: ray.train.Checkpoint | None) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        state["model"] = torch.load(Path(folder) / state["weights"], map_location="cpu", weights_only=True)
    return state


# --- the driver ----------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, *, address: str | None = None, callbacks: list | None = None,
          ray_run_name: str = RAY_RUN_NAME, datasets: dict | None = None) -> dict:
    """Fit the model with a ``TorchTrainer`` on ``cfg.workers`` workers and return the last epoch's metrics
    with ``checkpoint`` (the Ray checkpoint folder) and ``model_checkpoint`` (its plain state_dict file).

    ``datasets``: ``load_datasets(cfg.data, manifest)`` done already (a sweep's trials share its one read).
    """
    cfg = cfg.absolute()
    manifest = read_manifest(cfg.data)
    size = manifest["image_size"]
    try:
        check_image_size(size["height"], size["width"])
    except ValueError as err:
        raise UserError(f"{cfg.data}: {err}; prepare it again with such a --size") from None
    for split in ("train", "test"):
        if manifest["counts"].get(split, 0) == 0:
            raise UserError(f"{cfg.data}: the {split} split is empty; training needs both splits")
    previous = storage.exists(storage.join(cfg.run_dir, ray_run_name))
    if previous and not cfg.resume:
        raise UserError(f"{cfg.run_dir}: holds a training run already; pass --resume to continue it, "
                        "or choose another --run-dir")
    if cfg.resume and not previous:
        raise UserError(f"{cfg.run_dir}: no training run to resume")
    storage.check_bucket(cfg.run_dir)

    init_ray(address)
    use_gpu = use_gpus(cfg.device, cfg.workers)
    filesystem, storage_path = storage.filesystem(cfg.run_dir)  # Ray Train persists checkpoints to a URI itself
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "classes": manifest["classes"], "use_gpu": use_gpu},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                               resources_per_worker=worker_resources(cfg, use_gpu)),
        datasets=datasets or load_datasets(cfg.data, manifest),
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name=ray_run_name, storage_path=storage_path, storage_filesystem=filesystem, callbacks=callbacks or [],
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # rank 0 prints the epochs
        ),
    )
    print(header(cfg, manifest, use_gpu), flush=True)
    result = trainer.fit()
    with tempfile.TemporaryDirectory() as folder:  # drawn locally, then put in the run folder (or at its URI)
        for plot in plot_curves(read_metrics(cfg.run_dir), Path(folder)):
            storage.upload(plot, storage.join(cfg.run_dir, plot.name))
    metrics = dict(result.metrics or {})
    if result.checkpoint is not None:  # Ray names it by its path in the bucket; say it as the run's URI
        checkpoint = ray_checkpoint(cfg.run_dir, result.checkpoint.path, ray_run_name)
        metrics["checkpoint"] = str(checkpoint)
        metrics["model_checkpoint"] = str(storage.join(checkpoint, f"model_checkpoint_{metrics['epoch']}.pt"))
    return metrics


def ensure_shards(src: Path, shards: Location, size: tuple[int, int], *, address: str | None = None) -> None:
    """Prepare the rmldnn-layout folder ``src`` into ``shards`` at ``size``, unless that was done already."""
    if storage.is_file(storage.join(shards, "manifest.json")):
        manifest = read_manifest(shards)
        if manifest["source"] != str(src.resolve()) or (manifest["image_size"]["height"],
                                                         manifest["image_size"]["width"]) != tuple(size):
            raise UserError(f"{shards}: holds shards of {manifest['source']} at another size; remove it or pass --data")
        return
    print(format_summary(prepare(PrepareConfig(src, shards, layout="rmldnn", size=size), address=address), shards))


def header(cfg: TrainConfig, manifest: dict, use_gpu: bool) -> str:
    """rmldnn-like run header: model and parameters, optimizer, loss, data per worker, batch per worker."""
    model = build_network(len(manifest["classes"]), cfg.network, cfg.bn_momentum)
    counts = manifest["counts"]
    size = manifest["image_size"]
    name = "XceptionUNet" if cfg.network is None else f"{cfg.network.name} (Keras JSON)"
    return "\n".join([
        f"raypets train: {name}, {count_parameters(model):,} trainable parameters",
        f"  optimizer {cfg.optimizer} lr {cfg.lr:g} (warm-up {cfg.warmup_steps} steps"
        f"{', schedule ' + cfg.lr_scheduler['type'] if cfg.lr_scheduler else ''}), BN momentum {cfg.bn_momentum:g}",
        f"  loss {cfg.loss} (source {cfg.loss_source}), {cfg.epochs} epochs, seed {cfg.seed}",
        f"  data {cfg.data}: {counts['train']} train / {counts['test']} test images at "
        f"{size['width']}x{size['height']}; per worker ~{counts['train'] // cfg.workers} train, "
        f"test batches shared",
        f"  {cfg.workers} worker(s) on {'GPU (bf16 autocast, channels_last)' if use_gpu else 'CPU'}, batch "
        f"{cfg.batch_size} = {cfg.batch_size // cfg.workers} per worker, test batch {cfg.test_batch_size}",
        f"  run folder {cfg.run_dir}",
    ])


def load_datasets(data: Location, manifest: dict) -> dict:
    """Both splits of the prepared ``data`` (with its ``manifest``) read once into Ray's object store (spilled to disk
    when large), so that the epochs re-read no Parquet: at 160 px the whole Oxford-IIIT Pet set is about 0.6 GB."""
    # Progress logged where the epochs iterate them, not sent as bars to the driver (which draws none without tqdm).
    with data_context(use_ray_tqdm=False):
        return {split: open_split(data, split, columns=["image", "mask"], manifest=manifest).materialize()
                for split in ("train", "test")}


def worker_resources(cfg: TrainConfig, use_gpu: bool) -> dict:
    """One GPU and CPU per GPU worker; CPU workers get ``cpu_share`` (a free slot stays for Ray Data)."""
    return {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": cpu_share(cfg.workers)}

"""``raypets train``: the driver that fits the model with Ray Train's ``TorchTrainer`` on N workers (Train V2 API).

Each worker runs :func:`raypets.stages.train_loop.train_loop_per_worker`; this module checks the settings and the
data, starts the trainer, and draws the curves when it ends.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ray
import ray.train
import ray.train.torch

from raypets import storage
from raypets.checkpoints import RAY_RUN_NAME, ray_checkpoint, weights_name
from raypets.config import TrainConfig
from raypets.errors import UserError
from raypets.model import build_network, count_parameters, require_image_size
from raypets.plots import plot_curves
from raypets.runlog import read_metrics
from raypets.stages.runtime import cpu_share, data_context, init_ray, use_gpus
from raypets.stages.shards import open_split, read_manifest
from raypets.stages.train_loop import train_loop_per_worker
from raypets.storage import Location


def train(cfg: TrainConfig, *, address: str | None = None, callbacks: list | None = None,
          ray_run_name: str = RAY_RUN_NAME, datasets: dict | None = None) -> dict:
    """Fit the model with a ``TorchTrainer`` on ``cfg.workers`` workers and return the last epoch's metrics
    with ``checkpoint`` (the Ray checkpoint folder) and ``model_checkpoint`` (its plain state_dict file).

    ``datasets``: ``load_datasets(cfg.data, manifest)`` done already (a sweep's trials share its one read).
    """
    cfg = cfg.absolute()
    manifest = read_manifest(cfg.data)
    require_image_size(manifest["image_size"]["height"], manifest["image_size"]["width"], str(cfg.data))
    for path in (cfg.network, cfg.init_weights):
        storage.require_file(path)
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
        metrics["model_checkpoint"] = str(storage.join(checkpoint, weights_name(metrics["epoch"])))
    return metrics


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

"""``raypets train``: the driver that fits the model with Ray Train's ``TorchTrainer`` on N workers (Train V2 API).

Each worker runs :func:`raypets.stages.train_loop.train_loop_per_worker`; this module checks the settings and the
data, starts the trainer, and draws the curves when it ends.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.data.dataset import MaterializedDataset

from raypets import storage, tracking
from raypets.checkpoints import RAY_RUN_NAME, load_init_weights, ray_checkpoint, weights_name
from raypets.config import TrainConfig
from raypets.errors import UserError
from raypets.metrics import nan_last
from raypets.model import count_parameters, require_image_size
from raypets.plots import plot_curves
from raypets.precision import require_cuda
from raypets.redaction import redact
from raypets.runlog import KEPT_FILE, check_resume, read_metrics, run_outputs, run_settings, save_run_settings
from raypets.stages.runtime import (
    cpu_share,
    data_context,
    fast_reports,
    init_ray,
    object_store_bytes,
    released_when_done,
    run_storage,
    use_gpus,
)
from raypets.stages.shards import open_split, read_manifest
from raypets.stages.train_loop import build_model, train_loop_per_worker
from raypets.storage import Location

MEMORY_SHARE = 0.5  # --data-cache auto keeps splits in the object store up to this share of it, else streams
STREAM_BUFFER_SHARE, STREAM_BUFFER_MAX = 0.1, 512 * 2**20  # what streamed splits may hold in the object store
STEP_PAUSE_S = 0.05  # a streamed split's scheduling steps are at least this far apart (PacedScheduling)


def train(cfg: TrainConfig, *, address: str | None = None, callbacks: list | None = None,
          ray_run_name: str = RAY_RUN_NAME, datasets: dict | None = None, mlflow: dict | None = None) -> dict:
    """Fit the model with a ``TorchTrainer`` on ``cfg.workers`` workers and return the last epoch's metrics
    with ``checkpoint`` (the Ray checkpoint folder) and ``model_checkpoint`` (its plain state_dict file).

    ``datasets``: ``load_datasets(cfg.data, manifest)`` done already (a sweep's trials share its one read);
    ``mlflow``: ``tracking.mlflow_target`` done already (a sweep's trials share its store and experiment).
    """
    cfg = cfg.absolute()
    manifest = read_manifest(cfg.data)
    require_image_size(manifest["image_size"]["height"], manifest["image_size"]["width"], str(cfg.data))
    for path in (cfg.network, cfg.init_weights):
        storage.require_file(path)
    if cfg.init_weights:  # weights that do not fit the network: one error here, not one per worker
        load_init_weights(build_model(cfg, len(manifest["classes"])), cfg.init_weights, cfg.network)
    if cfg.class_weights and len(cfg.class_weights) != len(manifest["classes"]):
        raise UserError(f"--class-weights gives {len(cfg.class_weights)} weights; {cfg.data} has "
                        f"{len(manifest['classes'])} classes ({', '.join(manifest['classes'])})")
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
    if not cfg.resume and not cfg.overwrite:  # e.g. rmldnn's own logs and checkpoints beside its config file
        for name in run_outputs(cfg.name, cfg.checkpoint_dir):
            if storage.exists(storage.join(cfg.run_dir, name)):
                raise UserError(f"{storage.join(cfg.run_dir, name)}: exists, and this run would replace it; pass "
                                "--overwrite to let it, or choose another --run-dir")
    settings = run_settings(cfg.to_dict(), manifest)
    if cfg.resume:
        check_resume(cfg.run_dir, settings)
        read_metrics(cfg.run_dir)  # a damaged log is one error here, not a worker's traceback
    if "mlflow" in cfg.tracking:  # MLflow missing, or its store unreachable: one error before Ray starts
        mlflow = mlflow or tracking.mlflow_target(cfg.run_dir)

    init_ray(address)
    use_gpu = use_gpus(cfg.device, cfg.workers, per_worker=cfg.gpus_per_worker)
    if cfg.sync_bn and not use_gpu:
        raise UserError("--sync-bn needs GPU workers (torch's SyncBatchNorm runs on CUDA only)")
    if use_gpu:
        check_cuda_workers(cfg.gpus_per_worker)
    fast_reports()
    datasets = datasets or load_datasets(cfg.data, manifest, cfg.data_cache, cfg.seed)
    streamed = not isinstance(datasets["train"], MaterializedDataset)
    filesystem, storage_path = run_storage(cfg.run_dir)  # Ray Train persists checkpoints to a URI itself
    started = tracking.start(cfg.tracking, cfg.run_dir, cfg.to_dict(), resume=cfg.resume, mlflow=mlflow)
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "classes": manifest["classes"], "use_gpu": use_gpu,
                           "train_images": manifest["counts"]["train"], "tracking": started},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                               resources_per_worker=worker_resources(cfg, use_gpu)),
        datasets=datasets,
        dataset_config=ExactTestSplit(stream_buffer_bytes(manifest) if streamed else None),
        run_config=ray.train.RunConfig(
            name=ray_run_name, storage_path=storage_path, storage_filesystem=filesystem, callbacks=callbacks or [],
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            # --keep N: the N with the best test mean Dice (and the latest, which Ray always keeps, to resume from).
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep, checkpoint_score_attribute="mean_dice",
                                                         checkpoint_score_order="max"),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # rank 0 prints the epochs
        ),
    )
    print(header(cfg, manifest, use_gpu), flush=True)
    save_run_settings(cfg.run_dir, settings)
    with released_when_done():
        result = trainer.fit()
    with tempfile.TemporaryDirectory() as folder:  # drawn locally, then put in the run folder (or at its URI)
        for plot in plot_curves(read_metrics(cfg.run_dir), Path(folder)):
            storage.upload(plot, storage.join(cfg.run_dir, plot.name))
    write_kept(cfg, result, ray_run_name)
    metrics = dict(result.metrics or {})
    if result.checkpoint is not None:  # Ray names it by its path in the bucket; say it as the run's URI
        checkpoint = ray_checkpoint(cfg.run_dir, result.checkpoint.path, ray_run_name)
        metrics["checkpoint"] = str(checkpoint)
        metrics["model_checkpoint"] = str(storage.join(checkpoint, weights_name(metrics["epoch"])))
    return metrics


def write_kept(cfg: TrainConfig, result: ray.train.Result, ray_run_name: str) -> None:
    """``RUN/kept_checkpoints.json``: the Ray checkpoints the run keeps, best test mean Dice first, each with its
    epoch, its Dice and why it is kept: ``best`` (among the ``--keep`` N), ``latest``, or ``all`` (no ``--keep``).

    Ray keeps the latest beside its best N, but ``result.best_checkpoints`` lists only the best: it is added here."""
    kept = list(result.best_checkpoints or [])
    if result.checkpoint is not None and all(c.path != result.checkpoint.path for c, _ in kept):
        kept.append((result.checkpoint, result.metrics))
    ranked = sorted(kept, key=lambda pair: nan_last(pair[1]["mean_dice"], descending=True))
    latest = max((metrics["epoch"] for _, metrics in kept), default=None)
    rows = [{"checkpoint": str(ray_checkpoint(cfg.run_dir, checkpoint.path, ray_run_name)), "epoch": metrics["epoch"],
             "mean_dice": metrics["mean_dice"],
             "kept_as": ["all"] if cfg.keep is None else
             [why for why, yes in (("best", rank < cfg.keep), ("latest", metrics["epoch"] == latest)) if yes]}
            for rank, (checkpoint, metrics) in enumerate(ranked)]
    storage.write_text(storage.join(cfg.run_dir, KEPT_FILE), json.dumps(redact(rows), indent=2) + "\n")


def header(cfg: TrainConfig, manifest: dict, use_gpu: bool) -> str:
    """rmldnn-like run header: model and parameters, optimizer, loss, data per worker, batch per worker."""
    model = build_model(cfg, len(manifest["classes"]))
    counts = manifest["counts"]
    size = manifest["image_size"]
    name = f"{cfg.network.name} (Keras JSON)" if cfg.network else \
        f"XceptionUNet{' with U-Net skips' if cfg.unet_skips else ''}"
    return redact("\n".join([
        f"raypets train: {name}, {count_parameters(model):,} trainable parameters",
        f"  optimizer {cfg.optimizer} lr {cfg.lr:g} (warm-up {cfg.warmup_steps} steps"
        f"{', schedule ' + cfg.lr_scheduler['type'] if cfg.lr_scheduler else ''}), BN momentum {cfg.bn_momentum:g}",
        f"  loss {cfg.loss} (source {cfg.loss_source}), {cfg.epochs} epochs, seed {cfg.seed}",
        f"  data {cfg.data}: {counts['train']} train / {counts['test']} test images at "
        f"{size['width']}x{size['height']}; per worker ~{counts['train'] // cfg.workers} train and "
        f"~{counts['test'] // cfg.workers} test",
        f"  {cfg.workers} worker(s) on {'GPU' if use_gpu else 'CPU'} (precision {cfg.precision}, channels_last"
        f"{', SyncBatchNorm' if cfg.sync_bn else ''}{', torch.compile' if cfg.compile else ''}), batch "
        f"{cfg.batch_size} = {cfg.batch_size // cfg.workers} per worker, test batch {cfg.test_batch_size}",
        f"  run folder {cfg.run_dir}",
    ]))


def load_datasets(data: Location, manifest: dict, cache: str = "auto", seed: int = 0) -> dict:
    """Both splits of the prepared ``data`` (with its ``manifest``) as Ray Datasets: ``memory`` reads them once into
    Ray's object store (spilled to disk when large; at 160 px the Oxford-IIIT Pet set is about 0.6 GB), so the epochs
    re-read no Parquet; ``stream`` reads the shards each epoch, the training split's files in a new order each time
    (drawn from ``seed``; the loop's local shuffle buffer mixes their rows), holding only the blocks ahead of the
    workers; ``auto`` streams splits larger than ``MEMORY_SHARE`` of the object store."""
    if cache == "auto":
        cache = "stream" if dataset_bytes(manifest) > MEMORY_SHARE * object_store_bytes() else "memory"
    # Progress logged where the epochs iterate them, not sent as bars to the driver (which draws none without tqdm).
    callbacks = ray.data.DataContext.get_current().custom_execution_callback_classes  # a user's own are kept
    paced = {"custom_execution_callback_classes": [*callbacks, PacedScheduling]} if cache == "stream" else {}
    with data_context(use_ray_tqdm=False, **paced):
        splits = {split: open_split(data, split, columns=["image", "mask"], manifest=manifest,
                                    file_order_seed=seed if split == "train" and cache == "stream" else None)
                  for split in ("train", "test")}
        if cache == "memory":
            return {split: dataset.materialize() for split, dataset in splits.items()}
        return splits


class PacedScheduling(ExecutionCallback):
    """Ray Data's scheduling loop waits for reads to finish, but not while the object-store budget of a streamed
    split holds back the output of reads that have finished (the workers have not yet taken the blocks ahead): it
    then spins, taking most of a core from the training beside it. Each step pauses ``STEP_PAUSE_S``."""

    def on_execution_step(self, executor) -> None:
        time.sleep(STEP_PAUSE_S)


def dataset_bytes(manifest: dict) -> int:
    """What both splits' images and masks take in memory."""
    size = manifest["image_size"]
    return sum(manifest["counts"].values()) * size["height"] * size["width"] * 4  # 3 image channels + the mask


def check_cuda_workers(per_worker: float) -> None:
    """One clear error, before a run starts, when a GPU worker's torch sees no CUDA device (a node whose driver is
    too old for the installed torch wheel would otherwise train on its CPU)."""
    try:
        ray.get(ray.remote(num_gpus=per_worker, num_cpus=0)(require_cuda).remote())
    except ray.exceptions.RayTaskError as err:
        raise err.cause from None


class ExactTestSplit(ray.train.DataConfig):
    """The training split in equal shares, as Ray Train splits it; the test split in shares that hold every image
    exactly once (Ray's equal split may drop a few), so each worker reads only its own test share.

    ``buffer_bytes``: for streamed splits, how much of the object store each may fill ahead of the workers (Ray
    Data's default reads as far ahead as the store allows)."""

    def __init__(self, buffer_bytes: float | None = None) -> None:
        super().__init__(datasets_to_split=["train", "test"])  # both made once, by rank 0, for every worker
        self.buffer_bytes = buffer_bytes

    def _resolve_execution_options(self, dataset_name: str):
        options = super()._resolve_execution_options(dataset_name)
        if self.buffer_bytes:
            options.resource_limits = options.resource_limits.copy(object_store_memory=self.buffer_bytes)
        return options

    def configure(self, datasets: dict, world_size: int, worker_handles, worker_node_ids, **kwargs) -> list[dict]:
        rest = {name: dataset for name, dataset in datasets.items() if name != "test"}
        output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        if "test" in datasets:  # Ray Train V2 configures one dataset at a time
            test = datasets["test"].copy(datasets["test"])
            test.context.execution_options = self._resolve_execution_options("test")
            for shard, split in zip(output, test.streaming_split(world_size, equal=False), strict=True):
                shard["test"] = split
        return output


def stream_buffer_bytes(manifest: dict) -> float:
    """The object store a streamed split may fill: ``STREAM_BUFFER_SHARE`` of the data, at most
    ``STREAM_BUFFER_MAX``."""
    return min(STREAM_BUFFER_SHARE * dataset_bytes(manifest), STREAM_BUFFER_MAX)


def worker_resources(cfg: TrainConfig, use_gpu: bool) -> dict:
    """``cfg.gpus_per_worker`` GPUs and a CPU per GPU worker; CPU workers get ``cpu_share`` (a free slot stays for
    Ray Data)."""
    return {"CPU": 1, "GPU": cfg.gpus_per_worker} if use_gpu else {"CPU": cpu_share(cfg.workers)}

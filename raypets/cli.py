"""The ``raypets`` command: parse, validate, call one stage function, print its summary.

Mistakes a user can make end in one ``raypets: error: ...`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from raypets import __version__, storage
from raypets.data.decode import parse_size
from raypets.errors import UserError
from raypets.redaction import redact


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _local(text: str) -> Path:
    """A path that must be local: a URI here is one clear error naming the argument."""
    if storage.is_uri(text):
        raise argparse.ArgumentTypeError(f"{redact(text)}: takes a local path, not a URI (URIs are for prepare's OUT, "
                                         "--data, --run-dir, --checkpoint and predict's INPUT and OUTPUT)")
    return Path(text)


def _lr_schedule(text: str) -> dict:
    """``cosine`` or a JSON object such as ``{"type": "step", "step_size": 10, "gamma": 0.1}``."""
    try:
        return json.loads(text) if text.lstrip().startswith("{") else {"type": text}
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not a schedule name nor a JSON object: {err}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _add_ray_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else start local Ray)")
    parser.add_argument("--no-progress", action="store_true", help="hide Ray Data progress bars")


def _add_device_args(parser: argparse.ArgumentParser) -> None:
    device = parser.add_mutually_exclusive_group()
    device.add_argument("--gpu", dest="device", action="store_const", const="gpu", help="one GPU per worker")
    device.add_argument("--cpu", dest="device", action="store_const", const="cpu", help="CPU workers only")


def _add_precision_arg(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    from raypets.precision import PRECISIONS

    parser.add_argument("--precision", choices=PRECISIONS, default=default,
                        help="autocast of the forward pass (default auto: bf16, or fp16 where the GPU lacks it; "
                        "fp32 on a CPU)")


def _synth(args: argparse.Namespace) -> int:
    from raypets.data.synth import synthesize

    height, width = args.size
    print(synthesize(args.out, n=args.n, size=(width, height), seed=args.seed, defects=args.defects))
    return 0


def _download(args: argparse.Namespace) -> int:
    import shlex

    from raypets.download import BASE_URL, download, with_md5

    download(args.dir, base_url=args.base_url or BASE_URL, resources=with_md5(args.md5))
    print(f"next: raypets prepare {shlex.quote(str(args.dir))} data/shards "
          "(--split official for the archive's own trainval/test split)")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from raypets.stages.prepare import PrepareConfig, describe_manifest, prepare
    from raypets.stages.runtime import set_progress_bars

    cfg = PrepareConfig(
        src=args.src, out=args.out, layout=args.layout, size=args.size, split=args.split,
        test_fraction=args.test_fraction, seed=args.seed, strict=args.strict, overwrite=args.overwrite,
        export_rmldnn=args.export_rmldnn,
    )
    set_progress_bars(not args.no_progress)
    manifest = prepare(cfg, address=args.address)
    print(describe_manifest(manifest, cfg.out))
    return 0


def _train(args: argparse.Namespace) -> int:
    from raypets.config import CONFIG_FILE_RECIPE, DEFAULT_RECIPE, RECIPES, TrainConfig, saved_settings
    from raypets.stages.runtime import set_progress_bars
    from raypets.stages.train import train

    settings = dict(RECIPES[args.recipe or (CONFIG_FILE_RECIPE if args.config else DEFAULT_RECIPE)])
    flags = {key: value for key, value in vars(args).items() if key in _TRAIN_FLAGS and value is not None}
    if args.from_file:
        settings.update(saved_settings(args.from_file))
    source = None
    if args.config:
        from raypets.rmldnn import training_settings

        from_file, data_root, size = training_settings(args.config)
        settings.update(from_file)
        if data_root is not None and "data" not in flags:  # the file's rmldnn folders, prepared beside the run
            source = (data_root, size or (160, 160))
            settings["data"] = storage.join(flags.get("run_dir", settings["run_dir"]), "shards")
    settings.update(flags)
    if settings.get("data") is None or settings.get("run_dir") is None:
        raise UserError("raypets train needs --data SHARDS and --run-dir RUN, or --config FILE")
    cfg = TrainConfig.from_dict(settings)
    if args.print_config:
        print(json.dumps(redact(cfg.to_dict()), indent=2))
        return 0
    set_progress_bars(not args.no_progress)
    if source:
        from raypets.stages.prepare import ensure_shards

        ensure_shards(source[0], cfg.data, source[1], address=args.address)
    metrics = train(cfg, address=args.address)
    print(f"finished epoch {metrics['epoch']}: test mean Dice {metrics['mean_dice']:.4f}; "
          f"checkpoint {redact(metrics.get('model_checkpoint', 'none'))}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from raypets.stages.predict import PredictConfig, describe_predictions, predict
    from raypets.stages.runtime import set_progress_bars

    settings = {}
    if args.config:
        from raypets.rmldnn import inference_settings

        settings.update(inference_settings(args.config))
    flags = {key: value for key, value in vars(args).items() if key in _PREDICT_FLAGS and value is not None}
    settings.update(flags)
    missing = [name for name in ("checkpoint", "input", "output") if settings.get(name) is None]
    if missing:
        raise UserError(f"raypets predict needs {', '.join(m.upper() for m in missing)} (--checkpoint CKPT INPUT "
                        "OUTPUT), or a --config file naming them")
    cfg = PredictConfig(**settings)
    set_progress_bars(not args.no_progress)
    summary = predict(cfg, address=args.address)
    print(describe_predictions(summary))
    return 1 if summary["skipped"] else 0


_PREDICT_FLAGS = {"checkpoint", "input", "output", "batch_size", "workers", "device", "precision", "size", "masks",
                  "overlays", "overwrite", "hdf5_precision", "format", "writers", "probabilities", "max_pixels",
                  "max_file_mb"}


def _evaluate(args: argparse.Namespace) -> int:
    from raypets.outputs import check_output_file
    from raypets.stages.evaluate import evaluate, format_metrics, write_json
    from raypets.stages.runtime import set_progress_bars

    out = args.out or Path(f"evaluate_{args.split}.json")
    check_output_file(out, args.overwrite)  # before the work, not after it
    set_progress_bars(not args.no_progress)
    result = evaluate(args.checkpoint, args.data, args.split, batch_size=args.batch_size, workers=args.workers,
                      device=args.device or "auto", precision=args.precision, tta=args.tta, address=args.address)
    print(format_metrics(result))
    write_json(result, out, overwrite=True)
    print(f"wrote {out}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from raypets.outputs import check_output_file
    from raypets.show import show_predictions

    check_output_file(args.out, args.overwrite)
    print(f"wrote {show_predictions(args.output, args.out, images=args.images, truth=args.truth, rows=args.rows)}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from raypets.stages.tune import saved_sweep, tune
    from raypets.sweep_config import load_sweep

    if args.space is not None and args.data is not None:
        sweep = load_sweep(args.space, args.data, samples=args.samples, workers=args.workers_per_trial,
                           gpus_per_worker=args.gpus_per_worker, tracking=args.tracking)
    elif args.resume and args.space is None and args.data is None:
        sweep = saved_sweep(args.run_dir)
    else:
        raise UserError("raypets tune needs --data SHARDS and --space FILE (--resume alone continues the sweep "
                        "in --run-dir)")
    summary = tune(sweep, args.run_dir, resume=args.resume, address=args.address, max_concurrent=args.max_concurrent,
                   progress=not args.no_progress)
    print(summary["table"])
    best = summary["best"]
    if best:
        print(f"best: trial {best['trial_id']} {best['params']}, {best['metric']} {best['value']:.4f} at epoch "
              f"{best['epoch']}; checkpoint {best['checkpoint']}")
    run_dir = redact(str(args.run_dir))
    print(f"wrote {storage.join(run_dir, 'trials.csv')}" + (f", {storage.join(run_dir, 'best.json')}" if best else ""))
    problems = [f"trial {trial} failed: {message}" for trial, message in summary["errors"]]
    if summary["unfinished"]:
        problems.append(f"the sweep was interrupted with {len(summary['unfinished'])} trial(s) unfinished")
    if problems:
        print("raypets: error: " + "; ".join(problems) + f"; `raypets tune --run-dir {run_dir} --resume` "
              "continues the sweep and retries failed trials", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from raypets.demo import run_demo

    result = run_demo(args.out, data=args.data, workers=args.workers, device=args.device or "auto", quick=args.quick,
                      address=args.address, progress=not args.no_progress)
    print(f"demo finished in {result['total_s']:.0f} s: test mean Dice {result['mean_dice']:.4f}; "
          f"report {result['report_html']}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from raypets.exporter import INFO_FILE, ExportConfig, export

    info = export(ExportConfig(checkpoint=args.checkpoint, out=args.out, format=args.format, size=args.size,
                               overwrite=args.overwrite))
    files = ", ".join(str(args.out / name) for name in [*info["files"].values(), INFO_FILE])
    print(f"exported {info['checkpoint']} at {info['size'][0]}x{info['size'][1]} ({', '.join(info['classes'])}): "
          f"{files}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import importlib.util

    if not importlib.util.find_spec("fastapi"):
        raise UserError("raypets serve needs Ray Serve: pip install 'raypets[serve]'")
    from raypets.stages.serve import ServeConfig, serve_until_interrupted

    cfg = ServeConfig(checkpoint=args.checkpoint, port=args.port, host=args.host, replicas=args.replicas,
                      device=args.device or "auto", max_batch=args.max_batch, size=args.size)

    def ready(summary: dict) -> None:
        print(f"serving {summary['checkpoint']} at {summary['url']} ({summary['device']}, up to "
              f"{summary['replicas']} replica(s), batches of up to {summary['max_batch']}): POST /segment, "
              "GET /healthz, the page at GET /; Ctrl+C stops", flush=True)

    serve_until_interrupted(cfg, address=args.address, ready=ready)
    print("raypets serve: stopped", flush=True)
    return 0


_TRAIN_FLAGS = {"data", "run_dir", "workers", "device", "precision", "sync_bn", "compile", "data_cache", "epochs",
                "batch_size", "test_batch_size", "lr", "optimizer", "loss", "warmup_steps", "bn_momentum", "hflip",
                "vflip", "crop_scale", "rotate", "color_jitter", "weight_decay", "class_weights", "lr_scheduler",
                "network", "unet_skips", "checkpoint_every", "keep", "progress_every", "max_failures", "resume",
                "overwrite", "seed", "name", "tracking"}


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    from raypets.config import DATA_CACHES, RECIPES
    from raypets.losses import LOSSES
    from raypets.optim import LR_SCHEDULES, OPTIMIZERS
    from raypets.precision import PRECISIONS

    parser.add_argument("--config", type=_local, help="an rmldnn training config; flags override it")
    parser.add_argument("--from", dest="from_file", type=storage.parse, metavar="FILE",
                        help="the settings of a sweep's best.json, a run's run.json or a --print-config output (all "
                        "but the run folder); flags override them")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved settings as JSON (what --from reads) instead of training")
    parser.add_argument("--data", type=storage.parse, help="prepared shards (raypets prepare OUT), a folder or a URI")
    parser.add_argument("--run-dir", type=storage.parse,
                        help="folder for checkpoints, logs and plots, or a URI (s3://, gs://...)")
    parser.add_argument("--workers", type=int, help="Ray Train workers (default 1)")
    _add_device_args(parser)
    parser.add_argument("--precision", choices=PRECISIONS, help="auto (default): bf16 on GPUs that have it, fp16 "
                        "with loss scaling on older ones (V100, T4), fp32 on CPUs")
    parser.add_argument("--sync-bn", action="store_true", default=None,
                        help="BatchNorm statistics over the whole global batch (SyncBatchNorm; GPU workers)")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the model (a cold compile costs tens of seconds)")
    parser.add_argument("--data-cache", choices=DATA_CACHES, help="memory: read the shards once into Ray's object "
                        "store; stream: read them each epoch; auto (default): stream when they would take more than "
                        "half of the object store")
    parser.add_argument("--epochs", type=int, help="default 30")
    parser.add_argument("--batch-size", type=int, help="global batch, split over workers (default 64)")
    parser.add_argument("--test-batch-size", type=int, help="global test batch (default 128)")
    parser.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, help="default rmsprop (torch defaults)")
    parser.add_argument("--weight-decay", type=float,
                        help="the optimizer's weight decay (default: its own, AdamW 0.01)")
    parser.add_argument("--lr-schedule", dest="lr_scheduler", type=_lr_schedule, metavar="SCHEDULE",
                        help=f"after the warm-up: {', '.join(LR_SCHEDULES)}; one with settings as JSON, e.g. "
                        "'{\"type\": \"poly\", \"power\": 0.9}' (strong: cosine; robust, tutorial: constant)")
    parser.add_argument("--loss", choices=LOSSES, help="default dice (on softmax)")
    parser.add_argument("--class-weights", type=_floats, metavar="W,W,W",
                        help="per-class loss weights, in the data's class order (default: equal)")
    parser.add_argument("--recipe", choices=sorted(RECIPES),
                        help="strong (default: robust with augmentation, a cosine LR and U-Net skips), robust (LR "
                        "warm-up, BN momentum 0.1; the default with --config) or tutorial (literal rmldnn recipe)")
    parser.add_argument("--warmup-steps", type=int, help="linear LR warm-up steps (robust: 100, tutorial: 0)")
    parser.add_argument("--bn-momentum", type=float, help="torch BatchNorm momentum (robust: 0.1, tutorial: 0.01)")
    parser.add_argument("--hflip", type=float, help="random horizontal flip probability (strong: 0.5, else 0)")
    parser.add_argument("--vflip", type=float, help="random vertical flip probability (default 0)")
    parser.add_argument("--crop-scale", type=float, metavar="SHARE",
                        help="random resized crop keeping at least this share of the area (strong: 0.5, else 1: none)")
    parser.add_argument("--rotate", type=float, metavar="DEGREES",
                        help="random rotation up to this (strong: 10, else 0)")
    parser.add_argument("--color-jitter", type=float, metavar="STRENGTH",
                        help="brightness, contrast and saturation each scaled by up to 1 +- this (strong: 0.2, else 0)")
    parser.add_argument("--network", type=_local, help="Keras JSON network (default: the built-in XceptionUNet)")
    parser.add_argument("--unet-skips", action=argparse.BooleanOptionalAction, default=None,
                        help="the built-in network with U-Net's encoder-to-decoder skips (strong: on, else off)")
    parser.add_argument("--checkpoint-every", type=int, help="epochs between checkpoints (default 5)")
    parser.add_argument("--keep", type=int,
                        help="keep the N Ray checkpoints with the best test mean Dice, and the latest (default all)")
    parser.add_argument("--progress-every", type=float, metavar="SECONDS",
                        help="a progress line (images, img/s, time left) this often within an epoch (default 30; 0: "
                        "none)")
    parser.add_argument("--max-failures", type=int, help="worker failures to recover from (default 2)")
    parser.add_argument("--resume", action="store_true", default=None, help="continue the run in --run-dir")
    parser.add_argument("--overwrite", action="store_true", default=None,
                        help="replace the logs and checkpoints another run left in --run-dir (e.g. rmldnn's)")
    parser.add_argument("--seed", type=int, help="default 0")
    parser.add_argument("--name", help="prefix of the text logs (default raypets)")
    _add_tracking_arg(parser, "RUN/tensorboard/", "one MLflow run in $MLFLOW_TRACKING_URI (default RUN/mlflow.db)")
    _add_ray_args(parser)


def _add_tracking_arg(parser: argparse.ArgumentParser, tensorboard: str, mlflow: str) -> None:
    from raypets.tracking import TRACKERS

    parser.add_argument("--tracking", action="append", choices=TRACKERS,
                        help=f"log the settings and each epoch's metrics: tensorboard (event files in {tensorboard}), "
                        f"mlflow ({mlflow}; needs raypets[tracking]); repeat for both")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raypets", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"raypets {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = commands.add_parser("synth", help="write a procedural pets-like dataset in the Oxford layout")
    synth.add_argument("out", type=_local, help="folder to create")
    synth.add_argument("--n", type=int, default=200, help="number of images (default 200)")
    synth.add_argument("--size", type=_size, default=(240, 320), help="WIDTHxHEIGHT (default 320x240)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--defects", action="store_true", help="also write the real archive's kinds of bad files")
    synth.set_defaults(func=_synth)

    fetch = commands.add_parser("download", help="fetch and unpack the Oxford-IIIT Pet archives (md5-checked)")
    fetch.add_argument("dir", type=_local, help="folder to unpack into (images/, annotations/)")
    fetch.add_argument("--base-url", help="where images.tar.gz and annotations.tar.gz are served "
                       "(default: https://www.robots.ox.ac.uk/~vgg/data/pets/data/)")
    fetch.add_argument("--md5", action="append", default=[], metavar="NAME=HEX",
                       help="expected md5 of an archive, for a mirror serving other files (default: torchvision's)")
    fetch.set_defaults(func=_download)

    prep = commands.add_parser("prepare", help="decode, check and resize a dataset into Parquet shards (Ray Data)")
    prep.add_argument("src", type=_local, help="local dataset folder (oxford, rmldnn or pairs layout)")
    prep.add_argument("out", type=storage.parse, help="folder or URI (s3://...) for the shards and manifest.json")
    prep.add_argument("--layout", default="auto", choices=["auto", "oxford", "rmldnn", "pairs"])
    prep.add_argument("--size", type=_size, default=(160, 160), help="N or WIDTHxHEIGHT (default 160)")
    prep.add_argument("--split", default="hash", choices=["hash", "official"],
                      help="hash of the name (default) or the archive's trainval.txt/test.txt")
    prep.add_argument("--test-fraction", type=float, default=0.1)
    prep.add_argument("--seed", type=int, default=0, help="salt of the hash split")
    prep.add_argument("--strict", action="store_true", help="fail on the first file that would be skipped")
    prep.add_argument("--overwrite", action="store_true", help="replace the output of an earlier prepare")
    prep.add_argument("--export-rmldnn", type=_local, metavar="DIR",
                      help="also write training/ and testing/ {inputs,masks}/ for rmldnn configs")
    _add_ray_args(prep)
    prep.set_defaults(func=_prepare)

    fit = commands.add_parser("train", help="train the U-Net with Ray Train on N workers")
    _add_train_args(fit)
    fit.set_defaults(func=_train)

    infer = commands.add_parser("predict", help="batch inference into HDF5 softmax predictions (Ray Data)")
    infer.add_argument("input", type=storage.parse, nargs="?",
                       help="images: a folder (recursive), one image, a text/CSV list of paths or URIs, or an "
                       "object-store prefix (s3://bucket/photos/)")
    infer.add_argument("output", type=storage.parse, nargs="?",
                       help="folder or URI to create: output_<k>.h5, predictions.h5 (or --format's files), errors.csv")
    infer.add_argument("--checkpoint", type=storage.parse, help="model_checkpoint_<epoch>.pt, a Ray checkpoint "
                       "folder, a run folder or a sweep's best.json, local or at a URI")
    infer.add_argument("--config", type=_local, help="an rmldnn inference config; flags override it")
    infer.add_argument("--batch-size", type=int, help="images per model call (default 16)")
    infer.add_argument("--workers", type=int, help="model actors (default: one per GPU, else 2 CPU actors)")
    _add_device_args(infer)
    _add_precision_arg(infer)
    infer.add_argument("--hdf5-precision", choices=["single", "half"],
                       help="float32 (default) or float16 probabilities in the HDF5 (rmldnn's hdf5_precision)")
    infer.add_argument("--format", choices=["hdf5", "parquet", "png"],
                       help="hdf5 (default: rmldnn's softmax files), parquet (name, size, mask PNG), png (masks only)")
    infer.add_argument("--writers", type=int,
                       help="write tasks at once (default 1), each writing its own output_<k>.h5 or part-<k>.parquet")
    infer.add_argument("--probabilities", action="store_true", default=None,
                       help="--format parquet: also the softmax at network resolution (column probs)")
    infer.add_argument("--max-pixels", type=int, help="refuse images of more pixels, from their header "
                       "(default 89,478,485: PIL's decompression-bomb limit)")
    infer.add_argument("--max-file-mb", type=float, help="refuse larger files, unread (default 512)")
    infer.add_argument("--size", type=_size, help="network input, N or WIDTHxHEIGHT, multiples of 16 (default 160)")
    infer.add_argument("--masks", action="store_true", default=None,
                       help="also write class-id PNG masks at each image's original size (OUTPUT/masks/)")
    infer.add_argument("--overlays", action="store_true", default=None,
                       help="also write colour overlays at the original size (OUTPUT/overlays/)")
    infer.add_argument("--overwrite", action="store_true", default=None,
                       help="replace the output of an earlier raypets predict")
    _add_ray_args(infer)
    infer.set_defaults(func=_predict)

    sweep = commands.add_parser("tune", help="sweep hyperparameters with Ray Tune; each trial a raypets train run")
    sweep.add_argument("--data", type=storage.parse, help="prepared shards (raypets prepare OUT), a folder or a URI")
    sweep.add_argument("--space", type=_local, help="sweep file (tune_configs/*.yaml)")
    sweep.add_argument("--run-dir", type=storage.parse, required=True,
                       help="folder or URI (s3://, gs://...) for the trials, trials.csv and best.json")
    sweep.add_argument("--samples", type=int, help="trials to sample (default: the file's samples)")
    sweep.add_argument("--workers-per-trial", type=int, help="Ray Train workers per trial (default 1)")
    sweep.add_argument("--gpus-per-worker", type=float, help="0: CPU workers; 1: one GPU each; a fraction such as "
                       "0.25: one-worker trials share a GPU, four on each (default: GPUs when the cluster has them)")
    sweep.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the cluster fits)")
    sweep.add_argument("--resume", action="store_true", help="continue the sweep in --run-dir; retry failed trials")
    _add_tracking_arg(sweep, "RUN/trials/<trial>/tensorboard/",
                      "an MLflow run per trial in $MLFLOW_TRACKING_URI (default RUN/mlflow.db)")
    _add_ray_args(sweep)
    sweep.set_defaults(func=_tune)

    from raypets.inference import TTA

    score = commands.add_parser("evaluate", help="a checkpoint's per-class metrics over a prepared split (Ray Data)")
    score.add_argument("--checkpoint", required=True, type=storage.parse, help="model_checkpoint_<epoch>.pt, a Ray "
                       "checkpoint folder, a run folder or a sweep's best.json, local or at a URI")
    score.add_argument("--data", required=True, type=storage.parse,
                       help="prepared shards (raypets prepare OUT), a folder or a URI")
    score.add_argument("--split", default="test", help="split to score (default test)")
    score.add_argument("--out", type=_local, help="metrics JSON to write (default evaluate_<split>.json)")
    score.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    score.add_argument("--batch-size", type=int, default=32)
    score.add_argument("--workers", type=int, default=1, help="model actors (one GPU each with --gpu)")
    score.add_argument("--tta", choices=TTA, default="none",
                       help="test-time augmentation: flip averages each prediction with that of the mirrored image")
    _add_precision_arg(score, default="auto")
    _add_device_args(score)
    _add_ray_args(score)
    score.set_defaults(func=_evaluate)

    grid = commands.add_parser("show", help="the tutorial's figure: input | prediction | ground truth per row")
    grid.add_argument("output", type=_local, help="a folder written by raypets predict")
    grid.add_argument("--images", type=_local, help="the predicted images' folder (raypets predict INPUT)")
    grid.add_argument("--truth", type=_local, help="class-id masks named like the images (e.g. testing/masks)")
    grid.add_argument("--rows", type=int, default=6, help="samples to show (default 6)")
    grid.add_argument("--out", type=_local, required=True, help="PNG to write")
    grid.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    grid.set_defaults(func=_show)

    ship = commands.add_parser("export", help="a checkpoint as ONNX and TorchScript files (uint8 images in, softmax "
                               "out), with model.json")
    ship.add_argument("out", type=_local, help="folder to create: model.onnx, model.ts, model.json")
    ship.add_argument("--checkpoint", required=True, type=storage.parse, help="model_checkpoint_<epoch>.pt, a Ray "
                      "checkpoint folder, a run folder or a sweep's best.json, local or at a URI")
    ship.add_argument("--format", choices=["onnx", "torchscript", "all"], default="all", help="default all")
    ship.add_argument("--size", type=_size, default=(160, 160),
                      help="network input, N or WIDTHxHEIGHT, multiples of 16 (default 160); fixed in the files")
    ship.add_argument("--overwrite", action="store_true", help="replace the output of an earlier raypets export")
    ship.set_defaults(func=_export)

    host = commands.add_parser("serve", help="the model behind HTTP on Ray Serve: POST an image, get its mask; a "
                               "page to try it")
    host.add_argument("--checkpoint", required=True, type=storage.parse, help="model_checkpoint_<epoch>.pt, a Ray "
                      "checkpoint folder, a run folder or a sweep's best.json, local or at a URI")
    host.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    host.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    host.add_argument("--replicas", type=int, default=1, help="autoscale from 1 up to N model replicas (default 1)")
    _add_device_args(host)
    host.add_argument("--max-batch", type=int, default=16, help="requests batched into one forward pass (default 16)")
    host.add_argument("--size", type=_size, default=(160, 160),
                      help="network input, N or WIDTHxHEIGHT, multiples of 16 (default 160), as predict's --size")
    host.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else start local Ray)")
    host.set_defaults(func=_serve)

    demo = commands.add_parser("demo", help="the whole pipeline on Ray in one command, with a Markdown/HTML report")
    demo.add_argument("--out", type=_local, default=Path("demo"), help="fresh folder for everything (default demo)")
    demo.add_argument("--data", type=_local, help="a dataset folder, e.g. the real Oxford-IIIT Pet (default: synthetic "
                      "images); trains at the tutorial's 160 px for 30 epochs")
    demo.add_argument("--workers", type=int, help="Ray Train workers (default: one per GPU, else one)")
    _add_device_args(demo)
    demo.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test of every stage (about a minute)")
    _add_ray_args(demo)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"raypets: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

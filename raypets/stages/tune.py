"""Hyperparameter sweeps with Ray Tune: each trial fits the same ``TorchTrainer`` as ``raypets train``.

``RUN`` and ``--data`` may be local folders or object-store URIs (``s3://...``), like ``raypets train``'s.
A trial is a Tune function trainable that builds its ``TrainConfig`` from the sweep and its sampled settings and calls
:func:`raypets.stages.train.train` with ``TuneReportCallback`` (the Train V2 pattern). What a sweep leaves in ``RUN``:

- ``sweep.json``: the checked sweep (what ``--resume`` continues); ``tune/``: Tune's experiment;
- ``trials/<trial_id>/``: each trial's training run (logs, metrics.jsonl, ``ray_train/`` checkpoints, with
  ``--tracking tensorboard`` its ``tensorboard/``); ``mlflow.db``: with ``--tracking mlflow`` (and no
  ``$MLFLOW_TRACKING_URI``), the store of the trials' MLflow runs, one per trial;
- ``trials.csv`` (the ranked table), ``best.json`` (the best trial's config and checkpoint), ``<metric>_vs_lr.png``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from pathlib import Path, PurePosixPath

import ray
import ray.tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from raypets import storage, tracking
from raypets.checkpoints import RAY_RUN_NAME, ray_checkpoint, resolve_checkpoint
from raypets.errors import UserError
from raypets.metrics import nan_last
from raypets.plots import plot_metric_vs_lr
from raypets.redaction import redact
from raypets.stages.runtime import init_ray, released_when_done, run_storage, set_progress_bars, use_gpus
from raypets.stages.shards import read_manifest
from raypets.stages.train import load_datasets, train, worker_resources
from raypets.storage import Location
from raypets.sweep_config import DISTRIBUTIONS, Sweep

SWEEP_FILE = "sweep.json"
EXPERIMENT = "tune"  # Tune's RunConfig name: RUN/tune/
TRIALS = "trials"  # RUN/trials/<trial_id>/: one training run per trial


def run_trial(params: dict, *, sweep: dict, run_dir: str, datasets: dict, progress: bool = True,
              mlflow: dict | None = None) -> None:
    """The Tune trainable: one ``raypets train`` run in ``RUN/trials/<trial_id>`` on the sweep's ``datasets``
    (``load_datasets``, read once for every trial), reporting every epoch to Tune; with ``--tracking mlflow``, an
    MLflow run in the sweep's store and experiment ``mlflow`` (``tracking.mlflow_target``).

    A retried trial (errored, or running when the sweep was interrupted) continues from its last checkpoint.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    set_progress_bars(progress)
    trial_dir = storage.join(storage.parse(run_dir), TRIALS, ray.tune.get_context().get_trial_id())
    checkpoints = storage.join(trial_dir, RAY_RUN_NAME)
    cfg = Sweep(**sweep).trial_config(trial_dir, params, resume=storage.exists(checkpoints))
    before = storage.entries(checkpoints)
    final = train(cfg, callbacks=[TuneReportCallback()], datasets=datasets, mlflow=mlflow)
    if not any(name.startswith("checkpoint_") for name in storage.entries(checkpoints) - before) \
            and "checkpoint" in final:
        # Interrupted after its last epoch was saved but before Tune heard of it: nothing was left to train.
        ray.tune.report({**{k: v for k, v in final.items() if k not in ("checkpoint", "model_checkpoint")},
                         "checkpoint_path": final["checkpoint"]})


def tune(sweep: Sweep, run_dir: Location, *, resume: bool = False, address: str | None = None,
         max_concurrent: int | None = None, callbacks: list | None = None, progress: bool = True) -> dict:
    """Run (or with ``resume``, continue) ``sweep`` into ``run_dir``; write the table, best.json and the plot.

    Returns ``{"rows": ranked trials, "best": best.json's content or None, "table": the printed table,
    "errors": [(trial_id, message)], "unfinished": [trial_id]}``. ``callbacks`` are Tune callbacks; Tune saves them
    with the sweep, so a resumed sweep runs them again.
    """
    run_dir = storage.absolute(run_dir)
    if resume and max_concurrent is not None:
        raise UserError("--max-concurrent applies to a new sweep; a resumed sweep keeps the limit it started with")
    restore = check_run_dir(sweep, run_dir, resume)
    if resume and not restore:
        print(f"raypets tune: {redact(run_dir)} holds no state Tune saved (the sweep stopped before Tune's first "
              "save): starting it afresh", flush=True)
    data = storage.parse(sweep.train["data"])
    manifest = read_manifest(data)
    storage.check_bucket(run_dir)
    trial = sweep.trial_config(run_dir, {})
    mlflow = tracking.mlflow_target(run_dir) if "mlflow" in trial.tracking else None  # one store for the trials
    init_ray(address)
    datasets = load_datasets(data, manifest, trial.data_cache, trial.seed)  # the trials' own settings
    trainable = ray.tune.with_parameters(run_trial, sweep=sweep.to_dict(), run_dir=str(run_dir),
                                         datasets=datasets, progress=progress, mlflow=mlflow)
    if restore:  # Tune keeps its experiment at a URI itself
        filesystem, experiment = run_storage(storage.join(run_dir, EXPERIMENT))
        tuner = ray.tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True,
                                       storage_filesystem=filesystem)
    else:
        filesystem, storage_path = run_storage(run_dir)
        concurrent = max_concurrent or default_concurrency(sweep)
        storage.write_text(storage.join(run_dir, SWEEP_FILE), json.dumps(redact(sweep.to_dict()), indent=2) + "\n")
        print(f"raypets tune: {describe(sweep)}; up to {concurrent} trial(s) at once; results in {redact(run_dir)}",
              flush=True)
        tuner = ray.tune.Tuner(
            trainable, param_space=param_space(sweep),
            tune_config=ray.tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, num_samples=sweep.samples, scheduler=_scheduler(sweep),
                search_alg=_searcher(sweep, concurrent), trial_dirname_creator=_trial_dirname,
                max_concurrent_trials=concurrent if sweep.search == "optuna" else None),
            run_config=ray.tune.RunConfig(name=EXPERIMENT, storage_path=storage_path, storage_filesystem=filesystem,
                                          callbacks=callbacks,
                                          failure_config=ray.tune.FailureConfig(max_failures=0)),
        )
    with released_when_done():
        results = tuner.fit()
    return summarize(results, sweep, run_dir)


def check_run_dir(sweep: Sweep, run_dir: Location, resume: bool) -> bool:
    """A new sweep needs a RUN without one; ``resume`` needs the same sweep there. Whether Tune saved its state
    there: a sweep whose process died before Tune's first save left its sweep.json alone (--resume starts afresh)."""
    saved = storage.join(run_dir, SWEEP_FILE)
    if not resume:
        if storage.exists(saved) or storage.exists(storage.join(run_dir, EXPERIMENT)):
            raise UserError(f"{run_dir}: holds a sweep already; pass --resume to continue it, or choose another "
                            "--run-dir")
        return False
    if not storage.is_file(saved):
        raise UserError(f"{run_dir}: no sweep to resume (raypets tune leaves {SWEEP_FILE} and {EXPERIMENT}/ there)")
    before = storage.read_json(saved)
    now = json.loads(json.dumps(redact(sweep.to_dict())))
    changed = sorted(key for key, value in now.items() if before.get(key) != value)
    if changed:
        raise UserError(f"{run_dir}: --resume continues the sweep saved in {saved}; this one differs in "
                        f"{', '.join(changed)} (start it in another --run-dir)")
    filesystem, experiment = storage.filesystem(storage.join(run_dir, EXPERIMENT))
    return ray.tune.Tuner.can_restore(experiment, storage_filesystem=filesystem)


def saved_sweep(run_dir: Location) -> Sweep:
    """The sweep ``raypets tune`` started in ``run_dir`` (its data read with ``run_dir``'s keys, when it has some
    and the data is in the same bucket: sweep.json holds no keys)."""
    saved = storage.join(run_dir, SWEEP_FILE)
    if not storage.is_file(saved):
        raise UserError(f"{run_dir}: no sweep to resume (raypets tune leaves {SWEEP_FILE} there)")
    sweep = storage.read_json(saved)
    train = {**sweep["train"], "data": storage.reuse_credentials(sweep["train"]["data"], run_dir)}
    return Sweep(**{**sweep, "train": train})


def param_space(sweep: Sweep) -> dict:
    """Tune's search space: each setting's distribution (:data:`raypets.sweep_config.DISTRIBUTIONS`) made by Tune."""
    space = {}
    for key, spec in sweep.space.items():
        (kind, values), = spec.items()
        make = getattr(ray.tune, DISTRIBUTIONS[kind].tune)
        space[key] = make(*values) if DISTRIBUTIONS[kind].bounds else make(values)
    return space


def default_concurrency(sweep: Sweep) -> int:
    """Trials that fit at once: each holds one CPU for its driver plus its workers' resources (as ``raypets train``
    sizes them), and one CPU stays free for Ray Data's tasks. At least one."""
    cfg = sweep.trial_config(Path("RUN"), {})
    use_gpu = use_gpus(cfg.device, cfg.workers)
    worker = worker_resources(cfg, use_gpu)
    total = ray.cluster_resources()
    fits = [(total.get("CPU", 1) - 1) // (1 + cfg.workers * worker["CPU"])]
    if use_gpu:
        fits.append(total.get("GPU", 0) // (cfg.workers * worker["GPU"]))
    return max(1, int(min(fits)))


def describe(sweep: Sweep) -> str:
    space = ", ".join(f"{key} {kind} {values}" for key, spec in sweep.space.items() for kind, values in spec.items())
    scheduler = " ".join(f"{k} {v}" for k, v in sweep.scheduler.items() if k != "type")
    return (f"{sweep.mode} {sweep.metric} over {space or 'no space'}; {sweep.samples} sample(s), {sweep.search} "
            f"search, {sweep.scheduler['type']} {scheduler}".rstrip() + f", {sweep.epochs} epochs per trial")


def _scheduler(sweep: Sweep):
    if sweep.scheduler["type"] == "fifo":
        return FIFOScheduler()
    # "epoch", not Tune's training_iteration: that restarts from 1 when a trial is resumed.
    return ASHAScheduler(time_attr="epoch", max_t=sweep.epochs, grace_period=sweep.scheduler["grace_period"],
                         reduction_factor=sweep.scheduler["reduction_factor"], stop_last_trials=False)


def _searcher(sweep: Sweep, concurrent: int):
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=sweep.seed)
    return BasicVariantGenerator(max_concurrent=concurrent, random_state=sweep.seed)


def _trial_dirname(trial) -> str:
    return trial.trial_id


# --- results ---------------------------------------------------------------------------------------------------

def summarize(results: ray.tune.ResultGrid, sweep: Sweep, run_dir: Location) -> dict:
    """Rank the trials (best first, trials without a value last); write ``trials.csv``, ``best.json``, the plot."""
    # Each trial's status as Tune saved it (a restored trial's last result no longer says whether it finished).
    analysis = ray.tune.ExperimentAnalysis(results.experiment_path, storage_filesystem=results.filesystem)
    status = {t.trial_id: t.status for t in analysis.trials}
    rows = sorted((_row(result, sweep, status, run_dir) for result in results),
                  key=lambda r: nan_last(r[sweep.metric], descending=sweep.mode == "max"))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    columns = ["rank", "trial_id", *sweep.space, sweep.metric, "best_epoch", "epochs_run", "stopped_early", "status",
               "checkpoint"]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    shown = redact(rows)  # rows keep the keys the checkpoints are read with; what is written and returned does not
    writer.writerows(shown)
    storage.write_text(storage.join(run_dir, "trials.csv"), table.getvalue())
    scored = [r for r in rows if not math.isnan(r[sweep.metric])]
    if scored:
        with tempfile.TemporaryDirectory() as folder:  # drawn locally, then put in RUN (or at its URI)
            plot = plot_metric_vs_lr([(r["lr"], r[sweep.metric], r["stopped_early"]) for r in scored], sweep.metric,
                                     Path(folder, f"{sweep.metric}_vs_lr.png"))
            storage.upload(plot, storage.join(run_dir, plot.name))
    return {"rows": shown, "best": _write_best(scored[0], sweep, run_dir) if scored else None,
            "table": format_trials(shown, columns[:-1]),
            "errors": [(r["trial_id"], r["error"]) for r in shown if r["status"] == "error"],
            "unfinished": [r["trial_id"] for r in shown if r["status"] == "unfinished"]}


def _row(result: ray.tune.Result, sweep: Sweep, status: dict[str, str], run_dir: Location) -> dict:
    """One trial: its sampled settings, its best reported metric (and that epoch's checkpoint), how far it ran."""
    params = {key: result.config[key] for key in sweep.space}
    history = result.metrics_dataframe
    reported = [] if history is None or sweep.metric not in history else history.to_dict("records")
    scored = [r for r in reported if not _missing(r.get(sweep.metric))]
    pick = max if sweep.mode == "max" else min
    best = pick(scored, key=lambda r: r[sweep.metric]) if scored else {}
    saved = [r for r in scored if isinstance(r.get("checkpoint_path"), str)]
    best_saved = pick(saved, key=lambda r: r[sweep.metric]) if saved else {}
    epochs_run = int(max((r["epoch"] for r in reported), default=0))
    trial_id = PurePosixPath(result.path).name
    state = {"TERMINATED": "done", "ERROR": "error"}.get(status.get(trial_id), "unfinished")
    return {"trial_id": trial_id, **params, "params": params,
            "lr": sweep.trial_config(Path("RUN"), params).lr,
            sweep.metric: best.get(sweep.metric, math.nan), "best_epoch": best.get("epoch"),
            "epochs_run": epochs_run, "stopped_early": state == "done" and epochs_run < sweep.epochs,
            "status": state, "checkpoint": _checkpoint(run_dir, trial_id, best_saved.get("checkpoint_path")),
            "error": str(result.error).strip().splitlines()[-1] if result.error else None}


def _checkpoint(run_dir: Location, trial_id: str, reported: str | None) -> str | None:
    """The checkpoint folder a trial reported, in RUN (a URI for a sweep at a URI; Ray reports bucket paths)."""
    return str(ray_checkpoint(storage.join(run_dir, TRIALS, trial_id), reported)) if reported else None


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _write_best(row: dict, sweep: Sweep, run_dir: Location) -> dict:
    """best.json (what it returns): the best trial, its full TrainConfig, its checkpoint with the best metric."""
    trial_dir = storage.join(run_dir, TRIALS, row["trial_id"])
    checkpoint = resolve_checkpoint(row["checkpoint"]) if row["checkpoint"] else None
    best = {"metric": sweep.metric, "mode": sweep.mode, "value": row[sweep.metric], "trial_id": row["trial_id"],
            "epoch": row["best_epoch"], "params": row["params"],
            "config": sweep.trial_config(trial_dir, row["params"]).to_dict(), "checkpoint": row["checkpoint"],
            "checkpoint_epoch": checkpoint.epoch if checkpoint else None,
            "model_checkpoint": (checkpoint.uri or str(checkpoint.weights)) if checkpoint else None,
            "run_dir": str(trial_dir)}
    best = redact(best)
    storage.write_text(storage.join(run_dir, "best.json"), json.dumps(best, indent=2) + "\n")
    return best


def format_trials(rows: list[dict], columns: list[str]) -> str:
    """A fixed-width text table of ``rows``: floats with 4 significant digits."""
    def cell(value) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.4g}"
        return "-" if value is None else str(value)

    cells = [columns] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in cells)

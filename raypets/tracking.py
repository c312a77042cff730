"""Experiment tracking of a training run (``--tracking tensorboard|mlflow``): its settings and each epoch's metrics.

No Ray here. The driver (:mod:`raypets.stages.train`) calls :func:`mlflow_target` before Ray starts and
:func:`start` before the workers do; rank 0 alone (:mod:`raypets.stages.train_loop`) opens the trackers with
:func:`open_trackers` and sends them each epoch, so a run of N workers is one tracked run.

- ``tensorboard``: tensorboardX event files in ``RUN/tensorboard/`` (for a run at a URI, written locally and
  uploaded after each epoch); a resumed run adds a file there that drops the steps after its checkpoint.
- ``mlflow``: one MLflow run per training in ``$MLFLOW_TRACKING_URI`` (default: the SQLite file ``RUN/mlflow.db``),
  experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``raypets``). Its id is kept in ``RUN/mlflow_run.json``: a
  resumed run (and a restarted worker group) logs to the same MLflow run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from raypets import storage
from raypets.errors import UserError
from raypets.redaction import redact
from raypets.storage import Location

TENSORBOARD_DIR = "tensorboard"  # RUN/tensorboard/: the event files
MLFLOW_DB = "mlflow.db"  # RUN/mlflow.db: MLflow's store when $MLFLOW_TRACKING_URI is not set
MLFLOW_RUN_FILE = "mlflow_run.json"  # RUN/mlflow_run.json: the MLflow run's id, which --resume continues
DEFAULT_EXPERIMENT = "raypets"
EXTRA = "raypets[tracking]"


class Tracker:
    """One backend: rank 0 opens it with the run's folder, settings and last checkpointed epoch (0: a new run),
    sends it each epoch's numbers, and closes it."""

    def epoch(self, epoch: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self, failed: bool) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    """Scalars per epoch and the settings as text, in an event file of ``RUN/tensorboard/`` of its own, written as
    they come (tensorboardX's record writer: its ``SummaryWriter`` writes from a thread, so a file it has flushed
    may still lack the last epoch). tensorboardX comes with Ray Tune."""

    def __init__(self, run_dir: Location, started: dict, last_epoch: int) -> None:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import SessionLog
        from tensorboardX.summary import text

        self.remote = storage.join(run_dir, TENSORBOARD_DIR)
        self._temp = Path(tempfile.mkdtemp(prefix="raypets-tb-")) if storage.is_uri(run_dir) else None
        folder = self._temp or Path(self.remote)
        folder.mkdir(parents=True, exist_ok=True)
        # Named time.host.pid.from<epoch>: a file of its own, even for a run resumed within the same second.
        self.writer = EventsWriter(str(folder / "events"), f".{os.getpid()}.from{last_epoch + 1}")
        if last_epoch:  # TensorBoard drops what an interrupted run logged after its checkpoint (trained again now)
            self._write(last_epoch + 1, session_log=SessionLog(status=SessionLog.START))
        else:
            self._write(0, summary=text("settings", f"```\n{json.dumps(started['settings'], indent=2)}\n```"))

    def epoch(self, epoch: int, values: dict[str, float]) -> None:
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.summary import scalar

        self._write(epoch, summary=Summary(value=[scalar(key, value).value[0] for key, value in values.items()]))

    def _write(self, step: int, **event) -> None:
        from tensorboardX.proto.event_pb2 import Event

        self.writer.write_event(Event(wall_time=time.time(), step=step, **event))
        self.writer.flush()
        if self._temp:  # a run at a URI: its event file (the temp folder's one file) uploaded as it grows
            for path in self._temp.iterdir():
                storage.upload(path, storage.join(self.remote, path.name))

    def close(self, failed: bool) -> None:
        self.writer.close()
        if self._temp:
            shutil.rmtree(self._temp, ignore_errors=True)


class MlflowTracker(Tracker):
    """Metrics per epoch (step = epoch) into the MLflow run the driver started (:func:`start`)."""

    def __init__(self, run_dir: Location, started: dict, last_epoch: int) -> None:
        self.client = _mlflow_client(started["mlflow"]["uri"])
        self.run_id = started["mlflow"]["run_id"]
        self.client.update_run(self.run_id, status="RUNNING")

    def epoch(self, epoch: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, epoch) for key, value in values.items()])

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


# One registry: --tracking's names -> the backend rank 0 opens.
TRACKERS: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker}


def check_names(names: list[str]) -> None:
    """One clear error for a name that is not in :data:`TRACKERS`."""
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"unknown tracker {name!r}; choose {', '.join(TRACKERS)}")


def mlflow_target(run_dir: Location, environ: Mapping[str, str] = os.environ) -> dict:
    """Where a run's (or a sweep's trials') MLflow runs go, resolved on the driver, before Ray starts: the store
    ``{"uri": ...}`` ($MLFLOW_TRACKING_URI, default ``sqlite:///RUN/mlflow.db``) and its ``experiment_id`` (of
    $MLFLOW_EXPERIMENT_NAME, default ``raypets``), created now so that concurrent trials only add runs to it."""
    uri = environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        if storage.is_uri(run_dir):
            raise UserError(f"{redact(str(run_dir))}: --tracking mlflow for a run at a URI needs MLFLOW_TRACKING_URI "
                            f"(an MLflow tracking server): its default store is the SQLite file RUN/{MLFLOW_DB}")
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{Path(run_dir).resolve() / MLFLOW_DB}"
    client = _mlflow_client(uri)
    name = environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    from mlflow.exceptions import MlflowException

    try:
        experiment = client.get_experiment_by_name(name)
        return {"uri": uri,
                "experiment_id": experiment.experiment_id if experiment else client.create_experiment(name)}
    except MlflowException as err:
        raise _store_error(uri, err) from None


def start(names: list[str], run_dir: Location, settings: dict, *, resume: bool, mlflow: dict | None) -> dict:
    """On the driver, before the workers start: what rank 0's :func:`open_trackers` takes (plain JSON). For MLflow,
    the run ``--resume`` continues (``RUN/mlflow_run.json``), or a new one named after RUN's folder, with the
    settings (keys hidden) as its params. ``mlflow``: :func:`mlflow_target`'s answer."""
    settings = redact(settings)
    started = {"settings": settings}
    if "mlflow" in names:
        saved = storage.join(run_dir, MLFLOW_RUN_FILE)
        run_id = storage.read_json(saved)["run_id"] if resume and storage.is_file(saved) else None
        if run_id is None:
            run_id = _new_mlflow_run(mlflow, run_dir, settings)
            storage.write_text(saved, json.dumps({"run_id": run_id}) + "\n")
        started["mlflow"] = {"uri": mlflow["uri"], "run_id": run_id}
    return started


def _new_mlflow_run(target: dict, run_dir: Location, settings: dict) -> str:
    from mlflow.entities import Param

    client = _mlflow_client(target["uri"])
    run = client.create_run(target["experiment_id"], run_name=PurePosixPath(str(run_dir)).name,
                            tags={"raypets.run_dir": redact(str(run_dir))})
    params = [Param(key, json.dumps(value) if not isinstance(value, str) else value)
              for key, value in flatten(settings).items()]
    client.log_batch(run.info.run_id, params=params)
    return run.info.run_id


def flatten(settings: dict, prefix: str = "") -> dict:
    """Nested settings as one level of ``a.b`` keys (MLflow's params are flat)."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Trackers:
    """The trackers rank 0 writes to; closing them (as a context manager) marks a run that raised as failed."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def epoch(self, metrics: dict) -> None:
        """Each tracker gets the epoch's numbers (strings such as ``collapsed`` are left out)."""
        values = numbers(metrics)
        for tracker in self.trackers:
            tracker.epoch(metrics["epoch"], values)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind, *exc) -> None:
        for tracker in self.trackers:
            tracker.close(failed=kind is not None)


def open_trackers(names: list[str], run_dir: Location, started: dict, last_epoch: int) -> Trackers:
    """Rank 0's trackers of ``names``, with :func:`start`'s answer ``started``; ``last_epoch``: the checkpoint's."""
    return Trackers([TRACKERS[name](run_dir, started, last_epoch) for name in names])


def numbers(metrics: dict) -> dict[str, float]:
    """The numeric metrics of an epoch, but the epoch itself (the step)."""
    return {key: float(value) for key, value in metrics.items()
            if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool)}


def _mlflow_client(uri: str):
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UserError(f"--tracking mlflow needs MLflow, which is not installed: pip install '{EXTRA}'") from None
    try:
        return MlflowClient(tracking_uri=uri)
    except MlflowException as err:  # a URI MLflow does not take
        raise _store_error(uri, err) from None


def _store_error(uri: str, err) -> UserError:
    """An MlflowException about the store at ``uri`` as one error, keys hidden."""
    return UserError(redact(f"MLflow store {uri}: {err.message}"))

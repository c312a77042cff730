"""What every stage shares of Ray: connecting to a cluster or starting local Ray (the one place that calls
``ray.init``), Ray Data's context, resource shares, the storage filesystem Ray Train and Tune keep runs at (keys
kept out of what they save), and giving a run's reserved CPUs back."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow.fs as pafs
import ray
from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized, _internal_kv_put
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from raypets import storage
from raypets.errors import UserError
from raypets.redaction import redact
from raypets.storage import Location

logger = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 5
REPORT_POLL_ENV, REPORT_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1"  # see fast_reports
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # see fast_reports
# Ray Data logs an execution plan and a "finished" line for every pass over a dataset, from every Train worker and
# split coordinator, which drowns the epoch lines: the worker processes of a local start log it at WARNING only
# (the driver keeps its progress).
# Ray's own deprecation warnings in its actors are not the user's to act on.
LOCAL_RUNTIME_ENV = {"env_vars": {"RAY_DATA_LOG_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore::DeprecationWarning"}}


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``), else start local Ray; no-op when already connected.

    ``num_cpus`` only applies to a local start: it declares logical CPUs, which may exceed the cores present
    (Ray Data and Ray Train workers each hold a CPU slot; see the resource pitfall in the README).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, TimeoutError, RuntimeError) as err:
            raise UserError(f"cannot connect to a Ray cluster at {address}: {err}") from None
        return
    ray.init(num_cpus=num_cpus, runtime_env=LOCAL_RUNTIME_ENV)


def _check_reachable(address: str) -> None:
    """Fail fast when nothing listens at ``host:port`` (``ray.init`` would wait minutes for a missing GCS)."""
    if address == "auto":
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as err:
        raise UserError(f"no Ray cluster answers at {address} ({err}); start one with `ray start --head` or `ray up "
                        "cluster.yaml`, or leave out --address (and RAY_ADDRESS) to run on local Ray") from None


def set_progress_bars(enabled: bool) -> None:
    """Show or hide Ray Data's progress bars for the stages this process runs."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = enabled


@contextmanager
def data_context(**settings) -> Iterator[None]:
    """Datasets made inside keep these ``DataContext`` settings wherever they run (a Dataset keeps the context it
    was made with); the current context gets its own values back afterwards."""
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = {name: getattr(context, name) for name in settings}
    for name, value in settings.items():
        setattr(context, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(context, name, value)


def cpu_share(workers: int) -> float:
    """CPU slots for each of ``workers`` long-lived workers (Train workers, model actors): one each when the
    cluster has room, else a share that leaves one CPU free for Ray Data's read and decode tasks.

    Without that free slot the data tasks wait forever behind the workers (``--workers 2`` on a 2-core laptop).
    """
    cpus = ray.cluster_resources().get("CPU", 1)
    return min(1.0, max(0.1, (cpus - 1) / workers))


def use_gpus(device: str, workers: int, what: str = "worker", per_worker: float = 1.0) -> bool:
    """Whether ``workers`` workers run on ``per_worker`` GPUs each: ``device`` "gpu" demands it (one clear error when
    the cluster has too few), "cpu" refuses it, "auto" takes it when the cluster has enough."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if device == "gpu" and gpus < workers * per_worker:
        raise UserError(f"--gpu asks for {workers} GPU {what}(s), the cluster has {gpus:g} GPU(s)")
    return device == "gpu" or (device == "auto" and gpus >= workers * per_worker)


def fast_reports() -> None:
    """Let Ray Train's controller collect a worker's ``ray.train.report`` every 0.1 s instead of every 2 s.

    The worker waits for that poll at each report, so the default added up to 2 s to every epoch (docs/
    benchmarks.md). The controller takes the variable from the environment of the process that calls ``fit()``
    (this one), on local Ray and on a cluster alike; a value the user set is kept.

    Also leaves out Ray Train's preemption watcher unless the user asks for it: raypets' loop does not read the
    preemption notices it forwards, and its actor makes every run print an ERROR line about its constructor
    arguments (a preempted node then counts as one of ``--max-failures``)."""
    os.environ.setdefault(REPORT_POLL_ENV, REPORT_POLL_S)
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")


def object_store_bytes() -> float:
    """The cluster's object store capacity."""
    return ray.cluster_resources().get("object_store_memory", 0.0)


def run_storage(location: Location) -> tuple[pafs.FileSystem | None, str]:
    """:func:`raypets.storage.filesystem` for Ray Train's and Tune's ``storage_filesystem``, which Tune saves with
    its experiment (``tuner.pkl``, each trial's state): keys in the URI stay out of what is saved."""
    fs, path = storage.filesystem(location)
    if isinstance(fs, pafs.S3FileSystem) and redact(location) != location:
        fs = KeysInCluster(location)
    return fs, path


KEYS_NAMESPACE = "raypets-keys"  # of the cluster's key-value store


class KeysInCluster(pafs.S3FileSystem):
    """The S3 filesystem of a URI with keys, pickled without them: the keys wait in the Ray cluster's key-value
    store under a random token, where the cluster's processes read them back. Unpickled where the token is
    unknown (a sweep restored in another cluster), it reads with the environment's credentials."""

    def __init__(self, uri: str, token: str | None = None) -> None:
        fs, _ = storage.filesystem(uri)
        super().__init__(**fs.__reduce__()[1][0])
        self.uri, self.token = uri, token or secrets.token_hex(16)

    def __reduce__(self):
        if _internal_kv_initialized():
            _internal_kv_put(self.token, self.uri, overwrite=False, namespace=KEYS_NAMESPACE)
        return _keys_from_cluster, (redact(self.uri), self.token)


def _keys_from_cluster(uri: str, token: str) -> pafs.FileSystem:
    keyed = _internal_kv_get(token, namespace=KEYS_NAMESPACE) if _internal_kv_initialized() else None
    return KeysInCluster(keyed.decode(), token) if keyed else storage.filesystem(uri)[0]


@contextmanager
def released_when_done(grace_s: float = 10.0) -> Iterator[None]:
    """Around a training run or a sweep started by this driver: the placement groups it reserved are free once it
    has ended, so this process's next run finds its CPUs. Ray removes them itself, but a run whose controller was
    killed (a Tune trial stopped or interrupted, Ctrl+C) waits for Ray Train's cleaner, which can miss it
    (ray-project/ray#54305): what is still reserved after ``grace_s`` is removed here. A no-op inside a Ray
    worker (a trial's run: the sweep's driver does it)."""
    context = ray.get_runtime_context()
    if context.get_actor_id() is not None:
        yield
        return
    before = _reserved(context.get_job_id())
    try:
        yield
    finally:
        deadline = time.monotonic() + grace_s
        while (left := _reserved(context.get_job_id()) - before) and time.monotonic() < deadline:
            time.sleep(0.5)
        for group in left:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group)))
        if left:
            logger.warning("removed %d placement group(s) the run left reserved", len(left))


def _reserved(job_id: str) -> set[str]:
    """The placement groups of the job ``job_id`` (a group's id ends with its job's) that are not removed."""
    return {group for group, info in placement_group_table().items()
            if group.endswith(job_id) and info["state"] != "REMOVED"}

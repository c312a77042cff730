"""What :mod:`raypets.stages.runtime` gives every stage: runs that give their CPUs back, keys that Ray never saves."""

from __future__ import annotations

import pickle

import pyarrow.fs as pafs
import ray
from ray.experimental.internal_kv import _internal_kv_del
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from raypets.stages.runtime import KEYS_NAMESPACE, KeysInCluster, released_when_done, run_storage

URI = "s3://AKIDRUNTIME:runtime-s3cret@pets/sweep?endpoint_override=127.0.0.1:9000&scheme=http"


def test_what_a_run_left_reserved_is_removed_and_nothing_else(ray_local):
    kept = placement_group([{"CPU": 1}])  # reserved before the run: not the run's to remove
    ray.get(kept.ready())
    with released_when_done(grace_s=0.5):
        left = placement_group([{"CPU": 1}])  # as a run whose controller was killed leaves its workers' group
        ray.get(left.ready())
    states = {group: info["state"] for group, info in placement_group_table().items()}
    assert states[left.id.hex()] == "REMOVED" and states[kept.id.hex()] == "CREATED"
    remove_placement_group(kept)


def access_key(fs: pafs.S3FileSystem) -> str | None:
    """The key pyarrow signs requests with (None: the environment's)."""
    return pafs.S3FileSystem.__reduce__(fs)[1][0]["access_key"]


def test_the_run_storage_pickles_without_keys_and_the_clusters_processes_read_them(ray_local):
    fs, path = run_storage(URI)
    assert isinstance(fs, KeysInCluster) and path == "pets/sweep"
    saved = pickle.dumps(fs)  # what Tune writes into tuner.pkl and each trial's state
    assert b"runtime-s3cret" not in saved and b"AKIDRUNTIME" not in saved
    assert ray.get(ray.remote(num_cpus=0)(access_key).remote(fs)) == "AKIDRUNTIME"  # a worker of this cluster
    assert access_key(pickle.loads(saved)) == "AKIDRUNTIME"
    _internal_kv_del(fs.token, namespace=KEYS_NAMESPACE)  # as in another cluster, restoring a saved sweep
    assert access_key(pickle.loads(saved)) is None  # reads with the environment's credentials
    assert run_storage(URI.replace("AKIDRUNTIME:runtime-s3cret@", ""))[0].__class__ is not KeysInCluster

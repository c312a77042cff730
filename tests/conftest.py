"""Shared fixtures: one local Ray per test session, and small datasets written to disk."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def ray_local():
    """Real local Ray with 4 logical CPUs (Ray Data and Train each need slots; 2 would hang), quiet output.

    With its dashboard, as ``ray.init()`` starts it for a user: Ray Train's PlacementGroupCleaner asks it whether a
    run's controller died, and without it the workers' CPUs of a killed run stay reserved (ray-project/ray#54305).
    Its port is a free one, never another Ray's 8265."""
    import ray
    from ray.data import DataContext

    os.environ.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rp-", dir="/tmp")  # short: Ray's socket paths have a length limit
    tests = str(Path(__file__).resolve().parent)  # Ray's processes unpickle callbacks defined in test modules
    ray.init(num_cpus=4, include_dashboard=True, dashboard_port=free_ports(1)[0], _temp_dir=temp_dir,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": tests}})
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on loopback that nothing listens on now."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def wait_for_every_cpu(timeout_s: float = 60) -> None:
    """Wait until the local cluster has every CPU free again (Ray gives a finished, stopped or killed run's CPUs
    back a moment later); fail, naming what is still held, after ``timeout_s``."""
    import ray

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, f"CPUs still held after {timeout_s} s: {ray.available_resources()}"
        time.sleep(0.5)


def prepared_shards(root: Path, n: int, size: tuple[int, int], seed: int) -> Path:
    """``n`` synthetic images of ``size`` (width, height) prepared at 32 px with a quarter held out: ``root/shards``."""
    from raypets.config import PrepareConfig
    from raypets.data.prepare import prepare
    from raypets.data.synth import synthesize

    synthesize(root / "raw", n=n, size=size, seed=seed)
    prepare(PrepareConfig(root / "raw", root / "shards", size=(32, 32), test_fraction=0.25))
    return root / "shards"


def save_image(path: Path, pixels: np.ndarray, fmt: str | None = None, mode: str | None = None) -> Path:
    """Write ``pixels`` to ``path`` in ``fmt`` (default from the suffix), optionally converted to ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(pixels)
    if mode:
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def random_pair(rng: np.random.Generator, width: int = 48, height: int = 40, values=(1, 2, 3)):
    """A noisy RGB image and a blocky mask holding every value of ``values``."""
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.full((height, width), values[1], np.uint8)
    mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = values[0]
    mask[height // 4, width // 4: 3 * width // 4] = values[2]
    return image, mask


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory, ray_local) -> dict:
    """``raypets demo --quick`` run once, shared by the tests of its report and of the stages after training:
    ``argv`` (its command line), ``out`` (its folder: ``shards``, ``train``, ...), ``printed`` (its stdout)."""
    from raypets.cli import main

    out = tmp_path_factory.mktemp("quick") / "demo"
    argv = ["demo", "--out", str(out), "--quick", "--no-progress"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    return {"argv": argv, "out": out, "printed": printed.getvalue()}

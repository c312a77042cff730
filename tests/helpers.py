"""Helpers the tests share: small files, synthetic shards, checkpoints, ports, and waiting for Ray's CPUs."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from raypets.checkpoints import save_state, weights_name
from raypets.model import XceptionUNet


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
    from raypets.data.synth import synthesize
    from raypets.stages.prepare import PrepareConfig, prepare

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


def state_dict_file(path: Path, seed: int, num_classes: int = 3) -> dict:
    """A seeded XceptionUNet's state_dict saved at ``path`` (what ``RUN/checkpoints/`` holds); returns it."""
    torch.manual_seed(seed)
    state = XceptionUNet(num_classes=num_classes).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def ray_checkpoint_folder(folder: Path, epoch: int, seed: int, config: dict | None = None) -> dict:
    """A Ray checkpoint folder as training writes it (``raypets.checkpoints.save_state``); returns its weights."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    weights = XceptionUNet().state_dict()
    save_state(folder, weights=weights, optimizer={}, epoch=epoch, step=10 * epoch, config=config or {})
    assert (folder / weights_name(epoch)).is_file()
    return weights

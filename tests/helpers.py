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
    from ray.util import placement_group_table

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        groups = {group: info["bundles"] for group, info in placement_group_table().items()
                  if info["state"] != "REMOVED"}
        assert time.monotonic() < deadline, f"CPUs still held after {timeout_s} s; placement groups: {groups}"
        time.sleep(0.5)


def prepared_shards(root: Path, n: int, size: tuple[int, int], seed: int) -> Path:
    """``n`` synthetic images of ``size`` (width, height) prepared at 32 px with a quarter held out: ``root/shards``."""
    from raypets.data.synth import synthesize
    from raypets.stages.prepare import PrepareConfig, prepare

    synthesize(root / "raw", n=n, size=size, seed=seed)
    prepare(PrepareConfig(root / "raw", root / "shards", size=(32, 32), test_fraction=0.25))
    return root / "shards"


def tensorboard_events(folder: Path) -> dict[str, list[tuple[int, float | str]]]:
    """What the TensorBoard event files in ``folder`` hold, read back record by record (TFRecord framing: length,
    its CRC, the Event protobuf, its CRC): tag -> [(step, scalar or text)], over all the files."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    events: dict[str, list[tuple[int, float | str]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = Event.FromString(data[offset + 12: offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                held = value.tensor.string_val[0].decode() if value.HasField("tensor") else value.simple_value
                events.setdefault(value.tag, []).append((event.step, held))
    return events


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


def ray_checkpoint_folder(folder: Path, epoch: int, seed: int, config: dict | None = None,
                          skips: bool = False) -> dict:
    """A Ray checkpoint folder as training writes it (``raypets.checkpoints.save_state``), of the network with U-Net
    ``skips`` if asked; returns its weights."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    weights = XceptionUNet(skips=skips).state_dict()
    save_state(folder, weights=weights, optimizer={}, epoch=epoch, step=10 * epoch, config=config or {})
    assert (folder / weights_name(epoch)).is_file()
    return weights


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A valid ``side`` x ``side`` 1-bit PNG of zeros: about 50 KB on disk for 400 M pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    body = b"".join(packer.compress(row * 1000) for _ in range(side // 1000)) + packer.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


# The hostile corpus: file name -> the reason predict and prepare skip it for (None: used, maybe repaired).
HOSTILE = {
    b"bomb.png": "too many pixels",
    b"huge.jpg": "file too large",
    b"gone.jpg": "dangling symlink",
    b"pipe.jpg": "not a regular file",
    b"empty.jpg": "empty file",
    b"depth16.png": None,
    b"rotated.jpg": None,
    b"caf\xe9.jpg": None,  # names that are not UTF-8
    b"\xff-empty.jpg": "empty file",
}
ROTATED_STORED = (24, 40)  # rotated.jpg's pixels as stored (height, width); EXIF orientation 6 shows them 40 x 24


def hostile_corpus(folder: Path) -> dict[bytes, str | None]:
    """Write :data:`HOSTILE` into ``folder``: a decompression bomb, a 3 GB sparse non-image, a dangling symlink, a
    FIFO, a 0-byte file, a 16-bit PNG (values 1000..60000), a JPEG stored sideways with EXIF orientation 6, and a
    JPEG and a 0-byte file whose names are not UTF-8."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(16)
    bomb_png(folder / "bomb.png")
    with open(folder / "huge.jpg", "wb") as huge:
        huge.truncate(3 * 2**30)
    (folder / "gone.jpg").symlink_to(folder / "nowhere.jpg")
    os.mkfifo(folder / "pipe.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    depth = np.linspace(1000, 60000, 30 * 40).reshape(30, 40).astype(np.uint16)
    Image.fromarray(depth).save(folder / "depth16.png")
    sideways = Image.fromarray(rng.integers(0, 256, (*ROTATED_STORED, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways.save(folder / "rotated.jpg", exif=exif)
    save_image(folder / os.fsdecode(b"caf\xe9.jpg"), rng.integers(0, 256, (36, 28, 3), dtype=np.uint8))
    (folder / os.fsdecode(b"\xff-empty.jpg")).write_bytes(b"")
    return dict(HOSTILE)

"""Read rmldnn's JSON configs (``{"neural_network": {...}}``) into raypets settings.

Every key rmldnn's pets tutorial uses is understood; any other key is one clear error naming it, never ignored.
Relative paths are resolved against the config file's folder, as rmldnn resolves them against its working folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from raypets import storage
from raypets.errors import UserError
from raypets.keras_json import REFERENCE_NETWORK
from raypets.losses import LOSS_ALIASES, LOSSES, loss_name
from raypets.optim import OPTIMIZERS


def load(path: Path) -> dict:
    """The ``neural_network`` section of an rmldnn config file."""
    config = storage.read_json(path, "config file")
    _only(config, {"neural_network"}, path, "")
    return config["neural_network"]


def training_settings(path: Path) -> tuple[dict, Path | None, tuple[int, int] | None]:
    """TrainConfig keyword arguments from an rmldnn training config, the rmldnn-layout data folder its paths name
    (to be prepared into shards), and the resize of its transforms (height, width)."""
    net = load(path)
    base = path.resolve().parent
    _only(net, {"outfile", "num_epochs", "layers", "checkpoints", "data", "optimizer", "loss"}, path, "neural_network")
    settings: dict = {"run_dir": base}
    if "outfile" in net:
        settings["name"] = Path(net["outfile"]).stem
    if "num_epochs" in net:
        settings["epochs"] = int(net["num_epochs"])
    if "layers" in net:
        settings["network"] = network_path(base / net["layers"])
    checkpoints = net.get("checkpoints", {})
    _only(checkpoints, {"save", "interval", "load"}, path, "neural_network.checkpoints")
    if "save" in checkpoints:
        settings["checkpoint_dir"] = str(checkpoints["save"]).rstrip("/") or "."
    if "interval" in checkpoints:
        settings["checkpoint_every"] = int(checkpoints["interval"])
    if "load" in checkpoints:
        settings["init_weights"] = base / checkpoints["load"]
    settings.update(_optimizer(net.get("optimizer", {}), path))
    settings.update(_loss(net.get("loss", {}), path))
    data = net.get("data")
    if data is None:
        return settings, None, None
    _only(data, {"type", "input_path", "target_path", "test_input_path", "test_target_path", "batch_size",
                 "test_batch_size", "preload", "target_grayscale", "target_is_mask", "transforms"},
          path, "neural_network.data")
    if data.get("type", "images") != "images":
        raise UserError(f"{path}: neural_network.data.type {data['type']!r} is not supported (only \"images\")")
    for key in ("target_grayscale", "target_is_mask"):
        if data.get(key) is False:
            raise UserError(f"{path}: neural_network.data.{key} false is not supported: masks are class ids")
    for key, name in (("batch_size", "batch_size"), ("test_batch_size", "test_batch_size")):
        if key in data:
            settings[name] = int(data[key])
    transforms, size = transform_settings(data.get("transforms", []), path)
    settings.update(transforms)
    return settings, _data_root(data, base, path), size


def transform_settings(transforms: list, path: Path) -> tuple[dict, tuple[int, int] | None]:
    """Settings from rmldnn ``transforms``: normalize and random flips, and the resize (height, width)."""
    settings: dict = {}
    size = None
    for item in transforms:
        if not isinstance(item, dict) or len(item) != 1:
            raise UserError(f"{path}: each transform must be an object with one key, got {item!r}")
        (name, value), = item.items()
        if name == "resize":
            size = (int(value[0]), int(value[1])) if isinstance(value, list) else (int(value), int(value))
        elif name == "normalize":
            _only(value, {"mean", "std"}, path, "transforms.normalize")
            settings["normalize_mean"] = float(value.get("mean", 0.0))
            settings["normalize_std"] = float(value.get("std", 1.0))
        elif name in ("random_horizontal_flip", "random_vertical_flip"):
            probability = 0.5 if value is True else float(value)
            settings["hflip" if "horizontal" in name else "vflip"] = probability
        else:
            raise UserError(f"{path}: transform {name!r} is not supported (resize, normalize, random_horizontal_flip, "
                            "random_vertical_flip)")
    return settings, size


def network_path(path: Path) -> Path | None:
    """None when ``path`` describes the tutorial's network (the built-in XceptionUNet is the same model)."""
    if not path.is_file():
        raise UserError(f"{path}: network file does not exist")
    same = json.loads(path.read_text()) == json.loads(REFERENCE_NETWORK.read_text())
    return None if same else path


def _optimizer(spec: dict, path: Path) -> dict:
    _only(spec, {"type", "learning_rate", "lr_scheduler"}, path, "neural_network.optimizer")
    settings: dict = {}
    if "type" in spec:
        kind = str(spec["type"]).lower()
        if kind not in OPTIMIZERS:
            raise UserError(f"{path}: optimizer type {spec['type']!r} is not one of {', '.join(sorted(OPTIMIZERS))}")
        settings["optimizer"] = kind
    if "learning_rate" in spec:
        settings["lr"] = float(spec["learning_rate"])
    if "lr_scheduler" in spec:
        settings["lr_scheduler"] = {k: v.lower() if k == "type" else v for k, v in spec["lr_scheduler"].items()}
    return settings


def _loss(spec: dict, path: Path) -> dict:
    _only(spec, {"function", "source"}, path, "neural_network.loss")
    settings: dict = {}
    if "function" in spec:
        try:
            settings["loss"] = loss_name(str(spec["function"]))
        except ValueError:
            accepted = ", ".join([*LOSSES, *LOSS_ALIASES])
            raise UserError(f"{path}: loss function {spec['function']!r} is not supported ({accepted})") from None
    if "source" in spec:
        settings["loss_source"] = str(spec["source"]).lower()
    return settings


def _data_root(data: dict, base: Path, path: Path) -> Path:
    """The folder X whose training/{inputs,masks} and testing/{inputs,masks} the four data paths name."""
    expected = {"input_path": "training/inputs", "target_path": "training/masks",
                "test_input_path": "testing/inputs", "test_target_path": "testing/masks"}
    roots = set()
    for key, tail in expected.items():
        if key not in data:
            raise UserError(f"{path}: neural_network.data.{key} is missing")
        folder = (base / data[key]).resolve()
        if folder.parts[-2:] != tuple(tail.split("/")):
            raise UserError(f"{path}: neural_network.data.{key} must end in {tail}/ (rmldnn's layout), got {folder}")
        roots.add(folder.parent.parent)
    if len(roots) != 1:
        raise UserError(f"{path}: the four data paths must share one root folder, got {sorted(map(str, roots))}")
    return roots.pop()


def _only(section: dict, known: set[str], path: Path, where: str) -> None:
    if not isinstance(section, dict):
        raise UserError(f"{path}: {where or 'the file'} must be a JSON object")
    unknown = sorted(set(section) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise UserError(f"{path}: unsupported key {prefix}{unknown[0]} (raypets reads: {', '.join(sorted(known))})")


def inference_settings(path: Path) -> dict:
    """``raypets predict`` settings from an rmldnn inference config: ``checkpoint``, ``input``, ``output``,
    ``batch_size``, ``size`` (height, width), ``normalize`` (mean, std), ``network`` and ``hdf5_precision``, each only
    when the file gives it."""
    net = load(path)
    base = path.resolve().parent
    _only(net, {"layers", "checkpoints", "data"}, path, "neural_network")
    settings: dict = {}
    if "layers" in net:
        settings["network"] = network_path(base / net["layers"])
    checkpoints = net.get("checkpoints", {})
    _only(checkpoints, {"load"}, path, "neural_network.checkpoints")
    if "load" in checkpoints:
        settings["checkpoint"] = base / checkpoints["load"]
    data = net.get("data", {})
    _only(data, {"type", "test_input_path", "test_output_path", "test_batch_size", "transforms", "hdf5_precision"},
          path, "neural_network.data")
    if data.get("type", "images") != "images":
        raise UserError(f"{path}: neural_network.data.type {data['type']!r} is not supported (only \"images\")")
    for key, name in (("test_input_path", "input"), ("test_output_path", "output")):
        if key in data:
            settings[name] = base / data[key]
    if "test_batch_size" in data:
        settings["batch_size"] = int(data["test_batch_size"])
    if "hdf5_precision" in data:
        if data["hdf5_precision"] not in ("single", "half"):
            raise UserError(f"{path}: neural_network.data.hdf5_precision must be \"single\" or \"half\", "
                            f"got {data['hdf5_precision']!r}")
        settings["hdf5_precision"] = data["hdf5_precision"]
    transforms, size = transform_settings(data.get("transforms", []), path)
    flips = sorted(name for key, name in (("hflip", "random_horizontal_flip"), ("vflip", "random_vertical_flip"))
                   if key in transforms)
    if flips:
        raise UserError(f"{path}: transform {flips[0]!r} is not supported for inference (resize, normalize)")
    if "normalize_std" in transforms:
        settings["normalize"] = (transforms["normalize_mean"], transforms["normalize_std"])
    if size is not None:
        settings["size"] = size
    return settings

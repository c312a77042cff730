"""The checkpoint format (written and read here only), and finding a trained model from whatever a user points at.
No Ray here.

A Ray checkpoint folder holds ``model_checkpoint_<epoch>.pt`` (a plain state_dict, loadable without Ray: rmldnn's
format) and ``train_state.pt`` (optimizer, epoch, step, torch RNG, the run's TrainConfig, the weights' file name).

``CKPT`` may be:

- a plain state_dict file ``model_checkpoint_<epoch>.pt`` (rmldnn's format, what ``RUN/checkpoints/`` holds);
- a Ray Train checkpoint folder (``model_checkpoint_<epoch>.pt`` beside ``train_state.pt``);
- a training run folder: its checkpoint with the best test mean Dice (``metrics.jsonl``), else its last one;
- a sweep's ``best.json`` (its ``checkpoint`` key names a Ray checkpoint folder);
- any of these at a URI (``s3://...``): downloaded into a local cache first.

A Ray checkpoint carries the training settings (network file, normalisation); a plain file does not, so the caller
passes them (e.g. from an rmldnn inference config) or the defaults of ``raypets train`` apply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import torch
from torch import nn

from raypets import storage
from raypets.classes import class_names
from raypets.errors import UserError
from raypets.model import build_network, has_unet_skips
from raypets.redaction import redact
from raypets.runlog import read_metrics
from raypets.storage import Location

STATE_FILE = "train_state.pt"  # beside the weights in a Ray checkpoint folder: optimizer, epoch, RNG, config
RAY_RUN_NAME = "ray_train"  # RunConfig name: Ray's checkpoints of a run live in RUN/ray_train/
_WEIGHTS = re.compile(r"model_checkpoint_(\d+)\.pt$")


@dataclass(frozen=True)
class Checkpoint:
    """A weights file and what is known of the run that wrote it."""

    weights: Path
    epoch: int | None = None
    train_config: dict | None = None  # TrainConfig.to_dict() of the run, when the checkpoint carries it
    uri: str | None = None  # where ``weights`` were downloaded from, for a checkpoint at a URI

    @property
    def normalize(self) -> tuple[float, float]:
        """(mean, std) of the inputs the model was trained on; raypets' defaults (0-255 inputs) when unknown."""
        cfg = self.train_config or {}
        return float(cfg.get("normalize_mean", 0.0)), float(cfg.get("normalize_std", 1 / 255))

    @property
    def network(self) -> Path | None:
        """The Keras-JSON network file of the run; None for the built-in XceptionUNet."""
        path = (self.train_config or {}).get("network")
        return Path(path) if path else None


def weights_name(epoch: int) -> str:
    return f"model_checkpoint_{epoch}.pt"


def save_state(folder: Path, *, weights: dict, optimizer: dict, epoch: int, step: int, config: dict) -> Path:
    """Write a Ray checkpoint folder's two files (with this process's torch RNG state); the weights file's path."""
    name = weights_name(epoch)
    torch.save(weights, folder / name)
    torch.save({"optimizer": optimizer, "epoch": epoch, "step": step, "torch_rng": torch.get_rng_state(),
                "config": redact(config), "weights": name}, folder / STATE_FILE)
    return folder / name


def load_state(folder: Path) -> dict:
    """What :func:`save_state` wrote into ``folder``, the weights under ``model``."""
    state = _load(folder / STATE_FILE)
    state["model"] = _load(folder / state["weights"])
    return state


def resolve_checkpoint(path: Location) -> Checkpoint:
    """The checkpoint ``path`` names, in any of the forms of this module's docstring."""
    if not storage.exists(path):
        raise UserError(f"{path}: checkpoint does not exist")
    if storage.is_file(path) and PurePosixPath(storage.filesystem(path)[1]).suffix == ".json":
        return _from_sweep(path)
    if storage.is_uri(path):
        local = storage.cached(path)
        checkpoint = resolve_checkpoint(local)
        inside = checkpoint.weights.relative_to(local).as_posix()
        return replace(checkpoint, uri=path if inside == "." else str(storage.join(path, inside)))
    path = Path(path)
    if path.is_file():
        match = _WEIGHTS.search(path.name)
        return Checkpoint(path, int(match.group(1)) if match else None)
    if (path / STATE_FILE).is_file():
        return _from_ray_folder(path)
    if (path / RAY_RUN_NAME).is_dir() or (path / "metrics.jsonl").is_file():
        return _from_run(path)
    raise UserError(f"{path}: not a checkpoint (a model_checkpoint_<epoch>.pt, a Ray checkpoint folder with "
                    f"{STATE_FILE}, a training run folder or a sweep's best.json)")


def ray_checkpoint(run_dir: Location, ray_path: str, ray_run_name: str = RAY_RUN_NAME) -> Location:
    """The checkpoint folder Ray reports by its path on the run's storage filesystem (for a bucket: without scheme
    or query) as a location of the run: that same folder for a local run, a URI in the run's URI otherwise."""
    return storage.join(run_dir, ray_run_name, PurePosixPath(ray_path).name)


def load_model(checkpoint: Checkpoint, *, network: Path | None = None) -> nn.Module:
    """The network of ``checkpoint`` with its weights, in eval mode, on the CPU.

    ``network`` (a Keras-JSON file) overrides the one the checkpoint names. The number of classes of the built-in
    network, and whether it has U-Net skips, are read from the weights. Weights that do not fit the network are one
    clear error.
    """
    state = _load(checkpoint.weights)
    network = network or checkpoint.network
    model = build_network(_num_classes(state, checkpoint.weights), network, skips=has_unet_skips(state))
    return _fit_weights(model, state, checkpoint.weights, network).eval()


def load_init_weights(model: nn.Module, path: Path, network: Path | None) -> nn.Module:
    """``model`` (built from ``network``, None: the built-in one) with the state_dict file ``path`` loaded into it
    (``--init-weights``, rmldnn's ``checkpoints.load``); weights that do not fit are one clear error."""
    return _fit_weights(model, _load(path), path, network)


def _fit_weights(model: nn.Module, state: dict, path: Path, network: Path | None) -> nn.Module:
    """``state`` (read from ``path``) loaded into ``model``, built from ``network`` (None: the built-in one)."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        what = f"the network of {network}" if network else f"the built-in {type(model).__name__}"
        skips = " (U-Net skips: --unet-skips / --no-unet-skips)" \
            if has_unet_skips(state) != has_unet_skips(model.state_dict()) else ""
        raise UserError(f"{path}: the weights do not fit {what}{skips}: {_mismatch(err)}") from None
    return model


def checkpoint_classes(checkpoint: Checkpoint, num_classes: int) -> list[str]:
    """The classes of the training data's manifest when reachable, else raypets' own (or class_<i>)."""
    data = (checkpoint.train_config or {}).get("data")
    if data and checkpoint.uri:  # the run's data in the checkpoint's bucket: read with the keys given for it
        data = storage.reuse_credentials(data, checkpoint.uri)
    manifest = storage.join(storage.parse(data), "manifest.json") if data else None
    try:
        classes = storage.read_json(manifest).get("classes", []) if manifest else []
    except UserError:  # no manifest there (any more), or not reachable from here
        classes = []
    return list(classes) if len(classes) == num_classes else list(class_names(num_classes))


def _from_sweep(path: Location) -> Checkpoint:
    """The checkpoint a best.json names, read with the keys of ``path`` when it is in the same bucket."""
    best = storage.read_json(path)
    if not isinstance(best, dict) or "checkpoint" not in best:
        raise UserError(f"{path}: not a sweep's best.json (no 'checkpoint' key)")
    if best["checkpoint"] is None:
        raise UserError(f"{path}: the best trial wrote no checkpoint")
    return resolve_checkpoint(storage.reuse_credentials(best["checkpoint"], path))


def _from_ray_folder(folder: Path) -> Checkpoint:
    state = _load(folder / STATE_FILE)
    return Checkpoint(folder / state["weights"], state.get("epoch"), state.get("config"))


def _from_run(run: Path) -> Checkpoint:
    """The run's Ray checkpoint with the best test mean Dice; the last one when no metrics name a better one."""
    folders = {}
    for state_file in (run / RAY_RUN_NAME).glob(f"checkpoint_*/{STATE_FILE}"):
        checkpoint = _from_ray_folder(state_file.parent)
        folders[checkpoint.epoch] = checkpoint
    if not folders:
        raise UserError(f"{run}: the training run holds no checkpoint yet")
    dice = {record["epoch"]: record["mean_dice"] for record in read_metrics(run) if record.get("mean_dice") is not None}
    best = max(folders, key=lambda epoch: (dice.get(epoch, float("-inf")), epoch))
    return folders[best]


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint file does not exist") from None
    except Exception as err:  # torch raises pickle, zip and runtime errors alike for a file that is not its own
        raise UserError(f"{path}: not a PyTorch checkpoint ({type(err).__name__}: {err})") from None


def _num_classes(state: dict, path: Path) -> int:
    """Output channels of the last convolution in the weights (the head comes last in both networks)."""
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a state_dict (a mapping of parameter names to tensors)")
    kernels = [v for k, v in state.items() if k.endswith("weight") and getattr(v, "ndim", 0) == 4]
    if not kernels:
        raise UserError(f"{path}: holds no convolution weights; not a segmentation model checkpoint")
    return int(kernels[-1].shape[0])


def _mismatch(err: RuntimeError) -> str:
    """The first lines of torch's load_state_dict complaint, which name the keys and shapes."""
    lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
    return "; ".join(lines[:3]) + (f"; and {len(lines) - 3} more" if len(lines) > 3 else "")

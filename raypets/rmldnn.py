"""Read rmldnn's JSON configs (``{"neural_network": {...}}``) into raypets settings.

Every key rmldnn's pets tutorial uses is understood; any other key is one clear error naming it, never ignored.
The models below are the files' schema (no I/O); the functions read the files, resolve relative paths against the
config file's folder (as rmldnn resolves them against its working folder) and compare the network file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from raypets import storage
from raypets.errors import UserError
from raypets.keras_json import REFERENCE_NETWORK
from raypets.losses import LOSS_ALIASES, LOSSES, loss_name
from raypets.optim import OPTIMIZERS, check_lr_schedule
from raypets.schema import Model, invalid, user_error

FLIPS = {"random_horizontal_flip": "hflip", "random_vertical_flip": "vflip"}  # transform -> TrainConfig setting
DATA_TAILS = {"input_path": "training/inputs", "target_path": "training/masks",  # rmldnn's layout
              "test_input_path": "testing/inputs", "test_target_path": "testing/masks"}


# Checks of single values by raypets' registries; the models below apply them.
def _optimizer(kind: str) -> str:
    if kind.lower() not in OPTIMIZERS:
        raise invalid(f"optimizer type {kind!r} is not one of {', '.join(sorted(OPTIMIZERS))}")
    return kind.lower()


def _schedule(spec: dict) -> dict:
    spec = {key: value.lower() if key == "type" and isinstance(value, str) else value for key, value in spec.items()}
    try:
        check_lr_schedule(spec)
    except UserError as err:
        raise invalid(f"neural_network.optimizer: {err}") from None
    return spec


def _loss(name: str) -> str:
    try:
        return loss_name(name)
    except ValueError:
        raise invalid(f"loss function {name!r} is not supported ({', '.join([*LOSSES, *LOSS_ALIASES])})") from None


def _precision(precision: str) -> str:
    if precision not in ("single", "half"):
        raise invalid(f'neural_network.data.hdf5_precision must be "single" or "half", got {precision!r}')
    return precision


class _Section(Model):
    """A JSON object of an rmldnn config: the keys raypets reads, typed; any other key is one error naming it."""

    where: ClassVar[str]  # its place in the file

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            raise invalid(f"{cls.where or 'the file'} must be a JSON object")
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            prefix = f"{cls.where}." if cls.where else ""
            known = ", ".join(sorted(cls.model_fields))
            raise invalid(f"unsupported key {prefix}{unknown[0]} (raypets reads: {known})")
        return values


class Normalize(_Section):
    where = "transforms.normalize"
    mean: float = 0.0
    std: float = 1.0


class Transform(Model):
    """One of rmldnn's transforms, ``{name: value}``."""

    resize: tuple[int, int] | None = None  # (height, width); one number: a square
    normalize: Normalize | None = None
    random_horizontal_flip: float | None = None  # probability; true: 0.5
    random_vertical_flip: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _one(cls, item: Any) -> Any:
        if not isinstance(item, dict) or len(item) != 1:
            raise invalid(f"each transform must be an object with one key, got {item!r}")
        if next(iter(item)) not in cls.model_fields:
            raise invalid(f"transform {next(iter(item))!r} is not supported ({', '.join(cls.model_fields)})")
        return item

    @field_validator("resize", mode="before")
    @classmethod
    def _square(cls, size: Any) -> Any:
        return size if isinstance(size, list) else [size, size]

    @field_validator(*FLIPS, mode="before")
    @classmethod
    def _probability(cls, value: Any) -> Any:
        return 0.5 if value is True else value


class _Data(_Section):
    where = "neural_network.data"
    type: Literal["images"] = "images"
    transforms: list[Transform] = []


class TrainingData(_Data):
    input_path: str
    target_path: str
    test_input_path: str
    test_target_path: str
    batch_size: int | None = None
    test_batch_size: int | None = None
    preload: bool | None = None
    target_grayscale: bool = True
    target_is_mask: bool = True

    @field_validator("target_grayscale", "target_is_mask")
    @classmethod
    def _class_ids(cls, value: bool, info: ValidationInfo) -> bool:
        if not value:
            raise invalid(f"neural_network.data.{info.field_name} false is not supported: masks are class ids")
        return value


class InferenceData(_Data):
    test_input_path: str | None = None
    test_output_path: str | None = None
    test_batch_size: int | None = None
    hdf5_precision: Annotated[str, AfterValidator(_precision)] | None = None

    @field_validator("transforms")
    @classmethod
    def _no_flips(cls, transforms: list[Transform]) -> list[Transform]:
        flips = sorted(name for item in transforms for name in FLIPS if getattr(item, name) is not None)
        if flips:
            raise invalid(f"transform {flips[0]!r} is not supported for inference (resize, normalize)")
        return transforms


class TrainingCheckpoints(_Section):
    where = "neural_network.checkpoints"
    save: Annotated[str, AfterValidator(lambda folder: folder.rstrip("/") or ".")] | None = None
    interval: int | None = None
    load: str | None = None


class InferenceCheckpoints(_Section):
    where = "neural_network.checkpoints"
    load: str | None = None


class Optimizer(_Section):
    where = "neural_network.optimizer"
    type: Annotated[str, AfterValidator(_optimizer)] | None = None
    learning_rate: float | None = None
    lr_scheduler: Annotated[dict[str, Any], AfterValidator(_schedule)] | None = None


class Loss(_Section):
    where = "neural_network.loss"
    function: Annotated[str, AfterValidator(_loss)] | None = None
    source: Annotated[str, AfterValidator(str.lower)] | None = None


class Training(_Section):
    """The ``neural_network`` of an rmldnn training config."""

    where = "neural_network"
    outfile: str | None = None
    num_epochs: int | None = None
    layers: str | None = None
    checkpoints: TrainingCheckpoints = TrainingCheckpoints()
    data: TrainingData | None = None
    optimizer: Optimizer = Optimizer()
    loss: Loss = Loss()


class Inference(_Section):
    """The ``neural_network`` of an rmldnn inference config."""

    where = "neural_network"
    layers: str | None = None
    checkpoints: InferenceCheckpoints = InferenceCheckpoints()
    data: InferenceData = InferenceData()


class _File(_Section):
    where = ""
    neural_network: dict[str, Any]


Schema = TypeVar("Schema", bound=_Section)


def _parse(path: Path, schema: type[Schema], values: Any) -> Schema:
    try:
        return schema.model_validate(values)
    except ValidationError as err:
        raise user_error(path, err, schema.where) from None


def load(path: Path) -> dict:
    """The ``neural_network`` section of an rmldnn config file."""
    return _parse(path, _File, storage.read_json(path, "config file")).neural_network


def training_settings(path: Path) -> tuple[dict, Path | None, tuple[int, int] | None]:
    """TrainConfig keyword arguments from an rmldnn training config, the rmldnn-layout data folder its paths name
    (to be prepared into shards), and the resize of its transforms (height, width)."""
    net = _parse(path, Training, load(path))
    base = path.resolve().parent
    checkpoints, optimizer = net.checkpoints, net.optimizer
    settings = {"run_dir": base, **_given(
        name=None if net.outfile is None else Path(net.outfile).stem, epochs=net.num_epochs,
        checkpoint_dir=checkpoints.save, checkpoint_every=checkpoints.interval,
        init_weights=_under(base, checkpoints.load),
        optimizer=optimizer.type, lr=optimizer.learning_rate, lr_scheduler=optimizer.lr_scheduler,
        loss=net.loss.function, loss_source=net.loss.source)}
    if net.layers is not None:
        settings["network"] = network_path(base / net.layers)
    if net.data is None:
        return settings, None, None
    transforms, size = transform_settings(net.data.transforms)
    settings.update(_given(batch_size=net.data.batch_size, test_batch_size=net.data.test_batch_size), **transforms)
    return settings, _data_root(net.data, base, path), size


def inference_settings(path: Path) -> dict:
    """``raypets predict`` settings from an rmldnn inference config: ``checkpoint``, ``input``, ``output``,
    ``batch_size``, ``size`` (height, width), ``normalize`` (mean, std), ``network`` and ``hdf5_precision``, each only
    when the file gives it."""
    net = _parse(path, Inference, load(path))
    base = path.resolve().parent
    data = net.data
    transforms, size = transform_settings(data.transforms)
    normalize = (transforms["normalize_mean"], transforms["normalize_std"]) if "normalize_std" in transforms else None
    settings = _given(
        checkpoint=_under(base, net.checkpoints.load), input=_under(base, data.test_input_path),
        output=_under(base, data.test_output_path), batch_size=data.test_batch_size, hdf5_precision=data.hdf5_precision,
        size=size, normalize=normalize)
    if net.layers is not None:
        settings["network"] = network_path(base / net.layers)
    return settings


def transform_settings(transforms: list[Transform]) -> tuple[dict, tuple[int, int] | None]:
    """Settings from rmldnn ``transforms``: normalize and random flips, and the resize (height, width)."""
    settings: dict = {}
    size = None
    for item in transforms:
        size = item.resize or size
        if item.normalize is not None:
            settings.update(normalize_mean=item.normalize.mean, normalize_std=item.normalize.std)
        settings.update({setting: getattr(item, name) for name, setting in FLIPS.items()
                         if getattr(item, name) is not None})
    return settings, size


def network_path(path: Path) -> Path | None:
    """None when ``path`` describes the tutorial's network (the built-in XceptionUNet is the same model)."""
    if not path.is_file():
        raise UserError(f"{path}: network file does not exist")
    same = json.loads(path.read_text()) == json.loads(REFERENCE_NETWORK.read_text())
    return None if same else path


def _given(**settings: Any) -> dict:
    """The settings a file gives (None: it does not)."""
    return {key: value for key, value in settings.items() if value is not None}


def _under(base: Path, relative: str | None) -> Path | None:
    return None if relative is None else base / relative


def _data_root(data: TrainingData, base: Path, path: Path) -> Path:
    """The folder X whose training/{inputs,masks} and testing/{inputs,masks} the four data paths name."""
    roots = set()
    for key, tail in DATA_TAILS.items():
        folder = (base / getattr(data, key)).resolve()
        if folder.parts[-2:] != tuple(tail.split("/")):
            raise UserError(f"{path}: neural_network.data.{key} must end in {tail}/ (rmldnn's layout), got {folder}")
        roots.add(folder.parent.parent)
    if len(roots) != 1:
        raise UserError(f"{path}: the four data paths must share one root folder, got {sorted(map(str, roots))}")
    return roots.pop()

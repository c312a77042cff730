"""A sweep file (``tune_configs/*.yaml``) read and checked into a :class:`Sweep` before any Ray work. No Ray here.

```yaml
metric: mean_dice            # any per-epoch metric of `raypets train`; default mean_dice
mode: max                    # default: min for a loss, else max
samples: 8                   # Tune's num_samples (a grid is repeated this many times); default 1
search: random               # random (seeded by train.seed) or optuna (needs `pip install optuna`)
scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # or {type: fifo} (the default)
train: {epochs: 10, batch_size: 32}                              # TrainConfig settings shared by every trial
space:                                                           # TrainConfig settings to search
  lr: {loguniform: [1.0e-4, 1.0e-2]}
  optimizer: {choice: [rmsprop, adam]}
  loss: {grid: [dice, dice+ce]}
```

Its schema is :class:`SweepFile` (pydantic models that do no I/O): ``train`` and ``space`` values take TrainConfig's own
field types, and a mistake is one line, ``FILE: where: message``.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml
from pydantic import (
    BeforeValidator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from raypets import storage
from raypets.classes import CLASS_NAMES
from raypets.config import DEFAULT_RECIPE, RECIPES, TRAIN_PATHS, TrainConfig
from raypets.errors import UserError
from raypets.schema import Model, invalid, user_error
from raypets.storage import Location


@dataclass(frozen=True)
class Distribution:
    """A search-space distribution: the ``ray.tune`` function that makes it, and whether it takes [low, high]
    bounds (floats drawn between) or a list of values."""

    tune: str
    bounds: bool


# One registry: a sweep file's distribution names -> what Tune makes of them (raypets.stages.tune.param_space).
DISTRIBUTIONS = {"loguniform": Distribution("loguniform", bounds=True), "uniform": Distribution("uniform", bounds=True),
                 "choice": Distribution("choice", bounds=False), "grid": Distribution("grid_search", bounds=False)}
SEARCHES = ("random", "optuna")
METRICS = ("mean_dice", "mean_iou", "pixel_accuracy", "test_loss", "train_loss",
           *(f"{kind}_{name}" for kind in ("dice", "iou") for name in CLASS_NAMES))
SET_BY_TUNE = {"data": "--data", "run_dir": "--run-dir", "resume": "--resume"}
FIXED_PER_SWEEP = ("epochs", "workers", "device", "gpus_per_worker")  # ASHA's horizon and each trial's resources
SWEEP_DEFAULTS = {"checkpoint_every": 1}  # every reported epoch can be the best checkpoint
# The settings a sweep's train and space name, with TrainConfig's types.
SETTING_TYPES = {name: kind for name, kind in get_type_hints(TrainConfig).items() if name not in SET_BY_TUNE}


def _yaml_float(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as text: the float it means (other text is left for the type check to refuse)."""
    if isinstance(value, str):
        with suppress(ValueError):
            return float(value)
    return value


# A setting's type, made strict: true/false is no number, 2.5 no whole number; a float still reads "1e-3".
_STRICT = {int: StrictInt, float: Annotated[StrictFloat, BeforeValidator(_yaml_float)], bool: StrictBool}


def _strict(kind: Any) -> Any:
    if get_origin(kind) in (Union, UnionType):
        return Union[tuple(_strict(arg) for arg in get_args(kind))]  # noqa: UP007 (a Union built from a tuple)
    return _STRICT.get(kind, kind)


# A sweep's train and space sections: one optional field per setting, typed by TrainConfig.
_SECTIONS = {
    "train": create_model("Train", __base__=Model, **{k: (_strict(t), None) for k, t in SETTING_TYPES.items()}),
    "space": create_model("Space", __base__=Model, **{
        k: (dict[str, Annotated[list[_strict(t)], Field(min_length=1)]], None) for k, t in SETTING_TYPES.items()}),
}


class Asha(Model):
    type: Literal["asha"]
    grace_period: StrictInt = Field(1, ge=1)  # epochs
    reduction_factor: StrictFloat = Field(2.0, gt=1)


class Fifo(Model):
    type: Literal["fifo"]


TUNE_SCHEDULERS: dict[str, type[Model]] = {"asha": Asha, "fifo": Fifo}


class SweepFile(Model):
    """A sweep file as written, typed and checked (no I/O); :func:`load_sweep` adds what the command line gives."""

    metric: str = "mean_dice"
    mode: Literal["min", "max"] | None = None  # None: min for a loss, else max
    samples: StrictInt = Field(1, ge=1)
    search: Literal[SEARCHES] = "random"
    scheduler: Asha | Fifo = Fifo(type="fifo")
    train: dict[str, Any] = {}  # TrainConfig settings shared by every trial
    space: dict[str, Any] = {}  # {setting: {distribution: values}}

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, spec: Any) -> Any:
        unknown = sorted(set(spec) - set(cls.model_fields)) if isinstance(spec, dict) else []
        if unknown:
            raise invalid(f"unknown key {unknown[0]!r}; a sweep file has {', '.join(cls.model_fields)}")
        return spec

    @field_validator("metric")
    @classmethod
    def _reported(cls, metric: str) -> str:
        if metric not in METRICS:
            raise invalid(f"metric {metric!r} is not one raypets train reports; choose {', '.join(METRICS)}")
        return metric

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler(cls, spec: Any) -> Model:
        spec = {"type": spec} if isinstance(spec, str) else spec
        kind = spec.get("type") if isinstance(spec, dict) else None
        if not isinstance(kind, str) or kind not in TUNE_SCHEDULERS:
            raise invalid(f"scheduler must be {{type: asha, grace_period: 1, reduction_factor: 2}} or {{type: fifo}}; "
                          f"got {spec!r}")
        return TUNE_SCHEDULERS[kind].model_validate(spec)

    @field_validator("train", "space", mode="before")
    @classmethod
    def _settings(cls, values: Any, info: ValidationInfo) -> dict:
        """Training settings by name, but none that raypets tune gives."""
        section = info.field_name
        if values is None:
            return {}
        if not isinstance(values, dict):
            raise invalid(f"{section} must be a mapping of training settings")
        for key in values:
            if key in SET_BY_TUNE:
                raise invalid(f"{section}.{key} is given by raypets tune ({SET_BY_TUNE[key]})")
            if key not in SETTING_TYPES:
                raise invalid(f"{section}.{key} is not a training setting; choose from {', '.join(SETTING_TYPES)}")
        return values

    @field_validator("train", "space")
    @classmethod
    def _typed(cls, values: dict, info: ValidationInfo) -> dict:
        """The values as TrainConfig's types take them (``1e-3`` a float), plain JSON, in the file's order."""
        typed = _SECTIONS[info.field_name].model_validate(values).model_dump(mode="json", exclude_unset=True)
        return {key: typed[key] for key in values}

    @model_validator(mode="after")
    def _consistent(self) -> SweepFile:
        train = {**SWEEP_DEFAULTS, **self.train}
        for key, spec in self.space.items():
            _check_distribution(key, spec)
            if key in train:
                raise invalid(f"{key!r} is both in train and in space; keep it in one")
            if key in FIXED_PER_SWEEP:
                raise invalid(f"space.{key}: {', '.join(FIXED_PER_SWEEP)} are fixed per sweep; set it in train")
        grids = [key for key, spec in self.space.items() if "grid" in spec]
        if self.search == "optuna" and grids:
            raise invalid(f"space.{grids[0]}: Optuna does not take grid; use choice")
        epochs = self.train.get("epochs", TrainConfig.epochs)
        if isinstance(self.scheduler, Asha) and self.scheduler.grace_period > epochs:
            raise invalid(f"scheduler.grace_period {self.scheduler.grace_period} is more than the {epochs} epochs of "
                          "a trial")
        return self


def _check_distribution(key: str, spec: dict) -> None:
    """One of DISTRIBUTIONS; [low, high] bounds only for a float setting."""
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise invalid(f"space.{key} must be one of {{loguniform: [low, high]}}, {{uniform: [low, high]}}, "
                      f"{{choice: [values]}}, {{grid: [values]}}; got {spec!r}")
    (kind, values), = spec.items()
    if not DISTRIBUTIONS[kind].bounds:
        return
    if SETTING_TYPES[key] is not float:
        takes = getattr(SETTING_TYPES[key], "__name__", SETTING_TYPES[key])
        raise invalid(f"space.{key}: {kind} draws floats, {key} takes {takes}; use choice or grid")
    if len(values) != 2 or not values[0] < values[1] or (kind == "loguniform" and values[0] <= 0):
        raise invalid(f"space.{key}.{kind} takes [low, high] with {'0 < ' if kind == 'loguniform' else ''}low < high, "
                      f"got {values!r}")


@dataclass(frozen=True)
class Sweep:
    """A checked sweep; every value is plain JSON, so it round-trips through ``RUN/sweep.json``."""

    metric: str
    mode: str
    samples: int
    search: str
    scheduler: dict  # {"type": "asha", "grace_period": 1, "reduction_factor": 2.0} or {"type": "fifo"}
    train: dict  # TrainConfig settings of every trial, ``data`` included
    space: dict  # {setting: {distribution: values}}

    @property
    def epochs(self) -> int:
        return self.train.get("epochs", TrainConfig.epochs)

    @property
    def seed(self) -> int:
        return self.train.get("seed", TrainConfig.seed)

    def trial_config(self, run_dir: Location, params: dict, *, resume: bool = False) -> TrainConfig:
        """The TrainConfig of the trial with sampled ``params`` that trains into ``run_dir``."""
        return TrainConfig.from_dict({**self.train, **params, "run_dir": str(run_dir), "resume": resume})

    def to_dict(self) -> dict:
        return asdict(self)


def load_sweep(path: Path, data: Location, *, samples: int | None = None, workers: int | None = None,
               gpus_per_worker: float | None = None, tracking: list[str] | None = None) -> Sweep:
    """Read and check the sweep file ``path``; the flags given override it. Any mistake is one UserError."""
    spec = _read(path)
    try:
        sweep = SweepFile.model_validate(spec if samples is None else {**spec, "samples": samples})
    except ValidationError as err:
        raise user_error(path, err) from None
    if sweep.search == "optuna":
        _require_optuna(path)
    train = {**SWEEP_DEFAULTS, **RECIPES[DEFAULT_RECIPE], **sweep.train, "data": str(data)}  # as raypets train
    # Absolute: Tune runs each trial in a folder of its own.
    train.update({key: str(storage.absolute(storage.parse(train[key]))) for key in TRAIN_PATHS if train.get(key)})
    for key in ("network", "init_weights"):
        storage.require_file(Path(train[key]) if train.get(key) else None)
    if workers is not None:
        train["workers"] = workers
    if tracking:
        train["tracking"] = tracking
    if gpus_per_worker is not None:  # 0: CPU workers; a fraction: one-worker trials share a GPU
        if gpus_per_worker < 0:
            raise UserError(f"--gpus-per-worker must be 0 (CPU workers) or more, got {gpus_per_worker:g}")
        train["device"] = "gpu" if gpus_per_worker else "cpu"
        if gpus_per_worker:
            train["gpus_per_worker"] = gpus_per_worker
    mode = sweep.mode or ("min" if sweep.metric.endswith("loss") else "max")
    checked = Sweep(sweep.metric, mode, sweep.samples, sweep.search, sweep.scheduler.model_dump(), train, sweep.space)
    _check_values(path, checked)
    return checked


def _read(path: Path) -> dict:
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: sweep file does not exist") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: a sweep file is a mapping of {', '.join(SweepFile.model_fields)}")
    return spec


def _require_optuna(path: Path) -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UserError(f"{path}: search: optuna needs Optuna, which is not installed; `pip install optuna`, "
                        "or use search: random") from None


def _check_values(path: Path, sweep: Sweep) -> None:
    """Build a trial's TrainConfig with each bound, choice and grid value: a bad one fails here, not in a trial."""
    _check_trial(path, sweep, {}, "train")
    for key, spec in sweep.space.items():
        for value in next(iter(spec.values())):
            _check_trial(path, sweep, {key: value}, f"space.{key} = {value!r}")


def _check_trial(path: Path, sweep: Sweep, params: dict, where: str) -> None:
    try:
        sweep.trial_config(Path("RUN"), params)
    except UserError as err:
        raise UserError(f"{path}: {where}: {err}") from None

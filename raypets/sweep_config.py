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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from raypets import storage
from raypets.classes import CLASS_NAMES
from raypets.config import TRAIN_PATHS, TrainConfig
from raypets.errors import UserError
from raypets.storage import Location

KEYS = ("metric", "mode", "samples", "search", "scheduler", "train", "space")


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
TUNE_SCHEDULERS = {"asha": {"grace_period": 1, "reduction_factor": 2}, "fifo": {}}
METRICS = ("mean_dice", "mean_iou", "pixel_accuracy", "test_loss", "train_loss",
           *(f"{kind}_{name}" for kind in ("dice", "iou") for name in CLASS_NAMES))
SET_BY_TUNE = {"data": "--data", "run_dir": "--run-dir", "resume": "--resume"}
FIXED_PER_SWEEP = ("epochs", "workers", "device")  # ASHA's horizon and each trial's resources
SWEEP_DEFAULTS = {"checkpoint_every": 1}  # every reported epoch can be the best checkpoint
_SETTINGS = {f.name: f.type for f in fields(TrainConfig)}


@dataclass(frozen=True)
class Sweep:
    """A checked sweep; every value is plain JSON, so it round-trips through ``RUN/sweep.json``."""

    metric: str
    mode: str
    samples: int
    search: str
    scheduler: dict  # {"type": "asha", "grace_period": 1, "reduction_factor": 2} or {"type": "fifo"}
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
               gpus_per_worker: float | None = None) -> Sweep:
    """Read and check the sweep file ``path``; the flags given override it. Any mistake is one UserError."""
    spec = _read(path)
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r}; a sweep file has {', '.join(KEYS)}")
    metric = spec.get("metric", "mean_dice")
    if metric not in METRICS:
        raise UserError(f"{path}: metric {metric!r} is not one raypets train reports; choose {', '.join(METRICS)}")
    mode = spec.get("mode", "min" if metric.endswith("loss") else "max")
    if mode not in ("min", "max"):
        raise UserError(f"{path}: mode {mode!r} must be min or max")
    samples = spec.get("samples", 1) if samples is None else samples
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise UserError(f"{path}: samples must be a whole number >= 1, got {samples!r}")
    search = spec.get("search", "random")
    if search not in SEARCHES:
        raise UserError(f"{path}: search {search!r} must be one of {', '.join(SEARCHES)}")

    train = {**SWEEP_DEFAULTS, **_settings(path, "train", spec.get("train") or {}), "data": str(data)}
    # Absolute: Tune runs each trial in a folder of its own.
    train.update({key: str(storage.absolute(storage.parse(train[key]))) for key in TRAIN_PATHS if train.get(key)})
    for key in ("network", "init_weights"):
        storage.require_file(Path(train[key]) if train.get(key) else None)
    if workers is not None:
        train["workers"] = workers
    if gpus_per_worker is not None:
        if gpus_per_worker not in (0, 1):
            raise UserError(f"--gpus-per-worker must be 0 (CPU workers) or 1 (raypets train gives each GPU worker "
                            f"a whole GPU), got {gpus_per_worker:g}")
        train["device"] = "gpu" if gpus_per_worker else "cpu"
    space = {key: _distribution(path, key, value) for key, value in _settings(path, "space", spec.get("space") or {},
                                                                             raw=True).items()}
    for key in space:
        if key in train:
            raise UserError(f"{path}: {key!r} is both in train and in space; keep it in one")
        if key in FIXED_PER_SWEEP:
            raise UserError(f"{path}: space.{key}: {', '.join(FIXED_PER_SWEEP)} are fixed per sweep; set it in train")
    if search == "optuna":
        _check_optuna(path, space)
    sweep = Sweep(metric, mode, samples, search, _scheduler(path, spec.get("scheduler", "fifo")), train, space)
    if sweep.scheduler["type"] == "asha" and sweep.scheduler["grace_period"] > sweep.epochs:
        raise UserError(f"{path}: scheduler.grace_period {sweep.scheduler['grace_period']} is more than the "
                        f"{sweep.epochs} epochs of a trial")
    _check_values(path, sweep)
    return sweep


def _read(path: Path) -> dict:
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: sweep file does not exist") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: a sweep file is a mapping of {', '.join(KEYS)}")
    return spec


def _settings(path: Path, section: str, values, *, raw: bool = False) -> dict:
    """The ``train`` or ``space`` section: TrainConfig keys only; numbers YAML read as text become numbers."""
    if not isinstance(values, dict):
        raise UserError(f"{path}: {section} must be a mapping of training settings")
    for key in values:
        if key in SET_BY_TUNE:
            raise UserError(f"{path}: {section}.{key} is given by raypets tune ({SET_BY_TUNE[key]})")
        if key not in _SETTINGS:
            raise UserError(f"{path}: {section}.{key} is not a training setting; choose from "
                            f"{', '.join(k for k in _SETTINGS if k not in SET_BY_TUNE)}")
    return dict(values) if raw else {key: _number(path, f"{section}.{key}", key, v) for key, v in values.items()}


def _number(path: Path, where: str, key: str, value):
    """``1e-3`` is text to YAML 1.1: make it (and an int given for a float) the number the setting ``key`` takes."""
    kind = {"float": float, "int": int}.get(_SETTINGS[key])
    if kind is None:
        return value
    if isinstance(value, str) or (kind is float and _whole(value)):
        try:
            return kind(value)
        except ValueError:
            raise UserError(f"{path}: {where}: {value!r} is not {'a whole' if kind is int else 'a'} number") from None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise UserError(f"{path}: {where}: {key} takes a{' whole' if kind is int else ''} number, got {value!r}")
    return value


def _distribution(path: Path, key: str, spec) -> dict:
    where = f"space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise UserError(f"{path}: {where} must be one of {{loguniform: [low, high]}}, {{uniform: [low, high]}}, "
                        f"{{choice: [values]}}, {{grid: [values]}}; got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise UserError(f"{path}: {where}.{kind} takes a non-empty list, got {values!r}")
    values = [_number(path, where, key, v) for v in values]
    if DISTRIBUTIONS[kind].bounds:
        if _SETTINGS[key] != "float":
            raise UserError(f"{path}: {where}: {kind} draws floats, {key} takes {_SETTINGS[key]}; use choice or grid")
        low, high = values if len(values) == 2 else (None, None)
        if low is None or not low < high or (kind == "loguniform" and low <= 0):
            raise UserError(f"{path}: {where}.{kind} takes [low, high] with {'0 < ' if kind == 'loguniform' else ''}"
                            f"low < high, got {values!r}")
    return {kind: values}


def _scheduler(path: Path, spec) -> dict:
    spec = {"type": spec} if isinstance(spec, str) else spec
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in TUNE_SCHEDULERS:
        raise UserError(f"{path}: scheduler must be {{type: asha, grace_period: 1, reduction_factor: 2}} or "
                        f"{{type: fifo}}; got {spec!r}")
    unknown = sorted(set(spec) - {"type", *TUNE_SCHEDULERS[kind]})
    if unknown:
        raise UserError(f"{path}: scheduler.{unknown[0]} is not a setting of {kind}")
    scheduler = {"type": kind, **TUNE_SCHEDULERS[kind], **{k: v for k, v in spec.items() if k != "type"}}
    if kind == "asha" and not (_whole(scheduler["grace_period"]) and scheduler["grace_period"] >= 1
                               and isinstance(scheduler["reduction_factor"], (int, float))
                               and scheduler["reduction_factor"] > 1):
        raise UserError(f"{path}: scheduler asha takes grace_period >= 1 (epochs) and reduction_factor > 1, "
                        f"got {scheduler!r}")
    return scheduler


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_optuna(path: Path, space: dict) -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UserError(f"{path}: search: optuna needs Optuna, which is not installed; `pip install optuna`, "
                        "or use search: random") from None
    grids = [key for key, spec in space.items() if "grid" in spec]
    if grids:
        raise UserError(f"{path}: space.{grids[0]}: Optuna does not take grid; use choice")


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
    except (TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{path}: {where}: a value has the wrong type ({err})") from None

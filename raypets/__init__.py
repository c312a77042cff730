"""raypets: pet segmentation with an Xception U-Net on Ray Data, Train and Tune.

Each stage's function is importable from here for notebooks (``raypets.train(TrainConfig(...))``), imported on first
use (PEP 562), so ``import raypets`` stays light and imports neither Ray nor torch: Ray Data workers import the
package too.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("raypets")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
del PackageNotFoundError, version

# name -> the module that defines it
_LAZY = {
    "prepare": "raypets.stages.prepare",
    "train": "raypets.stages.train",
    "tune": "raypets.stages.tune",
    "evaluate": "raypets.stages.evaluate",
    "predict": "raypets.stages.predict",
    "export": "raypets.exporter",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'raypets' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

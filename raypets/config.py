"""Typed settings of each stage, validated before any Ray work starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raypets.data.layouts import LAYOUTS
from raypets.errors import UserError

# Class ids after preparation: the official README's trimap meaning (1 pet, 2 background, 3 border) shifted by one.
CLASS_NAMES = ("pet", "background", "border")

# What a prepared folder holds; `prepare --overwrite` replaces only a folder made of these.
PREPARED_ENTRIES = frozenset({"train", "test", "manifest.json"})
EXPORT_ENTRIES = frozenset({"training", "testing"})


@dataclass(frozen=True)
class PrepareConfig:
    """Settings of ``raypets prepare``; see :func:`raypets.data.prepare.prepare`."""

    src: Path
    out: Path
    layout: str = "auto"
    size: tuple[int, int] = (160, 160)  # (height, width)
    split: str = "hash"
    test_fraction: float = 0.1
    seed: int = 0
    strict: bool = False
    overwrite: bool = False
    export_rmldnn: Path | None = None

    def __post_init__(self) -> None:
        if not self.src.is_dir():
            raise UserError(f"{self.src}: dataset folder does not exist")
        if self.layout not in ("auto", *LAYOUTS):
            raise UserError(f"unknown layout {self.layout!r}; choose auto, {', '.join(LAYOUTS)}")
        if self.split not in ("hash", "official"):
            raise UserError(f"unknown split rule {self.split!r}; choose hash or official")
        if not 0.0 <= self.test_fraction < 1.0:
            raise UserError(f"--test-fraction must be in [0, 1), got {self.test_fraction}")
        if min(self.size) < 1:
            raise UserError(f"--size must be positive, got {self.size}")
        check_output_folder(self.out, PREPARED_ENTRIES, self.overwrite, "prepared dataset")
        if self.export_rmldnn is not None:
            check_output_folder(self.export_rmldnn, EXPORT_ENTRIES, self.overwrite, "rmldnn export")


def check_output_folder(path: Path, ours: frozenset[str], overwrite: bool, what: str) -> None:
    """Refuse a non-empty ``path`` unless ``overwrite`` and it holds only entries a previous run wrote."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: exists and is not a folder")
    entries = {p.name for p in path.iterdir()} if path.is_dir() else set()
    if not entries:
        return
    if not overwrite:
        raise UserError(f"{path}: exists and is not empty; pass --overwrite to replace the {what} there")
    strangers = sorted(entries - ours)
    if strangers:
        raise UserError(
            f"{path}: --overwrite only replaces a {what} ({', '.join(sorted(ours))}); "
            f"it also holds {', '.join(strangers[:5])}, so it is left alone"
        )

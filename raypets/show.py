"""``raypets show``: the tutorial's figure, input | prediction | ground truth per row, from a predict output. No Ray."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from raypets.errors import UserError
from raypets.plots import plt


def show_predictions(output: Path, out: Path, *, images: Path | None = None, truth: Path | None = None,
                     rows: int = 6) -> Path:
    """The tutorial's figure from a ``raypets predict`` folder: a row per sample (first ``rows`` by name) with the
    input (when ``images`` is given), the predicted class ids at network resolution, and the ground truth (when
    ``truth`` holds a class-id mask named like the image, any image suffix)."""
    if rows < 1:
        raise UserError(f"--rows must be at least 1, got {rows}")
    index = output / "predictions.h5"
    if not index.is_file():
        raise UserError(f"{output}: no predictions.h5; is it a folder written by raypets predict?")
    with h5py.File(index, "r") as file:
        names = sorted(_dataset_names(file))[:rows]
        if not names:
            raise UserError(f"{index}: holds no predictions")
        predictions = [file[name][()].argmax(0) for name in names]
        num_classes = file[names[0]].shape[0]
    columns = [("input", images), ("prediction", None), ("ground truth", truth)]
    columns = [(title, folder) for title, folder in columns if title == "prediction" or folder is not None]
    fig, axes = plt.subplots(len(names), len(columns), figsize=(2.6 * len(columns), 2.6 * len(names)), dpi=100,
                             squeeze=False)
    for row, (name, predicted) in enumerate(zip(names, predictions, strict=True)):
        for col, (title, folder) in enumerate(columns):
            ax = axes[row][col]
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title)
            if title == "prediction":
                ax.imshow(predicted, cmap="gray", interpolation="nearest", vmin=0, vmax=num_classes - 1)
            elif title == "input":
                ax.imshow(Image.open(_existing(folder / name)).convert("RGB"))
            else:
                ax.imshow(np.asarray(Image.open(_mask_for(folder, name))), cmap="gray", interpolation="nearest",
                          vmin=0, vmax=num_classes - 1)
        axes[row][0].text(0, 0, name, fontsize=7, va="bottom", transform=axes[row][0].transAxes)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _dataset_names(group, prefix: str = "") -> list[str]:
    """Every dataset's path under ``group``, through the external links that predictions.h5 holds (which h5py's
    ``visititems`` does not follow)."""
    names = []
    for key, item in group.items():
        if isinstance(item, h5py.Dataset):
            names.append(prefix + key)
        elif isinstance(item, h5py.Group):
            names += _dataset_names(item, f"{prefix}{key}/")
    return names


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"{path}: image not found")
    return path


def _mask_for(folder: Path, name: str) -> Path:
    """The mask beside ``name`` in ``folder``: the same relative path with any image suffix."""
    stem = Path(name).with_suffix("")
    for candidate in sorted((folder / stem.parent).glob(f"{stem.name}.*")):
        return candidate
    raise UserError(f"{folder / stem}.*: no ground-truth mask for {name}")

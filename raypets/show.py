"""``raypets show``: the tutorial's figure, input | overlay | prediction | ground truth per row, from a predict
output. No Ray."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

from raypets.data.decode import decode_image
from raypets.data.sources import display_name
from raypets.errors import UserError
from raypets.inference import full_size_mask, overlay
from raypets.outputs import DONE
from raypets.plots import plt


def show_predictions(output: Path, out: Path, *, images: Path | None = None, truth: Path | None = None,
                     rows: int = 6) -> Path:
    """The tutorial's figure from a ``raypets predict`` folder: a row per sample (first ``rows`` by name) with the
    input (when ``images`` is given, as a viewer orients it) and the prediction overlaid on it, the predicted class
    ids at the image's original size (the probabilities resized bilinearly, then the argmax, as predict's masks),
    and the ground truth (when ``truth`` holds a class-id mask named like the image, any image suffix)."""
    if rows < 1:
        raise UserError(f"--rows must be at least 1, got {rows}")
    index = output / "predictions.h5"
    if not index.is_file():
        raise UserError(f"{output}: no predictions.h5; is it a folder written by raypets predict?")
    if not (output / DONE).is_file():
        raise UserError(f"{output}: no {DONE}: raypets predict did not finish writing it (run it again)")
    with h5py.File(index, "r") as file:
        keys = sorted(dataset_names(file))[:rows]
        if not keys:
            raise UserError(f"{index}: holds no predictions")
        predictions = [_class_ids(file[key]) for key in keys]
        num_classes = file[keys[0]].shape[0]
        classes = [str(name) for name in file.attrs.get("class_names", [])]
    background = classes.index("background") if "background" in classes else -1
    names = [os.fsdecode(key) for key in keys]
    columns = [("input", images), ("overlay", images), ("prediction", None), ("ground truth", truth)]
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
                ax.imshow(_pixels(folder, name))
            elif title == "overlay":
                pixels = _pixels(folder, name)
                ax.imshow(overlay(pixels, _resized(predicted, pixels.shape[:2]), background))
            else:
                ax.imshow(np.asarray(Image.open(_mask_for(folder, name))), cmap="gray", interpolation="nearest",
                          vmin=0, vmax=num_classes - 1)
        axes[row][0].text(0, 0, display_name(name), fontsize=7, va="bottom", transform=axes[row][0].transAxes)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _class_ids(dataset: h5py.Dataset) -> np.ndarray:
    """A prediction's class ids at its image's original size (its network size when the file does not say)."""
    size = dataset.attrs.get("original_size", dataset.shape[1:])
    return full_size_mask(torch.from_numpy(dataset[()]), (int(size[0]), int(size[1]))).numpy()


def dataset_names(group, prefix: bytes = b"") -> list[bytes]:
    """Every dataset's path under ``group`` (bytes: names need not be UTF-8), through the external links that
    predictions.h5 holds (which h5py's ``visititems`` does not follow)."""
    names = []
    for key, item in group.items():
        path = prefix + (key if isinstance(key, bytes) else key.encode())
        if isinstance(item, h5py.Dataset):
            names.append(path)
        elif isinstance(item, h5py.Group):
            names += dataset_names(item, path + b"/")
    return names


def _resized(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Class ids at ``size`` (height, width): nearest neighbour, for an image that is not the predicted size."""
    return mask if mask.shape == size else np.asarray(Image.fromarray(mask).resize(size[::-1], Image.NEAREST))


def _pixels(folder: Path, name: str) -> np.ndarray:
    """The image ``name`` in ``folder`` as a viewer orients it."""
    path = folder / name
    if not path.is_file():
        raise UserError(f"{path}: image not found")
    return decode_image(path.read_bytes(), name, orient=True).pixels


def _mask_for(folder: Path, name: str) -> Path:
    """The mask beside ``name`` in ``folder``: the same relative path with any image suffix."""
    stem = Path(name).with_suffix("")
    for candidate in sorted((folder / stem.parent).glob(f"{stem.name}.*")):
        return candidate
    raise UserError(f"{folder / stem}.*: no ground-truth mask for {name}")

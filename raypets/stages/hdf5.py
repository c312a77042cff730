"""HDF5 output of ``raypets predict``: a Ray Data ``Datasink`` writing one dataset per image, and the index file.

Layout, the one rmldnn writes and its tutorial reads (``h5py.File('OUT/output_1.h5')['Abyssinian_142.jpg'][()]``):

- ``OUT/output_1.h5``: one dataset per image, named by its path relative to the input folder (sub-folders become
  groups), shape (C, H, W), the softmax at network resolution, float32 (float16 for ``precision="half"``); each
  dataset has the attribute ``original_size`` (H, W); the file has ``class_names``, ``network_size``,
  ``checkpoint`` and ``precision``.
- ``OUT/predictions.h5``: the same names as external links into the file(s) that hold them, so one entry point finds
  every prediction however the writing was split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import WriteResult

if TYPE_CHECKING:
    from ray.data._internal.execution.interfaces import TaskContext

OUTPUT_FILE = "output_1.h5"
INDEX_FILE = "predictions.h5"

# Called for each written row with the row (a dict of its columns) and the output folder: masks, overlays.
RowHook = Callable[[dict, Path], None]


class HDF5Sink(Datasink):
    """Appends each row's ``probs`` to ``folder/output_1.h5`` as dataset ``key``; rows with a ``reason`` (files
    that could not be decoded) are not written but returned as errors.

    Meant for ``write_datasink(sink, concurrency=1)``: one write task at a time appends to the one file, on the
    driver's node (``supports_distributed_writes`` is False), so ``folder`` is a local path there. A retried task
    replaces the datasets it wrote before. :meth:`on_write_complete` writes the index and leaves, on this object,
    the names written and the errors.
    """

    def __init__(self, folder: str | Path, attrs: dict, on_row: RowHook | None = None) -> None:
        self.folder = Path(folder)
        self.attrs = attrs
        self.on_row = on_row
        self.written: list[str] = []
        self.errors: list[tuple[str, str, str]] = []  # (name, reason, detail)

    @property
    def supports_distributed_writes(self) -> bool:
        return False

    def on_write_start(self, schema=None) -> None:
        with h5py.File(self.folder / OUTPUT_FILE, "w") as out:
            out.attrs.update(self.attrs)

    def write(self, blocks: Iterable[Block], ctx: TaskContext) -> tuple[list[str], list[tuple[str, str, str]]]:
        written, errors = [], []
        with h5py.File(self.folder / OUTPUT_FILE, "a") as out:
            for block in blocks:
                batch = BlockAccessor.for_block(block).to_batch_format("numpy")
                for index in range(len(batch["key"])):
                    row = {column: values[index] for column, values in batch.items()}
                    name = str(row["key"])
                    if row["reason"]:
                        errors.append((name, str(row["reason"]), str(row["detail"])))
                        continue
                    if name in out:
                        del out[name]
                    dataset = out.create_dataset(name, data=row["probs"])
                    dataset.attrs["original_size"] = np.array([row["height"], row["width"]], np.int64)
                    written.append(name)
                    if self.on_row:
                        self.on_row(row, self.folder)
        return written, errors

    def on_write_complete(self, write_result: WriteResult) -> None:
        for written, errors in write_result.write_returns:
            self.written += written
            self.errors += errors
        self.written.sort()
        self.errors.sort()
        write_index(self.folder, {name: OUTPUT_FILE for name in self.written}, self.attrs)


def write_index(folder: Path, files: dict[str, str], attrs: dict) -> None:
    """``folder/predictions.h5``: for each dataset name an external link to the same name in ``files[name]``
    (a path relative to ``folder``, so the folder can be moved), and the output's file attributes."""
    with h5py.File(folder / INDEX_FILE, "w") as index:
        index.attrs.update(attrs)
        for name in sorted(files):
            index[name] = h5py.ExternalLink(files[name], "/" + name)

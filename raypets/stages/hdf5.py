"""HDF5 output of ``raypets predict`` (``--format hdf5``, the default): one file per write task, and the index.

Layout, the one rmldnn writes and its tutorial reads (``h5py.File('OUT/output_1.h5')['Abyssinian_142.jpg'][()]``):

- ``OUT/output_<k>.h5``, one per write task (several in parallel): one dataset per image, named by its path
  relative to INPUT (sub-folders become groups; a name that is not UTF-8 keeps its bytes), shape (C, H, W), the
  softmax at network resolution, float32 (float16 for ``hdf5_precision="half"``); each dataset has the attributes
  ``original_size`` (H, W) and ``repair`` (when the image was repaired); the file has ``class_names``,
  ``network_size``, ``checkpoint``, ``precision`` and ``autocast``.
- ``OUT/predictions.h5``: the same names as external links into the file that holds each, so one entry point finds
  every prediction however the writing was split.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import h5py
import numpy as np

from raypets import storage
from raypets.stages.prediction_sinks import FileWriter, PredictionSink
from raypets.storage import Location

INDEX_FILE = "predictions.h5"


def output_file(index: int) -> str:
    return f"output_{index}.h5"


class HDF5Sink(PredictionSink):
    """Writes each prediction's ``probs`` into this task's ``output_<k>.h5`` (a local file, uploaded by the task
    when OUTPUT is a URI); :meth:`on_write_complete` writes the index."""

    def __init__(self, output: Location, attrs: dict, **kwargs) -> None:
        super().__init__(output, **kwargs)
        self.attrs = attrs

    def open_file(self, index: int) -> FileWriter:
        return _HDF5File(self.output, output_file(index), self.attrs)

    def on_write_complete(self, write_result) -> None:
        super().on_write_complete(write_result)
        write_index(self.output, self.written, self.attrs)


class _HDF5File(FileWriter):
    def __init__(self, output: Location, name: str, attrs: dict) -> None:
        self.output, self.name = output, name
        self.temp = None if not storage.is_uri(output) else tempfile.TemporaryDirectory(prefix="raypets-h5-")
        self.path = Path(self.temp.name if self.temp else output, name)
        self.file = h5py.File(self.path, "w")
        self.file.attrs.update(attrs)

    def add(self, row: dict) -> None:
        dataset = self.file.create_dataset(dataset_name(bytes(row["key"])), data=row["probs"])
        dataset.attrs["original_size"] = np.array([row["height"], row["width"]], np.int64)
        if row["repair"]:
            dataset.attrs["repair"] = str(row["repair"])

    def close(self) -> None:
        self.file.close()
        if self.temp:
            storage.upload(self.path, storage.join(self.output, self.name))
            self.temp.cleanup()


def dataset_name(name: bytes) -> str | bytes:
    """A file's name as an HDF5 path: text when it is UTF-8 (as rmldnn's snippet indexes it), else its bytes."""
    try:
        return name.decode()
    except UnicodeDecodeError:
        return name


def write_index(output: Location, files: dict[bytes, str], attrs: dict) -> None:
    """``output/predictions.h5``: for each dataset name an external link to the same name in ``files[name]``
    (a path relative to ``output``, so the folder can be moved), and the output's file attributes."""
    with tempfile.TemporaryDirectory(prefix="raypets-h5-") as temp:
        local = Path(temp if storage.is_uri(output) else output, INDEX_FILE)
        with h5py.File(local, "w") as index:
            index.attrs.update(attrs)
            for name in sorted(files):
                index[dataset_name(name)] = h5py.ExternalLink(files[name], b"/" + name)
        if storage.is_uri(output):
            storage.upload(local, storage.join(output, INDEX_FILE))

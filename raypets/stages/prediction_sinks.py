"""Where ``raypets predict`` writes: one Ray Data ``Datasink`` per ``--format`` (hdf5, parquet, png), writing in
parallel tasks straight to OUTPUT (a local folder, or a URI the tasks write to themselves), plus the class-id mask
and overlay PNGs any format may add.

Rows with a ``reason`` (files that could not be read or decoded) are not written but returned as errors. Each write
task gets at least ``rows_per_file`` rows (Ray Data bundles them) and writes one file of them, numbered by the
task: ``output_<k>.h5`` or ``predictions/part-<k>.parquet``; a retried task rewrites its own file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import WriteResult

from raypets import storage
from raypets.data.decode import decode_image
from raypets.data.sources import display_name, read_and_decode
from raypets.inference import encode_png, overlay
from raypets.storage import Location

if TYPE_CHECKING:
    from ray.data._internal.execution.interfaces import TaskContext

PARQUET_FOLDER = "predictions"


class PredictionSink(Datasink):
    """Routes each row: an error to the list, a prediction to :meth:`open_file`'s writer and to the mask and
    overlay PNGs asked for. Subclasses name the file format. After :meth:`on_write_complete` the sink holds
    ``written`` (name -> the file holding it, or "" without one), ``errors`` (name, reason, detail) and
    ``repaired`` (name -> repair)."""

    def __init__(self, output: Location, *, rows_per_file: int | None = None, masks: bool = False,
                 overlays: bool = False, background: int = -1, max_pixels: int = 0, max_bytes: int = 0) -> None:
        self.output = output
        self.rows_per_file = rows_per_file
        self.masks, self.overlays, self.background = masks, overlays, background
        self.max_pixels, self.max_bytes = max_pixels, max_bytes  # to read a source again for its overlay
        self.written: dict[bytes, str] = {}
        self.errors: list[tuple[bytes, str, str]] = []
        self.repaired: dict[bytes, str] = {}

    @property
    def supports_distributed_writes(self) -> bool:
        return True

    @property
    def min_rows_per_write(self) -> int | None:
        return self.rows_per_file

    def open_file(self, index: int) -> FileWriter | None:
        """The writer of this task's file (``index`` from 1), or None for a format of PNGs only."""
        return None

    def write(self, blocks: Iterable[Block], ctx: TaskContext) -> tuple[list, list]:
        written, errors, writer = [], [], None
        for row in _rows(blocks):
            name = bytes(row["key"])
            if row["reason"]:
                errors.append((name, str(row["reason"]), str(row["detail"])))
                continue
            if writer is None:
                writer = self.open_file(ctx.task_idx + 1) or _NO_FILE
            writer.add(row)
            self._write_pngs(row)
            written.append((name, writer.name, str(row["repair"])))
        if writer is not None:
            writer.close()
        return written, errors

    def on_write_complete(self, write_result: WriteResult) -> None:
        for written, errors in write_result.write_returns:
            for name, file, repair in written:
                self.written[name] = file
                if repair:
                    self.repaired[name] = repair
            self.errors += errors
        self.errors.sort()

    def _write_pngs(self, row: dict) -> None:
        """The class-id mask at the image's original size and/or its colour overlay."""
        png = os.fsdecode(bytes(row["png"]))
        if self.masks:
            put_bytes(self.output, f"masks/{png}", encode_png(row["mask"]))
        if self.overlays:
            mask = row["mask"]
            pixels = read_and_decode(str(row["root"]), bytes(row["path"]), self.max_bytes, partial(
                decode_image, name=png, max_pixels=self.max_pixels, orient=True)).pixels
            put_bytes(self.output, f"overlays/{png}", encode_png(overlay(pixels, mask, self.background)))


class FileWriter:
    """One output file of a write task: ``add`` a row at a time, then ``close``; ``name`` is its path in OUTPUT."""

    name = ""

    def add(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


_NO_FILE = FileWriter()


class PngSink(PredictionSink):
    """``--format png``: the class-id masks only (``masks/<name>.png``), written by parallel tasks."""

    def __init__(self, output: Location, **kwargs) -> None:
        super().__init__(output, **{**kwargs, "masks": True})


class ParquetSink(PredictionSink):
    """``--format parquet``: ``predictions/part-<k>.parquet`` with ``name``, ``height`` and ``width`` (the original
    size), ``mask`` (the class ids at that size as PNG bytes), ``repair`` and, with ``probabilities``, ``probs``
    (the softmax at network resolution, a tensor column)."""

    def __init__(self, output: Location, *, probabilities: bool = False, **kwargs) -> None:
        super().__init__(output, **kwargs)
        self.probabilities = probabilities

    def open_file(self, index: int) -> FileWriter:
        return _ParquetFile(self.output, f"{PARQUET_FOLDER}/part-{index:05d}.parquet", self.probabilities)


class _ParquetFile(FileWriter):
    """One Parquet file, written a row group of ``ROWS_PER_GROUP`` rows at a time (straight to a URI too)."""

    ROWS_PER_GROUP = 64

    def __init__(self, output: Location, name: str, probabilities: bool) -> None:
        self.output, self.name, self.probabilities = output, name, probabilities
        self.rows: list[dict] = []
        self.writer: pq.ParquetWriter | None = None

    def add(self, row: dict) -> None:
        entry = {"name": display_name(bytes(row["key"])), "height": int(row["height"]), "width": int(row["width"]),
                 "mask": encode_png(row["mask"]), "repair": str(row["repair"])}
        if self.probabilities:
            entry["probs"] = row["probs"]
        self.rows.append(entry)
        if len(self.rows) == self.ROWS_PER_GROUP:
            self._flush()

    def close(self) -> None:
        self._flush()
        if self.writer is not None:
            self.writer.close()

    def _flush(self) -> None:
        if not self.rows:
            return
        from ray.data.extensions import ArrowTensorArray

        columns = {key: [r[key] for r in self.rows] for key in self.rows[0]}
        if self.probabilities:  # a tensor column Ray Data and pandas read back as arrays
            columns["probs"] = ArrowTensorArray.from_numpy(np.stack(columns["probs"]))
        table = pa.table({**columns, "mask": pa.array(columns["mask"], pa.binary())})
        if self.writer is None:
            filesystem, path = storage.filesystem(storage.join(self.output, self.name))
            if filesystem is None:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(path, table.schema, filesystem=filesystem)
        self.writer.write_table(table)
        self.rows = []


def put_bytes(output: Location, name: str, data: bytes) -> None:
    """Write ``data`` as ``output/name`` (``name`` may hold non-UTF-8 bytes as surrogates: kept in a local file
    name, written ``\\xNN`` in a URI), creating folders."""
    if storage.is_uri(output):
        filesystem, path = storage.filesystem(storage.join(output, display_name(name)))
        with filesystem.open_output_stream(path) as stream:
            stream.write(data)
        return
    path = Path(output, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _rows(blocks: Iterable[Block]) -> Iterator[dict]:
    for block in blocks:
        batch = BlockAccessor.for_block(block).to_batch_format("numpy")
        for index in range(len(batch["key"])):
            yield {column: values[index] for column, values in batch.items()}

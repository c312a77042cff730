"""Where ``raypets predict`` finds its images, and reading one file without trusting it. No Ray here.

INPUT is a local folder (recursive), one image, a text or CSV list of paths or URIs, or an object-store prefix
(``s3://bucket/photos/``). The driver only lists names; each file is read where it is decoded (a Ray task on any
node), through :func:`read_source`, which refuses what must not be read: a dangling symlink, a FIFO or another
non-regular file (reading one would block), a file over the size limit (never read whole), an unreadable one.
Local file names need not be UTF-8: paths and names travel as bytes.
"""

from __future__ import annotations

import csv
import io
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import pyarrow.fs as pafs

from raypets import storage
from raypets.data.decode import IMAGE_SUFFIXES, DecodeError, any_failure_as_decode_error
from raypets.errors import UserError
from raypets.storage import Location

DEFAULT_MAX_FILE_MB = 512
T = TypeVar("T")
_LIST_COLUMNS = ("path", "uri", "file", "image")  # a CSV list's column of paths, by its header


@dataclass(frozen=True)
class Source:
    """One input file. ``root``: "" for a local file, else a URI without path (``s3://bucket?query``) whose
    filesystem holds it; ``path``: its path there; ``name``: its name in the outputs (relative to INPUT)."""

    root: str
    path: bytes
    name: bytes


@dataclass(frozen=True)
class Inputs:
    """The image files to predict, sorted by name, and how many other files were left out."""

    sources: list[Source]
    ignored: int  # hidden files and files without an image suffix


def display_name(name: bytes | str) -> str:
    """A name as UTF-8 text: each byte that is not UTF-8 written ``\\xNN`` (for Parquet, JSON and messages)."""
    raw = name if isinstance(name, bytes) else os.fsencode(name)
    return raw.decode("utf-8", "backslashreplace")


def list_inputs(source: Location, exclude: Path | None = None) -> Inputs:
    """The image files INPUT names, as :class:`Source` rows named relative to the folder or prefix (for a list:
    to the deepest folder holding every listed file). Hidden files and other suffixes are left out; ``exclude``
    (a local output folder inside INPUT) too."""
    if storage.is_uri(source):
        if storage.is_dir(source):
            return _keep_images(_prefix_files(source))
        if not storage.is_file(source):
            raise UserError(f"{source}: input does not exist")
        if PurePosixPath(urlsplit(source).path).suffix.lower() in IMAGE_SUFFIXES:
            return _keep_images(_common_root([_split_uri(source)]))
        return _keep_images(_listed(storage.read_text(source), source))
    source = Path(source)
    if not source.exists():
        raise UserError(f"{source}: input does not exist")
    if source.is_dir():
        root = source.resolve()
        files = [p for p in sorted(root.rglob("*")) if not p.is_dir()]
        if exclude is not None:
            files = [p for p in files if not p.is_relative_to(exclude.resolve())]
        return _keep_images([Source("", os.fsencode(p), os.fsencode(p.relative_to(root).as_posix())) for p in files])
    if source.suffix.lower() in IMAGE_SUFFIXES:
        return _keep_images(_common_root([("", str(source.resolve()))]))
    try:
        text = source.read_text()
    except (UnicodeDecodeError, OSError) as err:
        raise UserError(f"{source}: neither a folder, an image nor a text list of image paths ({err})") from None
    return _keep_images(_listed(text, source.resolve()))


def read_source(root: str, path: bytes, max_bytes: int) -> bytes:
    """The bytes of one input file; a :class:`DecodeError` with its reason for one that cannot or must not be
    read (never reading more than ``max_bytes`` + 1 bytes)."""
    if root:
        return _read_object(_filesystem(root), path.decode(), max_bytes)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise DecodeError("not a regular file", _kind(info.st_mode))
        _check_size(info.st_size, max_bytes)
        with open(path, "rb") as file:
            data = file.read(max_bytes + 1)
    except FileNotFoundError:
        if os.path.islink(path):
            raise DecodeError("dangling symlink", f"points to {display_name(os.readlink(path))}") from None
        raise DecodeError("file not found", "removed since it was listed") from None
    except PermissionError as err:
        raise DecodeError("permission denied", err.strerror or "") from None
    except OSError as err:
        raise DecodeError("unreadable file", err.strerror or str(err)) from None
    _check_size(len(data), max_bytes)
    return data


def read_and_decode(root: str, path: bytes, max_bytes: int, decode: Callable[[bytes], T]) -> T:
    """``decode`` of one file's bytes (:func:`read_source`); any failure a :class:`DecodeError` with its reason,
    a decoder's own unexpected exception included: one bad file must never cost the others."""
    with any_failure_as_decode_error():
        return decode(read_source(root, path, max_bytes))


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise DecodeError("file too large", f"{size:,} bytes, over the limit of {max_bytes:,} (--max-file-mb)")


def _kind(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device", stat.S_ISDIR: "a folder"}
    return next((name for test, name in kinds.items() if test(mode)), "not a plain file")


def _read_object(fs: pafs.FileSystem, path: str, max_bytes: int) -> bytes:
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise DecodeError("file not found", "removed since it was listed")
        if info.type != pafs.FileType.File:
            raise DecodeError("not a regular file", "a folder")
        _check_size(info.size, max_bytes)
        with fs.open_input_stream(path) as stream:
            data = stream.read(max_bytes + 1)
    except OSError as err:
        raise DecodeError("unreadable file", str(err).strip().splitlines()[0]) from None
    _check_size(len(data), max_bytes)
    return data


@lru_cache(maxsize=16)
def _filesystem(root: str) -> pafs.FileSystem:
    """The filesystem of a URI root, made once per process (an S3 client is not free)."""
    return storage.filesystem(root)[0]


@lru_cache(maxsize=16)
def _base(root: str) -> str:
    """A URI root's path on its filesystem (``s3://user:key@bucket?q`` -> ``bucket``)."""
    return storage.filesystem(root)[1]


def _root(uri: str) -> str:
    """A URI without its path: what names its filesystem (``s3://user:key@bucket?query``)."""
    scheme, netloc, _, query, _ = urlsplit(uri)
    return urlunsplit((scheme, netloc, "", query, ""))


def _split_uri(uri: str) -> tuple[str, str]:
    """A file's URI as (its root, its path on the root's filesystem)."""
    root = _root(uri)
    base, path = _base(root).rstrip("/"), unquote(urlsplit(uri).path).lstrip("/")
    return root, f"{base}/{path}" if base else f"/{path}"


def _prefix_files(prefix: str) -> list[Source]:
    """Every object under an object-store prefix, named relative to it."""
    root, base = _split_uri(prefix)
    base = base.rstrip("/")
    try:
        infos = _filesystem(root).get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as err:
        raise UserError(f"{prefix}: {str(err).strip().splitlines()[0]}") from None
    paths = sorted(info.path for info in infos if info.type == pafs.FileType.File)
    return [Source(root, p.encode(), p[len(base) + 1:].encode()) for p in paths]


def _listed(text: str, listing: Location) -> list[Source]:
    """The files a text list (one path or URI a line, ``#`` comments) or a CSV list names; relative entries are
    taken from the list's folder."""
    csv_list = PurePosixPath(urlsplit(str(listing)).path).suffix.lower() == ".csv"
    entries = _csv_entries(text) if csv_list else [
        line.strip() for line in text.splitlines() if line.strip()[:1] not in ("", "#")]
    uris = [entry if storage.is_uri(entry) else _beside(listing, entry) if storage.is_uri(listing) else None
            for entry in entries]
    _one_filesystem({_root(uri) if uri else "" for uri in uris})
    files = {_split_uri(uri) if uri else ("", str((Path(listing).parent / entry).resolve()))
             for entry, uri in zip(entries, uris, strict=True)}
    return _common_root(sorted(files))


def _one_filesystem(roots: set[str]) -> None:
    if len(roots) > 1:
        shown = ", ".join(sorted(r.split("?")[0] or "local files" for r in roots)[:3])
        raise UserError(f"an input list names files of {len(roots)} filesystems ({shown}); list one per run")


def _beside(uri: str, entry: str) -> str:
    """The URI of ``entry``, a path relative to the folder of the file at ``uri``."""
    scheme, netloc, path, query, _ = urlsplit(uri)
    return urlunsplit((scheme, netloc, f"{PurePosixPath(path).parent}/{entry}", query, ""))


def _csv_entries(text: str) -> list[str]:
    rows = [row for row in csv.reader(io.StringIO(text)) if row and row[0].strip()]
    if not rows:
        return []
    header = [cell.strip().lower() for cell in rows[0]]
    column = next((header.index(name) for name in _LIST_COLUMNS if name in header), None)
    if column is None:
        return [row[0].strip() for row in rows]
    return [row[column].strip() for row in rows[1:] if len(row) > column and row[column].strip()]


def _common_root(files: list[tuple[str, str]]) -> list[Source]:
    """Sources named relative to the deepest folder holding them all (of one filesystem)."""
    common = os.path.commonpath([str(PurePosixPath(path).parent) for _, path in files]) if files else ""
    return [Source(root, os.fsencode(path), os.fsencode(path[len(common):].lstrip("/"))) for root, path in files]


def _keep_images(sources: list[Source]) -> Inputs:
    images = [s for s in sources if PurePosixPath(os.fsdecode(s.name)).suffix.lower() in IMAGE_SUFFIXES
              and not any(part.startswith(".") for part in PurePosixPath(os.fsdecode(s.name)).parts)]
    return Inputs(sorted(images, key=lambda s: s.name), len(sources) - len(images))

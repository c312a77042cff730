"""Where raypets reads and writes: local paths and object-store URIs (``s3://``, ``gs://``, ...). No Ray here.

A location is a local ``Path`` or a URI string; every function here takes either. URIs go through
``pyarrow.fs.FileSystem.from_uri``, so endpoint and credentials are pyarrow's: the usual ``AWS_*`` variables (set
on every node, since Ray's workers read them there) or the URI itself, e.g.
``s3://KEY:SECRET@bucket/run?endpoint_override=HOST:PORT&scheme=http``, which travels to the workers with it.

Keys never leave the process that was given them: what raypets prints or saves of a location goes through
:func:`redact` (``s3://***@bucket/run?...``). A redacted URI still reads: with the credentials of the URI given at
the time of use when it names the same bucket (:func:`reuse_credentials`), else with the environment's.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from raypets.errors import UserError
from raypets.redaction import HIDDEN, redact

Location = str | Path  # a str is a URI when it has a scheme (``s3://...``), else a local path

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def reuse_credentials(stored: Location, given: Location) -> Location:
    """The URI ``stored`` (read back from a file, its keys hidden) with the keys of the URI ``given`` now, when
    both name the same bucket and ``stored`` holds no keys of its own; ``stored`` as it is otherwise."""
    if not (is_uri(stored) and is_uri(given)):
        return stored
    old, new = urlsplit(_without_hidden(stored)), urlsplit(given)
    if old.username or not new.username or (old.scheme, old.hostname) != (new.scheme, new.hostname):
        return stored
    return urlunsplit(old._replace(netloc=f"{new.netloc.rpartition('@')[0]}@{old.netloc}"))


def _without_hidden(uri: str) -> str:
    """A redacted URI as pyarrow takes it: without the user info (the environment's credentials apply)."""
    return uri.replace(f"://{HIDDEN}@", "://", 1)


def is_uri(location: Location) -> bool:
    """Whether ``location`` is a URI (``scheme://...``) rather than a local path."""
    return isinstance(location, str) and bool(_SCHEME.match(location))


def parse(text: str) -> Location:
    """A location from the command line: a URI stays a string, anything else becomes a ``Path``."""
    return text if is_uri(text) else Path(text)


def absolute(location: Location) -> Location:
    """A URI as it is, a local path resolved (Ray runs its workers in other folders)."""
    return location if is_uri(location) else Path(location).resolve()


def join(location: Location, *parts: str) -> Location:
    """``location/part/...``: a ``Path`` for a local path, a URI (query kept at the end) for a URI."""
    if not is_uri(location):
        return Path(location, *parts)
    scheme, netloc, path, query, fragment = urlsplit(location)
    return urlunsplit((scheme, netloc, "/".join([path.rstrip("/"), *parts]), query, fragment))


def filesystem(location: Location) -> tuple[pafs.FileSystem | None, str]:
    """What Ray takes as ``storage_filesystem``/``filesystem`` and its path: ``(None, path)`` for a local path
    (Ray's default), the URI's pyarrow filesystem and bucket path otherwise."""
    if not is_uri(location):
        return None, str(location)
    with _errors(location):
        return pafs.FileSystem.from_uri(_without_hidden(location))


def check_bucket(location: Location) -> None:
    """One clear error, before any work is done for it, when the URI ``location`` is in a bucket that is not there."""
    if not is_uri(location):
        return
    fs, path = filesystem(location)
    bucket = PurePosixPath(path).parts[0]
    with _errors(location):
        missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
    if missing:
        raise UserError(f"{location}: bucket {bucket} does not exist (or these credentials do not see it)")


def exists(location: Location) -> bool:
    return _type(location) != pafs.FileType.NotFound


def is_file(location: Location) -> bool:
    return _type(location) == pafs.FileType.File


def is_dir(location: Location) -> bool:
    """A folder; on an object store, a prefix that holds objects."""
    return _type(location) == pafs.FileType.Directory


def entries(location: Location) -> set[str]:
    """Names directly inside the folder ``location``; none when it does not exist."""
    fs, path = _open(location)
    with _errors(location):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return {PurePosixPath(info.path).name for info in infos}


def read_text(location: Location) -> str:
    fs, path = _open(location)
    with _errors(location), fs.open_input_stream(path) as stream:
        return stream.read().decode()


def read_json(location: Location, what: str = "file"):
    """The JSON document at ``location``; one UserError naming it when it is missing or not JSON."""
    try:
        text = read_text(location)
    except UserError:
        if not exists(location):
            raise UserError(f"{location}: {what} does not exist") from None
        raise
    try:
        return json.loads(text)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise UserError(f"{location}: not valid JSON ({err})") from None


def require_file(path: Path | None) -> None:
    """One clear error when a file a setting names is not there (None: nothing named)."""
    if path is not None and not Path(path).is_file():
        raise UserError(f"{path}: file does not exist")


def write_text(location: Location, text: str) -> None:
    """Write a small text file, creating its folder."""
    fs, path = _open(location)
    with _errors(location):
        fs.create_dir(str(PurePosixPath(path).parent))
        with fs.open_output_stream(path) as stream:
            stream.write(text.encode())


def upload(local: Path, location: Location) -> None:
    """Copy the local file or folder ``local`` to ``location`` (a folder's files keep their relative paths)."""
    fs, path = _open(location)
    with _errors(location):
        fs.create_dir(path if local.is_dir() else str(PurePosixPath(path).parent))
        # One thread: pyarrow's threaded uploads to S3 can hang (apache/arrow#32372; Ray Train does the same).
        pafs.copy_files(str(local.resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs, use_threads=False)


def download(location: Location, local: Path) -> Path:
    """Copy the file or folder at ``location`` into the local folder ``local``; the copy's path."""
    fs, path = _open(location)
    target = local / PurePosixPath(path).name if is_file(location) else local
    local.mkdir(parents=True, exist_ok=True)
    with _errors(location):
        pafs.copy_files(path, str(target.resolve()), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
    return target


def cached(location: Location) -> Path:
    """A local copy of the file or folder at ``location``, shared by every process that reads the same content.

    The cache entry is named by the location and what is there (names, sizes, modification times): a changed
    checkpoint gets a new entry, an unchanged one is not downloaded again. An entry is filled in a folder of its own
    and moved into place in one step, so two runs reading the same location never see each other's half-written
    copy; beyond ``CACHE_BYTES`` the least recently used entries are removed.
    """
    root = Path(tempfile.gettempdir(), "raypets-cache")
    root.mkdir(parents=True, exist_ok=True)
    files = _listing(location)
    key = hashlib.sha256(json.dumps([redact(str(location)), files]).encode()).hexdigest()[:24]
    entry = root / key
    if not entry.exists():
        fill = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            download(location, fill / "copy")
            with suppress(OSError):  # another process filled the same entry first: use theirs
                (fill / "copy").rename(entry)
        finally:
            shutil.rmtree(fill, ignore_errors=True)
    entry.touch()  # the least recently used entries go first
    _trim_cache(root, keep=entry)
    single = len(files) == 1 and files[0][0] == _open(location)[1]
    return entry / PurePosixPath(files[0][0]).name if single else entry


CACHE_BYTES = 4 * 2**30  # the downloaded-checkpoint cache keeps at most this much beside the entry in use


def _listing(location: Location) -> list:
    """(path, size, modification time) of the file, or of every file under the folder, at ``location``."""
    fs, path = _open(location)
    with _errors(location):
        info = fs.get_file_info(path)
        infos = [info] if info.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted((i.path, i.size, str(i.mtime)) for i in infos if i.type == pafs.FileType.File)


def _trim_cache(root: Path, keep: Path) -> None:
    entries = sorted((e for e in root.iterdir() if not e.name.startswith(".")), key=lambda e: e.stat().st_mtime)
    sizes = {e: sum(f.stat().st_size for f in e.rglob("*") if f.is_file()) for e in entries}
    total = sum(sizes.values())
    for entry in entries:
        if total <= CACHE_BYTES:
            break
        if entry != keep:
            shutil.rmtree(entry, ignore_errors=True)
            total -= sizes[entry]


def beside(location: Location, name: str) -> Location:
    """The location ``name`` in the folder that holds ``location`` (a URI keeps its query)."""
    if not is_uri(location):
        return Path(location).parent / name
    parts = urlsplit(location)
    if not parts.path.strip("/"):
        raise UserError(f"{location}: name a folder in the bucket, not the bucket itself")
    return urlunsplit(parts._replace(path=str(PurePosixPath(parts.path.rstrip("/")).parent / name)))


def replace_folder(source: str, target: str, *, last: str) -> None:
    """Put the folder at the URI ``source`` in place of the one at ``target`` (the same store): ``target``'s file
    ``last`` is deleted first, then the rest of it; ``source``'s files are copied in by the store, ``last`` last.
    A reader that trusts ``target`` only while it holds ``last`` never takes a mix of both for complete."""
    fs, src = _open(source)
    _, dst = _open(target)
    with _errors(target):
        if fs.get_file_info(f"{dst}/{last}").type == pafs.FileType.File:
            fs.delete_file(f"{dst}/{last}")
        fs.delete_dir_contents(dst, missing_dir_ok=True)
        infos = fs.get_file_info(pafs.FileSelector(src, recursive=True))
        files = sorted((i.path for i in infos if i.type == pafs.FileType.File), key=lambda p: p == f"{src}/{last}")
        for path in files:
            fs.copy_file(path, dst + path[len(src):])


def remove(location: Location) -> None:
    """Delete the folder ``location`` and everything in it; nothing when it is not there."""
    if not is_uri(location):
        shutil.rmtree(location, ignore_errors=True)
        return
    fs, path = _open(location)
    with _errors(location):
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)


def _open(location: Location) -> tuple[pafs.FileSystem, str]:
    fs, path = filesystem(location)
    return (fs, path) if fs is not None else (pafs.LocalFileSystem(), str(Path(path).absolute()))


def _type(location: Location) -> pafs.FileType:
    fs, path = _open(location)
    with _errors(location):
        return fs.get_file_info(path).type


@contextmanager
def _errors(location: Location) -> Iterator[None]:
    """pyarrow's errors (no such bucket, access denied, a bad URI) as one UserError naming ``location``."""
    try:
        yield
    except (OSError, ValueError) as err:  # pyarrow.ArrowInvalid is a ValueError
        raise UserError(f"{location}: {str(err).strip().splitlines()[0]}") from None

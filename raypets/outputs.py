"""Where a stage writes its output: refused when it would replace what a user did not ask to replace, and built
where no reader sees it half-written. The one home of both policies. No Ray here."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from raypets import storage
from raypets.errors import UserError
from raypets.storage import Location


def check_output_folder(path: Location, what: str, *, ours: frozenset[str] = frozenset(), overwrite: bool = False,
                        flag: str | None = "--overwrite") -> None:
    """Refuse a non-empty ``path`` (a folder or a URI) unless ``overwrite`` and it holds only ``ours``, the entries
    an earlier run of the same stage writes. ``flag``: the option that allows it (None: nothing does)."""
    storage.check_bucket(path)
    if storage.is_file(path):
        raise UserError(f"{path}: exists and is not a folder")
    entries = storage.entries(path)
    if not entries:
        return
    if not overwrite:
        allow = f"pass {flag} to replace the {what} there" if flag else f"choose another folder for the {what}"
        raise UserError(f"{path}: exists and is not empty; {allow}")
    strangers = sorted(entries - ours)
    if strangers:
        raise UserError(f"{path}: {flag} only replaces a {what} ({', '.join(sorted(ours))}); "
                        f"it also holds {', '.join(strangers[:5])}, so it is left alone")


def check_output_file(path: Path, overwrite: bool, flag: str = "--out") -> None:
    """Refuse an existing file at ``path`` unless ``overwrite``."""
    if path.exists() and not overwrite:
        raise UserError(f"{path}: exists; pass --overwrite to replace it or choose another {flag}")


@contextmanager
def staged_output(target: Location, *, local: bool = False) -> Iterator[Location]:
    """Yield the folder to build the output ``target`` in; put it in place when the block ends without error.

    A local ``target`` is built in a hidden ``.NAME.partial`` folder beside it and renamed into place, replacing
    an earlier output there (which :func:`check_output_folder` allowed). A URI ``target`` (an object store cannot
    rename) is written in place once its old contents are removed, or, with ``local`` (writers that need local
    files, like h5py), built in a local temp folder and uploaded at the end.
    """
    if storage.is_uri(target) and not local:
        storage.remove_contents(target)
        yield target
        return
    if storage.is_uri(target):
        folder = Path(tempfile.mkdtemp(prefix="raypets-output-"))
    else:
        folder = target.parent / f".{target.name}.partial"
        shutil.rmtree(folder, ignore_errors=True)  # a stale one of a run that died
        folder.mkdir(parents=True)
    try:
        yield folder
        if storage.is_uri(target):
            storage.remove_contents(target)
            storage.upload(folder, target)
        else:
            if target.exists():
                shutil.rmtree(target)
            folder.rename(target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

"""Where a stage writes its output: refused when it would replace what a user did not ask to replace, and built
where no reader sees it half-written. The one home of both policies. No Ray here."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from raypets import storage
from raypets.errors import UserError
from raypets.storage import Location

DONE = "_SUCCESS"  # the marker of an output that has no file of its own to say it is complete


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
def staged_output(target: Location, *, marker: str | None = None) -> Iterator[Location]:
    """Yield the folder to build the output ``target`` in, ``.NAME.partial`` beside it; put it in place when the
    block ends without error. An earlier output there (which :func:`check_output_folder` allowed) stays as it was
    until then; a failed run leaves it, and removes its own partial one.

    ``marker``: the file the block writes last to say the output is complete, which its readers require. A local
    folder is renamed into place. At a URI (an object store cannot rename) the store copies the files into place,
    the old output's ``marker`` removed first and the new one's copied last.
    """
    name = target.name if isinstance(target, Path) else PurePosixPath(storage.filesystem(target)[1]).name
    partial = storage.beside(target, f".{name}.partial")
    storage.remove(partial)  # a stale one of a run that died
    if isinstance(partial, Path):
        partial.mkdir(parents=True)
    try:
        yield partial
        if storage.is_uri(target):
            storage.replace_folder(partial, target, last=marker or DONE)
        else:
            if target.exists():
                shutil.rmtree(target)
            partial.rename(target)
    finally:
        storage.remove(partial)

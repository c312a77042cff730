"""Fetch the Oxford-IIIT Pet archives with torchvision's download code and md5s, and unpack them for ``prepare``.

Each archive is fetched to ``NAME.part``, checked against its md5 and only then named ``NAME``; a mismatch deletes
it. Nothing already in the folder is replaced: an archive that matches its md5 is used without fetching it again,
one that does not is an error, and a folder an archive would unpack to is kept as it is.
"""

from __future__ import annotations

import re
import shutil
import tarfile
import tempfile
import urllib.error
from pathlib import Path

from torchvision.datasets import OxfordIIITPet
from torchvision.datasets.utils import calculate_md5, download_url, extract_archive

from raypets.errors import UserError

# torchvision's (file name, md5) of the official archives, and the folder they are served from.
RESOURCES: tuple[tuple[str, str], ...] = tuple((url.rsplit("/", 1)[1], md5) for url, md5 in OxfordIIITPet._RESOURCES)
BASE_URL = OxfordIIITPet._RESOURCES[0][0].rsplit("/", 1)[0] + "/"


def with_md5(overrides: list[str]) -> tuple[tuple[str, str], ...]:
    """``RESOURCES`` with the md5s given as ``NAME=HEX`` (a mirror serving other archives) instead of torchvision's."""
    md5s = dict(RESOURCES)
    for item in overrides:
        name, _, digest = item.partition("=")
        if name not in md5s:
            raise UserError(f"--md5 {item}: unknown archive {name!r}; choose {', '.join(md5s)}")
        if not re.fullmatch(r"[0-9a-fA-F]{32}", digest):
            raise UserError(f"--md5 {item}: expected NAME=<32 hex digits>")
        md5s[name] = digest.lower()
    return tuple(md5s.items())


def download(dest: Path, base_url: str = BASE_URL, resources: tuple[tuple[str, str], ...] = RESOURCES) -> None:
    """Fetch each ``(name, md5)`` of ``resources`` from ``base_url`` and unpack it into ``dest``, printing each step."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, md5 in resources:
        folder = dest / name.split(".", 1)[0]  # images.tar.gz unpacks to images/
        if folder.exists():
            print(f"kept {folder} as it is (remove it to unpack {name} again)")
            continue
        archive = dest / name
        if archive.exists():
            actual = calculate_md5(archive)
            if actual != md5:
                raise UserError(f"{archive} is there but does not match: md5 {actual}, expected {md5}; "
                                "move it away to fetch it again")
            print(f"using {archive} (md5 verified)")
        else:
            _fetch(f"{base_url.rstrip('/')}/{name}", archive, md5)
        _unpack(archive, dest)


def _fetch(url: str, archive: Path, md5: str) -> None:
    """Download ``url`` to ``archive.part``, which becomes ``archive`` only once its md5 matches."""
    part = archive.with_name(archive.name + ".part")
    part.unlink(missing_ok=True)  # torchvision would take any file already there for the download
    print(f"fetching {url}", flush=True)
    try:
        download_url(url, str(part.parent), part.name)
        actual = calculate_md5(part)
    except (urllib.error.URLError, OSError) as err:
        part.unlink(missing_ok=True)
        raise UserError(f"{url}: download failed: {err}") from None
    if actual != md5:
        part.unlink()
        raise UserError(f"{archive.name} from {url} is corrupt: md5 {actual}, expected {md5}; deleted it")
    part.rename(archive)
    print(f"fetched {archive} (md5 verified)")


def _unpack(archive: Path, dest: Path) -> None:
    """Extract ``archive`` into a hidden folder of ``dest``, then move each top-level entry up unless one is there."""
    staging = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", dir=dest))
    try:
        try:
            extract_archive(str(archive), str(staging))
        except (tarfile.TarError, OSError, EOFError) as err:
            raise UserError(f"{archive}: cannot unpack: {err}") from None
        for entry in sorted(staging.iterdir()):
            target = dest / entry.name
            if target.exists():
                print(f"kept {target} as it is; {archive.name} has one too")
            else:
                entry.rename(target)
                print(f"unpacked {target}")
    finally:
        shutil.rmtree(staging)

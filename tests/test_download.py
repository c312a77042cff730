"""raypets download against a loopback HTTP server serving small archives in the official format."""

from __future__ import annotations

import functools
import hashlib
import shutil
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from helpers import save_image

from raypets.cli import main
from raypets.data.layouts import detect_layout, discover, official_split

NAMES = {"Abyssinian_1": "trainval", "Bengal_2": "test", "beagle_3": "trainval"}


def _archives(root: Path) -> dict[str, str]:
    """images.tar.gz and annotations.tar.gz in ``root/served``, as the official ones are built; name -> md5."""
    tree = root / "tree"
    rng = np.random.default_rng(0)
    for stem in NAMES:
        save_image(tree / "images" / f"{stem}.jpg", rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
        save_image(tree / "annotations" / "trimaps" / f"{stem}.png", rng.integers(1, 4, (12, 16), dtype=np.uint8))
    rows = {stem: f"{stem} 1 {1 if stem[0].isupper() else 2} 1" for stem in NAMES}
    (tree / "annotations" / "list.txt").write_text("#Image CLASS-ID SPECIES BREED ID\n" + "\n".join(rows.values()))
    for split in ("trainval", "test"):
        lines = [row for stem, row in rows.items() if NAMES[stem] == split]
        (tree / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    served = root / "served"
    served.mkdir()
    md5s = {}
    for folder in ("images", "annotations"):
        with tarfile.open(served / f"{folder}.tar.gz", "w:gz") as tar:
            tar.add(tree / folder, arcname=folder)
        md5s[f"{folder}.tar.gz"] = hashlib.md5((served / f"{folder}.tar.gz").read_bytes()).hexdigest()
    return md5s


@pytest.fixture()
def server(tmp_path):
    """(base URL, served folder, md5 flags, paths requested) of a loopback server of the test archives."""
    md5s = _archives(tmp_path)
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path / "served")))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    flags = [arg for name, md5 in md5s.items() for arg in ("--md5", f"{name}={md5}")]
    yield f"http://127.0.0.1:{httpd.server_port}/", tmp_path / "served", flags, requests
    httpd.shutdown()
    httpd.server_close()


def test_download_unpacks_what_prepare_reads_and_fetches_once(tmp_path, server, capsys):
    url, _, md5_flags, requests = server
    dest = tmp_path / "pets"
    assert main(["download", str(dest), "--base-url", url, *md5_flags]) == 0
    assert f"raypets prepare {dest} data/shards" in capsys.readouterr().out
    assert detect_layout(dest) == "oxford"
    found = discover(dest)
    assert sorted(p.image for p in found.pairs) == [f"images/{stem}.jpg" for stem in sorted(NAMES)]
    assert not found.skipped
    assert official_split(dest) == {stem: "train" if s == "trainval" else "test" for stem, s in NAMES.items()}
    assert sorted(p.name for p in dest.iterdir()) == ["annotations", "annotations.tar.gz", "images", "images.tar.gz"]
    fetched = len(requests)
    assert {"/images.tar.gz", "/annotations.tar.gz"} <= set(requests)

    assert main(["download", str(dest), "--base-url", url, *md5_flags]) == 0  # all there: nothing to do
    assert "kept" in capsys.readouterr().out
    shutil.rmtree(dest / "images")
    shutil.rmtree(dest / "annotations")
    assert main(["download", str(dest), "--base-url", url, *md5_flags]) == 0  # verified archives unpacked again
    assert "md5 verified" in capsys.readouterr().out
    assert len(requests) == fetched
    assert detect_layout(dest) == "oxford" and len(discover(dest).pairs) == len(NAMES)


def test_corrupt_download_is_one_error_and_leaves_no_archive(tmp_path, server, capsys):
    url, served, md5_flags, _ = server
    expected = md5_flags[1].split("=")[1]  # images.tar.gz's
    (served / "images.tar.gz").write_bytes(b"not the archive")
    dest = tmp_path / "pets"
    assert main(["download", str(dest), "--base-url", url, *md5_flags]) == 2
    err = capsys.readouterr().err
    assert "images.tar.gz" in err and expected in err and hashlib.md5(b"not the archive").hexdigest() in err
    assert list(dest.iterdir()) == []


def test_archive_already_there_is_never_overwritten(tmp_path, server, capsys):
    url, _, md5_flags, requests = server
    dest = tmp_path / "pets"
    dest.mkdir()
    (dest / "images.tar.gz").write_bytes(b"mine")
    assert main(["download", str(dest), "--base-url", url, *md5_flags]) == 2
    assert "move it away" in capsys.readouterr().err
    assert (dest / "images.tar.gz").read_bytes() == b"mine" and requests == []


@pytest.mark.parametrize("flag", ["other.tar.gz=" + "0" * 32, "images.tar.gz=123"])
def test_bad_md5_flag_is_a_user_error(tmp_path, flag, capsys):
    assert main(["download", str(tmp_path), "--md5", flag]) == 2
    assert flag in capsys.readouterr().err

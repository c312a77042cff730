"""Keys typed into a URI are hidden from what is printed or saved, and a saved URI still reads."""

from __future__ import annotations

from helpers import ray_checkpoint_folder

from raypets import storage
from raypets.checkpoints import load_state
from raypets.errors import UserError
from raypets.redaction import redact

URI = "s3://AKID:s3cr3t@pets/run?endpoint_override=127.0.0.1:9000&scheme=http"
SHOWN = "s3://***@pets/run?endpoint_override=127.0.0.1:9000&scheme=http"


def test_keys_are_hidden_in_strings_settings_and_messages():
    assert redact(URI) == SHOWN
    assert redact({"data": URI, "sizes": [URI, 3], "pair": ("gs://k:s@b/x", None)}) == {
        "data": SHOWN, "sizes": [SHOWN, 3], "pair": ("gs://***@b/x", None)}
    assert redact("s3://pets/run?endpoint_override=h:1") == "s3://pets/run?endpoint_override=h:1"  # nothing to hide
    assert str(UserError(f"{URI}: access denied")) == f"{SHOWN}: access denied"
    assert redact(f"read {URI}, then s3://k:s@other/x") == f"read {SHOWN}, then s3://***@other/x"


def test_a_saved_uri_reads_with_the_keys_given_for_the_same_bucket():
    saved = redact(storage.join(URI, "trials", "t1"))
    assert storage.reuse_credentials(saved, URI) == storage.join(URI, "trials", "t1")
    assert storage.reuse_credentials(saved, URI.replace("@pets/", "@other/")) == saved  # another bucket: not its keys
    assert storage.reuse_credentials("s3://mine:keys@pets/x", URI) == "s3://mine:keys@pets/x"  # its own keys stay
    assert storage.reuse_credentials(saved, "/local/run") == saved


def test_a_uri_with_hidden_keys_opens_with_the_environments_keys(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    fs, path = storage.filesystem(SHOWN)
    keys = fs.__reduce__()[1][0]  # what pyarrow would use: the environment's (no key of its own), not "***"
    assert path == "pets/run" and keys["access_key"] is None and keys["endpoint_override"] == "127.0.0.1:9000"


def test_a_checkpoint_keeps_its_runs_settings_without_the_keys(tmp_path):
    ray_checkpoint_folder(tmp_path, epoch=1, seed=0, config={"data": URI, "lr": 1e-3})
    assert load_state(tmp_path)["config"] == {"data": SHOWN, "lr": 1e-3}

"""Object-store URIs: :mod:`raypets.storage`, then prepare, tune (each trial a train run) and predict against a
real S3 server (moto).

The URIs carry the endpoint and credentials (``s3://KEY:SECRET@bucket/key?endpoint_override=...&scheme=http``):
Ray's workers were started before this server, without its environment, and still reach it that way.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import h5py
import pyarrow.fs as pafs
import pytest
from helpers import free_ports, ray_checkpoint_folder, tensorboard_events

from raypets import storage, tracking
from raypets.checkpoints import RAY_RUN_NAME, load_model, resolve_checkpoint
from raypets.cli import main
from raypets.errors import UserError
from raypets.outputs import check_output_folder
from raypets.redaction import redact
from raypets.runlog import TRAIN_HEADER, RunLog, read_metrics
from raypets.stages.prepare import PREPARED_ENTRIES

BUCKET = "pets"
KEY, SECRET = "AKIARAYPETSTESTKEY", "raypets-s3cret-do-not-leak"  # moto takes any keys


class Bucket:
    """A bucket of the moto server at ``endpoint``; :meth:`uri` names a key in it, the keys in the URI."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def uri(self, key: str) -> str:
        return f"s3://{KEY}:{SECRET}@{BUCKET}/{key}?endpoint_override={self.endpoint}&scheme=http"

    def objects(self) -> dict[str, bytes]:
        """Every object in the bucket by its key."""
        fs, _ = storage.filesystem(self.uri(""))
        infos = fs.get_file_info(pafs.FileSelector(BUCKET, recursive=True))
        return {info.path: fs.open_input_stream(info.path).read() for info in infos
                if info.type == pafs.FileType.File}


@pytest.fixture(scope="module")
def bucket():
    from moto.server import ThreadedMotoServer

    (port,) = free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    bucket = Bucket(f"127.0.0.1:{port}")
    fs, _ = pafs.FileSystem.from_uri(bucket.uri("") + "&allow_bucket_creation=true")
    fs.create_dir(BUCKET)
    yield bucket
    server.stop()


def test_join_keeps_the_query_and_local_paths_stay_paths(tmp_path):
    assert storage.join("s3://b/runs?endpoint_override=h:1", "first", "metrics.jsonl") == \
        "s3://b/runs/first/metrics.jsonl?endpoint_override=h:1"
    assert storage.join(tmp_path, "a") == tmp_path / "a"
    assert storage.parse("gs://b/x") == "gs://b/x" and storage.parse("runs/first") == Path("runs/first")
    assert not storage.is_uri(Path("s3:/b")) and storage.absolute("s3://b/x") == "s3://b/x"


def test_text_files_folders_and_their_copies_round_trip(bucket, tmp_path):
    folder = bucket.uri("round/trip")
    storage.write_text(storage.join(folder, "a.txt"), "hello\n")
    assert storage.read_text(storage.join(folder, "a.txt")) == "hello\n"
    assert storage.is_file(storage.join(folder, "a.txt")) and storage.is_dir(folder)
    assert not storage.exists(storage.join(folder, "missing.txt"))
    (tmp_path / "up" / "sub").mkdir(parents=True)
    (tmp_path / "up" / "sub" / "b.bin").write_bytes(b"\x00\x01")
    storage.upload(tmp_path / "up", folder)
    assert storage.entries(folder) == {"a.txt", "sub"}
    copy = storage.cached(folder)
    assert (copy / "a.txt").read_text() == "hello\n" and (copy / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    mtime = (copy / "a.txt").stat().st_mtime_ns
    assert storage.cached(storage.join(folder, "a.txt")).read_text() == "hello\n"
    assert storage.cached(folder) == copy and (copy / "a.txt").stat().st_mtime_ns == mtime  # unchanged: kept
    storage.remove(folder)
    storage.write_text(storage.join(folder, "c.txt"), "c")
    assert [p.name for p in storage.cached(folder).iterdir()] == ["c.txt"]  # a fresh copy: nothing stale
    assert not [p for p in copy.parent.iterdir() if p.name.startswith(".")]  # no half-filled entry left


def test_the_environment_configures_plain_uris(bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{bucket.endpoint}")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    storage.write_text(f"s3://{BUCKET}/env/plain.txt", "plain")
    assert storage.read_text(bucket.uri("env/plain.txt")) == "plain"


def test_errors_name_the_uri_without_its_keys(bucket):
    missing = bucket.uri("no/such/file.txt")
    with pytest.raises(UserError, match=r"^s3://\*\*\*@pets/no/such/file\.txt\?endpoint_override=.*: "):
        storage.read_text(missing)
    with pytest.raises(UserError, match="^nosuch://b/x: "):
        storage.exists("nosuch://b/x")


def test_an_output_uri_that_holds_something_is_refused(bucket):
    out = bucket.uri("refuse/shards")
    check_output_folder(out, "prepared dataset", ours=PREPARED_ENTRIES)  # nothing there yet
    storage.write_text(storage.join(out, "notes.txt"), "mine")
    with pytest.raises(UserError, match="exists and is not empty; pass --overwrite"):
        check_output_folder(out, "prepared dataset", ours=PREPARED_ENTRIES)
    with pytest.raises(UserError, match="it also holds notes.txt, so it is left alone"):
        check_output_folder(out, "prepared dataset", ours=PREPARED_ENTRIES, overwrite=True)
    elsewhere = out.replace(f"@{BUCKET}/", "@no-such-bucket/")
    with pytest.raises(UserError, match=f"^{re.escape(redact(elsewhere))}: bucket no-such-bucket does not exist"):
        check_output_folder(elsewhere, "prepared dataset", ours=PREPARED_ENTRIES)


def test_the_run_log_at_a_uri_is_uploaded_each_epoch_and_trimmed_on_resume(bucket):
    run = bucket.uri("log/run")
    log = RunLog(run, "raypets")
    log.start(last_epoch=0)
    for epoch in (1, 2):
        log.batches(epoch, [(0.5, 0.9, 1.0, 1e-3)])
        log.epoch({"epoch": epoch, "test_loss": 0.8, "pixel_accuracy": 0.5, "mean_iou": 0.3, "mean_dice": 0.4})
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2]
    log.close()
    assert not log.metrics.parent.exists()  # the local copy is gone, the logs stay at the URI
    RunLog(run, "raypets").start(last_epoch=1)  # resumed from epoch 1's checkpoint, on another node
    assert [m["epoch"] for m in read_metrics(run)] == [1]
    assert storage.read_text(storage.join(run, "raypets_train.txt")).splitlines() == \
        [TRAIN_HEADER, "1 1 0.500 0.900000 1.000000 0.001"]


def test_tracking_a_run_at_a_uri_uploads_its_event_files_and_keeps_its_mlflow_run_id_there(bucket, tmp_path,
                                                                                            monkeypatch):
    run = bucket.uri("tracked/run")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # a run at a URI needs a store
    target = tracking.mlflow_target(run)
    names = ["tensorboard", "mlflow"]
    started = tracking.start(names, run, {"data": bucket.uri("shards")}, resume=False, mlflow=target)
    with tracking.open_trackers(names, run, started, last_epoch=0) as trackers:
        trackers.epoch({"epoch": 1, "mean_dice": 0.4, "collapsed": ""})
    assert tracking.start(names, run, {}, resume=True, mlflow=target)["mlflow"] == started["mlflow"]
    objects = bucket.objects()
    (events,) = [key for key in objects if key.startswith(f"{BUCKET}/tracked/run/tensorboard/events.out.tfevents.")]
    Path(tmp_path, Path(events).name).write_bytes(objects[events])
    assert tensorboard_events(tmp_path)["mean_dice"] == [(1, pytest.approx(0.4))]
    assert not any(KEY.encode() in data or SECRET.encode() in data for data in objects.values())


def test_a_run_at_a_uri_resolves_to_its_best_checkpoint(bucket, tmp_path):
    run = tmp_path / "run"
    states = {epoch: ray_checkpoint_folder(run / RAY_RUN_NAME / f"checkpoint_00000{epoch}", epoch, seed=epoch)
              for epoch in (1, 2)}
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "mean_dice": d}) + "\n"
                                               for e, d in ((1, 0.7), (2, 0.5))))
    uri = bucket.uri("resolve/run")
    storage.upload(run, uri)
    checkpoint = resolve_checkpoint(uri)
    assert checkpoint.epoch == 1
    assert checkpoint.uri == storage.join(uri, RAY_RUN_NAME, "checkpoint_000001", "model_checkpoint_1.pt")
    weights = load_model(checkpoint).state_dict()
    assert all(weights[k].equal(v) for k, v in states[1].items())
    with pytest.raises(UserError, match="checkpoint does not exist"):
        resolve_checkpoint(bucket.uri("resolve/none"))


def test_a_missing_data_uri_and_local_only_arguments_are_one_clear_message(bucket, tmp_path, capsys):
    missing = redact(bucket.uri("nothing/here"))  # what the messages show of the URI given
    assert main(["train", "--data", bucket.uri("nothing/here"), "--run-dir", bucket.uri("nothing/run")]) == 2
    assert f"raypets: error: {missing}: prepared data folder does not exist" in capsys.readouterr().err
    assert main(["tune", "--data", bucket.uri("nothing/here"), "--space", "tune_configs/lr_sweep.yaml",
                 "--run-dir", str(tmp_path)]) == 2
    assert f"raypets: error: {missing}: prepared data folder does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", bucket.uri("nothing/here"), str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert f"argument src: {missing}: takes a local path, not a URI" in capsys.readouterr().err


def test_a_failed_overwrite_at_a_uri_leaves_the_earlier_output_as_it_was(bucket, tmp_path, ray_local):
    raw, shards = tmp_path / "raw", bucket.uri("kept/shards")
    assert main(["synth", str(raw), "--n", "8", "--size", "64x48"]) == 0
    assert main(["prepare", str(raw), shards, "--size", "32", "--no-progress"]) == 0
    before = {key: data for key, data in bucket.objects().items() if key.startswith(f"{BUCKET}/kept/")}
    image = sorted((raw / "images").iterdir())[0]
    image.write_bytes(image.read_bytes()[:64])  # found and paired, then it fails to decode: after the shards' writing
    assert main(["prepare", str(raw), shards, "--size", "32", "--overwrite", "--strict", "--no-progress"]) == 2
    after = {key: data for key, data in bucket.objects().items() if key.startswith(f"{BUCKET}/kept/")}
    assert after == before and f"{BUCKET}/kept/shards/manifest.json" in after  # no partial prefix left either


def test_every_stage_at_uris_with_keys_in_them_leaves_the_keys_nowhere(bucket, tmp_path, ray_local, capsys):
    """prepare, tune (its one trial a ``raypets train`` run in the bucket; resumed), train, predict and evaluate at
    URIs that carry the keys: the secret is in no console line, no local file and no object, and what was saved
    without it (best.json, run.json, sweep.json) still reads with the keys given at the time of use."""
    raw = tmp_path / "raw"
    shards, sweep, run, predicted = (bucket.uri(f"e2e/{name}") for name in ("shards", "sweep", "run", "predicted"))
    printed = []

    def run_ok(*argv: str, code: int = 0) -> None:
        assert main(list(argv)) == code
        printed.append("".join(capsys.readouterr()))

    run_ok("synth", str(raw), "--n", "16", "--size", "64x48")
    run_ok("prepare", str(raw), shards, "--size", "32", "--test-fraction", "0.25", "--no-progress")
    assert storage.entries(shards) == {"train", "test", "manifest.json"}

    space = tmp_path / "space.yaml"
    space.write_text("train: {epochs: 1, batch_size: 4, test_batch_size: 4, warmup_steps: 2}\n"
                     "space: {lr: {grid: [0.001]}}\n")
    tune = ["tune", "--data", shards, "--space", str(space), "--run-dir", sweep, "--no-progress"]
    run_ok(*tune)
    assert {"sweep.json", "tune", "trials", "trials.csv", "best.json", "mean_dice_vs_lr.png"} <= storage.entries(sweep)
    best = json.loads(storage.read_text(storage.join(sweep, "best.json")))
    trial = storage.join(sweep, "trials", best["trial_id"])
    assert best["run_dir"] == redact(trial) and best["config"]["data"] == redact(shards)
    assert {"raypets_train.txt", "raypets_test.txt", "metrics.jsonl", "loss.png", "dice.png", "checkpoints",
            RAY_RUN_NAME} <= storage.entries(trial)
    assert [m["epoch"] for m in read_metrics(trial)] == [1]
    checkpoint = f"{redact(trial).split('?')[0]}/{RAY_RUN_NAME}/checkpoint_"
    assert best["checkpoint"].startswith(checkpoint) and best["checkpoint"].endswith("?" + sweep.split("?")[1])
    assert f"checkpoint {checkpoint}" in printed[-1]
    table = storage.read_text(storage.join(sweep, "trials.csv"))
    run_ok(*tune, code=2)
    assert f"{redact(sweep)}: holds a sweep already; pass --resume" in printed[-1]
    run_ok("tune", "--run-dir", sweep, "--resume", "--no-progress")  # Tune's experiment and sweep.json read back
    assert storage.read_text(storage.join(sweep, "trials.csv")) == table

    run_ok("train", "--data", shards, "--run-dir", run, "--epochs", "1", "--workers", "1", "--batch-size", "4",
           "--test-batch-size", "4", "--warmup-steps", "2", "--no-progress")
    assert json.loads(storage.read_text(storage.join(run, "run.json")))["train"]["run_dir"] == redact(run)

    best_json = storage.join(sweep, "best.json")  # names its checkpoint without keys: read with best.json's
    predict = ["predict", "--checkpoint", best_json, str(raw / "images"), predicted, "--size", "32", "--cpu",
               "--workers", "1", "--no-progress"]
    run_ok(*predict)
    assert storage.entries(predicted) == {"output_1.h5", "predictions.h5", "errors.csv", "_SUCCESS"}
    assert not storage.exists(storage.beside(predicted, ".predicted.partial"))
    with h5py.File(storage.cached(predicted) / "predictions.h5") as h5:
        assert len(h5) == 16 and h5["Abyssinian_1.jpg"].shape == (3, 32, 32)
        assert h5.attrs["checkpoint"].startswith(checkpoint)
    run_ok(*predict, code=2)
    assert "exists and is not empty; pass --overwrite" in printed[-1]

    run_ok("evaluate", "--checkpoint", run, "--data", shards, "--out", str(tmp_path / "evaluate.json"), "--cpu")
    assert json.loads((tmp_path / "evaluate.json").read_text())["data"] == redact(shards)

    assert KEY in shards and not [text for text in printed if SECRET in text or KEY in text]
    local = [p for root in (tmp_path, Path(tempfile.gettempdir(), "raypets-cache")) for p in root.rglob("*")]
    assert not [str(p) for p in local if p.is_file() and holds_secret(p.read_bytes())]
    objects = bucket.objects()  # Tune's experiment state and tuner.pkl among them: pickles, kept as bytes or hex
    assert len(objects) > 20
    assert not [key for key, data in objects.items() if holds_secret(data)]


def holds_secret(data: bytes) -> bool:
    return SECRET.encode() in data or SECRET.encode().hex().encode() in data

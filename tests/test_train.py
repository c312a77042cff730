"""``raypets train`` on real Ray with 2 CPU workers and tiny synthetic shards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import prepared_shards, tensorboard_events, wait_for_every_cpu
from mlflow.tracking import MlflowClient
from ray.train.v2._internal.execution.callback import ReportCallback, WorkerGroupCallback

from raypets.cli import main
from raypets.config import TrainConfig
from raypets.errors import UserError
from raypets.metrics import ConfusionMatrix
from raypets.model import XceptionUNet, to_inputs
from raypets.precision import resolve_precision
from raypets.runlog import read_metrics
from raypets.stages.shards import load_split, read_manifest
from raypets.stages.train import load_datasets, train

FAST = {"workers": 2, "batch_size": 8, "test_batch_size": 8, "warmup_steps": 10, "seed": 0}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_local) -> Path:
    return prepared_shards(tmp_path_factory.mktemp("train"), n=64, size=(96, 80), seed=5)


def evaluate_plainly(weights: Path, shards: Path) -> dict:
    """Test metrics of a plain state_dict, without Ray: the reference for what training reported."""
    model = XceptionUNet()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    test = load_split(shards, "test")
    matrix = ConfusionMatrix()
    cfg = TrainConfig(data=shards, run_dir=shards)
    with torch.no_grad():
        logits = model(to_inputs(torch.from_numpy(test["image"]), cfg.normalize_mean, cfg.normalize_std))
    matrix.update(logits, torch.from_numpy(test["mask"]).long())
    return matrix.compute()


def test_training_learns_checkpoints_and_logs(shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --run-dir means the caller's folder, though the workers run elsewhere
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):  # MLflow's default: RUN/mlflow.db
        monkeypatch.delenv(name, raising=False)
    run = tmp_path / "run"
    final = train(TrainConfig(data=shards, run_dir=Path("run"), epochs=4, checkpoint_every=2, keep=1,
                              tracking=["tensorboard", "mlflow"], **FAST))
    history = read_metrics(run)
    assert [m["epoch"] for m in history] == [1, 2, 3, 4] and final["epoch"] == 4
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    test = load_split(shards, "test")["mask"]
    background = (test == 1).mean()
    constant_dice = 2 * background / (1 + background) / 3  # mean Dice of predicting background everywhere
    # Learned: 24 steps of 2 workers are not bit-reproducible and the last epoch may dip, so the best epoch is judged.
    best_dice = max(m["mean_dice"] for m in history)
    assert best_dice > constant_dice + 0.08, ([m["mean_dice"] for m in history], constant_dice)
    assert not final["collapsed"]

    plain = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert plain == ["model_checkpoint_2.pt", "model_checkpoint_4.pt"]
    dice = {m["epoch"]: m["mean_dice"] for m in history if m["epoch"] in (2, 4)}
    best = max(dice, key=dice.get)  # --keep 1: the best of the checkpointed epochs, and the latest to resume from
    kept = json.loads((run / "kept_checkpoints.json").read_text())
    assert {row["epoch"]: row["kept_as"] for row in kept} == (
        {4: ["best", "latest"]} if best == 4 else {2: ["best"], 4: ["latest"]})
    assert sorted(torch.load(p, weights_only=True)["epoch"] for p in (run / "ray_train").glob("*/train_state.pt")) \
        == sorted({best, 4})
    ray_copy = Path(final["model_checkpoint"])
    assert ray_copy.name == "model_checkpoint_4.pt" and ray_copy.parent.parent == run / "ray_train"
    a, b = XceptionUNet(), XceptionUNet()
    a.load_state_dict(torch.load(run / "checkpoints" / "model_checkpoint_4.pt", weights_only=True))
    b.load_state_dict(torch.load(ray_copy, weights_only=True))
    x = torch.rand(2, 3, 32, 32) * 255
    torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)
    again = evaluate_plainly(ray_copy, shards)  # the checkpoint is the model that was evaluated last
    assert again["mean_dice"] == pytest.approx(final["mean_dice"], abs=1e-4)  # 2 workers: rank 0's BatchNorm stats
    assert again["pixel_accuracy"] == pytest.approx(final["pixel_accuracy"], abs=1e-4)

    test_log = (run / "raypets_test.txt").read_text().splitlines()
    assert [line.split()[0] for line in test_log[1:]] == ["1", "2", "3", "4"]
    assert float(test_log[-1].split()[-1]) == pytest.approx(final["mean_dice"], abs=1e-6)
    train_log = [line.split() for line in (run / "raypets_train.txt").read_text().splitlines()[1:]]
    assert {row[0] for row in train_log} == {"1", "2", "3", "4"} and all(len(row) == 6 for row in train_log)
    for plot in ("loss.png", "dice.png"):
        assert (run / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Tracked by rank 0 alone: one TensorBoard value and one MLflow run's value per epoch, though 2 workers ran.
    assert len(list((run / "tensorboard").iterdir())) == 1  # one writer
    per_epoch = [(m["epoch"], pytest.approx(m["mean_dice"])) for m in history]
    assert tensorboard_events(run / "tensorboard")["mean_dice"] == per_epoch
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    (tracked,) = client.search_runs([client.get_experiment_by_name("raypets").experiment_id])
    assert tracked.info.status == "FINISHED" and tracked.data.params["workers"] == "2"
    logged = client.get_metric_history(tracked.info.run_id, "mean_dice")
    assert sorted((m.step, m.value) for m in logged) == per_epoch

    with pytest.raises(UserError, match="holds a training run already; pass --resume"):
        train(TrainConfig(data=shards, run_dir=run, epochs=4, **FAST))


class KillWorkerAtEpoch(WorkerGroupCallback, ReportCallback):
    """After the report of ``epoch``, SIGKILLs one of this run's training workers, by the PID Ray started it with
    (never another run's); writes each worker group's PIDs and the killed one to the JSON-lines file ``record``."""

    def __init__(self, epoch: int, record: Path) -> None:
        self.epoch, self.record, self.pids, self.done = epoch, record, [], False

    def after_worker_group_start(self, worker_group) -> None:
        self.pids = [worker.metadata.pid for worker in worker_group.get_workers()]
        self._write({"group": self.pids})

    def after_report(self, training_report, metrics) -> None:
        if self.done or metrics[0]["epoch"] != self.epoch:
            return
        self.done = True
        self._write({"killed": self.pids[-1]})
        os.kill(self.pids[-1], signal.SIGKILL)

    def _write(self, event: dict) -> None:
        with self.record.open("a") as f:
            f.write(json.dumps(event) + "\n")


def test_resume_after_raypets_train_is_killed(shards, tmp_path, ray_local):
    """SIGKILL of a real ``raypets train`` joined to this Ray (as on a cluster), then ``--resume``: the run goes on
    from its last checkpoint, with that checkpoint's weights, and the epochs before it are not trained again."""
    run = tmp_path / "run"
    args = ["train", "--data", str(shards), "--run-dir", str(run), "--checkpoint-every", "2", "--workers", "2",
            "--batch-size", "8", "--test-batch-size", "8", "--warmup-steps", "10", "--no-progress",
            "--recipe", "strong"]  # augmented batches too
    driver = subprocess.Popen([sys.executable, "-m", "raypets.cli", *args, "--epochs", "8", "--address",
                               ray_local.get_runtime_context().gcs_address], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while len(logged := read_metrics(run) if (run / "metrics.jsonl").exists() else []) < 3:  # epoch 2 checkpointed
        assert driver.poll() is None and time.monotonic() < deadline, f"the run ended or hung: {logged}"
        time.sleep(0.2)
    driver.kill()
    driver.wait()
    before = (run / "metrics.jsonl").read_text().splitlines()
    wait_for_every_cpu()  # the dead driver's run gives its CPUs back: the next run does not wait for them forever

    # A learning rate too small to move a float32 weight: the weights epoch 4 saves are those epoch 3 started from.
    assert main([*args, "--epochs", "4", "--lr", "1e-30", "--resume"]) == 0
    after = (run / "metrics.jsonl").read_text().splitlines()
    assert after[:2] == before[:2] and [json.loads(line)["epoch"] for line in after] == [1, 2, 3, 4]
    started, ended = (torch.load(run / "checkpoints" / f"model_checkpoint_{e}.pt", weights_only=True) for e in (2, 4))
    for name, _ in XceptionUNet().named_parameters():  # BatchNorm's running statistics move without the optimizer
        torch.testing.assert_close(ended[name], started[name], rtol=0, atol=1e-20)
    test_log = (run / "raypets_test.txt").read_text().splitlines()[1:]
    assert [line.split()[0] for line in test_log] == ["1", "2", "3", "4"]
    train_epochs = [int(line.split()[0]) for line in (run / "raypets_train.txt").read_text().splitlines()[1:]]
    assert train_epochs == sorted(train_epochs) and train_epochs[-1] == 4


def test_a_killed_worker_is_recovered_from_the_last_checkpoint(shards, tmp_path):
    run, record = tmp_path / "run", tmp_path / "pids.jsonl"
    cfg = TrainConfig(data=shards, run_dir=run, epochs=3, checkpoint_every=1, max_failures=1, data_cache="stream",
                      **FAST)  # the shards read each epoch, and again by the restarted workers
    final = train(cfg, callbacks=[KillWorkerAtEpoch(2, record)])
    events = [json.loads(line) for line in record.read_text().splitlines()]
    groups, (killed,) = [e["group"] for e in events if "group" in e], [e["killed"] for e in events if "killed" in e]
    assert len(groups) == 2 and killed in groups[0] and killed not in groups[1]  # this run's worker, replaced
    assert not Path(f"/proc/{killed}").exists()
    assert final["epoch"] == 3
    epochs = [m["epoch"] for m in read_metrics(run)]
    assert epochs == [1, 2, 3]  # epoch 3 trained once more after the restart, logged once
    train_epochs = [line.split()[0] for line in (run / "raypets_train.txt").read_text().splitlines()[1:]]
    assert train_epochs == sorted(train_epochs)


@pytest.fixture(scope="module")
def many_files(shards, tmp_path_factory) -> Path:
    """``shards`` with the training split in 12 Parquet files of 4 rows."""
    data = tmp_path_factory.mktemp("many_files") / "shards"
    shutil.copytree(shards, data)
    table = pq.read_table(data / "train")
    for file in (data / "train").glob("*.parquet"):
        file.unlink()
    for start in range(0, table.num_rows, 4):
        pq.write_table(table.slice(start, 4), data / "train" / f"part-{start:03d}.parquet")
    return data


def test_a_streamed_training_split_is_read_whole_in_a_new_file_order_each_epoch(many_files):
    streamed = load_datasets(many_files, read_manifest(many_files), "stream", seed=3)["train"]
    epochs = [[row["image"].tobytes() for row in streamed.iter_rows()] for _ in range(3)]
    every_image = sorted(image.tobytes() for image in load_split(many_files, "train")["image"])
    assert all(sorted(epoch) == every_image for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3


def test_a_streamed_split_waiting_for_a_slow_worker_leaves_the_cpu_to_it(many_files):
    streamed = load_datasets(many_files, read_manifest(many_files), "stream")["train"]
    options = streamed.context.execution_options  # room for about one file ahead, as a budget far below the data
    options.resource_limits = options.resource_limits.copy(object_store_memory=2 * 4 * 32 * 32 * 4)
    batches = iter(streamed.iter_batches(batch_size=4, prefetch_batches=0))
    next(batches)  # the reads are ahead and held back; training would run now
    cpu, wall = time.process_time(), time.perf_counter()
    time.sleep(2)  # Ray Data's scheduling loop runs in a thread of this process
    assert time.process_time() - cpu < 0.25 * (time.perf_counter() - wall)  # it spun at most of a core before
    batches.close()


def test_bad_settings_end_in_one_clear_message(tmp_path, capsys):
    with pytest.raises(UserError, match="prepared data folder does not exist"):
        train(TrainConfig(data=tmp_path / "missing", run_dir=tmp_path / "run"))
    (tmp_path / "raw").mkdir()
    with pytest.raises(UserError, match="not a prepared dataset \\(no manifest.json\\); run `raypets prepare`"):
        train(TrainConfig(data=tmp_path / "raw", run_dir=tmp_path / "run"))
    with pytest.raises(UserError, match="unknown training setting\\(s\\): colour"):
        TrainConfig.from_dict({"data": "x", "run_dir": "y", "colour": "blue"})
    with pytest.raises(UserError, match="--batch-size 2 is global and must be at least --workers 4"):
        TrainConfig(data=tmp_path, run_dir=tmp_path, workers=4, batch_size=2)
    assert main(["train", "--data", str(tmp_path / "raw"), "--run-dir", str(tmp_path / "run")]) == 2
    assert "raypets: error:" in capsys.readouterr().err


def test_gpu_settings_that_cannot_work_are_refused_before_training(shards, tmp_path):
    with pytest.raises(UserError, match="--sync-bn needs GPU workers"):
        train(TrainConfig(data=shards, run_dir=tmp_path / "run", sync_bn=True, **FAST))
    with pytest.raises(UserError, match="0.25 of a GPU per worker needs one worker per run \\(2 asked\\)"):
        TrainConfig(data=shards, run_dir=tmp_path, gpus_per_worker=0.25, workers=2)
    with pytest.raises(UserError, match="--precision fp16 needs a GPU"):
        resolve_precision("fp16", torch.device("cpu"))
    assert resolve_precision("auto", torch.device("cpu")).name == "fp32"


def test_init_weights_that_do_not_fit_the_network_are_one_error_before_training(shards, tmp_path):
    torch.save(XceptionUNet().state_dict(), tmp_path / "tutorial.pt")  # the tutorial's network: no U-Net skips
    cfg = TrainConfig(data=shards, run_dir=tmp_path / "run", init_weights=tmp_path / "tutorial.pt", epochs=1, **FAST)
    with pytest.raises(UserError, match=r"tutorial\.pt: the weights do not fit the built-in XceptionUNet "
                                        r"\(U-Net skips: --unet-skips / --no-unet-skips\).*skips\.0\.weight"):
        train(replace(cfg, unet_skips=True))
    assert not (tmp_path / "run").exists()


def test_learning_rate_warms_up_then_follows_the_schedule(tmp_path):
    cfg = TrainConfig(data=tmp_path, run_dir=tmp_path, lr=1e-3, warmup_steps=4,
                      lr_scheduler={"type": "step", "step_size": 2, "gamma": 0.5})
    assert [cfg.lr_at(s, 1, 10) for s in range(5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert [cfg.lr_at(100, e, 10) for e in (1, 2, 3, 5)] == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4])
    assert [cfg.lr_at(s, 1, 2) for s in range(3)] == pytest.approx([5e-4, 1e-3, 1e-3])  # one epoch at most
    multi = TrainConfig(data=tmp_path, run_dir=tmp_path, warmup_steps=0,
                        lr_scheduler={"type": "multistep", "milestones": [1, 3], "gamma": 0.1})
    assert [multi.lr_at(0, e, 10) for e in (1, 2, 4)] == pytest.approx([1e-3, 1e-4, 1e-5])
    cosine = TrainConfig(data=tmp_path, run_dir=tmp_path, warmup_steps=0, epochs=4, lr_scheduler={"type": "cosine"})
    assert [cosine.lr_at(0, e, 10) for e in (1, 2, 3, 4)] == pytest.approx([1e-3, 8.5355e-4, 5e-4, 1.4645e-4],
                                                                          rel=1e-4)
    poly = TrainConfig(data=tmp_path, run_dir=tmp_path, warmup_steps=0, epochs=4,
                       lr_scheduler={"type": "poly", "power": 2.0})
    assert [poly.lr_at(0, e, 10) for e in (1, 2, 3, 4)] == pytest.approx([1e-3, 5.625e-4, 2.5e-4, 6.25e-5])
    assert cfg.steps_per_epoch(100) == 2 and TrainConfig(data=tmp_path, run_dir=tmp_path, workers=2, batch_size=16
                                                         ).steps_per_epoch(101) == 7  # 50 each, batches of 8
    with pytest.raises(UserError, match="lr_scheduler step takes gamma, step_size"):
        TrainConfig(data=tmp_path, run_dir=tmp_path, lr_scheduler={"type": "step", "gamma": 0.1})


def test_from_takes_a_sweeps_winner_or_a_runs_settings_and_print_config_reads_back(tmp_path, capsys):
    winner = TrainConfig(data=tmp_path / "shards", run_dir=tmp_path / "sweep" / "trials" / "t1", lr=3e-4, epochs=4,
                         hflip=0.5, resume=True)
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"trial_id": "t1", "config": winner.to_dict()}))
    run = ["train", "--run-dir", str(tmp_path / "winner"), "--print-config"]
    assert main([*run, "--from", str(best), "--epochs", "30"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["lr"], printed["hflip"], printed["epochs"]) == (3e-4, 0.5, 30)  # the winner's, the flag's epochs
    assert printed["data"] == str(tmp_path / "shards") and printed["run_dir"] == str(tmp_path / "winner")
    assert printed["resume"] is False  # a new run: its folder and resume come from its own command line
    (tmp_path / "printed.json").write_text(json.dumps(printed))
    (tmp_path / "run.json").write_text(json.dumps({"network": None, "train": printed}))
    for saved in ("printed.json", "run.json"):
        assert main([*run, "--from", str(tmp_path / saved)]) == 0
        assert json.loads(capsys.readouterr().out) == printed  # what --print-config printed reads back the same
    (tmp_path / "metrics.json").write_text('{"mean_dice": 0.7}')
    assert main([*run, "--from", str(tmp_path / "metrics.json")]) == 2
    assert "metrics.json: holds no training settings" in capsys.readouterr().err


def test_config_round_trips_through_json(tmp_path):
    cfg = TrainConfig(data=tmp_path / "d", run_dir=tmp_path / "r", lr_scheduler={"type": "exponential", "gamma": 0.9})
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg

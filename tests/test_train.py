"""``raypets train`` on real Ray with 2 CPU workers and tiny synthetic shards."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import ray.exceptions
import ray.train
import torch
from helpers import prepared_shards, wait_for_every_cpu

from raypets.cli import main
from raypets.config import TrainConfig
from raypets.errors import UserError
from raypets.metrics import ConfusionMatrix
from raypets.model import XceptionUNet, to_inputs
from raypets.precision import resolve_precision
from raypets.runlog import read_metrics
from raypets.stages.shards import load_split
from raypets.stages.train import train

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
    run = tmp_path / "run"
    final = train(TrainConfig(data=shards, run_dir=Path("run"), epochs=4, checkpoint_every=2, **FAST))
    history = read_metrics(run)
    assert [m["epoch"] for m in history] == [1, 2, 3, 4] and final["epoch"] == 4
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    test = load_split(shards, "test")["mask"]
    background = (test == 1).mean()
    constant_dice = 2 * background / (1 + background) / 3  # mean Dice of predicting background everywhere
    assert final["mean_dice"] > constant_dice + 0.08, (final["mean_dice"], constant_dice)
    assert not final["collapsed"]

    plain = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert plain == ["model_checkpoint_2.pt", "model_checkpoint_4.pt"]
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

    with pytest.raises(UserError, match="holds a training run already; pass --resume"):
        train(TrainConfig(data=shards, run_dir=run, epochs=4, **FAST))


class KillAtEpoch(ray.train.UserCallback):
    """Kills a real process after the report of ``epoch``: a training worker, or the whole run's controller."""

    def __init__(self, epoch: int, target: str) -> None:
        self.epoch, self.target, self.done = epoch, target, False

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if self.done or metrics[0]["epoch"] != self.epoch:
            return
        self.done = True
        if self.target == "controller":
            os.kill(os.getpid(), signal.SIGKILL)
        procs = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
        workers = [p for p in procs if _title(p).startswith("ray::RayTrainWorker")]
        os.kill(int(workers[0].name), signal.SIGKILL)


def _title(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_resume_after_the_run_is_killed(shards, tmp_path):
    run = tmp_path / "run"
    cfg = TrainConfig(data=shards, run_dir=run, epochs=6, checkpoint_every=2, max_failures=0, **FAST)
    with pytest.raises(ray.exceptions.ActorDiedError):  # the driver sees the run's controller process die
        train(cfg, callbacks=[KillAtEpoch(3, "controller")])
    logged = [m["epoch"] for m in read_metrics(run)]
    assert logged[:3] == [1, 2, 3] and logged[-1] < 6  # the workers die an epoch or so later
    wait_for_every_cpu()  # Ray gives the dead run's CPUs back: the next run does not wait for them forever
    assert main(["train", "--data", str(shards), "--run-dir", str(run), "--epochs", "6", "--checkpoint-every",
                 "2", "--workers", "2", "--batch-size", "8", "--test-batch-size", "8", "--warmup-steps", "10",
                 "--resume", "--no-progress"]) == 0
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    test_log = (run / "raypets_test.txt").read_text().splitlines()[1:]
    assert [line.split()[0] for line in test_log] == ["1", "2", "3", "4", "5", "6"]
    train_epochs = [int(line.split()[0]) for line in (run / "raypets_train.txt").read_text().splitlines()[1:]]
    assert train_epochs == sorted(train_epochs) and train_epochs[-1] == 6
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "model_checkpoint_2.pt", "model_checkpoint_4.pt", "model_checkpoint_6.pt"]


def test_a_killed_worker_is_recovered_from_the_last_checkpoint(shards, tmp_path):
    run = tmp_path / "run"
    cfg = TrainConfig(data=shards, run_dir=run, epochs=3, checkpoint_every=1, max_failures=1, data_cache="stream",
                      **FAST)  # the shards read each epoch, and again by the restarted workers
    final = train(cfg, callbacks=[KillAtEpoch(2, "worker")])
    assert final["epoch"] == 3
    epochs = [m["epoch"] for m in read_metrics(run)]
    assert epochs == [1, 2, 3]  # epoch 3 trained once more after the restart, logged once
    train_epochs = [line.split()[0] for line in (run / "raypets_train.txt").read_text().splitlines()[1:]]
    assert train_epochs == sorted(train_epochs)


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


def test_learning_rate_warms_up_then_follows_the_schedule(tmp_path):
    cfg = TrainConfig(data=tmp_path, run_dir=tmp_path, lr=1e-3, warmup_steps=4,
                      lr_scheduler={"type": "step", "step_size": 2, "gamma": 0.5})
    assert [cfg.lr_at(s, 1) for s in range(5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert [cfg.lr_at(100, e) for e in (1, 2, 3, 5)] == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4])
    multi = TrainConfig(data=tmp_path, run_dir=tmp_path, warmup_steps=0,
                        lr_scheduler={"type": "multistep", "milestones": [1, 3], "gamma": 0.1})
    assert [multi.lr_at(0, e) for e in (1, 2, 4)] == pytest.approx([1e-3, 1e-4, 1e-5])
    with pytest.raises(UserError, match="lr_scheduler step takes gamma, step_size"):
        TrainConfig(data=tmp_path, run_dir=tmp_path, lr_scheduler={"type": "step", "gamma": 0.1})


def test_config_round_trips_through_json(tmp_path):
    cfg = TrainConfig(data=tmp_path / "d", run_dir=tmp_path / "r", lr_scheduler={"type": "exponential", "gamma": 0.9})
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg

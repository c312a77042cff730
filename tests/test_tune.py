"""``raypets tune`` on real Ray: trials that each fit a TorchTrainer on tiny synthetic shards, one worker per trial."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ray.tune
import torch
from helpers import prepared_shards, tensorboard_events

from raypets.checkpoints import STATE_FILE, load_model, resolve_checkpoint
from raypets.cli import main
from raypets.config import DEFAULT_RECIPE, RECIPES, TrainConfig
from raypets.errors import UserError
from raypets.metrics import ConfusionMatrix
from raypets.model import to_inputs
from raypets.runlog import read_metrics
from raypets.stages.shards import load_split
from raypets.stages.tune import SWEEP_FILE, tune
from raypets.sweep_config import load_sweep

FAST = "batch_size: 8, test_batch_size: 8, warmup_steps: 2, seed: 0"


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_local) -> Path:
    return prepared_shards(tmp_path_factory.mktemp("tune"), n=24, size=(64, 48), seed=3)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def reported(run: Path, trial_id: str) -> list[dict]:
    """What the trial reported to Tune, from Tune's own result file."""
    lines = (run / "tune" / trial_id / "result.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def checkpoint_epochs(trial_dir: Path) -> list[int]:
    states = (trial_dir / "ray_train").glob(f"checkpoint_*/{STATE_FILE}")
    return sorted(torch.load(p, weights_only=True)["epoch"] for p in states)


class InterruptAt(ray.tune.Callback):
    """Ctrl+C for real (SIGINT to the sweep's process) when the trial with learning rate ``lr`` reports ``epoch``."""

    def __init__(self, lr: float, epoch: int) -> None:
        self.lr, self.epoch = lr, epoch

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if trial.config["lr"] == self.lr and result["epoch"] == self.epoch:
            os.kill(os.getpid(), signal.SIGINT)


def test_asha_sweep_interrupted_and_resumed_ranks_trials_and_points_to_the_best_checkpoint(
        shards, tmp_path, capsys):
    # Deterministic (seed 0, one worker, one trial at a time): 1e-6 barely moves and, alone at its rungs, runs to
    # the end; 0.1 collapses to background and ASHA stops it after epoch 1; 3e-3 learns and is interrupted there.
    space = write(tmp_path / "lr.yaml", f"""
scheduler: {{type: asha, grace_period: 1, reduction_factor: 2}}
train: {{epochs: 2, {FAST}}}
space:
  lr: {{grid: [1e-6, 1.0e-1, 3.0e-3]}}
""")
    run = tmp_path / "sweep"
    first = tune(load_sweep(space, shards, tracking=["tensorboard"]), run, callbacks=[InterruptAt(3e-3, epoch=1)],
                 progress=False)
    trial = {row["params"]["lr"]: row["trial_id"] for row in first["rows"]}
    assert {row["params"]["lr"]: row["status"] for row in first["rows"]} == {
        1e-6: "done", 1e-1: "done", 3e-3: "unfinished"}
    assert first["unfinished"] == [trial[3e-3]] and not first["errors"]
    finished = [run / sub / trial[lr] / name for lr in (1e-6, 1e-1)
                for sub, name in (("trials", "metrics.jsonl"), ("tune", "result.json"))]
    before = {path: path.read_bytes() for path in finished}

    assert main(["tune", "--run-dir", str(run), "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert all(path.read_bytes() == text for path, text in before.items())  # finished trials did not run again
    interrupted = run / "trials" / trial[3e-3]  # went on from its last checkpoint: epoch 1 was not trained again
    assert checkpoint_epochs(interrupted).count(1) == 1 and [m["epoch"] for m in read_metrics(interrupted)] == [1, 2]

    rows = list(csv.DictReader((run / "trials.csv").open()))
    assert len(rows) == 3 and {row["status"] for row in rows} == {"done"} and all(r["trial_id"] in out for r in rows)
    epochs_run = {row["trial_id"]: int(row["epochs_run"]) for row in rows}
    assert max(r["epoch"] for r in reported(run, trial[1e-1])) == epochs_run[trial[1e-1]] == 1  # ASHA stopped it
    assert {row["trial_id"] for row in rows if row["stopped_early"] == "True"} == {trial[1e-1]}
    assert epochs_run[trial[1e-6]] == epochs_run[trial[3e-3]] == 2

    for trial_id in epochs_run:  # each trial tracked as a run of its own, the resumed one continued in its folder
        steps = {step for step, _ in tensorboard_events(run / "trials" / trial_id / "tensorboard")["mean_dice"]}
        assert steps == {m["epoch"] for m in read_metrics(run / "trials" / trial_id)}

    best_reported = {t: max(r["mean_dice"] for r in reported(run, t)) for t in epochs_run}
    best = json.loads((run / "best.json").read_text())
    assert best["trial_id"] == max(best_reported, key=best_reported.get) == rows[0]["trial_id"]
    assert best["value"] == pytest.approx(best_reported[best["trial_id"]])
    assert [float(row["mean_dice"]) for row in rows] == sorted(best_reported.values(), reverse=True)
    assert best["config"]["lr"] == best["params"]["lr"] == float(rows[0]["lr"])
    assert Path(best["checkpoint"]).parent == run / "trials" / best["trial_id"] / "ray_train"

    checkpoint = resolve_checkpoint(run / "best.json")  # what raypets predict / evaluate take
    assert checkpoint.epoch == best["epoch"] and str(checkpoint.weights) == best["model_checkpoint"]
    assert plain_mean_dice(load_model(checkpoint), shards) == pytest.approx(best["value"], abs=1e-3)  # that epoch
    assert (run / "mean_dice_vs_lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["tune", "--data", str(shards), "--space", str(space), "--run-dir", str(run)]) == 2
    assert "holds a sweep already; pass --resume" in capsys.readouterr().err


def plain_mean_dice(model: torch.nn.Module, shards: Path) -> float:
    """Test mean Dice of ``model`` computed without Ray."""
    test = load_split(shards, "test")
    cfg = TrainConfig(data=shards, run_dir=shards)
    matrix = ConfusionMatrix()
    with torch.no_grad():
        matrix.update(model(to_inputs(torch.from_numpy(test["image"]), cfg.normalize_mean, cfg.normalize_std)),
                      torch.from_numpy(test["mask"]).long())
    return matrix.compute()["mean_dice"]


def test_a_sweep_that_died_early_starts_afresh_and_a_failed_trial_is_retried_on_resume(shards, tmp_path, capsys):
    network = write(tmp_path / "net.json", "{not json")  # a broken network file: the trial fails as it starts
    space = write(tmp_path / "one.yaml", f"""
train: {{epochs: 1, network: {network}, {FAST}}}
space:
  lr: {{grid: [1.0e-3]}}
""")
    run = tmp_path / "sweep"
    # What a sweep leaves when its process dies after writing sweep.json, before Tune's first save.
    write(run / SWEEP_FILE, json.dumps(load_sweep(space, shards).to_dict()))
    args = ["tune", "--data", str(shards), "--space", str(space), "--run-dir", str(run), "--no-progress"]
    assert main([*args, "--resume"]) == 1
    printed = capsys.readouterr()
    assert "holds no state Tune saved (the sweep stopped before Tune's first save): starting it afresh" in printed.out
    err = printed.err
    rows = list(csv.DictReader((run / "trials.csv").open()))
    assert [row["status"] for row in rows] == ["error"] and not (run / "best.json").exists()
    assert f"trial {rows[0]['trial_id']} failed: " in err and "net.json: not valid JSON" in err
    assert "--resume` continues the sweep and retries failed trials" in err

    network.write_text((Path(__file__).parents[1] / "raypets" / "networks" / "network_xception2D.json").read_text())
    assert main([*args, "--resume"]) == 0  # the user fixed the file: the trial runs again
    rows = list(csv.DictReader((run / "trials.csv").open()))
    assert [(row["status"], row["epochs_run"]) for row in rows] == [("done", "1")]
    assert json.loads((run / "best.json").read_text())["trial_id"] == rows[0]["trial_id"]


@pytest.mark.parametrize("text, message", [
    ("space: {lr: {loguniform: [1e-4, 1e-2]}}\ncolour: blue\n", "unknown key 'colour'"),
    ("space: {lr: {loguniform: [1e-2, 1e-4]}}\n", "space.lr.loguniform takes \\[low, high\\] with 0 < low < high"),
    ("space: {learning_rate: {choice: [0.1]}}\n", "space.learning_rate is not a training setting"),
    ("space: {optimizer: {choice: [adam, lion]}}\n", "space.optimizer = 'lion': unknown optimizer 'lion'"),
    ("space: {batch_size: {uniform: [8, 64]}}\n", "uniform draws floats, batch_size takes int; use choice or grid"),
    ("space: {lr: {normal: [0, 1]}}\n", "space.lr must be one of"),
    ("train: {epochs: 2, data: elsewhere}\n", "train.data is given by raypets tune \\(--data\\)"),
    ("train: {epochs: 2}\nscheduler: {type: asha, grace_period: 3}\n", "grace_period 3 is more than the 2 epochs"),
    ("train: {lr: fast}\n", "train.lr: takes a number, got 'fast'"),
    ("train: {keep: x}\n", "train.keep: takes a whole number, got 'x'"),
    ("train: {epochs: true}\n", "train.epochs: takes a whole number, got True"),
    ("space: {keep: {choice: [2, two]}}\n", "space.keep.choice.1: takes a whole number, got 'two'"),
    ("train: {lr_scheduler: {type: step, gamma: 0.5}}\n", "train: lr_scheduler step takes gamma, step_size"),
    ("space: {lr_scheduler: {choice: [null, {type: cyclic}]}}\n",
     "space.lr_scheduler = {'type': 'cyclic'}: lr_scheduler type 'cyclic' is not one of"),
    ("metric: accuracy\n", "metric 'accuracy' is not one raypets train reports"),
    ("space: [lr]\n", "space must be a mapping"),
    ("space: {lr: {grid: [1e-3]}\n", "not valid YAML"),
])
def test_a_bad_sweep_file_is_one_clear_error(tmp_path, text, message):
    with pytest.raises(UserError, match=f"{tmp_path / 'bad.yaml'}: .*{message}"):
        load_sweep(write(tmp_path / "bad.yaml", text), tmp_path)


def test_a_bad_sweep_fails_before_any_ray_work(tmp_path):
    """In a fresh process: the error comes out, and Ray was never started."""
    bad = write(tmp_path / "bad.yaml", "space: {lr: {loguniform: [1e-4, 1e-2]}}\nepochs: 3\n")
    code = ("import sys, ray; from raypets.cli import main; rc = main(sys.argv[1:]); "
            "assert not ray.is_initialized(); sys.exit(rc)")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code, "tune", "--data", str(tmp_path), "--space", str(bad),
                           "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"raypets: error: {bad}: unknown key 'epochs'; a sweep file has metric, mode, "
                                   "samples, search, scheduler, train, space")
    assert not (tmp_path / "run").exists()


def test_sweep_files_read_numbers_as_yaml_writes_them_and_resume_needs_a_sweep(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "net.json", "{}")
    sweep = load_sweep(write(tmp_path / "s.yaml", "samples: 4\ntrain: {lr: 1e-3, bn_momentum: 1, network: net.json}\n"
                             "space: {lr_scheduler: {choice: [null, {type: exponential, gamma: 0.9}]}}\n"),
                       Path("shards"), samples=2, workers=2, gpus_per_worker=0)
    assert sweep.train["lr"] == 1e-3 and isinstance(sweep.train["bn_momentum"], float)
    # relative paths mean the caller's folder, though Tune runs each trial in a folder of its own
    assert (sweep.train["data"], sweep.train["network"]) == (str(tmp_path / "shards"), str(tmp_path / "net.json"))
    assert (sweep.samples, sweep.train["workers"], sweep.train["device"], sweep.train["checkpoint_every"]) == (
        2, 2, "cpu", 1)
    assert (sweep.metric, sweep.mode, sweep.scheduler) == ("mean_dice", "max", {"type": "fifo"})
    for name in ("lr_sweep", "lr_optimizer_loss"):  # the shipped sweeps are valid: log-uniform lr, ASHA
        shipped = load_sweep(Path(__file__).parents[1] / "tune_configs" / f"{name}.yaml", tmp_path)
        assert "loguniform" in shipped.space["lr"] and shipped.scheduler["type"] == "asha"

    assert main(["tune", "--run-dir", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "no sweep to resume" in capsys.readouterr().err


def test_keep_and_lr_scheduler_are_sweep_settings(tmp_path):
    """Settings whose type is not a plain number (``int | None``, a mapping) are typed like the others."""
    schedule = {"type": "step", "step_size": 2, "gamma": 0.5}
    fixed = load_sweep(write(tmp_path / "t.yaml", "train: {keep: 3, lr_scheduler: {type: step, step_size: 2, "
                             "gamma: 0.5}}\n"), tmp_path)
    assert (fixed.train["keep"], fixed.train["lr_scheduler"]) == (3, schedule)
    assert load_sweep(write(tmp_path / "n.yaml", "train: {keep: null}\n"), tmp_path).train["keep"] is None
    searched = load_sweep(write(tmp_path / "s.yaml", "space:\n  keep: {choice: [null, 2]}\n"
                                "  lr_scheduler: {grid: [null, {type: step, step_size: 2, gamma: 0.5}]}\n"), tmp_path)
    assert searched.space == {"keep": {"choice": [None, 2]}, "lr_scheduler": {"grid": [None, schedule]}}
    assert searched.trial_config(tmp_path, {"keep": 2, "lr_scheduler": schedule}).keep == 2


def test_trials_train_the_default_recipe_unless_the_sweep_sets_another(tmp_path):
    def recipe(trial: TrainConfig) -> tuple:
        return (trial.hflip, trial.crop_scale, trial.rotate, trial.color_jitter, trial.lr_scheduler, trial.warmup_steps,
                trial.unet_skips)

    default = load_sweep(write(tmp_path / "d.yaml", "space: {lr: {grid: [1.0e-3]}}\n"), tmp_path)
    assert recipe(default.trial_config(tmp_path, {"lr": 1e-3})) == recipe(TrainConfig(tmp_path, tmp_path,
                                                                                       **RECIPES[DEFAULT_RECIPE]))
    robust = load_sweep(write(tmp_path / "r.yaml", "train: {hflip: 0, crop_scale: 1, rotate: 0, color_jitter: 0, "
                              "lr_scheduler: null, unet_skips: false}\nspace: {lr: {grid: [1.0e-3]}}\n"), tmp_path)
    assert recipe(robust.trial_config(tmp_path, {"lr": 1e-3})) == recipe(TrainConfig(tmp_path, tmp_path,
                                                                                      **RECIPES["robust"]))


def test_trials_share_a_gpu_with_a_fraction_of_one_worker_each(tmp_path):
    space = write(tmp_path / "s.yaml", "space: {lr: {grid: [1.0e-3, 3.0e-3]}}\n")
    shared = load_sweep(space, tmp_path, workers=1, gpus_per_worker=0.25)
    assert (shared.train["device"], shared.train["gpus_per_worker"]) == ("gpu", 0.25)
    assert shared.trial_config(tmp_path, {"lr": 1e-3}).gpus_per_worker == 0.25
    with pytest.raises(UserError, match="0.25 of a GPU per worker needs one worker per run \\(2 asked\\): two NCCL"):
        load_sweep(space, tmp_path, workers=2, gpus_per_worker=0.25)
    assert load_sweep(space, tmp_path, gpus_per_worker=0).train["device"] == "cpu"


def test_optuna_search_needs_optuna(tmp_path):
    if importlib.util.find_spec("optuna"):
        pytest.skip("Optuna is installed here")
    with pytest.raises(UserError, match="search: optuna needs Optuna, which is not installed; `pip install optuna`"):
        load_sweep(write(tmp_path / "o.yaml", "search: optuna\nspace: {lr: {loguniform: [1e-4, 1e-2]}}\n"), tmp_path)

"""``raypets.tracking`` without Ray: real tensorboardX event files, a real MLflow store (SQLite), read back."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import tensorboard_events
from mlflow.tracking import MlflowClient

from raypets import tracking
from raypets.cli import build_parser
from raypets.config import TrainConfig
from raypets.errors import UserError
from raypets.redaction import HIDDEN

SECRET_DATA = "s3://AKIAKEY:TOPSECRET@bucket/shards"


def epochs(*dice: float) -> list[dict]:
    """Metrics as the loop reports them: numbers, and the string ``collapsed``."""
    return [{"epoch": e, "train_loss": 1.0 / e, "mean_dice": d, "collapsed": ""} for e, d in enumerate(dice, 1)]


def run_epochs(names: list[str], run: Path, started: dict, metrics: list[dict], last_epoch: int = 0) -> None:
    with tracking.open_trackers(names, run, started, last_epoch) as trackers:
        for m in metrics:
            trackers.epoch(m)


@pytest.fixture
def no_mlflow_env(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)


def test_tensorboard_holds_each_epochs_numbers_and_the_settings_without_keys(tmp_path):
    run = tmp_path / "run"
    started = tracking.start(["tensorboard"], run, {"data": SECRET_DATA, "lr": 1e-3}, resume=False, mlflow=None)
    run_epochs(["tensorboard"], run, started, epochs(0.3, 0.5))
    events = tensorboard_events(run / tracking.TENSORBOARD_DIR)
    assert events["mean_dice"] == [(1, pytest.approx(0.3)), (2, pytest.approx(0.5))]
    assert [step for step, _ in events["train_loss"]] == [1, 2] and "collapsed" not in events and "epoch" not in events
    (text,) = [value for tag, values in events.items() if tag.startswith("settings") for _, value in values]
    assert "s3://***@bucket/shards" in text and "TOPSECRET" not in text and "AKIAKEY" not in text

    # A resumed run (checkpoint at epoch 1) purges what came after it: TensorBoard keeps one value per step.
    run_epochs(["tensorboard"], run, started, epochs(0.3, 0.6, 0.7)[1:], last_epoch=1)
    assert len(list((run / tracking.TENSORBOARD_DIR).iterdir())) == 2


def test_one_mlflow_run_per_training_continued_on_resume_with_settings_but_no_keys(tmp_path, no_mlflow_env):
    run = tmp_path / "run"
    target = tracking.mlflow_target(run)
    assert target["uri"] == f"sqlite:///{run / tracking.MLFLOW_DB}"
    settings = {"data": SECRET_DATA, "lr": 1e-3, "lr_scheduler": {"type": "step", "gamma": 0.5}, "tracking": ["mlflow"]}
    started = tracking.start(["mlflow"], run, settings, resume=False, mlflow=target)
    run_epochs(["mlflow"], run, started, epochs(0.3, 0.5))
    client = MlflowClient(target["uri"])
    (first,) = client.search_runs([target["experiment_id"]])
    assert first.info.run_name == "run" and first.info.status == "FINISHED"
    assert json.loads((run / tracking.MLFLOW_RUN_FILE).read_text()) == {"run_id": first.info.run_id}
    params = first.data.params
    assert params["data"] == f"s3://{HIDDEN}@bucket/shards" and params["lr"] == "0.001"
    assert params["lr_scheduler.gamma"] == "0.5" and params["tracking"] == '["mlflow"]'
    saved = [*params.values(), *first.data.tags.values()]
    assert not any("TOPSECRET" in value or "AKIAKEY" in value for value in saved)

    again_target = tracking.mlflow_target(run)
    resumed = tracking.start(["mlflow"], run, {**settings, "epochs": 40}, resume=True, mlflow=again_target)
    run_epochs(["mlflow"], run, resumed, epochs(0.3, 0.5, 0.6)[2:], last_epoch=2)
    (again,) = client.search_runs([target["experiment_id"]])
    assert again.info.run_id == first.info.run_id and again.info.status == "FINISHED"
    history = client.get_metric_history(again.info.run_id, "mean_dice")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.3), (2, 0.5), (3, 0.6)]
    assert set(again.data.metrics) == {"mean_dice", "train_loss"}


def test_a_run_that_raises_is_marked_failed_and_the_experiment_comes_from_mlflows_variable(tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "pets-sweep")
    target = tracking.mlflow_target("s3://bucket/runs/a")  # a run at a URI, with a tracking store to log to
    started = tracking.start(["mlflow"], tmp_path / "a", {"lr": 1e-3}, resume=False, mlflow=target)
    with pytest.raises(RuntimeError), tracking.open_trackers(["mlflow"], tmp_path / "a", started, 0):
        raise RuntimeError("a worker died")
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("pets-sweep").experiment_id])
    assert run.info.status == "FAILED"


def test_tracking_mistakes_are_one_clear_error(tmp_path, no_mlflow_env, monkeypatch, capsys):
    with pytest.raises(UserError, match="unknown tracker 'wandb'; choose tensorboard, mlflow"):
        TrainConfig(data=tmp_path, run_dir=tmp_path, tracking=["wandb"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--tracking", "wandb"])
    assert "invalid choice: 'wandb'" in capsys.readouterr().err
    args = build_parser().parse_args(["tune", "--run-dir", "r", "--tracking", "tensorboard", "--tracking", "mlflow"])
    assert args.tracking == ["tensorboard", "mlflow"]
    cfg = TrainConfig(data=tmp_path, run_dir=tmp_path, tracking=["tensorboard", "mlflow"])
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(UserError, match=r"s3://\*\*\*@bucket/run: --tracking mlflow for a run at a URI needs "
                                        "MLFLOW_TRACKING_URI"):
        tracking.mlflow_target("s3://KEY:SECRET@bucket/run")
    with pytest.raises(UserError, match=r"MLflow store bogus://\*\*\*@host: .*unsupported URI"):
        tracking.mlflow_target(tmp_path / "run", {"MLFLOW_TRACKING_URI": "bogus://user:pass@host"})
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # MLflow not installed
    with pytest.raises(UserError, match=r"--tracking mlflow needs MLflow, which is not installed: pip install "
                                        r"'raypets\[tracking\]'"):
        tracking.mlflow_target(tmp_path / "run")

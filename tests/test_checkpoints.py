"""Every form of CKPT a user may point at resolves to the right weights; a wrong one is one clear error. No Ray."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ray_checkpoint_folder, state_dict_file

from raypets.checkpoints import RAY_RUN_NAME, load_init_weights, load_model, resolve_checkpoint
from raypets.errors import UserError
from raypets.model import XceptionUNet


def _same(model: torch.nn.Module, state: dict) -> bool:
    return all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_plain_state_dict_loads_with_its_class_count(tmp_path):
    state = state_dict_file(tmp_path / "model_checkpoint_7.pt", seed=1, num_classes=5)
    checkpoint = resolve_checkpoint(tmp_path / "model_checkpoint_7.pt")
    assert checkpoint.epoch == 7 and checkpoint.train_config is None
    assert checkpoint.normalize == (0.0, 1 / 255)  # raypets train's default: 0-255 inputs
    model = load_model(checkpoint)
    assert _same(model, state) and not model.training
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 5, 32, 32)


def test_ray_checkpoint_folder_carries_the_training_settings(tmp_path):
    folder = tmp_path / "checkpoint_000001"
    state = ray_checkpoint_folder(folder, epoch=3, seed=2, config={"normalize_mean": 0.5, "normalize_std": 0.25})
    checkpoint = resolve_checkpoint(folder)
    assert checkpoint.weights == folder / "model_checkpoint_3.pt" and checkpoint.epoch == 3
    assert checkpoint.normalize == (0.5, 0.25)
    assert _same(load_model(checkpoint), state)


def test_run_folder_gives_the_checkpoint_with_the_best_test_dice(tmp_path):
    run = tmp_path / "run"
    for index, epoch in enumerate((2, 4, 6)):
        ray_checkpoint_folder(run / RAY_RUN_NAME / f"checkpoint_00000{index}", epoch, seed=epoch)
    dice = {1: 0.3, 2: 0.5, 3: 0.9, 4: 0.7, 5: 0.6, 6: 0.65}  # epoch 3 is best but has no checkpoint
    lines = [json.dumps({"epoch": epoch, "mean_dice": value}) + "\n" for epoch, value in dice.items()]
    (run / "metrics.jsonl").write_text("".join(lines))
    assert resolve_checkpoint(run).epoch == 4
    (run / "metrics.jsonl").unlink()
    assert resolve_checkpoint(run).epoch == 6  # no metrics: the last one


def test_sweep_best_json_points_at_aray_checkpoint_folder(tmp_path):
    folder = tmp_path / "trials" / "t1" / RAY_RUN_NAME / "checkpoint_000000"
    state = ray_checkpoint_folder(folder, epoch=2, seed=3)
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"metric": "mean_dice", "value": 0.5, "checkpoint": str(folder)}))
    assert _same(load_model(resolve_checkpoint(best)), state)


def test_weights_of_the_network_with_unet_skips_load_into_it(tmp_path):
    torch.manual_seed(0)
    state = XceptionUNet(skips=True).state_dict()
    torch.save(state, tmp_path / "model_checkpoint_3.pt")
    model = load_model(resolve_checkpoint(tmp_path / "model_checkpoint_3.pt"))
    assert model.skips is not None and _same(model, state)


def test_init_weights_load_into_the_network_to_train(tmp_path):
    state = state_dict_file(tmp_path / "init.pt", seed=3)
    model = load_init_weights(XceptionUNet(), tmp_path / "init.pt", network=None)
    assert model.training and _same(model, state)  # loaded, and left in train mode for the run


def test_weights_of_another_shape_are_one_clear_error(tmp_path):
    state_dict_file(tmp_path / "model_checkpoint_1.pt", seed=0)
    state = torch.load(tmp_path / "model_checkpoint_1.pt", weights_only=True)
    state["up1.residual.weight"] = torch.zeros(7, 7, 1, 1)
    torch.save(state, tmp_path / "wrong.pt")
    with pytest.raises(UserError, match=r"wrong\.pt: the weights do not fit the built-in XceptionUNet.*up1\.residual"):
        load_model(resolve_checkpoint(tmp_path / "wrong.pt"))


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint", "not a PyTorch checkpoint"),
    (None, "holds no convolution weights"),
])
def test_a_file_that_is_not_a_model_checkpoint_is_refused(tmp_path, content, message):
    path = tmp_path / "model.pt"
    if content is None:
        torch.save({"bias": torch.zeros(3)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_model(resolve_checkpoint(path))


def test_folders_that_hold_no_checkpoint_are_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="holds no checkpoint yet"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "best.json").write_text(json.dumps({"metric": "mean_dice"}))
    with pytest.raises(UserError, match="not a sweep's best.json"):
        resolve_checkpoint(tmp_path / "best.json")

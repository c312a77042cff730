"""rmldnn's tutorial configs, read unchanged; unknown keys are errors, not ignored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from raypets.cli import main
from raypets.config import RECIPES, TrainConfig
from raypets.data.synth import synthesize
from raypets.errors import UserError
from raypets.keras_json import REFERENCE_NETWORK
from raypets.rmldnn import training_settings
from raypets.stages.prepare import PrepareConfig, prepare

TUTORIAL = Path(__file__).parent / "data" / "config_pets_segmentation.json"


def tutorial_copy(folder: Path, **changes) -> Path:
    """The tutorial's training config in ``folder`` beside its network file, with ``changes`` applied."""
    config = json.loads(TUTORIAL.read_text())
    for dotted, value in changes.items():
        section = config["neural_network"]
        *parents, last = dotted.split(".")
        for key in parents:
            section = section[key]
        section[last] = value
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REFERENCE_NETWORK, folder / "network_xception2D.json")
    path = folder / "config_pets_segmentation.json"
    path.write_text(json.dumps(config))
    return path


def test_the_tutorial_config_maps_to_its_settings(tmp_path):
    settings, data_root, size = training_settings(tutorial_copy(tmp_path))
    assert settings == {
        "run_dir": tmp_path, "name": "out_dnn_pets_segmentation", "epochs": 30, "network": None,
        "checkpoint_dir": "model_pets_segmentation", "checkpoint_every": 5, "optimizer": "rmsprop", "lr": 0.001,
        "loss": "dice", "loss_source": "softmax", "batch_size": 64, "test_batch_size": 128,
        "normalize_mean": 0.0, "normalize_std": 0.003921568,
    }
    assert data_root == tmp_path / "oxford_pets" and size == (160, 160)


@pytest.mark.parametrize(("change", "message"), [
    ({"colour": "blue"}, "unsupported key neural_network.colour"),
    ({"data.shuffle": True}, "unsupported key neural_network.data.shuffle"),
    ({"data.transforms": [{"rotate": 10}]}, "transform 'rotate' is not supported"),
    ({"optimizer.type": "lbfgs"}, "optimizer type 'lbfgs' is not one of"),
    ({"loss.function": "Lovasz"}, "loss function 'Lovasz' is not supported"),
    ({"data.input_path": "./elsewhere/inputs/"}, "input_path must end in training/inputs/"),
])
def test_unsupported_keys_are_named(tmp_path, change, message):
    (key, value), = change.items()
    with pytest.raises(UserError, match=message):
        training_settings(tutorial_copy(tmp_path, **{key: value}))


def test_a_wrong_type_is_one_line_naming_its_key(tmp_path, capsys):
    config = tutorial_copy(tmp_path, num_epochs="ten")
    assert main(["train", "--config", str(config), "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"raypets: error: {config}: neural_network.num_epochs: takes a whole number, "
                                       "got 'ten'\n")
    with pytest.raises(UserError, match=r"neural_network\.optimizer: lr_scheduler type 'cyclic' is not one of"):
        training_settings(tutorial_copy(tmp_path, **{"optimizer.lr_scheduler": {"type": "Cyclic"}}))


def test_train_runs_the_strong_recipe_and_a_config_file_the_robust_one(tmp_path, capsys):
    def printed(*flags: str) -> dict:
        assert main(["train", *flags, "--print-config"]) == 0
        return json.loads(capsys.readouterr().out)

    def recipe_of(settings: dict) -> str:
        keys = ("warmup_steps", "bn_momentum", "hflip", "crop_scale", "rotate", "color_jitter", "lr_scheduler",
                "unet_skips")
        full = {name: TrainConfig(data="d", run_dir="r", **recipe).to_dict() for name, recipe in RECIPES.items()}
        return next(name for name, recipe in full.items() if all(settings[key] == recipe[key] for key in keys))

    folders = ["--data", str(tmp_path / "shards"), "--run-dir", str(tmp_path / "run")]
    assert recipe_of(printed(*folders)) == "strong"
    assert recipe_of(printed(*folders, "--recipe", "robust")) == "robust"
    config = tutorial_copy(tmp_path)  # the tutorial's file: its recipe made robust, as before strong existed
    assert recipe_of(printed("--config", str(config))) == "robust"
    assert recipe_of(printed("--config", str(config), "--recipe", "tutorial")) == "tutorial"
    assert printed(*folders, "--no-unet-skips")["unet_skips"] is False  # a flag overrides its recipe's value


def test_another_network_file_is_built_from_json(tmp_path):
    path = tutorial_copy(tmp_path)
    network = json.loads(REFERENCE_NETWORK.read_text())
    network["config"]["layers"][1]["config"]["filters"] = 16
    (tmp_path / "network_xception2D.json").write_text(json.dumps(network))
    assert training_settings(path)[0]["network"] == tmp_path / "network_xception2D.json"


def test_tutorial_config_trains_on_an_rmldnn_folder(tmp_path, ray_local):
    synthesize(tmp_path / "raw", n=40, size=(64, 48), seed=2)
    prepare(PrepareConfig(tmp_path / "raw", tmp_path / "shards0", size=(32, 32), test_fraction=0.25,
                          export_rmldnn=tmp_path / "oxford_pets"))
    config = tutorial_copy(tmp_path, num_epochs=1, **{"data.transforms": [
        {"resize": [32, 32]}, {"normalize": {"mean": 0.0, "std": 0.003921568}}]})
    assert main(["train", "--config", str(config), "--workers", "2", "--no-progress"]) == 0
    assert (tmp_path / "model_pets_segmentation" / "model_checkpoint_1.pt").is_file()
    assert len((tmp_path / "out_dnn_pets_segmentation_test.txt").read_text().splitlines()) == 2
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["layout"] == "rmldnn" and manifest["image_size"] == {"height": 32, "width": 32}

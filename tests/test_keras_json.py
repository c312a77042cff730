"""Networks built from Keras functional-model JSON."""

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raypets.keras_json import REFERENCE_NETWORK, KerasGraph, KerasJsonError
from raypets.model import XceptionUNet, count_bn_statistics, count_parameters, from_keras_json

REFERENCE = REFERENCE_NETWORK


def layer(class_name: str, name: str, inbound: tuple[str, ...] = (), **config: Any) -> dict:
    """One layer in Keras 2 `to_json()` form."""
    nodes = [[[source, 0, 0, {}] for source in inbound]] if inbound else []
    return {"class_name": class_name, "name": name, "config": {"name": name, **config}, "inbound_nodes": nodes}


def input_layer(name: str = "input_1", channels: int = 2) -> dict:
    return layer("InputLayer", name, batch_input_shape=[None, None, None, channels])


def conv(name: str, source: str, filters: int, kernel: int = 3, **config: Any) -> dict:
    options = {"filters": filters, "kernel_size": [kernel, kernel], "padding": "same", **config}
    return layer("Conv2D", name, (source,), **options)


def model_json(*layers: dict, inputs: list[str] | None = None, outputs: list[str] | None = None) -> dict:
    config: dict[str, Any] = {"name": "test", "layers": list(layers)}
    if inputs:
        config["input_layers"] = [[name, 0, 0] for name in inputs]
    if outputs:
        config["output_layers"] = [[name, 0, 0] for name in outputs]
    return {"class_name": "Functional", "config": config}


@pytest.fixture(scope="module")
def reference() -> KerasGraph:
    torch.manual_seed(0)
    return from_keras_json(REFERENCE)


def test_reference_network_counts_and_shapes(reference: KerasGraph) -> None:
    assert count_parameters(reference) == 2_055_203
    assert count_bn_statistics(reference) == 3_776
    assert len(reference.layers) == 71  # 72 Keras layers less the input
    reference.eval()
    with torch.no_grad():
        for height, width in [(32, 32), (64, 96)]:
            assert reference(torch.rand(1, 3, height, width)).shape == (1, 3, height, width)


def test_reference_network_is_keyed_by_keras_names(reference: KerasGraph) -> None:
    keys = reference.state_dict().keys()
    assert {"layers.conv2d.weight", "layers.separable_conv2d.depthwise.weight", "layers.conv2d_8.bias"} <= set(keys)
    assert reference.layers["batch_normalization"].momentum == pytest.approx(0.01)
    assert reference.layers["batch_normalization"].eps == pytest.approx(1e-3)
    assert reference.input_names == ["input_1"] and reference.output_names == ["conv2d_8"]
    with_momentum = from_keras_json(json.loads(REFERENCE.read_text()), bn_momentum=0.1)
    assert {m.momentum for m in with_momentum.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}


@pytest.mark.parametrize("train", [False, True])
def test_reference_network_equals_the_builtin_model(train: bool) -> None:
    """Same weights in module order give the same logits: padding, wiring and order all agree."""
    torch.manual_seed(4)
    builtin, built = XceptionUNet(), from_keras_json(REFERENCE)
    for module in builtin.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    source, target = builtin.state_dict(), built.state_dict()
    assert [v.shape for v in source.values()] == [v.shape for v in target.values()]
    built.load_state_dict(dict(zip(target, source.values(), strict=True)))
    builtin.train(train)
    built.train(train)
    x = torch.rand(2, 3, 32, 48) * 255
    with torch.no_grad():
        assert torch.allclose(built(x), builtin(x), atol=1e-5, rtol=1e-5)


def test_reference_softmax_is_left_to_the_loss(reference: KerasGraph) -> None:
    raw = json.loads(REFERENCE.read_text())
    assert raw["config"]["layers"][-1]["config"]["activation"] == "softmax"
    reference.eval()
    with torch.no_grad():
        out = reference(torch.rand(1, 3, 32, 32) * 255)
    assert not torch.allclose(out.sum(1), torch.ones(1, 32, 32))


def test_output_softmax_is_dropped_but_inner_softmax_kept() -> None:
    spec = model_json(
        input_layer(),
        layer("Activation", "inner", ("input_1",), activation="softmax"),
        conv("conv", "inner", 3, activation="softmax"),
        conv("conv_2", "inner", 3),
        layer("Activation", "out", ("conv_2",), activation="softmax"),
        outputs=["conv", "out"],
    )
    net = from_keras_json(spec)
    x = torch.randn(1, 2, 8, 8)
    conv_out, out = net(x)
    assert torch.allclose(conv_out, net.layers["conv"](torch.softmax(x, dim=1)))
    assert torch.allclose(out, net.layers["conv_2"](torch.softmax(x, dim=1)))
    read_again = model_json(
        input_layer(),
        conv("conv", "input_1", 3, activation="softmax"),
        conv("next", "conv", 3),
        outputs=["conv", "next"],
    )
    with pytest.raises(KerasJsonError, match="'conv'.*output softmax"):
        from_keras_json(read_again)


def test_concatenate_graph_joins_channels() -> None:
    spec = model_json(
        input_layer(),
        conv("a", "input_1", 3, activation="relu"),
        conv("b", "input_1", 2, kernel=1),
        layer("Concatenate", "cat", ("a", "b"), axis=-1),
        conv("head", "cat", 4),
    )
    net = from_keras_json(spec)
    assert net.layers["head"].weight.shape == (4, 5, 3, 3)
    x = torch.randn(2, 2, 8, 8)
    expected = net.layers["head"](torch.cat([F.relu(net.layers["a"](x)), net.layers["b"](x)], dim=1))
    assert torch.allclose(net(x), expected)


def test_zero_padding_and_dropout() -> None:
    spec = model_json(
        input_layer(),
        layer("ZeroPadding2D", "pad", ("input_1",), padding=[[1, 2], [0, 3]]),
        layer("Dropout", "drop", ("pad",), rate=0.5, noise_shape=None),
    )
    net = from_keras_json(spec).eval()
    x = torch.rand(1, 2, 8, 8) + 1
    out = net(x)
    assert out.shape == (1, 2, 11, 11)
    assert torch.equal(out[..., 1:9, 0:8], x) and out[..., 0, :].abs().sum() == 0 and out[..., 8:].abs().sum() == 0
    trained = net.train()(x)[..., 1:9, 0:8]
    assert ((trained == 0) | torch.isclose(trained, 2 * x)).all() and (trained == 0).any()


def test_valid_padding_strides_and_pooling() -> None:
    spec = model_json(
        input_layer(),
        conv("valid", "input_1", 3, padding="valid"),
        conv("strided", "valid", 3, padding="valid", strides=[2, 2]),
        layer("MaxPooling2D", "pool", ("strided",), pool_size=[2, 2], strides=None, padding="valid"),
    )
    net = from_keras_json(spec)
    outputs = {}
    for name in ("valid", "strided", "pool"):
        net.layers[name].register_forward_hook(lambda module, args, out, name=name: outputs.update({name: out}))
    net(torch.randn(1, 2, 19, 19))
    assert [outputs[name].shape[-1] for name in ("valid", "strided", "pool")] == [17, 8, 4]


def test_other_supported_layers() -> None:
    spec = model_json(
        input_layer(),
        layer("AveragePooling2D", "avg", ("input_1",), pool_size=[3, 3], strides=[2, 2], padding="same"),
        layer("DepthwiseConv2D", "dw", ("avg",), kernel_size=[3, 3], depth_multiplier=2, padding="same"),
        layer("UpSampling2D", "up", ("dw",), size=[2, 2], interpolation="bilinear"),
        layer("BatchNormalization", "bn", ("up",), axis=[3], momentum=0.9, epsilon=0.01),
        layer("Activation", "act", ("bn",), activation="tanh"),
        layer("SeparableConv2D", "sep", ("act",), filters=3, kernel_size=[3, 3], strides=[2, 2], padding="same"),
        layer("Conv2DTranspose", "deconv", ("sep",), filters=2, kernel_size=[3, 3], strides=[2, 2], padding="same"),
        layer("Add", "add", ("deconv", "input_1")),
    )
    net = from_keras_json(spec).eval()
    assert count_parameters(net.layers["dw"]) == 3 * 3 * 2 * 2 + 2 * 2
    assert net.layers["bn"].momentum == pytest.approx(0.1) and net.layers["bn"].eps == pytest.approx(0.01)
    with torch.no_grad():
        assert torch.allclose(net.layers["avg"](torch.full((1, 2, 6, 6), 3.0)), torch.full((1, 2, 3, 3), 3.0))
        y = torch.randn(1, 4, 3, 5)
        assert torch.allclose(net.layers["up"](y), F.interpolate(y, scale_factor=2, mode="bilinear"))
        assert net(torch.randn(2, 2, 8, 12)).shape == (2, 2, 8, 12)


def test_unsupported_layer_type_names_the_layer() -> None:
    spec = model_json(input_layer(), layer("Flatten", "my_flatten", ("input_1",)))
    with pytest.raises(KerasJsonError, match=r"'my_flatten' \(Flatten\): unsupported layer type"):
        from_keras_json(spec)
    assert issubclass(KerasJsonError, ValueError)


@pytest.mark.parametrize(
    ("bad_layer", "option"),
    [
        (conv("bad", "input_1", 3, data_format="channels_first"), "data_format"),
        (conv("bad", "input_1", 3, activation="mish"), "activation"),
        (conv("bad", "input_1", 3, padding="causal"), "padding"),
        (conv("bad", "input_1", 3, groups=3), "groups"),
        (conv("bad", "input_1", 3, trainable=False), "trainable"),
        (layer("Conv2DTranspose", "bad", ("input_1",), filters=2, kernel_size=3, groups=2), "groups"),
        (layer("BatchNormalization", "bad", ("input_1",), axis=1), "axis"),
        (layer("Concatenate", "bad", ("input_1", "input_1"), axis=0), "axis"),
        (layer("UpSampling2D", "bad", ("input_1",), size=2, interpolation="bicubic"), "interpolation"),
        (layer("Dropout", "bad", ("input_1",), rate=0.5, noise_shape=[1, 1, 1, 2]), "noise_shape"),
        (layer("Add", "bad", ("input_1",)), "two or more inputs"),
        (layer("Conv2D", "bad", ("input_1",), kernel_size=3), "filters"),
    ],
)
def test_unsupported_option_names_layer_and_option(bad_layer: dict, option: str) -> None:
    with pytest.raises(KerasJsonError, match=rf"layer 'bad' .*{option}"):
        from_keras_json(model_json(input_layer(channels=2), bad_layer))


def test_graph_is_run_in_topological_order_whatever_the_file_order() -> None:
    spec = model_json(conv("second", "first", 2), conv("first", "input_1", 2), input_layer(), outputs=["second"])
    net = from_keras_json(spec)
    x = torch.randn(1, 2, 8, 8)
    assert torch.allclose(net(x), net.layers["second"](net.layers["first"](x)))
    missing = model_json(input_layer(), conv("orphan", "nowhere", 2))
    with pytest.raises(KerasJsonError, match=r"'orphan'.*\['nowhere'\]"):
        from_keras_json(missing)
    cycle = model_json(input_layer(), layer("Add", "a", ("input_1", "b")), conv("b", "a", 2))
    with pytest.raises(KerasJsonError, match="cycle"):
        from_keras_json(cycle)
    shared = layer("Conv2D", "shared", filters=2, kernel_size=1)
    shared["inbound_nodes"] = [[["input_1", 0, 0, {}]], [["input_1", 0, 0, {}]]]
    with pytest.raises(KerasJsonError, match="'shared'.*more than once"):
        from_keras_json(model_json(input_layer(), shared))


def test_several_inputs_and_outputs_and_unused_layers_pruned() -> None:
    spec = model_json(
        input_layer("x", channels=2),
        input_layer("y", channels=1),
        conv("cx", "x", 1),
        layer("Add", "sum", ("cx", "y")),
        conv("unused", "x", 4),
        conv("last", "x", 1),
        inputs=["x", "y"],
        outputs=["sum", "cx"],
    )
    net = from_keras_json(spec)
    assert set(net.layers) == {"cx", "sum"}
    x, y = torch.randn(1, 2, 8, 8), torch.randn(1, 1, 8, 8)
    total, cx = net(x, y)
    assert torch.allclose(total, cx + y)
    with pytest.raises(ValueError, match="input 'y' must be"):
        net(x, x)
    no_outputs = from_keras_json(model_json(input_layer(), conv("a", "input_1", 2), conv("b", "a", 5)))
    assert no_outputs.output_names == ["b"] and no_outputs(torch.randn(1, 2, 4, 4)).shape[1] == 5


def keras3_tensor(source: str) -> dict:
    return {"class_name": "__keras_tensor__", "config": {"shape": [None, 8, 8, 2], "keras_history": [source, 0, 0]}}


def keras3_layer(class_name: str, name: str, args: list, **config: Any) -> dict:
    return {
        "module": "keras.layers",
        "class_name": class_name,
        "name": name,
        "config": {"name": name, "dtype": {"class_name": "DTypePolicy", "config": {"name": "float32"}}, **config},
        "inbound_nodes": [{"args": args, "kwargs": {"mask": None}}] if args else [],
    }


def test_keras3_json_format() -> None:
    spec = {
        "module": "keras.src.models.functional",
        "class_name": "Functional",
        "config": {
            "name": "k3",
            "layers": [
                keras3_layer("InputLayer", "input_layer", [], batch_shape=[None, 8, 8, 2]),
                keras3_layer("Conv2D", "c", [keras3_tensor("input_layer")], filters=2, kernel_size=[1, 1]),
                keras3_layer("Concatenate", "cat", [[keras3_tensor("c"), keras3_tensor("input_layer")]], axis=-1),
            ],
            "input_layers": ["input_layer", 0, 0],
            "output_layers": ["cat", 0, 0],
        },
    }
    net = from_keras_json(spec)
    x = torch.randn(1, 2, 8, 8)
    assert torch.allclose(net(x), torch.cat([net.layers["c"](x), x], dim=1))


def test_bad_files_are_clear_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(KerasJsonError, match="broken.json: not valid JSON"):
        from_keras_json(broken)
    with pytest.raises(KerasJsonError, match="Sequential"):
        from_keras_json({"class_name": "Sequential", "config": {"layers": []}})
    with pytest.raises(KerasJsonError, match="no config.layers"):
        from_keras_json({"class_name": "Functional", "config": {}})
    good = tmp_path / "net.json"
    good.write_text(json.dumps(model_json(input_layer(), conv("c", "input_1", 2))))
    assert isinstance(from_keras_json(str(good)).layers["c"], nn.Conv2d)

"""Torch modules from Keras functional-model JSON (`model.to_json()`, the format of rmldnn's network files).

`from_keras_json` reads `config.layers`, wires each layer to its inbound nodes (Keras 2 lists or Keras 3
`keras_history` records), keeps the layers that lead to the outputs (`config.output_layers`, else the last
layer) and returns a `KerasGraph`: an `nn.Module` whose `layers` ModuleDict is keyed by Keras layer names, run
in topological order on NCHW tensors. Keras's channels_last axes map to torch's: channel axis -1 is dim 1.

Kept from each layer: shapes, padding ("same" aligned as TensorFlow, "valid"), strides, dilation, groups,
`use_bias`, the `activation` option, BatchNorm momentum/epsilon (Keras momentum m is torch momentum 1 - m).
Initialisers, regularisers, constraints and dtypes are not read: kernels start Glorot-uniform and biases zero,
Keras's defaults. A softmax on an output layer (a conv's `activation` or a trailing `Activation`) is left to the
loss, so the module returns logits. Anything else it cannot reproduce raises one `KerasJsonError` naming the layer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raypets.layers import (
    ACTIVATIONS,
    Activation,
    Add,
    Concatenate,
    KerasAvgPool2d,
    KerasConv2d,
    KerasConvTranspose2d,
    KerasDepthwiseConv2d,
    KerasMaxPool2d,
    KerasSeparableConv2d,
    pair,
)

# The network rmldnn's pets tutorial trains (`network_xception2D.json`), shipped with the package.
REFERENCE_NETWORK = Path(__file__).resolve().parent / "networks" / "network_xception2D.json"


class KerasJsonError(ValueError):
    """A Keras JSON network that this builder cannot reproduce faithfully."""


# Keras axis of an (N, H, W, C) tensor -> torch dim of the (N, C, H, W) tensor.
_AXES = {-1: 1, 3: 1, -3: 2, 1: 2, -2: 3, 2: 3}


@dataclass
class _Layer:
    name: str
    class_name: str
    config: dict[str, Any]
    inbound: tuple[str, ...]

    def error(self, message: str) -> KerasJsonError:
        return KerasJsonError(f"layer {self.name!r} ({self.class_name}): {message}")

    def option(self, key: str, default: Any = None, allowed: tuple[Any, ...] | None = None) -> Any:
        """`config[key]` (`default` when absent or null), checked against `allowed`."""
        value = self.config.get(key)
        value = default if value is None else value
        if allowed is not None and value not in allowed:
            raise self.error(f"unsupported {key} {value!r} (supported: {', '.join(map(repr, allowed))})")
        return value

    def required(self, key: str) -> Any:
        if self.config.get(key) is None:
            raise self.error(f"missing option {key}")
        return self.config[key]

    def conv_options(self) -> dict[str, Any]:
        """Padding, strides and dilation of a convolution or pooling layer."""
        return {
            "padding": self.option("padding", "valid", ("same", "valid")),
            "stride": pair(self.option("strides", 1)),
            "dilation": pair(self.option("dilation_rate", 1)),
        }

    def one_input(self, channels: list[int]) -> int:
        if len(channels) != 1:
            raise self.error(f"expects one input, got {len(channels)}")
        return channels[0]


Built = tuple[nn.Module, int]


def _conv2d(layer: _Layer, channels: list[int]) -> Built:
    c_in, filters = layer.one_input(channels), int(layer.required("filters"))
    groups = int(layer.option("groups", 1))
    if c_in % groups or filters % groups:
        raise layer.error(f"groups {groups} does not divide {c_in} input channels and {filters} filters")
    kernel = pair(layer.required("kernel_size"))
    bias = bool(layer.option("use_bias", True))
    return KerasConv2d(c_in, filters, kernel, groups=groups, bias=bias, **layer.conv_options()), filters


def _separable_conv2d(layer: _Layer, channels: list[int]) -> Built:
    c_in, filters = layer.one_input(channels), int(layer.required("filters"))
    layer.option("groups", 1, (1,))
    multiplier = int(layer.option("depth_multiplier", 1))
    kernel, bias = pair(layer.required("kernel_size")), bool(layer.option("use_bias", True))
    conv = KerasSeparableConv2d(c_in, filters, kernel, depth_multiplier=multiplier, bias=bias, **layer.conv_options())
    return conv, filters


def _depthwise_conv2d(layer: _Layer, channels: list[int]) -> Built:
    c_in, multiplier = layer.one_input(channels), int(layer.option("depth_multiplier", 1))
    kernel, bias = pair(layer.required("kernel_size")), bool(layer.option("use_bias", True))
    return KerasDepthwiseConv2d(c_in, kernel, multiplier, bias=bias, **layer.conv_options()), c_in * multiplier


def _conv2d_transpose(layer: _Layer, channels: list[int]) -> Built:
    c_in, filters = layer.one_input(channels), int(layer.required("filters"))
    layer.option("groups", 1, (1,))
    kernel, bias = pair(layer.required("kernel_size")), bool(layer.option("use_bias", True))
    output_padding = layer.option("output_padding")
    conv = KerasConvTranspose2d(c_in, filters, kernel, output_padding=output_padding, bias=bias, **layer.conv_options())
    return conv, filters


def _batch_normalization(layer: _Layer, channels: list[int], momentum: float | None) -> Built:
    c_in = layer.one_input(channels)
    axis = layer.option("axis", -1)
    if (axis[0] if isinstance(axis, list) and len(axis) == 1 else axis) not in (-1, 3):
        raise layer.error(f"unsupported axis {axis!r} (only the channel axis, -1 or 3)")
    layer.option("renorm", False, (False,))
    center, scale = layer.option("center", True), layer.option("scale", True)
    if center != scale:
        raise layer.error(f"unsupported center {center} with scale {scale} (both true or both false)")
    keras_momentum = float(layer.option("momentum", 0.99))
    torch_momentum = round(1.0 - keras_momentum, 12) if momentum is None else momentum
    eps = float(layer.option("epsilon", 1e-3))
    return nn.BatchNorm2d(c_in, eps=eps, momentum=torch_momentum, affine=bool(center)), c_in


def _pooling(layer: _Layer, channels: list[int]) -> Built:
    pool_size = pair(layer.option("pool_size", 2))
    options = layer.conv_options()
    if options.pop("dilation") != (1, 1):
        raise layer.error("unsupported dilation_rate")
    stride = pair(layer.option("strides", pool_size))
    pool = KerasMaxPool2d if layer.class_name == "MaxPooling2D" else KerasAvgPool2d
    return pool(pool_size, stride, options["padding"]), layer.one_input(channels)


def _up_sampling2d(layer: _Layer, channels: list[int]) -> Built:
    size = tuple(float(s) for s in pair(layer.option("size", 2)))
    mode = layer.option("interpolation", "nearest", ("nearest", "bilinear"))
    upsample = nn.Upsample(scale_factor=size, mode=mode, align_corners=False if mode == "bilinear" else None)
    return upsample, layer.one_input(channels)


def _zero_padding2d(layer: _Layer, channels: list[int]) -> Built:
    padding = layer.option("padding", 1)
    if isinstance(padding, int):
        (top, bottom), (left, right) = (padding, padding), (padding, padding)
    elif all(isinstance(p, int) for p in padding):
        (top, bottom), (left, right) = (padding[0],) * 2, (padding[1],) * 2
    else:
        (top, bottom), (left, right) = map(pair, padding)
    return nn.ZeroPad2d((left, right, top, bottom)), layer.one_input(channels)


def _dropout(layer: _Layer, channels: list[int]) -> Built:
    layer.option("noise_shape", None, (None,))
    return nn.Dropout(float(layer.required("rate"))), layer.one_input(channels)


def _activation(layer: _Layer, channels: list[int]) -> Built:
    return Activation(layer.option("activation", "linear", tuple(ACTIVATIONS))), layer.one_input(channels)


def _add(layer: _Layer, channels: list[int]) -> Built:
    if len(channels) < 2 or len(set(channels)) != 1:
        raise layer.error(f"needs two or more inputs with equal channels, got channels {channels}")
    return Add(), channels[0]


def _concatenate(layer: _Layer, channels: list[int]) -> Built:
    axis = layer.option("axis", -1)
    if axis not in _AXES:
        raise layer.error(f"unsupported axis {axis!r}")
    dim = _AXES[axis]
    if dim != 1 and len(set(channels)) != 1:
        raise layer.error(f"inputs with different channels {channels} concatenated along axis {axis}")
    return Concatenate(dim), sum(channels) if dim == 1 else channels[0]


_BUILDERS: dict[str, Callable[[_Layer, list[int]], Built]] = {
    "Conv2D": _conv2d,
    "SeparableConv2D": _separable_conv2d,
    "DepthwiseConv2D": _depthwise_conv2d,
    "Conv2DTranspose": _conv2d_transpose,
    "Activation": _activation,
    "MaxPooling2D": _pooling,
    "AveragePooling2D": _pooling,
    "UpSampling2D": _up_sampling2d,
    "Add": _add,
    "Concatenate": _concatenate,
    "Dropout": _dropout,
    "ZeroPadding2D": _zero_padding2d,
}
_WITH_ACTIVATION = {"Conv2D", "SeparableConv2D", "DepthwiseConv2D", "Conv2DTranspose"}
_SUPPORTED = sorted({"InputLayer", "BatchNormalization", *_BUILDERS})


@dataclass(frozen=True)
class _Step:
    name: str
    sources: tuple[str, ...]
    activation: str  # applied after the layer (a conv's `activation` option)
    release: tuple[str, ...]  # values no later step needs


class KerasGraph(nn.Module):
    """A Keras functional graph: `layers` keyed by Keras layer names, run in topological order.

    `forward(*inputs)` takes one NCHW tensor per Keras input (in `input_names` order) and returns the output
    tensor, or a tuple of them when the graph has several outputs (`output_names`).
    """

    def __init__(
        self,
        layers: nn.ModuleDict,
        steps: list[_Step],
        inputs: dict[str, int],
        outputs: list[str],
    ) -> None:
        super().__init__()
        self.layers = layers
        self.input_channels = inputs
        self.output_names = outputs
        self._steps = steps

    @property
    def input_names(self) -> list[str]:
        return list(self.input_channels)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_channels):
            raise ValueError(f"expected {len(self.input_channels)} inputs {self.input_names}, got {len(inputs)}")
        values: dict[str, torch.Tensor] = {}
        for (name, channels), x in zip(self.input_channels.items(), inputs, strict=True):
            if x.dim() != 4 or x.shape[1] != channels:
                raise ValueError(f"input {name!r} must be (N, {channels}, H, W), got shape {tuple(x.shape)}")
            values[name] = x
        for step in self._steps:
            y = self.layers[step.name](*(values[s] for s in step.sources))
            values[step.name] = ACTIVATIONS[step.activation](y)
            for name in step.release:
                del values[name]
        outputs = tuple(values[name] for name in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs


def _model_config(source: str | os.PathLike[str] | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        data = source
    else:
        try:
            data = json.loads(Path(source).read_text())
        except json.JSONDecodeError as error:
            raise KerasJsonError(f"{source}: not valid JSON ({error})") from error
    if data.get("class_name") == "Sequential":
        raise KerasJsonError("Sequential models are not supported: save the network as a functional model")
    config = data if "layers" in data else data.get("config", {})
    if not isinstance(config, Mapping) or not isinstance(config.get("layers"), list):
        raise KerasJsonError("not a Keras functional model: no config.layers list")
    return config


def _tensor_refs(value: Any) -> list[list[Any]]:
    """`[name, node_index, tensor_index]` of every Keras 3 `__keras_tensor__` inside call arguments."""
    if isinstance(value, Mapping):
        if value.get("class_name") == "__keras_tensor__":
            return [value["config"]["keras_history"]]
        return [ref for item in value.values() for ref in _tensor_refs(item)]
    if isinstance(value, list):
        return [ref for item in value for ref in _tensor_refs(item)]
    return []


def _parse_layer(raw: Mapping[str, Any]) -> _Layer:
    config = dict(raw.get("config") or {})
    layer = _Layer(str(raw.get("name", config.get("name"))), str(raw.get("class_name")), config, ())
    nodes = raw.get("inbound_nodes", [])
    if len(nodes) > 1:
        raise layer.error("is called more than once (shared layers are not supported)")
    refs: list[list[Any]] = []
    kwargs: Mapping[str, Any] = {}
    if nodes and isinstance(nodes[0], Mapping):  # Keras 3: {"args": [...], "kwargs": {...}}
        refs, kwargs = _tensor_refs(nodes[0].get("args", [])), nodes[0].get("kwargs") or {}
    elif nodes:  # Keras 2: [[name, node_index, tensor_index, kwargs], ...]
        refs = [list(ref[:3]) for ref in nodes[0]]
        for ref in nodes[0]:
            kwargs = {**kwargs, **(ref[3] if len(ref) > 3 else {})}
    if any(value is not None for value in kwargs.values()):
        raise layer.error(f"unsupported call arguments {dict(kwargs)}")
    if any(ref[1:3] != [0, 0] for ref in refs):
        raise layer.error(f"unsupported inbound node {refs} (shared or multi-output layers)")
    if "." in layer.name or not layer.name:
        raise layer.error("layer names must be non-empty and contain no '.'")
    layer.inbound = tuple(ref[0] for ref in refs)
    return layer


def _endpoints(config: Mapping[str, Any], key: str) -> list[str] | None:
    refs = config.get(key)
    if not refs:
        return None
    if isinstance(refs[0], str):  # Keras 3 writes a single endpoint as one flat [name, 0, 0]
        refs = [refs]
    return [ref[0] for ref in refs]


def _input_channels(layer: _Layer) -> int:
    shape = layer.config.get("batch_input_shape") or layer.config.get("batch_shape")
    if not shape or len(shape) != 4 or shape[-1] is None:
        raise layer.error(f"needs a known (batch, height, width, channels) input shape, got {shape}")
    return int(shape[-1])


def _ordered(layers: dict[str, _Layer], outputs: list[str]) -> list[_Layer]:
    """The layers the outputs depend on, in file order with each layer moved after its inputs."""
    order: list[_Layer] = []
    state: dict[str, str] = {}  # "open" while its inputs are being placed, then "done"
    needed = {name for name in layers if name in outputs}
    stack = list(reversed(outputs))
    while stack:  # find every layer the outputs depend on
        for source in layers[stack.pop()].inbound:
            if source not in needed:
                needed.add(source)
                stack.append(source)
    for root in (name for name in layers if name in needed):
        stack = [root]
        while stack:
            name = stack[-1]
            if state.get(name) == "done":
                stack.pop()
                continue
            state[name] = "open"
            waiting = [s for s in layers[name].inbound if state.get(s) != "done"]
            if any(state.get(s) == "open" for s in waiting):
                raise layers[name].error("is part of a cycle in the graph")
            if waiting:
                stack.extend(reversed(waiting))
            else:
                state[name] = "done"
                order.append(layers[name])
                stack.pop()
    return order


def from_keras_json(
    source: str | os.PathLike[str] | Mapping[str, Any], *, bn_momentum: float | None = None
) -> KerasGraph:
    """Build a `KerasGraph` from a Keras functional-model JSON file or its parsed dict.

    `bn_momentum` overrides every BatchNormalization's torch momentum (default: 1 - Keras momentum).
    Output softmaxes are left to the loss: the module returns logits. Raises `KerasJsonError`.
    """
    config = _model_config(source)
    layers: dict[str, _Layer] = {}
    for raw in config["layers"]:
        layer = _parse_layer(raw)
        if layer.name in layers:
            raise layer.error("duplicate layer name")
        layers[layer.name] = layer
    for layer in layers.values():
        if layer.class_name not in _SUPPORTED:
            raise layer.error(f"unsupported layer type (supported: {', '.join(_SUPPORTED)})")
        missing = [s for s in layer.inbound if s not in layers]
        if missing:
            raise layer.error(f"inbound layers {missing} are not in the model")
        if layer.class_name != "InputLayer" and not layer.inbound:
            raise layer.error("has no inbound nodes")
    input_names = _endpoints(config, "input_layers") or [
        name for name, layer in layers.items() if layer.class_name == "InputLayer"
    ]
    output_names = _endpoints(config, "output_layers") or [list(layers)[-1]]
    for name in input_names + output_names:
        if name not in layers:
            raise KerasJsonError(f"model input/output {name!r} is not a layer of the model")

    channels: dict[str, int] = {name: _input_channels(layers[name]) for name in input_names}
    modules = nn.ModuleDict()
    steps: list[tuple[str, tuple[str, ...], str]] = []
    for layer in _ordered(layers, output_names):
        if layer.class_name == "InputLayer":
            if layer.name not in channels:
                raise layer.error("is not among the model's input_layers")
            continue
        layer.option("data_format", "channels_last", ("channels_last",))
        layer.option("trainable", True, (True,))
        activation = "linear"
        if layer.class_name in _WITH_ACTIVATION:
            activation = layer.option("activation", "linear", tuple(ACTIVATIONS))
        try:
            sources = [channels[s] for s in layer.inbound]
            if layer.class_name == "BatchNormalization":
                module, channels[layer.name] = _batch_normalization(layer, sources, bn_momentum)
            else:
                module, channels[layer.name] = _BUILDERS[layer.class_name](layer, sources)
            modules[layer.name] = module
        except KerasJsonError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise layer.error(f"invalid configuration ({type(error).__name__}: {error})") from error
        steps.append((layer.name, layer.inbound, activation))

    consumers = {source for _, sources, _ in steps for source in sources}
    for i, (name, sources, activation) in enumerate(steps):
        module = modules[name]
        softmax = activation == "softmax" or (isinstance(module, Activation) and module.function == "softmax")
        if name in output_names and softmax:
            if name in consumers:
                raise layers[name].error("an output softmax that other layers also read is not supported")
            if isinstance(module, Activation):
                module.function = "linear"
            steps[i] = (name, sources, "linear")

    last_use = {source: i for i, (_, sources, _) in enumerate(steps) for source in sources}
    plan = []
    for i, (name, sources, activation) in enumerate(steps):
        release = tuple(s for s in dict.fromkeys(sources) if last_use[s] == i and s not in output_names)
        plan.append(_Step(name, sources, activation, release))
    return KerasGraph(modules, plan, {name: channels[name] for name in input_names}, output_names)

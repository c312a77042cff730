"""``raypets export``: a checkpoint as self-contained model files for serving without raypets. No Ray here.

The exported network takes what ``raypets predict`` feeds its model, uint8 RGB images (N, H, W, 3) already resized
to the network size, and returns the float32 softmax (N, C, H, W) that predict writes to HDF5: the checkpoint's
normalisation and the softmax are inside the graph. The batch is dynamic; H and W are fixed, because Keras "same"
padding depends on them. One trace of that network gives both files: ``model.ts`` (TorchScript) and
``model.onnx`` (the legacy TorchScript-based ONNX exporter, opset 17, output shapes declared); ``model.json``
beside them says what they hold. ONNX needs the ``export`` extra (onnx, onnxruntime).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from raypets.checkpoints import Checkpoint, checkpoint_classes, load_model, resolve_checkpoint
from raypets.errors import UserError
from raypets.model import require_image_size, to_inputs
from raypets.outputs import check_output_folder, staged_output
from raypets.redaction import redact
from raypets.storage import Location

FILES = {"onnx": "model.onnx", "torchscript": "model.ts"}
FORMATS = (*FILES, "all")
INFO_FILE = "model.json"
EXPORT_ENTRIES = frozenset({*FILES.values(), INFO_FILE})
INPUT, OUTPUT, BATCH = "image", "probs", "batch"
OPSET = 17


@dataclass(frozen=True)
class ExportConfig:
    """Settings of ``raypets export``: which formats of ``checkpoint`` to write into folder ``out``."""

    checkpoint: Location
    out: Path
    format: str = "all"
    size: tuple[int, int] = (160, 160)  # network input (height, width)
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))  # a str from a notebook
        if self.format not in FORMATS:
            raise UserError(f"unknown export format {self.format!r}; choose {', '.join(FORMATS)}")
        require_image_size(*self.size, "--size")

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(FILES) if self.format == "all" else (self.format,)


class SoftmaxModel(nn.Module):
    """``model`` with its input normalisation and the softmax: uint8 (N, H, W, 3) -> float32 (N, C, H, W)."""

    def __init__(self, model: nn.Module, normalize: tuple[float, float]) -> None:
        super().__init__()
        self.model = model
        self.mean, self.std = normalize

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(to_inputs(image, self.mean, self.std)), dim=1)


def export(cfg: ExportConfig) -> dict:
    """Write the formats of ``cfg`` and ``model.json`` into ``cfg.out``; return what ``model.json`` holds."""
    check_output_folder(cfg.out, "model export", ours=EXPORT_ENTRIES, overwrite=cfg.overwrite)
    if "onnx" in cfg.formats:
        _onnx()  # a missing extra fails before any work
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    network = SoftmaxModel(load_model(checkpoint), checkpoint.normalize).eval()
    example = torch.zeros((2, *cfg.size, 3), dtype=torch.uint8)  # batch 2: nothing may specialise on batch 1
    with torch.no_grad(), _quiet_exporters():
        traced = torch.jit.trace(network, example, check_trace=False)
        num_classes = traced(example).shape[1]
    info = model_info(checkpoint, cfg, checkpoint_classes(checkpoint, num_classes))
    contract = {key: info[key] for key in ("classes", "size", "normalize")}
    with staged_output(cfg.out) as staging, _quiet_exporters():
        if "torchscript" in cfg.formats:
            torch.jit.save(traced, str(staging / FILES["torchscript"]),
                           _extra_files={INFO_FILE: json.dumps(contract)})
        if "onnx" in cfg.formats:
            write_onnx(traced, example, staging / FILES["onnx"], num_classes, contract)
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def model_info(checkpoint: Checkpoint, cfg: ExportConfig, classes: list[str]) -> dict:
    """``model.json``: the contract of the files, the source checkpoint and its training settings (no secrets)."""
    height, width = cfg.size
    mean, std = checkpoint.normalize
    return {
        "files": {fmt: FILES[fmt] for fmt in cfg.formats},
        "input": {"name": INPUT, "dtype": "uint8", "shape": [BATCH, height, width, 3], "channels": "RGB",
                  "resize": "to the network size first; raypets predict resizes bilinear (PIL)"},
        "output": {"name": OUTPUT, "dtype": "float32", "shape": [BATCH, len(classes), height, width],
                   "values": "softmax over the classes (axis 1)"},
        "classes": classes,
        "size": [height, width],
        "normalize": {"mean": mean, "std": std, "inside": "(pixel / 255 - mean) / std"},
        "checkpoint": redact(checkpoint.uri or str(checkpoint.weights.resolve())),
        "epoch": checkpoint.epoch,
        "training": redact(checkpoint.train_config),
        "onnx_opset": OPSET if "onnx" in cfg.formats else None,
        "torch": torch.__version__,
    }


def write_onnx(traced: torch.jit.ScriptModule, example: torch.Tensor, path: Path, num_classes: int,
               contract: dict) -> None:
    """``traced`` as ONNX at ``path``: input ``image``, output ``probs``, dynamic batch, ``contract`` in the
    metadata under ``raypets``."""
    onnx = _onnx()
    torch.onnx.export(traced, (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                      dynamic_axes={INPUT: {0: BATCH}, OUTPUT: {0: BATCH}}, opset_version=OPSET, dynamo=False)
    proto = onnx.load(str(path))
    # The exporter's shape inference loses H and W of the output: declare them.
    for dim, value in zip(proto.graph.output[0].type.tensor_type.shape.dim,
                          (BATCH, num_classes, *example.shape[1:3]), strict=True):
        if isinstance(value, str):
            dim.dim_param = value
        else:
            dim.dim_value = int(value)
    onnx.helper.set_model_props(proto, {"raypets": json.dumps(contract)})
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


@contextmanager
def _quiet_exporters() -> Iterator[None]:
    """Without the warnings every export gives: the tracer's at the network's size checks and "same" padding (a
    fixed H x W is the contract), and TorchScript's and the legacy ONNX exporter's deprecation notices."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", ".*torch.jit", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", "no signature found", UserWarning)
        yield


def _onnx():
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs the onnx package: pip install 'raypets[export]' "
                        "(or --format torchscript)") from None
    return onnx

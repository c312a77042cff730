"""What ``--precision auto|bf16|fp16|fp32`` means on a device: autocast dtype and loss scaling. No Ray here.

``auto`` is bf16 on a GPU that computes it natively (Ampere and later), fp16 with a ``GradScaler`` on one that does
not (V100, T4), fp32 on a CPU. An explicit choice the device cannot honour is one clear error.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from raypets.errors import UserError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Precision:
    """A resolved precision (bf16, fp16 or fp32) on ``device_type`` (cuda or cpu)."""

    name: str
    device_type: str

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    @property
    def scaled(self) -> bool:
        """Whether training needs a ``GradScaler`` (fp16's small range underflows gradients)."""
        return self.name == "fp16"

    def autocast(self) -> AbstractContextManager:
        """The autocast region of forward passes (a no-op for fp32)."""
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.name != "fp32")


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """``requested`` (one of ``PRECISIONS``) on ``device``."""
    if requested not in PRECISIONS:
        raise UserError(f"unknown precision {requested!r}; choose {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        if requested == "fp16":
            raise UserError("--precision fp16 needs a GPU; on a CPU use fp32 (the default) or bf16")
        return Precision("fp32" if requested == "auto" else requested, device.type)
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if requested == "bf16" and not native_bf16:
        raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no native bf16; "
                        "use fp16 or auto")
    if requested == "auto":
        requested = "bf16" if native_bf16 else "fp16"
    return Precision(requested, device.type)


def require_cuda() -> None:
    """One clear error when GPUs were granted but this torch sees no CUDA device (instead of running on the CPU)."""
    if not torch.cuda.is_available():
        raise UserError(f"GPUs were granted, but torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA "
                        "device here: the node's NVIDIA driver may be too old for this torch wheel "
                        "(`nvidia-smi` shows the driver's CUDA version), or the GPU is not visible to this process")


def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (Intel AMX), where bf16 autocast trains faster than fp32
    (docs/benchmarks.md); elsewhere bf16 is emulated, and slower."""
    return bool(torch.cpu.get_capabilities().get("amx_bf16"))

"""A loaded model placed for inference: the one forward pass that ``evaluate`` and ``predict`` actors share."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from raypets.model import to_inputs


class ModelRunner:
    """Holds ``model`` on the GPU (``use_gpu``) or the CPU, channels_last (on CPU too: 1.7x faster forward than
    contiguous here), and turns uint8 (N, H, W, 3) images into logits, under bf16 autocast on a GPU. Ray Data actor
    classes build on it; ``actors`` is their pool's size, which shares the node's cores as torch threads."""

    def __init__(self, model: nn.Module, normalize: tuple[float, float], use_gpu: bool, actors: int) -> None:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // actors))
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.mean, self.std = normalize
        self.use_gpu = use_gpu

    def logits(self, images: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(np.require(images, requirements="W"))  # Arrow's arrays are read-only
        x = to_inputs(pixels.to(self.device), self.mean, self.std, channels_last=True)
        with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.use_gpu):
            return self.model(x)

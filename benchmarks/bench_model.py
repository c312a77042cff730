"""Forward + backward throughput of XceptionUNet against the same network built by `from_keras_json`.

    python benchmarks/bench_model.py [--batch 8] [--size 160] [--steps 6] [--no-docs]

Both models train on the same random batch, their steps interleaved so that machine noise hits both alike; the
median step time gives images/s. On CPU torch uses one thread per core; with CUDA the GPU is measured as well,
under bf16 autocast with channels_last tensors. The table replaces the model section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from docs_section import DOCS, machine, write_section
from torch import nn

from raypets.keras_json import REFERENCE_NETWORK
from raypets.model import XceptionUNet, from_keras_json

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Model: forward + backward throughput (`benchmarks/bench_model.py`)"


def train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, autocast: bool) -> Callable[[], None]:
    """One forward + backward pass of `model` (gradients dropped each time), as a callable."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), target)
        loss.backward()

    return step


def measure(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, timed: int) -> dict[str, float]:
    """Median seconds per step of each callable, interleaved, the order reversed every other round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + timed):
        for name in list(steps) if i % 2 == 0 else list(reversed(steps)):
            step = steps[name]
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def run(device: torch.device, batch: int, size: int, warmup: int, timed: int, network: Path) -> dict[str, float]:
    """Images/s of the built-in and the JSON-built model on `device`."""
    torch.manual_seed(0)
    gpu = device.type == "cuda"
    memory_format = torch.channels_last if gpu else torch.contiguous_format
    models = {"XceptionUNet": XceptionUNet(), "from_keras_json": from_keras_json(network)}
    x = (torch.rand(batch, 3, size, size) * 255).to(device, memory_format=memory_format)
    target = torch.randint(0, 3, (batch, size, size), device=device)
    steps = {}
    for name, model in models.items():
        model.to(device, memory_format=memory_format).train()
        steps[name] = train_step(model, x, target, autocast=gpu)
    seconds = measure(steps, device, warmup, timed)
    return {name: batch / s for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="CPU batch size (default 8)")
    parser.add_argument("--gpu-batch", type=int, default=64, help="GPU batch size (default 64)")
    parser.add_argument("--size", type=int, default=160, help="image height and width (default 160)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model (default 2)")
    parser.add_argument("--steps", type=int, default=6, help="timed CPU steps per model (default 6)")
    parser.add_argument("--gpu-steps", type=int, default=20, help="timed GPU steps per model (default 20)")
    parser.add_argument("--network", type=Path, default=REFERENCE_NETWORK,
                        help="Keras JSON of the network (default: the tutorial's, shipped with raypets)")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    network = args.network

    torch.set_num_threads(os.cpu_count() or 1)
    host = machine()
    cpu = run(torch.device("cpu"), args.batch, args.size, args.warmup, args.steps, network)
    rows = [("CPU", "fp32", args.batch, cpu)]
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        result = run(cuda, args.gpu_batch, args.size, max(args.warmup, 3), args.gpu_steps, network)
        rows.append((torch.cuda.get_device_name(cuda), "bf16 autocast, channels_last", args.gpu_batch, result))

    table = [
        "| device | precision | batch | XceptionUNet images/s | from_keras_json images/s | JSON-built / built-in |",
        "|---|---|---|---|---|---|",
    ]
    for device, precision, batch, ips in rows:
        ratio = ips["from_keras_json"] / ips["XceptionUNet"]
        table.append(
            f"| {device} | {precision} | {batch} | {ips['XceptionUNet']:.1f} | {ips['from_keras_json']:.1f} "
            f"| {ratio:.2f} |"
        )
    command = f"python benchmarks/bench_model.py --batch {args.batch} --size {args.size} --steps {args.steps}"
    gpu_note = (
        f"GPU: median of {args.gpu_steps} steps after {max(args.warmup, 3)} warm-up."
        if torch.cuda.is_available()
        else "No GPU on this machine: a GPU row (bf16 autocast, channels_last) appears where CUDA is available."
    )
    text = "\n".join(
        [
            SECTION,
            "",
            f"{date.today().isoformat()}, {host}, {torch.get_num_threads()} torch threads; `{command}`.",
            f"A training step (forward, cross-entropy, backward) at {args.size}x{args.size}; images/s from the median "
            f"of {args.steps} timed CPU steps after {args.warmup} warm-up, the two models interleaved. {gpu_note}",
            "",
            *table,
        ]
    )
    print(text)
    if not args.no_docs:
        write_section(SECTION, text)
        print(f"\nwrote {DOCS}")


if __name__ == "__main__":
    main()

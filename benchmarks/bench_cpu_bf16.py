"""A training step of the strong recipe's network on this CPU: bf16 autocast against fp32, both channels_last.

    python benchmarks/bench_cpu_bf16.py [--shapes 96x8,96x4,64x8,64x16] [--threads 2,1] [--steps 8] [--write-docs]

The baseline is the fp32 step a competent user runs on a CPU (channels_last, all cores, or one core per process as
Ray Train's CPU workers have). Both steps (forward, Dice loss, backward, RMSprop) train their own copy of
``XceptionUNet(skips=True)`` on the same random batch, interleaved; images/s from the median step. On CPUs with
AMX (``torch.cpu.get_capabilities()["amx_bf16"]``) oneDNN multiplies bf16 natively; elsewhere it emulates it.
"""

from __future__ import annotations

import argparse
from datetime import date

import torch
from bench_model import measure
from docs_section import machine, write_section

from raypets.losses import make_loss
from raypets.model import XceptionUNet
from raypets.precision import cpu_computes_bf16

SECTION = "## Train: bf16 autocast against fp32 on this CPU (`benchmarks/bench_cpu_bf16.py`)"


def step_of(batch: int, size: int, bf16: bool):
    """A training step of a fresh network on a fixed random batch, as a callable."""
    torch.manual_seed(0)
    model = XceptionUNet(3, bn_momentum=0.1, skips=True).to(memory_format=torch.channels_last)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    loss_fn = make_loss("dice")
    x = (torch.rand(batch, 3, size, size) * 255).to(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (batch, size, size))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss_fn(logits, y).backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="96x8,96x4,64x8,64x16", help="SIZExBATCH, comma-separated")
    parser.add_argument("--threads", default="2,1", help="torch threads, comma-separated")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    rows = []
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for shape in args.shapes.split(","):
            size, batch = map(int, shape.split("x"))
            steps = {"fp32": step_of(batch, size, False), "bf16": step_of(batch, size, True)}
            seconds = measure(steps, torch.device("cpu"), warmup=2, timed=args.steps)
            fp32, bf16 = batch / seconds["fp32"], batch / seconds["bf16"]
            rows.append(f"| {threads} | {size} | {batch} | {fp32:.1f} | {bf16:.1f} | **{bf16 / fp32:.2f}** |")
            print(rows[-1], flush=True)
    command = (f"python benchmarks/bench_cpu_bf16.py --shapes {args.shapes} --threads {args.threads} "
               f"--steps {args.steps}")
    text = "\n".join([
        SECTION, "",
        f"{date.today().isoformat()}, {machine()}, native bf16 (AMX): {cpu_computes_bf16()}; `{command}`. A "
        f"training step of `XceptionUNet(skips=True)` (Dice, RMSprop), fp32 and bf16 autocast interleaved, both "
        f"channels_last; images/s from the median of {args.steps} steps after 2 warm-up.", "",
        "| torch threads | px | batch | fp32 images/s | bf16 images/s | bf16 / fp32 |",
        "|---|---|---|---|---|---|",
        *rows])
    print(text)
    if args.write_docs:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()

"""Training images/s of ``raypets train`` (Ray Train, 1 and 2 CPU workers) against a plain PyTorch loop.

    python benchmarks/bench_train.py [--n 320] [--size 64] [--batch 16] [--epochs 4] [--write-docs]

Same shards, model, loss, optimizer, global batch and torch thread count; the figure is the median training
images/s of epochs 2.. (the first one pays the workers' start), evaluation excluded, as ``raypets train`` reports it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from docs_section import machine, write_section

SECTION = "## Train: Ray Train against a plain PyTorch loop (`benchmarks/bench_train.py`)"


def plain_loop(shards: Path, batch: int, epochs: int, threads: int, device: str = "cpu") -> float:
    """Median images/s over epochs 2.. of the best single-process loop doing what one Ray Train worker does: the
    split preloaded as model inputs on ``device``, model and inputs channels_last, bf16 autocast on a GPU."""
    from raypets.config import TrainConfig
    from raypets.losses import make_loss
    from raypets.model import build_network, to_inputs
    from raypets.optim import make_optimizer
    from raypets.stages.shards import load_split

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = TrainConfig(data=shards, run_dir=shards, batch_size=batch)
    data = load_split(shards, "train")
    gpu = torch.device(device).type == "cuda"
    images = torch.from_numpy(data["image"]).to(device)
    inputs = to_inputs(images, cfg.normalize_mean, cfg.normalize_std, channels_last=True)
    masks = torch.from_numpy(data["mask"]).to(device).long()
    model = build_network(3, cfg.network, cfg.bn_momentum).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr)
    loss_fn = make_loss(cfg.loss, check_values=False)
    step, rates, steps_per_epoch = 0, [], cfg.steps_per_epoch(len(inputs))
    for epoch in range(1, epochs + 1):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(inputs), device=device)
        for first in range(0, len(order), batch):
            index = order[first: first + batch]
            x, y = inputs[index].contiguous(memory_format=torch.channels_last), masks[index]
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr_at(step, epoch, steps_per_epoch)
            with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=gpu):
                loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        if gpu:
            torch.cuda.synchronize()
        rates.append(len(inputs) / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def ray_train(shards: Path, run_dir: Path, workers: int, batch: int, epochs: int) -> float:
    from raypets.config import TrainConfig
    from raypets.runlog import read_metrics
    from raypets.stages.train import train

    train(TrainConfig(data=shards, run_dir=run_dir, workers=workers, batch_size=batch, test_batch_size=batch,
                      epochs=epochs, checkpoint_every=epochs))
    return statistics.median(m["images_per_s"] for m in read_metrics(run_dir)[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=320)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    import ray

    from raypets.data.synth import synthesize
    from raypets.stages.prepare import PrepareConfig, prepare
    from raypets.stages.runtime import set_progress_bars

    threads = os.cpu_count() or 1
    host = machine()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize(root / "raw", n=args.n, size=(4 * args.size, 3 * args.size), seed=0)
        ray.init(num_cpus=threads + 2, include_dashboard=False, log_to_driver=False)
        set_progress_bars(False)
        prepare(PrepareConfig(root / "raw", root / "shards", size=(args.size, args.size), test_fraction=0.1))
        before = plain_loop(root / "shards", args.batch, args.epochs, threads)
        one = ray_train(root / "shards", root / "run1", 1, args.batch, args.epochs)
        two = ray_train(root / "shards", root / "run2", 2, args.batch, args.epochs)
        ray.shutdown()
        after = plain_loop(root / "shards", args.batch, args.epochs, threads)  # before and after: drift cancels
    plain = (before + after) / 2
    text = f"""{SECTION}

{date.today().isoformat()}, {host}; `python benchmarks/bench_train.py \
--n {args.n} --size {args.size} --batch {args.batch} --epochs {args.epochs}`. XceptionUNet, Dice, RMSprop, \
global batch {args.batch}, {args.size}×{args.size} synthetic shards ({args.n} images, 90% train); images/s of the \
training, median of epochs 2..{args.epochs}.

| run | train images/s | ratio to the plain loop |
|---|---|---|
| plain PyTorch loop (preloaded channels_last inputs and model), 1 process, {threads} threads (mean of a run \
before and after: {before:.1f}, {after:.1f}) \
| {plain:.1f} | 1.00 |
| `raypets train --workers 1` (Ray Train, Ray Data shard) | {one:.1f} | **{one / plain:.2f}** |
| `raypets train --workers 2` (DDP over gloo, {threads // 2} thread(s) each) | {two:.1f} | {two / plain:.2f} |

- 1 worker / plain loop: **{one / plain:.2f}** (target ≥ 0.90). 2 workers / 1 worker on this {threads}-core machine: \
{two / one:.2f}.
"""
    print(text)
    if args.write_docs:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()

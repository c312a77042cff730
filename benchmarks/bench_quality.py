"""What ``raypets train``'s default recipe reaches on synthetic data in about 10 minutes of 2-worker CPU training.

    python benchmarks/bench_quality.py [--n 600] [--size 96] [--epochs 12] [--batch 8] [--write-docs]

``raypets synth --n 600`` + ``prepare`` at 96 px, then ``raypets train --workers 2``; reports the test mean and
per-class Dice per epoch against the constant all-background predictor of the same test split.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import date
from pathlib import Path

from docs_section import machine, write_section

SECTION = "## Train: quality reached on synthetic data (`benchmarks/bench_quality.py`)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    import ray

    from raypets.config import DEFAULT_RECIPE, RECIPES, TrainConfig
    from raypets.data.synth import synthesize
    from raypets.runlog import read_metrics
    from raypets.stages.prepare import PrepareConfig, prepare
    from raypets.stages.runtime import set_progress_bars
    from raypets.stages.shards import load_split
    from raypets.stages.train import train

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize(root / "raw", n=args.n, size=(320, 240), seed=0)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        set_progress_bars(False)
        prepare(PrepareConfig(root / "raw", root / "shards", size=(args.size, args.size)))
        background = (load_split(root / "shards", "test")["mask"] == 1).mean()
        start = time.perf_counter()
        train(TrainConfig(data=root / "shards", run_dir=root / "run", workers=2, epochs=args.epochs,
                          batch_size=args.batch, test_batch_size=2 * args.batch, checkpoint_every=args.epochs,
                          **RECIPES[DEFAULT_RECIPE]))
        minutes = (time.perf_counter() - start) / 60
        history = read_metrics(root / "run")
        ray.shutdown()
    constant = 2 * background / (1 + background) / 3
    last = history[-1]
    text = f"""{SECTION}

{date.today().isoformat()}, {machine()}; `python benchmarks/bench_quality.py --n {args.n} --size {args.size} \
--epochs {args.epochs} --batch {args.batch}`. `raypets train`'s default recipe, `{DEFAULT_RECIPE}` \
({RECIPES[DEFAULT_RECIPE]}; RMSprop lr 1e-3, Dice), 2 CPU workers, global batch {args.batch}, synthetic 320×240 \
images prepared at {args.size} px (90/10 split).
Training took {minutes:.1f} min for {args.epochs} epochs.

- Test mean Dice per epoch: {" ".join(f"{m['mean_dice']:.3f}" for m in history)}
- Final: mean Dice **{last['mean_dice']:.3f}** (pet {last['dice_pet']:.3f}, background {last['dice_background']:.3f}, \
border {last['dice_border']:.3f}), mIoU {last['mean_iou']:.3f}, pixel accuracy {last['pixel_accuracy']:.3f}; \
a constant all-background prediction scores mean Dice {constant:.3f} on this test split.
"""
    print(text)
    if args.write_docs:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()

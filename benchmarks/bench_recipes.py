"""Does the default recipe collapse? 5 seeds of ``--recipe robust`` against the tutorial's literal recipe.

    python benchmarks/bench_recipes.py [--n 300] [--size 64] [--epochs 4] [--seeds 5] [--write-docs]

Each run is ``raypets train`` with 2 CPU workers on the same synthetic shards; a run collapses when its test
predictions are all one class (the epoch line says COLLAPSED).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from datetime import date
from pathlib import Path

from docs_section import machine, write_section

SECTION = "## Train: the default recipe against the tutorial's literal one (`benchmarks/bench_recipes.py`)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    import ray

    from raypets.config import RECIPES, TrainConfig
    from raypets.data.synth import synthesize
    from raypets.runlog import read_metrics
    from raypets.stages.prepare import PrepareConfig, prepare
    from raypets.stages.runtime import set_progress_bars
    from raypets.stages.train import train

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize(root / "raw", n=args.n, size=(4 * args.size, 3 * args.size), seed=0)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        set_progress_bars(False)
        prepare(PrepareConfig(root / "raw", root / "shards", size=(args.size, args.size), test_fraction=0.15))
        for recipe in ("robust", "tutorial"):
            for seed in range(args.seeds):
                run = root / f"{recipe}-{seed}"
                train(TrainConfig(data=root / "shards", run_dir=run, workers=2, batch_size=args.batch,
                                  test_batch_size=args.batch, epochs=args.epochs, checkpoint_every=args.epochs,
                                  seed=seed, **RECIPES[recipe]))
                history = read_metrics(run)
                rows.append((recipe, seed, history))
        ray.shutdown()

    lines = ["| recipe | seed | test mean Dice per epoch | final Dice pet / background / border | collapsed epochs |",
             "|---|---|---|---|---|"]
    summary = []
    for recipe in ("robust", "tutorial"):
        finals, collapsed_runs = [], 0
        for name, seed, history in rows:
            if name != recipe:
                continue
            last = history[-1]
            collapsed = [m["epoch"] for m in history if m["collapsed"]]
            collapsed_runs += bool(last["collapsed"])
            finals.append(last["mean_dice"])
            per_class = " / ".join(f"{last[f'dice_{c}'] or 0:.3f}" for c in ("pet", "background", "border"))
            curve = " ".join(f"{m['mean_dice']:.3f}" for m in history)
            lines.append(f"| {recipe} | {seed} | {curve} | "
                         f"{per_class} | {', '.join(map(str, collapsed)) or 'none'} |")
        summary.append(f"- `{recipe}`: final test mean Dice {statistics.mean(finals):.3f} ± "
                       f"{statistics.pstdev(finals):.3f} (min {min(finals):.3f}, max {max(finals):.3f}); "
                       f"{collapsed_runs} of {len(finals)} runs end collapsed.")
    text = (f"{SECTION}\n\n{date.today().isoformat()}, {machine()}, 2 CPU workers; "
            f"`python benchmarks/bench_recipes.py --n {args.n} --size {args.size} --epochs {args.epochs} "
            f"--batch {args.batch} --seeds {args.seeds}`. robust = LR "
            f"warm-up {RECIPES['robust']['warmup_steps']} steps + BN momentum {RECIPES['robust']['bn_momentum']}; "
            f"tutorial = no warm-up + BN momentum {RECIPES['tutorial']['bn_momentum']} (Keras 0.99). Both: RMSprop "
            f"lr 1e-3, Dice on softmax, 0–255 inputs, global batch {args.batch}.\n\n"
            + "\n".join(lines) + "\n\n" + "\n".join(summary) + "\n")
    print(text)
    if args.write_docs:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()

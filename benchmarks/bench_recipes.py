"""Which recipe should be the default? ``tutorial``, ``robust`` and ``strong`` over 5 seeds, at two data sizes.

    python benchmarks/bench_recipes.py [--sizes demo,quality] [--recipes tutorial,robust,strong] [--seeds 5]
                                       [--first-seed 0]
                                       [--write-docs]

Sizes: ``demo`` is ``raypets demo``'s synthetic set as the demo trained it when the study ran (400 images at
192x144, prepared at 64 px, 15% test, 12 epochs, global batch 16, 20 warm-up steps); ``quality`` is bench_quality's
(600 images at 320x240, 96 px, 10% test, 12 epochs, batch 16). Every run is ``raypets train`` with 2 CPU workers, lr
1e-3, on the same shards per size, so the recipes get the same epochs, and the table gives each run's minutes: the
same wall-clock budget within the noise of this machine. A run collapses when its last test prediction is all one
class. The default may become ``strong`` only if it beats ``robust`` in mean and in worst seed, with no collapse
(issue 19).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

from docs_section import machine, write_section

SECTION = "## Train: the recipes over 5 seeds at two data sizes (`benchmarks/bench_recipes.py`)"
SIZES = {  # synth images, their (width, height), network size, test fraction, epochs, warm-up steps
    "demo": {"n": 400, "raw": (192, 144), "size": 64, "test_fraction": 0.15, "epochs": 12, "warmup_steps": 20},
    "quality": {"n": 600, "raw": (320, 240), "size": 96, "test_fraction": 0.1, "epochs": 12, "warmup_steps": 100},
}
BATCH = 16


def run_size(root: Path, name: str, recipes: list[str], seeds: range) -> list[dict]:
    """Every recipe and seed at size ``name``: one row per run with its final metrics and minutes."""
    from raypets.config import RECIPES, TrainConfig
    from raypets.data.synth import synthesize
    from raypets.runlog import read_metrics
    from raypets.stages.prepare import PrepareConfig, prepare
    from raypets.stages.train import train

    size = SIZES[name]
    synthesize(root / name / "raw", n=size["n"], size=size["raw"], seed=0)
    shards = root / name / "shards"
    prepare(PrepareConfig(root / name / "raw", shards, size=(size["size"], size["size"]),
                          test_fraction=size["test_fraction"]))
    rows = []
    for seed in seeds:  # the recipes of one seed run back to back: the machine's drift is shared
        for recipe in recipes:
            run = root / name / f"{recipe}-{seed}"
            started = time.perf_counter()
            train(TrainConfig(data=shards, run_dir=run, workers=2, batch_size=BATCH, test_batch_size=2 * BATCH,
                              checkpoint_every=size["epochs"], progress_every=0, seed=seed,
                              **{**RECIPES[recipe], "epochs": size["epochs"], "warmup_steps": size["warmup_steps"]
                                 if recipe != "tutorial" else 0}))
            history = read_metrics(run)
            rows.append({"size": name, "recipe": recipe, "seed": seed, "history": history,
                         "minutes": (time.perf_counter() - started) / 60})
    return sorted(rows, key=lambda row: (recipes.index(row["recipe"]), row["seed"]))


def table(rows: list[dict]) -> list[str]:
    lines = ["| size | recipe | seed | test mean Dice per epoch | final pet / background / border | min |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        last = row["history"][-1]
        per_class = " / ".join(f"{last[f'dice_{c}'] or 0:.3f}" for c in ("pet", "background", "border"))
        curve = " ".join(f"{m['mean_dice']:.3f}" for m in row["history"])
        lines.append(f"| {row['size']} | {row['recipe']} | {row['seed']} | {curve}"
                     f"{' (collapsed)' if last['collapsed'] else ''} | {per_class} | {row['minutes']:.1f} |")
    return lines


def summary(rows: list[dict]) -> list[str]:
    lines = ["| size | recipe | final mean Dice (mean ± sd) | worst seed | best seed | collapsed | minutes per run |",
             "|---|---|---|---|---|---|---|"]
    for size in dict.fromkeys(row["size"] for row in rows):
        for recipe in dict.fromkeys(row["recipe"] for row in rows):
            runs = [row for row in rows if (row["size"], row["recipe"]) == (size, recipe)]
            if not runs:
                continue
            finals = [row["history"][-1]["mean_dice"] for row in runs]
            collapsed = sum(bool(row["history"][-1]["collapsed"]) for row in runs)
            lines.append(f"| {size} | {recipe} | **{statistics.mean(finals):.3f}** ± {statistics.pstdev(finals):.3f} "
                         f"| {min(finals):.3f} | {max(finals):.3f} | {collapsed} of {len(runs)} | "
                         f"{statistics.mean(row['minutes'] for row in runs):.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="demo,quality")
    parser.add_argument("--recipes", default="tutorial,robust,strong")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds FIRST.. (to add seeds to an earlier run)")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    import ray

    from raypets.config import RECIPES
    from raypets.stages.runtime import set_progress_bars

    sizes, recipes = args.sizes.split(","), args.recipes.split(",")
    started = machine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        set_progress_bars(False)
        for size in sizes:
            rows += run_size(Path(tmp), size, recipes, range(args.first_seed, args.first_seed + args.seeds))
        ray.shutdown()
    recipes_text = "; ".join(f"`{name}` = {RECIPES[name]}" for name in recipes)
    text = (f"{SECTION}\n\n{date.today().isoformat()}, {started}, 2 CPU workers; `python benchmarks/bench_recipes.py "
            f"--sizes {args.sizes} --recipes {args.recipes} --seeds {args.seeds} --first-seed {args.first_seed}`. "
            f"RMSprop lr 1e-3, Dice on softmax, 0–255 inputs, global batch {BATCH}; the warm-up steps of each size "
            f"for robust and strong (tutorial: none). {recipes_text}.\n\n" + "\n".join(summary(rows)) + "\n\n"
            + "\n".join(table(rows)) + "\n")
    print(text)
    if args.write_docs:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()

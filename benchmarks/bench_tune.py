"""Tune's overhead: wall time of a 3-trial ASHA sweep at the tests' size against 3 sequential ``raypets train`` runs
of the same trials (same settings, each for the epochs it ran in the sweep).

    python benchmarks/bench_tune.py [--n 24] [--size 32] [--epochs 3] [--write-docs]

One local Ray (4 logical CPUs, as the tests start it; with the dashboard, which Ray Train's cleaner of stopped trials'
placement groups needs) for everything; the sweep runs before and after the sequential
runs (which need its epochs) and its mean time is compared, so that drift in the machine's load cancels.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

from docs_section import machine, write_section

SECTION = "## Tune: a 3-trial sweep against 3 sequential training runs (`benchmarks/bench_tune.py`)"
LRS = (3e-3, 1e-6, 1e-1)  # the test sweep's grid: one learns, ASHA stops the other two after their first rung


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="synthetic images")
    parser.add_argument("--size", type=int, default=32, help="prepared size (px)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    import ray

    from raypets.data.synth import synthesize
    from raypets.stages.prepare import PrepareConfig, prepare
    from raypets.stages.runtime import set_progress_bars
    from raypets.stages.train import train
    from raypets.stages.tune import tune
    from raypets.sweep_config import load_sweep

    host = machine()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize(root / "raw", n=args.n, size=(2 * args.size, 3 * args.size // 2), seed=3)
        ray.init(num_cpus=4, include_dashboard=True, log_to_driver=False)
        set_progress_bars(False)
        prepare(PrepareConfig(root / "raw", root / "shards", size=(args.size, args.size), test_fraction=0.25))
        spec = root / "sweep.yaml"
        spec.write_text(f"""
scheduler: {{type: asha, grace_period: 1, reduction_factor: 2}}
train: {{epochs: {args.epochs}, batch_size: 8, test_batch_size: 8, warmup_steps: 2, seed: 0}}
space:
  lr: {{grid: [{", ".join(repr(lr) for lr in LRS)}]}}
""")
        sweep = load_sweep(spec, root / "shards")

        def sequential(name: str, epochs: dict[float, int]) -> float:
            start = time.perf_counter()
            for lr, n in epochs.items():
                train(replace(sweep.trial_config(root / name / str(lr), {"lr": lr}), epochs=n))
            return time.perf_counter() - start

        def swept(name: str) -> tuple[float, dict[float, int]]:
            start = time.perf_counter()
            tune(sweep, root / name, progress=False)
            rows = csv.DictReader((root / name / "trials.csv").open())
            return time.perf_counter() - start, {float(row["lr"]): int(row["epochs_run"]) for row in rows}

        before, epochs = swept("sweep-before")
        baseline = sequential("sequential", epochs)
        after, epochs_after = swept("sweep-after")
        ray.shutdown()
    assert epochs_after == epochs, (epochs, epochs_after)  # ASHA stopped the same trials both times
    sweep_time = (before + after) / 2
    ran = ", ".join(f"lr {lr:g}: {n}" for lr, n in epochs.items())
    text = f"""{SECTION}

{date.today().isoformat()}, {host}; `python benchmarks/bench_tune.py --n {args.n} --size {args.size} \
--epochs {args.epochs}`. The learning rates of `tests/test_tune.py`: lr grid {list(LRS)}, ASHA (grace period 1,
reduction factor 2), up to {args.epochs} epochs per trial, 1 CPU worker per trial, batch 8, {args.size}×{args.size}
synthetic shards ({args.n} images), one trial at a time (the default concurrency on 4 logical CPUs). Epochs each
trial ran in the sweep, and so in its sequential run: {ran}.

| run | wall time (s) | ratio |
|---|---|---|
| 3 sequential `raypets train` runs, same settings and epochs | {baseline:.1f} | 1.00 |
| `raypets tune`, 3 trials: Tune, trial actors, table, best.json, plot (mean of a sweep before and after: \
{before:.1f}, {after:.1f}) | {sweep_time:.1f} | **{sweep_time / baseline:.2f}** |

- Tune's overhead ratio, sweep / sequential runs: **{sweep_time / baseline:.2f}** \
({(sweep_time - baseline) / len(LRS):.1f} s more per trial).
"""
    print(text)
    if args.write_docs:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()

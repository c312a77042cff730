"""Training from shards streamed each epoch against shards cached in Ray's object store, and the store's peak use.

    python benchmarks/bench_stream.py [--n 480] [--size 96] [--epochs 3] [--write-docs]

Four `raypets train` runs on the same shards in one local Ray (1 CPU worker, batch 16), alternating: `--data-cache
stream`, `memory`, `stream`, `memory` (the means are compared, so drift cancels). The figure is the median training
images/s of epochs 2.. as `raypets train` reports it. While each run trains, a thread reads the object store's bytes
in use every 0.2 s; the first run starts on an empty store, so its peak is what streaming holds (the cached runs'
peak, the whole dataset, shows that the poll sees what is stored).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
from datetime import date
from pathlib import Path

from docs_section import machine, write_section

SECTION = "## Train: streamed shards against cached ones (`benchmarks/bench_stream.py`)"


class StorePeak:
    """The peak bytes in Ray's object store while the ``with`` block runs, polled in a thread."""

    def __enter__(self) -> StorePeak:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        self._state = get_state_from_address(ray.get_runtime_context().gcs_address)
        self._reply = get_memory_info_reply
        self.before = self.peak = self.used()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def used(self) -> int:
        return self._reply(self._state).store_stats.object_store_bytes_used

    def _poll(self) -> None:
        while not self._done.wait(0.2):
            self.peak = max(self.peak, self.used())

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def run(shards: Path, run_dir: Path, cache: str, epochs: int) -> float:
    from raypets.config import TrainConfig
    from raypets.runlog import read_metrics
    from raypets.stages.train import train

    train(TrainConfig(data=shards, run_dir=run_dir, workers=1, device="cpu", batch_size=16, test_batch_size=16,
                      epochs=epochs, checkpoint_every=epochs, data_cache=cache))
    return statistics.median(m["images_per_s"] for m in read_metrics(run_dir)[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=480)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    import ray

    from raypets.data.synth import synthesize
    from raypets.stages.prepare import PrepareConfig, prepare
    from raypets.stages.runtime import set_progress_bars
    from raypets.stages.train import dataset_bytes

    host = machine()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize(root / "raw", n=args.n, size=(4 * args.size // 3, args.size), seed=0)
        ray.init(num_cpus=4, log_to_driver=False)
        set_progress_bars(False)
        manifest = prepare(PrepareConfig(root / "raw", root / "shards", size=(args.size, args.size)))
        data = dataset_bytes(manifest)
        rates, peaks = {"stream": [], "memory": []}, {}
        for attempt, cache in enumerate(("stream", "memory", "stream", "memory")):
            with StorePeak() as store:
                rates[cache].append(run(root / "shards", root / f"{cache}{attempt}", cache, args.epochs))
            peaks.setdefault(cache, store)
        ray.shutdown()
    cached, streamed = (statistics.mean(rates["memory"]), statistics.mean(rates["stream"]))
    peak = peaks["stream"].peak - peaks["stream"].before
    memory_peak = peaks["memory"].peak - peaks["memory"].before
    text = f"""{SECTION}

{date.today().isoformat()}, {host}; `python benchmarks/bench_stream.py --n {args.n} --size {args.size} \
--epochs {args.epochs}`. {args.n} synthetic images at {args.size} px ({data / 2**20:.1f} MiB of images and masks), \
1 CPU worker, batch 16; training images/s, median of epochs 2..{args.epochs}.

| `--data-cache` | train images/s | ratio to cached |
|---|---|---|
| memory (mean of 2 runs: {rates['memory'][0]:.1f}, {rates['memory'][1]:.1f}) | {cached:.1f} | 1.00 |
| stream (mean of 2 runs: {rates['stream'][0]:.1f}, {rates['stream'][1]:.1f}) | {streamed:.1f} | \
**{streamed / cached:.2f}** |

- Streaming / cached: **{streamed / cached:.2f}** (target ≥ 0.90).
- Object store while streaming (the first run, on an empty store): peak {peak / 2**20:.1f} MiB above the \
{peaks['stream'].before / 2**20:.1f} MiB in use before, **{peak / data:.0%}** of the dataset's bytes (target ≤ 30%). \
The first cached run's peak: {memory_peak / 2**20:.1f} MiB ({memory_peak / data:.0%}).
"""
    print(text)
    if args.write_docs:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()

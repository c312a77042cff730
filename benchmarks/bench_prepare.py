"""``raypets prepare`` (Ray Data) against a plain single-process loop doing the same decode + resize + Parquet write,
and against that loop forked over N processes (the most this machine can give).

    python benchmarks/bench_prepare.py [--n 2000] [--small 500] [--cpus 2] [--write-docs]

Each measurement runs in a fresh Python process so that peak RSS (``ru_maxrss``) is the driver's own. Ray's start
is timed apart from the pipeline: a cluster user pays it once, a laptop user on every command.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from docs_section import machine, write_section

SIZE = (160, 160)
SECTION = "## Prepare: Ray Data against a plain loop (`benchmarks/bench_prepare.py`)"


def _convert(src: Path, out: Path, pairs: list, found, tag: str) -> None:
    """Decode, resize and write ``pairs`` as prepare does, 256 rows a Parquet file per split, in this process."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data._internal.tensor_extensions.arrow import ArrowTensorArray

    from raypets.data.decode import resize_image, resize_mask
    from raypets.stages.prepare import _load_pair, hash_split

    rows: dict[str, list] = {"train": [], "test": []}
    written = 0

    def flush(split: str) -> None:
        nonlocal written
        batch = rows[split]
        table = pa.table({
            "name": [r[0] for r in batch],
            "image": ArrowTensorArray.from_numpy(np.stack([r[1] for r in batch])),
            "mask": ArrowTensorArray.from_numpy(np.stack([r[2] for r in batch])),
            "height": [r[3] for r in batch], "width": [r[4] for r in batch],
        })
        (out / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / split / f"{tag}-{written:05d}.parquet")
        written += 1
        batch.clear()

    for pair in pairs:
        image, mask = _load_pair(src, pair.image, pair.mask, found.mask_values, found.mask_offset)
        split = hash_split(pair.name, 0, 0.1)
        rows[split].append((pair.name, resize_image(image.pixels, SIZE), resize_mask(mask, SIZE), *mask.shape))
        if len(rows[split]) == 256:
            flush(split)
    for split in rows:
        if rows[split]:
            flush(split)


def plain_loop(src: Path, out: Path, processes: int) -> dict:
    """The baselines: one process, or ``processes`` forked workers each converting an equal share."""
    from multiprocessing import get_context

    from raypets.data.layouts import discover

    start = time.perf_counter()
    found = discover(src, "oxford")
    if processes == 1:
        _convert(src, out, found.pairs, found, "p0")
    else:
        shares = [(src, out, found.pairs[i::processes], found, f"p{i}") for i in range(processes)]
        with get_context("fork").Pool(processes) as pool:
            pool.starmap(_convert, shares)
    return {"seconds": time.perf_counter() - start, "pairs": len(found.pairs)}


def ray_prepare(src: Path, out: Path, cpus: int) -> dict:
    import ray

    from raypets.stages.prepare import PrepareConfig, prepare
    from raypets.stages.runtime import set_progress_bars

    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - start
    set_progress_bars(False)
    runs = []
    for attempt in ("cold", "warm1", "warm2"):  # cold: Ray starts the worker processes; warm: a cluster running
        start = time.perf_counter()
        manifest = prepare(PrepareConfig(src, out / attempt, size=SIZE))
        runs.append(time.perf_counter() - start)
    ray.shutdown()
    return {"seconds": runs[0], "warm_seconds": (runs[1] + runs[2]) / 2, "warm_runs": runs[1:],
            "ray_start": ray_start, "pairs": sum(manifest["counts"].values())}


def child(kind: str, src: Path, out: Path, cpus: int) -> None:
    result = ray_prepare(src, out, cpus) if kind == "ray" else plain_loop(src, out, 1 if kind == "plain" else cpus)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def run_child(kind: str, src: Path, out: Path, cpus: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--src", str(src), "--out", str(out), "--cpus", str(cpus)]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dataset(root: Path, n: int) -> Path:
    from raypets.data.synth import synthesize

    src = root / f"synth-{n}"
    if not (src / "images").is_dir():
        start = time.perf_counter()
        synthesize(src, n=n, size=(500, 375), seed=0)
        print(f"synthesized {n} images at 500x375 in {time.perf_counter() - start:.0f} s", flush=True)
    return src


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--small", type=int, default=500)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "raypets-bench")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--child", choices=["plain", "pool", "ray"])
    parser.add_argument("--src", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.src, args.out, args.cpus)

    big, small = dataset(args.root, args.n), dataset(args.root, args.small)
    with tempfile.TemporaryDirectory() as tmp:  # the plain loop before and after: this machine's speed drifts
        before = run_child("plain", big, Path(tmp) / "plain-before", args.cpus)
        pool = run_child("pool", big, Path(tmp) / "pool", args.cpus)
        ray_big = run_child("ray", big, Path(tmp) / "ray-big", args.cpus)
        ray_small = run_child("ray", small, Path(tmp) / "ray-small", args.cpus)
        after = run_child("plain", big, Path(tmp) / "plain-after", args.cpus)
    plain = {**before, "seconds": (before["seconds"] + after["seconds"]) / 2,
             "peak_rss_mb": max(before["peak_rss_mb"], after["peak_rss_mb"])}
    plain_ips = plain["pairs"] / plain["seconds"]
    pool_ips = pool["pairs"] / pool["seconds"]
    ray_ips = ray_big["pairs"] / ray_big["seconds"]
    warm_ips = ray_big["pairs"] / ray_big["warm_seconds"]
    ray_ips_start = ray_big["pairs"] / (ray_big["seconds"] + ray_big["ray_start"])
    rss_ratio = ray_big["peak_rss_mb"] / ray_small["peak_rss_mb"]
    text = f"""{SECTION}

{date.today().isoformat()}, {machine()}; `python benchmarks/bench_prepare.py --n {args.n} --small {args.small} \
--cpus {args.cpus}`. Synthetic 500×375 JPEGs + PNG trimaps, resized to {SIZE[1]}×{SIZE[0]}.

| run | pairs | seconds | pairs/s | driver peak RSS |
|---|---|---|---|---|
| plain loop (1 process, same decode + resize + pyarrow write; mean of {before['seconds']:.1f} s before and \
{after['seconds']:.1f} s after) | {plain['pairs']} | {plain['seconds']:.1f} | {plain_ips:.1f} | \
{plain['peak_rss_mb']:.0f} MB |
| ceiling: the same loop split over {args.cpus} forked processes | {pool['pairs']} | {pool['seconds']:.1f} | \
{pool_ips:.1f} | |
| `prepare` on Ray Data, {args.cpus} CPUs, first run (Ray starts its workers) | {ray_big['pairs']} | \
{ray_big['seconds']:.1f} | {ray_ips:.1f} | {ray_big['peak_rss_mb']:.0f} MB |
| `prepare` again on the same Ray (warm workers, as on a running cluster; mean of \
{' s and '.join(f'{s:.1f}' for s in ray_big['warm_runs'])} s) | {ray_big['pairs']} | \
{ray_big['warm_seconds']:.1f} | {warm_ips:.1f} | |
| `prepare`, including `ray.init` ({ray_big['ray_start']:.1f} s) | {ray_big['pairs']} | \
{ray_big['seconds'] + ray_big['ray_start']:.1f} | {ray_ips_start:.1f} | |
| `prepare` on {args.small} images | {ray_small['pairs']} | {ray_small['seconds']:.1f} | \
{ray_small['pairs'] / ray_small['seconds']:.1f} | {ray_small['peak_rss_mb']:.0f} MB |

- Throughput, `prepare` / plain loop: **{warm_ips / plain_ips:.2f}×** warm, {ray_ips / plain_ips:.2f}× on the \
first run, {ray_ips_start / plain_ips:.2f}× counting `ray.init` too (target ≥ 1.5×).
- The machine's own ceiling, {args.cpus} processes / 1 on the same work: {pool_ips / plain_ips:.2f}×; `prepare` \
reaches {warm_ips / pool_ips:.2f} of it warm.
- Driver peak RSS at {args.n} images / at {args.small}: **{rss_ratio:.3f}** (target ≤ 1.10).
"""
    print(text)
    if args.write_docs:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()

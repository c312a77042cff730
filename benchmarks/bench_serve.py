"""``raypets serve``: requests/s with ``--max-batch 16`` against ``--max-batch 1``, N requests in flight at once.

    python benchmarks/bench_serve.py [--requests 256] [--concurrency 32] [--size 160] [--batches 1 16] [--rounds 2]
                                     [--cpus 2] [--write-docs]

One local Ray (``--cpus`` logical CPUs) and one Serve; the application of ``raypets serve`` (one CPU replica, the
same deployment and options) is deployed once per ``--max-batch`` value and round, warmed up, then sent
``--requests`` POSTs of synthetic 500×375 JPEGs from ``--concurrency`` client threads at once (real HTTP on
loopback; each answer is the full-size mask PNG). The values alternate for ``--rounds`` rounds and the fastest run of
each is kept (on a shared machine a run's time varies with its neighbours' load). The weights are random (speed does
not depend on them).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

from bench_prepare import dataset
from docs_section import machine, write_section

SECTION = "## Serve: batched requests against one at a time (`benchmarks/bench_serve.py`)"
IMAGES = 64  # distinct photos, sent round-robin


def post(url: str, body: bytes) -> float:
    """Seconds from sending ``body`` to the whole answer (a mask PNG)."""
    start = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=600) as response:
        assert response.status == 200 and response.headers["Content-Type"] == "image/png"
        response.read()
    return time.perf_counter() - start


def load(url: str, bodies: list[bytes], requests: int, concurrency: int) -> dict:
    """``requests`` POSTs from ``concurrency`` threads: wall seconds, requests/s and the median latency."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(lambda i: post(url, bodies[i % len(bodies)]), range(requests)))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rps": requests / seconds, "latency": statistics.median(latencies)}


def measure(args: argparse.Namespace, checkpoint: Path, bodies: list[bytes]) -> dict[int, list[dict]]:
    """Each ``--batches`` value's runs, alternating, on one Serve."""
    from ray import serve

    from raypets.stages.runtime import init_ray
    from raypets.stages.serve import APP_NAME, ServeConfig, application

    init_ray(num_cpus=args.cpus)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    url = f"http://127.0.0.1:{args.port}/segment"
    runs: dict[int, list[dict]] = {batch: [] for batch in args.batches}
    try:
        for round_ in range(args.rounds):
            for batch in args.batches:
                cfg = ServeConfig(checkpoint=str(checkpoint), port=args.port, max_batch=batch,
                                  size=(args.size, args.size))
                serve.run(application(cfg, use_gpu=False), name=APP_NAME, route_prefix="/")
                load(url, bodies, 2 * args.concurrency, args.concurrency)  # warm-up: threads, allocator, caches
                result = load(url, bodies, args.requests, args.concurrency)
                print(f"round {round_ + 1}, --max-batch {batch}: {result['rps']:.1f} requests/s "
                      f"({result['seconds']:.1f} s, median latency {result['latency']:.2f} s)", flush=True)
                runs[batch].append(result)
                serve.delete(APP_NAME)
    finally:
        serve.shutdown()
    return runs


def report(args: argparse.Namespace, runs: dict[int, list[dict]], host: str) -> str:
    fastest = {batch: max(results, key=lambda r: r["rps"]) for batch, results in runs.items()}
    base = fastest[min(runs)]["rps"]
    rows = []
    for batch, result in fastest.items():
        times = " / ".join(f"{r['seconds']:.1f}" for r in runs[batch])
        rows.append(f"| `--max-batch {batch}` (runs: {times} s) | {args.requests} | {result['seconds']:.1f} | "
                    f"{result['rps']:.1f} | {result['latency']:.2f} | **{result['rps'] / base:.2f}×** |")
    top = max(runs)
    return f"""{SECTION}

{date.today().isoformat()}, {host}; `python benchmarks/bench_serve.py --requests {args.requests} \
--concurrency {args.concurrency} --size {args.size} --batches {' '.join(map(str, args.batches))} \
--rounds {args.rounds} --cpus {args.cpus}` (the fastest of the rounds).
One CPU replica of `raypets serve`'s deployment on local Ray ({args.cpus} CPUs), XceptionUNet at \
{args.size}×{args.size}, random weights; {args.requests} POSTs of synthetic 500×375 JPEGs ({IMAGES} distinct) from \
{args.concurrency} client threads at once, over HTTP on loopback, each answered with the full-size mask PNG, after a \
warm-up of {2 * args.concurrency}. The client threads share the machine's cores with Serve.

| deployment | requests | seconds | requests/s | median latency (s) | ratio to `--max-batch {min(runs)}` |
|---|---|---|---|---|---|
{chr(10).join(rows)}

- `--max-batch {top}` / `--max-batch {min(runs)}`: **{fastest[top]['rps'] / base:.2f}×** the requests/s \
(target ≥ 1.5× on 2 cores).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="--max-batch values to measure")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each value; the fastest is kept")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "raypets-bench")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    import torch

    from raypets.checkpoints import weights_name
    from raypets.model import XceptionUNet

    host = machine()  # the load before the run
    photos = sorted((dataset(args.root, IMAGES) / "images").glob("*.jpg"))
    checkpoint = args.root / "serve" / weights_name(0)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(XceptionUNet().state_dict(), checkpoint)
    text = report(args, measure(args, checkpoint, [photo.read_bytes() for photo in photos]), host)
    print(text)
    if args.write_docs:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()

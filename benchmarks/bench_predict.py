"""``raypets predict`` (Ray Data) against a plain single-process loop doing the same decode + resize + forward +
h5py write, the HDF5 bytes written per image against the raw float32 size, and JPEG draft decoding (predict's and
prepare's) against full decoding: decodes per core and the mean pixel difference after the resize.

    python benchmarks/bench_predict.py [--n 1000] [--small 32] [--size 160] [--batch 16] [--cpus 2] [--workers 1 2]
                                       [--rounds 2] [--write-docs]

Two baselines: the loop as one would write it (contiguous tensors, torch's default threads), and the same loop with
the channels_last forward that the model actors use, so that the ratio to the latter is what the Ray pipeline itself
adds. The channels_last loop and the Ray runs alternate for ``--rounds`` rounds and the fastest of each is kept (on a
shared machine a run's time varies with its neighbours' load; the fastest is the closest to the machine's own
speed). Each measurement runs in a fresh Python process; Ray's start is timed apart from the pipeline: a cluster
user pays it once, a laptop user on every command; the model actors' start (a fixed cost of every call) is measured
with a small call first.
The weights are random (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from bench_prepare import dataset
from docs_section import machine, write_section

SECTION = "## Predict: Ray Data against a plain loop (`benchmarks/bench_predict.py`)"


def plain_loop(images: Path, out: Path, checkpoint: Path, size: int, batch: int, channels_last: bool) -> dict:
    """The baseline: one process, torch's default threads; decode, resize, forward, softmax, h5py write per batch."""
    import h5py
    import numpy as np
    import torch

    from raypets.checkpoints import load_model, resolve_checkpoint
    from raypets.data.decode import decode_image, resize_image
    from raypets.model import to_inputs

    start = time.perf_counter()
    model = load_model(resolve_checkpoint(checkpoint))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    paths = sorted(images.glob("*.jpg"))
    out.mkdir(parents=True)
    with h5py.File(out / "output_1.h5", "w") as h5, torch.inference_mode():
        for first in range(0, len(paths), batch):
            chunk = paths[first:first + batch]
            decoded = [decode_image(p.read_bytes(), p.name).pixels for p in chunk]
            x = torch.from_numpy(np.stack([resize_image(d, (size, size)) for d in decoded]))
            probs = torch.softmax(model(to_inputs(x, 0.0, 1 / 255, channels_last)), dim=1).numpy()
            for path, pixels, p in zip(chunk, decoded, probs, strict=True):
                h5.create_dataset(path.name, data=p).attrs["original_size"] = pixels.shape[:2]
    return {"seconds": time.perf_counter() - start, "images": len(paths), "threads": torch.get_num_threads(),
            "bytes": (out / "output_1.h5").stat().st_size}


def draft_decode(images: Path, size: int, n: int = 300) -> dict:
    """Decode + bilinear resize of the first ``n`` images, in full and at the JPEG draft scale (twice each, the
    faster kept), on one core; the mean absolute pixel difference of the two results."""
    import numpy as np

    from raypets.data.decode import decode_image, resize_image

    data = [path.read_bytes() for path in sorted(images.glob("*.jpg"))[:n]]
    results, rates = {}, {}
    for kind, draft in (("full", None), ("draft", (size, size))) * 2:
        start = time.perf_counter()
        results[kind] = [resize_image(decode_image(d, "a.jpg", draft=draft).pixels, (size, size)) for d in data]
        rates[kind] = max(rates.get(kind, 0), len(data) / (time.perf_counter() - start))
    difference = np.mean([np.abs(a.astype(np.int16) - b).mean() for a, b in zip(*results.values(), strict=True)])
    drafted = decode_image(data[0], "a.jpg", draft=(size, size)).pixels.shape
    return {"full": rates["full"], "draft": rates["draft"], "difference": float(difference), "images": len(data),
            "drafted": list(drafted[:2])}


def ray_predict(images: Path, small: Path, out: Path, checkpoint: Path, size: int, batch: int, cpus: int,
                workers: int) -> dict:
    """Ray started once; ``small`` twice (the first call also starts Ray's own helpers), then all images in float32
    and half.

    Every ``predict`` call starts its model actors afresh (a process importing torch each), so the difference of the
    two float32 runs gives the throughput of the running pipeline and the fixed cost of a call."""
    import ray

    from raypets.stages.predict import PredictConfig, predict
    from raypets.stages.runtime import set_progress_bars

    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - start
    set_progress_bars(False)
    runs = {}
    for name, source, precision in (("cold", small, "single"), ("small", small, "single"), ("all", images, "single"),
                                    ("half", images, "half")):
        cfg = PredictConfig(checkpoint, source, out / name, batch_size=batch, workers=workers, device="cpu",
                            size=(size, size), hdf5_precision=precision)
        runs[name] = predict(cfg)
    ray.shutdown()
    return {"seconds": runs["all"]["seconds"], "images": runs["all"]["written"], "ray_start": ray_start,
            "small_seconds": runs["small"]["seconds"], "small_images": runs["small"]["written"],
            "bytes": _h5_bytes(out / "all"), "half_bytes": _h5_bytes(out / "half")}


def _h5_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("output_*.h5"))


def run_child(kind: str, args: argparse.Namespace, out: Path, workers: int = 1) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--images", str(args.images), "--small-images",
           str(args.small_images), "--out", str(out),
           "--checkpoint", str(args.checkpoint), "--size", str(args.size), "--batch", str(args.batch),
           "--cpus", str(args.cpus), "--workers", str(workers)]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(kind, workers, result, flush=True)
    return result


def first_images(images: Path, n: int, folder: Path) -> Path:
    """A folder of links to the first ``n`` images."""
    folder.mkdir()
    for path in sorted(images.glob("*.jpg"))[:n]:
        (folder / path.name).symlink_to(path)
    return folder


def measure(args: argparse.Namespace, tmp: Path) -> tuple[dict, dict]:
    """The channels_last loop and the Ray runs alternating for ``--rounds`` rounds (the contiguous loop once, first);
    returns (baselines' runs, the fastest Ray run by worker count)."""
    import torch

    from raypets.model import XceptionUNet

    args.checkpoint = tmp / "model_checkpoint_1.pt"
    args.small_images = first_images(args.images, args.small, tmp / "small")
    torch.manual_seed(0)
    torch.save(XceptionUNet().state_dict(), args.checkpoint)
    args.decode = run_child("decode", args, tmp / "decode")
    plain = {"plain": [run_child("plain", args, tmp / "plain")], "plain-cl": []}
    rays: dict[int, list[dict]] = {workers: [] for workers in args.workers}
    for round_ in range(args.rounds):
        plain["plain-cl"].append(run_child("plain-cl", args, tmp / f"plain-cl-{round_}"))
        for workers in args.workers:
            rays[workers].append(run_child("ray", args, tmp / f"ray-{workers}-{round_}", workers))
    fastest = {workers: min(runs, key=lambda r: r["seconds"]) for workers, runs in rays.items()}
    return plain, {workers: {**run, "runs": [r["seconds"] for r in rays[workers]]} for workers, run in fastest.items()}


def report(args: argparse.Namespace, plain: dict, rays: dict) -> str:
    fastest = {kind: min(runs, key=lambda r: r["seconds"]) for kind, runs in plain.items()}
    ips = {kind: run["images"] / run["seconds"] for kind, run in fastest.items()}
    base = ips["plain-cl"]
    rows = []
    for kind, label in (("plain", "contiguous tensors, as one writes it"), ("plain-cl", "channels_last forward")):
        run, times = fastest[kind], " / ".join(f"{r['seconds']:.1f}" for r in plain[kind])
        rows.append(f"| plain loop, {label}, 1 process, {run['threads']} torch threads (runs: {times} s) | "
                    f"{run['images']} | {run['seconds']:.1f} | {ips[kind]:.1f} | | | {ips[kind] / base:.2f}× |")
    steady = {}
    for workers, result in rays.items():
        whole = result["images"] / result["seconds"]
        steady[workers] = (result["images"] - result["small_images"]) / (result["seconds"] - result["small_seconds"])
        fixed = result["seconds"] - result["images"] / steady[workers]
        with_start = result["images"] / (result["seconds"] + result["ray_start"])
        times = " / ".join(f"{seconds:.1f}" for seconds in result["runs"])
        rows.append(f"| `raypets predict --cpu --workers {workers}` (runs: {times} s) | {result['images']} | "
                    f"{result['seconds']:.1f} | "
                    f"{whole:.1f} | {steady[workers]:.1f} (+ {fixed:.1f} s a call) | {with_start:.1f} | "
                    f"**{whole / base:.2f}×**; running {steady[workers] / base:.2f}×; with `ray.init` "
                    f"{with_start / base:.2f}× |")
    decode = args.decode
    best = max(rays, key=lambda w: rays[w]["images"] / rays[w]["seconds"])
    best_ips = rays[best]["images"] / rays[best]["seconds"]
    raw = 3 * args.size * args.size * 4
    per_image = rays[best]["bytes"] / rays[best]["images"]
    half_per_image = rays[best]["half_bytes"] / rays[best]["images"]
    plain_per_image = fastest["plain"]["bytes"] / fastest["plain"]["images"]
    return f"""{SECTION}

{date.today().isoformat()}, {machine()}; `python benchmarks/bench_predict.py --n {args.n} --small {args.small} \
--size {args.size} --batch {args.batch} --cpus {args.cpus} --workers {' '.join(map(str, args.workers))} \
--rounds {args.rounds}` (the fastest of the rounds). Synthetic
500×375 JPEGs, XceptionUNet at {args.size}×{args.size}, batch {args.batch}, random weights; Ray started once with
{args.cpus} CPUs, then `predict` on {args.small} images (twice: the first call also starts Ray's helpers), on all
{args.n}, and on all with `--hdf5-precision half`. The plain loops decode each JPEG in full; `predict` decodes it at
the draft scale (below).
Seconds run from the call to its summary (listing, checkpoint, model actors' start, pipeline, index, rename). Each call
starts its actors afresh (a process importing torch each): "running" is the throughput once they run, from the
difference of the {args.small}- and {args.n}-image calls, and the fixed cost of a call beside it.

| run | images | seconds | images/s | images/s running | images/s incl. `ray.init` | \
ratio to the channels_last plain loop |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

- `--workers {best}` / the plain loop with the same channels_last forward: **{best_ips / base:.2f}×** end to end, \
{steady[best] / base:.2f}× running (target ≥ 1.2× on 2 cores); / the plain loop as one writes it: \
{best_ips / ips['plain']:.2f}×.
- HDF5 bytes per image: {per_image:,.0f} (float32) and {half_per_image:,.0f} (`--hdf5-precision half`) against the \
raw float32 array's {raw:,} bytes (3×{args.size}×{args.size}×4): {per_image / raw:.3f} and \
{half_per_image / raw:.3f} of it (the plain loop's file: {plain_per_image / raw:.3f}).
- JPEG draft decoding (predict's and prepare's decode step), {decode['images']} of these JPEGs to \
{args.size}×{args.size} on one core: {decode['draft']:.0f} decodes + resizes/s against {decode['full']:.0f} in full \
(**{decode['draft'] / decode['full']:.2f}×**; decoded at {decode['drafted'][1]}×{decode['drafted'][0]}, the \
smallest DCT scale at least {args.size} px); mean absolute pixel difference after the resize \
**{decode['difference']:.2f}** of 255.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--small", type=int, default=32, help="images of the call that measures the fixed cost")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="model actor counts to measure")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of the loop and Ray; the fastest")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "raypets-bench")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--child", choices=["plain", "plain-cl", "ray", "decode"])
    parser.add_argument("--images", type=Path)
    parser.add_argument("--small-images", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--checkpoint", type=Path)
    args = parser.parse_args()
    if args.child == "decode":
        return print(json.dumps(draft_decode(args.images, args.size)))
    if args.child == "ray":
        return print(json.dumps(ray_predict(args.images, args.small_images, args.out, args.checkpoint, args.size,
                                            args.batch, args.cpus, args.workers[0])))
    if args.child:
        return print(json.dumps(plain_loop(args.images, args.out, args.checkpoint, args.size, args.batch,
                                           channels_last=args.child == "plain-cl")))
    args.images = dataset(args.root, args.n) / "images"
    with tempfile.TemporaryDirectory() as tmp:
        plain, rays = measure(args, Path(tmp))
    text = report(args, plain, rays)
    print(text)
    if args.write_docs:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()

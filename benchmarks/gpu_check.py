"""A GPU check ready to run: what raypets does on one GPU machine, step by step, in under 8 minutes.

    python benchmarks/gpu_check.py OUT_DIR [--cpu-smoke] [--budget-s S] [--only STEP ...] [--work DIR] [--keep-work]

Writes OUT_DIR/gpu_check.json (every step's status, seconds and figures, or its error or the reason it was skipped),
OUT_DIR/gpu_check.md (the same as a table) and OUT_DIR/gpu_check.log (each step's commands and their output). The
JSON and the table are rewritten after every step, so a run cut short keeps what it measured. The steps, in order:

- env: Python, torch, CUDA, the GPU, Ray, raypets and the other packages, /dev/shm, nvidia-smi, the stage flags
  the installed raypets has;
- model: XceptionUNet forward + backward images/s (bf16 autocast and channels_last on a GPU; ``bench_model.run``);
- ray: one local Ray that every stage below joins with ``--address``, as on a cluster (its start is timed once);
- data: ``raypets synth`` + ``raypets prepare`` (7,390 images at 160 px) and ``raypets synth`` (2,000 500x375
  JPEGs for predict);
- plain: a plain PyTorch training loop over the split preloaded on the device, the ceiling for train
  (``bench_train.plain_loop``);
- train: ``raypets train --gpu --workers 1`` for a few epochs: images/s, seconds per epoch, start-up;
- predict: ``raypets predict --gpu`` over the JPEGs at the default batch and at larger ones: images/s;
- tune: a 4-trial lr grid of 2 epochs, one worker per trial on a quarter of the GPU (``--gpus-per-worker 0.25``);
- train_compile: ``raypets train --compile``, the same run compiled (when the installed raypets has the flag).

Each step runs as a child process with a time limit (its own, cut to what is left of ``--budget-s``); one that fails
or runs out of time is recorded and the next one runs. ``--cpu-smoke`` runs the same steps at tiny sizes on the CPU
(about 2-3 minutes on 2 cores), so that the script is tested where no GPU is at hand. The figures come from what the
stages print and write: ``RUN/metrics.jsonl`` (train), the ``predicted N image(s) ...`` line (predict),
``RUN/trials.csv`` and each trial's ``metrics.jsonl`` (tune).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

STEPS = ("env", "model", "ray", "data", "plain", "train", "predict", "tune", "train_compile")
RAYPETS = "import sys; from raypets.cli import main; sys.exit(main(sys.argv[1:]))"  # the `raypets` command
RESULT_MARK = "GPU_CHECK_RESULT "  # a child step's last line: this mark, then its figures as JSON
PREDICT_IMAGE_SIZE = "500x375"  # the Oxford-IIIT Pet photos' typical size
MIN_STEP_S = 15  # a step is skipped when less than this is left of the budget
# Lines of a stage's output echoed to the console (all of it goes to gpu_check.log): raypets' own (a Train worker's
# come prefixed by Ray), and a driver's final exception.
ECHO = re.compile(r"epoch \d+/\d+ |predicted \d+ image|synthesized \d+ image|prepared |raypets[ :]|best: trial"
                  r"|^\w*Error: ")
ECHO_MAX = 40
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The line each raypets command prints when its work is done: one killed after it (a driver slow to exit) still counts.
DONE = {"synth": r"^synthesized \d+", "prepare": r"^prepared ", "train": r"^finished epoch \d+",
        "predict": r"^predicted \d+ image", "tune": r"^wrote .*trials\.csv"}

# The stage flags of each mode. Issue 15 is adding some right now (train --precision/--compile/--sync-bn, tune's
# fractional --gpus-per-worker, predict --precision): a flag the installed raypets does not list is left out and named
# in the step's "flags_missing"; a value it refuses fails the step with raypets' own message. Not used: --sync-bn
# (one GPU, one worker: no BatchNorm to sync) and predict's --precision (its default is measured).
FLAGS = {
    "gpu": {"train": ("--gpu", "--precision bf16"), "train_compile": ("--gpu", "--precision bf16", "--compile"),
            "predict": ("--gpu",), "tune": ("--gpus-per-worker 0.25",)},
    "cpu": {"train": ("--cpu", "--precision fp32"), "train_compile": ("--cpu", "--precision fp32", "--compile"),
            "predict": ("--cpu", "--workers 1"), "tune": ("--gpus-per-worker 0",)},
}


@dataclass(frozen=True)
class Sizes:
    """How big each step is, and how long it may take (seconds)."""

    budget_s: float  # the whole check
    budgets: dict  # per step
    ray_cpus: int | None  # logical CPUs of the local Ray (None: the cores)
    model_batches: tuple[int, ...]
    model_size: int
    model_steps: tuple[int, int]  # warm-up, timed
    train_images: int
    raw_size: str  # synth WIDTHxHEIGHT of the training images
    size: int  # prepared (and network) size
    test_fraction: float
    batch: int
    test_batch: int
    epochs: int
    predict_images: int
    predict_small: int  # the warm-up call's images (its time is the fixed cost of a call); 0: no warm-up call
    predict_batches: tuple[int, ...]  # beside predict's default batch
    tune_lrs: tuple[float, ...]
    tune_epochs: int


GPU = Sizes(budget_s=480, budgets={"env": 60, "model": 90, "ray": 60, "data": 150, "plain": 120, "train": 150,
                                   "predict": 150, "tune": 240, "train_compile": 240},
            ray_cpus=None, model_batches=(64, 256), model_size=160, model_steps=(3, 20), train_images=7390,
            raw_size="200x160", size=160, test_fraction=0.1, batch=64, test_batch=128, epochs=3, predict_images=2000,
            predict_small=64, predict_batches=(64, 256), tune_lrs=(3e-4, 1e-3, 3e-3, 1e-2), tune_epochs=2)
SMOKE = Sizes(budget_s=300, budgets={"env": 60, "model": 60, "ray": 60, "data": 90, "plain": 60, "train": 120,
                                     "predict": 90, "tune": 150, "train_compile": 30},
              ray_cpus=4, model_batches=(2,), model_size=32, model_steps=(1, 3), train_images=40, raw_size="40x32",
              size=32, test_fraction=0.25, batch=8, test_batch=8, epochs=2, predict_images=12, predict_small=0,
              predict_batches=(8,), tune_lrs=(1e-3,), tune_epochs=1)


class Skip(Exception):
    """A step that cannot run here; the message is the reason."""


class StepFailed(Exception):
    """A step that failed after measuring something: ``figures`` are kept beside the error."""

    def __init__(self, message: str, figures: dict) -> None:
        super().__init__(message)
        self.figures = figures


@dataclass
class Ran:
    """One command: exit status, output, wall seconds, and when each line came (seconds after the start)."""

    rc: int
    text: str
    wall: float
    lines: list[tuple[float, str]] = field(default_factory=list)
    late: bool = False  # killed at its time limit after it had printed that its work was done

    def first(self, pattern: str) -> tuple[float, re.Match] | None:
        return next(((t, m) for t, line in self.lines if (m := re.search(pattern, line))), None)


# --- the check ------------------------------------------------------------------------------------------------

class Check:
    def __init__(self, out: Path, work: Path, mode: str, sizes: Sizes, argv: list[str]) -> None:
        self.out, self.work, self.mode, self.sizes = out, work, mode, sizes
        self.shards, self.images = work / "shards", work / "raw-predict" / "images"
        self.address: str | None = None
        self.ray_temp: str | None = None
        self.started = time.monotonic()
        self.report = {"script": "benchmarks/gpu_check.py", "argv": argv, "mode": mode,
                       "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "budget_s": sizes.budget_s, "sizes": asdict(sizes), "elapsed_s": 0.0, "complete": False,
                       "steps": {name: {"status": "pending"} for name in STEPS}}
        out.mkdir(parents=True, exist_ok=True)
        self.log = out / "gpu_check.log"
        self.log.write_text("")

    # -- bookkeeping

    def left(self) -> float:
        return self.sizes.budget_s - (time.monotonic() - self.started)

    def figures(self, step: str) -> dict:
        return self.report["steps"][step].get("figures") or {}

    def run(self, name: str) -> None:
        entry = self.report["steps"][name]
        limit = min(self.sizes.budgets[name], self.left())
        if limit < MIN_STEP_S:
            entry.update(status="skipped", reason=f"no time left: {self.left():.0f} s of the {self.sizes.budget_s:g} s "
                                                  "budget")
            print(f"[gpu_check] {name}: skipped ({entry['reason']})", flush=True)
            return self.write()
        entry.update(status="running", limit_s=round(limit))
        self.write()
        print(f"[gpu_check] {name}: started (up to {limit:.0f} s; {self.left():.0f} s of the budget left)", flush=True)
        start = time.monotonic()
        try:
            entry["figures"] = getattr(self, f"step_{name}")(start + limit)
            entry["status"] = "ok"
        except Skip as skip:
            entry.update(status="skipped", reason=str(skip))
        except Exception as err:  # recorded; the next step runs
            entry.update(status="timeout" if isinstance(err, subprocess.TimeoutExpired) else "error",
                         error=f"{type(err).__name__}: {err}")
            if isinstance(err, StepFailed):
                entry["figures"] = err.figures
            with self.log.open("a") as log:
                log.write(traceback.format_exc())
        finally:
            entry["seconds"] = round(time.monotonic() - start, 1)
            if entry["status"] == "running":  # interrupted (SIGTERM, Ctrl+C)
                entry["status"] = "interrupted"
            self.write()
        said = entry.get("figures", {}).get("summary") or entry.get("reason") or entry.get("error", "")
        print(f"[gpu_check] {name}: {entry['status']} in {entry['seconds']:.0f} s: {said}", flush=True)

    def write(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        for name, text in (("gpu_check.json", json.dumps(self.report, indent=2) + "\n"),
                           ("gpu_check.md", markdown(self.report))):
            partial = self.out / f".{name}.partial"
            partial.write_text(text)
            partial.replace(self.out / name)

    # -- commands

    def command(self, step: str, cmd: list[str], deadline: float) -> Ran:
        """Run ``cmd`` until ``deadline`` (then kill it: TimeoutExpired); its output goes to gpu_check.log, the lines
        a person wants to see also to the console."""
        limit = deadline - time.monotonic()
        shown = shlex.join(["raypets", *cmd[3:]] if cmd[1:3] == ["-c", RAYPETS] else cmd)
        if limit < 1:
            raise subprocess.TimeoutExpired(shown, 0)
        lines: list[tuple[float, str]] = []
        with self.log.open("a") as log:
            log.write(f"[{step}] $ {shown}\n")
            log.flush()
            start = time.monotonic()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})  # lines timed as they come

            def read() -> None:
                echoed = 0
                for raw in proc.stdout:
                    line = ANSI.sub("", raw.rstrip())
                    lines.append((time.monotonic() - start, line))
                    log.write(line + "\n")
                    log.flush()
                    if ECHO.search(line) and echoed < ECHO_MAX:
                        echoed += 1
                        print(f"  | {line}", flush=True)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            try:
                rc = proc.wait(timeout=limit)
            except BaseException as err:  # out of time, or this script stopped (SIGTERM): the command goes too
                proc.kill()
                proc.wait()
                reader.join(5)
                log.write(f"[gpu_check] killed after {time.monotonic() - start:.0f} s\n")
                if isinstance(err, subprocess.TimeoutExpired):
                    timeout = subprocess.TimeoutExpired(shown, round(limit))
                    timeout.ran = Ran(-9, "\n".join(line for _, line in lines), time.monotonic() - start, lines)
                    raise timeout from None
                raise
            reader.join(30)
            wall = time.monotonic() - start
            log.write(f"[gpu_check] exit status {rc} after {wall:.1f} s\n")
        return Ran(rc, "\n".join(line for _, line in lines), wall, lines)

    def raypets(self, step: str, args: list[str], deadline: float, *, ray: bool = False, ok=(0,)) -> Ran:
        """``raypets ARGS`` (joining this check's Ray when ``ray``); a failure raises with the output's tail."""
        if ray and self.address:
            args = [*args, "--address", self.address]
        try:
            ran = self.command(step, [sys.executable, "-c", RAYPETS, *args], deadline)
        except subprocess.TimeoutExpired as err:
            if not err.ran.first(DONE[args[0]]):
                raise
            ran = err.ran
            ran.rc, ran.late = 0, True
            print(f"[gpu_check] {step}: raypets {args[0]} was killed at its time limit after it had finished",
                  flush=True)
        if ran.rc not in ok:
            raise RuntimeError(f"raypets {args[0]} exited with status {ran.rc}: {tail(ran.text)}")
        return ran

    def child(self, step: str, params: dict, deadline: float) -> dict:
        """This script's ``--child STEP``, which prints its figures as its last line."""
        try:
            ran = self.command(step, [sys.executable, str(Path(__file__).resolve()), "--child", step, "--params",
                                      json.dumps(params)], deadline)
        except subprocess.TimeoutExpired as err:
            if not err.ran.first(f"^{RESULT_MARK}"):
                raise
            ran = err.ran  # killed after it printed its figures
        found = [line for _, line in ran.lines if line.startswith(RESULT_MARK)]
        if not found or ran.rc not in (0, -9):  # -9: killed after it printed them
            raise RuntimeError(f"child {step} exited with status {ran.rc}: {tail(ran.text)}")
        return json.loads(found[-1][len(RESULT_MARK):])

    def flags(self, step: str) -> tuple[list[str], list[str]]:
        """This mode's flags of ``step`` that the installed raypets lists, and those it does not."""
        command = "train" if step == "train_compile" else step
        usage = cli_usage(command)
        given, missing = [], []
        for flag in FLAGS[self.mode].get(step, ()):
            name = flag.split()[0]
            listed = re.search(rf"[\[|( ]{re.escape(name)}[\]|) \n]", usage + "\n")
            (given if listed else missing).extend(flag.split() if listed else [name])
        return given, missing

    # -- the steps: each returns its figures (with a one-line "summary") or raises

    def step_env(self, deadline: float) -> dict:
        info = self.child("env", {}, deadline)
        try:
            info["flags"] = {step: dict(zip(("given", "missing"), self.flags(step), strict=True))
                             for step in FLAGS[self.mode]}
        except Exception as err:  # raypets' CLI does not load: the stages will say more
            info["flags"] = f"unknown: {type(err).__name__}: {err}"
        gpu = f"{info['gpu']} ({info['gpu_memory_gib']} GiB)" if info.get("gpu") else "no CUDA device"
        info["summary"] = (f"Python {info['python']}, torch {info['torch']} (CUDA {info['torch_cuda']}), {gpu}, "
                           f"Ray {info['ray']}, raypets {info['raypets']}, {info['cpus']} CPUs")
        if self.mode == "gpu" and not info.get("cuda_available"):
            raise StepFailed("torch sees no CUDA device: the GPU steps will fail", info)
        return info

    def step_model(self, deadline: float) -> dict:
        s = self.sizes
        params = {"device": "cuda" if self.mode == "gpu" else "cpu", "batches": list(s.model_batches),
                  "size": s.model_size, "warmup": s.model_steps[0], "steps": s.model_steps[1],
                  "checkpoint": str(self.work / "random.pt")}
        result = self.child("model", params, deadline)
        rows = ", ".join(f"{r['images_per_s']:.1f} at batch {r['batch']}" for r in result["rows"])
        result["summary"] = f"XceptionUNet forward + backward ({result['precision']}), images/s: {rows}"
        return result

    def step_ray(self, deadline: float) -> dict:
        import ray

        self.ray_temp = tempfile.mkdtemp(prefix="rp-gc-", dir="/tmp")  # short: Ray's socket paths have a limit
        gpus = self.figures("env").get("gpus") if self.mode == "gpu" else 0  # what torch sees, if Ray's probe would not
        start = time.monotonic()
        ray.init(num_cpus=self.sizes.ray_cpus, num_gpus=gpus, dashboard_port=free_port(), _temp_dir=self.ray_temp,
                 log_to_driver=False)
        seconds = time.monotonic() - start
        self.address = ray.get_runtime_context().gcs_address
        total = ray.cluster_resources()
        resources = {"CPU": total.get("CPU", 0), "GPU": total.get("GPU", 0),
                     "object_store_gib": round(total.get("object_store_memory", 0) / 2**30, 1)}
        return {"start_s": round(seconds, 1), "address": self.address, "resources": resources, "ray": ray.__version__,
                "summary": f"local Ray {ray.__version__} started in {seconds:.1f} s: "
                           + ", ".join(f"{k} {v:g}" for k, v in resources.items())}

    def step_data(self, deadline: float) -> dict:
        s = self.sizes
        figures = {}
        raw = self.work / "raw-train"
        if (self.shards / "manifest.json").exists():
            figures["reused"] = str(self.shards)
        else:
            for folder in (raw, self.shards):
                shutil.rmtree(folder, ignore_errors=True)
            ran = self.raypets("data", ["synth", str(raw), "--n", str(s.train_images), "--size", s.raw_size], deadline)
            figures["synth_train_s"] = round(ran.wall, 1)
            ran = self.raypets("data", ["prepare", str(raw), str(self.shards), "--size", str(s.size),
                                        "--test-fraction", str(s.test_fraction), "--no-progress"], deadline, ray=True)
            figures["prepare_s"] = round(ran.wall, 1)
            shutil.rmtree(raw, ignore_errors=True)
        manifest = json.loads((self.shards / "manifest.json").read_text())
        figures["counts"] = manifest["counts"]
        if len(list(self.images.glob("*.jpg"))) != s.predict_images:
            shutil.rmtree(self.images.parent, ignore_errors=True)
            ran = self.raypets("data", ["synth", str(self.images.parent), "--n", str(s.predict_images), "--size",
                                        PREDICT_IMAGE_SIZE, "--seed", "1"], deadline)
            figures["synth_predict_s"] = round(ran.wall, 1)
        figures["predict_images"] = len(list(self.images.glob("*.jpg")))
        figures["summary"] = (f"{manifest['counts']['train']} train + {manifest['counts']['test']} test images at "
                              f"{s.size} px, {figures['predict_images']} {PREDICT_IMAGE_SIZE} JPEGs"
                              + "".join(f"; {k} {v} s" for k, v in figures.items() if k.endswith("_s")))
        return figures

    def step_plain(self, deadline: float) -> dict:
        self.need_shards()
        params = {"shards": str(self.shards), "batch": self.sizes.batch, "epochs": self.sizes.epochs,
                  "device": "cuda" if self.mode == "gpu" else "cpu"}
        result = self.child("plain", params, deadline)
        result["summary"] = (f"{result['images_per_s']:.1f} images/s (median of epochs 2..{self.sizes.epochs}, batch "
                             f"{self.sizes.batch}, {result['precision']})")
        return result

    def step_train(self, deadline: float, step: str = "train") -> dict:
        given, missing = self.flags(step)
        if step == "train_compile":
            if self.mode != "gpu":
                raise Skip("torch.compile is left to the GPU run (minutes of compiling on a small CPU)")
            if "--compile" in missing:
                raise Skip("the installed raypets train has no --compile")
        self.need_shards()
        s = self.sizes
        run_dir = self.work / step
        shutil.rmtree(run_dir, ignore_errors=True)
        # --recipe robust: the plain loop's work (no augmentation, the tutorial's network), so the ratio is the overhead
        ran = self.raypets(step, ["train", "--data", str(self.shards), "--run-dir", str(run_dir), "--workers", "1",
                                  "--epochs", str(s.epochs), "--batch-size", str(s.batch), "--test-batch-size",
                                  str(s.test_batch), "--checkpoint-every", str(s.epochs), "--no-progress",
                                  "--recipe", "robust", *given],
                           deadline, ray=True)
        return train_figures(ran, run_dir, given, missing, self.figures("plain").get("images_per_s"))

    def step_predict(self, deadline: float) -> dict:
        from bench_predict import first_images

        s = self.sizes
        if not any(self.images.glob("*.jpg")):
            raise Skip(f"no images to predict in {self.images} (the data step did not make them)")
        trained = self.work / "train"
        checkpoint = trained if any((trained / "checkpoints").glob("*.pt")) else self.work / "random.pt"
        if not checkpoint.exists():
            raise Skip("no checkpoint: neither the train step's run nor the model step's random weights")
        given, missing = self.flags("predict")
        calls = [("default", self.images, None), *((f"batch {b}", self.images, b) for b in s.predict_batches)]
        if s.predict_small:
            small = self.work / "predict-small"
            shutil.rmtree(small, ignore_errors=True)
            calls.insert(0, ("warm-up", first_images(self.images, s.predict_small, small), None))
        figures = {"checkpoint": "the train step's run" if checkpoint == trained else "random weights",
                   "flags": given, "flags_missing": missing, "runs": []}
        try:
            for label, source, batch in calls:
                output = self.work / "predicted"
                shutil.rmtree(output, ignore_errors=True)
                args = ["predict", "--checkpoint", str(checkpoint), str(source), str(output), "--size", str(s.size),
                        "--no-progress", *given, *(["--batch-size", str(batch)] if batch else [])]
                ran = self.raypets("predict", args, deadline, ray=True)
                shutil.rmtree(output, ignore_errors=True)  # 0.3 MB per image
                figures["runs"].append(predict_run(label, batch, ran))
        except Exception as err:
            if all(r["run"] == "warm-up" for r in figures["runs"]):  # nothing measured
                raise
            raise StepFailed(str(err), predict_summary(figures)) from err
        return predict_summary(figures)

    def step_tune(self, deadline: float) -> dict:
        self.need_shards()
        s = self.sizes
        given, missing = self.flags("tune")
        space = self.work / "sweep.yaml"
        space.write_text(f"""# gpu_check: {len(s.tune_lrs)} trials, one worker each
scheduler: {{type: fifo}}
train: {{epochs: {s.tune_epochs}, batch_size: {s.batch}, test_batch_size: {s.test_batch}}}
space:
  lr: {{grid: [{", ".join(repr(lr) for lr in s.tune_lrs)}]}}
""")
        run_dir = self.work / "tune"
        shutil.rmtree(run_dir, ignore_errors=True)
        ran = self.raypets("tune", ["tune", "--data", str(self.shards), "--space", str(space), "--run-dir",
                                    str(run_dir), "--workers-per-trial", "1", "--no-progress", *given], deadline,
                           ray=True, ok=(0, 1))
        figures = tune_figures(ran, run_dir, given, missing)
        if ran.rc:
            raise StepFailed(f"raypets tune exited with status {ran.rc}: {tail(ran.text)}", figures)
        return figures

    def step_train_compile(self, deadline: float) -> dict:
        return self.step_train(deadline, "train_compile")

    def need_shards(self) -> None:
        if not (self.shards / "manifest.json").exists():
            raise Skip(f"no prepared shards in {self.shards} (the data step did not make them)")

    def close(self) -> None:
        if self.address:
            import ray

            ray.shutdown()
        if self.ray_temp:
            shutil.rmtree(self.ray_temp, ignore_errors=True)


# --- figures from the stages' output -------------------------------------------------------------------------

def train_figures(ran: Ran, run_dir: Path, given: list[str], missing: list[str], ceiling: float | None) -> dict:
    """From RUN/metrics.jsonl: images/s (median of epochs 2..), seconds per epoch; from the output's timing, the
    start-up (command start to epoch 1's start) and the end (last epoch line to exit)."""
    from raypets.runlog import read_metrics

    metrics = read_metrics(run_dir)
    if not metrics:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no epoch")
    later = metrics[1:] or metrics
    first_line = ran.first(r"epoch 1/\d+ ")
    last_line = [t for t, line in ran.lines if re.search(r"epoch \d+/\d+ ", line)]
    device = ran.first(r"worker\(s\) on (\w+)")  # CPU or GPU; the precision and options follow in brackets
    figures = {
        "images_per_s": round(statistics.median(m["images_per_s"] for m in later), 1),
        "epoch_s": round(statistics.median(m["epoch_time_s"] for m in later), 2),
        "first_epoch_s": round(metrics[0]["epoch_time_s"], 2),
        "startup_s": round(first_line[0] - metrics[0]["epoch_time_s"], 1) if first_line else None,
        "end_s": round(ran.wall - last_line[-1], 1) if last_line else None,
        "wall_s": round(ran.wall, 1),
        "device": device[1].group(1) if device else None,
        "epochs": [{"epoch": m["epoch"], "images_per_s": round(m["images_per_s"], 1),
                    "epoch_time_s": round(m["epoch_time_s"], 2), "mean_dice": round(m["mean_dice"], 4)}
                   for m in metrics],
        "flags": given, "flags_missing": missing, "killed_after_done": ran.late,
    }
    if ceiling:
        figures["of_plain_loop"] = round(figures["images_per_s"] / ceiling, 2)
    figures["summary"] = (f"{figures['images_per_s']:.1f} images/s (epochs 2..{len(metrics)}"
                          + (f", {figures['of_plain_loop']:.2f} of the plain loop" if ceiling else "")
                          + f"), {figures['epoch_s']:.1f} s per epoch (first {figures['first_epoch_s']:.1f} s), "
                          f"start-up {figures['startup_s']} s, {figures['wall_s']:.0f} s in all on {figures['device']}")
    return figures


PREDICTED = re.compile(r"predicted (\d+) image\(s\) into .* in ([\d.]+) s \(([\d.]+) images/s, (\d+) (\w+) model")


def predict_run(label: str, batch: int | None, ran: Ran) -> dict:
    found = PREDICTED.search(ran.text)
    if not found:
        raise RuntimeError(f"raypets predict printed no 'predicted N image(s)' line: {tail(ran.text)}")
    images, seconds, ips, actors, device = found.groups()
    return {"run": label, "batch": batch, "images": int(images), "seconds": float(seconds),
            "images_per_s": float(ips), "actors": int(actors), "device": device, "wall_s": round(ran.wall, 1),
            "killed_after_done": ran.late}


def predict_summary(figures: dict) -> dict:
    """Default and best batch; "running" images/s take the warm-up call's time as every call's fixed cost (the
    model actors' start), as bench_predict does."""
    runs = figures["runs"]
    warm = next((r for r in runs if r["run"] == "warm-up"), None)
    for run in runs:
        if warm and run is not warm and run["seconds"] > warm["seconds"]:
            running = (run["images"] - warm["images"]) / (run["seconds"] - warm["seconds"])
            run["running_images_per_s"] = round(running, 1)
    measured = [r for r in runs if r is not warm]
    default = next((r for r in measured if r["run"] == "default"), None)
    best = max(measured, key=lambda r: r["images_per_s"])
    figures.update(default_images_per_s=default and default["images_per_s"], best_batch=best["batch"] or "default",
                   best_images_per_s=best["images_per_s"], fixed_cost_s=warm and warm["seconds"])
    figures["summary"] = (f"{best['images']} images on {best['actors']} {best['device']} actor(s): default batch "
                          f"{figures['default_images_per_s']} images/s, best ({figures['best_batch']}) "
                          f"{best['images_per_s']} images/s"
                          + (f", {best['running_images_per_s']} once running" if "running_images_per_s" in best else "")
                          + (f"; a call's fixed cost ~{warm['seconds']:.1f} s" if warm else ""))
    return figures


def tune_figures(ran: Ran, run_dir: Path, given: list[str], missing: list[str]) -> dict:
    """From RUN/trials.csv and each trial's metrics.jsonl: statuses, epochs, images/s per trial and in all."""
    from raypets.runlog import read_metrics

    concurrent = ran.first(r"up to (\d+) trial\(s\) at once")
    rows = list(csv.DictReader((run_dir / "trials.csv").open())) if (run_dir / "trials.csv").exists() else []
    trials = []
    for row in rows:
        metrics = read_metrics(run_dir / "trials" / row["trial_id"])
        trials.append({"trial_id": row["trial_id"], "lr": float(row["lr"]), "status": row["status"],
                       "epochs_run": int(row["epochs_run"]), "mean_dice": float(row.get("mean_dice") or "nan"),
                       "images_per_s": [round(m["images_per_s"], 1) for m in metrics],
                       "epoch_time_s": [round(m["epoch_time_s"], 2) for m in metrics]})
    per_trial = [statistics.median(t["images_per_s"]) for t in trials if t["images_per_s"]]
    done = sum(t["status"] == "done" for t in trials)
    figures = {"wall_s": round(ran.wall, 1), "trials": trials, "done": done,
               "concurrent": int(concurrent[1].group(1)) if concurrent else None,
               "trial_images_per_s": round(statistics.median(per_trial), 1) if per_trial else None,
               "sum_images_per_s": round(sum(per_trial), 1) if per_trial else None,
               "flags": given, "flags_missing": missing, "killed_after_done": ran.late}
    figures["summary"] = (f"{done} of {len(trials)} trials done in {figures['wall_s']:.0f} s, up to "
                          f"{figures['concurrent']} at once; {figures['trial_images_per_s']} images/s per trial "
                          f"(median), {figures['sum_images_per_s']} summed")
    return figures


def tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_usage(command: str) -> str:
    """The usage lines of ``raypets COMMAND --help`` (every option it takes, bracketed)."""
    from raypets.cli import build_parser

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
        build_parser().parse_args([command, "--help"])
    return printed.getvalue().split("\n\n")[0]


def markdown(report: dict) -> str:
    steps = report["steps"]
    env = steps["env"].get("figures") or {}
    lines = [
        "# raypets GPU check (`benchmarks/gpu_check.py`)", "",
        f"{report['started']}, mode {report['mode']}, `python {shlex.join(report['argv'])}`: "
        f"{report['elapsed_s']:.0f} s of a {report['budget_s']:g} s budget"
        + ("." if report["complete"] else " (not complete: the run stopped or is still running)."),
    ]
    if env.get("machine"):
        lines += ["", f"Machine: {env['machine']}; GPU: {env.get('gpu') or 'none'}"
                      + (f", driver {env['nvidia_driver']}" if env.get("nvidia_driver") else "") + "."]
    lines += ["", "| step | status | seconds | result |", "|---|---|---|---|"]
    for name, entry in steps.items():
        said = (entry.get("error") or "").strip().splitlines()[-1:]  # a traceback's last line says what failed
        said = said[0] if said else (entry.get("figures") or {}).get("summary") or entry.get("reason") or ""
        lines.append(f"| {name} | {entry['status']} | {entry.get('seconds', '')} | {said.replace('|', '/')} |")
    problems = [(name, e["error"]) for name, e in steps.items() if e.get("error")]
    if problems:
        lines += ["", "## Errors", ""]
        for name, error in problems:
            lines += [f"### {name}", "", "```", error, "```", ""]
    lines.append("\nEvery figure and each command's output: gpu_check.json and gpu_check.log beside this file.")
    return "\n".join(lines) + "\n"


# --- child steps (run as `gpu_check.py --child NAME PARAMS`) -----------------------------------------------------

def child_env(params: dict) -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch
    from docs_section import machine

    info = {"python": platform.python_version(), "executable": sys.executable, "machine": machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpus=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    bf16_native=torch.cuda.is_bf16_supported(including_emulation=False))
    for name in ("ray", "raypets", "torchvision", "numpy", "pyarrow", "h5py", "pillow", "onnxruntime"):
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = "missing"
    spec = importlib.util.find_spec("raypets")  # where the stages import it from (PYTHONPATH, else installed)
    info["raypets_path"] = str(Path(spec.origin).parent) if spec and spec.origin else None
    if Path("/dev/shm").exists():
        info["dev_shm_gib"] = round(shutil.disk_usage("/dev/shm").total / 2**30, 1)
    smi = shutil.which("nvidia-smi")
    if smi:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
            info["nvidia_smi"] = out
            info["nvidia_driver"] = out.split(",")[1].strip() if out.count(",") >= 2 else None
    return info


def child_model(params: dict) -> dict:
    import torch
    from bench_model import run

    from raypets.keras_json import REFERENCE_NETWORK
    from raypets.model import XceptionUNet

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    torch.save(XceptionUNet().state_dict(), params["checkpoint"])  # predict's fallback when train fails
    device = torch.device(params["device"])
    rows = []
    for batch in params["batches"]:
        ips = run(device, batch, params["size"], params["warmup"], params["steps"], REFERENCE_NETWORK)
        rows.append({"batch": batch, "images_per_s": round(ips["XceptionUNet"], 1),
                     "from_keras_json_images_per_s": round(ips["from_keras_json"], 1)})
    gpu = device.type == "cuda"
    return {"rows": rows, "size": params["size"], "device": str(device), "timed_steps": params["steps"],
            "precision": "bf16 autocast, channels_last" if gpu else "fp32",
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None}


def child_plain(params: dict) -> dict:
    from bench_train import plain_loop

    ips = plain_loop(Path(params["shards"]), params["batch"], params["epochs"], os.cpu_count() or 1,
                     device=params["device"])
    return {"images_per_s": round(ips, 1), "batch": params["batch"], "epochs": params["epochs"],
            "device": params["device"],
            "precision": "bf16 autocast, channels_last" if params["device"] == "cuda" else "fp32"}


# --- main ------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", help="folder for gpu_check.json, .md and .log")
    parser.add_argument("--cpu-smoke", action="store_true", help="the same steps at tiny sizes on the CPU")
    parser.add_argument("--budget-s", type=float, help="seconds for the whole check (default 480; smoke 170)")
    parser.add_argument("--only", nargs="+", choices=STEPS, help="run these steps (and skip the others)")
    parser.add_argument("--work", type=Path, help="folder for the data and runs (default: a temp folder, removed; "
                        "an existing one's data is reused)")
    parser.add_argument("--keep-work", action="store_true", help="keep the work folder")
    parser.add_argument("--child", choices=["env", "model", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        figures = globals()[f"child_{args.child}"](json.loads(args.params))
        print(RESULT_MARK + json.dumps(figures), flush=True)
        return 0
    if args.out is None:
        parser.error("OUT_DIR is required")

    sizes = SMOKE if args.cpu_smoke else GPU
    if args.budget_s:
        sizes = Sizes(**{**asdict(sizes), "budget_s": args.budget_s})
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    argv_shown = ["benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]
    check = Check(args.out, work, "cpu" if args.cpu_smoke else "gpu", sizes, argv_shown)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the report is written on the way out
    print(f"[gpu_check] {check.mode} mode, budget {sizes.budget_s:g} s, report in {args.out}, work in {work}",
          flush=True)
    try:
        for name in STEPS:
            if args.only and name not in args.only:
                check.report["steps"][name].update(status="skipped", reason="not in --only")
                continue
            check.run(name)
        check.report["complete"] = True
    finally:
        check.close()
        check.write()
        if not args.keep_work and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    failed = [name for name, entry in check.report["steps"].items() if entry["status"] not in ("ok", "skipped")]
    print(f"[gpu_check] done in {check.report['elapsed_s']:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else "")
          + f"; wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

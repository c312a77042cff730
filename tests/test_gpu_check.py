"""``benchmarks/gpu_check.py --cpu-smoke`` end to end, so that the GPU check cannot rot before a GPU is at hand: every
step has its figures (train_compile, which needs a GPU, is skipped with its reason), and both reports are written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray  # the check starts Ray (in its own process): `pytest -m "not ray"` leaves it out

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
# A figure each step must have measured.
FIGURES = {"env": "torch", "model": "rows", "ray": "start_s", "data": "counts", "plain": "images_per_s",
           "train": "images_per_s", "predict": "best_images_per_s", "tune": "trial_images_per_s"}


def test_cpu_smoke_measures_every_step(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(out), "--cpu-smoke", "--work", str(tmp_path / "work")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # its own process group: a timeout takes its children too
    try:
        printed, _ = proc.communicate(timeout=360)  # the smoke's own budget is 300 s
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        printed, _ = proc.communicate()
        pytest.fail(f"gpu_check.py --cpu-smoke ran past 360 s:\n{printed[-4000:]}")

    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == [*FIGURES, "train_compile"]
    for name, key in FIGURES.items():
        assert steps[name]["status"] == "ok", (name, steps[name], printed[-4000:])
        assert steps[name]["figures"][key], (name, steps[name]["figures"])
        assert steps[name]["figures"]["summary"]
    assert steps["train_compile"]["status"] == "skipped" and "GPU" in steps["train_compile"]["reason"]
    train = steps["train"]["figures"]
    assert [e["epoch"] for e in train["epochs"]] == [1, 2] and train["device"] == "CPU"
    assert train["startup_s"] > 0 and train["of_plain_loop"] > 0
    predict = steps["predict"]["figures"]
    assert [r["run"] for r in predict["runs"]] == ["default", "batch 8"]
    assert all(r["images"] == 12 for r in predict["runs"])
    tune = steps["tune"]["figures"]
    assert tune["done"] == len(tune["trials"]) == 1
    assert report["complete"] and proc.returncode == 0, printed[-4000:]
    assert "[train] $ raypets train --data " in (out / "gpu_check.log").read_text()
    markdown = (out / "gpu_check.md").read_text()
    assert "| train | ok |" in markdown and "| train_compile | skipped |" in markdown

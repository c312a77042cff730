"""Plots of a training run's curves and of a sweep's metric against the learning rate. No Ray."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  after choosing the headless backend


def plot_curves(history: list[dict], out_dir: Path) -> list[Path]:
    """``loss.png`` (train and test loss) and ``dice.png`` (mean and per-class test Dice) per epoch."""
    epochs = [m["epoch"] for m in history]
    written = []
    for name, series, ylabel in (
        ("loss.png", ["train_loss", "test_loss"], "loss"),
        ("dice.png", ["mean_dice"] + sorted(k for k in history[0] if k.startswith("dice_")), "test Dice"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for key in series:
            ax.plot(epochs, [m[key] if m[key] is not None else float("nan") for m in history], marker="o",
                    label=key.replace("dice_", "Dice "))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
        written.append(out_dir / name)
    return written


def plot_metric_vs_lr(points: list[tuple[float, float, bool]], metric: str, path: Path) -> Path:
    """A sweep's best ``metric`` per trial against its learning rate (log scale); trials ASHA stopped early hollow."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for early, label, face in ((False, "ran to the end", None), (True, "stopped early", "none")):
        chosen = [(lr, value) for lr, value, stopped in points if stopped == early]
        if chosen:
            ax.scatter(*zip(*chosen, strict=True), label=label, facecolors=face, edgecolors="C0")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"best {metric}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

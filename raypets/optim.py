"""Optimizers and learning-rate schedules: one registry each, the schedules' schema beside their maths. No Ray here.

A schedule is a closed form of the epoch, so a resumed run continues it exactly: ``learning_rate`` gives the LR of
any step from the settings alone (linear warm-up over the first ``warmup_steps`` steps, then the epoch schedule).
``cosine`` and ``poly`` decay over the run's epochs, to zero after the last.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from raypets.errors import UserError

# torch's defaults for each (RMSprop alpha 0.99, eps 1e-8: what rmldnn's log shows).
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
}


@dataclass(frozen=True)
class Schedule:
    """An epoch schedule: the keys its spec takes, and the LR factor after ``done`` of ``epochs`` completed epochs
    (called as ``factor(spec, done, epochs)``)."""

    keys: tuple[str, ...]
    factor: Callable[[dict, int, int], float]


LR_SCHEDULES: dict[str, Schedule] = {
    "step": Schedule(("step_size", "gamma"), lambda spec, done, _: spec["gamma"] ** (done // spec["step_size"])),
    "multistep": Schedule(("milestones", "gamma"),
                          lambda spec, done, _: spec["gamma"] ** sum(done >= m for m in spec["milestones"])),
    "exponential": Schedule(("gamma",), lambda spec, done, _: spec["gamma"] ** done),
    "cosine": Schedule((), lambda spec, done, epochs: 0.5 * (1 + math.cos(math.pi * done / epochs))),
    "poly": Schedule(("power",), lambda spec, done, epochs: (1 - done / epochs) ** spec["power"]),
}


def make_optimizer(name: str, params: Iterable, lr: float, weight_decay: float | None = None) -> torch.optim.Optimizer:
    """The optimizer ``name`` at ``lr``; ``weight_decay`` None keeps its own default."""
    return OPTIMIZERS[name](params, lr=lr, **({} if weight_decay is None else {"weight_decay": weight_decay}))


def check_lr_schedule(spec: dict) -> None:
    """``{"type": "step", "step_size": 10, "gamma": 0.1}``, ``{"type": "cosine"}``, or another of ``LR_SCHEDULES``
    with its keys."""
    kind = str(spec.get("type", "")).lower()
    if kind not in LR_SCHEDULES:
        raise UserError(f"lr_scheduler type {spec.get('type')!r} is not one of {', '.join(LR_SCHEDULES)}")
    expected = set(LR_SCHEDULES[kind].keys)
    missing, unknown = expected - set(spec), set(spec) - expected - {"type"}
    if missing or unknown:
        raise UserError(f"lr_scheduler {kind} takes {', '.join(sorted(expected))}; "
                        f"missing {sorted(missing) or 'none'}, unknown {sorted(unknown) or 'none'}")


def learning_rate(lr: float, warmup_steps: int, schedule: dict | None, step: int, epoch: int, epochs: int) -> float:
    """LR at global ``step`` (0-based) in ``epoch`` (1-based) of ``epochs``: linear warm-up, then the epoch
    ``schedule``."""
    if warmup_steps:
        lr *= min(1.0, (step + 1) / warmup_steps)
    if schedule:
        lr *= LR_SCHEDULES[schedule["type"].lower()].factor(schedule, epoch - 1, epochs)
    return lr

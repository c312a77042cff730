"""The training step reads nothing back to the host: on a GPU each read stalls the CPU that feeds it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from raypets.config import TrainConfig
from raypets.losses import make_loss
from raypets.model import build_network
from raypets.optim import make_optimizer
from raypets.precision import resolve_precision
from raypets.stages.train_loop import Progress, train_epoch

READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture
def host_reads(monkeypatch) -> Counter:
    """Counts each Tensor method that copies a value to the host (what ``.cuda()`` training would wait for)."""
    calls: Counter = Counter()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return calls


def _epoch(check_values: bool, **settings) -> tuple:
    torch.manual_seed(0)
    cfg = TrainConfig(data=Path("shards"), run_dir=Path("run"), batch_size=4, warmup_steps=2, hflip=0.5, **settings)
    model = build_network(3, bn_momentum=cfg.bn_momentum).to(memory_format=torch.channels_last)
    batches = [{"image": torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8),
                "mask": torch.randint(0, 3, (4, 32, 32), dtype=torch.uint8)} for _ in range(3)]
    return (model, batches, make_optimizer(cfg.optimizer, model.parameters(), cfg.lr),
            torch.amp.GradScaler("cpu", enabled=False), make_loss(cfg.loss, check_values=check_values), cfg,
            resolve_precision(cfg.precision, torch.device("cpu")))


def test_an_epoch_reads_nothing_back_until_its_log_is_written(host_reads):
    trained = train_epoch(*_epoch(check_values=False), epoch=1, step=0, steps_per_epoch=3,
                          gen=torch.Generator().manual_seed(0), record=True)
    assert host_reads == Counter() and trained.step == 3
    rows = trained.batches()  # the train log's values: one read for the whole epoch
    assert host_reads == Counter({"tolist": 1})
    assert len(rows) == 3 and all(loss > 0 for _, loss, _, _ in rows) and rows[0][2] > 0
    assert [lr for *_, lr in rows] == pytest.approx([5e-4, 1e-3, 1e-3])


def test_augmentation_reads_nothing_back_either(host_reads):
    augmented = _epoch(check_values=False, crop_scale=0.5, rotate=10, color_jitter=0.2, vflip=0.5)
    train_epoch(*augmented, epoch=1, step=0, steps_per_epoch=3, gen=torch.Generator().manual_seed(0), record=False)
    assert host_reads == Counter()


def test_the_count_sees_a_read_in_the_step(host_reads):
    """The loss's check of its targets' values reads back once a step: the count above would show it."""
    train_epoch(*_epoch(check_values=True), epoch=1, step=0, steps_per_epoch=3, gen=torch.Generator().manual_seed(0),
                record=False)
    assert host_reads["__bool__"] == 3


def test_progress_lines_come_from_sizes_and_the_clock(host_reads, capsys):
    progress = Progress(every_s=1e-9, epoch_images=24, epochs=3, world=2)  # a line after every batch
    train_epoch(*_epoch(check_values=False), epoch=2, step=0, steps_per_epoch=3, gen=torch.Generator().manual_seed(0),
                record=False, progress=progress)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines] == [f"epoch 2/3: {n}/24 images" for n in (8, 16, 24)]
    assert "epoch ends in 0s, run in " in lines[-1] and host_reads == Counter()  # no read from the device
    quiet = Progress(every_s=0, epoch_images=24, epochs=3, world=2)
    train_epoch(*_epoch(check_values=False), epoch=1, step=0, steps_per_epoch=3, gen=torch.Generator().manual_seed(0),
                record=False, progress=quiet)
    assert capsys.readouterr().out == ""

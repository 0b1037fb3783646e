"""Where one cell's time goes: a timeline of its phases, written as JSON when `VGG_ABLATION_PROFILE`
names a file (`vgg-ablation bench bench.mode=cells` sets it for the cells it runs; nothing is
recorded otherwise).

The phases, each measured where it happens: the process's start-up (from its creation to the
cell's first line: imports, Hydra), the data (listed, decoded or read back, split), opening the
MLflow run, the training steps (forward, backward, optimizer), what happens between steps (the
next batch's cut and augmentation, Lightning's loop, the logger), validation, checkpoint writes,
the test, and the run's last records. Lightning's own profilers time its internals by action
name; this one times the cell's phases as a user sees them, with one callback and a few marks.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytorch_lightning as pl

PROFILE_ENV = "VGG_ABLATION_PROFILE"
# A cell's phases, in the order it meets them (bench_cells reads them off a timeline).
PHASES = ["start-up", "data", "tracking", "training steps", "between steps", "validation", "checkpoints", "test",
          "other"]  # fmt: skip


class Timeline:
    """Named moments of one cell, and the sums the callback adds; a no-op unless enabled."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self.marks: dict[str, float] = {}
        self.sums: dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def mark(self, name: str) -> None:
        if self.enabled:
            self.marks[name] = time.time()

    def add(self, name: str, seconds: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + seconds

    def write_cell(self, cfg, trainer: pl.Trainer, tracking_seconds: float) -> None:
        """The timeline and what the cell did in it (what bench_cells reads)."""
        if self.enabled:
            import torch

            self.write(arch=cfg.arch, threads=torch.get_num_threads(), epochs=trainer.current_epoch,
                       images_trained=trainer.global_step * cfg.data.batch_size, tracking_seconds=tracking_seconds,
                       checkpoint_seconds=getattr(trainer.strategy.checkpoint_io, "seconds", 0.0))  # fmt: skip

    def callbacks(self) -> list[pl.Callback]:
        return [PhaseTimer(self)] if self.enabled else []

    def write(self, **facts) -> None:
        if not self.enabled:
            return
        import psutil

        record = {
            "process_start": psutil.Process().create_time(),
            "marks": self.marks,
            "sums": self.sums,
            **facts,
        }
        self.path.write_text(json.dumps(record, indent=1))


def timeline() -> Timeline:
    return Timeline(os.environ.get(PROFILE_ENV))


class PhaseTimer(pl.Callback):
    """Training steps, the time between them, validation and test, summed over the cell. First
    among the callbacks, so that its validation window closes before the checkpoints are written
    (they are timed apart, in the checkpoint writer)."""

    def __init__(self, line: Timeline):
        self.line = line
        self._started: dict[str, float] = {}
        self._last_batch_end: float | None = None

    def _start(self, name: str) -> None:
        self._started[name] = time.perf_counter()

    def _stop(self, name: str) -> None:
        if name in self._started:
            self.line.add(name, time.perf_counter() - self._started.pop(name))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last_batch_end = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last_batch_end is not None:  # the next batch cut and augmented, the loop's own work
            self.line.add("between_steps", now - self._last_batch_end)
        self._started["train_steps"] = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._stop("train_steps")
        self._last_batch_end = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._last_batch_end = None
        self._start("validation")

    def on_validation_end(self, trainer, pl_module) -> None:
        self._stop("validation")

    def on_test_start(self, trainer, pl_module) -> None:
        self._start("test")

    def on_test_end(self, trainer, pl_module) -> None:
        self._stop("test")

"""Where a cell stands in its study, said as it goes: the k-of-N prefix and the time left
(`Progress`, from what the study knows and what this process did), a line per epoch (`EpochLine`),
and the line each cell ends with (`say_how_it_ended`)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytorch_lightning as pl

from vgg_ablation.study.cells import PROGRESS_ENV, clock
from vgg_ablation.training.cell_run import CellResult


class EpochLine(pl.Callback):
    """In a study, a line per epoch of each cell (the study's prefix, the epoch, its validation
    error, the time the cell still needs at this pace): a cell is never silent for minutes."""

    def __init__(self, progress: Progress, label: str):
        self.progress, self.label, self.started = progress, label, None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.started = self.started or (time.time(), trainer.current_epoch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # after the epoch's validation (Lightning runs it inside the training epoch), whose metrics
        # the module has logged by now: a callback's on_validation_epoch_end runs before the module's
        if self.started is None:
            return
        done = trainer.current_epoch + 1
        per_epoch = (time.time() - self.started[0]) / max(done - self.started[1], 1)
        err = trainer.callback_metrics.get("val/err1")
        val = f", validation error {float(err):.1%}" if err is not None else ""
        left = trainer.max_epochs - done
        eta = f", about {clock(per_epoch * left)} left in this cell" if left else ""
        print(
            f"{self.progress.prefix()} {self.label}: epoch {done}/{trainer.max_epochs}{val}{eta}", flush=True
        )


@dataclass
class Progress:
    """Where a cell stands in its study: k of N, the study's elapsed time, and the time left: the
    cells still to train times the mean time of a trained cell. Both come from the study (which of
    this sweep's cells its store held FINISHED when it launched the sweep, and their recorded
    times) and from this process (the cells it has trained since), so a resumed study neither
    counts its skipped cells as quick ones nor as cells still to train; and the cells after this
    one are known by their place in the sweep, whichever process (a cell per core) runs them."""

    k: int  # this cell, 1-based
    total: int
    started: float
    seconds: float = 0.0  # recorded time of the study's FINISHED cells when this launch began
    timed: int = 0  # how many cells that is
    finished: str = ""  # per job of this sweep, in its order: "1" if FINISHED at launch (it skips)
    side_by_side: int = 1  # cells the launcher trains at once (a cell per core on a CPU)
    job: int = 0  # this cell's place in its sweep

    @classmethod
    def from_env(cls, job_num: int) -> Progress | None:
        value = os.environ.get(PROGRESS_ENV)
        if not value:
            return None
        before, total, started, seconds, timed, finished, *jobs = value.split(":")
        return cls(int(before) + job_num + 1, int(total), float(started), float(seconds), int(timed),
                   finished.removeprefix("f"), int(jobs[0]) if jobs else 1, job_num)  # fmt: skip

    def prefix(self) -> str:
        return f"[{self.k}/{self.total} · {clock(time.time() - self.started)}]"

    def left(self) -> str:
        remaining = self.total - self.k
        if not remaining:
            return "last cell"
        later_in_sweep = self.finished[self.job + 1 :]
        to_train = remaining - later_in_sweep.count("1")  # later sweeps' cells all count
        if not to_train:
            return "nothing more to train"
        cells = f"{to_train} cell{'s' if to_train > 1 else ''} to train"
        timed = self.timed + len(_THIS_PROCESS["trained"])
        if not timed:
            return f"{cells} (time left known after the first)"
        mean = (self.seconds + sum(_THIS_PROCESS["trained"])) / timed
        return f"about {clock(mean * to_train / self.side_by_side)} left ({cells})"

    @staticmethod
    def count(r: CellResult) -> None:
        """This process's cells, for the time left: the time of each it trained."""
        if r.status == "FINISHED":
            _THIS_PROCESS["trained"].append(r.seconds)


# The cells this sweep process ran so far (the basic launcher runs a study's cells in one process).
_THIS_PROCESS: dict = {"trained": []}


def say_how_it_ended(r: CellResult, progress: Progress | None = None) -> None:
    if r.status == "SKIPPED":
        line = f"{r.arch} seed={r.seed}: already FINISHED (run {r.run_id}), skipped"
    elif r.status == "BUSY":
        line = f"{r.arch} seed={r.seed}: being trained by another live process (run {r.run_id}), skipped"
        if r.reason:  # a launch that raced it to the cell's run, and lost
            line = line.replace("), skipped", f", {r.reason}), skipped")
    elif r.status == "FINISHED":
        scored = (f"test top-1 accuracy {r.test_acc1:.1%} (error {1 - r.test_acc1:.1%})" if r.test_acc1 is not None
                  else f"best validation top-1 accuracy {r.val_acc1:.1%} (no test pass)")  # fmt: skip
        line = f"{r.arch} seed={r.seed}: FINISHED in {r.seconds:.0f} s, {scored}" + (
            f", MLflow run {r.run_id}" if r.run_id else ""
        )
    elif r.status == "UNSENT":
        line = f"{r.arch} seed={r.seed}: trained (test top-1 accuracy {r.test_acc1:.1%}) but not recorded: {r.reason}"
    else:
        line = f"{r.arch} seed={r.seed}: {r.status}: {r.reason}"
    if progress:
        Progress.count(r)
        line = f"{progress.prefix()} {line.replace(', MLflow run', '; run')} · {progress.left()}"
    print(line, flush=True)

"""What Lightning fits, from one cell's objects (`build`): the LightningModule around a net, the
data module as Lightning sees it, and the project's Trainer (best and last checkpoints written
atomically, its Ctrl-C and test-hold callbacks). Apart from `build` so that a study's orchestrator,
which checks its data and nets before any job, never imports Lightning (with torchmetrics,
scipy.signal, matplotlib and torch._dynamo behind it: 3.2 of the 7.4 CPU-s that importing the
training path takes)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.plugins.environments import LightningEnvironment

from vgg_ablation.data.batches import TensorBatches
from vgg_ablation.data.modules import EpochOrder, FileData, InMemoryData
from vgg_ablation.training import distributed
from vgg_ablation.training.build import apply_device_flags, is_deterministic, lr_of
from vgg_ablation.training.checkpoints import AtomicCheckpointIO, MovableCheckpoint
from vgg_ablation.training.module import Classifier


class LightningData(pl.LightningDataModule):
    """A data module (`data`) as Lightning's Trainer takes it: Lightning's hooks call the data's
    own, and each rank's batches take its share (the trainer's rank and world size, known once
    Lightning sets the data up in that rank's process)."""

    def __init__(self, data: InMemoryData | FileData):
        super().__init__()
        self.data = data
        self.epochs_drawn = 0  # from a resumed run's checkpoint: where its batches' draws go on

    def setup(self, stage: str) -> None:
        self.data.setup(stage)
        self.data.shard = (self.trainer.global_rank, self.trainer.world_size)

    def train_dataloader(self):
        batches = self.data.train_dataloader()
        if isinstance(batches, TensorBatches):  # drawn per (seed, epoch): resumed where it stopped
            batches.epoch = max(batches.epoch, self.epochs_drawn)
        elif isinstance(getattr(batches, "sampler", None), EpochOrder) and self.trainer is not None:
            # Lightning makes the loader's first iterator (whose workers fetch ahead at once)
            # before it calls set_epoch: the epoch the fit starts or resumes at, set here
            batches.sampler.set_epoch(self.trainer.fit_loop.epoch_progress.current.processed)
        return batches

    # Kept in every checkpoint (Lightning saves a data module's state_dict): the epochs whose
    # batches have been drawn, so that a run resumed at epoch k draws epoch k's shuffle and crops,
    # as the uninterrupted run did, not epoch 0's again.
    def state_dict(self) -> dict:
        batches = getattr(self.data, "_train", None)
        return {"epochs_drawn": batches.epoch} if isinstance(batches, TensorBatches) else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epochs_drawn = state_dict.get("epochs_drawn", 0)

    def val_dataloader(self):
        return self.data.val_dataloader()

    def test_dataloader(self):
        return self.data.test_dataloader()


def make_module(cfg: DictConfig, model, accelerator: str, channels_last: bool) -> Classifier:
    """The LightningModule around `model`, with the device's speed settings applied."""
    apply_device_flags(cfg, accelerator)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.trainer.compile:
        # Dynamo's caches hold the previous cell's graphs: a process training many cells would
        # hit its recompile limit and fall back to eager without a word. Compile in place
        # (nn.Module.compile), so the state dict keeps its keys (no `_orig_mod.` prefix) and
        # checkpoints load into plain nets, from-A transfers included; static shapes (every
        # batch, evaluation's last included, has the same size).
        torch._dynamo.reset()
        model.compile(backend=cfg.trainer.compile_backend, dynamic=False)
    return Classifier(model, cfg.optim, channels_last=channels_last, lr=lr_of(cfg))


class HoldForTests(pl.Callback):
    """Fault injection for the tests (VGG_ABLATION_HOLD_EPOCH=<epoch>:<file>): training waits at
    the start of that epoch, every earlier checkpoint whole and renamed, until <file> exists
    (<file>.held says it waits), so a test changes the world (fills the disk) at a moment it
    chose, not at one it hoped for."""

    def __init__(self, spec: str):
        epoch, _, path = spec.partition(":")
        self.epoch, self.release = int(epoch), Path(path)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            Path(f"{self.release}.held").touch()
            while not self.release.exists():
                time.sleep(0.05)


class CtrlCAtBatchEnd(pl.Callback):
    """Ctrl-C while Lightning trains or tests stops at the next batch's end, as Lightning's own
    SIGTERM handling does, instead of wherever the interpreter happens to be: a KeyboardInterrupt
    raised inside a garbage-collection callback is printed as "Exception ignored ... Traceback" and
    lost. A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self.raised = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def setup(self, trainer, pl_module, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()
        self._check()  # arrived after the last batch: stop before anything else starts

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # A fit that raises (a diverged run) skips teardown: without this, the next Ctrl-C in a
        # sweep's process, between its cells, would only be noted by a handler nobody reads.
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _check(self, *args, **kwargs) -> None:
        if self.requested and not self.raised:
            self.raised = True
            raise KeyboardInterrupt  # Lightning's own KeyboardInterrupt path: teardown, then stop

    on_train_batch_end = on_validation_batch_end = on_test_batch_end = _check


def hold_for_tests() -> list[pl.Callback]:
    spec = os.environ.get("VGG_ABLATION_HOLD_EPOCH")
    return [HoldForTests(spec)] if spec else []


def make_trainer(
    cfg: DictConfig,
    accelerator: str,
    precision: str,
    ckpt_dir: Path,
    logger=False,
    extra_callbacks=(),
    **overrides,
) -> pl.Trainer:
    """The project's Trainer: best + last checkpoints, atomic checkpoint writes, progress bar;
    the run's logger and callbacks (cell_run's, on its outbox) come from the caller."""
    deterministic = is_deterministic(cfg, accelerator)
    if deterministic and accelerator == "gpu":
        deterministic = "warn"  # some CUDA backward kernels have no deterministic version
    # Set explicitly every time: Trainer(deterministic=True) leaves it on for later trainers.
    torch.use_deterministic_algorithms(bool(deterministic), warn_only=deterministic == "warn")
    # best.ckpt: the epoch with the best validation accuracy (first: trainer.checkpoint_callback).
    best = MovableCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/acc1", mode="max", save_top_k=1,
                           enable_version_counter=False)  # fmt: skip
    # last.ckpt: every epoch, what a resume starts from. Not save_last=True: Lightning 2.6 writes
    # that copy only in an epoch whose monitored metric improved, so a killed run went back to its
    # last improvement (and a full disk went unnoticed while validation accuracy stalled).
    last = MovableCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
                           enable_version_counter=False)  # fmt: skip
    callbacks = [best, last, *extra_callbacks, CtrlCAtBatchEnd(), *hold_for_tests()]
    if cfg.trainer.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=20))
    plugins = [AtomicCheckpointIO()]  # a kill or a full disk mid-write keeps the old file whole
    if distributed.device_count(cfg) > 1:
        plugins.append(LightningEnvironment())  # the ranks start themselves, also in a SLURM job
    kwargs = dict(
        plugins=plugins,
        accelerator=accelerator,
        devices=cfg.trainer.devices,
        precision=precision,
        max_epochs=cfg.trainer.max_epochs,
        limit_train_batches=cfg.trainer.limit_train_batches,
        limit_val_batches=cfg.trainer.limit_val_batches,
        limit_test_batches=cfg.trainer.limit_test_batches,
        deterministic=deterministic,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=cfg.trainer.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    kwargs.update(overrides)
    if kwargs.get("limit_val_batches") == 0:
        checkpoint_free = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        kwargs.update(callbacks=checkpoint_free, enable_checkpointing=False)
    return pl.Trainer(**kwargs)

"""From a config to one cell's objects, and nothing of MLflow: the checks that refuse bad input,
the device choices, the data, the model (`model_for`: the one path from a config to
`models.build_model`, used by training, the benchmark, the study's pre-flight check and the GPU
check), the LightningModule and the Trainer (with its Ctrl-C and test-hold callbacks)."""

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

from vgg_ablation import distributed
from vgg_ablation.checkpoints import AtomicCheckpointIO
from vgg_ablation.data import make_datamodule
from vgg_ablation.errors import UserError
from vgg_ablation.models import ARCHS, INITS, Arch, Net, build_model, get_arch
from vgg_ablation.module import SCHEDULES, Classifier


def validate(cfg: DictConfig) -> None:
    """Reject impossible values with one line, before any data is read or any run recorded."""
    arch_of(cfg.arch)
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "optim.lr": cfg.optim.lr,
        "trainer.max_epochs": cfg.trainer.max_epochs,
        "model.width": cfg.model.width,
    }
    for key in ("input_size", "train_scale", "test_scale", "train_scale_max"):
        if cfg.data[key] is not None:
            positive[f"data.{key}"] = cfg.data[key]
    for key, value in positive.items():
        if value is None or value <= 0:
            raise UserError(f"{key} must be positive, got {value}")
    lrn_scale_value(cfg, pixel_std=1.0)  # the setting is valid
    if not 0 <= cfg.data.val_fraction < 1:
        raise UserError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    if cfg.optim.schedule not in SCHEDULES:
        raise UserError(
            f"unknown optim.schedule {cfg.optim.schedule!r}; choose one of: {', '.join(SCHEDULES)}"
        )
    if cfg.model.init not in (*INITS, "from_A"):
        raise UserError(f"unknown model.init {cfg.model.init!r}; choose one of: {', '.join(INITS)}, from_A")
    if cfg.data.train_subset is not None and cfg.data.train_subset <= 0:
        raise UserError(f"data.train_subset must be positive, got {cfg.data.train_subset}")
    if cfg.logger.outage_wait < 0:
        raise UserError(f"logger.outage_wait must be 0 or more seconds, got {cfg.logger.outage_wait}")


def lrn_scale_value(cfg: DictConfig, pixel_std: float) -> float:
    """The factor LRN applies to the activations it normalises (models.AlexNetLRN). "paper": 1
    when the net already sees the paper's 0-255 inputs with no batch norm in front of its LRN;
    otherwise 255 x the training images' pixel std, the factor by which those inputs would enlarge
    the activations of the first conv."""
    value = cfg.model.lrn_scale
    if value == "paper":
        at_paper_scale = cfg.data.normalize == "paper" and not cfg.model.batch_norm
        return 1.0 if at_paper_scale else round(255 * pixel_std, 2)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if not number > 0:
        raise UserError(f"model.lrn_scale must be 'paper' or a positive number, got {value!r}")
    return number


def arch_of(name: str):
    """The arch named, or a one-line error naming the choices."""
    try:
        return get_arch(name)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def device_choice(cfg: DictConfig) -> tuple[str, str, bool]:
    """(accelerator, precision, channels_last) for this machine: a GPU gets bf16 autocast and
    channels_last; a CPU gets fp32 (Lightning turns 16-mixed on CPU into bf16 silently)."""
    gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    accelerator = "gpu" if gpu else ("cpu" if cfg.trainer.accelerator == "auto" else cfg.trainer.accelerator)
    precision = cfg.trainer.precision
    if precision == "auto":
        precision = "bf16-mixed" if gpu else "32-true"
    channels_last = cfg.trainer.channels_last == "on" or (cfg.trainer.channels_last == "auto" and gpu)
    return accelerator, precision, channels_last


def prepare(cfg: DictConfig):
    """Everything that can fail on bad input: config values, data, model shape."""
    validate(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # before the model's init draws
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    datamodule = make_datamodule(cfg.data, cfg.seed)
    datamodule.setup("fit")
    model = model_for(cfg, cfg.arch, datamodule)
    return datamodule, model


def model_for(cfg: DictConfig, arch: str, datamodule, init: str | None = None) -> Net:
    """`arch` built for this config and this data (classes, input size, LRN scale): the net
    carries its Arch and the head actually built, which is what a run records."""
    init = init or ("kaiming" if cfg.model.init == "from_A" else cfg.model.init)
    spec = arch_of(arch)
    try:
        return build_model(
            spec,
            num_classes=datamodule.num_classes,
            in_channels=3,
            input_size=datamodule.input_size,
            width=cfg.model.width,
            batch_norm=cfg.model.batch_norm,
            head=cfg.model.head,
            dropout=cfg.model.dropout,
            init=init,
            lrn_scale=lrn_scale_value(cfg, datamodule.pixel_std),
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None


def starts_from_a(cfg: DictConfig, arch: Arch) -> bool:
    """init=from_A applies to the nets deeper than A (section 3.1); A-LRN (as deep as A) and the
    shallower B-5x5 train from scratch, so their comparisons with A stay fair."""
    return cfg.model.init == "from_A" and arch.depth > ARCHS["A"].depth


def load_model(ckpt_path: str, cfg: DictConfig, datamodule):
    """A trained A (the start of a deeper net), from a checkpoint: weights only."""
    model = model_for(cfg, "A", datamodule, init="kaiming")
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return model


def fits_on_device(cfg: DictConfig, datamodule) -> bool:
    """Hold the whole dataset on the GPU? (`data.on_device`: auto when it takes under a quarter of the free memory.)"""
    if cfg.data.on_device == "off" or not hasattr(datamodule, "move_to"):
        return False
    if cfg.data.on_device == "on":
        return True
    free, _ = torch.cuda.mem_get_info()
    return datamodule.nbytes() < 0.25 * free


def is_deterministic(cfg: DictConfig, accelerator: str) -> bool:
    """Repeatable by default on CPU; on a GPU only when asked (it turns cuDNN autotuning off)."""
    if cfg.trainer.deterministic is None:
        return accelerator != "gpu"
    return bool(cfg.trainer.deterministic)


def apply_device_flags(cfg: DictConfig, accelerator: str) -> None:
    """The GPU's speed settings: cuDNN autotuning (unless runs are pinned) and TF32 matmuls."""
    if accelerator == "gpu":
        torch.backends.cudnn.benchmark = not is_deterministic(cfg, accelerator)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


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
    return Classifier(model, cfg.optim, channels_last=channels_last)


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
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        self._check()  # arrived after the last batch: stop before anything else starts

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
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/acc1", mode="max", save_top_k=1,
                           enable_version_counter=False)  # fmt: skip
    # last.ckpt: every epoch, what a resume starts from. Not save_last=True: Lightning 2.6 writes
    # that copy only in an epoch whose monitored metric improved, so a killed run went back to its
    # last improvement (and a full disk went unnoticed while validation accuracy stalled).
    last = ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
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

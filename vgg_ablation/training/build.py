"""From a config to one cell's objects, and nothing of MLflow or Lightning: the checks that refuse
bad input, the device choices, the data, the model (`model_for`: the one path from a config to
`models.build_model`, used by training, the benchmark, the study's pre-flight check and the GPU
check). What Lightning fits (the LightningModule, the Trainer) is `fitting`'s: a study checks its
data and nets here without importing Lightning."""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig

from vgg_ablation.config import SCHEDULES
from vgg_ablation.data.datasets import named
from vgg_ablation.data.modules import FileData, InMemoryData, make_datamodule
from vgg_ablation.errors import UserError
from vgg_ablation.nets.models import ARCHS, INITS, Arch, Net, build_model, get_arch


def validate(cfg: DictConfig) -> None:
    """Reject impossible values with one line, before any data is read or any run recorded."""
    arch_of(cfg.arch)
    source = named(cfg.data.name)
    if cfg.data.root and not source.reads_root:  # a folder silently ignored otherwise
        what = "random images" if source.kind == "synthetic" else f"the images in {source.root}"
        raise UserError(f"data.root is not read by data={cfg.data.name} ({what}): "
                        f"to train on {cfg.data.root}, add data=imagefolder")  # fmt: skip
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
    channels_last; a CPU gets fp32 (Lightning turns 16-mixed on CPU into bf16 silently), and
    channels_last when it trains on one thread (a CPU study's cells: reports/bench-cpu-cells.md
    measured 1.35-1.40x the cells per hour with it there, and nothing on two threads)."""
    gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    accelerator = "gpu" if gpu else ("cpu" if cfg.trainer.accelerator == "auto" else cfg.trainer.accelerator)
    precision = cfg.trainer.precision
    if precision == "auto":
        precision = "bf16-mixed" if gpu else "32-true"
    auto = gpu or (accelerator == "cpu" and torch.get_num_threads() == 1)
    channels_last = cfg.trainer.channels_last == "on" or (cfg.trainer.channels_last == "auto" and auto)
    return accelerator, precision, channels_last


def prepare(cfg: DictConfig):
    """Everything that can fail on bad input (config values, data, model shape), seeded for
    training: the data set up and the net built."""
    # Lightning's seeding (it also seeds DataLoader workers), imported only where a net trains
    from lightning_fabric.utilities.seed import seed_everything

    validate(cfg)
    seed_everything(cfg.seed, workers=True, verbose=False)  # before the model's init draws
    threads = cfg.trainer.threads or slurm_cpus()
    if threads:
        torch.set_num_threads(threads)
    datamodule = data_for(cfg)
    return datamodule, model_for(cfg, cfg.arch, datamodule)


def slurm_cpus() -> int | None:
    """The CPUs SLURM gave this task, when it runs in one (SLURM_CPUS_PER_TASK): torch's default,
    every core of the node, would oversubscribe the cores other tasks were given."""
    value = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def data_for(cfg: DictConfig) -> InMemoryData | FileData:
    """The data a config names, set up (its splits, sizes and normalisation); refuses bad input."""
    datamodule = make_datamodule(cfg.data, cfg.seed)
    datamodule.setup("fit")
    return datamodule


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


def lr_of(cfg: DictConfig, arch: str | None = None) -> float:
    """The learning rate a net trains at: its own (optim.lr_per_arch, what a study's lr selection
    chose), else optim.lr."""
    return float(cfg.optim.lr_per_arch.get(arch or cfg.arch, cfg.optim.lr))


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

"""One cell on several devices of one machine (`trainer.devices=N`): DDP, recorded once.

Lightning starts ranks 1..N-1 by running the program again with `LOCAL_RANK` set. What it runs is
set here: this cell's own overrides, not the command line (a study's job would otherwise run the
whole sweep again in every rank, and `vgg-ablation train` would lose its verb). The MLflow run
that rank 0 opened reaches the other ranks through the environment (`VGG_ABLATION_DDP`): they
train and test on their share of the data and record nothing; rank 0 records the metrics (summed
over every rank's images), the checkpoints and the run's status, once.

The ranks start themselves (Lightning's own environment, not SLURM's): a SLURM job runs one task
per cell, whatever its number of GPUs.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

SHARED_ENV = "VGG_ABLATION_DDP"  # json: what rank 0 tells the other ranks
# What Lightning's launcher sets in rank 0's own environment; cleared after the cell, so that the
# next cell a process trains (a study's sweep) starts a fresh process group on a fresh port
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", SHARED_ENV)


def device_count(cfg: DictConfig) -> int:
    devices = cfg.trainer.devices
    if isinstance(devices, int):
        return devices
    if isinstance(devices, str) and devices.isdigit():
        return int(devices)
    try:
        return len(devices)
    except TypeError:
        return 1  # "auto": Lightning's choice, one device unless told


def shared_by_rank_zero() -> dict | None:
    """In ranks 1..N-1 of a cell: {"run_id", "ckpt_dir", "resume_from"} from rank 0; else None."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 or SHARED_ENV not in os.environ:
        return None
    return json.loads(os.environ[SHARED_ENV])


@contextlib.contextmanager
def ranks_run_this_cell(cfg: DictConfig, shared: dict):
    """Around rank 0's `fit` and `test`: what Lightning's launcher runs for the other ranks (the
    cell's overrides) and tells them (`shared`); afterwards, the process group torn down (Lightning
    does so for nccl only: a gloo rank could abort at exit) and rank 0's environment restored."""
    if device_count(cfg) <= 1:
        yield
        return
    from hydra.core.hydra_config import HydraConfig

    import __main__

    overrides = [
        *HydraConfig.get().overrides.task,
        "hydra/job_logging=disabled",
        "hydra/hydra_logging=disabled",
    ]
    spec = getattr(__main__, "__spec__", None)
    if (
        spec is not None and spec.name == "vgg_ablation.training.train"
    ):  # python -m vgg_ablation.training.train
        argv = [sys.argv[0], *overrides]
    elif spec is not None:  # python -m vgg_ablation train ...
        argv = [sys.argv[0], "train", *overrides]
    else:  # the vgg-ablation console script: the ranks run train.py itself
        argv = [str(Path(__file__).with_name("train.py")), *overrides]
    saved_argv, saved_env = sys.argv, {k: os.environ.get(k) for k in LAUNCH_ENV}
    sys.argv = argv
    os.environ[SHARED_ENV] = json.dumps(shared)
    try:
        yield
    finally:
        sys.argv = saved_argv
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def tear_down(ok: bool) -> None:
    """End this rank's process group: after a barrier when all went well (no rank leaves while
    another still writes), at once otherwise (a dead rank would never reach the barrier)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    if ok:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()

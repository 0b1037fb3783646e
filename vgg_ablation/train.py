"""One training run: one cell (architecture, seed, dataset) of a study, recorded in MLflow.

`python -m vgg_ablation.train [overrides]` is the Hydra entry point (`vgg-ablation train` and the
study's multirun both land here). Order of work, so that bad input never half-writes a run:
validate the config, load and check the data, build the model, and only then open the MLflow run.

A run's MLflow status is set here, not by Lightning: FINISHED only once the test metrics of the
best checkpoint are recorded; FAILED with the reason otherwise; KILLED on SIGTERM.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import Logger
from pytorch_lightning.plugins.environments import LightningEnvironment
from pytorch_lightning.utilities import rank_zero_only

from vgg_ablation import distributed, tracking
from vgg_ablation.cells import DEADLINE_ENV, PROGRESS_ENV
from vgg_ablation.checkpoints import AtomicCheckpointIO, choose_resume
from vgg_ablation.config import register
from vgg_ablation.data import make_datamodule
from vgg_ablation.errors import UserError
from vgg_ablation.models import (
    ARCHS,
    INITS,
    build_model,
    count_params,
    forward_flops,
    get_arch,
    lrn_activity,
    resolve_head,
    transfer_from_a,
)
from vgg_ablation.module import SCHEDULES, Classifier
from vgg_ablation.outbox import Journal, Outbox, send_journal

log = logging.getLogger("vgg_ablation")


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropAdverts())
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# Each run has its own checkpoint folder, which also holds its outbox: not someone else's files.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
FAILURE_TAG = "failure_reason"


@dataclass
class CellResult:
    cell: str
    arch: str
    seed: int
    # FINISHED | FAILED | KILLED | SKIPPED (already FINISHED) | BUSY (a live process has it)
    # | UNSENT (trained, but the tracking store never came back: its records wait on disk)
    status: str
    run_id: str | None = None
    test_acc1: float | None = None
    val_acc1: float | None = None  # best validation top-1: what a sweeper may optimise
    learned: bool | None = None  # test accuracy significantly above chance
    reason: str = ""
    seconds: float = 0.0


class CellLogger(Logger):
    """Lightning's logger for one cell's MLflow run, through the run's outbox (a tracking outage
    never stops training). Metrics are stepped by epoch: curves read per epoch, and a resumed run
    repeats, not shifts, the epochs it trains again. Params are recorded when the run opens, and
    the run's status by `run_cell`, which knows whether the test metrics made it in."""

    def __init__(self, outbox: Outbox):
        super().__init__()
        self.outbox = outbox

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return self.outbox.run_id

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        step = int(metrics["epoch"]) if "epoch" in metrics else (step or 0)
        self.outbox.log_metrics({k: v for k, v in metrics.items() if not isinstance(v, str)}, step)

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # the curated params are logged once, as the run opens (MLflow refuses a changed one)


class Heartbeat(pl.Callback):
    """Stamps the run every epoch, so a run whose machine died is told apart from a live one."""

    def __init__(self, outbox: Outbox):
        self.outbox = outbox

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.outbox.set_tags({"heartbeat": f"{time.time():.0f}"})


def validate(cfg: DictConfig) -> None:
    """Reject impossible values with one line, before any data is read or any run recorded."""
    get_arch_or_error(cfg.arch)
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


def get_arch_or_error(name: str):
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


def model_for(cfg: DictConfig, arch: str, datamodule, init: str | None = None):
    """`arch` built for this config and this data (classes, input size, LRN scale)."""
    init = init or ("kaiming" if cfg.model.init == "from_A" else cfg.model.init)
    try:
        return build_model(
            arch,
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


def curated_params(cfg: DictConfig, model, datamodule, precision: str) -> dict[str, str]:
    """One flat set of params, logged once per run (MLflow refuses a changed value)."""
    return {
        "arch": cfg.arch,
        "depth": ARCHS[cfg.arch].depth,
        "width": cfg.model.width,
        "params": count_params(model),
        "batch_norm": cfg.model.batch_norm,
        "head": resolve_head(get_arch(cfg.arch), cfg.model.head, datamodule.input_size),  # the one built
        "dropout": cfg.model.dropout,
        "warmup_epochs": cfg.optim.warmup_epochs,
        "init": cfg.model.init if starts_from_a(cfg) or cfg.model.init != "from_A" else "kaiming",
        "data": cfg.data.name,
        "input_size": datamodule.input_size,
        "train_scale": datamodule.sizes.train_scale,
        "test_scale": datamodule.sizes.test_scale,
        "normalize": cfg.data.normalize,
        "data_digest": datamodule.dataset.digest,
        "val_images": datamodule.split_counts()["val"],
        "lrn_scale": lrn_scale_value(cfg, datamodule.pixel_std),
        "train_images": datamodule.num_train,
        "num_classes": datamodule.num_classes,
        "batch_size": cfg.data.batch_size,  # per device: the global batch is devices x this
        "devices": distributed.device_count(cfg),
        "lr": cfg.optim.lr,
        "momentum": cfg.optim.momentum,
        "weight_decay": cfg.optim.weight_decay,
        "schedule": cfg.optim.schedule,
        "epochs": cfg.trainer.max_epochs,
        "seed": cfg.seed,
        "precision": precision,
        "study": cfg.study.name,
    }


def starts_from_a(cfg: DictConfig) -> bool:
    """init=from_A applies to the nets deeper than A (section 3.1); A-LRN (as deep as A) and the
    shallower B-5x5 train from scratch, so their comparisons with A stay fair."""
    return cfg.model.init == "from_A" and ARCHS[cfg.arch].depth > ARCHS["A"].depth


# Where a trained A's weights travel to the deeper nets that start from it: the A run's artifacts
# (`checkpoint/weights.pt`). Any machine that reaches the tracking server reaches them, with no
# shared filesystem; the checkpoint folders stay on each machine's own fast disk.
A_WEIGHTS = ("checkpoint", "weights.pt")


def _trained_a_checkpoint(mlflow_client, experiment_id: str, cfg: DictConfig) -> str:
    """The trained A of this seed: its best checkpoint when it is on this machine, else its
    weights from the A run's artifacts (downloaded once into this machine's checkpoint folder)."""
    a_cell = tracking.cell_key(tracking.cell_cfg(cfg, "A", cfg.seed))
    for run in tracking.runs_of_cell(mlflow_client, experiment_id, a_cell):
        if run.info.status != "FINISHED":
            continue
        ckpt = run.data.tags.get("best_checkpoint")
        if ckpt and Path(ckpt).is_file():
            return ckpt
        folder, name = A_WEIGHTS
        if any(f.path == f"{folder}/{name}" for f in mlflow_client.list_artifacts(run.info.run_id, folder)):
            local = Path(cfg.logger.checkpoint_root).resolve() / f"A-{run.info.run_id}" / name
            if not local.is_file():
                local.parent.mkdir(parents=True, exist_ok=True)
                # into a folder of its own, then renamed: cells of this seed starting at the same
                # moment never read a half-downloaded file
                with tempfile.TemporaryDirectory(dir=local.parent) as tmp:
                    got = mlflow_client.download_artifacts(run.info.run_id, f"{folder}/{name}", tmp)
                    os.replace(got, local)
                log.info("init from A: A's weights from the tracking server (run %s)", run.info.run_id)
            return str(local)
    raise UserError(
        f"init=from_A needs a FINISHED A run for seed {cfg.seed} in this study, its checkpoint on this "
        "machine or its weights in the run's artifacts; run arch=A first"
    )


def _open_run(
    mlflow_client, experiment_id: str, cfg: DictConfig, key: str, params: dict, device_name: str, datamodule
):
    """The MLflow run this attempt writes to, and the checkpoint to resume from.

    Returns ("skip", run) when the cell already FINISHED, ("busy", run) when a live process is
    training it right now, else ("run", run_id, resume_from). A dead attempt (FAILED, KILLED, or
    RUNNING with its process gone) is taken over: same run, from its last checkpoint if it wrote
    one, so a cell never gets a second run.
    """
    # One process at a time per SQLite store decides (two launches of one study in the same
    # second would otherwise both create, or both take over, a cell's run); any store: settle().
    with tracking.store_lock(mlflow_client.tracking_uri):
        return _open_run_locked(mlflow_client, experiment_id, cfg, key, params, device_name, datamodule)


def _open_run_locked(mlflow_client, experiment_id, cfg, key, params, device_name, datamodule):
    previous = tracking.runs_of_cell(mlflow_client, experiment_id, key)
    if send_leftovers(mlflow_client, previous, f"{cfg.arch} seed={cfg.seed}"):
        previous = tracking.runs_of_cell(mlflow_client, experiment_id, key)  # one may be FINISHED now
    parent = cfg.logger.parent_run_id
    for run in previous:
        if run.info.status == "FINISHED":
            if parent and run.data.tags.get(tracking.PARENT_TAG) != parent:
                mlflow_client.set_tag(run.info.run_id, tracking.PARENT_TAG, parent)  # adopted by this study
            return "skip", run
    for run in previous:
        if run.info.status == "RUNNING" and not tracking.is_orphaned(run):
            return "busy", run
    if previous:
        run = previous[0]
        run_id = run.info.run_id
        resume = choose_resume(Path(run.data.tags.get("checkpoint_dir", "/nonexistent")))
        resume_from = resume.path
        if resume.note:  # a damaged checkpoint never blocks the cell: said, tagged, worked around
            print(f"warning: {key}: {resume.note}", file=sys.stderr, flush=True)
            mlflow_client.set_tag(run_id, "checkpoint_recovery", resume.note[:5000])
        mlflow_client.update_run(run_id, status="RUNNING")
        for name, value in tracking.environment_tags(device_name).items():
            mlflow_client.set_tag(run_id, name, value)
        if parent:  # the study's run, also when a dead attempt is taken over
            mlflow_client.set_tag(run_id, tracking.PARENT_TAG, parent)
        if FAILURE_TAG in run.data.tags:
            mlflow_client.delete_tag(run_id, FAILURE_TAG)
        log.info("resume %s: run %s from %s", key, run_id, resume_from or "the start (no checkpoint)")
        return "run", run_id, resume_from
    # Fault injection for the tests: widen the moment between finding no run and creating one,
    # where two launches (or two machines on one server) would both find none.
    time.sleep(float(os.environ.get("VGG_ABLATION_RACE_WINDOW", 0)))
    tags = {
        "cell": key,
        "study": cfg.study.name,
        "arch": cfg.arch,
        "seed": str(cfg.seed),
        "fingerprint": tracking.fingerprint(cfg),
        "data_digest": datamodule.dataset.digest,
        **tracking.environment_tags(device_name),
        **tracking.context_tags(),
        **({tracking.PARENT_TAG: parent} if parent else {}),
    }
    run_id = mlflow_client.create_run(
        experiment_id, tags=tags, run_name=f"{cfg.arch}-seed{cfg.seed}"
    ).info.run_id
    escaped = key.replace("'", "\\'")
    winner = tracking.settle(mlflow_client, experiment_id, f"tags.cell = '{escaped}'", run_id)
    if winner.info.run_id != run_id:  # another launch created this cell's run a moment earlier
        return "busy", winner
    ckpt_dir = Path(cfg.logger.checkpoint_root).resolve() / run_id
    mlflow_client.set_tag(run_id, "checkpoint_dir", str(ckpt_dir))
    from mlflow.entities import Param

    mlflow_client.log_batch(run_id, params=[Param(name, str(value)) for name, value in params.items()])
    mlflow_client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    log_dataset(mlflow_client, run_id, datamodule)
    return "run", run_id, None


def send_leftovers(mlflow_client, runs, label: str) -> bool:
    """Records that a dead attempt of this cell kept in its outbox (its tracking store was away
    when it ended): sent now, before anything is decided about the cell. Its status may be among
    them: a cell that finished training while the store was away is then FINISHED, not retrained."""
    sent_any = False
    for run in runs:
        if run.info.status == "FINISHED" or (run.info.status == "RUNNING" and not tracking.is_orphaned(run)):
            continue  # finished, or a live process's own outbox
        journal = Journal(Path(run.data.tags.get("checkpoint_dir", "/nonexistent")))
        if not journal.exists() or journal.header().get("run_id") != run.info.run_id:
            continue
        sent = send_journal(mlflow_client, journal)
        print(f"{label}: sent {sent} records a previous attempt kept while its tracking store was away",
              file=sys.stderr, flush=True)  # fmt: skip
        sent_any = True
    return sent_any


def log_dataset(mlflow_client, run_id: str, datamodule) -> None:
    """The dataset as an MLflow dataset input (the dashboard's Dataset column): name, digest of
    its file list and sizes, source, and images per split and class as its profile."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    ds = datamodule.dataset
    profile = {**ds.profile(), "used": datamodule.split_counts(), "sizes": datamodule.describe()}
    dataset = Dataset(
        name=ds.name, digest=ds.digest, source_type="local", source=json.dumps({"uri": ds.source}),
        profile=json.dumps(profile),
    )  # fmt: skip
    inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])]
    tracking.retry_unique_race(lambda: mlflow_client.log_inputs(run_id, inputs))


def run_cell(cfg: DictConfig, announce_data: bool = True) -> CellResult:
    """Train, validate and test one cell; record it in MLflow. Raises UserError on bad input.
    `announce_data`: print the data line (a study prints it once for all its cells)."""
    shared = distributed.shared_by_rank_zero()
    if shared is not None:
        return run_rank(cfg, shared)
    start = time.time()
    datamodule, model = prepare(cfg)
    if announce_data:
        print(datamodule.describe(), flush=True)
    key = tracking.cell_key(cfg)
    accelerator, precision, channels_last = device_choice(cfg)
    device_name = torch.cuda.get_device_name() if accelerator == "gpu" else "cpu"
    result = CellResult(cell=key, arch=cfg.arch, seed=cfg.seed, status="FAILED")

    mlflow_client = run_id = resume_from = None
    if cfg.logger.enabled:
        uri = tracking.tracking_uri(cfg.logger.tracking_uri)
        tracking.check_reachable(uri)
        mlflow_client = tracking.client(uri)
        experiment_id = tracking.ensure_experiment(mlflow_client, tracking.experiment_name(cfg))
        if starts_from_a(cfg):
            trained_a = _load_model_from(
                _trained_a_checkpoint(mlflow_client, experiment_id, cfg), cfg, datamodule
            )
            log.info("init from A: copied %s", ", ".join(transfer_from_a(model, trained_a)))
        params = curated_params(cfg, model, datamodule, precision)
        opened = _open_run(mlflow_client, experiment_id, cfg, key, params, device_name, datamodule)
        if opened[0] != "run":
            run = opened[1]
            result.status = "SKIPPED" if opened[0] == "skip" else "BUSY"
            result.run_id, result.test_acc1 = run.info.run_id, run.data.metrics.get("test/acc1")
            result.val_acc1 = _best_val(mlflow_client, run.info.run_id)
            return result
        _, run_id, resume_from = opened
        result.run_id = run_id
    ckpt_dir = Path(cfg.logger.checkpoint_root).resolve() / (run_id or f"nolog-{key.replace('/', '_')}")
    # From here on the run's writes go through its outbox: kept on disk, sent in order, and a
    # tracking outage costs no training (see outbox.py).
    outbox = Outbox(mlflow_client, run_id, ckpt_dir, f"{cfg.arch} seed={cfg.seed}") if mlflow_client else None

    # Ranks 1..N-1 of a multi-device cell train beside this one and record nothing (distributed.py)
    shared = {"run_id": run_id, "ckpt_dir": str(ckpt_dir), "resume_from": resume_from}
    with distributed.ranks_run_this_cell(cfg, shared):
        try:
            module = make_module(cfg, model, accelerator, channels_last)
            trainer = make_trainer(cfg, accelerator, precision, ckpt_dir, outbox)
            if accelerator == "gpu" and _fits_on_device(cfg, datamodule):
                datamodule.move_to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
            fit_start = time.time()
            sampler = system_metrics(cfg, outbox, resumed=resume_from is not None)
            try:
                trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
            finally:
                if sampler is not None:
                    sampler.stop()
            if trainer.interrupted:
                raise KeyboardInterrupt
            fit_seconds = time.time() - fit_start
            best = trainer.checkpoint_callback.best_model_path or None
            trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=True, verbose=False)
            result.test_acc1 = float(trainer.callback_metrics["test/acc1"])
            result.val_acc1 = float(
                trainer.checkpoint_callback.best_model_score
                or trainer.callback_metrics.get("val/acc1", float("nan"))
            )
            test_images = int(trainer.callback_metrics["test/images"])
            result.learned, chance_p = learned(result.test_acc1, test_images, datamodule.num_classes)
            activity = lrn_activity(module.model, datamodule.val_dataloader())
            distributed.tear_down(ok=True)
            if not result.learned:
                print(
                    f"warning: {cfg.arch} seed={cfg.seed} learned nothing: test top-1 {result.test_acc1:.1%} is not "
                    f"above chance ({1 / datamodule.num_classes:.1%}; binomial p={chance_p:.2f} on {test_images} images)",
                    file=sys.stderr,
                    flush=True,
                )
            if outbox is not None:
                outbox.set_tags(
                    {"learned": str(result.learned).lower(), **({"best_checkpoint": best} if best else {})}
                )
                if cfg.arch == "A" and cfg.model.init == "from_A" and best:  # deeper nets start from it
                    outbox.log_artifact(_weights_only(best, ckpt_dir / A_WEIGHTS[1]), A_WEIGHTS[0])
                outbox.log_metrics(
                    {
                        "test/chance_p": chance_p,
                        "images_seen": trainer.global_step * cfg.data.batch_size,
                        "flops_per_image": forward_flops(module.model, datamodule.input_size),
                        **({"lrn/denominator_mean": activity["mean"], "lrn/denominator_p99": activity["p99"]}
                           if activity else {}),
                        "time/fit_seconds": fit_seconds,
                    },
                    step=0,
                )  # fmt: skip
                finish(outbox, "FINISHED", cfg.logger.outage_wait, start, result)
            else:
                result.status = "FINISHED"
        except BaseException as exc:  # record every way out, then let the caller decide
            distributed.tear_down(ok=False)
            killed = isinstance(exc, KeyboardInterrupt | SystemExit)
            result.status = "KILLED" if killed else "FAILED"
            result.reason = _reason(exc)
            if outbox is not None:
                outbox.set_tags({FAILURE_TAG: result.reason[:5000]})
                # a preempted job has seconds left (SLURM: 30 by default): it does not wait long
                finish(outbox, result.status, min(cfg.logger.outage_wait, 20.0), start, result)
            if killed:
                raise
            log.error("run %s failed: %s", key, result.reason)
    result.seconds = time.time() - start
    return result


def run_rank(cfg: DictConfig, shared: dict) -> CellResult:
    """Rank 1..N-1 of a multi-device cell: the same fit and test as rank 0, on this rank's share of
    the data, recording nothing (rank 0 records for all). Its weights start as rank 0's (DDP
    broadcasts them), so a from-A start needs nothing here."""
    datamodule, model = prepare(cfg)
    accelerator, precision, channels_last = device_choice(cfg)
    result = CellResult(cell=tracking.cell_key(cfg), arch=cfg.arch, seed=cfg.seed, status="FAILED")
    ok = False
    try:
        module = make_module(cfg, model, accelerator, channels_last)
        trainer = make_trainer(cfg, accelerator, precision, Path(shared["ckpt_dir"]))
        if accelerator == "gpu" and _fits_on_device(cfg, datamodule):
            datamodule.move_to(torch.device("cuda", int(os.environ["LOCAL_RANK"])))
        trainer.fit(module, datamodule=datamodule, ckpt_path=shared["resume_from"], weights_only=True)
        best = trainer.checkpoint_callback.best_model_path or None
        trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=True, verbose=False)
        ok = True
    finally:
        distributed.tear_down(ok)
    result.status = "FINISHED"
    return result


def finish(outbox: Outbox, status: str, wait: float, start: float, result: CellResult) -> None:
    """The run's last records: how long it took and what tracking cost it, then its status; all
    sent before this returns, or kept on disk (result UNSENT) when the store stays away `wait` s."""
    drain_start = time.time()
    outbox.drain(wait)
    waited = time.time() - drain_start
    outbox.log_metrics(
        {
            "time/seconds": time.time() - start,
            # what tracking cost this run: records written by the training thread, the wait here
            "time/tracking_seconds": outbox.write_seconds + waited,
            "time/store_outage_seconds": outbox.outage_seconds,
        },
        step=0,
    )
    outbox.set_terminated(status)
    if outbox.close(max(wait - waited, 5.0)):
        result.status = status
        return
    why = (
        f"refused its records ({outbox.stuck})"
        if outbox.stuck
        else f"did not take records for {wait:.0f} s ({outbox.last_error})"
    )
    kept = (
        f"{outbox.unsent} records of run {outbox.run_id} are kept in {outbox.journal.path}; "
        f"send them with: {outbox.sync_command()}"
        if outbox.journal_error is None
        else f"{outbox.unsent} records of run {outbox.run_id} are lost with this process: its journal could not "
        f"be written ({outbox.journal_error}); re-run the cell once there is space"
    )
    line = f"the tracking store {outbox.uri} {why}; {kept}"
    if status == "FINISHED":
        result.status, result.reason = "UNSENT", line
    else:
        result.reason += f" ({line})"


class SystemSampler(SystemMetricsMonitor):
    """MLflow's CPU, memory, disk, network (and GPU, with nvidia-ml-py) monitors, sampled every
    interval into the run's `system/` metrics through its outbox. MLflow's own loop asks the server
    every interval whether the run still runs and stops for good at the first failure: a tracking
    outage would end the run's system metrics. This loop only samples."""

    def __init__(self, outbox: Outbox, interval: float, resumed: bool):
        super().__init__(
            outbox.run_id, sampling_interval=interval, resume_logging=resumed, tracking_uri=outbox.uri
        )
        self.mlflow_logger = _OutboxMetrics(outbox)

    def monitor(self) -> None:
        while True:
            self.collect_metrics()
            if self._shutdown_event.wait(self.sampling_interval):
                return
            self.publish_metrics(self.aggregate_metrics())

    def stop(self) -> None:
        """Stop sampling, with one last sample as training ends: a run shorter than the interval
        gets one too (the interval it is stopped in is otherwise dropped)."""
        self.finish()
        self.collect_metrics()
        self.publish_metrics(self.aggregate_metrics())


@dataclass
class _OutboxMetrics:
    """What MLflow's monitor writes to (its BatchMetricsLogger's two calls), into an outbox."""

    outbox: Outbox

    def record_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.outbox.log_metrics(metrics, step or 0)

    def flush(self) -> None:
        pass

    data = ()  # what MLflow's debug lines count


def system_metrics(cfg: DictConfig, outbox: Outbox | None, resumed: bool) -> SystemSampler | None:
    """The system-metrics sampler, started; None when off or without a run."""
    if outbox is None or not cfg.logger.system_metrics:
        return None
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start/stop chatter
    sampler = SystemSampler(outbox, cfg.logger.system_metrics_interval, resumed)
    sampler.start()
    return sampler


def learned(acc1: float, test_images: int, num_classes: int, alpha: float = 0.01) -> tuple[bool, float]:
    """Is test top-1 accuracy above chance (1/classes)? One-sided binomial test; (verdict, p)."""
    from scipy.stats import binomtest

    correct = int(round(acc1 * test_images))
    p = binomtest(correct, test_images, 1 / num_classes, alternative="greater").pvalue
    return bool(p < alpha), float(p)


def _best_val(mlflow_client, run_id: str) -> float | None:
    history = mlflow_client.get_metric_history(run_id, "val/acc1")
    return max((m.value for m in history), default=None)


def _reason(exc: BaseException) -> str:
    name = type(exc).__name__
    if name == "SIGTERMException":
        return "SIGTERM received (preempted or cancelled); resumes from its last checkpoint on re-run"
    text = str(exc).strip().splitlines()
    return f"{name}: {text[0]}" if text else name


def _fits_on_device(cfg: DictConfig, datamodule) -> bool:
    if cfg.data.on_device == "off" or not hasattr(datamodule, "move_to"):
        return False
    if cfg.data.on_device == "on":
        return True
    free, _ = torch.cuda.mem_get_info()
    return datamodule.nbytes() < 0.25 * free


def _weights_only(checkpoint: str, path: Path) -> Path:
    """The net's weights from a checkpoint (no optimizer state: a third of its size with momentum),
    written atomically: what another machine downloads to start a deeper net from."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    AtomicCheckpointIO().save_checkpoint({"state_dict": state}, path)
    return path


def _load_model_from(ckpt_path: str, cfg: DictConfig, datamodule):
    """The trained A of this cell's study and seed, from its best checkpoint (weights only)."""
    model = model_for(cfg, "A", datamodule, init="kaiming")
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return model


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


def make_trainer(
    cfg: DictConfig,
    accelerator: str,
    precision: str,
    ckpt_dir: Path,
    outbox: Outbox | None = None,
    extra_callbacks=(),
    **overrides,
) -> pl.Trainer:
    """The project's Trainer: best + last checkpoints, MLflow logger, heartbeat, progress bar."""
    deterministic = is_deterministic(cfg, accelerator)
    if deterministic and accelerator == "gpu":
        deterministic = "warn"  # some CUDA backward kernels have no deterministic version
    # Set explicitly every time: Trainer(deterministic=True) leaves it on for later trainers.
    torch.use_deterministic_algorithms(bool(deterministic), warn_only=deterministic == "warn")
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best",
        monitor="val/acc1",
        mode="max",
        save_last=True,
        save_top_k=1,
        enable_version_counter=False,
    )
    callbacks = [checkpoint, *extra_callbacks]
    logger = False
    if outbox is not None:
        callbacks.append(Heartbeat(outbox))
        logger = CellLogger(outbox)
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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra task: one cell. A failed cell in a sweep is recorded and the sweep goes on."""
    return task(cfg, multirun=HydraConfig.get().mode.name == "MULTIRUN")


def task(cfg: DictConfig, multirun: bool) -> float | None:
    """One cell, with the CLI's exits; returns what a sweeper may optimise: the best validation
    top-1 accuracy (never a test figure: tuning on it would leak the test set into the study)."""
    if distributed.shared_by_rank_zero() is not None:  # another rank of a cell: rank 0 reports
        run_cell(cfg)
        return None
    progress = Progress.from_env(_job_num() if multirun else 0)
    deadline = os.environ.get(DEADLINE_ENV)
    if deadline and time.time() >= float(deadline):  # the study's time limit: start no new cell
        print(f"{cfg.arch} seed={cfg.seed}: not started (the study's time limit has passed)", flush=True)
        return None
    if progress:
        # one line per cell as it starts and one as it ends: Lightning's device banner and
        # fit-stopped notes would add five more per cell
        logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
        print(f"{progress.prefix()} {cfg.arch} seed={cfg.seed}: started", flush=True)
    try:
        result = run_cell(cfg, announce_data=progress is None)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"interrupted: {cfg.arch} seed={cfg.seed} marked KILLED", file=sys.stderr)
        sys.exit(130)
    except SystemExit as exc:
        if type(exc).__name__ == "SIGTERMException":
            print(f"SIGTERM: {cfg.arch} seed={cfg.seed} marked KILLED; re-run to resume", file=sys.stderr)
            sys.exit(143)
        raise
    _print_summary(result, progress)
    if result.status not in ("FINISHED", "SKIPPED", "BUSY") and not multirun:
        sys.exit(1)
    return result.val_acc1


@dataclass
class Progress:
    """Where a cell stands in its study: k of N, the study's elapsed time, and a projection of
    the time left from the mean time per cell so far (finished cells skipped on a re-run count
    as quick ones, so early estimates after a resume run low)."""

    k: int  # this cell, 1-based
    total: int
    started: float

    @classmethod
    def from_env(cls, job_num: int) -> Progress | None:
        value = os.environ.get(PROGRESS_ENV)
        if not value:
            return None
        before, total, started = value.split(":")
        return cls(int(before) + job_num + 1, int(total), float(started))

    def prefix(self) -> str:
        return f"[{self.k}/{self.total} · {_clock(time.time() - self.started)}]"

    def left(self) -> str:
        elapsed = time.time() - self.started
        remaining = self.total - self.k
        return f"about {_clock(elapsed / self.k * remaining)} left" if remaining else "last cell"


def _job_num() -> int:
    """This job's index in its multirun (0 outside Hydra)."""
    try:
        return HydraConfig.get().job.num
    except ValueError:
        return 0


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def _print_summary(r: CellResult, progress: Progress | None = None) -> None:
    if r.status == "SKIPPED":
        line = f"{r.arch} seed={r.seed}: already FINISHED (run {r.run_id}), skipped"
    elif r.status == "BUSY":
        line = f"{r.arch} seed={r.seed}: being trained by another live process (run {r.run_id}), skipped"
    elif r.status == "FINISHED":
        line = (
            f"{r.arch} seed={r.seed}: FINISHED in {r.seconds:.0f} s, test top-1 accuracy "
            f"{r.test_acc1:.1%} (error {1 - r.test_acc1:.1%})"
            + (f", MLflow run {r.run_id}" if r.run_id else "")
        )
    elif r.status == "UNSENT":
        line = f"{r.arch} seed={r.seed}: trained (test top-1 accuracy {r.test_acc1:.1%}) but not recorded: {r.reason}"
    else:
        line = f"{r.arch} seed={r.seed}: {r.status}: {r.reason}"
    if progress:
        line = f"{progress.prefix()} {line.replace(', MLflow run', '; run')} · {progress.left()}"
    print(line, flush=True)


register()

if __name__ == "__main__":
    # Run the task through its importable name: parallel launchers (joblib, submitit) pickle the
    # task function, by reference only when it does not live in __main__.
    from vgg_ablation.train import main as task

    task()

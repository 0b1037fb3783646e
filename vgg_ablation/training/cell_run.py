"""One cell's MLflow run: opening it (or finding it FINISHED, or taken by a live process, or
taking over a dead attempt), the params it records, the trained A a deeper net starts from, the
Lightning logger, heartbeat and system sampler that write through the run's outbox, and its last
records and status.

Everything a training run sends goes through its outbox (outbox.py): a tracking outage costs no
training.

About 460 lines, one concern: a cell's run, from the moment it is looked for to its last record,
in the order a cell meets them (its opening's cases, with the races between launches, are most).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only

from vgg_ablation import __version__
from vgg_ablation.errors import UserError
from vgg_ablation.nets.models import Net
from vgg_ablation.study.cells import cell_cfg, cell_key, fingerprint
from vgg_ablation.tracking import stores
from vgg_ablation.tracking.outbox import Outbox, leftover_journal, send_journal
from vgg_ablation.training import distributed
from vgg_ablation.training.build import lr_of, lrn_scale_value, starts_from_a
from vgg_ablation.training.checkpoints import AtomicCheckpointIO, bring_checkpoints, choose_resume

FAILURE_TAG = "failure_reason"

# Where a trained A's weights travel to the deeper nets that start from it: the A run's artifacts
# (`checkpoint/weights.pt`). Any machine that reaches the tracking server reaches them, with no
# shared filesystem; the checkpoint folders stay on each machine's own fast disk.
A_WEIGHTS = ("checkpoint", "weights.pt")


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


def curated_params(cfg: DictConfig, model: Net, datamodule, precision: str) -> dict[str, str]:
    """One flat set of params, logged once per run (MLflow refuses a changed value). The arch,
    its depth and its head are read off the net that was built: one resolution of `arch`."""
    return {
        "arch": model.arch.name,
        "depth": model.arch.depth,
        "width": cfg.model.width,
        "params": sum(p.numel() for p in model.parameters()),
        "batch_norm": cfg.model.batch_norm,
        "head": model.head,
        "dropout": cfg.model.dropout,
        "warmup_epochs": cfg.optim.warmup_epochs,
        "init": cfg.model.init if starts_from_a(cfg, model.arch) or cfg.model.init != "from_A" else "kaiming",
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
        "lr": lr_of(cfg),  # this net's own, when the study chose one (optim.lr_per_arch)
        "momentum": cfg.optim.momentum,
        "weight_decay": cfg.optim.weight_decay,
        "schedule": cfg.optim.schedule,
        "epochs": cfg.trainer.max_epochs,
        "seed": cfg.seed,
        "precision": precision,
        "study": cfg.study.name,
        "version": __version__,  # of vgg-ablation; the git commit is a tag (when run from a checkout)
    }


def trained_a_checkpoint(mlflow_client, experiment_id: str, cfg: DictConfig) -> str:
    """The trained A of this seed: its best checkpoint when it is on this machine, else its
    weights from the A run's artifacts (downloaded once into this machine's checkpoint folder)."""
    a_cell = cell_key(cell_cfg(cfg, "A", cfg.seed))
    for run in stores.runs_of_cell(mlflow_client, experiment_id, a_cell):
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
                print(f"{cfg.arch} seed={cfg.seed}: init from A: A's weights from the tracking server "
                      f"(run {run.info.run_id})", flush=True)  # fmt: skip
            return str(local)
    raise UserError(
        f"init=from_A needs a FINISHED A run for seed {cfg.seed} in this study, its checkpoint on this "
        "machine or its weights in the run's artifacts; run arch=A first"
    )


def open_run(
    mlflow_client, experiment_id: str, cfg: DictConfig, key: str, params: dict, device_name: str, datamodule
):
    """The MLflow run this attempt writes to, and the checkpoint to resume from.

    Returns ("skip", run) when the cell already FINISHED, ("busy", run) when a live process is
    training it right now, else ("run", run_id, resume_from), or ("new", run_id, None) for a run
    created here. A dead attempt (FAILED, KILLED, or
    RUNNING with its process gone) is taken over: same run, from its last checkpoint if it wrote
    one, so a cell never gets a second run.
    """
    # One process at a time per SQLite store decides (two launches of one study in the same
    # second would otherwise both create, or both take over, a cell's run); any store: stores.raced_by.
    with stores.store_lock(mlflow_client.tracking_uri):
        return _open_run_locked(mlflow_client, experiment_id, cfg, key, params, device_name, datamodule)


def _open_run_locked(mlflow_client, experiment_id, cfg, key, params, device_name, datamodule):
    previous = stores.runs_of_cell(mlflow_client, experiment_id, key)
    if send_leftovers(mlflow_client, previous, f"{cfg.arch} seed={cfg.seed}"):
        previous = stores.runs_of_cell(mlflow_client, experiment_id, key)  # one may be FINISHED now
    parent = cfg.logger.parent_run_id
    for run in previous:
        if run.info.status == "FINISHED":
            if parent and run.data.tags.get(stores.PARENT_TAG) != parent:
                mlflow_client.set_tag(run.info.run_id, stores.PARENT_TAG, parent)  # adopted by this study
            return "skip", run
    for run in previous:
        if run.info.status == "RUNNING" and not stores.is_orphaned(run):
            return "busy", run
    if previous:
        return ("run", *_take_over(mlflow_client, previous[0], cfg, key, params, device_name, datamodule))
    return _create_run(mlflow_client, experiment_id, cfg, key, params, device_name, datamodule)


def _take_over(mlflow_client, run, cfg: DictConfig, key: str, params: dict, device_name: str,
               datamodule) -> tuple[str, str | None]:  # fmt: skip
    """A dead attempt's run (FAILED, KILLED, or RUNNING with its process gone), RUNNING again
    here, and the checkpoint to resume from (None: a fresh start of the same run)."""
    run_id = run.info.run_id
    _complete_the_opening(mlflow_client, run, cfg, params, datamodule)
    here = Path(cfg.logger.checkpoint_root).resolve() / run_id  # where this attempt writes
    kept = Path(run.data.tags.get("checkpoint_dir", str(here)))
    if kept != here:  # left elsewhere (an import's checkpoint_root, another working folder)
        bring_checkpoints(kept, here)
        mlflow_client.set_tag(run_id, "checkpoint_dir", str(here))  # once they are all here
    resume = choose_resume(here)
    if resume.note:  # a damaged checkpoint never blocks the cell: said, tagged, worked around
        print(f"warning: {key}: {resume.note}", file=sys.stderr, flush=True)
        mlflow_client.set_tag(run_id, "checkpoint_recovery", resume.note[:5000])
    mlflow_client.update_run(run_id, status="RUNNING")
    # Its attempts, and the epochs its checkpoint had (a resumed cell's time is its last attempt's)
    epochs = {m.step for m in mlflow_client.get_metric_history(run_id, "val/acc1")} if resume.path else set()
    attempt = {
        "attempts": str(int(run.data.tags.get("attempts", "1")) + 1),
        "resumed_after_epochs": str(len(epochs)),
    }
    for name, value in {**stores.environment_tags(device_name), **attempt}.items():
        mlflow_client.set_tag(run_id, name, value)
    if cfg.logger.parent_run_id:  # the study's run, also when a dead attempt is taken over
        mlflow_client.set_tag(run_id, stores.PARENT_TAG, cfg.logger.parent_run_id)
    if FAILURE_TAG in run.data.tags:
        mlflow_client.delete_tag(run_id, FAILURE_TAG)
    print(f"{cfg.arch} seed={cfg.seed}: resume {key}: run {run_id} from {resume.path or 'the start (no checkpoint)'}",
          flush=True)  # fmt: skip
    return run_id, resume.path


def _complete_the_opening(mlflow_client, run, cfg: DictConfig, params: dict, datamodule) -> None:
    """What `_create_run` records after creating a run, where the attempt that created it was
    killed before it had (a cell beside a Ctrl-C'd one, stopped mid-opening): its checkpoint
    folder, params, config and dataset. Without its params the finished run would name no seed,
    and the study's report could not count it."""
    from mlflow.entities import Param

    run_id = run.info.run_id
    if "checkpoint_dir" not in run.data.tags:
        mlflow_client.set_tag(
            run_id, "checkpoint_dir", str(Path(cfg.logger.checkpoint_root).resolve() / run_id)
        )
    missing = {name: value for name, value in params.items() if name not in run.data.params}
    if missing:
        mlflow_client.log_batch(run_id, params=[Param(name, str(value)) for name, value in missing.items()])
    if not run.data.params:  # nothing after the params was recorded either
        mlflow_client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        log_dataset(mlflow_client, run_id, datamodule)


# Fault injection for the tests: hold the moment between finding no run and creating one, where
# two launches (or two machines on one server) would both find none. The process says it got
# here (a file <hold>.<pid>, holding the start time its run will have) and goes on once the test
# creates <hold>: the test makes the race (or a store's death at this moment) happen, instead of
# hoping a sleep is long enough for it.
RACE_HOLD_ENV = "VGG_ABLATION_RACE_HOLD"


def hold_here_for_tests(started_ms: int, limit: float = 300) -> None:
    hold = os.environ.get(RACE_HOLD_ENV)
    if not hold:
        return
    Path(f"{hold}.{os.getpid()}").write_text(str(started_ms))
    deadline = time.time() + limit  # a test that never releases fails on its own timeout
    while not Path(hold).exists() and time.time() < deadline:
        time.sleep(0.05)


def _create_run(
    mlflow_client, experiment_id, cfg: DictConfig, key: str, params: dict, device_name: str, datamodule
):
    """The cell's first run, with its tags, params, config and dataset; ("busy", winner) when
    another launch created it in the same moment."""
    from mlflow.entities import Param

    # The start time MLflow's client would stamp, stamped before the test hold: a create held
    # there is one sent first that lands late (a descheduled process, a slow request)
    started_ms = int(time.time() * 1000)
    hold_here_for_tests(started_ms)
    parent = cfg.logger.parent_run_id
    tags = {
        "cell": key,
        "study": cfg.study.name,
        "arch": cfg.arch,
        "seed": str(cfg.seed),
        "fingerprint": fingerprint(cfg),
        "data_digest": datamodule.dataset.digest,
        **stores.environment_tags(device_name),
        **stores.context_tags(),
        **({stores.PARENT_TAG: parent} if parent else {}),
    }
    run_id = mlflow_client.create_run(
        experiment_id, start_time=started_ms, tags=tags, run_name=f"{cfg.arch}-seed{cfg.seed}"
    ).info.run_id
    keeper = stores.raced_by(mlflow_client, experiment_id, key, run_id)
    if keeper is not None:  # another launch created this cell's run a moment earlier
        mlflow_client.delete_run(run_id)
        return "busy", keeper
    ckpt_dir = Path(cfg.logger.checkpoint_root).resolve() / run_id
    mlflow_client.set_tag(run_id, "checkpoint_dir", str(ckpt_dir))
    mlflow_client.log_batch(run_id, params=[Param(name, str(value)) for name, value in params.items()])
    mlflow_client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    log_dataset(mlflow_client, run_id, datamodule)
    # Looked at again, some round trips later: a racing launch's create has landed by now
    # (`stores.raced_by`); the loser stands down before it trains. `train` looks once more before
    # the result is recorded.
    keeper = stores.raced_by(mlflow_client, experiment_id, key, run_id)
    if keeper is not None:
        mlflow_client.delete_run(run_id)
        return "busy", keeper
    return "new", run_id, None


def send_leftovers(mlflow_client, runs, label: str) -> bool:
    """Records that a dead attempt of this cell kept in its outbox (its tracking store was away
    when it ended): sent now, before anything is decided about the cell. Its status may be among
    them: a cell that finished training while the store was away is then FINISHED, not retrained."""
    sent_any = False
    for run in runs:
        journal = leftover_journal(run)
        if journal is None:
            continue
        sent = send_journal(mlflow_client, journal)
        if sent:  # a journal with nothing left in it (an attempt stopped mid-close) is not news
            print(f"{label}: sent {sent} records a previous attempt kept while its tracking store was away",
                  file=sys.stderr, flush=True)  # fmt: skip
        sent_any = True
    return sent_any


def log_dataset(mlflow_client, run_id: str, datamodule) -> None:
    """The dataset as an MLflow dataset input (the dashboard's Dataset column): name, digest of
    its file list and sizes, source, and images per split and class as its profile."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    ds = datamodule.dataset
    profile = {**ds.profile(), "used": datamodule.split_counts(), "sizes": datamodule.describe()}
    dataset = Dataset(
        name=ds.name, digest=ds.digest, source_type="local", source=json.dumps({"uri": ds.source}),
        profile=json.dumps(profile),
    )  # fmt: skip
    inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])]
    stores.retry_unique_race(lambda: mlflow_client.log_inputs(run_id, inputs))


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


def best_val(mlflow_client, run_id: str) -> float | None:
    history = mlflow_client.get_metric_history(run_id, "val/acc1")
    return max((m.value for m in history), default=None)


def reason_of(exc: BaseException) -> str:
    name = type(exc).__name__
    if name == "SIGTERMException":
        return "SIGTERM received (preempted or cancelled); resumes from its last checkpoint on re-run"
    text = str(exc).strip().splitlines()
    return f"{name}: {text[0]}" if text else name


def weights_only(checkpoint: str, path: Path) -> Path:
    """The net's weights from a checkpoint (no optimizer state: a third of its size with momentum),
    written atomically: what another machine downloads to start a deeper net from."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    AtomicCheckpointIO().save_checkpoint({"state_dict": state}, path)
    return path

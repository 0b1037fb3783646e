"""One training run: one cell (architecture, seed, dataset) of a study, recorded in MLflow.

`python -m vgg_ablation.training.train [overrides]` is the Hydra task (`vgg-ablation train` and a study's
multirun both land here). Order of work, so that bad input never half-writes a run: check the
config, load and check the data, build the model (build.py), and only then open the MLflow run
(cell_run.py); then train, test and record.

A run's MLflow status is set here, not by Lightning: FINISHED only once the test metrics of the
best checkpoint are recorded; FAILED with the reason otherwise; KILLED on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vgg_ablation.config import CONF_DIR, register
from vgg_ablation.errors import StoreAway, UserError
from vgg_ablation.nets.models import forward_flops, lrn_activity, transfer_from_a
from vgg_ablation.study.cells import DEADLINE_ENV, cell_key
from vgg_ablation.tracking import stores
from vgg_ablation.tracking.outbox import Outbox, root_cause
from vgg_ablation.tracking.runtable import above_chance
from vgg_ablation.training import distributed
from vgg_ablation.training.build import device_choice, fits_on_device, load_model, prepare, starts_from_a
from vgg_ablation.training.cell_run import (
    A_WEIGHTS,
    FAILURE_TAG,
    CellLogger,
    CellResult,
    Heartbeat,
    best_val,
    curated_params,
    finish,
    open_run,
    reason_of,
    system_metrics,
    trained_a_checkpoint,
    weights_only,
)
from vgg_ablation.training.fitting import LightningData, make_module, make_trainer
from vgg_ablation.training.profiling import Timeline, timeline
from vgg_ablation.training.progress import EpochLine, Progress, say_how_it_ended


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropAdverts())
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# Each run has its own checkpoint folder, which also holds its outbox: not someone else's files.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
# On a SLURM login node (srun on PATH), Lightning suggests srun for every cell trained outside a
# job: a study there runs its cells locally on purpose, or as jobs through hydra/launcher=slurm.
warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")


@dataclass
class Cell:
    """A cell ready to train: its data and model, its device choices, and its run."""

    cfg: DictConfig
    key: str
    datamodule: object
    model: torch.nn.Module
    accelerator: str
    precision: str
    channels_last: bool
    result: CellResult
    ckpt_dir: Path
    outbox: Outbox | None = None
    resume_from: str | None = None
    start: float = 0.0
    line: Timeline = field(default_factory=timeline)  # where its time goes (bench.mode=cells)
    progress: Progress | None = None  # where it stands in its study (its lines' prefix)
    created_in: tuple | None = None  # (client, experiment id) where this launch created its run


def run_cell(cfg: DictConfig, progress: Progress | None = None) -> CellResult:
    """Train, validate and test one cell; record it in MLflow. Raises UserError on bad input.
    `progress`: where the cell stands in its study, whose lines it prefixes (a study prints the
    data line once for all its cells; a lone cell prints it)."""
    shared = distributed.shared_by_rank_zero()
    if shared is not None:
        return run_rank(cfg, shared)
    cell = open_cell_or_say_why(cfg, progress)
    if cell.result.status in ("SKIPPED", "BUSY"):
        return cell.result
    # Ranks 1..N-1 of a multi-device cell train beside this one and record nothing (distributed.py)
    shared = {"run_id": cell.result.run_id, "ckpt_dir": str(cell.ckpt_dir), "resume_from": cell.resume_from}
    with distributed.ranks_run_this_cell(cfg, shared):
        try:
            train_and_record(cell)
        except BaseException as exc:  # record every way out, then let the caller decide
            killed = isinstance(exc, KeyboardInterrupt | SystemExit)
            if (
                killed
            ):  # the same stop again (a study passes on the terminal's Ctrl-C) must not cut the record short
                for signum in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(signum, signal.SIG_IGN)
            distributed.tear_down(ok=False)
            cell.result.status = "KILLED" if killed else "FAILED"
            cell.result.reason = reason_of(exc)
            if cell.outbox is not None:
                cell.outbox.set_tags({FAILURE_TAG: cell.result.reason[:5000]})
                # a preempted job has seconds left (SLURM: 30 by default): it does not wait long
                finish(
                    cell.outbox,
                    cell.result.status,
                    min(cfg.logger.outage_wait, 20.0),
                    cell.start,
                    cell.result,
                )
            if killed:
                raise
    cell.result.seconds = time.time() - cell.start
    return cell.result


def open_cell_or_say_why(cfg: DictConfig, progress: Progress | None) -> Cell:
    """`open_cell`, with a store that stops answering while the run opens said in one line. (Once
    the run is open its writes go through the outbox, and an outage costs nothing.)"""
    try:
        return open_cell(cfg, progress)
    except UserError:
        raise
    except Exception as exc:
        uri = stores.tracking_uri(cfg.logger.tracking_uri)
        if not cfg.logger.enabled or stores.answers(uri):
            raise
        raise StoreAway(
            f"{cfg.arch} seed={cfg.seed}: the tracking store {uri} stopped answering while this cell "
            f"opened its run ({root_cause(exc)}); nothing was trained: run the same command once it is back"
        ) from exc


def open_cell(cfg: DictConfig, progress: Progress | None) -> Cell:
    """The first half of a cell: data, model and devices, then its MLflow run (found FINISHED,
    busy, taken over or created), A's weights in a deeper net, and the run's outbox."""
    start, line = time.time(), timeline()
    line.mark("cell")
    datamodule, model = prepare(cfg)
    line.mark("prepared")
    if progress is None:
        print(datamodule.describe(), flush=True)
    key = cell_key(cfg)
    accelerator, precision, channels_last = device_choice(cfg)
    result = CellResult(cell=key, arch=cfg.arch, seed=cfg.seed, status="FAILED")
    cell = Cell(
        cfg,
        key,
        datamodule,
        model,
        accelerator,
        precision,
        channels_last,
        result,
        Path(),
        start=start,
        line=line,
    )
    run_id = None
    if cfg.logger.enabled:
        uri = stores.tracking_uri(cfg.logger.tracking_uri)
        stores.check_reachable(uri)
        mlflow_client = stores.client(uri)
        experiment_id = stores.ensure_experiment(mlflow_client, stores.experiment_name(cfg))
        if starts_from_a(cfg, model.arch):
            trained_a = load_model(trained_a_checkpoint(mlflow_client, experiment_id, cfg), cfg, datamodule)
            prefix = f"{progress.prefix()} " if progress else ""  # a study's lines, in its format
            print(f"{prefix}{cfg.arch} seed={cfg.seed}: init from A: copied {', '.join(transfer_from_a(model, trained_a))}",
                  flush=True)  # fmt: skip
        device_name = torch.cuda.get_device_name() if accelerator == "gpu" else "cpu"
        params = curated_params(cfg, model, datamodule, precision)
        opened = open_run(mlflow_client, experiment_id, cfg, key, params, device_name, datamodule)
        if opened[0] not in ("run", "new"):
            run = opened[1]
            result.status = "SKIPPED" if opened[0] == "skip" else "BUSY"
            result.run_id, result.test_acc1 = run.info.run_id, run.data.metrics.get("test/acc1")
            result.val_acc1 = best_val(mlflow_client, run.info.run_id)
            return cell
        _, run_id, cell.resume_from = opened
        result.run_id = run_id
        if opened[0] == "new":  # a race with another launch is looked at again before the result
            cell.created_in = (mlflow_client, experiment_id)
        # CPU numbers move with it, as with the thread count: a tag, since a resumed attempt may differ
        mlflow_client.set_tag(run_id, "channels_last", str(channels_last).lower())
        cell.ckpt_dir = Path(cfg.logger.checkpoint_root).resolve() / run_id
        # From here on the run's writes go through its outbox: kept on disk, sent in order, and a
        # tracking outage costs no training (see outbox.py).
        cell.outbox = Outbox(mlflow_client, run_id, cell.ckpt_dir, f"{cfg.arch} seed={cfg.seed}")
    else:
        cell.ckpt_dir = Path(cfg.logger.checkpoint_root).resolve() / f"nolog-{key.replace('/', '_')}"
    line.mark("opened")
    cell.progress = progress
    return cell


def train_and_record(cell: Cell) -> None:
    """The second half: fit, test the best checkpoint, check it against chance, measure LRN,
    and record everything through the outbox, the status last."""
    cfg, datamodule, result, outbox = cell.cfg, cell.datamodule, cell.result, cell.outbox
    module = make_module(cfg, cell.model, cell.accelerator, cell.channels_last)
    logger, callbacks = (CellLogger(outbox), [Heartbeat(outbox)]) if outbox else (False, [])
    if cell.progress is not None and not cfg.trainer.progress_bar:  # a study: a line per epoch
        callbacks.append(EpochLine(cell.progress, f"{cfg.arch} seed={cfg.seed}"))
    trainer = make_trainer(cfg, cell.accelerator, cell.precision, cell.ckpt_dir, logger,
                           [*cell.line.callbacks(), *callbacks])  # fmt: skip
    if cell.accelerator == "gpu" and fits_on_device(cfg, datamodule):
        datamodule.move_to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    fitted, fit_start = LightningData(datamodule), time.time()
    cell.line.mark("fit_start")
    sampler = system_metrics(cfg, outbox, resumed=cell.resume_from is not None)
    try:
        trainer.fit(module, datamodule=fitted, ckpt_path=cell.resume_from, weights_only=True)
    finally:
        if sampler is not None:
            sampler.stop()
    if trainer.interrupted:
        raise KeyboardInterrupt
    fit_seconds = time.time() - fit_start
    cell.line.mark("fit_end")
    best = trainer.checkpoint_callback.best_model_path or None
    result.val_acc1 = float(
        trainer.checkpoint_callback.best_model_score or trainer.callback_metrics.get("val/acc1", float("nan"))
    )
    chance_p = test_best(cell, trainer, module, fitted, best) if cfg.trainer.test else None
    cell.line.mark("test_end")
    activity = lrn_activity(module.model, datamodule.val_dataloader())
    distributed.tear_down(ok=True)
    if outbox is None:
        result.status = "FINISHED"
        return
    learned = {"learned": str(result.learned).lower()} if result.learned is not None else {}
    outbox.set_tags({**learned, **({"best_checkpoint": best} if best else {})})
    if cfg.arch == "A" and cfg.model.init == "from_A" and best:  # deeper nets start from it
        outbox.log_artifact(weights_only(best, cell.ckpt_dir / A_WEIGHTS[1]), A_WEIGHTS[0])
    lrn = (
        {"lrn/denominator_mean": activity["mean"], "lrn/denominator_p99": activity["p99"]} if activity else {}
    )
    chance = {"test/chance_p": chance_p} if chance_p is not None else {}
    outbox.log_metrics({**chance, "images_seen": trainer.global_step * cfg.data.batch_size,
                        "flops_per_image": forward_flops(module.model, datamodule.input_size), **lrn,
                        "time/fit_seconds": fit_seconds}, step=0)  # fmt: skip
    cell.line.mark("finish_start")
    if stood_down(cell):
        return
    finish(outbox, "FINISHED", cfg.logger.outage_wait, cell.start, result)
    cell.line.mark("recorded")
    cell.line.write_cell(cfg, trainer, outbox.write_seconds)


def stood_down(cell: Cell, poll: float = 5.0) -> bool:
    """Whether this launch gave the cell up, its result unrecorded: it created the cell's run in
    the same moment as another launch, and the other's run is the one the cell keeps (see
    `stores.raced_by`; usually settled before training, this is the last look, before the result).
    While that run has no result yet, this one waits for it rather than give a result up for a
    run that may still die (then this one records). Standing down, its run is deleted and its
    checkpoints removed; the result names the run that holds the cell. A store that does not
    answer leaves the result to the outbox, as any other record."""
    if cell.created_in is None:
        return False
    mlflow_client, experiment_id = cell.created_in
    label, said = f"{cell.cfg.arch} seed={cell.cfg.seed}", False
    while True:
        try:
            keeper = stores.raced_by(mlflow_client, experiment_id, cell.key, cell.result.run_id)
        except Exception:  # an outage: the outbox keeps the records until the store is back
            return False
        if keeper is None:
            return False
        if keeper.info.status == "FINISHED":
            break
        if not said:
            print(f"{label}: waiting for run {keeper.info.run_id}, launched in the same moment as this one, to end: "
                  "the cell keeps one result", flush=True)  # fmt: skip
            said = True
        time.sleep(poll)
    mine = cell.result.run_id
    cell.outbox.close(cell.cfg.logger.outage_wait)  # its records into its own run, then the run goes
    try:
        mlflow_client.delete_run(mine)
    except Exception as exc:  # left RUNNING, its process gone: a dead attempt beside the FINISHED run
        print(f"warning: {label}: run {mine} could not be deleted ({root_cause(exc)}); the cell's result is run "
              f"{keeper.info.run_id}", file=sys.stderr, flush=True)  # fmt: skip
    shutil.rmtree(cell.ckpt_dir, ignore_errors=True)
    cell.result.run_id = keeper.info.run_id
    cell.result.status, cell.result.test_acc1 = "BUSY", keeper.data.metrics.get("test/acc1")
    cell.result.reason = f"launched in the same moment as it; this launch's run {mine} deleted"
    return True


def test_best(cell: Cell, trainer, module, fitted, best: str | None) -> float:
    """The test pass on the best checkpoint, and whether the net learned anything (a binomial test
    against chance); returns that test's p-value."""
    cfg, result = cell.cfg, cell.result
    trainer.test(module, datamodule=fitted, ckpt_path=best, weights_only=True, verbose=False)
    result.test_acc1 = float(trainer.callback_metrics["test/acc1"])
    test_images = int(trainer.callback_metrics["test/images"])
    classes = cell.datamodule.num_classes
    result.learned, chance_p = above_chance(result.test_acc1, test_images, classes)
    if not result.learned:
        print(f"warning: {cfg.arch} seed={cfg.seed} learned nothing: test top-1 {result.test_acc1:.1%} is not "
              f"above chance ({1 / classes:.1%}; binomial p={chance_p:.2f} on {test_images} images)",
              file=sys.stderr, flush=True)  # fmt: skip
    return chance_p


def run_rank(cfg: DictConfig, shared: dict) -> CellResult:
    """Rank 1..N-1 of a multi-device cell: the same fit and test as rank 0, on this rank's share of
    the data, recording nothing (rank 0 records for all). Its weights start as rank 0's (DDP
    broadcasts them), so a from-A start needs nothing here."""
    datamodule, model = prepare(cfg)
    accelerator, precision, channels_last = device_choice(cfg)
    result = CellResult(cell=cell_key(cfg), arch=cfg.arch, seed=cfg.seed, status="FAILED")
    ok = False
    try:
        module = make_module(cfg, model, accelerator, channels_last)
        trainer = make_trainer(cfg, accelerator, precision, Path(shared["ckpt_dir"]))
        if accelerator == "gpu" and fits_on_device(cfg, datamodule):
            datamodule.move_to(torch.device("cuda", int(os.environ["LOCAL_RANK"])))
        fitted = LightningData(datamodule)
        trainer.fit(module, datamodule=fitted, ckpt_path=shared["resume_from"], weights_only=True)
        best = trainer.checkpoint_callback.best_model_path or None
        if cfg.trainer.test:
            trainer.test(module, datamodule=fitted, ckpt_path=best, weights_only=True, verbose=False)
        ok = True
    finally:
        distributed.tear_down(ok)
    result.status = "FINISHED"
    return result


def run_train(args: list[str]) -> int:
    """`vgg-ablation train`: this task through Hydra, once, writing nothing of Hydra's own (no
    outputs/ folder). The overrides are composed here first only so that a misspelt key or an
    unknown choice is one line; data and shapes are checked by the task, before anything is
    recorded."""
    from vgg_ablation.config import compose, with_study_dir

    args = with_study_dir(args)
    compose(args)
    sys.argv = [sys.argv[0], *args, "hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=stdout"]
    main()
    return 0


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
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
        result = run_cell(cfg, progress)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except StoreAway as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if not progress:  # in a study, the study says it, in one line for all its cells
            print(f"interrupted: {cfg.arch} seed={cfg.seed} marked KILLED; re-run to resume", file=sys.stderr)
        sys.exit(130)
    except SystemExit as exc:
        if type(exc).__name__ == "SIGTERMException":
            if not progress:
                print(f"SIGTERM: {cfg.arch} seed={cfg.seed} marked KILLED; re-run to resume", file=sys.stderr)
            sys.exit(143)
        raise
    say_how_it_ended(result, progress)
    if result.status not in ("FINISHED", "SKIPPED", "BUSY") and not multirun:
        sys.exit(1)
    return result.val_acc1


def _job_num() -> int:
    """This job's index in its multirun (0 outside Hydra)."""
    try:
        return HydraConfig.get().job.num
    except ValueError:
        return 0


def _stop_side_by_side_cells(signum, frame) -> None:
    """Ctrl-C in a sweep whose cells train side by side in joblib's worker processes. joblib
    answers a KeyboardInterrupt in its own process by killing the workers at once, before a cell
    can mark its run KILLED and keep its checkpoint; so this process passes the stop on to the
    cells instead (a terminal's Ctrl-C reached them already: a second one costs nothing, see
    run_cell), and the first cell's exit (130) ends the sweep through joblib. A cell killed by
    joblib before it could mark its run stays RUNNING with its process gone: the next run of the
    study takes it over from its last checkpoint, as after any kill."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            command = " ".join(child.cmdline())
            if "loky" in command and "resource_tracker" not in command:
                child.send_signal(signal.SIGINT)


register()

if __name__ == "__main__":
    # Run the task through its importable name: parallel launchers (joblib, submitit) pickle the
    # task function, by reference only when it does not live in __main__.
    from vgg_ablation.training.train import main as task

    if any(a == "hydra/launcher=joblib" for a in sys.argv):
        signal.signal(signal.SIGINT, _stop_side_by_side_cells)
    try:
        task()
    except KeyboardInterrupt:
        # A sweep's own process, stopped while a parallel launcher (joblib) waits on its cells:
        # each cell has said how it ended and the study says the rest in one line; a traceback of
        # the launcher's wait would only bury that line.
        sys.exit(130)

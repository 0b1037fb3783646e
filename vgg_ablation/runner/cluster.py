"""A study's cells as SLURM jobs: Hydra's submitit launcher, with a wait that always ends.

Hydra's `SlurmLauncher` submits one array job (a task per cell) and then waits on each task's
result through submitit, which polls `sacct`. On a cluster without accounting (common on small
ones) a cancelled task never writes a result and that wait never ends; with accounting, the first
cancelled task raises and the other tasks go on training, untold. `WatchedSlurmLauncher` keeps
everything the submission does (the preset's keys, the array job, submitit's requeue at the time
limit and the resume into the same run) and replaces the wait (the plugin class lives in
hydra_plugins/vgg_ablation_launcher, where Hydra looks for launchers; this module is its body):

- before submitting, a request the cluster can never meet (no such partition, GPUs where there are
  none, more CPUs or memory than any node has) is refused in one line, and cells whose runs
  FINISHED are not submitted at all (a rerun submits only what is left);
- while the tasks run, the terminal gets each cell's own progress lines (from its log) and the
  queue's word on pending ones; the queue is read with `squeue`, which needs no accounting;
- a task that left the queue without a result is said in one line (with `sacct`'s state where
  the cluster keeps accounting), and the wait goes on for the others; a pending task the partition
  can never start is cancelled and said;
- Ctrl-C or SIGTERM cancels every task of the study still queued or running (each running cell
  marks its run KILLED and keeps its checkpoint), waits for them to leave, and exits.

The study reads each cell's outcome from MLflow, as it does after any launcher."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from vgg_ablation.errors import UserError

POLL_S = 3.0  # how often the queue and the cells' logs are read
GONE_POLLS = 2  # polls a task must be out of the queue, without a result, before it counts as ended
CANCEL_WAIT_S = 120.0  # after a cancel: SLURM's KillWait (30 s by default) and the cells' checkpoints
# Pending reasons that only an administrator can change: the task would wait forever
NEVER_STARTS = {
    "PartitionConfig": "the request exceeds what the partition allows",
    "PartitionNodeLimit": "more nodes than the partition allows",
    "PartitionTimeLimit": "a time limit (timeout_min) above the partition's",
    "BadConstraints": "constraints no node satisfies",
    "InvalidAccount": "an account this user may not use",
    "InvalidQOS": "a QOS this user may not use",
}


class Stop(BaseException):
    """SIGTERM reached the launcher (Ctrl-C arrives as KeyboardInterrupt)."""


def launch_watched(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    """`WatchedSlurmLauncher.launch` (hydra_plugins/vgg_ablation_launcher): refuse what cannot
    run, submit the unfinished cells as one array job, watch them until each has ended."""
    try:
        return _launch(launcher, job_overrides, initial_job_idx)
    except UserError as exc:  # in one line, not Hydra's report of a launcher's exception
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def _launch(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = launcher.params
    check_request(params)
    labels = [cell_label(o) for o in job_overrides]
    todo = [
        i for i, o in enumerate(job_overrides) if not finished(launcher, o, labels[i], initial_job_idx + i)
    ]
    returns = [JobReturn(overrides=list(o), status=JobStatus.COMPLETED) for o in job_overrides]
    if not todo:
        return returns
    # The executor, as Hydra's SlurmLauncher.launch builds it from the preset's keys
    init_keys = {"max_num_timeout", "submitit_folder"}
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=params["submitit_folder"], slurm_max_num_timeout=params["max_num_timeout"]
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{k if k in base else f"slurm_{k}": v for k, v in params.items() if k not in init_keys}
    )
    Path(str(launcher.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    job_params = [
        (list(job_overrides[i]), "hydra.sweep.dir", initial_job_idx + i, f"job_id_for_{initial_job_idx + i}",
         Singleton.get_state())
        for i in todo
    ]  # fmt: skip
    try:
        jobs = executor.map_array(launcher, *zip(*job_params, strict=True))
    except submitit.core.utils.FailedJobError as exc:
        raise UserError(f"sbatch refused the study's cells: {last_line(str(exc))}") from None
    array = jobs[0].job_id.split("_")[0]
    skipped = len(job_overrides) - len(todo)
    print(f"submitted array job {array}: {len(todo)} cell(s)"
          + (f" ({skipped} already FINISHED, not submitted)" if skipped else "")
          + f"; their logs: {Path(str(params['submitit_folder'])).parent}/", flush=True)  # fmt: skip
    watch = Watch([labels[i] for i in todo], jobs)
    with signals_stop():
        try:
            ended = watch.until_ended()
        except (KeyboardInterrupt, Stop) as exc:
            code = 130 if isinstance(exc, KeyboardInterrupt) else 143
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the study passes a Ctrl-C on: it waits too
            watch.cancel_all()
            sys.exit(code)
    for i, outcome in zip(todo, ended, strict=True):
        if isinstance(outcome, JobReturn):
            returns[i] = outcome
    return returns


def task_config(launcher, overrides: Sequence[str], num: int):
    """A cell's config as its job will see it (Hydra's run_job: the job's number set, the hydra
    node read through HydraConfig and dropped from the task's config)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(cfg.hydra.job):
        cfg.hydra.job.num = num
        cfg.hydra.job.id = f"not_submitted_{num}"
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def finished(launcher, overrides: Sequence[str], label: str, num: int) -> bool:
    """Is this cell's run FINISHED already? Then it is not submitted (a job that would only
    import everything to skip it); said as the cell itself would say it."""
    from vgg_ablation.study.cells import cell_key
    from vgg_ablation.tracking import stores

    cfg = task_config(launcher, overrides, num)
    if not cfg.logger.enabled:
        return False
    client = stores.client(stores.tracking_uri(cfg.logger.tracking_uri))
    experiment = client.get_experiment_by_name(stores.experiment_name(cfg))
    if experiment is None:
        return False
    for run in stores.runs_of_cell(client, experiment.experiment_id, cell_key(cfg)):
        if run.info.status == "FINISHED":
            parent = cfg.logger.parent_run_id
            if parent and run.data.tags.get(stores.PARENT_TAG) != parent:
                client.set_tag(run.info.run_id, stores.PARENT_TAG, parent)  # adopted, as the cell would
            print(f"{label}: already FINISHED (run {run.info.run_id}), not submitted", flush=True)
            return True
    return False


def cell_label(overrides: Sequence[str]) -> str:
    """`A seed=3` from a job's overrides (the sweep's arch and seed)."""
    values = dict(o.split("=", 1) for o in overrides if "=" in o)
    return f"{values.get('arch', '?')} seed={values.get('seed', '?')}"


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


@contextlib.contextmanager
def signals_stop():
    def on_term(signum, frame):
        raise Stop()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- what the cluster can run ------------------------------------------------------------------------------
@dataclass
class Partition:
    name: str
    default: bool
    cpus: int = 0  # the most any node of it has
    memory_mb: int = 0
    gpus: int = 0


def partitions() -> dict[str, Partition]:
    """The cluster's partitions and their largest nodes, from `sinfo`."""
    if not shutil.which("sinfo"):
        raise UserError(
            "hydra/launcher=slurm needs SLURM's commands (sinfo, sbatch) on PATH: none found here"
        )
    done = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%P|%c|%m|%G"], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise UserError(f"sinfo failed, is the cluster up? {last_line(done.stderr or done.stdout)}")
    found: dict[str, Partition] = {}
    for line in done.stdout.splitlines():
        name, cpus, memory, gres = line.split("|")
        part = found.setdefault(name.rstrip("*"), Partition(name.rstrip("*"), name.endswith("*")))
        part.cpus = max(part.cpus, int(cpus.rstrip("+")))
        part.memory_mb = max(part.memory_mb, int(memory.rstrip("+")))
        gpus = [int(n) for n in re.findall(r"gpu(?::[^:(,]+)?:(\d+)", gres)]
        part.gpus = max(part.gpus, sum(gpus))
    return found


def check_request(params: dict[str, Any]) -> None:
    """Refuse, in one line and before anything is submitted, what no node of the partition can
    ever give: a cell would otherwise wait in the queue for good, or sbatch would refuse it."""
    found = partitions()
    name = params.get("partition")
    if name:
        if name not in found:
            raise UserError(
                f"no partition {name!r} on this cluster (sinfo lists: {', '.join(found) or 'none'})"
            )
        part = found[name]
    else:
        defaults = [p for p in found.values() if p.default]
        if not defaults:
            raise UserError("this cluster has no default partition: set hydra.launcher.partition "
                            f"(sinfo lists: {', '.join(found)})")  # fmt: skip
        part = defaults[0]
    gpus = params.get("gpus_per_node") or params.get("gpus_per_task") or 0
    if gpus and part.gpus < int(gpus):
        raise UserError(
            f"partition {part.name!r} has {part.gpus or 'no'} GPU(s) per node and the preset asks for {gpus}: "
            "use hydra/launcher=slurm-cpu, or name a GPU partition (hydra.launcher.partition=...)"
        )
    cpus = int(params.get("cpus_per_task") or 1) * int(params.get("tasks_per_node") or 1)
    if cpus > part.cpus:
        raise UserError(f"a cell asks for {cpus} CPUs and the largest node of partition {part.name!r} has "
                        f"{part.cpus}: set hydra.launcher.cpus_per_task={max(part.cpus, 1)} or less")  # fmt: skip
    memory = params.get("mem_gb")
    if memory and float(memory) * 1024 > part.memory_mb:
        raise UserError(f"a cell asks for {memory} GB and the largest node of partition {part.name!r} has "
                        f"{part.memory_mb / 1024:.1f} GB: lower hydra.launcher.mem_gb")  # fmt: skip


# -- the wait --------------------------------------------------------------------------------------------
@dataclass
class Task:
    label: str
    job: Any  # submitit's SlurmJob
    read: int = 0  # bytes of its log already shown
    gone: int = 0  # polls it has been out of the queue without a result
    pending: str = ""  # the queue's reason, last said
    outcome: Any = None  # its JobReturn, or the line that said how it ended


class Watch:
    """The study's tasks until each has ended: their logs and queue states said as they come."""

    def __init__(self, labels: list[str], jobs: list):
        self.tasks = [Task(label, job) for label, job in zip(labels, jobs, strict=True)]
        self.array = jobs[0].job_id.split("_")[0]

    def until_ended(self) -> list[Any]:
        while any(t.outcome is None for t in self.tasks):
            self.poll()
            if any(t.outcome is None for t in self.tasks):
                time.sleep(POLL_S)
        return [t.outcome for t in self.tasks]

    def poll(self) -> None:
        queue = read_queue(self.array)
        for task in self.tasks:
            if task.outcome is not None:
                continue
            self.show_log(task)
            state = queue.get(task.job.job_id) if queue is not None else ("?", "")
            if state is not None:
                task.gone = 0
                self.show_queue(task, *state)
                continue
            result = task.job.paths.result_pickle
            if result.exists():
                task.outcome = self.result(task, result)
                continue
            task.gone += 1
            if task.gone >= GONE_POLLS:
                self.show_log(task)
                task.outcome = self.ended_without_result(task)

    def show_log(self, task: Task) -> None:
        """The cell's own lines (its progress, in the study's format) from its log, as they come."""
        path = task.job.paths.stdout
        try:
            with path.open("rb") as log:
                log.seek(task.read)
                chunk = log.read()
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]
        task.read += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            if line.strip() and "][submitit][" not in line:  # submitit's own INFO lines: its job ended
                print(line, flush=True)

    def show_queue(self, task: Task, state: str, reason: str) -> None:
        if state == "PENDING" and reason in NEVER_STARTS:
            cancel([task.job.job_id])
            task.outcome = (
                f"{task.label}: cannot start in this partition ({reason}: {NEVER_STARTS[reason]}); cancelled"
            )
            print(task.outcome, flush=True)
            return
        said = f"{state} {reason}".strip()
        if state == "PENDING" and reason and said != task.pending:  # the queue's first word is often empty
            print(f"{task.label}: pending ({reason}), job {task.job.job_id}", flush=True)
        task.pending = said

    def result(self, task: Task, path: Path) -> Any:
        from submitit.core.utils import pickle_load

        with contextlib.suppress(Exception):
            outcome, value = pickle_load(path)
            if outcome == "success" and isinstance(value, JobReturn):
                return value
            if outcome == "error":
                line = f"{task.label}: its job failed ({last_line(str(value))}); log: {task.job.paths.stderr}"
                print(line, flush=True)
                return line
        return f"{task.label}: ended"

    def ended_without_result(self, task: Task) -> str:
        state = accounted_state(task.job.job_id)
        how = (f"ended {state} (sacct)" if state
               else "left the queue without a result (cancelled, past its time limit or its node lost: "
                    "this cluster keeps no accounting to say which)")  # fmt: skip
        line = f"{task.label}: {how}; log: {task.job.paths.stderr}"
        print(line, flush=True)
        return line

    def cancel_all(self) -> None:
        """Cancel every task still queued or running, then wait (bounded) for them to leave the
        queue, saying each; what is still there after that is named with the command to end it."""
        left = [t for t in self.tasks if t.outcome is None]
        if not left:
            return
        cancel([t.job.job_id for t in left])
        print(f"\nstopping: cancelled the study's {len(left)} unfinished job(s) (array {self.array}); "
              "a running cell marks its run KILLED and keeps its checkpoint", flush=True)  # fmt: skip
        deadline = time.time() + CANCEL_WAIT_S
        while any(t.outcome is None for t in self.tasks) and time.time() < deadline:
            time.sleep(POLL_S)
            with contextlib.suppress(KeyboardInterrupt, Stop):
                self.poll()
        still = [t.job.job_id for t in self.tasks if t.outcome is None]
        if still:
            print(f"still in the queue after {CANCEL_WAIT_S:.0f} s: {', '.join(still)} (scancel {' '.join(still)})",
                  flush=True)  # fmt: skip


def read_queue(array: str) -> dict[str, tuple[str, str]] | None:
    """{task id: (state, reason)} of the array's tasks in the queue; None when squeue did not
    answer (then nothing is concluded from a task's absence)."""
    try:
        done = subprocess.run(["squeue", "-h", "-r", "-j", array, "-o", "%i|%T|%r"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        # a finished array is forgotten after MinJobAge: squeue then says "Invalid job id"
        return {} if "Invalid job id" in done.stderr else None
    queue = {}
    for line in done.stdout.splitlines():
        task, state, reason = (line.split("|") + ["", ""])[:3]
        queue[task] = (state, "" if reason == "None" else reason)
    return queue


def accounted_state(job_id: str) -> str | None:
    """`sacct`'s last state of a task (CANCELLED, TIMEOUT, NODE_FAIL, ...), or None without accounting."""
    try:
        done = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.split("\n")[:-1]
    return lines[-1].split()[0] if done.returncode == 0 and lines and lines[-1].strip() else None


def cancel(job_ids: list[str]) -> None:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=60)

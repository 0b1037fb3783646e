"""MLflow: where runs go, how a study's cells are found again, and what a run records.

One MLflow experiment per study (`vgg-ablation/<study>`), one run per cell, found again by its
`cell` tag (what a cell is called lives in cells.py): a re-run of the same command skips the
FINISHED ones and resumes the others. Nothing here knows about data or models.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from functools import cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vgg_ablation.errors import UserError

# MLflow prints two "View run ... at" lines whenever a run against a server ends; our own summary
# line already names the run, and a study promises two lines per cell.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# ... and a progress bar per artifact it moves (an A's weights to a deeper net: one small file)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

EXPERIMENT_PREFIX = "vgg-ablation/"


def tracking_uri(configured: str | None) -> str:
    """Config key, else $MLFLOW_TRACKING_URI, else MLflow's own default store in this folder
    (so that a plain `mlflow ui` here shows the runs)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def answers(uri: str, timeout: float = 2.0) -> bool:
    """Does the tracking server answer its health check? (Any other store: assume so and try.)"""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Refuse an HTTP tracking server that does not answer, or does not take our login, before
    any run starts: refused is not unreachable."""
    if not answers(uri, timeout):
        raise UserError(f"MLflow tracking server unreachable: {uri} (start it, or unset MLFLOW_TRACKING_URI)")
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as exc:
        why = refusal(exc, uri)
        if why:
            raise UserError(why) from None
        raise


REFUSALS = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}


def refusal(exc: BaseException, uri: str = "") -> str | None:
    """A tracking server's 401 or 403, as the one line a user needs; None for anything else."""
    code = getattr(exc, "error_code", None)
    if code not in REFUSALS:
        return None
    where = uri or os.environ.get("MLFLOW_TRACKING_URI", "the tracking server")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if code == "UNAUTHENTICATED":
        who = f"user {user!r}" if user else "no login (MLFLOW_TRACKING_USERNAME unset)"
        return (f"the tracking server refused these credentials (401, {who}) at {where}: set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a login of the lab server")  # fmt: skip
    return (f"the tracking server refused user {user!r} (403: no permission for this) at {where}: ask the study's "
            "owner or the lab server's admin for EDIT (vgg-ablation server-user ... study=<study>)")  # fmt: skip


def experiment_name(cfg: DictConfig) -> str:
    return EXPERIMENT_PREFIX + cfg.study.name


def client(uri: str):
    """A client on `uri`, with the store created (schema migrated) first if it is a new SQLite
    file. Processes that open a fresh SQLite store at once race on that migration ("table
    _alembic_tmp_experiments already exists"), so for SQLite the first open happens under a file
    lock beside the database."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        # MLflow imports its SQL store on the first open: seconds of CPU that, inside the lock,
        # every other process opening the store waited through in turn (32 at once: minutes)
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    with store_lock(uri):
        mlflow_client = MlflowClient(tracking_uri=uri)
        mlflow_client.search_experiments(max_results=1)  # forces the store (and its migration) now
    return mlflow_client


def store_lock(uri: str):
    import contextlib

    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(uri.removeprefix("sqlite:///") + ".lock", timeout=300)


def ensure_experiment(mlflow_client, name: str) -> str:
    """Get or create the experiment. Two processes creating one experiment race on a UNIQUE
    constraint: for SQLite the creation happens under the store's lock; against a server, the
    loser of the race reads what the winner made."""
    with store_lock(mlflow_client.tracking_uri):
        return _get_or_create(mlflow_client, name)


def _get_or_create(mlflow_client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow_client.create_experiment(name)
    except MlflowException:
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def retry_unique_race(call, attempts: int = 5):
    """`call()`, again when it lost a create race in the store. MLflow makes some rows on first use
    (a dataset per experiment, name and digest) with a look-then-insert that two runs starting
    together both pass: the later insert fails on the UNIQUE key (SQLite behind a server,
    PostgreSQL alike), and the retry finds the row the other made. Seen with 4 parallel cells
    against a server; a local SQLite store serialises them under its lock."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return call()
        except MlflowException as exc:
            lost_race = "UNIQUE constraint failed" in str(exc) or "duplicate key value" in str(exc)
            if not lost_race or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    return None


def runs_of_cell(mlflow_client, experiment_id: str, key: str) -> list:
    """All runs recorded for a cell, newest first."""
    escaped = key.replace("'", "\\'")
    return mlflow_client.search_runs(
        [experiment_id], filter_string=f"tags.cell = '{escaped}'", order_by=["attributes.start_time DESC"]
    )


@cache
def git_commit() -> str:
    root = Path(__file__).resolve().parents[2]  # the checkout the package runs from
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            # generated reports do not change what a run computes
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", ".", ":!reports"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("-dirty" if dirty else "")) if commit else "unknown"


def environment_tags(device_name: str) -> dict[str, str]:
    import pytorch_lightning as pl
    import torch

    return {
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "lightning_version": pl.__version__,
        "device": device_name,
        # CPU results depend on it: a different count sums in another order (measured on the
        # sample, A seed 0: 66.5% error with 1 thread, 62.8% with 2). A tag, not a param, because
        # a resumed run may use another count.
        "cpu_threads": str(torch.get_num_threads()),
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "heartbeat": f"{time.time():.0f}",
        **slurm_job(),
    }


def slurm_job() -> dict[str, str]:
    """The SLURM job (array task) a cell runs in, if any: where a cluster user finds its log and
    the id to `scancel`."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")
    return {"slurm_job": job} if job else {}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_after_seconds() -> float:
    """How long a run on another machine may go without a heartbeat (one per epoch) before it is
    taken as dead. Raise it for epochs longer than 2 hours."""
    return float(os.environ.get("VGG_ABLATION_STALE_AFTER", 2 * 3600))


def is_orphaned(run) -> bool:
    """A RUNNING run whose process is gone (SIGKILL, preemption, power loss): never a result.

    On this host, the recorded pid tells; for a run started elsewhere, a heartbeat older than
    `stale_after_seconds()`.
    """
    if run.info.status != "RUNNING":
        return False
    tags = run.data.tags
    if tags.get("host") == socket.gethostname():
        try:
            return not pid_alive(int(tags.get("pid", "0")))
        except ValueError:
            return True
    try:
        beat = float(tags.get("heartbeat", run.info.start_time / 1000))
    except ValueError:
        return True
    return time.time() - beat > stale_after_seconds()


# -- the study's own run and the dashboard ------------------------------------------------------
STUDY_RUN_TAG = "study_run"  # on a study's parent run: "<study>/<config fingerprint>"
SELECTION_TAG = "selection_run"  # on the parent of a study's lr-selection cells: "<study>/<fingerprint>"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the runs table nests a child under its parent
# MLflow 3's UI opens an experiment in the GenAI view unless told it holds model training runs
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def context_tags() -> dict[str, str]:
    """MLflow's own source, user and git tags (its columns in the runs table)."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = {k: v for k, v in resolve_tags({}).items() if k.startswith("mlflow.")}
    commit = git_commit()
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    return tags


def describe_experiment(mlflow_client, experiment_id: str, description: str) -> None:
    """The study's description as the experiment's note, and the model-training view."""
    for key, value in {**EXPERIMENT_KIND, "mlflow.note.content": description}.items():
        if value:
            mlflow_client.set_experiment_tag(experiment_id, key, value)


def find_study_run(mlflow_client, experiment_id: str, key: str, tag: str = STUDY_RUN_TAG):
    """A study's own run, by its key (`cells.study_run_key`: the study and its config); with `tag`,
    another parent run of the study's (its lr selection's)."""
    found = mlflow_client.search_runs(
        [experiment_id], filter_string=f"tags.{tag} = '{key}'",
        order_by=["attributes.start_time ASC"], max_results=1,
    )  # fmt: skip
    return found[0] if found else None


def open_study_run(mlflow_client, experiment_id: str, cfg: DictConfig, key: str, params: dict,
                   tag: str = STUDY_RUN_TAG, name: str = "") -> str:  # fmt: skip
    """The study's parent run (one per study and config fingerprint), RUNNING again if it exists.
    Created under the store's lock: two launches of one study get one parent. With `tag`, another
    parent the study's cells nest under (its lr selection: `SELECTION_TAG`)."""
    from mlflow.entities import Param

    # Nets and seeds are tags, not params: a study grown by a seed keeps its run (they are not
    # part of the fingerprint), and MLflow refuses a changed param.
    grid = {"archs": ",".join(cfg.study.archs), "seeds": ",".join(map(str, cfg.study.seeds))}
    with store_lock(mlflow_client.tracking_uri):
        run = find_study_run(mlflow_client, experiment_id, key, tag)
        if run is not None:
            mlflow_client.update_run(run.info.run_id, status="RUNNING")
            for key, value in grid.items():
                mlflow_client.set_tag(run.info.run_id, key, value)
            return run.info.run_id
        tags = {
            tag: key,
            "study": cfg.study.name,
            "mlflow.note.content": cfg.study.description or f"study {cfg.study.name}",
            **grid,
            **context_tags(),
        }
        run_id = mlflow_client.create_run(
            experiment_id, tags=tags, run_name=name or f"study {cfg.study.name}"
        ).info.run_id
        winner = settle(mlflow_client, experiment_id, f"tags.{tag} = '{key}'", run_id)
        if winner.info.run_id != run_id:  # another launch of this study made it a moment earlier
            return winner.info.run_id
    mlflow_client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    mlflow_client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    return run_id


def run_url(base: str, experiment_id: str, run_id: str, tab: str = "") -> str:
    """A run's page (or one of its tabs: model-metrics, artifacts, ...) in the training view."""
    page = f"{run_id}/{tab}" if tab else run_id
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{page}?workflowType=machine_learning"


def runs_url(base: str, experiment_id: str, search: str | None = None) -> str:
    """The experiment's runs page, in the model-training view, optionally filtered."""
    from urllib.parse import quote

    query = "workflowType=machine_learning" + (f"&searchFilter={quote(search)}" if search else "")
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def raced_by(mlflow_client, experiment_id: str, key: str, mine: str):
    """The run a cell keeps instead of `mine`, a run this launch created, when another launch
    created one too in the same moment; None while `mine` is the cell's run.

    Asked right after the create, and again later: a create sent first can land after the other
    launch's first look (a run's start time is stamped by the client, and requests race to a
    server), so each of two such launches may at first find itself alone or first. Once both runs
    are in the store, every look agrees: a FINISHED run wins, else the earliest
    (start time, then id) among the live ones. A dead competitor (FAILED, KILLED, or RUNNING with
    its process gone) never takes the cell from a live run: its attempt is resumed nowhere."""
    others = [r for r in runs_of_cell(mlflow_client, experiment_id, key) if r.info.run_id != mine]
    finished = [r for r in others if r.info.status == "FINISHED"]
    if finished:
        return min(finished, key=lambda r: (r.info.start_time, r.info.run_id))
    live = [r for r in others if r.info.status == "RUNNING" and not is_orphaned(r)]
    me = mlflow_client.get_run(mine)
    keeper = min([me, *live], key=lambda r: (r.info.start_time, r.info.run_id))
    return None if keeper.info.run_id == mine else keeper


def settle(mlflow_client, experiment_id: str, filter_string: str, mine: str):
    """After creating run `mine` for something that must have one run (a cell, a study), look:
    when another process created one too in the same moment, the earliest (start time, then id)
    wins and the others delete theirs. MLflow has no unique key on a tag, so this is the create
    made idempotent for any store (a tracking server included); SQLite also serialises it under
    the store's lock. Returns the winning run."""
    runs = mlflow_client.search_runs([experiment_id], filter_string=filter_string)
    winner = min(runs, key=lambda r: (r.info.start_time, r.info.run_id))
    if winner.info.run_id != mine:
        mlflow_client.delete_run(mine)
    return winner

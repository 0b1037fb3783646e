"""Shared helpers: run the real CLI in a subprocess (or, for refusals, its `main` in-process), in a
temporary folder with its own store."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from vgg_ablation.commands.cli import main
from vgg_ablation.data.datasets import SAMPLE_ROOT

# Tiny but real: a few batches of the embedded sample through the real trainer and store.
TINY = [
    "model.width=0.0625",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=2",
    "data.batch_size=32",
    "trainer.progress_bar=false",
    # one cell at a time, as the tests were written: a study's default on a CPU (a cell per core,
    # side by side) has its own test (test_study.py)
    "study.parallel=off",
]


CLI = [sys.executable, "-m", "vgg_ablation"]
# The suite runs in parallel (pytest-xdist, a worker per core): each process, the CLI's included,
# trains on one thread. Two processes of two OpenMP threads each on 2 cores spin-wait on each
# other and ran 5-20x slower here (a 16 s epoch took 4-6 minutes); waiting threads sleep instead.
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
os.environ.update({k: os.environ.get(k, v) for k, v in THREADS.items()})


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# Modules whose tests share a costly module-scoped fixture (the lab server, ~20 s to start; the
# dashboard's study, ~25 s; the archive tests' two machines' studies, ~60 s): each goes to one
# xdist worker whole, its tests one after another, so the fixture is made once. With each test handed out alone (as `--dist load` does), they spread
# over both workers and between other modules' tests, and the fixture was made 3 and 2 times.
ONE_WORKER_MODULES = {
    "tests/test_lab.py",
    "tests/test_dashboard.py",
    "tests/test_archive.py",
    "tests/test_slurm.py",
}


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist load`, except that a module in ONE_WORKER_MODULES is one unit of work. (xdist's own
    `--dist loadgroup` does this by a mark, but with pytest 9.2 it silently groups nothing:
    pytest-xdist issue #1386.) Units go out in the collection's order, the largest first."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in ONE_WORKER_MODULES else nodeid

    return SharedFixtureScheduling(config, log)


def pytest_collection_modifyitems(items):
    """The longest tests first, then the other slow ones, then the rest (a stable sort: files keep
    their order within each group). The suite is CPU-bound on 2 workers: a 2-minute test that
    starts last runs alone on one core at the end, while one that starts first has the short
    tests beside it."""
    items.sort(
        key=lambda item: 0 if item.get_closest_marker("long") else 1 if item.get_closest_marker("slow") else 2
    )


def cli_env(extra: dict | None = None) -> dict:
    """The caller's environment without any MLflow setting (each test picks its own store)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**environment, "PYTHONUNBUFFERED": "1", **(extra or {})}


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 600):
    return subprocess.run(
        [*CLI, *args],
        cwd=cwd,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class Said:
    returncode: int
    stdout: str
    stderr: str


def cli_in_process(args: list[str], cwd: Path, monkeypatch, env: dict | None = None) -> Said:
    """The CLI's `main` in this process, from `cwd`, with `env` (as `run_cli`'s): the whole
    command's path, exit code and output, without a fresh process's ~6 CPU-s of importing torch,
    Lightning and MLflow. For refusals, and for runs and studies whose records and output are what
    a test checks (a study's sweep is still a process of its own, its output captured with the
    study's); what a process does (signals, exit codes of a real start, launches side by side)
    takes `run_cli`.
    What a command changes for the rest of its process is put back: the environment (Lightning's
    seed variables, MLflow's settings), sys.argv (Hydra reads it), the root logger (Hydra's job
    logging), the SIGINT/SIGTERM handlers and torch's deterministic-algorithms flag, so the next
    test in this worker starts as it would have."""
    monkeypatch.chdir(cwd)
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(key)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    import torch

    saved_env, saved_argv = dict(os.environ), list(sys.argv)
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        with captured_output() as said:
            try:
                code = main(args)
            except SystemExit as exc:  # the task exits as the process would
                code = exc.code
    finally:
        for key in set(os.environ) - set(saved_env):
            del os.environ[key]
        os.environ.update({k: v for k, v in saved_env.items() if os.environ.get(k) != v})
        sys.argv[:] = saved_argv
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for signum, handler in saved_signals.items():
            signal.signal(signum, handler)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    return Said(int(code or 0), said.stdout, said.stderr)


@contextlib.contextmanager
def captured_output():
    """This process's stdout and stderr, and those of the processes it starts (a study's sweep
    writes to the file descriptors it inherits), each into one file in the order written, as a
    terminal would show them: the `Said` yielded is filled in on exit. Python's own streams write
    to the same descriptors, line by line, so its lines and a child's do not change places."""
    said = Said(0, "", "")
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.ExitStack() as stack:
        files = {fd: stack.enter_context(tempfile.TemporaryFile()) for fd in (1, 2)}
        for fd in files:  # put back last, after the streams below are flushed
            stack.callback(os.close, saved := os.dup(fd))
            stack.callback(os.dup2, saved, fd)
        for fd, file in files.items():
            os.dup2(file.fileno(), fd)
        out, err = (
            stack.enter_context(open(fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False))
            for fd in files
        )
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                yield said
        finally:
            out.flush()
            err.flush()
            texts = {}
            for fd, file in files.items():
                file.seek(0)
                texts[fd] = file.read().decode("utf-8", errors="replace")
            said.stdout, said.stderr = texts[1], texts[2]


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory) -> Path:
    """One user cache for the whole run, every worker's processes included, as on a user's
    machine: the sample is decoded once, then read back (datasets.decoded); nothing is written to
    the real ~/.cache."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "user-cache"
    os.environ["XDG_CACHE_HOME"] = str(root)
    return root


@pytest.fixture(scope="session")
def created_store(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store as MLflow creates it (its schema migrated), made once per
    test process. Creating one runs MLflow's ~60 migrations: 2-6 s of a test's time, spent again
    by every test in a new folder. Tests about that creation itself are marked `fresh_store`."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("created-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments(max_results=1)
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "mlflow.db"
    ]  # one file, whole: a copy is the store
    return path


@pytest.fixture
def workdir(tmp_path: Path, request, created_store: Path) -> Path:
    """The folder a test's commands run in, its default store already created (an empty one),
    unless the test is marked `fresh_store`."""
    if request.node.get_closest_marker("fresh_store") is None:
        shutil.copyfile(created_store, tmp_path / "mlflow.db")
    return tmp_path


def store_uri(cwd: Path) -> str:
    return f"sqlite:///{cwd / 'mlflow.db'}"


def all_runs(cwd: Path):
    """Every run in the folder's default store (empty when there is no store)."""
    if not (cwd / "mlflow.db").exists():
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store_uri(cwd))
    runs = []
    for exp in client.search_experiments():
        runs += client.search_runs([exp.experiment_id])
    return [r for r in runs if "study_run" not in r.data.tags]  # cells; a study's own run aside


def study_runs(cwd: Path):
    """The studies' own (parent) runs in the folder's default store."""
    if not (cwd / "mlflow.db").exists():
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store_uri(cwd))
    return [
        r for exp in client.search_experiments() for r in client.search_runs([exp.experiment_id])
        if "study_run" in r.data.tags
    ]  # fmt: skip


def assert_children_of_one_study(cwd: Path, status: str = "FINISHED"):
    """Exactly one study run, in `status`, and every cell a child of it."""
    (parent,) = study_runs(cwd)
    assert parent.info.status == status
    cells = all_runs(cwd)
    assert cells and all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in cells)
    return parent


def make_imagefolder(
    root: Path, classes=("cat", "dog"), per_class: int = 6, split_names=("train", "val")
) -> Path:
    """A small ImageNet-layout folder of real CIFAR images copied from the sample."""
    for split in split_names:
        for cls in classes:
            target = root / split / cls
            target.mkdir(parents=True, exist_ok=True)
            for src in sorted((SAMPLE_ROOT / "train" / cls).glob("*.jpg"))[:per_class]:
                shutil.copy(src, target / src.name)
    return root

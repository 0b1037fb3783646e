"""Crashes, failures, concurrent writers, a tracking-server outage: nothing lost, nothing doubled."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from vgg_ablation.commands.dashboard import free_port
from vgg_ablation.tracking.labserver import server_env
from vgg_ablation.tracking.stores import answers, experiment_name, pid_alive, raced_by
from vgg_ablation.training.cell_run import RACE_HOLD_ENV

from .conftest import (
    CLI,
    TINY,
    all_runs,
    assert_children_of_one_study,
    cli_env,
    cli_in_process,
    run_cli,
    store_uri,
)

pytestmark = pytest.mark.slow

# Long enough to be caught mid-run: 6 epochs of 12 batches per cell.
LONGER = [a for a in TINY if not a.startswith(("trainer.max_epochs", "trainer.limit_train"))] + [
    "trainer.max_epochs=6",
    "trainer.limit_train_batches=12",
]


def popen_cli(args, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, *args],
        cwd=cwd,
        env=cli_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the kill reaches the sweep's jobs too
    )


def migrated_client(workdir: Path) -> MlflowClient | None:
    """A client on the folder's store once the CLI has created it, or None. Opened under the
    CLI's own store lock: opening a fresh SQLite store while the CLI migrates it races."""
    from filelock import FileLock

    if not (workdir / "mlflow.db").exists():
        return None
    with FileLock(str(workdir / "mlflow.db.lock"), timeout=300):
        client = MlflowClient(store_uri(workdir))
        client.search_experiments(max_results=1)
    return client


def wait_for_checkpointed_running_run(
    store: Path | MlflowClient, proc: subprocess.Popen, timeout: float = 600, arch=None, seed=None
):
    """A run (of `arch` and `seed`, if given) that is RUNNING and has written at least one epoch's
    checkpoint. `store`: the folder whose default store the CLI creates, or a client on a running
    server. With several processes on one store, name the cell: any RUNNING run would do otherwise."""
    deadline = time.time() + timeout
    client = store if isinstance(store, MlflowClient) else None
    workdir = store if isinstance(store, Path) else None
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        client = client or migrated_client(workdir)  # workdir is set whenever client is None
        if client is None:
            time.sleep(0.2)
            continue
        try:
            for exp in client.search_experiments():
                for run in client.search_runs([exp.experiment_id]):
                    ckpt = Path(run.data.tags.get("checkpoint_dir", "/none")) / "last.ckpt"
                    wanted = (arch is None or run.data.tags.get("arch") == arch) and (
                        seed is None or run.data.tags.get("seed") == str(seed)
                    )
                    if wanted and run.info.status == "RUNNING" and ckpt.is_file():
                        return run
        except Exception:  # the store is being created or migrated
            pass
        time.sleep(0.2)
    raise AssertionError("no run reached its first checkpoint in time")


def by_cell(runs):
    cells: dict[str, list] = {}
    for run in runs:
        cells.setdefault(run.data.tags["cell"], []).append(run)
    return cells


def sigkill_mid_cell(study: list[str], workdir: Path, arch: str = "B"):
    """Start `study`, SIGKILL its whole process group once a cell of `arch` has checkpointed an
    epoch; returns that cell's run (as it was just before the kill), once the cell's process is
    gone (reaped: until then its pid still answers, and the run would look alive)."""
    proc = popen_cli(study, workdir)
    victim = wait_for_checkpointed_running_run(workdir, proc, arch=arch)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    proc.stdout.close()
    deadline = time.time() + 30
    while pid_alive(int(victim.data.tags["pid"])):
        assert time.time() < deadline, "the killed cell's process is still there after 30 s"
        time.sleep(0.05)
    return victim


def val_epochs(workdir: Path, run_id: str) -> set[int]:
    """The epochs recorded in a run's validation curve."""
    return {m.step for m in MlflowClient(store_uri(workdir)).get_metric_history(run_id, "val/acc1")}


def test_a_run_a_killed_opening_left_without_params_is_completed_by_the_rerun(workdir, monkeypatch):
    """A cell killed between creating its run and recording its params (the cell beside a Ctrl-C'd
    one, stopped by its launcher mid-opening): the rerun takes the run over and records what the
    opening had not, so the finished run names its seed and a study's report counts it."""
    from vgg_ablation.config import compose
    from vgg_ablation.study.cells import cell_key

    args = ["arch=A", "seed=4", *TINY]
    cfg = compose(args)
    client = MlflowClient(store_uri(workdir))
    experiment = client.create_experiment(experiment_name(cfg))
    left = client.create_run(experiment, tags={"cell": cell_key(cfg), "arch": "A", "seed": "4"}).info.run_id
    client.set_terminated(left, "KILLED")
    out = cli_in_process(["train", *args], workdir, monkeypatch)
    assert out.returncode == 0, out.stderr[-3000:]
    run = client.get_run(left)
    assert run.info.status == "FINISHED" and run.data.params["seed"] == "4" and run.data.params["arch"] == "A"
    assert run.data.tags["checkpoint_dir"].endswith(left) and run.inputs.dataset_inputs
    assert [r.info.run_id for r in client.search_runs([experiment])] == [left]


@pytest.mark.long
def test_sigkill_mid_run_then_rerun_resumes_the_same_run(workdir, monkeypatch):
    study = ["study", "experiment=smoke", *LONGER]
    victim = sigkill_mid_cell(study, workdir)
    assert MlflowClient(store_uri(workdir)).get_run(victim.info.run_id).info.status == "RUNNING"
    # Left RUNNING by a dead process: shown as such, never counted as a result.
    report = cli_in_process(["report", "experiment=smoke", *LONGER], workdir, monkeypatch)
    assert report.returncode == 0, report.stderr[-2000:]
    text = (workdir / "reports" / "smoke.md").read_text()
    assert f"`{victim.info.run_id[:8]}` | B | " in text and "RUNNING (orphaned: its process is gone)" in text

    again = cli_in_process(study, workdir, monkeypatch)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    runs = all_runs(workdir)
    cells = by_cell(runs)
    assert len(cells) == 4 and all(len(r) == 1 for r in cells.values())  # none lost, none doubled
    assert all(r.info.status == "FINISHED" for r in runs)
    resumed = MlflowClient(store_uri(workdir)).get_run(victim.info.run_id)
    assert resumed.info.status == "FINISHED"  # the same run, continued
    assert f"resume {victim.data.tags['cell']}: run {victim.info.run_id} from " in again.stderr + again.stdout
    assert val_epochs(workdir, victim.info.run_id) == set(range(6))
    # the taken-over run keeps its study: one study run, FINISHED with its last cell
    assert resumed.data.tags["mlflow.parentRunId"] == assert_children_of_one_study(workdir).info.run_id


@pytest.mark.long
def test_a_cut_last_checkpoint_never_blocks_its_cell(workdir, monkeypatch):
    study = ["study", "experiment=smoke", *LONGER]
    victim = sigkill_mid_cell(study, workdir)
    last = Path(victim.data.tags["checkpoint_dir"]) / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # what a kill or a full disk mid-write leaves
    again = cli_in_process(study, workdir, monkeypatch)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    cells = by_cell(all_runs(workdir))
    assert len(cells) == 4 and all(len(r) == 1 for r in cells.values())  # none lost, none doubled
    resumed = MlflowClient(store_uri(workdir)).get_run(victim.info.run_id)
    assert resumed.info.status == "FINISHED"  # the same run, finished
    recovery = resumed.data.tags["checkpoint_recovery"]
    assert recovery.startswith("last.ckpt does not load") and "last.ckpt.damaged" in recovery
    assert "resumed from best.ckpt" in recovery or "restarts from epoch 0" in recovery
    assert f"warning: {victim.data.tags['cell']}: last.ckpt does not load" in again.stderr
    assert val_epochs(workdir, victim.info.run_id) == set(range(6))


def test_diverging_runs_are_recorded_failed_and_the_sweep_goes_on(workdir, monkeypatch):
    out = cli_in_process(["study", "experiment=smoke", "optim.lr=1e12", *TINY], workdir, monkeypatch)
    assert out.returncode == 1
    runs = all_runs(workdir)
    assert len(runs) == 4  # every cell was tried: one failure does not stop the sweep
    for run in runs:
        assert run.info.status == "FAILED"
        assert run.data.tags["failure_reason"].startswith("NonFiniteLoss: loss became")
    assert "summary: 4 FAILED" in out.stdout
    assert "A seed=0: FAILED NonFiniteLoss" in out.stdout
    assert_children_of_one_study(workdir, status="FAILED")  # the study's run follows its cells


def test_sigterm_checkpoints_marks_killed_and_exits_nonzero_then_resumes(workdir, monkeypatch):
    study = ["study", "experiment=smoke", *LONGER]
    proc = popen_cli(study, workdir)
    victim = wait_for_checkpointed_running_run(workdir, proc)
    os.kill(int(victim.data.tags["pid"]), signal.SIGTERM)  # what a cluster sends before preempting
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode not in (0, None), output[-2000:]
    assert "run the same command again to resume" in output
    killed = MlflowClient(store_uri(workdir)).get_run(victim.info.run_id)
    assert killed.info.status == "KILLED"
    assert killed.data.tags["failure_reason"].startswith("SIGTERM received")
    assert (Path(killed.data.tags["checkpoint_dir"]) / "last.ckpt").is_file()

    again = cli_in_process(study, workdir, monkeypatch)
    assert again.returncode == 0, again.stderr[-3000:]
    cells = by_cell(all_runs(workdir))
    assert len(cells) == 4 and all(len(r) == 1 and r[0].info.status == "FINISHED" for r in cells.values())


@pytest.mark.parametrize("parallel", ["off", "auto"], ids=["a cell at a time", "cells side by side"])
def test_ctrl_c_stops_a_study_in_one_line_marks_it_killed_and_the_rerun_resumes(
    workdir, monkeypatch, parallel
):
    """Ctrl-C mid-cell: one line, exit 130, the cell KILLED with its checkpoint, and the rerun
    resumes it into its own run; with cells side by side (joblib, a CPU's default) the launcher's
    wait is stopped too, without its traceback."""
    study = ["study", "experiment=smoke", *[a for a in LONGER if not a.startswith("study.parallel=")],
             f"study.parallel={parallel}"]  # fmt: skip
    proc = subprocess.Popen(
        [*CLI, *study], cwd=workdir, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own group, as a terminal's foreground job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background child ignores SIGINT
    )  # fmt: skip
    victim = wait_for_checkpointed_running_run(workdir, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole foreground group
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    label = f"{victim.data.tags['arch']} seed={victim.data.tags['seed']}"
    last = [line for line in err.strip().splitlines() if not line.startswith(("  warnings.warn", "/"))][-1]
    if parallel == "off":
        assert last == (f"study smoke stopped by Ctrl-C: {label} marked KILLED, last checkpoint kept; "
                        "run the same command again to resume"), err[-2000:]  # fmt: skip
    else:  # the cell beside it is named too
        assert last.startswith("study smoke stopped by Ctrl-C: ") and label in last, err[-2000:]
        assert last.endswith("marked KILLED, last checkpoint kept; run the same command again to resume")
    client = MlflowClient(store_uri(workdir))
    assert (Path(victim.data.tags["checkpoint_dir"]) / "last.ckpt").is_file()
    if parallel == "off":
        assert client.get_run(victim.info.run_id).info.status == "KILLED"
        assert_children_of_one_study(workdir, status="KILLED")
    else:  # joblib may kill a worker before its cell marks the run: left RUNNING, its process gone
        assert client.get_run(victim.info.run_id).info.status in ("KILLED", "RUNNING")

    again = cli_in_process(study, workdir, monkeypatch)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "sent 0 records" not in again.stderr
    cells = by_cell(all_runs(workdir))
    assert len(cells) == 4 and all(len(r) == 1 and r[0].info.status == "FINISHED" for r in cells.values())
    assert client.get_run(victim.info.run_id).info.status == "FINISHED"  # resumed into its own run


def test_sigterm_to_the_study_alone_stops_its_sweep_too(workdir):
    # `kill <pid>` of the study (a supervisor, a user): the cell still stops cleanly, no orphan
    study = ["study", "experiment=smoke", *LONGER]
    proc = popen_cli(study, workdir)
    victim = wait_for_checkpointed_running_run(workdir, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 143 and "Traceback" not in output, output[-3000:]
    assert "stopped by SIGTERM" in output.strip().splitlines()[-1]
    assert MlflowClient(store_uri(workdir)).get_run(victim.info.run_id).info.status == "KILLED"
    assert_children_of_one_study(workdir, status="KILLED")
    time.sleep(2)
    assert not any(str(victim.data.tags["pid"]) == line.split()[0] for line in
                   subprocess.run(["ps", "-eo", "pid"], capture_output=True, text=True).stdout.splitlines()[1:])  # fmt: skip


@pytest.mark.long
@pytest.mark.fresh_store
def test_two_studies_and_submitits_parallel_jobs_share_one_fresh_default_store(workdir):
    first = popen_cli(["study", "experiment=smoke", "study.name=left", *TINY], workdir)
    second = popen_cli(
        [
            "study",
            "experiment=smoke",
            "study.name=right",
            "hydra/launcher=submitit_local",  # parallel jobs (joblib: the lab server's test)
            *TINY,
        ],
        workdir,
    )
    outputs = [p.communicate(timeout=600)[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert not any("database is locked" in o for o in outputs)
    runs = all_runs(workdir)
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs)
    assert sorted({r.data.tags["study"] for r in runs}) == ["left", "right"]
    assert all(len(cell) == 1 for cell in by_cell(runs).values())
    assert list(Path(workdir, "multirun", "right").rglob(".submitit"))  # its jobs ran through submitit


def start_server(folder: Path, port: int, env: dict | None = None) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--backend-store-uri",
            f"sqlite:///{folder / 'server.db'}",
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=folder,
        env={**server_env(), **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 90
    while time.time() < deadline:
        if answers(f"http://127.0.0.1:{port}"):
            return proc
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("mlflow server did not come up")


# Epochs of well under a second, 25 of them: the outage test holds the run at epoch HELD_AT until
# its server is back, so however fast or loaded the machine, training outlasts the outage.
OUTAGE_RUN = [a for a in TINY if not a.startswith(("trainer.max_epochs", "trainer.limit_train"))] + [
    "trainer.max_epochs=25",
    "trainer.limit_train_batches=30",
    "logger.system_metrics_interval=2",
]
HELD_AT = 20


def history(client: MlflowClient, run_id: str, key: str) -> list:
    return sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))


def assert_each_step_once(client: MlflowClient, run_id: str, key: str, steps: int) -> list:
    """The metric's curve holds steps 0..steps-1, each exactly once, made in the order of its steps."""
    curve = history(client, run_id, key)
    assert [m.step for m in curve] == list(range(steps)), (key, [m.step for m in curve])
    assert [m.timestamp for m in curve] == sorted(m.timestamp for m in curve)
    return curve


@pytest.mark.long
def test_a_tracking_server_away_for_30_s_costs_no_training_and_no_metric(workdir):
    """The server is killed mid-run and restarted 30 s later on the same store: training never
    stops, what was made meanwhile arrives afterwards, each value once, and the run FINISHES.
    (The run waits at epoch HELD_AT until the server is back: with epochs this short it would
    otherwise end inside the outage and wait for the store there, which is another test's case.)"""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(workdir, port)
    release = workdir / "server-back"
    try:
        started = time.time()
        proc = popen_cli(["train", "arch=A", *OUTAGE_RUN], workdir,
                         {"MLFLOW_TRACKING_URI": uri, "VGG_ABLATION_HOLD_EPOCH": f"{HELD_AT}:{release}"})  # fmt: skip
        victim = wait_for_checkpointed_running_run(MlflowClient(uri), proc)
        while len(MlflowClient(uri).get_metric_history(victim.info.run_id, "val/acc1")) < 5:
            time.sleep(0.2)  # a few epochs at the pace with the server there
        os.killpg(server.pid, signal.SIGKILL)  # the server goes away mid-run, without a word
        server.wait(10)
        away = time.time()
        time.sleep(30)
        assert proc.poll() is None, "training stopped while the server was away"
        server = start_server(workdir, port)  # back, with its store intact
        back = time.time()
        release.touch()
        output, _ = proc.communicate(timeout=600)
        wall = time.time() - started
        assert proc.returncode == 0, output[-3000:]
        assert "not answering" in output and "answering again" in output
        assert "Traceback" not in output

        client = MlflowClient(uri)
        run = client.get_run(victim.info.run_id)
        assert run.info.status == "FINISHED"
        assert [r.info.run_id for r in client.search_runs([victim.info.experiment_id])] == [
            victim.info.run_id
        ]
        val = assert_each_step_once(client, run.info.run_id, "val/acc1", 25)
        # training went on while the server was away: epochs were made then, and sent later
        made_while_away = [m.step for m in val if away * 1000 < m.timestamp < back * 1000]
        assert len(made_while_away) >= 5 and made_while_away[-1] < HELD_AT, made_while_away
        # ... at the pace it trained before: no call waited on the missing server. A call that
        # waited would cost MLflow's retries, seconds per epoch; the 0.5 s slack is for a machine
        # whose other work speeds and slows these sub-second epochs (CI measured 0.56 s -> 0.86 s)
        epoch_seconds = np.diff([m.timestamp / 1000 for m in val])
        before = np.median(epoch_seconds[: made_while_away[0] - 1])
        while_away = np.median(epoch_seconds[made_while_away[0] : made_while_away[-1]])
        assert while_away < 1.5 * before + 0.5, (before, while_away)
        system = history(client, run.info.run_id, "system/cpu_utilization_percentage")
        assert [m.step for m in system] == list(range(len(system)))
        assert any(away * 1000 < m.timestamp < back * 1000 for m in system)
        assert not (Path(run.data.tags["checkpoint_dir"]) / "outbox.jsonl").exists()
        # what the outage cost this run, as the run measured it: under 5% of its wall time
        cost, seconds = run.data.metrics["time/tracking_seconds"], run.data.metrics["time/seconds"]
        assert cost < 0.05 * seconds, (cost, seconds)
        assert cost < 2.0, cost  # and in seconds: the held wait is the test's, not tracking's
        assert run.data.metrics["time/store_outage_seconds"] >= 30
        print(
            f"outage run: {wall:.0f} s wall, {seconds:.0f} s recorded, tracking cost {cost:.2f} s; "
            f"{len(made_while_away)} epochs made while away, median {while_away:.2f} s (before: {before:.2f} s)"
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)


@pytest.mark.long
def test_a_run_whose_server_never_returns_keeps_its_metrics_and_says_how_to_send_them(workdir):
    """Two cells lose their server for good: each ends with one line and its records on disk.
    Once a server is back, one is sent with the printed command, the other by re-running it."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(workdir, port)
    env = {"MLFLOW_TRACKING_URI": uri}
    cells = {seed: ["train", "arch=A", f"seed={seed}", *LONGER, "logger.outage_wait=2"] for seed in (0, 1)}
    try:
        procs = {seed: popen_cli(args, workdir, env) for seed, args in cells.items()}
        client = MlflowClient(uri)
        runs = {  # each cell's own run: either would do for both otherwise
            seed: wait_for_checkpointed_running_run(client, proc, arch="A", seed=seed)
            for seed, proc in procs.items()
        }
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
        outputs = {seed: proc.communicate(timeout=300)[0] for seed, proc in procs.items()}
        for seed, proc in procs.items():
            assert proc.returncode == 1, outputs[seed][-3000:]
            last = outputs[seed].strip().splitlines()[-1]
            assert "trained" in last and "not recorded" in last and "Traceback" not in outputs[seed]
            assert (Path(runs[seed].data.tags["checkpoint_dir"]) / "outbox.jsonl").exists()

        server = start_server(workdir, port)
        # an archive made now would lack those records: the export says so, and how to send them
        name = client.get_experiment(runs[0].info.experiment_id).name.removeprefix("vgg-ablation/")
        early = run_cli(["export", f"study.name={name}", "archive.out=early.tar.gz"], workdir, env)
        assert early.returncode == 0, early.stderr[-3000:]
        warning = early.stderr.strip().splitlines()[-1]
        assert warning.startswith("warning: 2 run(s) kept records while their tracking store was away"), (
            warning
        )
        assert all(f"{runs[seed].data.tags['checkpoint_dir']}/outbox.jsonl" in warning for seed in runs)
        command = outputs[0].strip().splitlines()[-1].split("send them with: ")[1].split()
        assert command[:2] == ["vgg-ablation", "sync"]
        sent = run_cli(command[1:], workdir, env)  # the printed command, as typed
        assert sent.returncode == 0 and "sent" in sent.stdout, sent.stderr[-3000:]
        rerun = run_cli(cells[1], workdir, env)  # the other cell: its re-run sends them itself
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert "a previous attempt kept" in rerun.stderr and "already FINISHED" in rerun.stdout

        for seed, run in runs.items():
            after = client.get_run(run.info.run_id)
            assert after.info.status == "FINISHED", seed
            assert_each_step_once(client, run.info.run_id, "val/acc1", 6)
            assert "test/acc1" in after.data.metrics
            assert not (Path(run.data.tags["checkpoint_dir"]) / "outbox.jsonl").exists()
        assert len(client.search_runs([runs[0].info.experiment_id])) == 2
        later = run_cli(["export", f"study.name={name}", "archive.out=later.tar.gz"], workdir, env)
        assert later.returncode == 0 and "warning" not in later.stderr, later.stderr[-3000:]

        # A store that dies while a cell opens its run (held where it has found no run, its
        # experiment created, until the server is dead): one line, exit 1, nothing trained.
        # (MLflow's own retries, minutes of backoff before the outbox takes over, are off: the
        # line, not the wait, is tested.)
        hold = workdir / "opening-hold"
        opening = popen_cli(["train", "arch=A", "seed=2", "study.name=opening", *TINY], workdir,
                            {**env, RACE_HOLD_ENV: str(hold), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})  # fmt: skip
        held_then_released(hold, [opening], 1, meanwhile=lambda: os.killpg(server.pid, signal.SIGKILL))
        said = opening.communicate(timeout=300)[0]
        assert opening.returncode == 1, said[-3000:]
        assert said.strip().splitlines()[-1].startswith("error: A seed=2: the tracking store"), said[-3000:]
        assert "stopped answering while this cell opened its run" in said and "Traceback" not in said
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)


def test_unreachable_tracking_uri_is_refused_before_training(workdir, monkeypatch):
    out = cli_in_process(
        ["study", "experiment=smoke", *TINY],
        workdir,
        monkeypatch,
        env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "error: MLflow tracking server unreachable: http://127.0.0.1:9 (start it, or unset MLFLOW_TRACKING_URI)"
    )


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoints_load_weights_only(workdir, monkeypatch):
    """A tampered checkpoint in a resumable run's folder must not execute code on resume (in a
    fresh process, as a user's re-run would load it)."""
    first = cli_in_process(
        ["train", "arch=A", "optim.lr=1e12", *TINY], workdir, monkeypatch
    )  # FAILED, checkpoints kept
    (run,) = all_runs(workdir)
    assert run.info.status == "FAILED"
    ckpt_dir = Path(run.data.tags["checkpoint_dir"])
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "payload": _Exploit()}, ckpt_dir / "last.ckpt")
    again = run_cli(["train", "arch=A", "optim.lr=1e12", *TINY], workdir)
    assert again.returncode != 0 and first.returncode != 0
    assert not (workdir / "pwned").exists()
    assert "Weights only load failed" in (again.stdout + again.stderr) or "weights_only" in (
        again.stdout + again.stderr
    )


def test_dashboard_binds_to_loopback_by_default_and_stops_with_its_command(workdir):
    port = free_port()

    def listening() -> list[str]:
        rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
        return [cols[1] for cols in rows if cols[3] == "0A" and int(cols[1].split(":")[1], 16) == port]

    proc = popen_cli(["ui", f"port={port}"], workdir)
    try:
        deadline = time.time() + 300  # a hang guard: MLflow's server took over 90 s to listen under load here
        while not listening():
            assert proc.poll() is None and time.time() < deadline, "the dashboard never listened"
            time.sleep(0.3)
        assert listening() == ["0100007F:" + f"{port:04X}"]  # 127.0.0.1 only, not 0.0.0.0
    finally:
        proc.send_signal(signal.SIGTERM)  # `ui` stops the MLflow server it started, then exits
        code = proc.wait(60)  # a hang guard: `ui` gives the server 5 s, then kills it
        proc.stdout.close()
    assert code == 128 + signal.SIGTERM
    time.sleep(1)
    assert not listening(), "the MLflow server outlived `vgg-ablation ui`"


def held_then_released(
    hold: Path, procs: list[subprocess.Popen], arrivals: int, meanwhile=None, release: bool = True
) -> None:
    """Wait until `arrivals` of the processes have found no run for their cell and are held
    before creating one (cell_run.hold_here_for_tests), do `meanwhile`, then let them all go on
    (unless not `release`)."""
    deadline = time.time() + 300
    while len(list(hold.parent.glob(f"{hold.name}.*"))) < arrivals:
        assert all(p.poll() is None for p in procs), [
            p.stdout.read()[-3000:] for p in procs if p.poll() is not None
        ]
        assert time.time() < deadline, "the launches never reached the moment before creating a run"
        time.sleep(0.1)
    if meanwhile:
        meanwhile()
    if release:
        hold.touch()


def launch_together(args: list[str], cwd: Path, env: dict, arrivals: int) -> list[str]:
    """Two identical launches, both held where they have found no run until `arrivals` of them
    are there; their outputs (both must exit 0)."""
    hold = cwd / "race-hold"
    procs = [popen_cli(args, cwd, {**env, RACE_HOLD_ENV: str(hold)}) for _ in range(2)]
    try:
        held_then_released(hold, procs, arrivals)
    finally:  # a launch that died before it got there fails the test: the other is not left held
        hold.touch()
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    return outputs


def landing_late(seed: int, cwd: Path, env: dict) -> tuple[str, str, list[str]]:
    """Two launches of one cell where the run stamped first lands second: the later-stamped one is
    let go first, creates its run alone and trains to its second epoch; then the earlier-stamped
    one creates its run (what a descheduled process, or a slow request to a server, does). Both
    are then let finish. Returns (first-stamped pid, second-stamped pid, both outputs by pid)."""
    procs = {}
    for name in ("one", "two"):
        hold = cwd / f"{name}-hold"
        env_one = {**env, RACE_HOLD_ENV: str(hold), "VGG_ABLATION_HOLD_EPOCH": f"1:{cwd / 'epoch-hold'}"}
        procs[name] = (hold, popen_cli(["train", "arch=A", f"seed={seed}", *TINY], cwd, env_one))
    everyone = [p for _, p in procs.values()]
    try:
        stamps = {}
        for hold, proc in procs.values():
            held_then_released(hold, everyone, 1, meanwhile=lambda: None, release=False)
            (arrived,) = hold.parent.glob(f"{hold.name}.*")
            stamps[proc.pid] = (int(arrived.read_text()), hold)
        early, late = sorted(stamps, key=lambda pid: stamps[pid][0])  # a tie: either order does
        stamps[late][1].touch()  # the later stamp creates its run first ...
        wait_for(cwd / "epoch-hold.held", everyone)  # ... and trains, alone, into its second epoch
        stamps[early][1].touch()  # the earlier stamp lands now
        wait_for_run_count(env, seed, 2, everyone)
    finally:
        for hold, _ in procs.values():
            hold.touch()
        (cwd / "epoch-hold").touch()
    outputs = {p.pid: p.communicate(timeout=300)[0] for p in everyone}
    assert [p.returncode for p in everyone] == [0, 0], outputs
    return early, late, outputs


def wait_for(path: Path, procs: list[subprocess.Popen]) -> None:
    deadline = time.time() + 300
    while not path.exists():
        assert all(p.poll() is None for p in procs), [p.stdout.read()[-3000:] for p in procs]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def wait_for_run_count(env: dict, seed: int, count: int, procs: list[subprocess.Popen]) -> None:
    client, deadline = MlflowClient(env["MLFLOW_TRACKING_URI"]), time.time() + 300
    while True:
        runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
                if r.data.tags.get("seed") == str(seed)]  # fmt: skip
        if len(runs) >= count:
            return
        assert all(p.poll() is None for p in procs), [p.stdout.read()[-3000:] for p in procs]
        assert time.time() < deadline, f"{count} runs of seed {seed} never appeared"
        time.sleep(0.1)


def test_which_of_two_raced_runs_keeps_the_cell(tmp_path):
    # The rule every look applies once both runs are in the store (a real SQLite store)
    import socket

    client = MlflowClient(store_uri(tmp_path))
    exp = client.create_experiment("race")
    here = {"cell": "c", "host": socket.gethostname()}

    def run(start: int, pid: int, status: str = "RUNNING") -> str:
        run_id = client.create_run(exp, start_time=start, tags={**here, "pid": str(pid)}).info.run_id
        if status != "RUNNING":
            client.set_terminated(run_id, status)
        return run_id

    mine, dead_pid = run(200, os.getpid()), 2**22 + 12345  # a pid no process has here
    assert raced_by(client, exp, "c", mine) is None  # alone
    killed, gone = run(100, os.getpid(), "KILLED"), run(101, dead_pid)
    assert raced_by(client, exp, "c", mine) is None  # earlier, but dead: they never take the cell
    earlier = run(150, os.getpid())
    assert raced_by(client, exp, "c", mine).info.run_id == earlier  # the earliest live one keeps it
    assert raced_by(client, exp, "c", earlier) is None
    finished = run(300, os.getpid(), "FINISHED")
    assert {raced_by(client, exp, "c", r).info.run_id for r in (mine, earlier)} == {finished}  # a result wins
    assert killed and gone


@pytest.mark.long
def test_two_launches_of_one_cell_at_the_same_instant_make_one_run(workdir):
    """On SQLite (the store's lock) and twice on one tracking server (create, then settle: the
    earliest run wins; first in a fresh server, then beside the first cell's experiment with the
    earlier create landing second, after the other launch has trained an epoch), each time a cell
    no run exists for yet. One SQLite case: a second would start from the same fresh folder, the
    same case again (two more processes, ~35 s of CPU)."""
    port = free_port()
    server = start_server(workdir, port)
    uri = f"http://127.0.0.1:{port}"
    try:
        # Both creates sent first, the later one landing after the other launch looked and found
        # itself alone: each judged itself the cell's run (the runs' start times order them, and
        # the client stamps those), once on a busy 2-core machine. The earlier-stamped run keeps
        # the cell; the other launch gives it up before recording its result.
        folder = workdir / "late"
        folder.mkdir()
        _, _, outputs = landing_late(1, folder, {"MLFLOW_TRACKING_URI": uri})
        client = MlflowClient(uri)
        both = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id],
                run_view_type=ViewType.ALL) if r.data.tags.get("seed") == "1"]  # fmt: skip
        keeper = min(
            both, key=lambda r: (r.info.start_time, r.info.run_id)
        )  # the earlier stamp (a tie: by id)
        (other,) = [r for r in both if r is not keeper]
        assert keeper.info.lifecycle_stage == "active" and keeper.info.status == "FINISHED", outputs
        assert (
            other.info.lifecycle_stage == "deleted" and not Path(other.data.tags["checkpoint_dir"]).exists()
        )
        kept, gave_up = outputs[int(keeper.data.tags["pid"])], outputs[int(other.data.tags["pid"])]
        assert "A seed=1: FINISHED in" in kept, kept
        assert f"by another live process (run {keeper.info.run_id}, launched in the same moment" in gave_up
        assert "FINISHED in" not in gave_up, gave_up

        for store, seed in (("sqlite", 0), ("server", 0)):
            folder = workdir / f"{store}{seed}"
            folder.mkdir()
            # On a server both launches find no run and are held there until both are: the race,
            # made certain. On SQLite the store's lock lets one decide at a time: one is held.
            env = {"MLFLOW_TRACKING_URI": uri} if store == "server" else {}
            arrivals = 2 if store == "server" else 1
            outputs = launch_together(["train", "arch=A", f"seed={seed}", *TINY], folder, env, arrivals)
            client = MlflowClient(uri if store == "server" else store_uri(folder))
            runs = [
                r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
                if r.data.tags.get("seed") == str(seed)
            ]  # fmt: skip
            assert len(runs) == 1 and runs[0].info.status == "FINISHED", (store, seed, outputs)
            trained = [o for o in outputs if f"A seed={seed}: FINISHED in" in o]
            stood_down = [o for o in outputs if "by another live process" in o or "already FINISHED" in o]
            assert len(trained) == 1 and len(stood_down) == 1, outputs
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)


WRITERS, BATCHES = 32, 20


@pytest.mark.fresh_store
@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_a_crowd_of_32_writers_loses_nothing(workdir, store):
    """32 processes at once (forked by one that imported MLflow: crowd_writer.py), each a run of
    20 batches x 10 metrics, into one fresh store: a new SQLite file (its creation raced by all
    32) or one `mlflow server`."""
    server = None
    if store == "server":
        port = free_port()
        # A limit found here: one server worker's default SQLAlchemy pool (5 + 10 overflow) answers
        # 32 concurrent writers with 400 "QueuePool limit ... reached" after 30 s, and the client
        # does not retry a 400: metrics lost. The pool must cover the writers.
        pool = {"MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": str(WRITERS), "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "8"}
        server = start_server(workdir, port, env=pool)
        uri = f"http://127.0.0.1:{port}"
    else:
        uri = store_uri(workdir)
    writer = Path(__file__).with_name("crowd_writer.py")
    env = cli_env({"PYTHONPATH": str(Path(__file__).parent.parent)})
    try:
        crowd = subprocess.run(
            [sys.executable, str(writer), uri, "crowd", str(WRITERS), str(BATCHES)],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )  # fmt: skip
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("crowd")
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        points = {r.data.tags["writer"]: len(client.get_metric_history(r.info.run_id, "m7")) for r in runs}
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
    assert crowd.returncode == 0, crowd.stderr[-3000:]  # zero errors
    assert sorted(crowd.stdout.split("\n")) == sorted(["", *(f"ok {k}" for k in range(WRITERS))]), (
        crowd.stdout
    )
    assert len(runs) == WRITERS and all(r.info.status == "FINISHED" for r in runs)
    assert points == {str(k): BATCHES for k in range(WRITERS)}  # zero lost (or doubled) metrics


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs: a disk that can really fill up (needs mount rights; root here)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write a filler file until the disk is full."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_fails_the_run_in_one_line_and_the_rerun_resumes(workdir, small_disk, monkeypatch):
    # long enough for the disk to fill while it trains (records no longer slow an epoch down)
    longer = [*LONGER, "trainer.max_epochs=30"]
    train = ["train", "arch=A", *longer, f"logger.checkpoint_root={small_disk / 'checkpoints'}"]
    # Training holds at epoch 2's start, its earlier checkpoints whole and renamed: the disk is
    # filled then. Filled while a checkpoint was between its write and its rename, the rename
    # would free the old file's space, every later checkpoint fitting in what the one before
    # left: the run FINISHED (seen under load, when that window is wide).
    release = workdir / "release"
    proc = popen_cli(train, workdir, {"VGG_ABLATION_HOLD_EPOCH": f"2:{release}"})
    while not Path(f"{release}.held").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    filler = fill(small_disk)  # the next epoch's checkpoint finds no space
    release.touch()
    (victim,) = all_runs(workdir)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, output[-3000:]
    assert "A seed=0: FAILED: OSError: [Errno 28] No space left on device" in output
    failed = MlflowClient(store_uri(workdir)).get_run(victim.info.run_id)
    assert failed.info.status == "FAILED" and "No space left on device" in failed.data.tags["failure_reason"]
    last = Path(failed.data.tags["checkpoint_dir"]) / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] >= 0  # what was written before is whole
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]  # no half-written file

    filler.unlink()  # space is back
    again = cli_in_process(train, workdir, monkeypatch)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    (run,) = all_runs(workdir)
    assert run.info.run_id == victim.info.run_id and run.info.status == "FINISHED"
    assert "checkpoint_recovery" not in run.data.tags  # the atomic write left nothing to recover
    assert val_epochs(workdir, run.info.run_id) == set(range(30))


def test_a_full_disk_under_the_store_keeps_training_and_the_records_until_there_is_space(
    workdir, small_disk, monkeypatch
):
    """The SQLite store's disk fills up mid-run (checkpoints elsewhere): training goes on, the run
    ends UNSENT with one line, what the store held is intact, and `sync` sends the rest once there
    is space again."""
    uri = f"sqlite:///{small_disk / 'mlflow.db'}"
    train = ["train", "arch=A", *LONGER, "trainer.max_epochs=30", "logger.outage_wait=3"]
    proc = popen_cli(train, workdir, {"MLFLOW_TRACKING_URI": uri})
    client = MlflowClient(uri)
    victim = None
    while victim is None:  # the store on the small disk exists once the run does
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        with contextlib.suppress(Exception):
            victim = wait_for_checkpointed_running_run(client, proc, timeout=1)
    filler = fill(small_disk)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("A seed=0: trained") and "disk is full" in last and "vgg-ablation sync" in last, (
        last
    )
    assert "Traceback" not in output, output[max(0, output.find("Traceback") - 1500) :][:2500]
    kept = Path(victim.data.tags["checkpoint_dir"]) / "outbox.jsonl"
    assert kept.exists()
    before = client.get_metric_history(victim.info.run_id, "val/acc1")  # readable, intact
    assert 1 <= len(before) < 30

    filler.unlink()  # space is back
    sent = cli_in_process(["sync", str(kept)], workdir, monkeypatch)
    assert sent.returncode == 0, sent.stderr[-3000:]
    run = client.get_run(victim.info.run_id)
    assert run.info.status == "FINISHED" and "test/acc1" in run.data.metrics
    assert_each_step_once(client, run.info.run_id, "val/acc1", 30)

"""A study on a real single-node SLURM cluster (tests/slurm_cluster.py: Debian's slurm-wlm and
munge; with and without accounting) through the project's launcher presets: a cell cancelled,
requeued, Ctrl-C, requests refused before submitting, a request the partition never starts."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vgg_ablation.errors import UserError
from vgg_ablation.runner import cluster

from . import slurm_cluster
from .conftest import TINY, all_runs, assert_children_of_one_study, run_cli, store_uri
from .test_reliability import LONGER, by_cell, popen_cli, val_epochs, wait_for_checkpointed_running_run

pytestmark = pytest.mark.slow
CPU = ["hydra/launcher=slurm-cpu", "hydra.launcher.mem_gb=1"]  # the CPU preset, sized for the test node


def start_cluster(folder: Path, accounting: bool = False) -> slurm_cluster.Cluster:
    """A real SLURM cluster (a second to start; about 8 s more with accounting); skipped (with
    why) where none can start, and a failure where CI installed SLURM (VGG_ABLATION_REQUIRE_SLURM)."""
    why = slurm_cluster.why_not(accounting)
    if why:
        if os.environ.get("VGG_ABLATION_REQUIRE_SLURM"):
            pytest.fail(f"SLURM is required here: {why}")
        pytest.skip(why)
    return slurm_cluster.Cluster(folder, accounting)


@pytest.fixture
def on_cluster(tmp_path_factory):
    """A cluster of this test's own (no accounting), its queue empty after the test."""
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    try:
        assert cluster.queue() == [], f"left in the queue: {cluster.queue()}"
    finally:
        cluster.stop()


def finish_output(proc, timeout: float = 600) -> str:
    output, _ = proc.communicate(timeout=timeout)
    return output


@pytest.mark.long
def test_a_scancelled_cell_ends_the_study_with_a_report_and_the_rerun_submits_only_that_cell(
    workdir, tmp_path_factory
):
    """A cell cancelled mid-run with `scancel`, on a cluster that keeps accounting: the study
    notices, says so in one line with sacct's state, lets the other cells finish, writes its
    report with what finished, exits 1, leaves nothing in the queue; the rerun submits only the
    cancelled cell, which resumes into its own run from its checkpoint, every epoch once."""
    on_cluster = start_cluster(tmp_path_factory.mktemp("slurm"), accounting=True)
    try:
        cancel_a_cell_then_rerun(workdir, on_cluster)
    finally:
        on_cluster.stop()


def test_a_cell_cancelled_where_the_cluster_keeps_no_accounting_is_said_and_the_study_ends(
    workdir, on_cluster
):
    """The same cancel where there is no `sacct` to ask: the study cannot tell why the task left
    the queue, and says that in one line; the other cells finish, the report is written, exit 1.
    (The task is cancelled while it waits its turn, one task running at a time: what happens after
    a cancel mid-run, and the rerun, the test above shows.)"""
    study = [
        "study",
        "experiment=smoke",
        "study.seeds=[0]",
        *CPU,
        "hydra.launcher.array_parallelism=1",
        *TINY,
    ]
    proc = popen_cli(study, workdir, on_cluster.env)
    deadline, waiting = time.time() + 120, []
    while time.time() < deadline and not waiting and proc.poll() is None:
        waiting = [t.split()[0] for t in on_cluster.queue() if " PENDING " in f"{t} "]
        time.sleep(0.2)
    assert waiting, on_cluster.queue()
    assert on_cluster.run("scancel", waiting[-1]).returncode == 0
    output = finish_output(proc)
    assert proc.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    said = [line for line in output.splitlines() if ": left the queue without a result" in line]
    assert len(said) == 1 and said[0].startswith(("A seed=", "B seed=")), output[-3000:]
    assert "summary: 1 FINISHED" in output and "report: reports/smoke.md" in output, output[-2000:]
    assert (workdir / "reports" / "smoke.md").exists()
    assert on_cluster.queue() == []


def cancel_a_cell_then_rerun(workdir: Path, on_cluster) -> None:
    study = ["study", "experiment=smoke", *CPU, *LONGER]
    proc = popen_cli(study, workdir, on_cluster.env)
    victim = wait_for_checkpointed_running_run(workdir, proc, arch="B")
    job = victim.data.tags["slurm_job"]  # which task trains it: where a user finds it too
    assert on_cluster.run("scancel", job).returncode == 0
    cancelled = time.time()
    output = finish_output(proc)
    assert proc.returncode == 1, output[-3000:]
    assert time.time() - cancelled < 300, output[-3000:]
    assert "Traceback" not in output and "Bypassing sacct error" not in output, output[-3000:]
    label = f"B seed={victim.data.params['seed']}"
    assert f"{label}: ended CANCELLED (sacct)" in output, output[-3000:]
    assert "[3/4" in output and "epoch 6/6" in output  # the cells' own progress, in the terminal
    assert "summary: 3 FINISHED, 1 KILLED" in output and "report: reports/smoke.md" in output, output[-2000:]
    assert (workdir / "reports" / "smoke.md").exists()
    client = MlflowClient(store_uri(workdir))
    assert client.get_run(victim.info.run_id).info.status == "KILLED"  # it heard the SIGTERM
    assert on_cluster.queue() == []

    again = run_cli(study, workdir, on_cluster.env, timeout=600)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-3000:]
    assert output.count("), not submitted\n") == 3, output[-3000:]
    assert ": 1 cell(s) (3 already FINISHED, not submitted)" in output, output[-3000:]
    runs = all_runs(workdir)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert all(len(cell) == 1 for cell in by_cell(runs).values())
    resumed = client.get_run(victim.info.run_id)
    assert resumed.info.status == "FINISHED" and int(resumed.data.tags["resumed_after_epochs"]) >= 1
    assert val_epochs(workdir, victim.info.run_id) == set(range(6))
    assert_children_of_one_study(workdir)


@pytest.mark.long
def test_a_requeued_cell_resumes_into_its_run(workdir, on_cluster):
    """SLURM's preemption with requeue (`scontrol requeue`: SIGTERM, back to the queue, started
    again): the study waits it out, and the requeued cell FINISHES once, in its own run, with every
    epoch once. One cell: others would only train beside it."""
    study = ["study", "experiment=smoke", "study.archs=[B]", "study.seeds=[0]", *CPU, *LONGER]
    proc = popen_cli(study, workdir, on_cluster.env)
    victim = wait_for_checkpointed_running_run(workdir, proc, arch="B")
    job = victim.data.tags["slurm_job"]
    assert on_cluster.run("scontrol", "requeue", job).returncode == 0
    # SLURM holds a requeued job back for about two minutes (BeginTime); a test need not wait
    deadline = time.time() + 60
    while time.time() < deadline and not any(t.startswith(f"{job} PENDING") for t in on_cluster.queue()):
        time.sleep(0.5)
    on_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    output = finish_output(proc)
    assert proc.returncode == 0, output[-3000:]
    runs = all_runs(workdir)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    resumed = MlflowClient(store_uri(workdir)).get_run(victim.info.run_id)
    assert int(resumed.data.tags["attempts"]) == 2
    assert val_epochs(workdir, victim.info.run_id) == set(range(6))
    assert "#SBATCH --cpus-per-task=1" in "".join(
        p.read_text() for p in Path(workdir).rglob("*submission*.sh")
    )


@pytest.mark.long
def test_ctrl_c_cancels_the_study_s_jobs_and_leaves_nothing_running(workdir, on_cluster):
    """Ctrl-C in the terminal (SIGINT to the study's process group) while a cell trains and others
    wait: every job of the study is cancelled, the running cell marks its run KILLED with its
    checkpoint kept, the study says so and exits 130, without a traceback."""
    # two CPUs per cell: the cell trains on both (SLURM_CPUS_PER_TASK), whatever the environment's
    # OMP_NUM_THREADS (1 in this suite) says
    study = ["study", "experiment=smoke", *CPU, "hydra.launcher.cpus_per_task=2", *LONGER]
    proc = popen_cli(study, workdir, on_cluster.env)
    victim = wait_for_checkpointed_running_run(workdir, proc, arch="B")
    assert victim.data.tags["cpu_threads"] == "2"
    os.killpg(proc.pid, signal.SIGINT)
    output = finish_output(proc, timeout=300)
    assert proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "stopping: cancelled the study's" in output, output[-3000:]
    assert on_cluster.queue() == []
    run = MlflowClient(store_uri(workdir)).get_run(victim.info.run_id)
    assert run.info.status == "KILLED" and any((workdir / "checkpoints" / run.info.run_id).glob("*.ckpt"))


def test_a_request_the_cluster_can_never_meet_is_refused_before_anything_is_submitted(
    workdir, on_cluster, monkeypatch
):
    """The GPU preset on a CPU-only cluster: one line, exit 2, nothing submitted, no traceback.
    More CPUs or memory than the node has, a partition that does not exist: the same check
    (`cluster.check_request`, asked here directly with what the preset would pass it) refuses
    each in one line."""
    result = run_cli(["study", "experiment=smoke", "hydra/launcher=slurm", *TINY], workdir, on_cluster.env)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    expected = (
        "partition 'cpu' has no GPU(s) per node and the preset asks for 1: use hydra/launcher=slurm-cpu"
    )
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert on_cluster.queue() == []

    for key, value in on_cluster.env.items():
        monkeypatch.setenv(key, value)
    cases = {
        (("cpus_per_task", 64),): "a cell asks for 64 CPUs and the largest node of partition 'cpu' has",
        (("mem_gb", 4096),): "a cell asks for 4096 GB",
        (("partition", "gpu"),): "no partition 'gpu' on this cluster (sinfo lists: cpu, short)",
    }  # fmt: skip
    for change, expected in cases.items():
        with pytest.raises(UserError) as refused:
            cluster.check_request({"cpus_per_task": 1, "mem_gb": 1, "partition": None, **dict(change)})
        assert expected in str(refused.value) and "\n" not in str(refused.value)
    cluster.check_request({"cpus_per_task": 1, "mem_gb": 1, "partition": None})  # what fits, passes
    assert on_cluster.queue() == []


def test_a_cell_the_partition_can_never_start_is_cancelled_and_said(workdir, on_cluster):
    """A time limit above the partition's: SLURM would keep the cells pending for good
    (PartitionConfig, as SLURM 22.05 words it); the study cancels them, says why per cell, and ends."""
    result = run_cli(["study", "experiment=smoke", *CPU, "hydra.launcher.partition=short",
                      "hydra.launcher.timeout_min=5", *TINY], workdir, on_cluster.env, timeout=300)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output[-3000:]
    assert "A seed=0: cannot start in this partition (PartitionConfig" in output, output[-3000:]
    assert on_cluster.queue() == []

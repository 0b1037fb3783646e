"""Beyond one process: a study through Hydra's submitit launcher and its real SLURM executor,
driven against stand-in sbatch/sacct/scancel/scontrol/srun (tests/fake_slurm.py), and cells on two
DDP processes. (submitit's local executor: test_reliability's two-studies test.)"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from . import fake_slurm
from .conftest import TINY, all_runs, assert_children_of_one_study, cli_in_process, run_cli, store_uri
from .test_reliability import LONGER, by_cell, popen_cli, val_epochs, wait_for_checkpointed_running_run

pytestmark = pytest.mark.slow


@pytest.fixture
def slurm(tmp_path):
    """Stand-in SLURM commands first on PATH; returns their state folder."""
    state = tmp_path / "slurm-state"
    fake_slurm.install(tmp_path / "slurm-bin")
    return state, {"PATH": f"{tmp_path / 'slurm-bin'}:{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state)}


@pytest.mark.long
def test_a_study_on_slurm_where_a_preempted_cell_resumes_into_its_run(workdir, slurm):
    """The `slurm` launcher preset submits one array job through the real submitit SLURM executor;
    one cell is preempted mid-run (SIGTERM, then requeued, as SLURM does): every cell FINISHED,
    one run each, and the preempted one resumed into its own run with every epoch once."""
    state, env = slurm
    study = ["study", "experiment=smoke", "hydra/launcher=slurm", "hydra.launcher.partition=test", *LONGER]
    proc = popen_cli(study, workdir, env)
    victim = wait_for_checkpointed_running_run(workdir, proc, arch="B")
    task = next(p for p in state.glob("*.pid") if victim_is_in(p, victim))
    (state / f"{task.stem}.requeue").touch()  # SLURM's preemption with requeue: SIGTERM, then again
    os.killpg(int(task.read_text()), signal.SIGTERM)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    runs = all_runs(workdir)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert all(len(cell) == 1 for cell in by_cell(runs).values())
    resumed = next(r for r in runs if r.info.run_id == victim.info.run_id)
    assert val_epochs(workdir, resumed.info.run_id) == set(range(6))
    attempts = {p.stem: len(p.read_text().split()) for p in state.glob("*.attempts")}
    assert attempts[task.stem] == 2 and sorted(attempts.values()) == [1, 1, 1, 2]  # requeued once
    assert_children_of_one_study(workdir)
    assert "#SBATCH --partition=test" in "".join(
        p.read_text() for p in Path(workdir).rglob("*submission*.sh")
    )


def victim_is_in(pid_file: Path, victim) -> bool:
    """Is the victim's training process in this task's process group?"""
    try:
        return os.getpgid(int(victim.data.tags["pid"])) == int(pid_file.read_text())
    except (ProcessLookupError, ValueError):
        return False


@pytest.mark.long
def test_ddp_on_two_cpu_processes_records_each_cell_once_and_never_hangs(workdir, monkeypatch):
    """10 cells with trainer.devices=2 (gloo) in one study: each cell starts its second rank and
    tears its process group down; every cell one FINISHED run with the metrics of a one-process
    run, summed over both ranks' images; no rank aborts at exit, nothing hangs."""
    single = cli_in_process(["train", "study.name=one", *TINY], workdir, monkeypatch)  # the 1-process shape
    assert single.returncode == 0, single.stderr[-3000:]
    seeds = ",".join(map(str, range(10)))
    study = ["study", "experiment=smoke", "study.name=ddp", "study.archs=[A]", f"study.seeds=[{seeds}]",
             "trainer.devices=2", *TINY]  # fmt: skip
    result = run_cli(study, workdir, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "terminate called" not in output and "Traceback" not in output

    (one,) = [r for r in all_runs(workdir) if r.data.tags["study"] == "one"]
    runs = [r for r in all_runs(workdir) if r.data.tags["study"] == "ddp"]
    assert len(runs) == 10 and all(r.info.status == "FINISHED" for r in runs)
    assert all(len(cell) == 1 for cell in by_cell(runs).values())
    client = MlflowClient(store_uri(workdir))

    def shape(run) -> dict:
        keys = sorted(k for k in run.data.metrics if not k.startswith(("system/", "time/")))
        return {k: sorted(m.step for m in client.get_metric_history(run.info.run_id, k)) for k in keys}

    assert all(shape(r) == shape(one) for r in runs)
    assert all(r.data.metrics["test/images"] == 2 * one.data.metrics["test/images"] for r in runs)
    assert all(r.data.params["devices"] == "2" for r in runs)

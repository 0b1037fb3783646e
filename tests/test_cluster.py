"""Beyond one process: cells on two DDP processes. (SLURM: test_slurm.py; submitit's local
executor: test_reliability's two-studies test.)"""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from .conftest import TINY, all_runs, cli_in_process, run_cli, store_uri
from .test_reliability import by_cell

pytestmark = pytest.mark.slow


@pytest.mark.long
def test_ddp_on_two_cpu_processes_records_each_cell_once_and_never_hangs(workdir, monkeypatch):
    """6 cells with trainer.devices=2 (gloo) in one study: each cell starts its second rank and
    tears its process group down; every cell one FINISHED run with the metrics of a one-process
    run, summed over both ranks' images; no rank aborts at exit, nothing hangs."""
    single = cli_in_process(["train", "study.name=one", *TINY], workdir, monkeypatch)  # the 1-process shape
    assert single.returncode == 0, single.stderr[-3000:]
    seeds = ",".join(map(str, range(6)))
    study = ["study", "experiment=smoke", "study.name=ddp", "study.archs=[A]", f"study.seeds=[{seeds}]",
             "trainer.devices=2", *TINY]  # fmt: skip
    result = run_cli(study, workdir, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "terminate called" not in output and "Traceback" not in output

    (one,) = [r for r in all_runs(workdir) if r.data.tags["study"] == "one"]
    runs = [r for r in all_runs(workdir) if r.data.tags["study"] == "ddp"]
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    assert all(len(cell) == 1 for cell in by_cell(runs).values())
    client = MlflowClient(store_uri(workdir))

    def shape(run) -> dict:
        keys = sorted(k for k in run.data.metrics if not k.startswith(("system/", "time/")))
        return {k: sorted(m.step for m in client.get_metric_history(run.info.run_id, k)) for k in keys}

    assert all(shape(r) == shape(one) for r in runs)
    assert all(r.data.metrics["test/images"] == 2 * one.data.metrics["test/images"] for r in runs)
    assert all(r.data.params["devices"] == "2" for r in runs)

"""Beyond one machine: the lab's shared tracking server (PostgreSQL + `mlflow server`, started by
`vgg-ablation server`), a study with 4 parallel workers against it, and deeper nets that start
from an A trained on another machine (its weights come from the server, not from a disk)."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vgg_ablation.dashboard import free_port
from vgg_ablation.labserver import Postgres, _postgres_bin

from .conftest import TINY, run_cli
from .test_reliability import popen_cli

pytestmark = pytest.mark.slow


def postgres_available() -> bool:
    try:
        _postgres_bin("initdb")
        return True
    except Exception:
        return False


@pytest.fixture
def lab(tmp_path):
    """`vgg-ablation server` in a temporary root: (tracking URI, its database, its root)."""
    if not postgres_available():
        if os.environ.get("VGG_ABLATION_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL is required here (VGG_ABLATION_REQUIRE_POSTGRES) but initdb is missing")
        pytest.skip("PostgreSQL not installed (Debian: apt install postgresql-15)")
    # Under root, PostgreSQL runs as the `postgres` user, which cannot enter pytest's private
    # temporary folders: the lab's root goes in a fresh folder under /tmp.
    root = Path(tempfile.mkdtemp(prefix="vgg-ablation-lab-"))
    root.chmod(0o755)
    port, db_port = free_port(), free_port()
    server = popen_cli(["server", f"root={root}", f"port={port}", f"db_port={db_port}"], tmp_path)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    lines = []
    while time.time() < deadline:
        line = server.stdout.readline()
        assert line or server.poll() is None, "".join(lines)
        lines.append(line)
        if "export MLFLOW_TRACKING_URI" in line:
            break
    else:
        raise AssertionError("the lab server did not come up: " + "".join(lines))
    try:
        yield uri, Postgres(root, db_port), root
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=60)
        assert server.returncode in (0, 143), server.returncode
        shutil.rmtree(root, ignore_errors=True)


def test_a_study_with_4_workers_on_the_lab_server_and_deeper_nets_from_an_a_trained_elsewhere(tmp_path, lab):
    uri, database, root = lab
    env = {"MLFLOW_TRACKING_URI": uri}
    study = [
        "study", "experiment=smoke", "study.name=lab", "model.init=from_A", "study.seeds=[0,1,2,3]",
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=4", *TINY,
    ]  # fmt: skip
    # machine 1 trains the As (4 at once); its disk is then gone
    first, second = tmp_path / "machine1", tmp_path / "machine2"
    first.mkdir(), second.mkdir()
    started = time.time()
    result = run_cli([*study, "study.archs=[A]"], first, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shutil.rmtree(first)
    # machine 2 runs the whole study: As are FINISHED, Bs start from A's weights on the server
    result = run_cli(study, second, env)
    seconds = time.time() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("init from A: copied") == 4
    assert "weights from the tracking server" in result.stdout + result.stderr

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("vgg-ablation/lab")
    runs = client.search_runs([experiment.experiment_id])
    cells = [r for r in runs if "cell" in r.data.tags]
    assert len(cells) == 8 and all(r.info.status == "FINISHED" for r in cells)
    assert len({r.data.tags["cell"] for r in cells}) == 8  # one run per cell
    a_runs = [r for r in cells if r.data.tags["arch"] == "A"]
    for run in a_runs:
        assert [f.path for f in client.list_artifacts(run.info.run_id, "checkpoint")] == [
            "checkpoint/weights.pt"
        ]
    # ... and the same, read straight from PostgreSQL
    rows = database.psql(
        "mlflow",
        f"SELECT r.status, t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
        f"WHERE r.experiment_id = {experiment.experiment_id} AND t.key = 'cell' ORDER BY t.value",
    ).split()
    assert len(rows) == 8 and all(row.startswith("FINISHED|") for row in rows)
    epochs = database.psql(
        "mlflow",
        "SELECT count(*) FROM metrics m JOIN runs r ON r.run_uuid = m.run_uuid "
        f"WHERE r.experiment_id = {experiment.experiment_id} AND m.key = 'val/acc1'",
    )
    assert int(epochs) == 8 * 2  # two epochs per cell, each once
    assert any((root / "artifacts").rglob("weights.pt"))
    print(f"lab study: 8 cells (4 workers) through PostgreSQL in {seconds:.0f} s")


def test_the_lab_server_refuses_bad_options_in_one_line(tmp_path):
    result = run_cli(["server", "port=http"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: port must be a positive whole number, got 'http'"]
    result = run_cli(["server", "colour=blue"], tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: server takes root=")

"""Beyond one machine: the lab's shared tracking server (PostgreSQL + `mlflow server`, started by
`vgg-ablation server`), a study with 4 parallel workers against it, and deeper nets that start
from an A trained on another machine (its weights come from the server, not from a disk)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vgg_ablation.commands.dashboard import free_port
from vgg_ablation.tracking.labserver import Postgres, _postgres_bin

from .conftest import TINY, cli_in_process, run_cli
from .test_reliability import popen_cli

pytestmark = pytest.mark.slow


def postgres_available() -> bool:
    try:
        _postgres_bin("initdb")
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """`vgg-ablation server` in a temporary root: (tracking URI, its database, its root, the
    admin's login as client environment variables)."""
    if not postgres_available():
        if os.environ.get("VGG_ABLATION_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL is required here (VGG_ABLATION_REQUIRE_POSTGRES) but initdb is missing")
        pytest.skip("PostgreSQL not installed (Debian: apt install postgresql-15)")
    # Under root, PostgreSQL runs as the `postgres` user, which cannot enter pytest's private
    # temporary folders: the lab's root goes in a fresh folder under /tmp.
    parent = Path(tempfile.mkdtemp(prefix="vgg-ablation-lab-"))
    parent.chmod(0o755)
    root = parent / "lab"
    port, db_port = free_port(), free_port()
    server = popen_cli(
        # logins trusted for 2 s per worker: a changed password is refused soon
        ["server", f"root={root}", f"port={port}", f"db_port={db_port}", "login_cache=2"],
        tmp_path_factory.mktemp("s"),
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    lines = []
    while time.time() < deadline:
        line = server.stdout.readline()
        assert line or server.poll() is None, "".join(lines)
        lines.append(line)
        if "export MLFLOW_TRACKING_URI" in line:
            break
    else:
        raise AssertionError("the lab server did not come up: " + "".join(lines))
    admin = json.loads((root / "credentials").read_text())
    assert any(admin["admin_password"] in line for line in lines)  # printed once, on first start
    assert (root / "credentials").stat().st_mode & 0o777 == 0o600
    assert root.stat().st_mode & 0o777 == (0o711 if os.geteuid() == 0 else 0o700)  # no one else lists it
    login = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": "admin",
             "MLFLOW_TRACKING_PASSWORD": admin["admin_password"]}  # fmt: skip
    try:
        yield uri, Postgres(root, db_port, admin["database_password"]), root, login
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=60)
        assert server.returncode in (0, 143), server.returncode
        shutil.rmtree(parent, ignore_errors=True)


def as_user(env: dict, user: str | None, password: str | None) -> dict:
    """A client environment for `user` (None: no login at all)."""
    out = {
        k: v
        for k, v in env.items()
        if not k.startswith("MLFLOW_TRACKING_USER") and k != "MLFLOW_TRACKING_PASSWORD"
    }
    return {
        **out,
        **({"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password} if user else {}),
    }


def admin_client(login: dict):
    os.environ.update({k: v for k, v in login.items() if k != "MLFLOW_TRACKING_URI"})
    return MlflowClient(login["MLFLOW_TRACKING_URI"])


def add_user(root: Path, uri: str, name: str, tmp_path: Path, *grant: str) -> str:
    """`vgg-ablation server-user`: the new user's password, as it printed it."""
    port = uri.rsplit(":", 1)[1]
    out = run_cli(["server-user", f"root={root}", f"port={port}", f"name={name}", *grant], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.split("password (shown once): ")[1].split()[0]


@pytest.mark.long
def test_a_study_with_4_workers_on_the_lab_server_and_deeper_nets_from_an_a_trained_elsewhere(tmp_path, lab):
    uri, database, root, env = lab
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

    client = admin_client(env)
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


@pytest.mark.long
def test_the_lab_server_lets_in_only_its_users(tmp_path, lab, monkeypatch):
    uri, database, root, env = lab
    cell = ["train", "study.name=gate", *TINY]
    for who, password, says in ((None, None, "no login"), ("admin", "not-the-password", "user 'admin'")):
        refused = cli_in_process(cell, tmp_path, monkeypatch, as_user(env, who, password))
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
        line = refused.stderr.strip().splitlines()
        assert len(line) == 1 and line[0].startswith(
            f"error: the tracking server refused these credentials (401, {says}"
        )
    assert admin_client(env).get_experiment_by_name("vgg-ablation/gate") is None  # nothing recorded
    # A member added with server-user runs a from-A pair of cells; the admin and the member read it.
    password = add_user(root, uri, "ana", tmp_path)
    ana = as_user(env, "ana", password)
    pair = ["study", "experiment=smoke", "study.name=ana-pair", "model.init=from_A", "study.seeds=[0]", *TINY]
    ran = run_cli(pair, tmp_path, ana)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    experiment = admin_client(env).get_experiment_by_name("vgg-ablation/ana-pair")
    runs = admin_client(env).search_runs([experiment.experiment_id], filter_string="tags.cell LIKE '%'")
    assert sorted(r.data.tags["arch"] for r in runs) == ["A", "B"] and all(
        r.info.status == "FINISHED" for r in runs
    )
    # A second member may read it, and write to it only once granted.
    other = add_user(root, uri, "ben", tmp_path)
    ben = as_user(env, "ben", other)
    more = [*pair, "study.seeds=[0,1]"]
    denied = cli_in_process(more, tmp_path, monkeypatch, ben)
    assert denied.returncode == 2 and "refused user 'ben' (403" in denied.stderr, denied.stderr[-2000:]
    granted_pw = add_user(root, uri, "cora", tmp_path, "study=ana-pair", "permission=EDIT")  # a grant
    granted = run_cli(more, tmp_path, as_user(env, "cora", granted_pw))
    assert granted.returncode == 0, granted.stdout[-3000:] + granted.stderr[-3000:]
    # PostgreSQL wants its password, even from this machine (only the MLflow server has it)
    without = subprocess.run([_postgres_bin("psql"), "-h", "127.0.0.1", "-p", str(database.port), "-U", "mlflow",
                              "-d", "mlflow", "-w", "-c", "SELECT 1"], capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k != "PGPASSWORD"})  # fmt: skip
    assert without.returncode != 0 and ("password" in without.stderr), without.stderr
    assert database.psql("mlflow", "SELECT 1").strip() == "1"  # with it, it answers


def test_a_login_revoked_mid_run_keeps_every_record_and_sync_sends_them(tmp_path, lab):
    from mlflow.server.auth.client import AuthServiceClient

    uri, _, root, env = lab
    password = add_user(root, uri, "cai", tmp_path)
    cai = as_user(env, "cai", password)
    long_run = ["train", "study.name=revoked", *[a for a in TINY if not a.startswith("trainer.max_epochs")],
                "trainer.max_epochs=20", "trainer.limit_train_batches=12", "logger.outage_wait=5"]  # fmt: skip
    release = tmp_path / "release"
    proc = popen_cli(long_run, tmp_path, {**cai, "VGG_ABLATION_HOLD_EPOCH": f"3:{release}"})
    while not Path(f"{release}.held").exists():  # three epochs recorded; training holds
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    client = admin_client(env)
    (victim,) = client.search_runs([client.get_experiment_by_name("vgg-ablation/revoked").experiment_id])
    AuthServiceClient(uri).update_user_password("cai", "a-new-password-1")  # cai's login stops working
    time.sleep(3)  # past the server's login cache (login_cache=2)
    release.touch()
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, output[-3000:]
    assert "refuses run" in output and "not answering" not in output, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert "refused its records" in last and "vgg-ablation sync" in last, last
    journal = last.split("send them with: vgg-ablation sync ")[1].split()[0]
    synced = run_cli(["sync", journal], tmp_path, as_user(env, "cai", "a-new-password-1"))
    assert synced.returncode == 0, synced.stdout + synced.stderr
    run = client.get_run(victim.info.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc1")] == list(range(20))


def test_a_study_archive_round_trips_through_the_lab_server_with_a_login(tmp_path, lab, monkeypatch):
    from .test_archive import contents

    uri, _, root, env = lab
    committed = Path(__file__).resolve().parent.parent / "reports" / "lrn-cpu-archive.tar.gz"
    dee = as_user(env, "dee", add_user(root, uri, "dee", tmp_path))
    nobody = cli_in_process(["import", str(committed)], tmp_path, monkeypatch, as_user(env, None, None))
    assert nobody.returncode == 2 and "refused these credentials (401, no login" in nobody.stderr, (
        nobody.stderr
    )
    assert admin_client(env).get_experiment_by_name("vgg-ablation/lrn-cpu") is None  # nothing written
    done = cli_in_process(["import", str(committed)], tmp_path, monkeypatch, dee)
    assert done.returncode == 0 and "add 34 runs (1 study run, 33 other)" in done.stdout, (
        done.stdout + done.stderr
    )
    again = cli_in_process(["import", str(committed)], tmp_path, monkeypatch, dee)
    assert again.returncode == 0 and "add 0 runs" in again.stdout and "skip 34" in again.stdout
    back = cli_in_process(["export", "experiment=lrn-cpu", f"logger.tracking_uri={uri}", "archive.out=back.tar.gz"],
                          tmp_path, monkeypatch, dee)  # fmt: skip
    assert back.returncode == 0, back.stderr
    there, here = contents(tmp_path / "back.tar.gz"), contents(committed)
    for origin, run in here.items():  # a cell RUNNING when exported (its process elsewhere) arrives KILLED
        if run["status"] == "RUNNING":
            assert there[origin]["status"] == "KILLED" and "arrived KILLED" in there[origin]["tags"].pop(
                "import_note"
            )
            run["status"] = "KILLED"
    assert there == here  # PostgreSQL kept every record

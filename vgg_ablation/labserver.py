"""`vgg-ablation server`: one command that starts a lab's shared tracking server.

PostgreSQL holds the runs (a real database: many writers at once, safe on one disk, unlike a
SQLite file shared over NFS), `mlflow server` serves them and proxies the artifacts (reports,
the trained A checkpoints deeper nets start from) from a folder beside the database, so a machine
that can reach the server needs no shared filesystem. Everything lives under one folder:

    <root>/postgres/    the database cluster (initdb on first start; reused after)
    <root>/artifacts/   the artifact store
    <root>/*.log        PostgreSQL's and MLflow's logs

PostgreSQL listens on 127.0.0.1 only and trusts local connections: only the MLflow server on this
machine talks to it. Machines reach MLflow on `host:port`. Ctrl-C or SIGTERM stops both, MLflow
first, then PostgreSQL (a clean shutdown: nothing recorded is lost).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vgg_ablation.errors import UserError

DATABASE = "mlflow"
DB_USER = "mlflow"


def _postgres_bin(name: str) -> str:
    """A PostgreSQL program: on PATH, else Debian's versioned folder."""
    found = shutil.which(name)
    if found:
        return found
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / name).is_file():
            return str(folder / name)
    raise UserError(f"PostgreSQL's {name} not found: install PostgreSQL (Debian: apt install postgresql-15)")


def _as_database_owner(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: under root, its programs run as the `postgres` user."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


@dataclass
class Postgres:
    """A PostgreSQL cluster in `folder`, on 127.0.0.1:`port`."""

    folder: Path
    port: int

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{self.port}/{DATABASE}"

    def start(self) -> None:
        data = self.folder / "postgres"
        log = self.folder / "postgres.log"
        if not port_free("127.0.0.1", self.port):
            raise UserError(f"port {self.port} on 127.0.0.1 is taken: choose another with db_port=")
        if not (data / "PG_VERSION").is_file():
            data.mkdir(parents=True, exist_ok=True)
            self._own(data)
            self._run([_postgres_bin("initdb"), "-D", str(data), "-U", DB_USER, "--auth=trust", "-E", "UTF8"])
        self._own(data)
        log.touch()
        self._own(log)
        self._run([
            _postgres_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start",
            "-o", f"-p {self.port} -c listen_addresses=127.0.0.1 -k {data}",
        ])  # fmt: skip
        exists = self.psql("postgres", f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'")
        if exists.strip() != "1":
            self.psql("postgres", f"CREATE DATABASE {DATABASE}")

    def stop(self) -> None:
        data = self.folder / "postgres"
        if (data / "postmaster.pid").is_file():
            subprocess.run(
                _as_database_owner([_postgres_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                capture_output=True, timeout=60,
            )  # fmt: skip

    def psql(self, database: str, sql: str) -> str:
        """One SQL statement through psql; its rows, unaligned, one per line."""
        result = subprocess.run(
            [_postgres_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", DB_USER, "-d", database,
             "-tA", "-v", "ON_ERROR_STOP=1", "-c", sql],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if result.returncode != 0:
            raise UserError(f"psql failed: {result.stderr.strip().splitlines()[-1]}")
        return result.stdout

    @staticmethod
    def _own(path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, "postgres", "postgres")

    @staticmethod
    def _run(command: list[str]) -> None:
        result = subprocess.run(_as_database_owner(command), capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            raise UserError(f"{Path(command[0]).name} failed: {lines[-1] if lines else result.returncode}")


def server_env(pool: int | None = None) -> dict[str, str]:
    """The environment for an MLflow server we start. MLflow 3's job runner (about 7 `huey`
    processes for GenAI evaluation jobs, a quarter of a core each while they start, polling after)
    is off unless asked for: tracking training runs never uses it, and on 2 cores training beside
    it ran 30% slower. `pool`: database connections per server worker (MLflow's default, 5 + 10
    overflow, refuses a crowd of 32 writers)."""
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    if pool:
        env.setdefault("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", str(pool))
    return env


def wait_for_health(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    from vgg_ablation.tracking import answers

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise UserError(f"mlflow server exited with code {process.returncode} before answering {url}")
        if answers(url):
            return
        time.sleep(0.3)
    raise UserError(f"mlflow server did not answer {url}/health within {timeout:.0f} s")


def stop_group(process: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM a server's process group (uvicorn starts workers of its own), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout)


def mlflow_server(backend: str, artifacts: Path, host: str, port: int, workers: int, pool: int, log: Path):
    """`mlflow server` on `backend`, proxying artifacts from `artifacts`, in its own process group."""
    if not port_free(host if host != "0.0.0.0" else "127.0.0.1", port):
        raise UserError(f"port {port} is taken: choose another with port=")
    artifacts.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
             "--artifacts-destination", str(artifacts), "--host", host, "--port", str(port),
             "--workers", str(workers)],
            stdout=out, stderr=subprocess.STDOUT, env=server_env(pool), start_new_session=True,
        )  # fmt: skip


def run_server(args: list[str]) -> int:
    """Start PostgreSQL and the MLflow server on it; serve until Ctrl-C or SIGTERM."""
    from vgg_ablation.config import ServerOptions, options

    opts = options(ServerOptions, args, "server")
    for key in ("port", "db_port", "workers", "pool"):
        if opts[key] <= 0:
            raise UserError(f"{key} must be a positive whole number, got {opts[key]!r}")
    import importlib.util

    if importlib.util.find_spec("psycopg2") is None:
        raise UserError(
            "the lab server needs the PostgreSQL driver: pip install 'vgg-ablation[lab]' (psycopg2-binary)"
        )
    root = Path(opts.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    host, port = opts.host, opts.port
    database = Postgres(root, opts.db_port)
    database.start()
    server = None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        server = mlflow_server(
            database.uri, root / "artifacts", host, port, opts.workers, opts.pool,
            root / "mlflow.log",
        )  # fmt: skip
        url = f"http://{host if host != '0.0.0.0' else socket.gethostname()}:{port}"
        wait_for_health(f"http://127.0.0.1:{port}" if host == "0.0.0.0" else url, server)
        print(
            f"MLflow server on {url}: runs in PostgreSQL ({database.uri}), artifacts in {root / 'artifacts'}"
        )
        print(
            f"on every machine of the lab: export MLFLOW_TRACKING_URI={url}   (Ctrl-C stops the server)",
            flush=True,
        )
        return server.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        if server is not None:
            stop_group(server)
        database.stop()

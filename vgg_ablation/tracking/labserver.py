"""`vgg-ablation server`: one command that starts a lab's shared tracking server, with logins.

PostgreSQL holds the runs (a real database: many writers at once, safe on one disk, unlike a
SQLite file shared over NFS), `mlflow server` serves them and proxies the artifacts (reports,
the trained A checkpoints deeper nets start from) from a folder beside the database, so a machine
that can reach the server needs no shared filesystem. Everything lives under one folder, readable
by its owner only:

    <root>/postgres/      the database cluster (initdb on first start; reused after)
    <root>/artifacts/     the artifact store
    <root>/credentials    the admin's login and the database's password (mode 0600)
    <root>/pgpass         the database password for the MLflow server (libpq's format, 0600)
    <root>/auth.ini       MLflow's basic-auth settings; <root>/basic_auth.db its users
    <root>/*.log          PostgreSQL's and MLflow's logs

Who can reach what: MLflow's basic-auth app asks every request for a login (a wrong or missing one
is refused, 401); every user reads every study (default permission READ) and writes to the studies
they created, and to others' once granted (`vgg-ablation server-user`); the admin manages all.
`--allowed-hosts` answers only to the names the server is reached by (DNS rebinding). PostgreSQL
listens on 127.0.0.1 only and wants its password (scram-sha-256), even from this machine: only
the MLflow server has it. Ctrl-C or SIGTERM stops both, MLflow first, then PostgreSQL.
"""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import secrets
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


# -- secrets: generated once, kept under root, readable by its owner only ----------------------------------
def private_file(path: Path, text: str) -> None:
    """Write `text` to a file only its owner can read, created so (never world-readable for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def credentials(root: Path) -> tuple[dict, bool]:
    """The lab server's secrets (admin login, database password), made on first start; and
    whether they were made now."""
    path = root / "credentials"
    if path.is_file():
        return json.loads(path.read_text()), False
    made = {"admin_username": "admin", "admin_password": secrets.token_urlsafe(18),
            "database_password": secrets.token_urlsafe(24),
            "flask_secret_key": secrets.token_hex(32)}  # fmt: skip  # MLflow's CSRF protection
    private_file(path, json.dumps(made, indent=2) + "\n")
    return made, True


@dataclass
class Postgres:
    """A PostgreSQL cluster in `folder`, on 127.0.0.1:`port`, that wants `password`."""

    folder: Path
    port: int
    password: str

    @property
    def uri(self) -> str:
        """For the MLflow server; the password comes from <root>/pgpass (not on a command line)."""
        return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{self.port}/{DATABASE}"

    def start(self) -> None:
        data = self.folder / "postgres"
        log = self.folder / "postgres.log"
        if not port_free("127.0.0.1", self.port):
            raise UserError(f"port {self.port} on 127.0.0.1 is taken: choose another with db_port=")
        if not (data / "PG_VERSION").is_file():
            data.mkdir(parents=True, exist_ok=True)
            self._own(data)
            pwfile = self.folder / ".initdb-password"
            private_file(pwfile, self.password + "\n")
            self._own(pwfile)
            try:
                self._run([_postgres_bin("initdb"), "-D", str(data), "-U", DB_USER, "-E", "UTF8",
                           "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"])  # fmt: skip
            finally:
                pwfile.unlink(missing_ok=True)
        self._own(data)
        log.touch()
        self._own(log)
        self._run([
            _postgres_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start",
            "-o", f"-p {self.port} -c listen_addresses=127.0.0.1 -k {data}",
        ])  # fmt: skip
        self._secure_a_trusting_cluster(data)
        exists = self.psql("postgres", f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'")
        if exists.strip() != "1":
            self.psql("postgres", f"CREATE DATABASE {DATABASE}")
        private_file(self.folder / "pgpass", f"127.0.0.1:{self.port}:{DATABASE}:{DB_USER}:{self.password}\n")

    def _secure_a_trusting_cluster(self, data: Path) -> None:
        """A cluster made by an earlier version trusted every local connection: it gets the
        password and scram-sha-256, and reloads."""
        hba = data / "pg_hba.conf"
        rules = hba.read_text()
        lines = [line for line in rules.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not any(line.split()[-1] == "trust" for line in lines):
            return
        self.psql("postgres", f"ALTER ROLE {DB_USER} PASSWORD '{self.password}'", password=False)
        secured = "\n".join(
            line.rsplit(None, 1)[0] + " scram-sha-256"
            if line in lines and line.split()[-1] == "trust"
            else line
            for line in rules.splitlines()
        )
        hba.write_text(secured + "\n")
        self._run([_postgres_bin("pg_ctl"), "-D", str(data), "reload"])

    def stop(self) -> None:
        data = self.folder / "postgres"
        if (data / "postmaster.pid").is_file():
            subprocess.run(
                _as_database_owner([_postgres_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                capture_output=True, timeout=60,
            )  # fmt: skip

    def psql(self, database: str, sql: str, password: bool = True) -> str:
        """One SQL statement through psql (with the password, unless the cluster still trusts);
        its rows, unaligned, one per line."""
        env = {**os.environ, **({"PGPASSWORD": self.password} if password else {})}
        result = subprocess.run(  # the statement on stdin: a password in it never shows in `ps`
            [_postgres_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", DB_USER, "-d", database,
             "-w", "-tA", "-v", "ON_ERROR_STOP=1", "-f", "-"],
            input=sql, capture_output=True, text=True, timeout=60, env=env,
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
    from vgg_ablation.tracking.stores import answers

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


def allowed_hosts(host: str, port: int, more: list[str]) -> str:
    """The Host headers the server answers to: the names it is reached by, with and without the
    port (MLflow's check against DNS rebinding)."""
    names = {"localhost", "127.0.0.1", *more}
    if host not in ("0.0.0.0", "127.0.0.1", "localhost"):
        names.add(host)
    if host == "0.0.0.0":
        names |= {socket.gethostname(), socket.getfqdn()}
    return ",".join(sorted({n for name in names for n in (name, f"{name}:{port}")}))


def auth_settings(root: Path, secrets_: dict, login_cache: int) -> Path:
    """MLflow's basic-auth ini: its own user store under root, READ for every user by default."""
    ini = configparser.ConfigParser()
    ini["mlflow"] = {
        "default_permission": "READ",
        "database_uri": f"sqlite:///{root / 'basic_auth.db'}",
        "admin_username": secrets_["admin_username"],
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        "auth_cache_ttl_seconds": str(login_cache),  # PBKDF2 per request costs CPU under many writers
    }
    path = root / "auth.ini"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as f:
        ini.write(f)
    return path


def mlflow_server(backend: str, root: Path, host: str, port: int, opts, secrets_: dict, log: Path):
    """`mlflow server` with logins on `backend`, proxying artifacts from <root>/artifacts, in its
    own process group. The admin's password reaches it through its environment, on first start."""
    if not port_free(host if host != "0.0.0.0" else "127.0.0.1", port):
        raise UserError(f"port {port} is taken: choose another with port=")
    (root / "artifacts").mkdir(parents=True, exist_ok=True)
    env = {**server_env(opts.pool), "PGPASSFILE": str(root / "pgpass"),
           "MLFLOW_AUTH_CONFIG_PATH": str(auth_settings(root, secrets_, opts.login_cache)),
           "MLFLOW_AUTH_ADMIN_PASSWORD": secrets_["admin_password"],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets_["flask_secret_key"]}  # fmt: skip
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--backend-store-uri", backend,
             "--artifacts-destination", str(root / "artifacts"), "--host", host, "--port", str(port),
             "--workers", str(opts.workers), "--allowed-hosts", allowed_hosts(host, port, list(opts.allowed_hosts))],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=root,
        )  # fmt: skip


def run_server(args: list[str]) -> int:
    """Start PostgreSQL and the MLflow server on it; serve until Ctrl-C or SIGTERM."""
    from vgg_ablation.config import ServerOptions, options

    opts = options(ServerOptions, args, "server")
    for key in ("port", "db_port", "workers", "pool"):
        if opts[key] <= 0:
            raise UserError(f"{key} must be a positive whole number, got {opts[key]!r}")
    if opts.login_cache < 0:
        raise UserError(f"login_cache must be 0 or more seconds, got {opts.login_cache}")
    import importlib.util

    if importlib.util.find_spec("psycopg2") is None or importlib.util.find_spec("flask_wtf") is None:
        raise UserError(
            "the lab server needs PostgreSQL's driver and MLflow's auth app: pip install 'vgg-ablation[lab]'"
        )
    root = Path(opts.root).resolve()
    os.umask(0o077)  # everything the server and its database write: the owner's only
    root.mkdir(parents=True, exist_ok=True)
    # The owner's only; run as root, PostgreSQL runs as `postgres`, which may pass through (not list)
    os.chmod(root, 0o711 if os.geteuid() == 0 else 0o700)
    secrets_, new = credentials(root)
    database = Postgres(root, opts.db_port, secrets_["database_password"])
    database.start()
    server = None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        server = mlflow_server(database.uri, root, opts.host, opts.port, opts, secrets_, root / "mlflow.log")
        url = f"http://{opts.host if opts.host != '0.0.0.0' else socket.gethostname()}:{opts.port}"
        wait_for_health(f"http://127.0.0.1:{opts.port}" if opts.host == "0.0.0.0" else url, server)
        announce(url, database, root, secrets_, new)
        return server.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        if server is not None:
            stop_group(server)
        database.stop()


def announce(url: str, database: Postgres, root: Path, secrets_: dict, new: bool) -> None:
    print(f"MLflow server on {url}, with logins: runs in PostgreSQL ({database.uri}, password only in "
          f"{root / 'pgpass'}), artifacts in {root / 'artifacts'}")  # fmt: skip
    if new:
        print(f"admin login (shown once; kept in {root / 'credentials'}, readable by you only): "
              f"{secrets_['admin_username']} / {secrets_['admin_password']}")  # fmt: skip
    else:
        print(f"admin login in {root / 'credentials'}")
    print(
        f"add a lab member: vgg-ablation server-user root={root} name=<user> [study=<study> permission=EDIT]"
    )
    print(f"on every machine of the lab: export MLFLOW_TRACKING_URI={url} MLFLOW_TRACKING_USERNAME=<user> "
          "MLFLOW_TRACKING_PASSWORD=<password>   (Ctrl-C stops the server)", flush=True)  # fmt: skip


def run_server_user(args: list[str]) -> int:
    """`vgg-ablation server-user`: a lab member's login on a running lab server (its password
    printed once), and optionally a permission on a study, through MLflow's auth API as admin."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    from vgg_ablation.config import ServerUserOptions, options
    from vgg_ablation.tracking.stores import EXPERIMENT_PREFIX

    opts = options(ServerUserOptions, args, "server-user")
    if not opts.name:
        raise UserError("server-user needs name=<user>")
    if opts.permission not in ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS"):
        raise UserError(f"permission must be READ, EDIT, MANAGE or NO_PERMISSIONS, got {opts.permission!r}")
    root = Path(opts.root).resolve()
    if not (root / "credentials").is_file():
        raise UserError(
            f"no lab server under {root} (no credentials file): start it with vgg-ablation server root={root}"
        )
    secrets_, _ = credentials(root)
    url = opts.url or f"http://127.0.0.1:{opts.port}"
    os.environ["MLFLOW_TRACKING_USERNAME"] = secrets_["admin_username"]
    os.environ["MLFLOW_TRACKING_PASSWORD"] = secrets_["admin_password"]
    auth = AuthServiceClient(url)
    try:
        password = opts.password or secrets.token_urlsafe(12)
        auth.create_user(opts.name, password)
        print(f"user {opts.name} on {url}, password (shown once): {password}")
        if opts.study:
            from mlflow.tracking import MlflowClient

            experiment = MlflowClient(url).get_experiment_by_name(EXPERIMENT_PREFIX + opts.study)
            if experiment is None:
                raise UserError(f"no study {opts.study!r} on {url} yet: run it first, then grant it")
            auth.grant_user_permission(opts.name, "experiment", experiment.experiment_id, opts.permission)
            print(
                f"{opts.name} may {opts.permission} study {opts.study} (experiment {experiment.experiment_id})"
            )
    except MlflowException as exc:
        raise UserError(f"the lab server at {url} refused: {exc.message.splitlines()[0][:300]}") from None
    return 0

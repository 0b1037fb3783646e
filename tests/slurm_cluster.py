"""A real single-node SLURM cluster for the tests: Debian's slurm-wlm daemons (slurmctld and
slurmd) and munge, started with a private configuration in a temporary folder (its own ports,
state and logs; `SLURM_CONF` points the client commands at it), torn down after.

Without accounting (the default) `sacct` answers "accounting storage is disabled", as it does on
many small clusters, the harder case for a study (submitit's own wait polls `sacct`); with
`accounting=True`, slurmdbd records every job in a private MariaDB server (about 8 s more to
start). Two partitions: `cpu` (the default: the node's cores, no GPUs) and `short`
(a one-minute time limit, for requests that can never start there)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged")


def why_not(accounting: bool = False) -> str | None:
    """Why no cluster can start here (None: it can)."""
    daemons = DAEMONS + (("slurmdbd", "mariadbd") if accounting else ())
    missing = [d for d in daemons if not shutil.which(d) and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} missing: apt-get install slurm-wlm munge"
                + (" slurmdbd mariadb-server)" if accounting else ")"))  # fmt: skip
    if os.geteuid() != 0:
        return "the SLURM daemons need root to start a node"
    if not Path("/etc/munge/munge.key").exists():
        return "munge has no key (/etc/munge/munge.key)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_munge() -> None:
    """munged, as its Debian service runs it (user munge), unless one answers already."""
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    for _ in range(50):
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError("munged did not start")


def config(folder: Path, memory_mb: int, dbd_port: int | None) -> str:
    host = socket.gethostname()
    accounting = (
        f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\n"
        f"AccountingStoragePort={dbd_port}"
        if dbd_port
        else "AccountingStorageType=accounting_storage/none"
    )
    cpus = os.cpu_count() or 1
    return f"""\
ClusterName=vggtest
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
JobRequeue=1
{accounting}
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=10
MinJobAge=300
NodeName={host} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=cpu Nodes={host} Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes={host} MaxTime=1 State=UP
"""


class Cluster:
    """A started cluster: `env` points SLURM's commands at it."""

    def __init__(self, folder: Path, accounting: bool = False):
        self.folder = folder
        (folder / "state").mkdir(parents=True, exist_ok=True)
        (folder / "spool").mkdir(exist_ok=True)
        conf = folder / "slurm.conf"
        self.env = {"SLURM_CONF": str(conf)}
        self.started = time.time()
        start_munge()
        dbd_port = free_port() if accounting else None
        conf.write_text(config(folder, memory_mb=16000, dbd_port=dbd_port))
        if dbd_port:
            self.start_accounting(dbd_port)
            self.run("sacctmgr", "-i", "add", "cluster", "vggtest")
        env = {**os.environ, **self.env}
        # From the cluster's folder: a job whose --output folder does not exist yet when it starts
        # (submitit's %j folders are made just after sbatch returns) writes slurm-<id>.out into the
        # daemon's folder; from the caller's, that was the checkout.
        subprocess.run(["/usr/sbin/slurmctld", "-i"], env=env, check=True, cwd=folder)
        subprocess.run(["/usr/sbin/slurmd"], env=env, check=True, cwd=folder)
        deadline = time.time() + 60
        while time.time() < deadline:
            state = self.run("sinfo", "-h", "-p", "cpu", "-o", "%T").stdout.strip()
            if state == "idle":
                self.seconds_to_start = time.time() - self.started
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the test cluster's node never became idle: {self.logs()}")

    def start_accounting(self, dbd_port: int) -> None:
        """MariaDB in a folder of its own (no grant tables: nothing but slurmdbd reaches its
        port on 127.0.0.1), then slurmdbd on it, at `dbd_port`."""
        db, mysql_port = self.folder / "db", free_port()
        subprocess.run(
            ["mariadb-install-db", "--user=root", f"--datadir={db}"], capture_output=True, check=True
        )
        subprocess.Popen(
            ["mariadbd", "--user=root", f"--datadir={db}", f"--socket={self.folder / 'mysql.sock'}",
             f"--port={mysql_port}", "--bind-address=127.0.0.1", "--skip-grant-tables",
             f"--pid-file={self.folder / 'mariadb.pid'}", f"--log-error={self.folder / 'mariadb.log'}"],
            start_new_session=True,
        )  # fmt: skip
        for _ in range(100):
            ping = ["mariadb", f"--socket={self.folder / 'mysql.sock'}", "-e", "select 1"]
            if subprocess.run(ping, capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        dbd = self.folder / "slurmdbd.conf"  # slurmdbd reads it beside SLURM_CONF's file
        dbd.write_text(
            f"AuthType=auth/munge\nDbdHost=localhost\nDbdPort={dbd_port}\nSlurmUser=root\n"
            f"PidFile={self.folder / 'slurmdbd.pid'}\nLogFile={self.folder / 'slurmdbd.log'}\n"
            f"StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\nStoragePort={mysql_port}\n"
            "StorageUser=root\nStorageLoc=slurm_acct_db\n"
        )
        dbd.chmod(0o600)
        subprocess.run(["/usr/sbin/slurmdbd"], env={**os.environ, **self.env}, check=True)
        for _ in range(100):
            if self.run("sacctmgr", "-n", "list", "cluster").returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"slurmdbd did not answer: {(self.folder / 'slurmdbd.log').read_text()[-2000:]}")

    def run(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, env={**os.environ, **self.env}, capture_output=True, text=True)

    def queue(self) -> list[str]:
        """Every job and array task in the queue, as `id state reason`."""
        return self.run("squeue", "-h", "-r", "-o", "%i %T %r").stdout.split("\n")[:-1]

    def logs(self) -> str:
        return "\n".join(
            p.read_text()[-2000:]
            for p in (self.folder / "slurmctld.log", self.folder / "slurmd.log")
            if p.exists()
        )

    def stop(self) -> None:
        self.run("scancel", "--full", "-u", "root")
        for daemon in ("slurmd", "slurmctld", "slurmdbd", "mariadb"):
            pid_file = self.folder / f"{daemon}.pid"
            if pid_file.exists():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text()), 15)
        time.sleep(1)

"""Stand-ins for SLURM's sbatch, sacct, scancel, scontrol and srun, for tests on one machine.

Each command is a two-line script on PATH that calls `python fake_slurm.py <command> ...` (see
`install`); the jobs' states live in $FAKE_SLURM_DIR. `sbatch` runs the script locally (array tasks `%N` at a time) with the
environment SLURM gives a job, `sacct` reports the states, `scancel` signals, `scontrol requeue`
(or a `<job>.requeue` file written by a test that preempts a job) runs a task again once it exits,
as SLURM does with a requeued job. Enough of SLURM for submitit's SLURM executor to run for real.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STATE = Path(os.environ.get("FAKE_SLURM_DIR", "/tmp/fake-slurm"))


def sbatch(args: list[str]) -> int:
    script = Path(args[-1])
    text = script.read_text()
    STATE.mkdir(parents=True, exist_ok=True)
    counter = STATE / "next_id"
    job = int(counter.read_text()) if counter.exists() else 1000
    counter.write_text(str(job + 1))
    array = re.search(r"^#SBATCH --array=(\d+)-(\d+)(?:%(\d+))?", text, re.M)
    tasks = list(range(int(array[1]), int(array[2]) + 1)) if array else [None]
    parallel = int(array[3] or len(tasks)) if array else 1
    for task in tasks:
        (STATE / f"{name(job, task)}.state").write_text("PENDING")
    runner = [sys.executable, __file__, "run", str(job), str(parallel), str(script), *map(str, tasks)]
    subprocess.Popen(runner, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"Submitted batch job {job}")
    return 0


def name(job: int, task: int | None) -> str:
    return f"{job}_{task}" if task is not None else str(job)


def run(args: list[str]) -> int:
    """The scheduler for one submission: every task of the array, `parallel` at a time."""
    job, parallel, script, tasks = int(args[0]), int(args[1]), Path(args[2]), args[3:]
    text = script.read_text()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(lambda t: run_task(job, None if t == "None" else int(t), script, text), tasks))
    return 0


def run_task(job: int, task: int | None, script: Path, text: str) -> None:
    me = name(job, task)
    restarts = 0
    while True:
        env = {
            **os.environ,
            "SLURM_JOB_ID": str(job * 1000 + (task or 0)),
            "SLURM_JOB_NAME": "vgg-ablation",
            "SLURM_NTASKS": "1",
            "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0",
            "SLURM_NODEID": "0",
            "SLURM_JOB_NUM_NODES": "1",
            "SLURM_JOB_NODELIST": "localhost",
            "SLURM_RESTART_COUNT": str(restarts),
        }
        if task is not None:
            env.update(SLURM_ARRAY_JOB_ID=str(job), SLURM_ARRAY_TASK_ID=str(task))
        out = re.search(r"^#SBATCH --output=(\S+)", text, re.M)
        log = Path(expand(out[1], job, task)) if out else STATE / f"{me}.out"
        log.parent.mkdir(parents=True, exist_ok=True)
        (STATE / f"{me}.state").write_text("RUNNING")
        with (STATE / f"{me}.attempts").open("a") as attempts:
            attempts.write(f"{time.time()}\n")
        with log.open("a") as f:
            proc = subprocess.Popen(["bash", str(script)], env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
            (STATE / f"{me}.pid").write_text(str(proc.pid))
            code = proc.wait()
        requeue = STATE / f"{me}.requeue"
        if requeue.exists():  # preempted or timed out, and requeued: the same job runs again
            requeue.unlink()
            restarts += 1
            time.sleep(0.5)
            continue
        if (STATE / f"{me}.state").read_text() != "CANCELLED":
            (STATE / f"{me}.state").write_text("COMPLETED" if code == 0 else "FAILED")
        return


def expand(pattern: str, job: int, task: int | None) -> str:
    return pattern.replace("%A", str(job)).replace("%a", str(task)).replace("%j", name(job, task))


def sacct(args: list[str]) -> int:
    jobs = [args[i + 1] for i, a in enumerate(args) if a == "-j"]
    print("JobID|State|NodeList")
    for job in jobs:
        for state in sorted(STATE.glob(f"{job}*.state")):
            stem = state.name.removesuffix(".state")
            if stem == job or stem.startswith(f"{job}_"):
                print(f"{stem}|{state.read_text()}|localhost")
    return 0


def signal_task(me: str, signum: int) -> None:
    pid = STATE / f"{me}.pid"
    if pid.exists():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(pid.read_text()), signum)


def scancel(args: list[str]) -> int:
    signum = signal.SIGTERM
    jobs = []
    for arg in args:
        if arg.startswith("--signal="):
            signum = getattr(signal, "SIG" + arg.split("=", 1)[1].removeprefix("SIG"))
        elif not arg.startswith("-"):
            jobs.append(arg)
    for job in jobs:
        for state in STATE.glob(f"{job}*.state"):
            me = state.name.removesuffix(".state")
            if signum == signal.SIGTERM:
                state.write_text("CANCELLED")
            signal_task(me, signum)
    return 0


def scontrol(args: list[str]) -> int:
    if args[:1] == ["requeue"]:
        for job in args[1:]:
            (STATE / f"{job}.requeue").touch()
        return 0
    print(f"fake scontrol: {args} not supported", file=sys.stderr)
    return 1


def srun(args: list[str]) -> int:
    """Runs the command in place; srun's own options (output files, --unbuffered) are dropped."""
    i = 0
    while i < len(args) and args[i].startswith("-"):
        i += 2 if args[i] in ("--output", "--error", "-o", "-e") else 1
    os.execvp(args[i], args[i:])
    return 1


COMMANDS = {"sbatch": sbatch, "sacct": sacct, "scancel": scancel, "scontrol": scontrol, "srun": srun}


def install(bin_dir: Path) -> None:
    """The stand-in commands, as scripts in `bin_dir` (put it first on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for command in COMMANDS:
        path = bin_dir / command
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" {command} "$@"\n')
        path.chmod(0o755)


if __name__ == "__main__":
    if sys.argv[1] == "run":
        sys.exit(run(sys.argv[2:]))
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))

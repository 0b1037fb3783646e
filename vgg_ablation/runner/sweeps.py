"""One Hydra multirun of a study's cells, as a process of its own (`launch`), and how a study
stops one: Ctrl-C or SIGTERM become `Interrupted` in the study (`stopped_by_signals`) and are passed
on to the sweep (`stop_sweep`), which marks its training cell KILLED and keeps its checkpoint."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from vgg_ablation.study.cells import DEADLINE_ENV, PROGRESS_ENV


def sweep_dir(cfg: DictConfig) -> Path:
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    return Path("multirun") / cfg.study.name / f"{stamp}-{secrets.token_hex(3)}"


def a_first(cfg: DictConfig, archs: list[str]) -> list[list[str]]:
    """The nets as sweeps to run in turn: with init=from_A, A's cells as a sweep of their own
    before the nets that start from them (side by side, as a parallel launcher runs a sweep's
    cells, a deeper net would look for its trained A before A had finished)."""
    if cfg.model.init == "from_A" and "A" in archs and len(archs) > 1:
        return [["A"], [a for a in archs if a != "A"]]
    return [list(archs)]


def skip_flags(archs: list, seeds: list, seed_major: bool, finished, lrs: list | None = None) -> str:
    """Which of a sweep's jobs will skip, in the order Hydra numbers them (the product of its
    swept lists, the first slowest: `optim.lr` before `seed`/`arch` as `launch` writes them), for
    each job's time-left line: "f" then "1" per job whose `finished(arch, seed, lr)`, else "0"."""
    lrs = lrs or [None]
    if seed_major:
        jobs = [(arch, seed, lr) for lr in lrs for seed in seeds for arch in archs]
    else:
        jobs = [(arch, seed, lr) for lr in lrs for arch in archs for seed in seeds]
    return "f" + "".join("1" if finished(*job) else "0" for job in jobs)


def launch(args: list[str], archs: list[str], seeds: list[int], folder: Path, seed_major: bool = False,
           progress: tuple | None = None, deadline: float | None = None) -> int:  # fmt: skip
    """One Hydra multirun over archs x seeds in a subprocess: arch-major (the paper's order, and
    the trained A first for init=from_A), or seed-major, so that a study stopped early still holds
    complete paired blocks (every arch of seeds 0..k). The sweep shares the study's process group,
    so a kill of the group (SIGKILL, a lost machine) takes both; a Ctrl-C or SIGTERM that reached
    the study alone is passed on (`stop_sweep`)."""
    sweep = ["arch=" + ",".join(archs), "seed=" + ",".join(str(s) for s in seeds)]
    command = [sys.executable, "-m", "vgg_ablation.training.train", "--multirun", *args, *(sweep[::-1] if seed_major else sweep),
               f"hydra.sweep.dir={folder}",
               "hydra/hydra_logging=disabled"]  # fmt: skip  # its per-job line repeats every override: ours says k of N
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if progress:
        env[PROGRESS_ENV] = ":".join(map(str, progress))
    if deadline:
        env[DEADLINE_ENV] = str(deadline)
    proc = subprocess.Popen(command, env=env)
    try:
        return proc.wait()
    except Interrupted as exc:
        stop_sweep(proc, exc.signum)
        raise


# -- stopping: Ctrl-C and SIGTERM -----------------------------------------------------------------------
class Interrupted(BaseException):
    """Ctrl-C (SIGINT) or SIGTERM reached the study."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stopped_by_signals():
    """SIGINT and SIGTERM become `Interrupted` while the study runs (restored after); a second
    one while the first is being handled becomes Interrupted(SIGKILL): stop at once."""
    first: list[int] = []

    def handler(signum, frame):
        first.append(signum)
        raise Interrupted(signal.SIGKILL if len(first) > 1 else signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def stop_sweep(proc: subprocess.Popen, signum: int) -> None:
    """Pass the stop on to the sweep (a terminal's Ctrl-C reached it too: the cell takes the
    same signal once more without harm, see train.run_cell), which marks the training cell's run
    KILLED and keeps its last checkpoint; a second Ctrl-C, or a sweep still there after a minute,
    gets SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signum)
    while True:
        try:
            proc.wait(60)
            return
        except (subprocess.TimeoutExpired, Interrupted):  # too long, or the second Ctrl-C
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

"""`vgg-ablation study`: the six steps as a Hydra multirun, into one MLflow experiment.

The sweep itself is Hydra's (`python -m vgg_ablation.train --multirun arch=A,A-LRN,... seed=...`),
so any Hydra launcher (joblib, submitit for SLURM) takes it to a cluster unchanged. What this
module adds around it:
- everything is checked before the first job starts (names, data, shapes, the tracking store),
  and the store and the study's experiment are created once, here, not raced by the jobs;
- a unique sweep folder per launch (two launches in one second do not share one);
- with init=from_A, the A runs go first (their own sweep), as the deeper nets start from them;
- afterwards, the state of every cell is read back from MLflow: what finished, what failed, what
  is missing; the exit code is non-zero unless every cell FINISHED.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from vgg_ablation import tracking
from vgg_ablation.errors import UserError
from vgg_ablation.models import build_model, get_arch

DEFAULT_STUDY = "sample"


def study_overrides(args: list[str]) -> list[str]:
    """The user's overrides, with the default study when none is named."""
    # Inside a study, a line per cell tells the progress; Lightning's per-epoch bars are off
    # unless asked for (trainer.progress_bar=true, later on the line, wins).
    quiet = ["trainer.progress_bar=false"]
    if not any(a.split("=", 1)[0].lstrip("+~") == "experiment" for a in args):
        return [f"experiment={DEFAULT_STUDY}", *quiet, *args]
    experiment = [a for a in args if a.split("=", 1)[0].lstrip("+~") == "experiment"]
    return [*experiment, *quiet, *[a for a in args if a not in experiment]]


def check_study(cfg: DictConfig):
    """Refuse a study that cannot run, before any job starts; returns its data module."""
    from vgg_ablation.train import prepare

    if not cfg.study.archs:
        raise UserError("study.archs is empty: name at least one arch")
    if not cfg.study.seeds:
        raise UserError("study.seeds is empty: name at least one seed")
    for name in cfg.study.archs:
        try:
            get_arch(name)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    if cfg.model.init == "from_A" and "A" not in cfg.study.archs:
        raise UserError("model.init=from_A needs arch A in study.archs (the deeper nets start from it)")
    datamodule, _ = prepare(cfg)  # data and the first arch
    import torch

    for name in cfg.study.archs:  # every arch's shape, at no cost (meta device)
        try:
            with torch.device("meta"):
                build_model(
                    name,
                    num_classes=datamodule.num_classes,
                    input_size=datamodule.input_size,
                    width=cfg.model.width,
                    head=cfg.model.head,
                )
        except ValueError as exc:
            raise UserError(str(exc)) from None
    return datamodule


SCRATCH_CONTROL = ["model.init=kaiming"]


def needs_scratch_b(cfg: DictConfig) -> bool:
    """B-5x5 trains from scratch (nothing of A fits its 5x5 convs): in a study whose deeper nets
    start from A, claim 4 needs a B trained from scratch too, or it compares starts, not filters."""
    archs = list(cfg.study.archs)
    return cfg.model.init == "from_A" and "B-5x5" in archs and "B" in archs


def cell_configs(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """(label, config) of every net the study trains: its archs, plus 'B (scratch)' when needed."""
    from vgg_ablation.analysis import SCRATCH

    nets = [(arch, cfg) for arch in cfg.study.archs]
    if needs_scratch_b(cfg):
        nets.append((f"B{SCRATCH}", scratch_config(cfg)))
    return nets


def scratch_config(cfg: DictConfig) -> DictConfig:
    from omegaconf import open_dict

    scratch = cfg.copy()
    with open_dict(scratch):
        scratch.model.init = "kaiming"
    return scratch


def cell_states(cfg: DictConfig) -> pd.DataFrame:
    """One row per (net, seed) of the study: its latest run's status, or MISSING."""
    uri = tracking.tracking_uri(cfg.logger.tracking_uri)
    client = tracking.client(uri)
    experiment = client.get_experiment_by_name(tracking.experiment_name(cfg))
    rows = []
    for label, net_cfg in cell_configs(cfg):
        arch = label.split(" ")[0]
        for seed in cfg.study.seeds:
            runs = []
            if experiment is not None:
                key = tracking.cell_key(tracking.cell_cfg(net_cfg, arch, seed))
                runs = tracking.runs_of_cell(client, experiment.experiment_id, key)
            finished = [r for r in runs if r.info.status == "FINISHED"]
            run = (finished or runs or [None])[0]
            learned = ""
            if run is None:
                status, reason, acc, fit, started = "MISSING", "", None, None, None
            else:
                status = run.info.status
                if tracking.is_orphaned(run):
                    status = "RUNNING (orphaned)"
                reason = run.data.tags.get("failure_reason", "")
                acc = run.data.metrics.get("test/acc1")
                fit = run.data.metrics.get("time/fit_seconds")
                started = run.info.start_time / 1000
                learned = {"true": "yes", "false": "NO (at chance)"}.get(run.data.tags.get("learned", ""), "")
            rows.append(
                {
                    "arch": label,
                    "seed": seed,
                    "status": status,
                    "test top-1": acc,
                    "learned": learned,
                    "runs recorded": len(runs),
                    "reason": reason,
                    "fit_seconds": fit,
                    "started": started,
                }
            )
    return pd.DataFrame(rows)


def sweep_dir(cfg: DictConfig) -> Path:
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    return Path("multirun") / cfg.study.name / f"{stamp}-{secrets.token_hex(3)}"


PROGRESS_ENV = "VGG_ABLATION_PROGRESS"  # "<cells before this launch>:<cells in the study>:<start time>"


def launch(
    args: list[str],
    archs: list[str],
    seeds: list[int],
    folder: Path,
    seed_major: bool = False,
    progress: tuple[int, int, float] | None = None,
) -> int:
    """One Hydra multirun over archs x seeds in a subprocess: arch-major (the paper's order, and
    the trained A first for init=from_A), or seed-major, so that a study stopped early still holds
    complete paired blocks (every arch of seeds 0..k)."""
    sweep = ["arch=" + ",".join(archs), "seed=" + ",".join(str(s) for s in seeds)]
    command = [
        sys.executable,
        "-m",
        "vgg_ablation.train",
        "--multirun",
        *args,
        *(sweep[::-1] if seed_major else sweep),
        f"hydra.sweep.dir={folder}",
        "hydra/hydra_logging=disabled",  # its per-job line repeats every override: ours says k of N
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if progress:
        env[PROGRESS_ENV] = ":".join(map(str, progress))
    return subprocess.run(command, env=env).returncode


def run_study(args: list[str]) -> int:
    from vgg_ablation.cli import compose

    args = study_overrides(args)
    cfg = compose(args)
    datamodule = check_study(cfg)
    uri = tracking.tracking_uri(cfg.logger.tracking_uri)
    if not cfg.logger.enabled:
        raise UserError("a study records its runs in MLflow: drop logger=none")
    tracking.check_reachable(uri)
    # Create the store and the experiment once, here: many jobs opening a fresh SQLite store at
    # once race on its schema migration.
    client = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(client, tracking.experiment_name(cfg))
    tracking.describe_experiment(client, experiment_id, cfg.study.description)
    parent = tracking.open_study_run(client, experiment_id, cfg, study_params(cfg))
    # Pin the store for the jobs, so a relative default cannot drift between processes; every
    # cell becomes a child of the study's run.
    pinned = [a for a in args if not a.startswith(("logger.tracking_uri=", "logger.parent_run_id="))]
    pinned += [f"logger.tracking_uri={uri}", f"logger.parent_run_id={parent}"]

    archs, seeds = list(cfg.study.archs), list(cfg.study.seeds)
    phases = [archs]
    parallel = any(a.startswith("hydra/launcher=") for a in args)
    if cfg.model.init == "from_A" and archs != ["A"] and parallel:
        # The basic launcher runs the cells in order, A's seeds first (archs are swept
        # slowest): one sweep will do. A parallel launcher gets A's cells as a sweep of their own.
        phases = [["A"], [a for a in archs if a != "A"]]
    folder = sweep_dir(cfg)
    started = time.time()
    extra = [SCRATCH_CONTROL] if needs_scratch_b(cfg) else []
    launches = [(p, []) for p in phases] + [(["B"], e) for e in extra]
    total = sum(len(p) for p, _ in launches) * len(seeds)
    print(
        f"study {cfg.study.name}: {len(archs)} archs x {len(seeds)} seeds = {total} cells on {cfg.data.name}, "
        f"MLflow {uri} (experiment {tracking.experiment_name(cfg)}), sweep folder {folder}\n"
        f"{datamodule.describe()}\n"
        f"study run: {tracking.run_url(cfg.logger.ui_url, experiment_id, parent)} (`vgg-ablation ui` serves it)",
        flush=True,
    )
    exit_codes, before = [], 0
    for phase, overrides in launches:
        code = launch(pinned + overrides, phase, seeds, folder, seed_major=cfg.model.init != "from_A",
                      progress=(before, total, started))  # fmt: skip
        before += len(phase) * len(seeds)
        exit_codes.append(code)
        if code not in (0, 1):  # killed or interrupted: stop, do not start the next phase
            break

    states = cell_states(cfg)
    elapsed = time.time() - started
    print(f"\nstudy {cfg.study.name}: {elapsed:.0f} s wall time")
    print(states.drop(columns=["reason", "fit_seconds", "started"]).to_markdown(index=False, floatfmt=".3f"))
    trained_now = states[states["started"].fillna(0) >= started]
    if len(trained_now):
        fit = trained_now["fit_seconds"].fillna(0).sum()
        print(
            f"training (fit) {fit:.0f} s of {elapsed:.0f} s wall for the {len(trained_now)} runs of this launch: "
            f"fixed costs (start-up, data, tracking, testing, checkpoints) {(elapsed - fit) / elapsed:.0%}"
        )
    failed = states[states["status"] != "FINISHED"]
    for _, row in failed.iterrows():
        print(f"  {row['arch']} seed={row['seed']}: {row['status']} {row['reason']}".rstrip())
    counts = states["status"].value_counts().to_dict()
    print("summary: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    stopped = any(c not in (0, 1) for c in exit_codes)
    if len(failed) == 0 and all(c == 0 for c in exit_codes):
        from vgg_ablation.report import write_report

        path = write_report(cfg)  # also onto the study's run: report, plots, tables, verdicts
        client.set_terminated(parent, "FINISHED")  # only now: every cell FINISHED, report written
        print(f"report: {path}")
        return 0
    # The study's run follows its cells: KILLED when the sweep was stopped, else FAILED
    client.set_terminated(parent, "KILLED" if stopped else "FAILED")
    if stopped:
        print("the sweep was stopped; run the same command again to resume", file=sys.stderr)
        return next(c for c in exit_codes if c not in (0, 1))
    return 1


def study_params(cfg: DictConfig) -> dict:
    """What a user filters studies by, on the study's run (cells carry their own params)."""
    return {
        "data": cfg.data.name,
        "epochs": cfg.trainer.max_epochs,
        "width": cfg.model.width,
        "batch_norm": cfg.model.batch_norm,
        "init": cfg.model.init,
        "dropout": cfg.model.dropout,
        "lr": cfg.optim.lr,
        "schedule": cfg.optim.schedule,
        "warmup_epochs": cfg.optim.warmup_epochs,
        "batch_size": cfg.data.batch_size,
        "margin_points": cfg.study.margin,
        "min_effect_points": cfg.study.min_effect,
        "fingerprint": tracking.fingerprint(cfg),
    }

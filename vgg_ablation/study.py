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
from omegaconf import DictConfig, OmegaConf

from vgg_ablation import analysis, tracking
from vgg_ablation.cells import (
    DEADLINE_ENV,
    PROGRESS_ENV,
    SCRATCH_CONTROL,
    SCRATCH_LABEL,
    cell_cfg,
    cell_configs,
    cell_key,
    check_registered,
    design_of,
    fingerprint,
    rule_params,
    study_looks,
    study_run_key,
)
from vgg_ablation.config import compose, study_overrides
from vgg_ablation.errors import UserError
from vgg_ablation.models import build_model, get_arch


def check_study(cfg: DictConfig):
    """Refuse a study that cannot run, before any job starts; returns its data module."""
    from vgg_ablation.build import prepare

    if not cfg.study.archs:
        raise UserError("study.archs is empty: name at least one arch")
    if not cfg.study.seeds:
        raise UserError("study.seeds is empty: name at least one seed")
    for name in cfg.study.archs:
        try:
            get_arch(name)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    study = cfg.study
    if len(set(study.seeds)) != len(study.seeds):
        raise UserError(f"study.seeds has repeats: {list(study.seeds)}")
    if not 0 < study.alpha < 1:
        raise UserError(f"study.alpha must be between 0 and 1, got {study.alpha}")
    for key, margin in OmegaConf.to_container(study.margins).items():
        if not margin > 0:
            raise UserError(f"study.margins.{key} must be positive, got {margin}")
    if study.max_seeds:
        if len(study.seeds) < 2:
            raise UserError(
                "a study that runs until decided needs at least 2 seeds at its first look (study.seeds)"
            )
        if study.seeds_per_look < 1:
            raise UserError(f"study.seeds_per_look must be positive, got {study.seeds_per_look}")
        extra = study.max_seeds - len(study.seeds)
        if extra > 0 and extra % study.seeds_per_look:
            raise UserError(
                f"study.max_seeds={study.max_seeds} is not on the looks' grid: the first look has {len(study.seeds)} "
                f"seeds and each look adds {study.seeds_per_look}; try {study.max_seeds - extra % study.seeds_per_look} "
                f"or {study.max_seeds + study.seeds_per_look - extra % study.seeds_per_look}"
            )
    if study.time_limit is not None and not study.time_limit > 0:
        raise UserError(f"study.time_limit must be positive (minutes), got {study.time_limit}")
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


def cell_states(cfg: DictConfig, cells: list[tuple[str, int]] | None = None) -> pd.DataFrame:
    """One row per cell (net label, seed) of the study, by default every net x `study.seeds`:
    its latest run's status, or MISSING."""
    uri = tracking.tracking_uri(cfg.logger.tracking_uri)
    client = tracking.client(uri)
    experiment = client.get_experiment_by_name(tracking.experiment_name(cfg))
    configs = dict(cell_configs(cfg))
    if cells is None:
        cells = [(label, seed) for label in configs for seed in cfg.study.seeds]
    rows = []
    for label, seed in cells:
        net_cfg, arch = configs[label], label.split(" ")[0]
        runs = []
        if experiment is not None:
            key = cell_key(cell_cfg(net_cfg, arch, seed))
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


def launch(
    args: list[str],
    archs: list[str],
    seeds: list[int],
    folder: Path,
    seed_major: bool = False,
    progress: tuple[int, int, float] | None = None,
    deadline: float | None = None,
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
    if deadline:
        env[DEADLINE_ENV] = str(deadline)
    return subprocess.run(command, env=env).returncode


def run_study(args: list[str]) -> int:
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
    existing = tracking.find_study_run(client, experiment_id, study_run_key(cfg))
    registered = dict(existing.data.params) if existing else {}
    check_registered(cfg, registered)
    parent = tracking.open_study_run(
        client, experiment_id, cfg, study_run_key(cfg), {**study_params(cfg), **rule_params(cfg)}
    )
    design = design_of(cfg, registered or None)
    # Pin the store for the jobs, so a relative default cannot drift between processes; every
    # cell becomes a child of the study's run.
    pinned = [a for a in args if not a.startswith(("logger.tracking_uri=", "logger.parent_run_id="))]
    pinned += [f"logger.tracking_uri={uri}", f"logger.parent_run_id={parent}"]
    nets = [label for label, _ in cell_configs(cfg)]
    folder = sweep_dir(cfg)
    started = time.time()
    deadline = started + 60 * cfg.study.time_limit if cfg.study.time_limit else None
    plan = (
        f"looks at {', '.join(map(str, design.stages))} seeds per net, until every claim is decided"
        if design.sequential
        else f"{len(design.order)} seeds"
    )
    print(
        f"study {cfg.study.name}: {', '.join(nets)} x {plan}, on {cfg.data.name}, "
        f"MLflow {uri} (experiment {tracking.experiment_name(cfg)}), sweep folder {folder}\n"
        f"{datamodule.describe()}\n"
        f"study run: {tracking.run_url(cfg.logger.ui_url, experiment_id, parent)} (`vgg-ablation ui` serves it)",
        flush=True,
    )
    launched: list[tuple[str, int]] = []
    exit_codes, done_cells, stop_reason = [], 0, ""
    for k, size in enumerate(design.stages):
        grow = set(nets) if k == 0 else analysis.nets_to_grow(study_looks(cfg, design, k))
        if not grow:
            stop_reason = "every claim decided"
            break
        if deadline and time.time() >= deadline:
            stop_reason = f"time limit ({cfg.study.time_limit:g} min) reached before look {k + 1}"
            break
        new = design.order[design.stages[k - 1] if k else 0 : size]
        cells = stage_cells(cfg, nets, grow, new)
        if design.sequential:
            print(f"look {k + 1} of at most {len(design.stages)}: {', '.join(sorted({c for c, _ in cells}, key=nets.index))} "
                  f"get seeds {new[0]}-{new[-1]} ({size} per net)", flush=True)  # fmt: skip
        launched += cells
        code, done_cells = run_cells(cfg, pinned, cells, folder, (done_cells, started), deadline)
        exit_codes.append(code)
        if code not in (0, 1):  # killed or interrupted: stop, do not start the next stage
            break
        if design.sequential:
            record_looks(client, parent, cfg, design, k + 1)
    else:
        stop_reason = "maximum reached" if design.sequential else ""
    if deadline and time.time() >= deadline and not stop_reason:
        stop_reason = f"time limit ({cfg.study.time_limit:g} min) reached"
    return finish_study(cfg, client, parent, launched, exit_codes, started, stop_reason)


def stage_cells(cfg: DictConfig, nets: list[str], grow: set[str], seeds: list[int]) -> list[tuple[str, int]]:
    """The cells of one stage: the nets that grow, with A first when deeper nets start from it."""
    chosen = [n for n in nets if n in grow]
    if cfg.model.init == "from_A" and any(
        get_arch(n.split(" ")[0]).depth > 11 for n in chosen if n != SCRATCH_LABEL
    ):
        chosen = ["A", *[n for n in chosen if n != "A"]]  # the deeper nets need this seed's trained A
    return [(net, seed) for net in chosen for seed in seeds]


def run_cells(cfg, pinned, cells, folder, progress, deadline) -> tuple[int, int]:
    """Train these cells: one Hydra multirun per group of nets sharing a start (the trained A
    first, the scratch control apart), finished cells skipped. Returns the worst exit code and
    the cells done so far in the study."""
    before, started = progress
    nets = list(dict.fromkeys(net for net, _ in cells))
    seeds = list(dict.fromkeys(seed for _, seed in cells))
    archs = [n for n in nets if n != SCRATCH_LABEL]
    phases = [(archs, [])] if archs else []
    parallel = any(a.startswith("hydra/launcher=") for a in pinned)
    if cfg.model.init == "from_A" and "A" in archs and archs != ["A"] and parallel:
        # The basic launcher runs the cells in order, A's seeds first (archs are swept
        # slowest): one sweep will do. A parallel launcher gets A's cells as a sweep of their own.
        phases = [(["A"], []), ([a for a in archs if a != "A"], [])]
    if SCRATCH_LABEL in nets:
        phases.append((["B"], SCRATCH_CONTROL))
    total = before + len(cells)
    codes = []
    for archs_, overrides in phases:
        code = launch(pinned + overrides, archs_, seeds, folder, seed_major=cfg.model.init != "from_A",
                      progress=(before, total, started), deadline=deadline)  # fmt: skip
        before += len(archs_) * len(seeds)
        codes.append(code)
        if code not in (0, 1):
            return code, before
    return max(codes, default=0), before


def record_looks(client, parent: str, cfg: DictConfig, design: analysis.Design, stages: int) -> None:
    """The looks so far onto the study's run (looks.json) and one line each on the console."""
    record = []
    for o in study_looks(cfg, design, stages):
        c, last = o.comparison, o.last
        verdict = (analysis.sequential.VERDICTS[o.code] if o.state == "decided"
                   else {"maximum": "undecided at the maximum", "open": "open"}.get(o.state, o.state))  # fmt: skip
        record.append({"claim": c.claim.number, "first": c.first, "second": c.second, "state": o.state,
                       "verdict": verdict, "looks": [vars(lk) for lk in o.looks]})  # fmt: skip
        if last is not None:
            print(f"  {c.first} vs {c.second}: {last.n} paired seeds, Δ {100 * last.mean:+.2f} points, "
                  f"interval [{100 * last.low:+.2f}, {100 * last.high:+.2f}]: {verdict}", flush=True)  # fmt: skip
    client.log_dict(parent, {"stages_done": stages, "comparisons": record}, "looks.json")


def finish_study(cfg, client, parent, launched, exit_codes, started, stop_reason) -> int:
    """The table of the study's cells, the report, the study run's status, the exit code."""
    states = cell_states(cfg, launched)
    elapsed = time.time() - started
    print(
        f"\nstudy {cfg.study.name}: {elapsed:.0f} s wall time"
        + (f"; stopped: {stop_reason}" if stop_reason else "")
    )
    print(states.drop(columns=["reason", "fit_seconds", "started"]).to_markdown(index=False, floatfmt=".3f"))
    trained_now = states[states["started"].fillna(0) >= started]
    if len(trained_now):
        fit = trained_now["fit_seconds"].fillna(0).sum()
        print(
            f"training (fit) {fit:.0f} s of {elapsed:.0f} s wall for the {len(trained_now)} runs of this launch: "
            f"fixed costs (start-up, data, tracking, testing, checkpoints) {(elapsed - fit) / elapsed:.0%}"
        )
    timed_out = "time limit" in stop_reason
    unfinished = states[(states["status"] != "FINISHED") & ~(timed_out & (states["status"] == "MISSING"))]
    for _, row in unfinished.iterrows():
        print(f"  {row['arch']} seed={row['seed']}: {row['status']} {row['reason']}".rstrip())
    counts = states["status"].value_counts().to_dict()
    print("summary: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    stopped = any(c not in (0, 1) for c in exit_codes)
    if stopped:
        client.set_terminated(parent, "KILLED")
        print("the sweep was stopped; run the same command again to resume", file=sys.stderr)
        return next(c for c in exit_codes if c not in (0, 1))
    if (states["status"] == "FINISHED").any():
        from vgg_ablation.report import write_report

        path = write_report(cfg, stop_reason=stop_reason)  # also onto the study's run
        print(f"report: {path}")
    ok = len(unfinished) == 0 and all(c == 0 for c in exit_codes)
    # The study's run follows its cells: FINISHED only when every cell is (and the report is on it)
    client.set_terminated(parent, "FINISHED" if ok else "FAILED")
    return 0 if ok else 1


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
        "margins_points": ",".join(
            f"{k}={v:g}" for k, v in OmegaConf.to_container(cfg.study.margins).items()
        ),
        "min_effect_points": cfg.study.min_effect,
        "fingerprint": fingerprint(cfg),
    }

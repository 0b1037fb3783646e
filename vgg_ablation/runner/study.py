"""`vgg-ablation study`: a study as Hydra multiruns into one MLflow experiment, look by look.

The sweeps themselves are Hydra's (`python -m vgg_ablation.training.train --multirun arch=A,B seed=...`),
so any Hydra launcher (joblib, submitit for SLURM) takes them to a cluster unchanged. What this
module adds around them:
- everything is checked before the first job starts (names, data, shapes, the tracking store, a
  registered rule), and the store and the study's experiment are created once, here, not raced;
- a unique sweep folder per launch (two launches in one second do not share one), and no launch
  where every cell of it has FINISHED (a re-run of a finished study starts no process or job);
- the study's looks (cells.design_of): after each one the verdicts are replayed on what FINISHED,
  and only the nets of a comparison still open get the next look's seeds (a fixed-seed study
  has one look); with init=from_A, each seed's A trains before the deeper nets;
- a time limit (`study.time_limit`) after which no new cell starts and the report is written;
- Ctrl-C or SIGTERM stop the cell that is training (it is marked KILLED and keeps its last
  checkpoint), mark the study's run KILLED and end with one line; a second Ctrl-C stops at once;
- afterwards, every cell's state read back from MLflow, the report, and an exit code that is 0
  only when every cell FINISHED.

About 490 lines, one concern: one study's life from its checks to its exit code, in the order it
happens (open, looks, launches, stops, finish); its stop handling is part of launching a sweep.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from vgg_ablation.config import compose, study_overrides, with_study_dir
from vgg_ablation.errors import UserError
from vgg_ablation.runner import phases
from vgg_ablation.runner.sweeps import Interrupted, a_first, launch, skip_flags, stopped_by_signals, sweep_dir
from vgg_ablation.study import analysis
from vgg_ablation.study.cells import (
    SCRATCH_CONTROL,
    SCRATCH_LABEL,
    cell_cfg,
    cell_configs,
    cell_key,
    check_registered,
    clock,
    design_of,
    net_labels,
    rule_params,
    study_params,
    study_run_key,
)
from vgg_ablation.study.reference_cells import lr_override
from vgg_ablation.study.sequential import VERDICTS
from vgg_ablation.study.snapshot import StudyRuns
from vgg_ablation.tracking import stores
from vgg_ablation.training.build import arch_of, data_for, device_choice, model_for, validate


# -- before any job -------------------------------------------------------------------------------------
def check_study(cfg: DictConfig):
    """Refuse a study that cannot run, before any job starts; returns its data module."""
    import torch

    study = cfg.study
    if not study.archs:
        raise UserError("study.archs is empty: name at least one arch")
    if not study.seeds:
        raise UserError("study.seeds is empty: name at least one seed")
    for name in study.archs:
        arch_of(name)
    check_rule(study)
    if cfg.model.init == "from_A" and "A" not in study.archs:
        raise UserError("model.init=from_A needs arch A in study.archs (the deeper nets start from it)")
    if not cfg.logger.enabled:
        raise UserError("a study records its runs in MLflow: drop logger=none")
    validate(cfg)
    datamodule = data_for(cfg)
    with torch.device("meta"):  # every arch's shape, at no cost
        for name in study.archs:
            model_for(cfg, name, datamodule)
    return datamodule


def check_rule(study) -> None:
    """The rule's settings: seeds, error, margins, the looks' grid, the time limit."""
    if len(set(study.seeds)) != len(study.seeds):
        raise UserError(f"study.seeds has repeats: {list(study.seeds)}")
    if not 0 < study.alpha < 1:
        raise UserError(f"study.alpha must be between 0 and 1, got {study.alpha}")
    if not 0 <= study.futility < 1:
        raise UserError(f"study.futility must be in [0, 1) (0: no futility stops), got {study.futility}")
    for key, margin in OmegaConf.to_container(study.margins).items():
        if not margin > 0:
            raise UserError(f"study.margins.{key} must be positive, got {margin}")
    if study.time_limit is not None and not study.time_limit > 0:
        raise UserError(f"study.time_limit must be positive (minutes), got {study.time_limit}")
    if not study.max_seeds:
        return
    if len(study.seeds) < 2:
        raise UserError(
            "a study that runs until decided needs at least 2 seeds at its first look (study.seeds)"
        )
    if study.seeds_per_look < 1:
        raise UserError(f"study.seeds_per_look must be positive, got {study.seeds_per_look}")
    extra = study.max_seeds - len(study.seeds)
    if extra > 0 and extra % study.seeds_per_look:
        lower = study.max_seeds - extra % study.seeds_per_look
        raise UserError(
            f"study.max_seeds={study.max_seeds} is not on the looks' grid: the first look has {len(study.seeds)} "
            f"seeds and each look adds {study.seeds_per_look}; try {lower} or {lower + study.seeds_per_look}"
        )


# -- the study's sweep ----------------------------------------------------------------------------------
@dataclass
class Sweep:
    """A study in progress: its config, store, run, looks, and what it launched."""

    cfg: DictConfig
    client: object
    parent: str  # the study's MLflow run
    pinned: list[str]  # the overrides every cell gets
    design: analysis.Design
    folder: Path
    started: float = field(default_factory=time.time)
    launched: list[tuple[str, int]] = field(default_factory=list)
    exit_codes: list[int] = field(default_factory=list)
    done: int = 0  # cells launched so far (progress lines count on from here)

    @property
    def nets(self) -> list[str]:
        return net_labels(self.cfg)

    @property
    def deadline(self) -> float | None:
        limit = self.cfg.study.time_limit
        return self.started + 60 * limit if limit else None


def run_study(args: list[str]) -> int:
    with stopped_by_signals():
        try:
            sweep = open_study(with_study_dir(study_overrides(args)))
        except (Interrupted, phases.SelectionStopped) as exc:
            code = exc.code if isinstance(exc, phases.SelectionStopped) else 128 + exc.signum
            print("the study stopped during its lr selection (its cells marked KILLED, their checkpoints kept); "
                  "run the same command again to resume", file=sys.stderr, flush=True)  # fmt: skip
            return code
        try:
            return finish_study(sweep, run_looks(sweep))
        except Interrupted as exc:
            return end_interrupted(sweep, exc.signum)


def open_study(args: list[str]) -> Sweep:
    """Check everything, then create the store, the experiment and the study's run, once (with
    study.lr_grid, after choosing each net's lr: its cells then train at it)."""
    cfg = compose(args)
    datamodule = check_study(cfg)
    uri = stores.tracking_uri(cfg.logger.tracking_uri)
    stores.check_reachable(uri)
    # Created here, not by the jobs: many processes opening a fresh SQLite store race on its schema.
    client = stores.client(uri)
    experiment_id = stores.ensure_experiment(client, stores.experiment_name(cfg))
    stores.describe_experiment(client, experiment_id, cfg.study.description)
    folder = sweep_dir(cfg)
    filled = fill_the_machine(cfg, args)  # its lr selection's cells too: the same setting throughout
    if filled:
        args = [*args, *filled]
        cfg = compose(args)
    if cfg.study.lr_grid and not cfg.optim.lr_per_arch:
        base = [a for a in args if not a.startswith(("logger.tracking_uri=", "logger.parent_run_id="))]
        chosen = phases.select_lrs(cfg, client, experiment_id, [*base, f"logger.tracking_uri={uri}"], folder)
        args = [*args, lr_override(chosen)]
        cfg = compose(args)
    existing = stores.find_study_run(client, experiment_id, study_run_key(cfg))
    registered = dict(existing.data.params) if existing else {}
    check_registered(cfg, registered)
    check_cells_setting(cfg, registered)
    setting = {**cells_setting(cfg), "cells.side_by_side": side_by_side(args)}
    parent = stores.open_study_run(
        client, experiment_id, cfg, study_run_key(cfg), {**study_params(cfg), **rule_params(cfg), **setting}
    )
    # Pin the store for the jobs, so a relative default cannot drift between processes; every
    # cell becomes a child of the study's run.
    pinned = [a for a in args if not a.startswith(("logger.tracking_uri=", "logger.parent_run_id="))]
    pinned += [f"logger.tracking_uri={uri}", f"logger.parent_run_id={parent}"]
    sweep = Sweep(cfg, client, parent, pinned, design_of(cfg, registered or None), folder)
    looks = sweep.design.stages
    plan = (f"looks at {', '.join(map(str, looks))} seeds per net, until every claim is decided"
            if sweep.design.sequential else f"{len(sweep.design.order)} seeds")  # fmt: skip
    print(
        f"study {cfg.study.name}: {', '.join(sweep.nets)} x {plan}, on {cfg.data.name}, MLflow {uri} "
        f"(experiment {stores.experiment_name(cfg)}), sweep folder {sweep.folder}\n{datamodule.describe()}\n"
        f"study run: {stores.run_url(cfg.logger.ui_url, experiment_id, parent)} (`vgg-ablation ui` serves it)",
        flush=True,
    )
    return sweep


def run_looks(sweep: Sweep) -> str:
    """Each look's cells, then its verdicts; returns why the study stopped."""
    cfg, design = sweep.cfg, sweep.design
    seen = StudyRuns.read(cfg)  # where the study stands: read once a look, after its cells
    for k, size in enumerate(design.stages):
        grow = set(sweep.nets) if k == 0 else analysis.nets_to_grow(looked := seen.looks(design, k))
        if not grow:
            futile = any(o.state == "futile" for o in looked)
            return "every comparison decided or stopped as futile" if futile else "every claim decided"
        if sweep.deadline and time.time() >= sweep.deadline:
            return f"time limit ({cfg.study.time_limit:g} min) reached before look {k + 1}"
        new = design.order[design.stages[k - 1] if k else 0 : size]
        cells = stage_cells(cfg, sweep.nets, grow, new)
        if design.sequential:
            nets = ", ".join(sorted({c for c, _ in cells}, key=sweep.nets.index))
            print(f"look {k + 1} of at most {len(design.stages)}: {nets} get seeds {new[0]}-{new[-1]} "
                  f"({size} per net)", flush=True)  # fmt: skip
        sweep.launched += cells
        code = run_cells(sweep, cells, seen)
        sweep.exit_codes.append(code)
        if code not in (0, 1):  # a cell was killed: stop, start nothing more
            return "stopped"
        if k == 0 and cfg.study.convergence_epochs:  # the longer-budget cells, once, with the first look
            code = phases.run_convergence(cfg, sweep.client, experiment_of(sweep), sweep.pinned,
                                          design.order[: cfg.study.convergence_seeds], sweep.folder)  # fmt: skip
            sweep.exit_codes.append(code)
            if code not in (0, 1):
                return "stopped"
        seen = StudyRuns.read(cfg)
        if design.sequential:
            record_looks(sweep, k + 1, seen)
            if k + 1 < len(design.stages):
                write_documents(sweep.cfg)  # an interim report and archive: the study travels now
    if sweep.deadline and time.time() >= sweep.deadline:
        return f"time limit ({cfg.study.time_limit:g} min) reached"
    return "maximum reached" if design.sequential else ""


def side_by_side(pinned: list[str]) -> int:
    """Cells the study's launcher trains at once (its n_jobs), for the time left."""
    jobs = [a.split("=", 1)[1] for a in pinned if a.startswith("hydra.launcher.n_jobs=")]
    return int(jobs[-1]) if jobs and jobs[-1].isdigit() else 1


def fill_the_machine(cfg: DictConfig, args: list[str]) -> list[str]:
    """How a study's cells fill a CPU: a cell per core, one thread each, side by side (Hydra's joblib
    launcher), unless the user chose a launcher, a thread count or study.parallel=off. Measured in
    reports/bench-cpu-cells.md: more cells per hour than one cell on every core, and a 1-thread cell
    does not collapse beside other work as a 2-thread one does. A GPU study is left as it is."""
    import torch

    gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    if gpu or cfg.study.parallel == "off" or str(cfg.trainer.devices) not in ("1", "auto"):
        return []
    out = [] if cfg.trainer.threads else ["trainer.threads=1"]
    chose = any(a.startswith(("hydra/launcher=", "hydra.launcher.")) for a in args)
    jobs = max(1, (os.cpu_count() or 1) // (cfg.trainer.threads or 1))
    if not chose and jobs > 1:
        out += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]
    return out


# What a study registers of how its cells compute, and the option that sets each; the device and
# precision follow from the machine (accelerator and precision "auto", in the cells' keys)
CELLS_SETTING = {"cells.threads": "trainer.threads", "cells.compile": "trainer.compile",
                 "cells.channels_last": "trainer.channels_last", "cells.device": None, "cells.precision": None}  # fmt: skip


def cells_setting(cfg: DictConfig) -> dict[str, str]:
    """What a study registers of how its cells compute: the settings that move the numbers
    (another device or precision computes otherwise; another thread count, layout or compiled
    graph sums in another order). Studies registered before a setting was kept are not held to it."""
    accelerator, precision, _ = device_choice(cfg)
    cpu_one_thread = cfg.trainer.threads == 1 and cfg.trainer.accelerator in ("auto", "cpu")
    layout = cfg.trainer.channels_last == "on" or (cfg.trainer.channels_last == "auto" and cpu_one_thread)
    return {"cells.threads": str(cfg.trainer.threads), "cells.compile": str(cfg.trainer.compile).lower(),
            "cells.channels_last": "on" if layout else "off", "cells.device": accelerator,
            "cells.precision": precision}  # fmt: skip


def check_cells_setting(cfg: DictConfig, registered: dict) -> None:
    """A study's cells keep one setting (`cells_setting`: the same seed gives other numbers under
    another), so a study continued elsewhere (on a GPU, say, after a CPU) takes the one it was
    registered with."""
    mine = cells_setting(cfg)
    changed = [f"{k.removeprefix('cells.')} {registered[k]} -> {v}" for k, v in mine.items()
               if k in registered and registered[k] != v]  # fmt: skip
    if changed:
        keep = " ".join(
            f"{CELLS_SETTING[k]}={registered[k]}" for k in mine if k in registered and CELLS_SETTING[k]
        )
        device = registered.get("cells.device", mine["cells.device"])
        if device != mine["cells.device"]:
            keep += ", on " + ("a CPU (CUDA_VISIBLE_DEVICES= hides this machine's GPUs)" if device == "cpu"
                               else f"a machine with a {device.upper()}")  # fmt: skip
        raise UserError(f"study {cfg.study.name!r} trained its cells with another setting ({'; '.join(changed)}): "
                        f"its numbers stay comparable only with one; continue it with {keep}")  # fmt: skip


def experiment_of(sweep: Sweep) -> str:
    return sweep.client.get_run(sweep.parent).info.experiment_id


def stage_cells(cfg: DictConfig, nets: list[str], grow: set[str], seeds: list[int]) -> list[tuple[str, int]]:
    """The cells of one look: the nets that grow, with A first when deeper nets start from it."""
    chosen = [n for n in nets if n in grow]
    deeper = [n for n in chosen if n != SCRATCH_LABEL and arch_of(n).depth > arch_of("A").depth]
    if cfg.model.init == "from_A" and deeper:
        chosen = ["A", *[n for n in chosen if n != "A"]]  # the deeper nets need this seed's trained A
    return [(net, seed) for net in chosen for seed in seeds]


def run_cells(sweep: Sweep, cells: list[tuple[str, int]], seen: StudyRuns) -> int:
    """Train these cells: one Hydra multirun per group of nets sharing a start (the trained A
    first, the scratch control apart), finished cells skipped (a group whose cells all FINISHED
    is not launched at all; `seen`: the study's runs as the look found them, read again after a
    group's sweep for the next). Returns the worst exit code."""
    cfg = sweep.cfg
    nets = list(dict.fromkeys(net for net, _ in cells))
    seeds = list(dict.fromkeys(seed for _, seed in cells))
    archs = [n for n in nets if n != SCRATCH_LABEL]
    groups = [(archs, [])] if archs else []
    parallel = any(a.startswith("hydra/launcher=") for a in sweep.pinned)
    if archs and parallel:
        # The basic launcher runs the cells in order, A's seeds first (archs are swept
        # slowest): one sweep will do. A parallel launcher gets A's cells as a sweep of their own.
        groups = [(group, []) for group in a_first(cfg, archs)]
    if SCRATCH_LABEL in nets:
        groups.append((["B"], SCRATCH_CONTROL))
    total, codes = sweep.done + len(cells), []
    for i, (archs_, overrides) in enumerate(groups):
        # for the time left: what will skip, what a cell takes (a group after the first reads the
        # store again: the group before it trained cells)
        finished = (seen if i == 0 else StudyRuns.read(cfg)).finished_cells()
        labels = [SCRATCH_LABEL] if overrides else archs_
        ahead = sum((net, seed) in finished for net in labels for seed in seeds)
        if ahead == len(labels) * len(seeds) and skip_finished(sweep, labels, seeds, finished, total):
            # Nothing to train: no sweep (a launcher's processes, or a cluster's jobs, that
            # would each import everything only to skip its cell)
            codes.append(0)
            continue
        times = [f.seconds for f in finished.values()]
        seed_major = cfg.model.init != "from_A"
        flags = skip_flags(labels, seeds, seed_major, lambda net, seed, _, done=finished: (net, seed) in done)
        progress = (
            sweep.done,
            total,
            sweep.started,
            sum(times),
            len(times),
            flags,
            side_by_side(sweep.pinned),
        )
        code = launch(sweep.pinned + overrides, archs_, seeds, sweep.folder, seed_major=seed_major,
                      progress=progress, deadline=sweep.deadline)  # fmt: skip
        sweep.done += len(archs_) * len(seeds)
        codes.append(code)
        if code not in (0, 1):
            return code
    return max(codes, default=0)


def skip_finished(sweep: Sweep, nets: list[str], seeds: list[int], finished: dict, total: int) -> bool:
    """Cells whose runs FINISHED, said in the study's voice as a cell would say it; a run
    recorded outside this study (a `train` of the same config) is nested under it first, as a
    cell adopts it. False when the store refused that: the cells are launched and see to it."""
    from mlflow.exceptions import MlflowException

    cells = [(net, seed) for net in nets for seed in seeds]
    try:
        for cell in cells:
            if finished[cell].parent != sweep.parent:
                sweep.client.set_tag(finished[cell].run_id, stores.PARENT_TAG, sweep.parent)
    except (MlflowException, OSError):
        return False
    for net, seed in cells:
        sweep.done += 1
        print(f"[{sweep.done}/{total} · {clock(time.time() - sweep.started)}] {net} seed={seed}: "
              f"already FINISHED (run {finished[(net, seed)].run_id}), skipped", flush=True)  # fmt: skip
    return True


def end_interrupted(sweep: Sweep, signum: int) -> int:
    """One line: which cells were stopped, and how to resume; the study's run KILLED."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # nothing more to stop: finish these lines
    sweep.client.set_terminated(sweep.parent, "KILLED")
    states = cell_states(sweep.cfg, sweep.launched)
    stopped = states[states["status"].isin(["KILLED", "RUNNING", "RUNNING (orphaned)"])]
    cells = (
        ", ".join(f"{r['arch']} seed={r['seed']}" for _, r in stopped.iterrows()) or "no cell was training"
    )
    how = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}.get(signum, "a second Ctrl-C (at once)")
    print(f"study {sweep.cfg.study.name} stopped by {how}: {cells} marked KILLED, last checkpoint kept; "
          "run the same command again to resume", file=sys.stderr, flush=True)  # fmt: skip
    return 128 + (signal.SIGTERM if signum == signal.SIGTERM else signal.SIGINT)


# -- after the sweeps -----------------------------------------------------------------------------------
def record_looks(sweep: Sweep, stages: int, seen: StudyRuns) -> None:
    """The looks so far onto the study's run (looks.json) and one line each on the console."""
    record = []
    for o in seen.looks(sweep.design, stages):
        c, last = o.comparison, o.last
        chance = (
            f" (chance of a verdict by {sweep.design.stages[-1]} seeds: {o.chance:.0%})"
            if o.chance is not None
            else ""
        )
        verdict = (VERDICTS[o.code] if o.state == "decided"
                   else {"maximum": "undecided at the maximum", "open": f"open{chance}",
                         "futile": f"undecided: futile at this budget{chance}"}.get(o.state, o.state))  # fmt: skip
        record.append({"claim": c.claim.number, "first": c.first, "second": c.second, "state": o.state,
                       "verdict": verdict, "looks": [vars(lk) for lk in o.looks]})  # fmt: skip
        if last is not None:
            print(f"  {c.first} vs {c.second}: {last.n} paired seeds, Δ {100 * last.mean:+.2f} points, "
                  f"interval [{100 * last.low:+.2f}, {100 * last.high:+.2f}]: {verdict}", flush=True)  # fmt: skip
    sweep.client.log_dict(sweep.parent, {"stages_done": stages, "comparisons": record}, "looks.json")


def finish_study(sweep: Sweep, stop_reason: str) -> int:
    """The table of the study's cells, the report, the study run's status, the exit code."""
    cfg = sweep.cfg
    states = cell_states(cfg, sweep.launched)
    elapsed = time.time() - sweep.started
    print(
        f"\nstudy {cfg.study.name}: {elapsed:.0f} s wall time"
        + (f"; stopped: {stop_reason}" if stop_reason else "")
    )
    print(states.drop(columns=["reason", "fit_seconds", "started"]).to_markdown(index=False, floatfmt=".3f"))
    trained_now = states[states["started"].fillna(0) >= sweep.started]
    if len(trained_now):
        fit, at_once = trained_now["fit_seconds"].fillna(0).sum(), side_by_side(sweep.pinned)
        capacity = elapsed * at_once  # cell-seconds the launch had: its wall time x the cells trained at once
        print(f"training (fit) {fit:.0f} cell-s of {capacity:.0f} ({elapsed:.0f} s wall x {at_once} cell(s) at once) "
              f"for the {len(trained_now)} runs of this launch: the rest (start-up, data, tracking, testing, "
              f"checkpoints, idle cores) {max(capacity - fit, 0) / capacity:.0%}")  # fmt: skip
    timed_out = "time limit" in stop_reason
    unfinished = states[(states["status"] != "FINISHED") & ~(timed_out & (states["status"] == "MISSING"))]
    for _, row in unfinished.iterrows():
        print(f"  {row['arch']} seed={row['seed']}: {row['status']} {row['reason']}".rstrip())
    print("summary: " + ", ".join(f"{n} {s}" for s, n in states["status"].value_counts().to_dict().items()))
    if any(c not in (0, 1) for c in sweep.exit_codes):
        sweep.client.set_terminated(sweep.parent, "KILLED")
        print("the sweep was stopped; run the same command again to resume", file=sys.stderr)
        return next(c for c in sweep.exit_codes if c not in (0, 1))
    documents = (states["status"] == "FINISHED").any()
    if documents:
        write_report_of(cfg, stop_reason)
    ok = len(unfinished) == 0 and all(c == 0 for c in sweep.exit_codes)
    # The study's run follows its cells: FINISHED only when every cell is (and the report is on it).
    # Its archive comes after, so that it carries the run as it ended, not RUNNING (which an
    # import would take for a study still going on another machine).
    sweep.client.set_terminated(sweep.parent, "FINISHED" if ok else "FAILED")
    if documents:
        write_archive_of(cfg)
    return 0 if ok else 1


def write_documents(cfg: DictConfig, stop_reason: str = "") -> None:
    """The report (also onto the study's run), and the study's archive beside it: what a user
    commits, or carries to another machine, to continue the study there."""
    write_report_of(cfg, stop_reason)
    write_archive_of(cfg)


def write_report_of(cfg: DictConfig, stop_reason: str = "") -> None:
    from vgg_ablation.report.document import write_report

    path = write_report(cfg, stop_reason=stop_reason)
    print(f"report: {path}", flush=True)


def write_archive_of(cfg: DictConfig) -> None:
    from vgg_ablation.runner.travel import archive_path, export_for

    if cfg.archive.with_report:
        done = export_for(cfg, archive_path(cfg))
        print(f"archive: {done.path} ({done.runs} runs; `vgg-ablation import {done.path}` carries the study "
              "to another store)", flush=True)  # fmt: skip


def cell_states(cfg: DictConfig, cells: list[tuple[str, int]] | None = None) -> pd.DataFrame:
    """One row per cell (net label, seed) of the study, by default every net x `study.seeds`:
    its latest run's status, or MISSING."""
    client = stores.client(stores.tracking_uri(cfg.logger.tracking_uri))
    experiment = client.get_experiment_by_name(stores.experiment_name(cfg))
    configs = dict(cell_configs(cfg))
    if cells is None:
        cells = [(label, seed) for label in configs for seed in cfg.study.seeds]
    return pd.DataFrame(
        [_cell_state(client, experiment, configs[label], label, seed) for label, seed in cells]
    )


def _cell_state(client, experiment, net_cfg: DictConfig, label: str, seed: int) -> dict:
    runs = []
    if experiment is not None:
        key = cell_key(cell_cfg(net_cfg, label.split(" ")[0], seed))
        runs = stores.runs_of_cell(client, experiment.experiment_id, key)
    run = ([r for r in runs if r.info.status == "FINISHED"] or runs or [None])[0]
    row = {"arch": label, "seed": seed, "status": "MISSING", "test top-1": None, "learned": "",
           "runs recorded": len(runs), "reason": "", "fit_seconds": None, "started": None}  # fmt: skip
    if run is not None:
        row.update(
            status="RUNNING (orphaned)" if stores.is_orphaned(run) else run.info.status,
            reason=run.data.tags.get("failure_reason", ""),
            learned={"true": "yes", "false": "NO (at chance)"}.get(run.data.tags.get("learned", ""), ""),
            fit_seconds=run.data.metrics.get("time/fit_seconds"),
            started=run.info.start_time / 1000,
        )
        row["test top-1"] = run.data.metrics.get("test/acc1")
    return row

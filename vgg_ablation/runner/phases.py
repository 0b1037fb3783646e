"""What trains the cells a study has beside its test cells (reference_cells.py says what they are
and reads them): the lr selection's sweep before the first look, and the convergence cells with it.
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from vgg_ablation.errors import UserError
from vgg_ablation.runner.sweeps import a_first, launch, skip_flags
from vgg_ablation.study.cells import cell_cfg, cell_key, fingerprint
from vgg_ablation.study.reference_cells import convergence_config, finished_runs, read_selection, variant
from vgg_ablation.tracking import stores


# -- the lr selection ------------------------------------------------------------------------------------
def select_lrs(
    cfg: DictConfig, client, experiment_id: str, pinned: list[str], folder: Path
) -> dict[str, float]:
    """Each net's lr, chosen on validation: the selection's cells trained first if they have not all
    ended (one Hydra multirun over nets x lrs x seeds), then read back."""
    selection = read_selection(cfg, client, experiment_id)
    if selection.chosen is None:
        base = variant(cfg, optim__lr_per_arch={}, trainer__test=False)
        key = f"{cfg.study.name}/{fingerprint(base)}"
        grid = ",".join(f"{lr:g}" for lr in cfg.study.lr_grid)
        params = {"lr_grid": grid, "lr_seeds": ",".join(map(str, cfg.study.lr_seeds))}
        parent = stores.open_study_run(client, experiment_id, base, key, params, tag=stores.SELECTION_TAG,
                                         name=f"lr selection {cfg.study.name}")  # fmt: skip
        todo = (selection.table["status"] == "MISSING").sum()
        print(f"lr selection: {', '.join(cfg.study.archs)} x lr {grid} x seeds "
              f"{', '.join(map(str, cfg.study.lr_seeds))} ({todo} cells to train, validation only)", flush=True)  # fmt: skip
        cells = len(cfg.study.archs) * len(cfg.study.lr_grid) * len(cfg.study.lr_seeds)
        jobs = [a.split("=", 1)[1] for a in pinned if a.startswith("hydra.launcher.n_jobs=")]
        progress = (0, cells, time.time(), 0.0, 0, int(jobs[-1]) if jobs else 1)
        ended = {(r.net, r.seed, r.lr) for r in selection.table.itertuples() if r.status == "FINISHED"}
        code = launch_starts_first(cfg, [*pinned, f"logger.parent_run_id={parent}", "trainer.test=false", f"optim.lr={grid}"],
                                   list(cfg.study.lr_seeds), folder / "lr-selection", progress,
                                   lambda arch, seed, lr: (arch, seed, lr) in ended, list(cfg.study.lr_grid))  # fmt: skip
        if code not in (0, 1):
            raise SelectionStopped(code)
        selection = read_selection(cfg, client, experiment_id)
        client.set_terminated(parent, "FINISHED" if selection.chosen else "FAILED")
    if selection.chosen is None:
        left = selection.table[~selection.table["status"].isin(["FINISHED", "FAILED"])]
        raise UserError(f"the lr selection has {len(left)} cell(s) that did not end ({', '.join(left['status'].unique())}): "
                        "run the same command again")  # fmt: skip
    print("lr per net (lowest mean validation error): "
          + ", ".join(f"{net} {lr:g}" for net, lr in selection.chosen.items()), flush=True)  # fmt: skip
    return selection.chosen


class SelectionStopped(Exception):
    """The lr selection's sweep was stopped (Ctrl-C, SIGTERM): its exit code."""

    def __init__(self, code: int):
        super().__init__(f"the lr selection's sweep stopped ({code})")
        self.code = code


# -- convergence -----------------------------------------------------------------------------------------
def run_convergence(cfg: DictConfig, client, experiment_id: str, pinned: list[str], seeds: list[int],
                    folder: Path) -> int:  # fmt: skip
    """The convergence cells (each net, `seeds`, the longer budget); those FINISHED are not launched."""
    longer = convergence_config(cfg)
    fp = fingerprint(longer)
    done = finished_runs(client, experiment_id, fp)
    keys = [cell_key(cell_cfg(longer, arch, seed), fp) for arch in cfg.study.archs for seed in seeds]
    ended = [k for k in keys if k in done and done[k].info.status == "FINISHED"]
    print(f"convergence: {', '.join(cfg.study.archs)} x seeds {', '.join(map(str, seeds))} at "
          f"{longer.trainer.max_epochs} epochs (validation only): {len(keys) - len(ended)} cells to train", flush=True)  # fmt: skip
    if len(ended) == len(keys):
        return 0
    overrides = [f"trainer.max_epochs={longer.trainer.max_epochs}", "trainer.test=false"]
    jobs = [a.split("=", 1)[1] for a in pinned if a.startswith("hydra.launcher.n_jobs=")]
    progress = (0, len(keys), time.time(), 0.0, 0, int(jobs[-1]) if jobs else 1)
    return launch_starts_first(cfg, [*pinned, *overrides], seeds, folder / "convergence", progress,
                               lambda arch, seed, _: cell_key(cell_cfg(longer, arch, seed), fp) in ended)  # fmt: skip


def launch_starts_first(cfg: DictConfig, args: list[str], seeds: list[int], folder: Path, progress: tuple,
                        finished, lrs: list | None = None) -> int:  # fmt: skip
    """The study's nets x `seeds` (x `lrs`, swept slowest), seed-major: one sweep, or A's first
    (`a_first`). `progress`: (done, total, started, seconds, timed, side by side), each sweep told
    which of its jobs will skip (`finished(arch, seed, lr)`), in Hydra's order."""
    groups = a_first(cfg, list(cfg.study.archs))
    worst, (done, *rest) = 0, progress
    for i, group in enumerate(groups):
        where = folder if len(groups) == 1 else folder / f"{i + 1}-{'A' if group == ['A'] else 'from-A'}"
        flags = skip_flags(group, seeds, True, finished, lrs)
        code = launch(args, group, seeds, where, seed_major=True, progress=(done, *rest[:4], flags, rest[4]))
        if code not in (0, 1):
            return code
        worst, done = max(worst, code), done + len(flags) - 1
    return worst

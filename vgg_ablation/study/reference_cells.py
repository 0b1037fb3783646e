"""The cells a study trains beside its test cells, and what they say: its lr selection (each net at
each lr of `study.lr_grid`, on `study.lr_seeds`: each net then trains at the lr with its lowest
mean validation error, `optim.lr_per_arch`) and its convergence cells (each net on the study's first
seeds at `study.convergence_epochs`: a net whose validation error the longer budget lowers by less
than `study.convergence_tolerance` points had converged at the study's budget).

Validation only (`trainer.test=false`): the test set is the test cells'. Their configs differ from
the study's (an lr, a budget, no test pass), so their fingerprints and cell keys are their own and
they never count as results; they travel in the study's archive with the rest. What trains them is
the orchestrator's (phases.py); the study and the report read them here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
from omegaconf import DictConfig, open_dict

from vgg_ablation.study.cells import cell_cfg, cell_key, fingerprint


def variant(cfg: DictConfig, **changes) -> DictConfig:
    """The study's config with some keys changed (dotted names as keywords: trainer__test=False)."""
    out = cfg.copy()
    with open_dict(out):
        for dotted, value in changes.items():
            section, key = dotted.split("__")
            out[section][key] = value
    return out


def finished_runs(client, experiment_id: str, fp: str) -> dict[str, object]:
    """Each cell's run of a config fingerprint, by cell key: its FINISHED one when it has one
    (whatever that run measured: these cells have no test metrics), else its latest attempt."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.fingerprint = '{fp}'", max_results=5000)
    out: dict[str, object] = {}
    for run in runs:
        key = run.data.tags.get("cell")
        if key and (key not in out or (run.info.status == "FINISHED" and out[key].info.status != "FINISHED")):
            out[key] = run
    return out


def _val_err(run) -> float:
    best = run.data.metrics.get("val/acc1_best")
    return 1 - best if best is not None else math.nan


def selection_configs(cfg: DictConfig) -> dict[float, DictConfig]:
    """One config per candidate lr: the study's at that lr, one lr for every net, no test pass."""
    return {
        float(lr): variant(cfg, optim__lr=float(lr), optim__lr_per_arch={}, trainer__test=False)
        for lr in cfg.study.lr_grid
    }


@dataclass
class Selection:
    table: pd.DataFrame  # net, lr, seed, status, val_err1 (a FAILED cell counts as error 1)
    chosen: dict[str, float] | None  # None until every cell has ended


def read_selection(cfg: DictConfig, client, experiment_id: str, digest: str | None = None) -> Selection:
    """Each selection cell's validation error, and each net's lr once every cell has ended (`digest`:
    the data's, when it is not read here)."""
    rows = []
    for lr, c in selection_configs(cfg).items():
        fp = fingerprint(c, digest)
        runs = finished_runs(client, experiment_id, fp)
        for arch in cfg.study.archs:
            for seed in cfg.study.lr_seeds:
                run = runs.get(cell_key(cell_cfg(c, arch, int(seed)), fp))
                status = run.info.status if run is not None else "MISSING"
                err = _val_err(run) if status == "FINISHED" else (1.0 if status == "FAILED" else math.nan)
                rows.append({"net": arch, "lr": lr, "seed": int(seed), "status": status, "val_err1": err})
    table = pd.DataFrame(rows)
    if table.empty or not table["status"].isin(["FINISHED", "FAILED"]).all():
        return Selection(table, None)
    means = table.groupby(["net", "lr"], sort=False)["val_err1"].mean()
    chosen = {net: float(means[net].idxmin()) for net in cfg.study.archs}  # the grid's first among equals
    return Selection(table, chosen)


def lr_override(chosen: dict[str, float]) -> str:
    """The chosen lrs as the Hydra override every test cell gets (++: the mapping's keys are new)."""
    return "++optim.lr_per_arch={" + ",".join(f"{net}:{lr:g}" for net, lr in chosen.items()) + "}"


def convergence_config(cfg: DictConfig) -> DictConfig:
    return variant(cfg, trainer__max_epochs=int(cfg.study.convergence_epochs), trainer__test=False)


def read_convergence(cfg: DictConfig, client, experiment_id: str, res: pd.DataFrame,
                     digest: str | None = None) -> pd.DataFrame:  # fmt: skip
    """Per net: its validation error at the study's budget (its test cells on the convergence seeds)
    and at the longer one, paired by seed, and whether it had converged."""
    if not cfg.study.convergence_epochs:
        return pd.DataFrame()
    longer = convergence_config(cfg)
    fp = fingerprint(longer, digest)
    runs = finished_runs(client, experiment_id, fp)
    rows = []
    for arch in cfg.study.archs:
        pairs = []
        for seed in sorted({int(s) for s in res.loc[res["net"] == arch, "seed"]}):
            run = runs.get(cell_key(cell_cfg(longer, arch, seed), fp))
            if run is None or run.info.status != "FINISHED":
                continue
            short = res[(res["net"] == arch) & (res["seed"] == seed)].iloc[0]
            pairs.append((seed, 1 - short["val_acc1_best"], _val_err(run), short.get("train_err1"),
                          run.data.metrics.get("train/err1")))  # fmt: skip
        if not pairs:
            continue
        frame = pd.DataFrame(pairs, columns=["seed", "val_short", "val_long", "train_short", "train_long"])
        gain = float((frame["val_short"] - frame["val_long"]).mean())
        rows.append({
            "net": arch, "seeds": len(frame), "val_err_short": frame["val_short"].mean(),
            "val_err_long": frame["val_long"].mean(), "gain": gain,
            "train_err_short": pd.to_numeric(frame["train_short"]).mean(),
            "train_err_long": pd.to_numeric(frame["train_long"]).mean(),
            "converged": gain < cfg.study.convergence_tolerance / 100,
        })  # fmt: skip
    return pd.DataFrame(rows).set_index("net") if rows else pd.DataFrame()

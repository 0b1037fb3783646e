"""A study's runs as a table: MLflow's search results, typed (`tidy`, `load_runs`), the results
that count (`results`: one FINISHED run per net and seed), whether a run learned (`above_chance`),
the seeds that failed (`failures`), and all of it as the looks read it (`observe`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

CHANCE_ALPHA = 0.01  # a run "learned" when its test accuracy beats chance at this level

SCRATCH = " (scratch)"  # label of a net trained from scratch in a study whose deeper nets start from A

RUN_COLUMNS = {
    "params.arch": "arch",
    "params.seed": "seed",
    "params.depth": "depth",
    "params.params": "params",
    "params.epochs": "epochs",
    "params.init": "init",
    "params.num_classes": "num_classes",
    "params.train_images": "train_images",
    "params.val_images": "val_images",
    "params.data_digest": "data_digest",
    "params.lrn_scale": "lrn_scale",
    "params.version": "version",
    "metrics.test/images": "test_images",
    "metrics.test/err1": "test_err1",
    "metrics.test/err5": "test_err5",
    "metrics.test/acc1": "test_acc1",
    "metrics.images_seen": "images_seen",
    "metrics.val/acc1_best": "val_acc1_best",
    "metrics.train/err1": "train_err1",  # its last epoch's (measured on augmented batches, dropout on)
    "metrics.flops_per_image": "flops_per_image",
    "metrics.lrn/denominator_mean": "lrn_mean",
    "metrics.lrn/denominator_p99": "lrn_p99",
    "metrics.time/seconds": "seconds",
    "tags.learned": "learned",
    "tags.failure_reason": "failure_reason",
    "tags.host": "host",
    "tags.pid": "pid",
    "tags.cell": "cell",  # the cell's key (cells.cell_key)
    "tags.fingerprint": "fingerprint",  # its config's (cells.fingerprint)
    "tags.rebuilt_from": "rebuilt_from",  # a run rebuilt from a report's runs CSV (archive.py)
    "tags.origin_run": "origin_run",  # the id it was first recorded under (an imported run)
    "tags.attempts": "attempts",  # a cell taken over after a kill or failure: its attempts so far
    "tags.resumed_after_epochs": "resumed_after_epochs",  # ... and the epochs its checkpoint held
    "tags.mlflow.parentRunId": "parent_run",  # the study run it is nested under
    "tags.device": "device",
    "tags.cpu_threads": "cpu_threads",
    "tags.git_commit": "git_commit",
    "tags.torch_version": "torch_version",
    "tags.lightning_version": "lightning_version",
}

NUMERIC = ("seed", "depth", "params", "epochs", "num_classes", "train_images", "val_images", "test_images")


def tidy(raw: pd.DataFrame) -> pd.DataFrame:
    """MLflow's search_runs frame -> one typed row per run, with `net`: the arch, or
    'B (scratch)' for a from-scratch control in a study whose deeper nets start from A."""
    df = pd.DataFrame({"run_id": raw.get("run_id", pd.Series(dtype=str)), "status": raw.get("status")})
    for source, name in RUN_COLUMNS.items():
        df[name] = raw.get(source, np.nan)
    for name in NUMERIC:
        df[name] = pd.to_numeric(df[name], errors="coerce")
    df["start_time"] = raw.get("start_time")
    df["end_time"] = raw.get("end_time")
    df["net"] = df["arch"]
    if (df["init"] == "from_A").any():
        deeper = df["depth"] > 11
        df.loc[deeper & (df["init"] != "from_A"), "net"] = df["arch"] + SCRATCH
    return df


def load_runs(tracking_uri: str, experiment: str, fingerprints: list[str] | None = None) -> pd.DataFrame:
    """Every run of a study (optionally of some config fingerprints), tidy, newest first."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return tidy(pd.DataFrame())
    order = ["attributes.start_time DESC"]
    if not fingerprints:
        raw = mlflow.search_runs([found.experiment_id], order_by=order)
    else:  # tags take no IN: one search per fingerprint
        parts = [
            mlflow.search_runs(
                [found.experiment_id], filter_string=f"tags.fingerprint = '{fp}'", order_by=order
            )
            for fp in fingerprints
        ]
        raw = pd.concat([p for p in parts if not p.empty] or [parts[0]], ignore_index=True)
    return tidy(raw)


def results(runs: pd.DataFrame) -> pd.DataFrame:
    """One FINISHED run per (net, seed): the results that count. Nothing else is a result:
    FAILED, KILLED and RUNNING runs (orphaned or live) are listed in the report, never averaged."""
    done = runs[(runs["status"] == "FINISHED") & runs["test_err1"].notna()].copy()
    if "net" not in done:
        done["net"] = done["arch"]
    done = done.sort_values("start_time", ascending=False).drop_duplicates(["net", "seed"])
    done["learned"] = [run_learned(r) for _, r in done.iterrows()]
    return done


def above_chance(acc1: float, test_images: int, num_classes: int) -> tuple[bool, float]:
    """Did a run learn? Its test top-1 accuracy against 1/classes: a one-sided binomial test at
    CHANCE_ALPHA; (verdict, p). The run records it (tag `learned`); the report reads that tag."""
    correct = int(round(acc1 * test_images))
    p = stats.binomtest(correct, int(test_images), 1 / num_classes, alternative="greater").pvalue
    return bool(p < CHANCE_ALPHA), float(p)


def run_learned(row: pd.Series) -> bool:
    """The run's own verdict (tag `learned`), else `above_chance` on its recorded metrics."""
    tag = row.get("learned")
    if isinstance(tag, str) and tag in ("true", "false"):
        return tag == "true"
    k, n, acc = row.get("num_classes"), row.get("test_images"), row.get("test_acc1")
    if not k or not n or pd.isna(k) or pd.isna(n) or pd.isna(acc):
        return bool(acc > 1.5 / k) if k and not pd.isna(k) else True
    return above_chance(acc, int(n), int(k))[0]


def failures(runs: pd.DataFrame, res: pd.DataFrame) -> dict[str, dict[int, str]]:
    """Per net, the seeds whose cell FAILED (and has no FINISHED run), with the reason."""
    counted = {(r["net"], int(r["seed"])) for _, r in res.iterrows()}
    out: dict[str, dict[int, str]] = {}
    failed = runs[(runs["status"] == "FAILED") & runs["seed"].notna()]
    for _, r in failed.iterrows():
        key = (r["net"], int(r["seed"]))
        if key not in counted:
            reason = r["failure_reason"] if isinstance(r.get("failure_reason"), str) else ""
            out.setdefault(r["net"], {})[key[1]] = reason
    return out


@dataclass
class Observed:
    """A study's runs as the looks read them."""

    res: pd.DataFrame  # one FINISHED run per (net, seed): the results
    errors: dict[str, dict[int, float]]  # test top-1 error per net and seed (FINISHED)
    failed: dict[str, dict[int, str]]  # per net, seeds that FAILED (no FINISHED run), with the reason
    settled: dict[str, set[int]]  # per net, seeds FINISHED or FAILED: what a look may count


def observe(runs: pd.DataFrame) -> Observed:
    res = results(runs)
    errors = {n: dict(zip(g["seed"].astype(int), g["test_err1"], strict=True)) for n, g in res.groupby("net")}
    failed = failures(runs, res)
    settled = {n: set(errors.get(n, {})) | set(failed.get(n, {})) for n in set(errors) | set(failed)}
    return Observed(res, errors, failed, settled)

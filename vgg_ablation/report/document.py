"""`vgg-ablation report`: reports/<study>.md, its plots and its runs CSV, from MLflow alone.

`gather` reads everything once from MLflow; one renderer per section (report_sections.py) turns
it into lines and report_plots.py draws the figures; `write_report` writes the document, the runs
CSV beside it, and puts them on the study's run."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from vgg_ablation.errors import UserError
from vgg_ablation.files import atomic_write
from vgg_ablation.report import sections as sections
from vgg_ablation.report.plots import plots as draw
from vgg_ablation.report.sections import Gathered
from vgg_ablation.study import analysis, reference_cells
from vgg_ablation.study.cells import (
    SCRATCH_LABEL,
    design_of,
    margins_of,
    net_labels,
    study_fingerprints,
)
from vgg_ablation.study.snapshot import recorded_digest
from vgg_ablation.tracking import runtable, stores


def _histories(client, runs: pd.DataFrame, metrics=("val/err1",)) -> pd.DataFrame:
    """Each run's curves, a row per (net, seed, epoch), a column per metric; and `logged_at`, when
    the first metric's value was recorded (seconds since the epoch), for the time an epoch took."""
    rows: dict[tuple, dict] = {}
    for _, run in runs.iterrows():
        for metric in metrics:
            for m in client.get_metric_history(run["run_id"], metric):  # a resumed run re-logs some
                key = (run["net"], run["seed"], m.step)  # epochs: the last value wins
                row = rows.setdefault(key, {"net": key[0], "seed": key[1], "epoch": key[2]})
                row[metric] = m.value
                if metric == metrics[0]:
                    row["logged_at"] = m.timestamp / 1000
    return pd.DataFrame(list(rows.values()))


def gather(cfg: DictConfig, stop_reason: str = "") -> Gathered:
    uri = stores.tracking_uri(cfg.logger.tracking_uri)
    stores.check_reachable(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(
            f"no runs recorded for study {cfg.study.name!r}: there is no MLflow store at {uri}; "
            f"run `vgg-ablation study experiment={cfg.study.name}` first (or set MLFLOW_TRACKING_URI)"
        )
    experiment = stores.experiment_name(cfg)
    client = stores.client(uri)
    exp = client.get_experiment_by_name(experiment)
    digest, data_here = data_digest(cfg)
    selection = None
    if cfg.study.lr_grid and exp is not None:
        selection = reference_cells.read_selection(cfg, client, exp.experiment_id, digest)
        if not cfg.optim.lr_per_arch:
            if selection.chosen is None:
                raise UserError(f"study {cfg.study.name!r}: its lr selection has not finished, so its nets' lrs are "
                                f"not chosen yet; `vgg-ablation study experiment={cfg.study.name}` finishes it")  # fmt: skip
            cfg = reference_cells.variant(cfg, optim__lr_per_arch=selection.chosen)
    fps = study_fingerprints(cfg, digest)
    runs = runtable.load_runs(uri, experiment, fps)
    if runs.empty:
        raise UserError(
            f"no runs recorded for study {cfg.study.name!r} (this config) in {uri}; "
            f"run `vgg-ablation study experiment={cfg.study.name}` first"
        )
    res = runtable.results(runs)
    if res.empty:
        raise UserError(f"study {cfg.study.name!r} has runs in {uri} but none FINISHED yet")
    parent = stores.find_study_run(client, exp.experiment_id, f"{cfg.study.name}/{fps[0]}") if exp else None
    design = design_of(cfg, dict(parent.data.params) if parent else None)
    summary = analysis.per_arch(res, order=[*cfg.study.archs, SCRATCH_LABEL])
    concl = analysis.conclusions(
        runs, net_labels(cfg), cfg.model.init == "from_A", design.rule, margins_of(cfg), design.order,
        design.stages, min_effect=cfg.study.min_effect / 100, claims=design.claims, futility=design.futility,
    )  # fmt: skip
    if not stop_reason and design.sequential:
        stop_reason = _stop_reason(concl, list(design.stages))
    convergence = (
        reference_cells.read_convergence(cfg, client, exp.experiment_id, res, digest) if exp else None
    )
    curves = _histories(client, res, ("val/err1", "train/err1"))
    return Gathered(cfg, uri, experiment, exp, parent, fps, runs, res, summary, curves, design, concl, stop_reason,
                    client, data_here, selection, convergence)  # fmt: skip


def data_digest(cfg: DictConfig) -> tuple[str | None, bool]:
    """The study's data digest, and whether it was read here: from the data when it is on this
    machine, else the one its runs recorded (a study imported to be re-analysed needs no data)."""
    from vgg_ablation.data.datasets import identify

    try:
        return identify(cfg.data).digest, True
    except UserError:
        configs = [cfg, *reference_cells.selection_configs(cfg).values()]
        digest = recorded_digest(cfg, configs)
        if digest is None:
            raise
        return digest, False


def _stop_reason(concl, stages: list[int]) -> str:
    """Where a run-until-decided study stands, read from its verdicts."""
    states = set(concl["state"])
    if states <= {"decided", "not tested", "identical"}:
        return "every claim decided"
    if states <= {"decided", "not tested", "identical", "futile"}:
        return "every comparison decided or stopped as futile"
    if "open" not in states and "no data" not in states:
        return "maximum reached"
    taken = int(concl["looks"].max()) if not concl.empty else 0
    if taken == 0:
        return (f"Interim report, before the first look (at {stages[0]} seeds per net); "
                "the same command continues the study")  # fmt: skip
    return (f"Interim report after look {taken} of at most {len(stages)}; the open "
            "comparisons continue at the next look (the same command continues the study)")  # fmt: skip


RUN_CSV_COLUMNS = ["net", "arch", "seed", "status", "test_err1", "test_err5", "val_err1_best", "train_err1",
                   "epochs", "lr", "seconds", "attempts", "resumed_after_epochs", "learned", "failure_reason",
                   "run_id", "origin_run"]  # fmt: skip


def write_runs_csv(g: Gathered, path: Path) -> None:
    """Every run of the study, one row each: enough to recheck the statistics without the store.
    A cell taken over after a kill shows its attempts and the epochs it resumed after (its seconds
    are its last attempt's); `origin_run` is the id a run was first recorded under (imports)."""
    lr = g.runs["arch"].map(
        lambda a: g.cfg.optim.lr_per_arch.get(a, g.cfg.optim.lr) if isinstance(a, str) else None
    )
    runs = g.runs.assign(val_err1_best=1 - g.runs["val_acc1_best"], lr=lr,
                         attempts=g.runs["attempts"].astype(object).fillna("1"), origin_run=g.runs["origin_run"].astype(object).fillna(g.runs["run_id"]))  # fmt: skip
    runs = runs.sort_values(["net", "seed", "start_time"])[RUN_CSV_COLUMNS]
    atomic_write(path, lambda p: runs.to_csv(p, index=False, float_format="%.6g"))


def run_report(args: list[str]) -> int:
    """`vgg-ablation report`: regenerate a study's report from its MLflow runs alone; with several
    studies (experiment=a,b,...), each one's report and one table of their claims side by side."""
    from vgg_ablation.config import compose, study_overrides

    named = [a.split("=", 1)[1] for a in args if a.split("=", 1)[0] == "experiment"]
    names = named[-1].split(",") if named else []
    if len(names) < 2:
        g = gather(compose(study_overrides(args)))
        print(f"wrote {write_gathered(g)}")
        return 0
    rest = [a for a in args if a.split("=", 1)[0] != "experiment"]
    studies = []
    for name in names:
        g = gather(compose(study_overrides([f"experiment={name}", *rest])))
        print(f"wrote {write_gathered(g)}")
        studies.append(g)
    path = Path(studies[0].cfg.study.reports_dir) / f"budgets-{'-'.join(names)}.md"
    text = "\n".join(sections.side_by_side(studies))
    atomic_write(path, lambda p: p.write_text(text))
    print(f"wrote {path}")
    return 0


def write_report(cfg: DictConfig, out_dir: Path | None = None, stop_reason: str = "") -> Path:
    """<study.reports_dir>/<study>.md, its plots and its runs CSV; also onto the study's MLflow run."""
    return write_gathered(gather(cfg, stop_reason), out_dir)


def write_gathered(g: Gathered, out_dir: Path | None = None) -> Path:
    cfg = g.cfg
    out_dir = Path(out_dir or Path(cfg.study.reports_dir).expanduser())
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = draw(cfg.study.name, g.summary, g.res, g.curves, out_dir)
    parts = [
        sections.header(g),
        sections.headline(g),
        sections.per_network(g),
        sections.verdicts(g),
        sections.convergence(g),
        sections.lr_selection(g),
        sections.looks(g),
        sections.seeds(g),
        sections.planning(g),
        sections.next_step(g),
        sections.lrn(g.summary, g.res),
        sections.compute(g),
        sections.designs(),
        ["## Plots", "", *[f"![{name}]({name})" for name in plots], ""],
        sections.not_counted(g),
        sections.dashboard(g),
    ]
    path = out_dir / f"{cfg.study.name}.md"
    text = "\n".join(line for part in parts for line in part)
    atomic_write(path, lambda p: p.write_text(re.sub(r"\n{3,}", "\n\n", text)))
    csv = out_dir / f"{cfg.study.name}-runs.csv"
    write_runs_csv(g, csv)
    if g.parent is not None:
        publish(
            g.client, g.parent.info.run_id, [path, csv, *[out_dir / n for n in plots]], g.summary, g.concl
        )
    return path


def publish(client, run_id: str, files: list[Path], summary: pd.DataFrame, concl: pd.DataFrame) -> None:
    """The report onto the study's run: the markdown and its plots as artifacts (report/), the
    per-net summary and the verdicts as MLflow tables, each claim's verdict as a tag and its Δ
    and each net's mean error as metrics (comparable across studies in the runs table)."""
    from mlflow.entities import Metric

    for file in files:
        client.log_artifact(run_id, str(file), "report")
    # MLflow appends a table to the one already logged under its name: each report (a study's
    # looks, a later `report`) adds its rows, stamped with when it was written; the latest stamp
    # is the current verdict, the earlier ones its history
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    client.log_table(run_id, summary.reset_index().rename(columns={"index": "net"}).assign(reported_at=stamp),
                     "summary.json")  # fmt: skip
    now = int(time.time() * 1000)
    metrics = [
        Metric(f"test_err1/{_metric_name(net)}", float(100 * r["top1_err_mean"]), now, 0)
        for net, r in summary.iterrows()
    ]
    if not concl.empty:
        wanted = [
            "claim",
            "first",
            "second",
            "margin",
            "outcome",
            "detail",
            "n",
            "looks",
            "diff",
            "level",
            "ci_low",
            "ci_high",
            "notes",
        ]
        shown = concl[[c for c in wanted if c in concl]].assign(reported_at=stamp)
        client.log_table(run_id, shown, "claims.json")
        for _, r in concl.iterrows():  # a claim may have several comparisons (depth: B-A, D-B, E-D)
            key = f"claim{r['claim']}/{_metric_name(r['first'])}_vs_{_metric_name(r['second'])}"
            client.set_tag(run_id, key, str(r["outcome"]))
            if not pd.isna(r.get("diff")):
                metrics.append(Metric(f"{key}/delta_err1_points", float(100 * r["diff"]), now, 0))
    client.log_batch(run_id, metrics=metrics)


def _metric_name(net: str) -> str:
    return re.sub(r"[^\w\-. /]", "", net).strip().replace(" ", "_")

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

from vgg_ablation import analysis, runtable, tracking
from vgg_ablation import report_sections as sections
from vgg_ablation.cells import (
    SCRATCH_LABEL,
    design_of,
    margins_of,
    net_labels,
    recorded_fingerprints,
    study_fingerprints,
)
from vgg_ablation.errors import UserError
from vgg_ablation.report_plots import _atomic_write
from vgg_ablation.report_plots import plots as draw
from vgg_ablation.report_sections import Gathered

REPORTS_DIR = Path("reports")


def _histories(client, runs: pd.DataFrame, metric: str = "val/err1") -> pd.DataFrame:
    rows = []
    for _, run in runs.iterrows():
        seen = {}
        for m in client.get_metric_history(run["run_id"], metric):
            seen[m.step] = m.value  # a resumed run re-logs some epochs: the last value wins
        rows += [{"net": run["net"], "seed": run["seed"], "epoch": s, metric: v} for s, v in seen.items()]
    return pd.DataFrame(rows)


def gather(cfg: DictConfig, stop_reason: str = "") -> Gathered:
    uri = tracking.tracking_uri(cfg.logger.tracking_uri)
    tracking.check_reachable(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(
            f"no runs recorded for study {cfg.study.name!r}: there is no MLflow store at {uri}; "
            f"run `vgg-ablation study experiment={cfg.study.name}` first (or set MLFLOW_TRACKING_URI)"
        )
    experiment = tracking.experiment_name(cfg)
    try:
        fps, data_here = study_fingerprints(cfg), True
    except UserError:  # the data is not on this machine: the digest its runs recorded names it
        fps, data_here = recorded_fingerprints(cfg), False
        if not fps:
            raise
    runs = runtable.load_runs(uri, experiment, fps)
    if runs.empty:
        raise UserError(
            f"no runs recorded for study {cfg.study.name!r} (this config) in {uri}; "
            f"run `vgg-ablation study experiment={cfg.study.name}` first"
        )
    res = runtable.results(runs)
    if res.empty:
        raise UserError(f"study {cfg.study.name!r} has runs in {uri} but none FINISHED yet")
    client = tracking.client(uri)
    exp = client.get_experiment_by_name(experiment)
    parent = tracking.find_study_run(client, exp.experiment_id, f"{cfg.study.name}/{fps[0]}") if exp else None
    design = design_of(cfg, dict(parent.data.params) if parent else None)
    summary = analysis.per_arch(res, order=[*cfg.study.archs, SCRATCH_LABEL])
    concl = analysis.conclusions(
        runs, net_labels(cfg), cfg.model.init == "from_A", design.rule, margins_of(cfg), design.order,
        design.stages, min_effect=cfg.study.min_effect / 100,
    )  # fmt: skip
    if not stop_reason and design.sequential:
        stop_reason = _stop_reason(concl, list(design.stages))
    return Gathered(cfg, uri, experiment, exp, parent, fps, runs, res, summary, _histories(client, res),
                    design, concl, stop_reason, client, data_here)  # fmt: skip


def _stop_reason(concl, stages: list[int]) -> str:
    """Where a run-until-decided study stands, read from its verdicts."""
    states = set(concl["state"])
    if states <= {"decided", "not tested", "identical"}:
        return "every claim decided"
    if "open" not in states and "no data" not in states:
        return "maximum reached"
    taken = int(concl["looks"].max()) if not concl.empty else 0
    if taken == 0:
        return (f"Interim report, before the first look (at {stages[0]} seeds per net); "
                "the same command continues the study")  # fmt: skip
    return (f"Interim report after look {taken} of at most {len(stages)}; the open "
            "comparisons continue at the next look (the same command continues the study)")  # fmt: skip


RUN_CSV_COLUMNS = ["net", "arch", "seed", "status", "test_err1", "test_err5", "val_err1_best", "epochs",
                   "seconds", "learned", "failure_reason", "run_id"]  # fmt: skip


def write_runs_csv(g: Gathered, path: Path) -> None:
    """Every run of the study, one row each: enough to recheck the statistics without the store."""
    runs = g.runs.assign(val_err1_best=1 - g.runs["val_acc1_best"])
    runs = runs.sort_values(["net", "seed", "start_time"])[RUN_CSV_COLUMNS]
    _atomic_write(path, lambda p: runs.to_csv(p, index=False, float_format="%.6g"))


def run_report(args: list[str]) -> int:
    """`vgg-ablation report`: regenerate a study's report from its MLflow runs alone."""
    from vgg_ablation.config import compose, study_overrides

    path = write_report(compose(study_overrides(args)))
    print(f"wrote {path}")
    return 0


def write_report(cfg: DictConfig, out_dir: Path = REPORTS_DIR, stop_reason: str = "") -> Path:
    """reports/<study>.md, its plots and its runs CSV; also onto the study's MLflow run."""
    g = gather(cfg, stop_reason)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = draw(cfg.study.name, g.summary, g.res, g.curves, out_dir)
    parts = [
        sections.header(g),
        sections.headline(g),
        sections.per_network(g),
        sections.verdicts(g),
        sections.looks(g),
        sections.seeds(g),
        sections.planning(g),
        sections.lrn(g.summary, g.res),
        sections.compute(g),
        sections.designs(),
        ["## Plots", "", *[f"![{name}]({name})" for name in plots], ""],
        sections.not_counted(g),
        sections.dashboard(g),
    ]
    path = out_dir / f"{cfg.study.name}.md"
    text = "\n".join(line for part in parts for line in part)
    _atomic_write(path, lambda p: p.write_text(re.sub(r"\n{3,}", "\n\n", text)))
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
    client.log_table(run_id, summary.reset_index().rename(columns={"index": "net"}), "summary.json")
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
        shown = concl[[c for c in wanted if c in concl]]
        client.log_table(run_id, shown, "claims.json")
        for _, r in concl.iterrows():  # a claim may have several comparisons (depth: B-A, D-B, E-D)
            key = f"claim{r['claim']}/{_metric_name(r['first'])}_vs_{_metric_name(r['second'])}"
            client.set_tag(run_id, key, str(r["outcome"]))
            if not pd.isna(r.get("diff")):
                metrics.append(Metric(f"{key}/delta_err1_points", float(100 * r["diff"]), now, 0))
    client.log_batch(run_id, metrics=metrics)


def _metric_name(net: str) -> str:
    return re.sub(r"[^\w\-. /]", "", net).strip().replace(" ", "_")

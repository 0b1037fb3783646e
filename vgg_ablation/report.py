"""`vgg-ablation report`: reports/<study>.md and its plots, regenerated from MLflow alone."""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from vgg_ablation import analysis, design, tracking
from vgg_ablation.errors import UserError
from vgg_ablation.models import PAPER_STEPS

REPORTS_DIR = Path("reports")
# facts.md, Table 3, single test scale, S=256: ImageNet val top-1 / top-5 error, %.
PAPER_TABLE3 = {
    "A": (29.6, 10.4),
    "A-LRN": (29.7, 10.5),
    "B": (28.7, 9.9),
    "C": (28.1, 9.4),
    "D": (27.0, 8.8),
    "E": (27.3, 9.0),
}


def md_escape(text: object) -> str:
    """Run names, tags and failure reasons come from outside: escape what markdown would act on."""
    s = str(text).replace("\n", " ").replace("\r", " ")
    return re.sub(r"([\\`*_\[\]<>|])", r"\\\1", s)


def pct(x: float, digits: int = 1) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _histories(client, runs: pd.DataFrame, metric: str = "val/err1") -> pd.DataFrame:
    rows = []
    for _, run in runs.iterrows():
        seen = {}
        for m in client.get_metric_history(run["run_id"], metric):
            seen[m.step] = m.value  # a resumed run re-logs some epochs: the last value wins
        rows += [{"net": run["net"], "seed": run["seed"], "epoch": s, metric: v} for s, v in seen.items()]
    return pd.DataFrame(rows)


def _plots(
    study: str, summary: pd.DataFrame, res: pd.DataFrame, curves: pd.DataFrame, out: Path
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []

    def save(fig, suffix: str) -> None:
        name = f"{study}-{suffix}.png"
        _atomic_write(out / name, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
        plt.close(fig)
        names.append(name)

    vgg = summary[summary["arch"].isin([*PAPER_STEPS, "B-5x5"])]
    # Nets of equal depth (A and A-LRN at 11, C and D at 16) side by side, not on top of each other.
    rank = vgg.groupby("depth").cumcount()
    size = vgg.groupby("depth")["depth"].transform("size")
    x = vgg["depth"] + 0.3 * (rank - (size - 1) / 2)
    fig, ax = plt.subplots(figsize=(6, 4))
    for arch, row in vgg.iterrows():
        seeds = res.loc[res["net"] == arch, "test_err1"] * 100
        ax.scatter([x[arch]] * len(seeds), seeds, s=12, alpha=0.4, color="grey")
        ax.errorbar(
            x[arch], row["top1_err_mean"] * 100, yerr=(row["top1_err_std"] or 0) * 100, fmt="o", capsize=4
        )
        ax.annotate(arch, (x[arch], row["top1_err_mean"] * 100), textcoords="offset points", xytext=(6, 4))
    ax.set(
        xlabel="weight layers",
        ylabel="test top-1 error (%)",
        title=f"{study}: error vs depth (mean ± sd over seeds, dots: seeds)",
    )
    ax.grid(alpha=0.3)
    save(fig, "error-vs-depth")

    if not curves.empty:
        fig, ax = plt.subplots(figsize=(6, 4))
        for arch in summary.index:
            c = curves[curves["net"] == arch].groupby("epoch")["val/err1"].agg(["mean", "std"])
            if c.empty:
                continue
            line = ax.plot(c.index + 1, c["mean"] * 100, label=arch)[0]
            ax.fill_between(
                c.index + 1,
                (c["mean"] - c["std"].fillna(0)) * 100,
                (c["mean"] + c["std"].fillna(0)) * 100,
                alpha=0.15,
                color=line.get_color(),
            )
        ax.set(xlabel="epoch", ylabel="validation top-1 error (%)", title=f"{study}: learning curves")
        ax.legend(ncol=2, fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "learning-curves")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(
        summary["params"] / 1e6,
        summary["top1_err_mean"] * 100,
        yerr=summary["top1_err_std"].fillna(0) * 100,
        fmt="o",
        capsize=4,
    )
    for arch, row in summary.iterrows():
        ax.annotate(
            arch, (row["params"] / 1e6, row["top1_err_mean"] * 100), textcoords="offset points", xytext=(6, 4)
        )
    ax.set(xlabel="parameters (millions)", ylabel="test top-1 error (%)", title=f"{study}: params vs error")
    ax.grid(alpha=0.3)
    save(fig, "params-vs-error")
    return names


def _arch_table(summary: pd.DataFrame, improving: pd.Series, links: dict[str, str] | None = None) -> str:
    rows = []
    links = links or {}
    for net, r in summary.iterrows():
        paper = PAPER_TABLE3.get(net)
        if net == "B-5x5":
            paper_text = "B + ~7 (sec. 4.1)"
        else:
            paper_text = f"{paper[0]} / {paper[1]}" if paper else ""
        collapsed = r["not_learned"]
        rows.append(
            {
                "net": f"[{md_escape(net)}]({links[net]})" if net in links else md_escape(net),
                "depth": int(r["depth"]),
                "params": f"{int(r['params']):,}",
                "seeds": int(r["seeds"]),
                "top-1 err % (mean ± sd)": f"{pct(r['top1_err_mean'])} ± {pct(r['top1_err_std']) or '–'}",
                "top-5 err % (mean ± sd)": f"{pct(r['top5_err_mean'])} ± {pct(r['top5_err_std']) or '–'}",
                "paper top-1 / top-5 % (ImageNet, S=256)": paper_text,
                "epochs": int(r["epochs"]),
                "s / run": f"{r['seconds_mean']:.0f}" if not math.isnan(r["seconds_mean"]) else "",
                "learned": "**no: seeds " + ", ".join(map(str, collapsed)) + "**"
                if collapsed
                else "every seed",
                "still improving at the end": "yes" if improving.get(net, False) else "no",
            }
        )
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def _seed_table(res: pd.DataFrame, order: list[str]) -> str:
    """Test top-1 error per net and seed: the paired design, visible."""
    table = res.pivot_table(index="seed", columns="net", values="test_err1", aggfunc="first")
    table = table[[n for n in order if n in table.columns]]
    shown = table.map(lambda v: pct(v, 2))
    for _, r in res[~res["learned"].astype(bool)].iterrows():
        shown.loc[r["seed"], r["net"]] += " (not above chance)"
    shown.index = pd.Index([int(i) for i in shown.index], name="seed")
    shown.columns = [md_escape(c) for c in shown.columns]
    return shown.to_markdown(disable_numparse=True)


def _p(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _conclusion_table(concl: pd.DataFrame) -> str:
    def ci(r) -> str:
        if pd.isna(r.get("ci_low")):
            return "n/a" if r["test"] else ""
        return f"[{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}]"

    rows = [
        {
            "#": r["claim"],
            "paper's claim": md_escape(r["statement"]),
            "test": r["test"] + (f", {r['n']}" if r["n"] else ""),
            "Δ top-1 err (pts)": "" if pd.isna(r.get("diff")) else f"{100 * r['diff']:+.2f}",
            "95% CI": ci(r),
            "p": _p(r.get("p")),
            "p (Holm)": _p(r.get("p_holm")),
            "outcome": f"**{md_escape(r['outcome'])}**",
            "caveat": md_escape(r.get("caveat") or ""),
        }
        for _, r in concl.iterrows()
    ]
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def _plan_table(concl: pd.DataFrame, margin: float, min_effect: float) -> str:
    rows = []
    for _, r in concl.iterrows():
        if pd.isna(r.get("sd")):
            continue
        target = (
            f"a {min_effect:g}-point gain"
            if r["kind"] == "better"
            else f"equivalence within ±{margin:g} points"
        )
        needed = r["seeds_needed"]
        rows.append(
            {
                "#": r["claim"],
                "comparison": f"{md_escape(r['first'])} vs {md_escape(r['second'])}",
                "sd of one difference (pts)": f"{100 * r['sd']:.2f}",
                "to detect": target,
                "paired seeds per net (plan)": "" if pd.isna(needed) else f"{int(needed)}",
            }
        )
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) if rows else ""


def _lrn_section(summary: pd.DataFrame, runs_res: pd.DataFrame) -> list[str]:
    activity = analysis.lrn_activity(summary)
    if activity.empty:
        return []
    lines = [
        "## How active was LRN?",
        "",
        "LRN's constants (k=2, alpha=1e-4, n=5, beta=0.75) were set for the activations that 0-255 "
        "inputs give. Measured on 1,024 validation images in each trained net: the denominator over "
        "k (1.00 = the layer passes activations through unchanged).",
        "",
        "| net | LRN scale | denominator / k, mean | 99th percentile | at this input scale |",
        "|---|---:|---:|---:|---|",
    ]
    for net, r in activity.iterrows():
        scale = runs_res.loc[runs_res["net"] == net, "lrn_scale"].dropna().unique()
        lines.append(
            f"| {md_escape(net)} | {md_escape(', '.join(map(str, scale)))} | {r['denominator_mean']:.3f} | "
            f"{r['denominator_p99']:.3f} | {'active' if r['active'] else '**LRN inactive at this input scale**'} |"
        )
    if not activity["active"].all():
        lines += [
            "",
            "An inactive LRN makes claim 1 true by construction: rerun with `model.lrn_scale=paper` "
            "(the default) or `data.normalize=paper` to test it as the paper had it.",
        ]
    return [*lines, ""]


def budget_caveat(cfg: DictConfig, concl: pd.DataFrame, improving: pd.Series) -> str:
    """The budget caveat, exactly where a compared net had not converged, whatever the outcome."""
    if concl.empty or not concl["not_converged"].map(len).any():
        return ""
    nets = sorted({n for ns in concl["not_converged"] for n in ns})
    claims = [
        str(r["claim"]) + " (" + f"{r['first']} vs {r['second']}" + ")"
        for _, r in concl.iterrows()
        if r["not_converged"]
    ]
    return (
        f"> **Budget caveat.** {md_escape(', '.join(nets))} {'was' if len(nets) == 1 else 'were'} still improving "
        f"at the end ({cfg.trainer.max_epochs} epochs: validation error fell over the last 3 epochs by more than "
        f"twice its noise), so the outcomes of claims {md_escape(', '.join(claims))} describe this budget; "
        "a longer one may change them. Raise `trainer.max_epochs`, or run on a GPU."
    )


def _undecided_note(concl: pd.DataFrame) -> str:
    """For each tested claim left inconclusive: what stopped it, and what budget would decide it."""
    rows = concl[(concl["outcome"] == "inconclusive") & concl["sd"].notna()] if not concl.empty else concl
    if rows.empty:
        return ""
    parts = []
    for _, r in rows.iterrows():
        raw = " (significant alone, not after Holm)" if r["p"] < analysis.ALPHA else ""
        parts.append(
            f"claim {r['claim']} ({md_escape(r['first'])} vs {md_escape(r['second'])}): Δ {100 * r['diff']:+.2f} "
            f"points, 95% CI [{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}], p {_p(r['p'])}, Holm "
            f"{_p(r['p_holm'])}{raw}; the per-seed differences spread by {100 * r['sd']:.2f} points, and "
            f"deciding it needs about {int(r['seeds_needed'])} paired seeds"
        )
    return "Why not decided: " + "; ".join(parts) + " (see *Planning the next study*)."


def study_fingerprints(cfg: DictConfig) -> list[str]:
    from vgg_ablation.study import needs_scratch_b, scratch_config

    fps = [tracking.fingerprint(cfg)]
    if needs_scratch_b(cfg):
        fps.append(tracking.fingerprint(scratch_config(cfg)))
    return fps


def _dataset_line(res: pd.DataFrame, cfg: DictConfig, client) -> str:
    digests = ", ".join(f"`{d}`" for d in sorted(res["data_digest"].dropna().unique())) or "not recorded"
    counts = res.iloc[0]
    inputs = client.get_run(counts["run_id"]).inputs.dataset_inputs
    name = inputs[0].dataset.name if inputs else cfg.data.name
    val = f"{int(counts['val_images']):,} validation, " if not pd.isna(counts.get("val_images")) else ""
    return (
        f"| data | {md_escape(name)} (`data={md_escape(cfg.data.name)}`), digest {digests}: {int(counts['train_images']):,} training, "
        f"{val}{int(counts['test_images']):,} test images, {int(counts['num_classes'])} classes; "
        f"normalize `{cfg.data.normalize}` |"
    )


def write_report(cfg: DictConfig, out_dir: Path = REPORTS_DIR) -> Path:
    import mlflow

    uri = tracking.tracking_uri(cfg.logger.tracking_uri)
    tracking.check_reachable(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(
            f"no runs recorded for study {cfg.study.name!r}: there is no MLflow store at {uri}; "
            f"run `vgg-ablation study experiment={cfg.study.name}` first (or set MLFLOW_TRACKING_URI)"
        )
    experiment = tracking.experiment_name(cfg)
    fps = study_fingerprints(cfg)
    runs = analysis.load_runs(uri, experiment, fps)
    if runs.empty:
        raise UserError(
            f"no runs recorded for study {cfg.study.name!r} (this config) in {uri}; "
            f"run `vgg-ablation study experiment={cfg.study.name}` first"
        )
    res = analysis.results(runs)
    if res.empty:
        raise UserError(f"study {cfg.study.name!r} has runs in {uri} but none FINISHED yet")
    order = [*cfg.study.archs, f"B{analysis.SCRATCH}"]
    summary = analysis.per_arch(res, order=order)
    client = tracking.client(uri)
    curves = _histories(client, res)
    val_images = float(res["val_images"].dropna().iloc[0]) if res["val_images"].notna().any() else 5000.0
    improving = analysis.still_improving(curves, val_images)
    margin, min_effect = cfg.study.margin, cfg.study.min_effect
    concl = analysis.test_conclusions(
        res, summary, margin=margin / 100, min_effect=min_effect / 100, improving=improving
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _plots(cfg.study.name, summary, res, curves, out_dir)
    compute = analysis.compute_table(summary)

    orphaned = [r for _, r in runs.iterrows() if r["status"] == "RUNNING" and _orphaned(client, r["run_id"])]
    not_results = runs[~runs["run_id"].isin(res["run_id"])]
    wall = (res["end_time"].max() - res["start_time"].min()).total_seconds()
    exp = client.get_experiment_by_name(experiment)
    parent = tracking.find_study_run(client, exp.experiment_id, cfg) if exp else None
    links = _run_links(cfg, exp.experiment_id, summary.index) if exp else {}
    decided = (
        concl[concl["outcome"].str.startswith(("supported", "contradicted"))] if not concl.empty else concl
    )
    lines = [
        f"# Study `{md_escape(cfg.study.name)}`: do the VGG conclusions hold here?",
        "",
        md_escape(cfg.study.description) if cfg.study.description else "",
        "",
        "| | |",
        "|---|---|",
        _dataset_line(res, cfg, client),
        f"| budget | {cfg.trainer.max_epochs} epochs, batch {cfg.data.batch_size}, width x{cfg.model.width}, "
        f"batch norm {'on' if cfg.model.batch_norm else 'off'}, init `{cfg.model.init}`, "
        f"lr {cfg.optim.lr} ({cfg.optim.schedule}), dropout {cfg.model.dropout}, LRN scale `{cfg.model.lrn_scale}` |",
        f"| nets x seeds | {', '.join(md_escape(n) for n in summary.index)} x seeds {', '.join(map(str, cfg.study.seeds))} |",
        f"| tests | margin ±{margin:g} points of top-1 error (equivalence), smallest effect of interest "
        f"{min_effect:g} {'point' if min_effect == 1 else 'points'} "
        f"(planning); one-sided tests at {analysis.ALPHA} (95% intervals), Holm across the "
        f"{concl.attrs.get('family', 0)} claims tested |",
        f"| hardware | {md_escape(', '.join(sorted(res['device'].dropna().unique())))}, "
        f"{os.cpu_count()} CPU cores where this report was written |",
        f"| versions | torch {md_escape(', '.join(sorted(res['torch_version'].dropna().unique())))}, "
        f"Lightning {md_escape(', '.join(sorted(res['lightning_version'].dropna().unique())))}, "
        f"MLflow {mlflow.__version__} |",
        f"| git commit | {md_escape(', '.join(sorted(res['git_commit'].dropna().unique())))} |",
        f"| runs | {len(res)} results (one FINISHED run per net and seed) of {len(runs)} recorded; "
        f"{len(not_results)} not counted |",
        f"| wall time | {wall / 60:.1f} min ({wall:.0f} s, first run's start to last run's end) |",
        f"| written | {time.strftime('%Y-%m-%d %H:%M %Z')} from MLflow experiment `{md_escape(experiment)}` "
        f"(id {exp.experiment_id if exp else '?'}), config fingerprint{'s' if len(fps) > 1 else ''} "
        f"{', '.join(f'`{f}`' for f in fps)} |",
        _mlflow_line(cfg, exp, parent),
        "",
        f"**{len(decided)} of the {concl.attrs.get('family', 0)} claims tested here decided** "
        f"({len(concl) - concl.attrs.get('family', 0)} of the paper's {len(concl)} not tested)"
        + (
            ": "
            + "; ".join(
                f"claim {r['claim']} ({md_escape(r['first'])} vs {md_escape(r['second'])}) {r['outcome']}"
                for _, r in decided.iterrows()
            )
            if len(decided)
            else ""
        )
        + ".",
        "",
        _undecided_note(concl),
        "",
        "## Results per network",
        "",
        "Test top-1/top-5 error on this data, mean ± standard deviation over seeds, beside the paper's "
        "ImageNet errors (Table 3). The absolute numbers are not comparable across datasets; the "
        "ordering is what the paper's conclusions are about.",
        "",
        _arch_table(summary, improving, links),
        "",
        "## The paper's conclusions, tested",
        "",
        "Δ is the first net's test top-1 error minus the second's, in points (negative: the first is "
        "better), with its 95% interval. Nets run on the same seeds are compared seed by seed (paired "
        "t: a seed fixes the validation split, data order, augmentation and initial weights); "
        "otherwise Welch's t. 'Better' claims are supported when the first net's error is "
        f"significantly lower; 'no better' claims when the two are equivalent within ±{margin:g} points "
        "(two one-sided tests), contradicted when the first net is better, or worse ('it degrades'), by "
        "more than the margin. p is the deciding outcome's one-sided p; verdicts use Holm's "
        f"adjustment across the claims below, at {analysis.ALPHA}.",
        "",
        _conclusion_table(concl) if not concl.empty else "_No claim has both of its nets in this study._",
        "",
        budget_caveat(cfg, concl, improving),
        "",
        "### Seeds per network and seed (test top-1 error, %)",
        "",
        _seed_table(res, order),
        "",
        "### Planning the next study",
        "",
        "Not post-hoc power: paired seeds per net that a study needs for 80% power to decide each "
        f"comparison at the strictest Holm level ({analysis.ALPHA}/{concl.attrs.get('family', 0)}), given the spread of "
        "the per-seed differences measured here.",
        "",
        _plan_table(concl, margin, min_effect),
        "",
        *_lrn_section(summary, res),
    ]
    if not compute.empty:
        lines += [
            "## Compute",
            "",
            "Forward FLOPs per image (torch's FlopCounterMode, multiply-add = 2) and images seen in "
            "training; nets that start from the trained A also count A's training.",
            "",
            compute.to_markdown(floatfmt=(",.0f", ",.2f", ",.0f", ",.0f", ",.4f")),
            "",
        ]
    lines += [
        "### From the designs themselves (no training; computed from the model definitions)",
        "",
        design.stack_comparison()
        .assign(**{"weights saved": lambda d: d["weights saved"].map("{:.1%}".format)})
        .to_markdown(index=False),
        "",
        "Each block halves the feature map and doubles the filters (up to 512): "
        + ", ".join(f"{a} {'yes' if design.halves_map_doubles_filters(a) else 'no'}" for a in PAPER_STEPS)
        + ".",
        "",
        "## Plots",
        "",
        *[f"![{name}]({name})" for name in plots],
        "",
    ]
    if len(not_results):
        lines += [
            "## Runs not counted",
            "",
            "| run | net | seed | status | reason |",
            "|---|---|---|---|---|",
        ]
        for _, r in not_results.iterrows():
            status = (
                "RUNNING (orphaned: its process is gone)"
                if r["run_id"] in {o["run_id"] for o in orphaned}
                else r["status"]
            )
            reason = r["failure_reason"] if isinstance(r["failure_reason"], str) else ""
            lines.append(
                f"| `{r['run_id'][:8]}` | {md_escape(r['net'])} | {r['seed']:.0f} | {status} | {md_escape(reason)} |"
            )
        lines.append("")
    lines += [
        "## Open these runs in the MLflow dashboard",
        "",
        "```bash",
        "vgg-ablation ui            # = mlflow ui --backend-store-uri <this store>, on 127.0.0.1:5000",
        "```",
        "",
        f"Store: `{md_escape(_display_uri(uri))}`, experiment `{md_escape(experiment)}`. "
        "Regenerate this report with "
        f"`vgg-ablation report experiment={md_escape(cfg.study.name)}`.",
        "",
    ]
    path = out_dir / f"{cfg.study.name}.md"
    text = "\n".join(line for line in lines)
    _atomic_write(path, lambda p: p.write_text(re.sub(r"\n{3,}", "\n\n", text)))
    if parent is not None:
        publish(client, parent.info.run_id, path, [out_dir / name for name in plots], summary, concl)
    return path


def _mlflow_line(cfg: DictConfig, exp, parent) -> str:
    if exp is None:
        return ""
    base = cfg.logger.ui_url
    study_run = (
        f"[the study's run]({tracking.run_url(base, exp.experiment_id, parent.info.run_id)}) · "
        if parent
        else ""
    )
    return f"| MLflow (`vgg-ablation ui`) | {study_run}[every run]({tracking.runs_url(base, exp.experiment_id)}) |"


def _run_links(cfg: DictConfig, experiment_id: str, nets) -> dict[str, str]:
    """Each net's runs in the dashboard: the runs page filtered to its config and arch."""
    from vgg_ablation.study import needs_scratch_b, scratch_config

    links = {}
    for net in nets:
        scratch = net == f"B{analysis.SCRATCH}"
        net_cfg = scratch_config(cfg) if scratch and needs_scratch_b(cfg) else cfg
        arch = "B" if scratch else net
        search = f"tags.fingerprint = '{tracking.fingerprint(net_cfg)}' and params.arch = '{arch}'"
        links[net] = tracking.runs_url(cfg.logger.ui_url, experiment_id, search)
    return links


def publish(
    client, run_id: str, report: Path, plots: list[Path], summary: pd.DataFrame, concl: pd.DataFrame
) -> None:
    """The report onto the study's run: the markdown and its plots as artifacts (report/), the
    per-net summary and the verdicts as MLflow tables, each claim's verdict as a tag and its Δ
    and each net's mean error as metrics (comparable across studies in the runs table)."""
    from mlflow.entities import Metric

    for file in [report, *plots]:
        client.log_artifact(run_id, str(file), "report")
    client.log_table(run_id, summary.reset_index().rename(columns={"index": "net"}), "summary.json")
    now = int(time.time() * 1000)
    metrics = [
        Metric(f"test_err1/{_metric_name(net)}", float(100 * r["top1_err_mean"]), now, 0)
        for net, r in summary.iterrows()
    ]
    if not concl.empty:
        wanted = ["claim", "first", "second", "outcome", "diff", "ci_low", "ci_high", "p", "p_holm", "test"]
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


def _display_uri(uri: str) -> str:
    """Paths under the working folder are shown relative, so a committed report holds no home dirs."""
    prefix = f"sqlite:///{Path.cwd()}/"
    return "sqlite:///" + uri[len(prefix) :] if uri.startswith(prefix) else uri


def _orphaned(client, run_id: str) -> bool:
    return tracking.is_orphaned(client.get_run(run_id))

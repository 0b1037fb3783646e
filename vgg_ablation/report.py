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
        rows += [{"arch": run["arch"], "seed": run["seed"], "epoch": s, metric: v} for s, v in seen.items()]
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

    vgg = summary[summary.index.isin([*PAPER_STEPS, "B-5x5"])]
    # Nets of equal depth (A and A-LRN at 11, C and D at 16) side by side, not on top of each other.
    rank = vgg.groupby("depth").cumcount()
    size = vgg.groupby("depth")["depth"].transform("size")
    x = vgg["depth"] + 0.3 * (rank - (size - 1) / 2)
    fig, ax = plt.subplots(figsize=(6, 4))
    for arch, row in vgg.iterrows():
        seeds = res.loc[res["arch"] == arch, "test_err1"] * 100
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
            c = curves[curves["arch"] == arch].groupby("epoch")["val/err1"].agg(["mean", "std"])
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


def _arch_table(summary: pd.DataFrame) -> str:
    rows = []
    for arch, r in summary.iterrows():
        paper = PAPER_TABLE3.get(arch)
        if arch == "B-5x5":
            paper_text = "B + ~7 (sec. 4.1)"
        else:
            paper_text = f"{paper[0]} / {paper[1]}" if paper else ""
        rows.append(
            {
                "arch": md_escape(arch),
                "depth": int(r["depth"]),
                "params": f"{int(r['params']):,}",
                "seeds": int(r["seeds"]),
                "top-1 err % (mean ± sd)": f"{pct(r['top1_err_mean'])} ± {pct(r['top1_err_std']) or '–'}",
                "top-5 err % (mean ± sd)": f"{pct(r['top5_err_mean'])} ± {pct(r['top5_err_std']) or '–'}",
                "paper top-1 / top-5 % (ImageNet, S=256)": paper_text,
                "epochs": int(r["epochs"]),
                "s / run": f"{r['seconds_mean']:.0f}" if not math.isnan(r["seconds_mean"]) else "",
                "learned?": "**at chance**" if r["at_chance"] else "yes",
            }
        )
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def _conclusion_table(concl: pd.DataFrame) -> str:
    def ci(r) -> str:
        if math.isnan(r["ci_low"]):
            return "n/a (one seed)"
        return f"[{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]"

    rows = [
        {
            "#": r["claim"],
            "paper's claim": r["statement"],
            "seeds": r["seeds"],
            "Δ top-1 err (pts)": f"{100 * r['diff_top1_err']:+.1f}",
            "95% CI": ci(r),
            "p (Welch)": "" if math.isnan(r["p"]) else f"{r['p']:.3f}",
            "Hedges' g": "" if math.isnan(r["hedges_g"]) else f"{r['hedges_g']:+.2f}",
            "verdict": f"**{r['verdict']}**",
            "seeds to decide": (
                ""
                if math.isnan(r["seeds_needed"])
                else "no effect to detect"
                if math.isinf(r["seeds_needed"])
                else f"~{int(r['seeds_needed'])} per arch"
            ),
        }
        for _, r in concl.iterrows()
    ]
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def budget_caveat(cfg: DictConfig, concl: pd.DataFrame, summary: pd.DataFrame) -> str:
    """Small budgets are honest budgets: a depth claim that fails without the paper's remedies is
    a statement about the budget, not about the paper."""
    if concl.empty:
        return ""
    depth_rows = concl[concl["about_depth"]]
    troubled = depth_rows[
        depth_rows["verdict"].str.startswith(("contradicted", "no verdict", "inconclusive"))
    ]
    if troubled.empty:
        return ""
    remedies = []
    if cfg.model.init != "from_A":
        remedies.append(
            "the deeper nets start from random weights, not from a trained A (the paper's section 3.1)"
        )
    if not cfg.model.batch_norm:
        remedies.append("there is no normalisation (deep plain nets learn slowly)")
    epochs = int(summary["epochs"].max())
    remedies.append(f"each net trains {epochs} epochs (the paper: 74 epochs of 1.3M ImageNet images)")
    return (
        "> **The depth comparison is limited by this budget.** "
        + "; ".join(remedies)[0].upper()
        + "; ".join(remedies)[1:]
        + ". Deeper plain nets need more updates to catch up, so at this budget a depth claim that is "
        "not supported says that the budget is too small to test it, not that the paper is wrong. "
        "Run `vgg-ablation study experiment=cifar10` on a GPU, or raise `trainer.max_epochs`, to test it."
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
    fp = tracking.fingerprint(cfg)
    runs = analysis.load_runs(uri, experiment, fp)
    if runs.empty:
        raise UserError(
            f"no runs recorded for study {cfg.study.name!r} (this config) in {uri}; "
            f"run `vgg-ablation study experiment={cfg.study.name}` first"
        )
    res = analysis.results(runs)
    if res.empty:
        raise UserError(f"study {cfg.study.name!r} has runs in {uri} but none FINISHED yet")
    summary = analysis.per_arch(res, order=[*cfg.study.archs])
    concl = analysis.test_conclusions(res, summary)
    client = tracking.client(uri)
    curves = _histories(client, res)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _plots(cfg.study.name, summary, res, curves, out_dir)

    orphaned = [r for _, r in runs.iterrows() if r["status"] == "RUNNING" and _orphaned(client, r["run_id"])]
    not_results = runs[~runs["run_id"].isin(res["run_id"])]
    wall = (res["end_time"].max() - res["start_time"].min()).total_seconds()
    exp = client.get_experiment_by_name(experiment)
    lines = [
        f"# Study `{md_escape(cfg.study.name)}`: do the VGG conclusions hold here?",
        "",
        md_escape(cfg.study.description) if cfg.study.description else "",
        "",
        "| | |",
        "|---|---|",
        f"| data | `{cfg.data.name}`, {int(res['train_images'].iloc[0]):,} "
        f"training images (10% of the training split held out for validation), input {cfg.data.input_size}px |",
        f"| budget | {cfg.trainer.max_epochs} epochs, batch {cfg.data.batch_size}, width x{cfg.model.width}, "
        f"batch norm {'on' if cfg.model.batch_norm else 'off'}, init `{cfg.model.init}`, "
        f"lr {cfg.optim.lr} ({cfg.optim.schedule}), dropout {cfg.model.dropout} |",
        f"| archs x seeds | {', '.join(cfg.study.archs)} x seeds {', '.join(map(str, cfg.study.seeds))} |",
        f"| hardware | {md_escape(', '.join(sorted(res['device'].dropna().unique())))}, "
        f"{os.cpu_count()} CPU cores where this report was written |",
        f"| versions | torch {md_escape(', '.join(sorted(res['torch_version'].dropna().unique())))}, "
        f"Lightning {md_escape(', '.join(sorted(res['lightning_version'].dropna().unique())))}, "
        f"MLflow {mlflow.__version__} |",
        f"| git commit | {md_escape(', '.join(sorted(res['git_commit'].dropna().unique())))} |",
        f"| runs | {len(res)} results (one FINISHED run per arch and seed) of {len(runs)} recorded; "
        f"{len(not_results)} not counted |",
        f"| wall time | {wall / 60:.1f} min ({wall:.0f} s, first run's start to last run's end) |",
        f"| written | {time.strftime('%Y-%m-%d %H:%M %Z')} from MLflow experiment `{md_escape(experiment)}` "
        f"(id {exp.experiment_id if exp else '?'}), config fingerprint `{fp}` |",
        "",
        "## Results per architecture",
        "",
        "Test top-1/top-5 error on this data, mean ± standard deviation over seeds, beside the paper's "
        "ImageNet errors (Table 3). The absolute numbers are not comparable across datasets; the "
        "ordering is what the paper's conclusions are about.",
        "",
        _arch_table(summary),
        "",
        "## The paper's conclusions, tested",
        "",
        "Δ is the first net's test top-1 error minus the second's (negative: the first is better), "
        "with a 95% Welch confidence interval, Welch's t-test p and Hedges' g over seeds. "
        f"'Better' claims need the whole interval below 0; 'no better' claims need any gain to stay "
        f"under {100 * analysis.MARGIN:.0f} point. Seeds to decide: per arch, for 80% power at the "
        "observed spread.",
        "",
        _conclusion_table(concl) if not concl.empty else "_No claim has both of its nets in this study._",
        "",
        budget_caveat(cfg, concl, summary),
        "",
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
            "| run | arch | seed | status | reason |",
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
                f"| `{r['run_id'][:8]}` | {md_escape(r['arch'])} | {r['seed']:.0f} | {status} | {md_escape(reason)} |"
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
    return path


def _display_uri(uri: str) -> str:
    """Paths under the working folder are shown relative, so a committed report holds no home dirs."""
    prefix = f"sqlite:///{Path.cwd()}/"
    return "sqlite:///" + uri[len(prefix) :] if uri.startswith(prefix) else uri


def _orphaned(client, run_id: str) -> bool:
    return tracking.is_orphaned(client.get_run(run_id))

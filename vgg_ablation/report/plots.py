"""The report's figures: error against depth (every seed a dot), learning curves, parameters
against error; PNGs written atomically beside the report."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from vgg_ablation.files import atomic_write
from vgg_ablation.nets.models import PAPER_STEPS


def plots(study: str, summary: pd.DataFrame, res: pd.DataFrame, curves: pd.DataFrame, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []

    def save(fig, suffix: str) -> None:
        name = f"{study}-{suffix}.png"
        atomic_write(out / name, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
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

    if not curves.empty and "val/err1" in curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for arch in summary.index:
            mine = curves[curves["net"] == arch]
            c = mine.groupby("epoch")["val/err1"].agg(["mean", "std"])
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
            if "train/err1" in mine:  # dashed: training error (augmented batches, dropout on)
                t = mine.groupby("epoch")["train/err1"].mean().dropna()
                ax.plot(t.index + 1, t * 100, linestyle="--", linewidth=1, color=line.get_color())
        ax.set(xlabel="epoch", ylabel="top-1 error (%)",
               title=f"{study}: learning curves (solid: validation, dashed: training)")  # fmt: skip
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

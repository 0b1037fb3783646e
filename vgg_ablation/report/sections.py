"""The report's sections, one renderer each: `Gathered` (what `report.gather` read from MLflow)
in, markdown lines out. Nothing here reads a store or computes a statistic: the verdicts come from
analysis.py, the figures from report_plots.py.

About 770 lines, one concern: the document, its sections in the order the report prints them,
each a short function of the gathered data (splitting them further would scatter one page).
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from vgg_ablation import __version__
from vgg_ablation.nets import design
from vgg_ablation.nets.models import PAPER_STEPS
from vgg_ablation.study import analysis
from vgg_ablation.study.cells import SCRATCH_LABEL, needs_scratch_b
from vgg_ablation.tracking import runtable, stores

# Simonyan & Zisserman, arXiv 1409.1556, Table 3, single test scale, S=256: ImageNet val top-1 / top-5 error, %.
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


@dataclass
class Gathered:
    cfg: DictConfig
    uri: str
    experiment: str
    exp: object  # the MLflow experiment
    parent: object  # the study's run, or None
    fingerprints: list[str]
    runs: pd.DataFrame  # every run of the study's configs
    res: pd.DataFrame  # the results: one FINISHED run per net and seed
    summary: pd.DataFrame
    curves: pd.DataFrame
    design: analysis.Design
    concl: pd.DataFrame
    stop_reason: str
    client: object = field(repr=False, default=None)
    data_here: bool = True  # False: the data was not read here (its runs' recorded digest named it)
    selection: object = None  # reference_cells.Selection: the study's lr selection, when it has one
    convergence: pd.DataFrame | None = None  # per net: validation error at the study's and a longer budget

    @property
    def order(self) -> list[str]:
        return [*self.cfg.study.archs, SCRATCH_LABEL]


def budget_words(cfg: DictConfig) -> str:
    """The budget every verdict of a study is conditional on, in one phrase."""
    own = cfg.optim.lr_per_arch
    lr = (f"lr per net {', '.join(f'{n} {v:g}' for n, v in own.items())}"
          + (" (chosen on validation)" if cfg.study.lr_grid else "") + f", {cfg.optim.schedule}"
          if own else f"lr {cfg.optim.lr:g} ({cfg.optim.schedule})")  # fmt: skip
    return (
        f"{cfg.trainer.max_epochs} epochs, width x{cfg.model.width:g}, batch norm {'on' if cfg.model.batch_norm else 'off'}, "
        f"init `{cfg.model.init}`, {lr}"
    )


def sentence(words: str) -> str:
    """`words` as a sentence's start: its first letter upper case, the rest as written (not
    str.capitalize, which lowers every other letter: "Pocock", "B-5x5")."""
    return words[:1].upper() + words[1:]


def rule_words(design: analysis.Design, alpha: float) -> str:
    """The decision rule in plain words, with its error rate."""
    rule = design.rule
    k = rule.comparisons
    share = f"{alpha:g}/{k} = {rule.per_comparison:.4g}" if k > 1 else f"{alpha:g}"
    if not design.sequential:
        how = (f"one look at {design.stages[0]} seeds: each interval is a paired t interval at "
               f"{1 - rule.per_comparison:.2%} confidence ({share} of the error per comparison)")  # fmt: skip
    else:
        how = (f"looks at {', '.join(map(str, design.stages))} seeds per net, each comparison stopping at its "
               f"first verdict; its intervals are repeated confidence intervals that spend its {share} of the "
               f"error over the looks (Pocock-type error spending, 10% of it kept for a continuation past "
               f"{rule.horizon} seeds), so each look's interval is wider than a single look's would be")  # fmt: skip
    return (f"the chance that any verdict here is wrong is at most {alpha:.0%} (family-wise, split evenly over "
            f"the {k} comparison{'s' if k != 1 else ''} this study's nets can test, fixed before any run); {how}")  # fmt: skip


def header(g: Gathered) -> list[str]:
    cfg, res, runs = g.cfg, g.res, g.runs
    not_results = runs[~runs["run_id"].isin(res["run_id"])]
    rebuilt = sorted(res["rebuilt_from"].dropna().unique())
    wall = (res["end_time"].max() - res["start_time"].min()).total_seconds()
    wall_text = (f"not recorded (its runs were rebuilt from {', '.join(rebuilt)}, which holds no start or end times)"
                 if rebuilt else f"{wall / 60:.1f} min ({wall:.0f} s, first run's start to last run's end)")  # fmt: skip
    seeds = ", ".join(f"{md_escape(n)} {int(r['seeds'])}" for n, r in g.summary.iterrows())
    trained_by = ", ".join(sorted(res["version"].dropna().unique())) or "not recorded"
    version = f"{trained_by} (this report: {__version__})"

    def recorded(column: str) -> str:
        return md_escape(", ".join(sorted(res[column].dropna().unique()))) or "not recorded"

    return [
        f"# Study `{md_escape(cfg.study.name)}`: do the VGG conclusions hold here?",
        "",
        md_escape(cfg.study.description) if cfg.study.description else "",
        "",
        "| | |",
        "|---|---|",
        _dataset_line(res, cfg, g.client, g.data_here),
        f"| budget | {budget_words(cfg)}, batch {cfg.data.batch_size}, dropout {cfg.model.dropout}, "
        f"LRN scale `{cfg.model.lrn_scale}` |",
        f"| seeds per net | {seeds} (seeds {_seed_range(sorted(res['seed'].astype(int).unique()))}) |",
        f"| rule | {rule_words(g.design, cfg.study.alpha)}; margins (points): "
        + ", ".join(f"{k} ±{v:g}" for k, v in OmegaConf.to_container(cfg.study.margins).items())
        + " |",
        f"| hardware | {recorded('device')}, {os.cpu_count()} CPU cores where this report was written |",
        f"| versions | vgg-ablation {version}, torch {recorded('torch_version')}, "
        f"Lightning {recorded('lightning_version')}, MLflow {_mlflow_version()} |",
        f"| git commit | {recorded('git_commit')} |",
        *(
            [
                f"| rebuilt | from {md_escape(', '.join(rebuilt))} (the study's store was lost): what it lacks is in its "
                "archive's manifest; the original report is among the study run's artifacts |"
            ]
            if rebuilt
            else []
        ),
        f"| runs | {len(res)} results (one FINISHED run per net and seed) of {len(runs)} recorded; "
        f"{len(not_results)} not counted |",
        f"| wall time | {wall_text}; the "
        f"cells' own times sum to {res['seconds'].sum() / 60:.1f} min (each from loading its data to its "
        "last record; a resumed run: its last attempt) |",
        f"| written | {time.strftime('%Y-%m-%d %H:%M %Z')} from MLflow experiment `{md_escape(g.experiment)}` "
        f"(id {g.exp.experiment_id if g.exp else '?'}), config fingerprint{'s' if len(g.fingerprints) > 1 else ''} "
        f"{', '.join(f'`{f}`' for f in g.fingerprints)} |",
        _mlflow_line(cfg, g.exp, g.parent),
        "",
    ]


def headline(g: Gathered) -> list[str]:
    concl = g.concl
    tested = concl[concl["state"] != "not tested"]
    decided = tested[tested["state"] == "decided"]
    words = [
        f"claim {r['claim']} ({md_escape(r['first'])} vs {md_escape(r['second'])}) **{r['outcome']}**"
        + (f" ({md_escape(r['detail'])})" if r["detail"] else "")
        for _, r in decided.iterrows()
    ]
    reason = g.stop_reason
    stop = "" if not reason else f" {reason}." if reason.startswith("Interim") else f" Stopped: {reason}."
    if g.design.sequential and (tested["state"] == "no data").any():
        stop += (" Before a comparison's first look its numbers below are not a test: nothing may be "
                 "concluded from them yet, and the rule, registered before the runs, stays as it is.")  # fmt: skip
    return [
        f"**{len(decided)} of the {len(tested)} comparisons tested here decided** at this budget "
        f"({budget_words(g.cfg)}; {len(concl) - len(tested)} of the paper's {len(concl)} not tested)"
        + (": " + "; ".join(words) if words else "")
        + f".{stop}",
        "",
        _undecided_note(concl, list(g.design.stages)),
        "",
    ]


def epoch_seconds(curves: pd.DataFrame) -> pd.Series:
    """Per net: the median time from one epoch's validation record to the next's, over all its
    runs. A run's wall time counts whatever stopped it (a pause, a machine shared for a while, a
    resume that re-trains from a checkpoint); the median of its epochs does not."""
    if curves.empty or "logged_at" not in curves:
        return pd.Series(dtype=float)
    c = curves.dropna(subset=["logged_at"]).sort_values(["net", "seed", "epoch"])
    step = c.groupby(["net", "seed"])["epoch"].diff() == 1  # consecutive epochs of one run only
    gaps = c.groupby(["net", "seed"])["logged_at"].diff()[step]
    return gaps.groupby(c.loc[step, "net"]).median()


def per_network(g: Gathered) -> list[str]:
    links = _run_links(g.cfg, g.exp.experiment_id, g.summary.index, g.fingerprints) if g.exp else {}
    seen = runtable.observe(g.runs)
    per_epoch = epoch_seconds(g.curves)
    rows = []
    for net, r in g.summary.iterrows():
        paper = PAPER_TABLE3.get(net)
        paper_text = "B + ~7 (sec. 4.1)" if net == "B-5x5" else (f"{paper[0]} / {paper[1]}" if paper else "")
        collapsed, failed = r["not_learned"], sorted(seen.failed.get(net, {}))
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
                # two significant figures below a second (a tiny trial's epochs), else tenths
                "s / epoch": (f"{per_epoch[net]:.1f}" if per_epoch[net] >= 1 else f"{per_epoch[net]:.2g}")
                if net in per_epoch.index
                else "",
                "learned": "**no: seeds " + ", ".join(map(str, collapsed)) + "**"
                if collapsed
                else "every seed",
                "failed": f"**{len(failed)} of {len(failed) + int(r['seeds'])} seeds**" if failed else "none",
            }
        )
    common = set.intersection(
        *[set(g.res.loc[g.res["net"] == n, "seed"].astype(int)) for n in g.summary.index]
    )
    uneven = len({int(r["seeds"]) for _, r in g.summary.iterrows()}) > 1 and len(common) >= 2
    if uneven:  # a run-until-decided study gives nets different seeds: their means on the shared ones too
        label = f"top-1 err % on the {len(common)} seeds every net has"
        for row, net in zip(rows, g.summary.index, strict=True):
            shared = g.res[(g.res["net"] == net) & g.res["seed"].astype(int).isin(common)]["test_err1"]
            row[label] = pct(shared.mean(), 2)
    return [
        "## Results per network",
        "",
        "Test top-1/top-5 error on this data, mean ± standard deviation over seeds, beside the paper's "
        "ImageNet errors (Table 3). The absolute numbers are not comparable across datasets; the "
        "ordering is what the paper's conclusions are about. *s / run* is a run's wall time, its last attempt's "
        "if it was resumed, and counts whatever slowed or paused it; *s / epoch* is the median time from one "
        "epoch's validation record to the next's over the net's runs, which such stops barely move."
        + (
            " The nets have different numbers of seeds (a net stops getting seeds once its comparisons are "
            "decided), so their means over all their seeds are not paired: the last column compares them on the "
            "seeds they share; the verdicts below pair each comparison's own seeds."
            if uneven
            else ""
        ),
        "",
        pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True),
        "",
    ]


def verdicts(g: Gathered) -> list[str]:
    cfg = g.cfg
    unconverged = not_converged(g)
    rows = []
    for _, r in g.concl.iterrows():
        tested = r["state"] != "not tested"
        looks = int(r["looks"]) if tested else 0
        rows.append(
            {
                "#": r["claim"],
                "paper's claim": md_escape(r["statement"]),
                "margin (pts)": f"±{100 * r['margin']:g}" if tested else "",
                "paired seeds": _paired_seeds(r, looks) if tested else "",
                "Δ top-1 err (pts)": "" if not tested or pd.isna(r["diff"]) else f"{100 * r['diff']:+.2f}",
                "interval the verdict used": _interval(r) if tested else "",
                "verdict": f"**{md_escape(r['outcome'])}**"
                + (f" ({md_escape(r['detail'])})" if _text(r, "detail") else ""),
                "assumed": md_escape(
                    "; ".join(
                        x
                        for x in [
                            _text(r, "notes"),
                            *[
                                unconverged[n]
                                for n in (r["first"], r["second"])
                                if n in unconverged and tested
                            ],
                        ]
                        if x
                    )
                ),
            }
        )
    body = pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) if rows else ""
    return [
        "## The paper's conclusions, tested",
        "",
        "Δ is the first net's test top-1 error minus the second's, in points (negative: the first is "
        "better), averaged over the seeds both nets finished (a seed fixes each run's data order, "
        "augmentation and initial weights; the validation split is the same for every run). A 'better' "
        "claim is *supported* when the whole interval lies below 0 (*by less than the margin* when it "
        "also lies inside ±margin), *contradicted* when above 0, and ends in *no relevant difference* "
        "when it straddles 0 inside ±margin; a 'no better' claim (LRN, saturation) is *supported* when "
        "the interval lies above −margin (the first net is not better by the margin or more; the "
        "verdict says which: worse, equivalent within ±margin, or only not better by the margin), "
        f"*contradicted* when below −margin. {sentence(rule_words(g.design, cfg.study.alpha))}. "
        "The interval shown is the one the verdict used, with its own confidence level. Every verdict "
        f"holds for this budget only: {budget_words(cfg)}; and each assumes that the per-seed "
        "differences are independent, with one spread, and near enough to normal (the error rate "
        "above was computed under that model). The *assumed* column adds what a verdict assumed "
        "beyond it: seeds left out, results at chance, a net that had not converged at this budget.",
        "",
        body,
        "",
    ]


def _paired_seeds(r, looks: int) -> str:
    """The pairs the verdict used; before its first look, the pairs in so far."""
    if looks == 0:
        return f"{int(r['pairs_in'])} so far"
    return f"{int(r['n'])}" + (f" ({looks} looks)" if looks > 1 else "")


def _text(row, key: str) -> str:
    """A text column of the verdict table ('' where a row has none: not-tested claims)."""
    value = row.get(key)
    return value if isinstance(value, str) else ""


def _interval(r) -> str:
    if pd.isna(r.get("ci_low")):
        return "n/a"
    return f"[{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}] ({1 - r['level']:.2%})"


def looks(g: Gathered) -> list[str]:
    if not g.design.sequential:
        return []
    rows = []
    for _, r in g.concl[g.concl["state"] != "not tested"].iterrows():
        for k, (n, level, mean, low, high, verdict) in enumerate(r["history"], 1):
            rows.append(
                {
                    "comparison": f"{md_escape(r['first'])} vs {md_escape(r['second'])}",
                    "look": k,
                    "paired seeds": n,
                    "confidence": f"{1 - level:.2%}",
                    "Δ (pts)": f"{100 * mean:+.2f}",
                    "interval": f"[{100 * low:+.2f}, {100 * high:+.2f}]" if not math.isnan(low) else "n/a",
                    "verdict": verdict if verdict != "undecided" else "open",
                }
            )
    state = {"decided": "decided: stops", "maximum": "undecided at the maximum", "open": "open: more seeds next look",
             "identical": "identical results: stops", "no data": "no look yet"}  # fmt: skip
    after = "; ".join(
        f"{md_escape(r['first'])} vs {md_escape(r['second'])}: {state.get(r['state'], r['state'])}"
        for _, r in g.concl[g.concl["state"] != "not tested"].iterrows()
    )
    return [
        "### The looks",
        "",
        f"Seeds per net at each planned look: {', '.join(map(str, g.design.stages))}. A net gets the next "
        f"look's seeds only while one of its comparisons is open. After the last look: {after}.",
        "",
        pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) if rows else "_No look yet._",
        "",
    ]


def seeds(g: Gathered) -> list[str]:
    """Test top-1 error per net and seed: the paired design, visible."""
    res = g.res
    table = res.pivot_table(index="seed", columns="net", values="test_err1", aggfunc="first")
    table = table[[n for n in g.order if n in table.columns]]
    shown = table.map(lambda v: pct(v, 2))
    for _, r in res[~res["learned"].astype(bool)].iterrows():
        shown.loc[r["seed"], r["net"]] += " (not above chance)"
    shown.index = pd.Index([int(i) for i in shown.index], name="seed")
    shown.columns = [md_escape(c) for c in shown.columns]
    return [
        "### Seeds per network and seed (test top-1 error, %)",
        "",
        shown.to_markdown(disable_numparse=True),
        "",
        f"Every run as a CSV (net, seed, status, errors, epochs, seconds, run id): [{g.cfg.study.name}-runs.csv]"
        f"({g.cfg.study.name}-runs.csv).",
        "",
    ]


def planning(g: Gathered) -> list[str]:
    """Every comparison left undecided: where it stands, its chance of a verdict by the study's
    maximum, the seeds it would take, and what a new study would need."""
    concl = g.concl
    undecided = concl[concl["state"].isin(["open", "futile", "maximum"])] if not concl.empty else concl
    rows = []
    for _, r in undecided.iterrows():
        design = f"a {g.cfg.study.min_effect:g}-point gain" if r["kind"] == "better" else "no difference"
        row = {
            "comparison": f"{md_escape(r['first'])} vs {md_escape(r['second'])}",
            "state": {"open": "open", "futile": "**stopped: futile**", "maximum": "at the maximum"}[
                r["state"]
            ],
            "paired seeds": int(r["n"]),
            "Δ (pts)": f"{100 * r['diff']:+.2f}",
            "sd of one difference (pts)": f"{100 * r['sd']:.2f}",
        }
        if g.design.sequential:
            row[f"chance of a verdict by {g.design.stages[-1]} seeds: at the Δ seen"] = _chance(
                r.get("chance_seen")
            )
            row["... if the truth is the design effect"] = _chance(r.get("chance_design")) + f" ({design})"
            row["seeds per net for an 80% chance (this study continued)"] = _seeds_text(r.get("seeds_for_80"))
        row["a new study's maximum for 80%: design effect / Δ seen"] = (
            f"{_seeds_text(r.get('plan_design'))} / {_seeds_text(r.get('plan_observed'))}"
        )
        rows.append(row)
    if not rows:
        return []
    kind = "run-until-decided" if g.design.sequential else "fixed-seed"
    futile = (
        f" A comparison stops as *futile* once that chance at the Δ seen is under {g.design.futility:.0%} (non-binding: the error rate holds; docs/statistics.md)."
        if g.design.futility
        else ""
    )
    return [
        "### Undecided comparisons: their chances and what it would take",
        "",
        "For each comparison without a verdict: its chance of one by this study's maximum, simulated under the rule "
        "itself given the seeds seen (at the difference seen, with its spread, and if the truth were the effect the "
        "claim was designed for), the seeds per net that would give an 80% chance if this study went on (its "
        f"maximum raised), and a new {kind} study's maximum for an 80% chance (with the spread at its 80% upper "
        "confidence limit; a new study needs new seeds: these ones have been looked at). Not post-hoc power: "
        f"what it takes from here.{futile}",
        "",
        pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True),
        "",
    ]


def _chance(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0%}"


def _seeds_text(n) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return ""
    return "more than 400" if n == math.inf else f"{int(n)}"


def _undecided_note(concl: pd.DataFrame, stages: list[int]) -> str:
    """Each undecided comparison: what its interval already says, and what comes next (this
    study's next look while it is open; a new study once it is futile or at the maximum)."""
    undecided = concl[concl["state"].isin(["open", "maximum", "futile"])] if not concl.empty else concl
    if undecided.empty:
        return ""

    def what_next(r) -> str:
        if r["state"] == "maximum":
            return "undecided at the maximum (see *Undecided comparisons* below)"
        if r["state"] == "futile":
            return (f"stopped as futile: its chance of a verdict by {stages[-1]} seeds was {_chance(r.get('chance_seen'))} "
                    "(see *Undecided comparisons* below)")  # fmt: skip
        looks = int(r["looks"])
        after = f" at {stages[looks]} seeds per net" if looks < len(stages) else ""
        chance = r.get("chance_seen")
        if chance is None or pd.isna(chance):
            return f"open: this study's next look{after} decides more"
        if chance < 0.1:
            return (f"open, but its chance of a verdict by {stages[-1]} seeds is {_chance(chance)}: futile at this "
                    "budget (see *Undecided comparisons* below; a study registered with a futility threshold stops "
                    "such a comparison)")  # fmt: skip
        return f"open: this study's next look{after} decides more (its chance of a verdict by {stages[-1]}: {_chance(chance)})"

    parts = [
        f"claim {r['claim']} ({md_escape(r['first'])} vs {md_escape(r['second'])}): {md_escape(r['detail'])} "
        f"(Δ {100 * r['diff']:+.2f}, interval {_interval(r)}, {int(r['n'])} paired seeds); {what_next(r)}"
        for _, r in undecided.iterrows()
    ]
    return "Not decided: " + "; ".join(parts) + "."


def lr_selection(g: Gathered) -> list[str]:
    """The study's lr selection: each net's mean validation error at each lr, the one chosen."""
    sel = g.selection
    if sel is None or sel.table.empty:
        return []
    table = sel.table.groupby(["net", "lr"], sort=False)["val_err1"].agg(["mean", "count"])
    rows = []
    for net in [n for n in g.cfg.study.archs if n in table.index.get_level_values(0)]:
        row = {"net": md_escape(net)}
        for lr, r in table.loc[net].iterrows():
            text = f"{pct(r['mean'], 2)}" if not math.isnan(r["mean"]) else "not yet"
            row[f"lr {lr:g}"] = f"**{text}**" if sel.chosen and sel.chosen.get(net) == lr else text
        rows.append(row)
    failed = sel.table[sel.table["status"] == "FAILED"]
    seeds = ", ".join(map(str, g.cfg.study.lr_seeds))
    return [
        "## Learning rate per net",
        "",
        f"Before its first look the study trained each net once per learning rate on seeds of its own ({seeds}; "
        "validation only, never results, the test set untouched) and gave each net's cells the lr with its lowest "
        "mean validation error (bold), so that no net is compared at a learning rate picked for another. Mean best "
        "validation top-1 error, %:"
        + (
            f" (a cell that failed, e.g. diverged, counts as 100%: {len(failed)} here)" if len(failed) else ""
        ),
        "",
        pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True),
        "",
    ]


def convergence(g: Gathered) -> list[str]:
    """Whether each net had converged at the study's budget, by the longer-budget cells."""
    conv, cfg = g.convergence, g.cfg
    epochs, tol = cfg.trainer.max_epochs, cfg.study.convergence_tolerance
    if conv is None or conv.empty:
        original = Path(cfg.study.reports_dir) / f"{cfg.study.name}-learning-curves-original.png"
        kept = (f"; the validation curves the original report drew from them are kept beside this report: "
                f"[{original.name}]({original.name})" if original.is_file() else "")  # fmt: skip
        moving = "the curves below show how each net's validation and training error were still moving"
        if g.res["rebuilt_from"].notna().any():
            said = f"Not judged: its runs were rebuilt from a runs CSV: their learning curves were lost with the study's store{kept}."
        elif cfg.study.convergence_epochs:  # planned, not trained yet (an interim report)
            seeds = cfg.study.convergence_seeds
            said = (f"Not yet measured: each net trains its first {'seed' if seeds == 1 else f'{seeds} seeds'} at "
                    f"{cfg.study.convergence_epochs} epochs as well, once the first look's cells end; {moving}.")  # fmt: skip
        else:
            said = f"Not judged: the study has no longer-budget cells (`study.convergence_epochs`); {moving}."
        return ["## Did the nets converge?", "", said, ""]
    longer = cfg.study.convergence_epochs
    rows = [
        {
            "net": md_escape(net),
            "seeds": int(r["seeds"]),
            f"val err % at {epochs} epochs": pct(r["val_err_short"], 2),
            f"at {longer}": pct(r["val_err_long"], 2),
            "lowered by (pts)": f"{100 * r['gain']:+.2f}",
            f"train err % at {epochs} / {longer}": f"{pct(r['train_err_short'], 1)} / {pct(r['train_err_long'], 1)}",
            f"converged at {epochs} epochs?": "yes" if r["converged"] else "**no: still learning**",
        }
        for net, r in conv.iterrows()
    ]
    return [
        "## Did the nets converge?",
        "",
        f"Each net also trained the study's first {cfg.study.convergence_seeds} seeds for {longer} epochs instead of "
        f"{epochs} (validation only). Criterion: a net had converged at {epochs} epochs when the longer budget lowered "
        f"its best validation error, on the same seeds, by less than {tol:g} points; a slope alone would not tell "
        "(under a cosine schedule the last epochs always fall). Training error is measured on augmented batches "
        "with dropout on (the dashed curves below).",
        "",
        pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True),
        "",
    ]


def not_converged(g: Gathered) -> dict[str, str]:
    """Per net that had not converged: the words a verdict comparing it carries."""
    conv = g.convergence
    if conv is None or conv.empty:
        return {}
    longer = g.cfg.study.convergence_epochs
    return {
        net: f"{net} had not converged at {g.cfg.trainer.max_epochs} epochs ({longer} lowered its validation "
        f"error by {100 * r['gain']:.2f} points)"
        for net, r in conv.iterrows()
        if not r["converged"]
    }


def next_step(g: Gathered) -> list[str]:
    """One plain line for a study that ended with comparisons undecided: what to run for a verdict,
    what it costs, the command."""
    concl, cfg = g.concl, g.cfg
    undecided = concl[concl["state"].isin(["open", "futile", "maximum"])] if not concl.empty else concl
    if undecided.empty:
        return []
    if (undecided["state"] == "open").all():
        line = (f"the open comparisons continue at the next look: `vgg-ablation study experiment={cfg.study.name}` "
                "(the same command) trains what it needs")  # fmt: skip
    elif cfg.study.next_step:
        line = cfg.study.next_step
    else:
        worst = max(undecided.get("plan_design", pd.Series(dtype=float)).dropna(), default=math.nan)
        per_cell = g.res["seconds"].mean()
        nets = len(g.summary)
        if math.isnan(worst) or worst == math.inf:
            line = ("at this budget even 400 seeds per net would likely not decide the undecided comparisons: more "
                    "data, a longer budget or a wider margin is the way (docs/statistics.md)")  # fmt: skip
        else:
            hours = worst * nets * per_cell / 3600
            line = (f"a new study with up to {int(worst)} seeds per net would have an 80% chance of a verdict on each "
                    f"undecided comparison at its design effect; about {hours:.1f} hours of cells at this study's cell times "
                    f"({per_cell:.0f} s): `vgg-ablation study experiment={cfg.study.name} study.name={cfg.study.name}-2 "
                    f"study.seeds=[{max(g.design.order) + 1},{max(g.design.order) + 2},{max(g.design.order) + 3}] "
                    f"study.max_seeds={int(worst)}`")  # fmt: skip
    return ["## What next", "", line[0].upper() + line[1:] + ".", ""]


def compute(g: Gathered) -> list[str]:
    compute = analysis.compute_table(g.summary)
    if compute.empty:
        return []
    return [
        "## Compute",
        "",
        "Forward FLOPs per image (torch's FlopCounterMode, multiply-add = 2) and images seen in "
        "training; nets that start from the trained A also count A's training.",
        "",
        compute.to_markdown(floatfmt=(",.0f", ",.2f", ",.0f", ",.0f", ",.4f")),
        "",
    ]


def designs() -> list[str]:
    return [
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
    ]


def not_counted(g: Gathered) -> list[str]:
    not_results = g.runs[~g.runs["run_id"].isin(g.res["run_id"])]
    if not len(not_results):
        return []
    lines = ["## Runs not counted", "", "| run | net | seed | status | reason |", "|---|---|---|---|---|"]
    for _, r in not_results.iterrows():
        orphaned = r["status"] == "RUNNING" and _orphaned(g.client, r["run_id"])
        status = "RUNNING (orphaned: its process is gone)" if orphaned else r["status"]
        reason = r["failure_reason"] if isinstance(r["failure_reason"], str) else ""
        lines.append(
            f"| `{r['run_id'][:8]}` | {md_escape(r['net'])} | {r['seed']:.0f} | {status} | {md_escape(reason)} |"
        )
    return [*lines, ""]


def dashboard(g: Gathered) -> list[str]:
    return [
        "## Open these runs in the MLflow dashboard",
        "",
        "```bash",
        "vgg-ablation ui            # = mlflow ui --backend-store-uri <this store>, on 127.0.0.1:5000",
        "```",
        "",
        f"Store: `{md_escape(_display_uri(g.uri))}`, experiment `{md_escape(g.experiment)}`. "
        f"Regenerate this report with `vgg-ablation report experiment={md_escape(g.cfg.study.name)}`.",
        "",
    ]


def _seed_range(seeds: list[int]) -> str:
    """0-5, 10, 12-14: a list of seeds, short."""
    parts, start = [], None
    for i, s in enumerate(seeds):
        if start is None:
            start = s
        if i + 1 == len(seeds) or seeds[i + 1] != s + 1:
            parts.append(f"{start}" if start == s else f"{start}-{s}")
            start = None
    return ", ".join(parts)


def _mlflow_version() -> str:
    import mlflow

    return mlflow.__version__


def _dataset_line(res: pd.DataFrame, cfg: DictConfig, client, data_here: bool = True) -> str:
    digests = ", ".join(f"`{d}`" for d in sorted(res["data_digest"].dropna().unique())) or "not recorded"
    counts = res.iloc[0]
    inputs = client.get_run(counts["run_id"]).inputs.dataset_inputs
    name = inputs[0].dataset.name if inputs else cfg.data.name
    val = f"{int(counts['val_images']):,} validation, " if not pd.isna(counts.get("val_images")) else ""
    return (
        f"| data | {md_escape(name)} (`data={md_escape(cfg.data.name)}`), digest {digests}: {int(counts['train_images']):,} training, "
        f"{val}{int(counts['test_images']):,} test images, {int(counts['num_classes'])} classes; "
        f"normalize `{cfg.data.normalize}`"
        + (
            ""
            if data_here
            else " (the data is not on the machine that wrote this report: its runs' recorded digest names it)"
        )
        + " |"
    )


def lrn(summary: pd.DataFrame, runs_res: pd.DataFrame) -> list[str]:
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
            f"{r['denominator_p99']:.3f} | {_lrn_state(net, r['active'])} |"
        )
    if not activity.loc[[n for n in activity.index if n != "A-LRN0"], "active"].all():
        lines += [
            "",
            "An inactive LRN makes claim 1 true by construction: rerun with `model.lrn_scale=paper` "
            "(the default) or `data.normalize=paper` to test it as the paper had it.",
        ]
    return [*lines, ""]


def _lrn_state(net: str, active: bool) -> str:
    if net == "A-LRN0":  # the control: LRN's layer with alpha = 0, its constant rescaling alone
        return "rescaling only (alpha = 0: the control, by design)"
    return "active" if active else "**LRN inactive at this input scale**"


def _mlflow_line(cfg: DictConfig, exp, parent) -> str:
    if exp is None:
        return ""
    base = cfg.logger.ui_url
    study_run = (
        f"[the study's run]({stores.run_url(base, exp.experiment_id, parent.info.run_id)}) · "
        if parent
        else ""
    )
    return (
        f"| MLflow (`vgg-ablation ui`) | {study_run}[every run]({stores.runs_url(base, exp.experiment_id)}) |"
    )


def _run_links(cfg: DictConfig, experiment_id: str, nets, fingerprints: list[str]) -> dict[str, str]:
    """Each net's runs in the dashboard: the runs page filtered to its config and arch
    (`fingerprints`: the study's, then its scratch-B control's when it has one)."""
    links = {}
    for net in nets:
        scratch = net == f"B{runtable.SCRATCH}"
        fp = fingerprints[1] if scratch and needs_scratch_b(cfg) else fingerprints[0]
        arch = "B" if scratch else net
        search = f"tags.fingerprint = '{fp}' and params.arch = '{arch}'"
        links[net] = stores.runs_url(cfg.logger.ui_url, experiment_id, search)
    return links


def _display_uri(uri: str) -> str:
    """Paths under the working folder are shown relative, so a committed report holds no home dirs."""
    prefix = f"sqlite:///{Path.cwd()}/"
    return "sqlite:///" + uri[len(prefix) :] if uri.startswith(prefix) else uri


def _orphaned(client, run_id: str) -> bool:
    return stores.is_orphaned(client.get_run(run_id))


# -- several studies of the same nets, side by side ----------------------------------------------------------
def side_by_side(studies: list[Gathered]) -> list[str]:
    """One table of claims by study (each verdict with its interval, budget and seeds) and one of
    each net's error by study: where a conclusion starts or stops holding, budget by budget."""
    names = [g.cfg.study.name for g in studies]
    claims: dict[tuple, dict] = {}
    for g in studies:
        for _, r in g.concl[g.concl["state"] != "not tested"].iterrows():
            row = claims.setdefault((r["claim"], r["first"], r["second"]), {
                "#": r["claim"], "comparison": f"{md_escape(r['first'])} vs {md_escape(r['second'])}"})  # fmt: skip
            seeds = f"{int(r['n'])} seeds" if r.get("n") else "no look yet"
            detail = f" ({md_escape(r['detail'])})" if _text(r, "detail") else ""
            row[g.cfg.study.name] = f"**{md_escape(r['outcome'])}**{detail}, {_interval(r)}, {seeds}"
    nets = pd.DataFrame({
        g.cfg.study.name: {n: f"{pct(r['top1_err_mean'], 2)} ({int(r['seeds'])})" for n, r in g.summary.iterrows()}
        for g in studies
    })  # fmt: skip
    return [
        f"# Budgets side by side: {', '.join(f'`{md_escape(n)}`' for n in names)}",
        "",
        "The same claims, study by study. Each verdict holds at its own study's budget only, and carries its own "
        "error rate (each study's report states its rule); read across a row to see where a conclusion starts or "
        "stops holding.",
        "",
        "| study | budget | seeds per net | rule |",
        "|---|---|---|---|",
        *[f"| [{md_escape(g.cfg.study.name)}]({g.cfg.study.name}.md) | {budget_words(g.cfg)} | "
          + ", ".join(f"{md_escape(n)} {int(r['seeds'])}" for n, r in g.summary.iterrows())
          + f" | {g.cfg.study.alpha:.0%} family-wise over {g.design.rule.comparisons} comparison(s) |" for g in studies],
        "",
        "## The claims",
        "",
        pd.DataFrame(list(claims.values())).fillna("not tested").to_markdown(index=False, disable_numparse=True),
        "",
        "## Test top-1 error per net, % (mean over its seeds; seeds in brackets)",
        "",
        nets.fillna("").to_markdown(disable_numparse=True),
        "",
    ]  # fmt: skip

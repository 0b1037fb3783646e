"""From MLflow runs to verdicts on the paper's conclusions.

`load_runs` reads a study's runs into one tidy DataFrame; `results` keeps one FINISHED run per
(net, seed); `per_arch` aggregates over seeds; `test_conclusions` decides each claim.

How a claim is decided (every test is on test top-1 error, in points):
- **Paired where the design is paired.** A seed fixes a run's validation split, data order,
  augmentation draws and initial weights (and, with init=from_A, the trained A it starts from),
  so two nets run on the same seeds are compared through their per-seed differences: a paired t
  interval. (A mixed model with seed as a random intercept gives the same estimate and interval
  for one run per net and seed; the paired t says it in one line.) Where the seed sets differ,
  Welch's t on the two samples; the report says which test each row used.
- **Precise outcomes, one rule strength.** Each outcome is a one-sided t-test at ALPHA = 0.025
  (the two halves of a 95% interval), against 0 or against the study's margin `study.margin`,
  fixed in the study's config before the runs:
  - a "better" claim (X beats Y): *supported* if X's error is lower (p of diff < 0), *contradicted,
    the other way* if it is higher (diff > 0);
  - a "no better" claim (X is no better than Y: LRN, saturation): *supported* by equivalence
    (TOST: diff > -margin and diff < +margin, both significant), *contradicted, the other way*
    if X is better by more than the margin, *contradicted, it degrades* if X is worse by more
    than the margin.
  Otherwise *inconclusive*.
- **Multiplicity.** Holm's step-down across the claims of one report, on each claim's smallest
  outcome p (only one outcome of a claim can be significant at this level); raw and adjusted p
  are shown, verdicts use the adjusted ones.
- **Planning, not post-hoc power.** Seeds needed to detect the pre-registered smallest effect of
  interest `study.min_effect` (or, for "no better" claims, to show equivalence within the margin
  when the true difference is 0) at 80% power, at the strictest Holm level (ALPHA / claims),
  with the observed spread of the per-seed differences: a plan for the next study.
- **Caveats from data.** A run whose test accuracy is not above chance is named and its claim not
  decided; a net whose validation error was still falling at the end is named in the budget
  caveat of every claim it enters, whatever the outcome.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.025  # per one-sided test: the halves of a two-sided 95% interval
POWER = 0.8
CHANCE_ALPHA = 0.01  # a run "learned" when its test accuracy beats chance at this level
LRN_INACTIVE = 1.01  # mean LRN denominator / k below this: the layer changed activations by < ~1%


@dataclass(frozen=True)
class Claim:
    """`first` should have lower test top-1 error than `second` (kind='better'), or `first` should
    be no better than `second` (kind='no better': the paper's LRN and saturation findings)."""

    number: int
    text: str
    first: str
    second: str
    kind: str  # "better" | "no better"
    needs: str = ""  # what a study must include to test it, when it cannot


# facts.md, "The conclusions to test" (paper section 4.1).
CLAIMS = (
    Claim(1, "LRN does not help: A-LRN is no better than A", "A-LRN", "A", "no better"),
    Claim(2, "Depth helps: B (13 layers) beats A (11)", "B", "A", "better"),
    Claim(2, "Depth helps: D (16) beats B (13)", "D", "B", "better"),
    Claim(2, "Depth saturates: E (19) is no better than D (16)", "E", "D", "no better"),
    Claim(3, "Extra non-linearity helps: C (1x1) beats B", "C", "B", "better"),
    Claim(3, "Spatial context matters more: D (3x3) beats C (1x1)", "D", "C", "better"),
    Claim(
        4,
        "Small filters win: B beats B-5x5 (one 5x5 per pair of 3x3)",
        "B",
        "B-5x5",
        "better",
        needs="B and B-5x5 from the same start (in a from-A study the study adds a from-scratch B)",
    ),
)
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
    "metrics.test/images": "test_images",
    "metrics.test/err1": "test_err1",
    "metrics.test/err5": "test_err5",
    "metrics.test/acc1": "test_acc1",
    "metrics.images_seen": "images_seen",
    "metrics.flops_per_image": "flops_per_image",
    "metrics.lrn/denominator_mean": "lrn_mean",
    "metrics.lrn/denominator_p99": "lrn_p99",
    "metrics.time/seconds": "seconds",
    "tags.learned": "learned",
    "tags.failure_reason": "failure_reason",
    "tags.host": "host",
    "tags.pid": "pid",
    "tags.device": "device",
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


def run_learned(row: pd.Series) -> bool:
    """The run's own verdict (tag `learned`), else a one-sided binomial test of its test
    accuracy against 1/classes at CHANCE_ALPHA."""
    tag = row.get("learned")
    if isinstance(tag, str) and tag in ("true", "false"):
        return tag == "true"
    k, n, acc = row.get("num_classes"), row.get("test_images"), row.get("test_acc1")
    if not k or not n or pd.isna(k) or pd.isna(n) or pd.isna(acc):
        return bool(acc > 1.5 / k) if k and not pd.isna(k) else True
    p = stats.binomtest(int(round(acc * n)), int(n), 1 / k, alternative="greater").pvalue
    return bool(p < CHANCE_ALPHA)


def per_arch(res: pd.DataFrame, order: list[str] | None = None) -> pd.DataFrame:
    """Mean and spread over seeds, per net, in the paper's order."""
    if res.empty:
        return pd.DataFrame()
    if "net" not in res:
        res = res.assign(net=res["arch"])
    if "learned" not in res:
        res = res.assign(learned=[run_learned(r) for _, r in res.iterrows()])
    grouped = res.groupby("net")
    table = pd.DataFrame(
        {
            "arch": grouped["arch"].first(),
            "depth": grouped["depth"].first(),
            "params": grouped["params"].first(),
            "seeds": grouped["seed"].nunique(),
            "top1_err_mean": grouped["test_err1"].mean(),
            "top1_err_std": grouped["test_err1"].std(ddof=1),
            "top5_err_mean": grouped["test_err5"].mean(),
            "top5_err_std": grouped["test_err5"].std(ddof=1),
            "epochs": grouped["epochs"].first(),
            "seconds_mean": grouped["seconds"].mean(),
            "not_learned": grouped.apply(
                lambda g: [int(s) for s in g.loc[~g["learned"].astype(bool), "seed"]], include_groups=False
            ),
        }
    )
    for optional in ("flops_per_image", "images_seen", "lrn_mean", "lrn_p99", "init"):
        if optional in res:
            table[optional] = grouped[optional].first() if optional == "init" else grouped[optional].mean()
    table["at_chance"] = table["not_learned"].map(len) == table["seeds"]
    order = [a for a in (order or []) if a in table.index] + [
        a for a in table.index if a not in (order or [])
    ]
    return table.loc[order]


# -- one comparison -----------------------------------------------------------------------------
def compare(first: pd.Series, second: pd.Series, margin: float) -> dict[str, float | str]:
    """first - second on errors indexed by seed: paired on the common seeds when both nets ran
    the same seeds, else Welch. Returns diff, 95% CI, sd of what is averaged, dof, and the
    one-sided p of each outcome."""
    first, second = first.dropna(), second.dropna()
    paired = len(first) >= 2 and set(first.index) == set(second.index)
    out: dict[str, float | str] = {
        "test": "paired t" if paired else "Welch t",
        "n": f"{len(first)} vs {len(second)}",
    }
    if paired:
        d = (first - second.loc[first.index]).to_numpy(float)
        diff, n = float(d.mean()), len(d)
        sd = float(d.std(ddof=1))
        se, dof = sd / math.sqrt(n), n - 1
        out["n"] = f"{n} paired seeds"
    else:
        a, b = first.to_numpy(float), second.to_numpy(float)
        diff = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
        if len(a) < 2 or len(b) < 2:
            return {
                **out,
                "diff": diff,
                **dict.fromkeys(("ci_low", "ci_high", "sd", "dof", *OUTCOME_P), math.nan),
            }
        va, vb = a.var(ddof=1), b.var(ddof=1)
        se = math.sqrt(va / len(a) + vb / len(b))
        dof = (
            (va / len(a) + vb / len(b)) ** 2
            / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
            if se > 0
            else len(a) + len(b) - 2
        )
        sd = math.sqrt((va + vb) / 2) * math.sqrt(2)  # spread of a difference of two runs
    out.update(diff=diff, sd=sd, dof=float(dof))
    if se == 0:  # identical differences on every seed: the difference is exact
        out.update(ci_low=diff, ci_high=diff)
        exact = {
            "p_lower": diff < 0,
            "p_higher": diff > 0,
            "p_below_margin": diff < -margin,
            "p_above_margin": diff > margin,
        }
        out.update({k: 0.0 if v else 1.0 for k, v in exact.items()})
        out["p_equivalent"] = 0.0 if abs(diff) < margin else 1.0
        return out
    half = float(stats.t.ppf(1 - ALPHA, dof)) * se
    t = stats.t(dof)
    out.update(
        ci_low=diff - half,
        ci_high=diff + half,
        p_lower=float(t.cdf(diff / se)),  # H1: diff < 0
        p_higher=float(t.sf(diff / se)),  # H1: diff > 0
        p_below_margin=float(t.cdf((diff + margin) / se)),  # H1: diff < -margin
        p_above_margin=float(t.sf((diff - margin) / se)),  # H1: diff > +margin
    )
    # TOST: equivalent when both "diff > -margin" and "diff < +margin" are significant
    out["p_equivalent"] = max(float(t.sf((diff + margin) / se)), float(t.cdf((diff - margin) / se)))
    return out


OUTCOME_P = ("p_lower", "p_higher", "p_below_margin", "p_above_margin", "p_equivalent")
# For each kind of claim: its possible outcomes, each with the p that decides it.
OUTCOMES = {
    "better": (("supported", "p_lower"), ("contradicted, the other way", "p_higher")),
    "no better": (
        ("supported", "p_equivalent"),
        ("contradicted, the other way", "p_below_margin"),
        ("contradicted, it degrades", "p_above_margin"),
    ),
}


def holm(p: pd.Series) -> pd.Series:
    """Holm's step-down adjusted p-values (family-wise error control without independence)."""
    valid = p.dropna()
    if valid.empty:
        return p.copy()
    from statsmodels.stats.multitest import multipletests

    adjusted = pd.Series(multipletests(valid.to_numpy(float), method="holm")[1], index=valid.index)
    return adjusted.reindex(p.index)


def seeds_needed(kind: str, sd: float, min_effect: float, margin: float, n_claims: int) -> float:
    """A plan: paired seeds per net for POWER to decide a claim of this kind at the strictest
    Holm level (ALPHA / n_claims, one-sided), given the spread `sd` of per-seed differences.

    'better': to detect a true gain of `min_effect`. 'no better': to show equivalence within
    `margin` when the true difference is 0 (TOST; each one-sided test gets power sqrt(POWER))."""
    from statsmodels.stats.power import TTestPower

    if not sd or math.isnan(sd):
        return math.nan
    alpha = ALPHA / max(1, n_claims)
    if kind == "better":
        effect, power = min_effect / sd, POWER
    else:
        effect, power = margin / sd, math.sqrt(POWER)
    # The smallest n that reaches the power (solve_power's root finder fails below n = 2).
    ns = np.arange(2, 10_001)
    reached = TTestPower().power(effect_size=effect, nobs=ns, alpha=alpha, alternative="larger") >= power
    return float(ns[reached.argmax()]) if reached.any() else math.inf


def still_improving(curves: pd.DataFrame, val_images: float, last: int = 3) -> pd.Series:
    """Per net: was validation top-1 error still falling over the last `last` epochs by more than
    its noise? The drop err[E-last+1] - err[E], averaged over seeds, against twice its standard
    error: the larger of the seed-to-seed SE and the binomial SE of a difference of two
    validation errors."""
    flags = {}
    if curves.empty:
        return pd.Series(flags, dtype=bool)
    for net, c in curves.groupby("net"):
        drops = []
        for _, s in c.groupby("seed"):
            s = s.sort_values("epoch")
            if len(s) >= last:
                drops.append(float(s["val/err1"].iloc[-last] - s["val/err1"].iloc[-1]))
        if not drops:
            continue
        mean = float(np.mean(drops))
        err = float(c.sort_values("epoch").groupby("seed")["val/err1"].last().mean())
        binomial = math.sqrt(2 * err * (1 - err) / max(1.0, val_images or 1.0)) / math.sqrt(len(drops))
        spread = float(np.std(drops, ddof=1)) / math.sqrt(len(drops)) if len(drops) > 1 else 0.0
        flags[net] = bool(mean > 2 * max(binomial, spread))
    return pd.Series(flags, dtype=bool)


def test_conclusions(
    res: pd.DataFrame,
    summary: pd.DataFrame,
    claims=CLAIMS,
    margin: float = 0.005,
    min_effect: float = 0.01,
    improving: pd.Series | None = None,
) -> pd.DataFrame:
    """One row per claim: the test used, Δ with its 95% CI, raw and Holm-adjusted p, the outcome,
    the nets that had not converged, and the seeds a decisive study would need. Margins and
    effects are fractions of top-1 error (0.005 = 0.5 points)."""
    if "net" not in res:
        res = res.assign(net=res["arch"])
    improving = improving if improving is not None else pd.Series(dtype=bool)
    rows = []
    for claim in claims:
        first, second = claim.first, claim.second
        if claim.number == 4 and f"B{SCRATCH}" in summary.index:
            first = f"B{SCRATCH}"  # B-5x5 trains from scratch: compare it with the scratch B
        row = {
            "claim": claim.number,
            "statement": claim.text,
            "kind": claim.kind,
            "first": first,
            "second": second,
        }
        missing = [n for n in (first, second) if n not in summary.index]
        if claim.number == 4 and not missing and _init(summary, first) != _init(summary, second):
            missing = ["a B trained from the same kind of start as B-5x5"]
        if missing:
            needs = claim.needs if claim.number == 4 else f"{first} and {second} in the study"
            rows.append({**row, "outcome": f"not tested here (needs {needs})", "test": "", "n": ""})
            continue
        a = res[res["net"] == first].set_index("seed")["test_err1"]
        b = res[res["net"] == second].set_index("seed")["test_err1"]
        c = compare(a, b, margin)
        collapsed = [
            f"{net} seed {int(s)}" for net in (first, second) for s in summary.loc[net, "not_learned"]
        ]
        row.update(c)
        row["not_converged"] = [n for n in (first, second) if bool(improving.get(n, False))]
        row["seeds_needed"] = math.nan  # planned below, once the size of the family is known
        if collapsed:
            row["outcome"] = f"no verdict: {', '.join(collapsed)} learned nothing"
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    for column in ("diff", "ci_low", "ci_high", *OUTCOME_P, "sd", "seeds_needed"):
        if column not in table:
            table[column] = math.nan
    if "not_converged" not in table:
        table["not_converged"] = [[] for _ in range(len(table))]
    table["not_converged"] = table["not_converged"].map(lambda v: v if isinstance(v, list) else [])
    # Each claim enters the family with the p of its best-supported outcome.
    decidable = table["outcome"].isna() if "outcome" in table else pd.Series(True, index=table.index)
    best_p, best_outcome = [], []
    for _, r in table.iterrows():
        options = [(r[p], name) for name, p in OUTCOMES[r["kind"]] if not pd.isna(r[p])]
        p, name = min(options) if options else (math.nan, "inconclusive")
        best_p.append(p)
        best_outcome.append(name)
    table["p"] = best_p
    table["p_holm"] = holm(table["p"].where(decidable))
    family = int(table["p_holm"].notna().sum())  # the claims actually tested here
    table["seeds_needed"] = [
        seeds_needed(r["kind"], r["sd"], min_effect, margin, family) if not pd.isna(r["sd"]) else math.nan
        for _, r in table.iterrows()
    ]
    table.attrs["family"] = family
    outcomes = []
    for i, r in table.iterrows():
        if not decidable[i]:
            outcomes.append(r["outcome"])
        elif not pd.isna(r["p_holm"]) and r["p_holm"] < ALPHA:
            outcomes.append(best_outcome[i])
        else:
            outcomes.append("inconclusive")
    table["outcome"] = outcomes
    table["caveat"] = [
        f"{' and '.join(nets)} still improving at the end: a longer budget may change this" if nets else ""
        for nets in table["not_converged"]
    ]
    return table


def _init(summary: pd.DataFrame, net: str) -> str:
    init = summary.loc[net].get("init", "") if "init" in summary else ""
    return "from_A" if init == "from_A" else "scratch"


def lrn_activity(summary: pd.DataFrame) -> pd.DataFrame:
    """Per net with LRN: mean and 99th-percentile denominator / k on validation images, and
    whether LRN did anything at this input scale."""
    if "lrn_mean" not in summary:
        return pd.DataFrame()
    rows = summary[summary["lrn_mean"].notna()]
    return pd.DataFrame(
        {
            "denominator_mean": rows["lrn_mean"],
            "denominator_p99": rows["lrn_p99"],
            "active": rows["lrn_mean"] >= LRN_INACTIVE,
        }
    )


def compute_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Forward FLOPs per image and images seen per net, counting A's training for nets that start
    from the trained A (their total includes it)."""
    if "flops_per_image" not in summary:
        return pd.DataFrame()
    table = pd.DataFrame(index=summary.index)
    table["forward MFLOPs / image"] = summary["flops_per_image"] / 1e6
    seen = summary.get("images_seen", pd.Series(np.nan, index=summary.index))
    a_seen = float(seen.get("A", np.nan)) if "A" in seen else math.nan
    from_a = (summary.get("init", pd.Series("", index=summary.index)) == "from_A") & (summary["depth"] > 11)
    a_flops = float(summary["flops_per_image"].get("A", np.nan)) if "A" in summary.index else math.nan
    table["images seen"] = seen
    table["images seen incl. A's"] = seen + np.where(from_a, a_seen, 0)
    own = summary["flops_per_image"] * seen
    table["training PFLOPs (3x fwd, incl. A's)"] = 3 * (own + np.where(from_a, a_flops * a_seen, 0)) / 1e15
    return table

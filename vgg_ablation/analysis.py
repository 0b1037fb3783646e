"""From MLflow runs to tables that test the paper's conclusions.

`load_runs` reads a study's runs (MLflow `search_runs`) into one tidy DataFrame; `per_arch`
aggregates over seeds; `test_conclusions` compares pairs of architectures on test top-1 error with
Welch's t-test (scipy), a 95% confidence interval of the difference, Hedges' g, and a verdict.
When the verdict is inconclusive, the seeds per arch needed to decide are estimated with a power
analysis (statsmodels, 80% power at alpha 0.05) from the observed spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05
POWER = 0.8
MARGIN = 0.01  # a "no better" claim holds if any gain is under 1 point of top-1 error


@dataclass(frozen=True)
class Claim:
    """`better` should have lower test top-1 error than `worse` (kind='better'), or `better` should
    be no better than `worse` (kind='no better': the paper's LRN and saturation findings)."""

    number: int
    text: str
    better: str
    worse: str
    kind: str  # "better" | "no better"
    about_depth: bool = False


# facts.md, "The conclusions to test" (paper section 4.1).
CLAIMS = (
    Claim(1, "LRN does not help: A-LRN is no better than A", "A-LRN", "A", "no better"),
    Claim(2, "Depth helps: B (13 layers) beats A (11)", "B", "A", "better", about_depth=True),
    Claim(2, "Depth helps: D (16) beats B (13)", "D", "B", "better", about_depth=True),
    Claim(2, "Depth saturates: E (19) is no better than D (16)", "E", "D", "no better", about_depth=True),
    Claim(3, "Extra non-linearity helps: C (1x1) beats B", "C", "B", "better", about_depth=True),
    Claim(3, "Spatial context matters more: D (3x3) beats C (1x1)", "D", "C", "better"),
    Claim(4, "Small filters win: B beats B-5x5 (one 5x5 per pair of 3x3)", "B", "B-5x5", "better"),
)

RUN_COLUMNS = {
    "params.arch": "arch",
    "params.seed": "seed",
    "params.depth": "depth",
    "params.params": "params",
    "params.epochs": "epochs",
    "params.num_classes": "num_classes",
    "params.train_images": "train_images",
    "metrics.test/images": "test_images",
    "metrics.test/err1": "test_err1",
    "metrics.test/err5": "test_err5",
    "metrics.test/acc1": "test_acc1",
    "metrics.time/seconds": "seconds",
    "tags.failure_reason": "failure_reason",
    "tags.host": "host",
    "tags.pid": "pid",
    "tags.device": "device",
    "tags.git_commit": "git_commit",
    "tags.torch_version": "torch_version",
    "tags.lightning_version": "lightning_version",
}


def tidy(raw: pd.DataFrame) -> pd.DataFrame:
    """MLflow's search_runs frame -> one typed row per run."""
    df = pd.DataFrame({"run_id": raw.get("run_id", pd.Series(dtype=str)), "status": raw.get("status")})
    for source, name in RUN_COLUMNS.items():
        df[name] = raw.get(source, np.nan)
    for name in ("seed", "depth", "params", "epochs", "num_classes", "train_images", "test_images"):
        df[name] = pd.to_numeric(df[name], errors="coerce")
    df["start_time"] = raw.get("start_time")
    df["end_time"] = raw.get("end_time")
    return df


def load_runs(tracking_uri: str, experiment: str, fingerprint: str | None = None) -> pd.DataFrame:
    """Every run of a study (optionally of one config fingerprint), tidy, newest first."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return tidy(pd.DataFrame())
    filter_string = f"tags.fingerprint = '{fingerprint}'" if fingerprint else ""
    raw = mlflow.search_runs(
        [found.experiment_id], filter_string=filter_string, order_by=["attributes.start_time DESC"]
    )
    return tidy(raw)


def results(runs: pd.DataFrame) -> pd.DataFrame:
    """One FINISHED run per (arch, seed): the results that count. Nothing else is a result:
    FAILED, KILLED and RUNNING runs (orphaned or live) are listed in the report, never averaged."""
    done = runs[(runs["status"] == "FINISHED") & runs["test_err1"].notna()]
    return done.sort_values("start_time", ascending=False).drop_duplicates(["arch", "seed"])


def at_chance(acc: pd.Series, num_classes: float, test_images: float) -> bool:
    """A net that never learned: its mean top-1 accuracy is not significantly above 1/classes
    (one-sided binomial test on the test images, alpha 0.01)."""
    if acc.empty or not num_classes or not test_images or math.isnan(test_images):
        return bool(acc.mean() <= 1.5 / num_classes) if num_classes else False
    correct = int(round(float(acc.mean()) * test_images))
    p = stats.binomtest(correct, int(test_images), 1 / num_classes, alternative="greater").pvalue
    return bool(p > 0.01)


def per_arch(res: pd.DataFrame, order: list[str] | None = None) -> pd.DataFrame:
    """Mean and spread over seeds, per architecture, in the paper's order."""
    if res.empty:
        return pd.DataFrame()
    grouped = res.groupby("arch")
    table = pd.DataFrame(
        {
            "depth": grouped["depth"].first(),
            "params": grouped["params"].first(),
            "seeds": grouped["seed"].nunique(),
            "top1_err_mean": grouped["test_err1"].mean(),
            "top1_err_std": grouped["test_err1"].std(ddof=1),
            "top5_err_mean": grouped["test_err5"].mean(),
            "top5_err_std": grouped["test_err5"].std(ddof=1),
            "epochs": grouped["epochs"].first(),
            "seconds_mean": grouped["seconds"].mean(),
        }
    )
    table["at_chance"] = [
        at_chance(group["test_acc1"], group["num_classes"].iloc[0], group["test_images"].iloc[0])
        for _, group in grouped
    ]
    order = [a for a in (order or []) if a in table.index] + [
        a for a in table.index if a not in (order or [])
    ]
    return table.loc[order]


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Welch comparison of two samples of errors: difference a - b, 95% CI, p, Hedges' g."""
    diff = float(a.mean() - b.mean())
    out = {
        "diff": diff,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "p": math.nan,
        "g": math.nan,
        "sd": math.nan,
    }
    if len(a) < 2 or len(b) < 2:
        return out
    va, vb = a.var(ddof=1), b.var(ddof=1)
    se = math.sqrt(va / len(a) + vb / len(b))
    pooled = math.sqrt(((len(a) - 1) * va + (len(b) - 1) * vb) / (len(a) + len(b) - 2))
    out["sd"] = pooled
    if se == 0:  # identical values within each group: the difference is exact
        out.update(ci_low=diff, ci_high=diff, p=0.0 if diff else 1.0)
        return out
    dof = (va / len(a) + vb / len(b)) ** 2 / (
        (va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1)
    )
    half = float(stats.t.ppf(1 - ALPHA / 2, dof)) * se
    correction = 1 - 3 / (4 * (len(a) + len(b)) - 9)
    out.update(
        ci_low=diff - half,
        ci_high=diff + half,
        p=float(stats.ttest_ind(a, b, equal_var=False).pvalue),
        g=diff / pooled * correction if pooled > 0 else math.nan,
    )
    return out


def seeds_needed(diff: float, sd: float, kind: str, margin: float = MARGIN) -> float:
    """Seeds per arch for 80% power to decide, from the observed difference and spread.

    'better': to show the observed gain |diff| is real (two-sided t-test). 'no better': to show
    that any gain stays under `margin` (one-sided test against -margin). inf when the observed
    difference leaves nothing to detect.
    """
    from statsmodels.stats.power import TTestIndPower

    if not sd or math.isnan(sd):
        return math.nan
    if kind == "better":
        effect, alternative = abs(diff) / sd, "two-sided"
    else:
        effect, alternative = (diff + margin) / sd, "larger"
    if effect <= 0.05:
        return math.inf
    try:
        n = TTestIndPower().solve_power(effect_size=effect, alpha=ALPHA, power=POWER, alternative=alternative)
    except (ValueError, RuntimeError):
        return math.nan
    return float(math.ceil(max(n, 2)))


def verdict(claim: Claim, c: dict[str, float], margin: float = MARGIN) -> str:
    """diff = err(better) - err(worse); negative means `better` really is better."""
    low, high = c["ci_low"], c["ci_high"]
    if math.isnan(low):
        return "inconclusive"
    if claim.kind == "better":
        if high < 0:
            return "supported"
        if low > 0:
            return "contradicted"
        return "inconclusive"
    if high < 0 and abs(c["diff"]) >= margin:  # a real gain larger than the margin
        return "contradicted"
    if low > -margin:
        return "supported"
    return "inconclusive"


def test_conclusions(res: pd.DataFrame, summary: pd.DataFrame, claims=CLAIMS) -> pd.DataFrame:
    """One row per claim whose two archs were both run."""
    rows = []
    for claim in claims:
        if claim.better not in summary.index or claim.worse not in summary.index:
            continue
        a = res.loc[res["arch"] == claim.better, "test_err1"].to_numpy(float)
        b = res.loc[res["arch"] == claim.worse, "test_err1"].to_numpy(float)
        c = compare(a, b)
        chance = [arch for arch in (claim.better, claim.worse) if summary.loc[arch, "at_chance"]]
        if chance:
            outcome = f"no verdict: {', '.join(chance)} at chance"
        else:
            outcome = verdict(claim, c)
        needed = seeds_needed(c["diff"], c["sd"], claim.kind) if outcome == "inconclusive" else math.nan
        rows.append(
            {
                "claim": claim.number,
                "statement": claim.text,
                "kind": claim.kind,
                "about_depth": claim.about_depth,
                "seeds": f"{len(a)} vs {len(b)}",
                "diff_top1_err": c["diff"],
                "ci_low": c["ci_low"],
                "ci_high": c["ci_high"],
                "p": c["p"],
                "hedges_g": c["g"],
                "verdict": outcome,
                "seeds_needed": needed,
            }
        )
    return pd.DataFrame(rows)

"""Verdicts on constructed run tables where the right answer is known."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from vgg_ablation import analysis
from vgg_ablation.analysis import Claim

DEPTH = {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19, "B-5x5": 8}
MARGIN = 0.005  # 0.5 points


def runs(errors: dict[str, list[float]], test_images=10_000, num_classes=10, init=None) -> pd.DataFrame:
    rows = []
    for arch, errs in errors.items():
        for seed, err in enumerate(errs):
            rows.append(
                {
                    "run_id": f"{arch}-{seed}",
                    "status": "FINISHED",
                    "arch": arch,
                    "net": arch,
                    "seed": seed,
                    "depth": DEPTH[arch],
                    "params": 1000,
                    "epochs": 10,
                    "init": (init or {}).get(arch, "kaiming"),
                    "num_classes": num_classes,
                    "test_images": test_images,
                    "test_err1": err,
                    "test_err5": err / 3,
                    "test_acc1": 1 - err,
                    "seconds": 5.0,
                    "start_time": pd.Timestamp(2026, 1, 1, 0, 0, seed),
                }
            )
    return pd.DataFrame(rows)


def conclude(errors, claims=analysis.CLAIMS, **kwargs):
    res = analysis.results(runs(errors, **kwargs.pop("runs", {})))
    summary = analysis.per_arch(res, order=list(errors))
    kwargs.setdefault("margin", MARGIN)
    return analysis.test_conclusions(res, summary, claims, **kwargs).set_index("statement"), summary


NO_BETTER_LRN, BETTER_B_A, BETTER_D_B, SATURATES_E_D = analysis.CLAIMS[:4]
SMALL_FILTERS = analysis.CLAIMS[6]


def test_a_paired_effect_that_welch_misses_is_found():
    # Seeds differ a lot from each other, but B beats A by ~1 point on every seed.
    a = [0.30, 0.36, 0.42, 0.33, 0.39]
    b = [x - 0.01 + d for x, d in zip(a, [0.001, -0.001, 0.002, -0.002, 0.0], strict=True)]
    table, _ = conclude({"A": a, "B": b}, [BETTER_B_A])
    row = table.loc[BETTER_B_A.text]
    assert row["test"] == "paired t" and row["outcome"] == "supported"
    assert row["ci_high"] < 0
    # The same numbers, unpaired, decide nothing.
    welch = stats.ttest_ind(b, a, equal_var=False)
    assert welch.pvalue > 0.5


def test_welch_where_the_seed_sets_differ():
    errors = runs({"A": [0.40, 0.41, 0.42], "B": [0.30, 0.31, 0.29, 0.30]})
    res = analysis.results(errors)
    table = analysis.test_conclusions(res, analysis.per_arch(res), [BETTER_B_A], margin=MARGIN)
    assert table.iloc[0]["test"] == "Welch t" and table.iloc[0]["outcome"] == "supported"


def test_better_claim_outcomes_both_ways():
    worse = conclude({"A": [0.30, 0.31, 0.29], "B": [0.40, 0.41, 0.42]}, [BETTER_B_A])[0]
    assert worse.loc[BETTER_B_A.text, "outcome"] == "contradicted, the other way"
    noisy = conclude({"A": [0.40, 0.30, 0.35], "B": [0.36, 0.33, 0.30]}, [BETTER_B_A])[0]
    assert noisy.loc[BETTER_B_A.text, "outcome"] == "inconclusive"


def test_a_clearly_worse_net_is_never_saturation_supported():
    d = [0.250, 0.252, 0.248, 0.251]
    e = [x + 0.10 for x in d]  # E ten points worse than D on every seed
    table, _ = conclude({"D": d, "E": e}, [SATURATES_E_D])
    assert table.loc[SATURATES_E_D.text, "outcome"] == "contradicted, it degrades"


def test_no_better_claims_by_equivalence():
    same = {"A": [0.400, 0.402, 0.404, 0.398], "A-LRN": [0.401, 0.403, 0.404, 0.399]}
    assert conclude(same, [NO_BETTER_LRN])[0].iloc[0]["outcome"] == "supported"
    helps = {"A": [0.40, 0.41, 0.42], "A-LRN": [0.30, 0.31, 0.32]}
    assert conclude(helps, [NO_BETTER_LRN])[0].iloc[0]["outcome"] == "contradicted, the other way"
    # No difference on average, but too noisy to show it is within half a point.
    noisy = {"A": [0.40, 0.30, 0.45], "A-LRN": [0.35, 0.34, 0.44]}
    assert conclude(noisy, [NO_BETTER_LRN])[0].iloc[0]["outcome"] == "inconclusive"


def test_holm_changes_a_borderline_verdict():
    a = [0.300, 0.310, 0.320, 0.305]
    b = [x - 0.0075 + d for x, d in zip(a, [0.004, -0.004, 0.003, -0.002], strict=True)]
    alone, _ = conclude({"A": a, "B": b}, [BETTER_B_A])
    row = alone.loc[BETTER_B_A.text]
    assert row["p"] < analysis.ALPHA and row["outcome"] == "supported"
    # Alongside a second claim with a larger p, Holm multiplies the smaller p by 2.
    lrn = [x + 0.0 for x in a]
    both, _ = conclude(
        {"A": a, "B": b, "A-LRN": [x + 0.03 * (-1) ** i for i, x in enumerate(lrn)]},
        [BETTER_B_A, NO_BETTER_LRN],
    )
    row = both.loc[BETTER_B_A.text]
    assert row["p"] == pytest.approx(alone.loc[BETTER_B_A.text, "p"])
    assert row["p_holm"] == pytest.approx(2 * row["p"]) and row["p_holm"] > analysis.ALPHA
    assert row["outcome"] == "inconclusive"


def test_seeds_needed_matches_statsmodels_power():
    from statsmodels.stats.power import TTestPower

    sd, effect, n_claims = 0.004, 0.003, 3
    n = analysis.seeds_needed("better", sd, effect, MARGIN, n_claims)
    alpha = analysis.ALPHA / n_claims
    power = TTestPower().power(effect_size=effect / sd, nobs=n, alpha=alpha, alternative="larger")
    before = TTestPower().power(effect_size=effect / sd, nobs=n - 1, alpha=alpha, alternative="larger")
    assert power >= analysis.POWER > before
    # Equivalence plans: each one-sided test at sqrt(POWER), against the margin.
    n_eq = analysis.seeds_needed("no better", sd, effect, MARGIN, n_claims)
    eq_power = TTestPower().power(effect_size=MARGIN / sd, nobs=n_eq, alpha=alpha, alternative="larger")
    assert eq_power >= math.sqrt(analysis.POWER)


def test_the_plan_does_not_depend_on_the_observed_difference():
    noise = [0.002, -0.003, 0.001, 0.0]
    small = conclude({"A": [0.3] * 4, "B": [0.3 - 0.0005 + d for d in noise]}, [BETTER_B_A])[0]
    large = conclude({"A": [0.3] * 4, "B": [0.3 - 0.02 + d for d in noise]}, [BETTER_B_A])[0]
    assert small.iloc[0]["seeds_needed"] == large.iloc[0]["seeds_needed"]


def test_a_missing_arch_lists_its_claim_as_not_tested():
    table, _ = conclude({"A": [0.4, 0.41], "B": [0.3, 0.31]})
    assert table.loc[BETTER_B_A.text, "outcome"] in ("supported", "inconclusive")
    assert table.loc[BETTER_D_B.text, "outcome"] == "not tested here (needs D and B in the study)"
    assert table.loc[SMALL_FILTERS.text, "outcome"].startswith(
        "not tested here (needs B and B-5x5 from the same start"
    )
    assert len(table) == len(analysis.CLAIMS)


def test_small_filters_compare_like_with_like():
    errors = {"A": [0.40, 0.41], "B": [0.30, 0.31], "B-5x5": [0.35, 0.36]}
    # B started from A, B-5x5 from scratch: no comparison.
    table, _ = conclude(errors, [SMALL_FILTERS], runs={"init": {"B": "from_A"}})
    assert table.iloc[0]["outcome"].startswith("not tested here")
    # With a scratch B in the study, B-5x5 is compared with it.
    raw = runs(errors, init={"B": "from_A"})
    scratch = raw[raw["arch"] == "B"].assign(init="kaiming", test_err1=[0.33, 0.34], run_id=["s0", "s1"])
    tidy = pd.concat([raw, scratch], ignore_index=True).drop(columns="net")
    tidy["net"] = analysis.tidy(_as_mlflow(tidy))["net"]
    res = analysis.results(tidy)
    summary = analysis.per_arch(res)
    assert "B (scratch)" in summary.index
    row = analysis.test_conclusions(res, summary, [SMALL_FILTERS], margin=MARGIN).iloc[0]
    assert row["first"] == "B (scratch)" and row["diff"] == pytest.approx(-0.02)


def _as_mlflow(df: pd.DataFrame) -> pd.DataFrame:
    """A tidy frame back in search_runs' column names (what `tidy` reads)."""
    raw = pd.DataFrame({"run_id": df["run_id"], "status": df["status"]})
    for source, name in analysis.RUN_COLUMNS.items():
        if name in df:
            raw[source] = df[name].astype(str) if source.startswith("params.") else df[name]
    return raw


def test_one_collapsed_seed_blocks_the_verdict_and_is_named():
    errors = runs({"A": [0.40, 0.41, 0.42], "B": [0.30, 0.31, 0.90]})
    errors.loc[errors["run_id"] == "B-2", "learned"] = "false"
    res = analysis.results(errors)
    summary = analysis.per_arch(res)
    assert summary.loc["B", "not_learned"] == [2] and not summary.loc["B", "at_chance"]
    row = analysis.test_conclusions(res, summary, [BETTER_B_A], margin=MARGIN).iloc[0]
    assert row["outcome"] == "no verdict: B seed 2 learned nothing"


def test_learned_from_the_binomial_test_when_untagged():
    res = analysis.results(runs({"A": [0.60, 0.895]}, test_images=1000))
    assert list(res.sort_values("seed")["learned"]) == [True, False]


def test_budget_caveat_names_the_nets_still_improving_whatever_the_outcome():
    curves = []
    for net, last_drop in (("A", 0.0), ("B", 0.03)):
        for seed in range(3):
            for epoch, err in enumerate([0.5, 0.4, 0.35, 0.35 - last_drop / 2, 0.35 - last_drop]):
                curves.append({"net": net, "seed": seed, "epoch": epoch, "val/err1": err + 0.001 * seed})
    improving = analysis.still_improving(pd.DataFrame(curves), val_images=5000)
    assert improving.to_dict() == {"A": False, "B": True}
    table, _ = conclude({"A": [0.40, 0.41, 0.42], "B": [0.30, 0.31, 0.32]}, [BETTER_B_A], improving=improving)
    row = table.iloc[0]
    assert (
        row["outcome"] == "supported"
        and row["not_converged"] == ["B"]
        and "B still improving" in row["caveat"]
    )


def test_one_seed_is_inconclusive_not_a_crash():
    table, _ = conclude({"A": [0.4], "B": [0.3]}, [BETTER_B_A])
    row = table.loc[BETTER_B_A.text]
    assert row["outcome"] == "inconclusive" and math.isnan(row["p"])


def test_only_finished_runs_with_test_metrics_count_once_per_cell():
    df = runs({"A": [0.4, 0.5]})
    extra = df.iloc[[0]].assign(run_id="dup-old", test_err1=0.9, start_time=pd.Timestamp(2025, 1, 1))
    failed = df.iloc[[1]].assign(run_id="failed", status="FAILED", test_err1=np.nan)
    running = df.iloc[[1]].assign(run_id="running", status="RUNNING", test_err1=0.1)
    res = analysis.results(pd.concat([df, extra, failed, running]))
    assert sorted(res["run_id"]) == ["A-0", "A-1"]


def test_per_arch_in_paper_order_with_spread():
    summary = analysis.per_arch(analysis.results(runs({"B": [0.3, 0.5], "A": [0.4, 0.4]})), ["A", "B"])
    assert list(summary.index) == ["A", "B"]
    assert summary.loc["B", "top1_err_mean"] == pytest.approx(0.4)
    assert summary.loc["B", "top1_err_std"] == pytest.approx(np.std([0.3, 0.5], ddof=1))


def test_compute_counts_a_s_training_for_nets_that_start_from_it():
    summary = pd.DataFrame(
        {
            "depth": [11, 13],
            "flops_per_image": [1e6, 2e6],
            "images_seen": [100, 50],
            "init": ["kaiming", "from_A"],
        },
        index=["A", "B"],
    )
    table = analysis.compute_table(summary)
    assert table.loc["B", "images seen incl. A's"] == 150
    assert table.loc["B", "training PFLOPs (3x fwd, incl. A's)"] == pytest.approx(
        3 * (2e6 * 50 + 1e6 * 100) / 1e15
    )


def test_claim_directions_follow_the_paper():
    by_pair = {(c.first, c.second): c.kind for c in analysis.CLAIMS}
    assert by_pair[("A-LRN", "A")] == "no better"
    assert by_pair[("E", "D")] == "no better"
    assert by_pair[("B", "B-5x5")] == "better"
    assert isinstance(analysis.CLAIMS[0], Claim)


def test_markdown_escaping_of_run_supplied_text():
    from vgg_ablation.report import md_escape

    hostile = "boom | <script>alert(1)</script> *bold* [link](http://x) `code`\nnext"
    escaped = md_escape(hostile)
    assert "\n" not in escaped and "|" not in escaped.replace("\\|", "")
    assert "<script>" not in escaped and "\\<script\\>" in escaped
    assert "\\*bold\\*" in escaped and "\\[link\\]" in escaped and "\\`code\\`" in escaped

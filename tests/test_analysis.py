"""Verdicts on constructed run tables where the right answer is known."""

import math

import numpy as np
import pandas as pd
import pytest

from vgg_ablation import analysis
from vgg_ablation.analysis import Claim

DEPTH = {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19, "B-5x5": 8}


def runs(errors: dict[str, list[float]], test_images=1000, num_classes=10) -> pd.DataFrame:
    rows = []
    for arch, errs in errors.items():
        for seed, err in enumerate(errs):
            rows.append(
                {
                    "run_id": f"{arch}-{seed}",
                    "status": "FINISHED",
                    "arch": arch,
                    "seed": seed,
                    "depth": DEPTH[arch],
                    "params": 1000,
                    "epochs": 10,
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


def conclude(errors, claims=analysis.CLAIMS):
    res = analysis.results(runs(errors))
    summary = analysis.per_arch(res, order=list(errors))
    return analysis.test_conclusions(res, summary, claims).set_index("statement"), summary


BETTER_B_A = analysis.CLAIMS[1]
NO_BETTER_LRN = analysis.CLAIMS[0]


def test_supported_when_the_deeper_net_is_clearly_better():
    table, _ = conclude({"A": [0.40, 0.41, 0.42], "B": [0.30, 0.31, 0.29]}, [BETTER_B_A])
    row = table.loc[BETTER_B_A.text]
    assert row["verdict"] == "supported"
    assert row["diff_top1_err"] == pytest.approx(-0.11)
    assert row["ci_high"] < 0 and row["p"] < 0.01 and row["hedges_g"] < -3


def test_contradicted_when_the_deeper_net_is_clearly_worse():
    table, _ = conclude({"A": [0.30, 0.31, 0.29], "B": [0.40, 0.41, 0.42]}, [BETTER_B_A])
    assert table.loc[BETTER_B_A.text, "verdict"] == "contradicted"


def test_inconclusive_with_noise_says_how_many_seeds_would_decide():
    table, _ = conclude({"A": [0.40, 0.30, 0.35], "B": [0.36, 0.28, 0.33]}, [BETTER_B_A])
    row = table.loc[BETTER_B_A.text]
    assert row["verdict"] == "inconclusive"
    assert row["ci_low"] < 0 < row["ci_high"]
    assert 3 < row["seeds_needed"] < 1000


def test_no_better_claims():
    same = {"A": [0.400, 0.402, 0.404], "A-LRN": [0.401, 0.403, 0.405]}
    assert conclude(same, [NO_BETTER_LRN])[0].iloc[0]["verdict"] == "supported"
    lrn_helps = {"A": [0.40, 0.41, 0.42], "A-LRN": [0.30, 0.31, 0.32]}
    assert conclude(lrn_helps, [NO_BETTER_LRN])[0].iloc[0]["verdict"] == "contradicted"
    noisy = {"A": [0.40, 0.30, 0.45], "A-LRN": [0.35, 0.44, 0.31]}
    assert conclude(noisy, [NO_BETTER_LRN])[0].iloc[0]["verdict"] == "inconclusive"


def test_a_net_at_chance_is_flagged_and_draws_no_verdict():
    table, summary = conclude({"A": [0.60, 0.61, 0.59], "B": [0.90, 0.895, 0.905]}, [BETTER_B_A])
    assert bool(summary.loc["B", "at_chance"]) and not bool(summary.loc["A", "at_chance"])
    assert table.loc[BETTER_B_A.text, "verdict"] == "no verdict: B at chance"


def test_one_seed_is_inconclusive_not_a_crash():
    table, _ = conclude({"A": [0.4], "B": [0.3]}, [BETTER_B_A])
    row = table.loc[BETTER_B_A.text]
    assert row["verdict"] == "inconclusive" and math.isnan(row["p"])


def test_only_finished_runs_with_test_metrics_count_once_per_cell():
    df = runs({"A": [0.4, 0.5]})
    extra = df.iloc[[0]].assign(
        run_id="dup-old", test_err1=0.9, start_time=pd.Timestamp(2025, 1, 1)
    )  # an older duplicate
    failed = df.iloc[[1]].assign(run_id="failed", status="FAILED", test_err1=np.nan)
    running = df.iloc[[1]].assign(run_id="running", status="RUNNING", test_err1=0.1)
    res = analysis.results(pd.concat([df, extra, failed, running]))
    assert sorted(res["run_id"]) == ["A-0", "A-1"]


def test_claims_skip_archs_not_in_the_study():
    table, _ = conclude({"A": [0.4, 0.41], "B": [0.3, 0.31]})
    assert list(table.index) == [BETTER_B_A.text]


def test_per_arch_in_paper_order_with_spread():
    summary = analysis.per_arch(analysis.results(runs({"B": [0.3, 0.5], "A": [0.4, 0.4]})), ["A", "B"])
    assert list(summary.index) == ["A", "B"]
    assert summary.loc["B", "top1_err_mean"] == pytest.approx(0.4)
    assert summary.loc["B", "top1_err_std"] == pytest.approx(np.std([0.3, 0.5], ddof=1))


def test_claim_directions_follow_the_paper():
    by_pair = {(c.better, c.worse): c.kind for c in analysis.CLAIMS}
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

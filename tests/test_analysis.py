"""Verdicts on constructed run tables where the right answer is known."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from vgg_ablation.report import sections
from vgg_ablation.study import analysis, sequential
from vgg_ablation.study.analysis import Claim
from vgg_ablation.tracking import runtable

DEPTH = {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19, "B-5x5": 8}


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


def conclude(errors, claims=None, margins=None, status=None, alpha=0.05, from_a=False, **kwargs):
    """The verdict table of a fixed-seed study of these nets (one look at every seed given)."""
    raw = runs(errors, **kwargs.pop("runs", {}))
    for (net, seed), value in (status or {}).items():  # e.g. a FAILED cell
        raw.loc[(raw["net"] == net) & (raw["seed"] == seed), ["status", "test_err1"]] = [value, np.nan]
        raw.loc[(raw["net"] == net) & (raw["seed"] == seed), "failure_reason"] = (
            "NonFiniteLoss: loss became non-finite"
        )
    seeds = sorted({s for errs in errors.values() for s in range(len(errs))})
    design = analysis.make_design(
        seeds, None, 0, alpha, len(analysis.testable(list(errors), from_a, claims)[0])
    )
    table = analysis.conclusions(
        raw,
        list(errors),
        from_a,
        design.rule,
        {**MARGINS, **(margins or {})},
        design.order,
        design.stages,
        claims=claims,
        **kwargs,
    )
    return table.set_index("statement"), analysis.per_arch(runtable.results(raw), order=list(errors))


MARGINS = {
    "lrn": 0.005,
    "depth": 0.01,
    "saturation": 0.005,
    "nonlinearity": 0.01,
    "context": 0.01,
    "filters": 0.01,
}
NO_BETTER_LRN, BETTER_B_A, BETTER_D_B, SATURATES_E_D = analysis.CLAIMS[:4]
SMALL_FILTERS = analysis.CLAIMS[6]


def assert_interval_agrees(row):
    """The printed interval is the one the verdict used: it says what the verdict says."""
    low, high, margin = row["ci_low"], row["ci_high"], row["margin"]
    if row["kind"] == "better":
        expect = {"supported": high < 0, "contradicted": low > 0,
                  "no relevant difference": -margin < low and high < margin and low <= 0 <= high}  # fmt: skip
    else:
        expect = {"supported": low > -margin, "contradicted": high < -margin}
    if row["outcome"] in expect:
        assert expect[row["outcome"]], row
    elif row["outcome"] == "undecided":
        assert not any(expect.values()) or (
            row["kind"] == "better" and low <= 0 <= high and not (-margin < low and high < margin)
        )


def test_a_paired_effect_that_welch_misses_is_found():
    # Seeds differ a lot from each other, but B beats A by ~1.5 points on every seed.
    a = [0.30, 0.36, 0.42, 0.33, 0.39]
    b = [x - 0.015 + d for x, d in zip(a, [0.001, -0.001, 0.002, -0.002, 0.0], strict=True)]
    table, _ = conclude({"A": a, "B": b}, [BETTER_B_A])
    row = table.loc[BETTER_B_A.text]
    assert row["outcome"] == "supported" and row["ci_high"] < 0
    assert row["detail"] == f"B better by {-100 * row['ci_high']:.2f} to {-100 * row['ci_low']:.2f} points"
    assert_interval_agrees(row)
    # The same numbers, unpaired, decide nothing.
    welch = stats.ttest_ind(b, a, equal_var=False)
    assert welch.pvalue > 0.5


def test_better_claim_outcomes_all_three_ways():
    worse = conclude({"A": [0.30, 0.31, 0.29], "B": [0.40, 0.41, 0.42]}, [BETTER_B_A])[0].iloc[0]
    assert worse["outcome"] == "contradicted"
    assert worse["detail"] == f"B worse by {100 * worse['ci_low']:.2f} to {100 * worse['ci_high']:.2f} points"
    same = conclude({"A": [0.300, 0.310, 0.290, 0.305], "B": [0.301, 0.309, 0.291, 0.304]}, [BETTER_B_A])[
        0
    ].iloc[0]
    assert same["outcome"] == "no relevant difference"
    assert same["detail"].startswith("no difference of 1 point or more: from B better by ")
    noisy = conclude({"A": [0.40, 0.30, 0.35], "B": [0.36, 0.33, 0.30]}, [BETTER_B_A])[0].iloc[0]
    assert noisy["outcome"] == "undecided" and noisy["state"] == "maximum"
    for row in (worse, same, noisy):
        assert_interval_agrees(row)


def test_a_worse_a_lrn_supports_lrn_does_not_help():
    a = [0.400, 0.410, 0.405, 0.395]
    worse = [x + 0.03 + d for x, d in zip(a, [0.002, -0.002, 0.001, 0.0], strict=True)]
    row = conclude({"A": a, "A-LRN": worse}, [NO_BETTER_LRN])[0].iloc[0]
    assert row["outcome"] == "supported" and row["detail"].startswith("A-LRN worse by ")
    assert_interval_agrees(row)


def test_no_better_claims_by_non_superiority():
    same = {"A": [0.400, 0.402, 0.404, 0.398], "A-LRN": [0.401, 0.403, 0.404, 0.399]}
    row = conclude(same, [NO_BETTER_LRN])[0].iloc[0]
    assert row["outcome"] == "supported"
    assert row["detail"].startswith("no difference of 0.5 points or more: from A-LRN better by ")
    helps = {"A": [0.40, 0.41, 0.42], "A-LRN": [0.30, 0.31, 0.32]}
    row = conclude(helps, [NO_BETTER_LRN])[0].iloc[0]
    assert row["outcome"] == "contradicted"
    assert row["detail"].startswith("A-LRN better by ") and row["detail"].endswith(
        ", more than the 0.5-point margin"
    )
    # No difference on average, but too noisy to show it is not better by half a point.
    noisy = {"A": [0.40, 0.30, 0.45], "A-LRN": [0.35, 0.34, 0.44]}
    assert conclude(noisy, [NO_BETTER_LRN])[0].iloc[0]["outcome"] == "undecided"


def test_a_failed_seed_keeps_the_comparison_paired_on_the_rest_and_says_so():
    a = [0.30, 0.36, 0.42, 0.33, 0.39]
    b = [x - 0.015 + d for x, d in zip(a, [0.001, -0.001, 0.002, -0.002, 0.0], strict=True)]
    table, _ = conclude({"A": a, "B": b}, [BETTER_B_A], status={("B", 2): "FAILED"})
    row = table.iloc[0]
    assert row["n"] == 4 and row["outcome"] == "supported"  # paired on seeds 0, 1, 3, 4: no Welch
    expected = np.mean([b[i] - a[i] for i in (0, 1, 3, 4)])
    assert row["diff"] == pytest.approx(expected)
    assert row["notes"] == "B diverged on 1 seed (2): left out of the pairs"


def test_identical_runs_are_flagged_not_called_equivalent():
    same = [0.40, 0.41, 0.42, 0.39]
    row = conclude({"A": same, "A-LRN": list(same)}, [NO_BETTER_LRN])[0].iloc[0]
    assert row["state"] == "identical" and row["outcome"].startswith("no verdict: identical results")
    shifted = conclude({"A": same, "A-LRN": [x + 0.01 for x in same]}, [NO_BETTER_LRN])[0].iloc[0]
    assert shifted["outcome"].startswith("no verdict: the same difference on every paired seed")


def test_the_family_is_fixed_by_the_nets_not_by_the_results():
    # B learned nothing on one seed: the claim stays in the family (3 comparisons: LRN, B-A, D-B),
    # the run stays in the pairs, and the outcome names it.
    errors = {
        "A": [0.40, 0.41, 0.42],
        "A-LRN": [0.40, 0.41, 0.42],
        "B": [0.30, 0.31, 0.90],
        "D": [0.3, 0.3, 0.3],
    }
    table, summary = conclude(errors, runs={"test_images": 10_000})
    assert table.attrs["comparisons"] == 3
    row = table.loc[BETTER_B_A.text]
    assert "B learned nothing on seed 2 (kept: that is its error there)" in row["notes"]
    assert summary.loc["B", "not_learned"] == [2]
    assert row["level"] == pytest.approx(0.05 / 3)


def test_more_comparisons_widen_every_interval():
    a = [0.300, 0.310, 0.320, 0.305]
    b = [x - 0.0075 + d for x, d in zip(a, [0.004, -0.004, 0.003, -0.002], strict=True)]
    alone = conclude({"A": a, "B": b}, [BETTER_B_A])[0].iloc[0]
    both = conclude({"A": a, "B": b, "A-LRN": [x + 0.02 for x in a]}, [BETTER_B_A, NO_BETTER_LRN])[0]
    shared = both.loc[BETTER_B_A.text]
    assert shared["level"] == pytest.approx(alone["level"] / 2)
    assert shared["ci_high"] - shared["ci_low"] > alone["ci_high"] - alone["ci_low"]
    assert alone["outcome"] == "supported" and shared["outcome"] == "undecided"  # 2.5% each


def test_plans_use_the_upper_limit_of_the_spread_and_say_both_effects():
    noise = [0.012, -0.018, 0.006, 0.0, 0.009, -0.009]
    row = conclude({"A": [0.3] * 6, "B": [0.3 - 0.002 + d for d in noise]}, [BETTER_B_A])[0].iloc[0]
    assert row["state"] == "maximum"
    assert row["sd_upper"] == pytest.approx(sequential.sd_upper(row["sd"], 6)) and row["sd_upper"] > row["sd"]
    assert row["design_effect"] == pytest.approx(-0.01)
    assert 2 <= row["plan_design"] < math.inf and row["plan_observed"] >= 2


def test_a_missing_arch_lists_its_claim_as_not_tested():
    table, _ = conclude({"A": [0.4, 0.41], "B": [0.3, 0.31]})
    assert table.loc[BETTER_B_A.text, "outcome"] in ("supported", "inconclusive")
    assert table.loc[BETTER_D_B.text, "outcome"] == "not tested here (needs D and B in the study)"
    assert table.loc[SMALL_FILTERS.text, "outcome"].startswith(
        "not tested here (needs B and B-5x5 from the same start"
    )
    assert len(table) == sum(c.paper for c in analysis.claims_for())  # the paper's seven


def test_small_filters_compare_like_with_like():
    errors = {"A": [0.40, 0.41], "B": [0.30, 0.31], "B-5x5": [0.35, 0.36]}
    # B started from A, B-5x5 from scratch, and no scratch B among the nets: no comparison.
    table, _ = conclude(errors, [SMALL_FILTERS], runs={"init": {"B": "from_A"}}, from_a=True)
    assert table.iloc[0]["outcome"].startswith("not tested here")
    # With a scratch B in the study, B-5x5 is compared with it.
    raw = runs(errors, init={"B": "from_A"})
    scratch = raw[raw["arch"] == "B"].assign(init="kaiming", test_err1=[0.33, 0.34], run_id=["s0", "s1"])
    tidy = pd.concat([raw, scratch], ignore_index=True).drop(columns="net")
    tidy["net"] = runtable.tidy(_as_mlflow(tidy))["net"]
    summary = analysis.per_arch(runtable.results(tidy))
    assert "B (scratch)" in summary.index
    nets = ["A", "B", "B-5x5", "B (scratch)"]
    design = analysis.make_design([0, 1], None, 0, 0.05, 1)
    row = analysis.conclusions(tidy, nets, True, design.rule, MARGINS, design.order, design.stages,
                               claims=[SMALL_FILTERS]).iloc[0]  # fmt: skip
    assert row["first"] == "B (scratch)" and row["diff"] == pytest.approx(-0.02)


def _as_mlflow(df: pd.DataFrame) -> pd.DataFrame:
    """A tidy frame back in search_runs' column names (what `tidy` reads)."""
    raw = pd.DataFrame({"run_id": df["run_id"], "status": df["status"]})
    for source, name in runtable.RUN_COLUMNS.items():
        if name in df:
            raw[source] = df[name].astype(str) if source.startswith("params.") else df[name]
    return raw


def test_learned_from_the_binomial_test_when_untagged():
    res = runtable.results(runs({"A": [0.60, 0.895]}, test_images=1000))
    assert list(res.sort_values("seed")["learned"]) == [True, False]


def test_one_seed_is_undecided_not_a_crash():
    table, _ = conclude({"A": [0.4], "B": [0.3]}, [BETTER_B_A])
    row = table.loc[BETTER_B_A.text]
    assert row["outcome"] == "no verdict yet: fewer than 2 paired seeds" and math.isnan(row["diff"])


def test_only_finished_runs_with_test_metrics_count_once_per_cell():
    df = runs({"A": [0.4, 0.5]})
    extra = df.iloc[[0]].assign(run_id="dup-old", test_err1=0.9, start_time=pd.Timestamp(2025, 1, 1))
    failed = df.iloc[[1]].assign(run_id="failed", status="FAILED", test_err1=np.nan)
    running = df.iloc[[1]].assign(run_id="running", status="RUNNING", test_err1=0.1)
    res = runtable.results(pd.concat([df, extra, failed, running]))
    assert sorted(res["run_id"]) == ["A-0", "A-1"]


def test_per_arch_in_paper_order_with_spread():
    summary = analysis.per_arch(runtable.results(runs({"B": [0.3, 0.5], "A": [0.4, 0.4]})), ["A", "B"])
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
    by_pair = {(c.first, c.second): c.kind for c in analysis.claims_for()}
    assert by_pair[("A-LRN", "A")] == "no better"
    assert by_pair[("E", "D")] == "no better"
    assert by_pair[("B", "B-5x5")] == "better"
    assert isinstance(analysis.CLAIMS[0], Claim)


def test_markdown_escaping_of_run_supplied_text():
    from vgg_ablation.report.sections import md_escape

    hostile = "boom | <script>alert(1)</script> *bold* [link](http://x) `code`\nnext"
    escaped = md_escape(hostile)
    assert "\n" not in escaped and "|" not in escaped.replace("\\|", "")
    assert "<script>" not in escaped and "\\<script\\>" in escaped
    assert "\\*bold\\*" in escaped and "\\[link\\]" in escaped and "\\`code\\`" in escaped


def test_an_interim_report_before_the_first_look_says_when_it_comes():
    """A run-until-decided study with 4 of its first look's 6 seeds in: no look has been taken,
    and the verdict cell says so (not 'fewer than 2 paired seeds' beside 4 of them)."""
    errors = {"A": [0.30, 0.29, 0.31, 0.30], "B": [0.28, 0.27, 0.29, 0.26]}
    design = analysis.make_design(list(range(6)), 18, 3, 0.05, 1)
    table = analysis.conclusions(
        runs(errors), ["A", "B"], False, design.rule, MARGINS, design.order, design.stages
    ).set_index("statement")
    row = table.loc[BETTER_B_A.text]
    assert row["outcome"] == "no verdict yet: the first look is at 6 paired seeds (4 so far)"
    assert row["looks"] == 0 and row["n"] == 0 and row["pairs_in"] == 4
    assert sections._paired_seeds(row, 0) == "4 so far"  # the report's column, not '0'


def test_a_look_taken_with_too_few_pairs_says_so_not_that_a_look_is_coming():
    """A one-look study whose B failed on 2 of 3 seeds: every seed is in, one pair is left."""
    table, _ = conclude(
        {"A": [0.30, 0.29, 0.31], "B": [0.28, 0.27, 0.29]}, [BETTER_B_A],
        status={("B", 1): "FAILED", ("B", 2): "FAILED"},
    )  # fmt: skip
    assert table.loc[BETTER_B_A.text]["outcome"] == "no verdict yet: fewer than 2 paired seeds"


def test_an_open_comparison_continues_in_its_study_and_only_one_at_the_maximum_is_planned_anew():
    """After a look that left B vs A open, the report sends the reader to the next look, not to
    a new study; once the same data sit at the study's maximum, the plan for a new study comes."""
    from vgg_ablation.report import document

    # B about a point better, too noisy to decide at 6 seeds, with a fair chance by 12
    errors = {"A": [0.32, 0.28, 0.33, 0.29, 0.30, 0.31], "B": [0.30, 0.29, 0.31, 0.28, 0.30, 0.29]}

    def table(max_seeds, errors=errors):
        design = analysis.make_design(list(range(6)), max_seeds, 3, 0.05, 1)
        concl = analysis.conclusions(
            runs(errors), ["A", "B"], False, design.rule, MARGINS, design.order, design.stages
        )
        return concl, list(design.stages)

    concl, stages = table(12)  # looks at 6, 9, 12: the first one taken
    assert set(concl.loc[concl["state"] != "not tested", "state"]) == {"open"}
    note = sections._undecided_note(concl, stages)
    assert (
        "open: this study's next look at 9 seeds per net decides more (its chance of a verdict by 12:" in note
    )
    assert "Planning" not in note
    assert document._stop_reason(concl, stages).startswith("Interim report after look 1 of at most 3;")
    concl, stages = table(6)  # the same data at the study's maximum
    assert set(concl.loc[concl["state"] != "not tested", "state"]) == {"maximum"}
    assert "undecided at the maximum (see *Undecided comparisons* below)" in sections._undecided_note(
        concl, stages
    )
    assert document._stop_reason(concl, stages) == "maximum reached"
    # no difference at all: open, but the reader is told it is futile at this budget
    concl, stages = table(12, {"A": errors["A"], "B": [0.30] * 6})
    assert "open, but its chance of a verdict by 12 seeds is 0%: futile at this budget" in (
        sections._undecided_note(concl, stages)
    )


def test_an_interim_report_says_when_its_planned_convergence_check_comes(tmp_path):
    """Before the longer-budget cells have trained, a study that planned them says they come (not
    that it has none); one that planned none, or whose curves were lost, says so."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    def said(convergence_epochs, rebuilt=None):
        cfg = OmegaConf.create({"trainer": {"max_epochs": 40}, "study": {
            "name": "s", "reports_dir": str(tmp_path), "convergence_epochs": convergence_epochs,
            "convergence_seeds": 1, "convergence_tolerance": 0.5}})  # fmt: skip
        g = SimpleNamespace(cfg=cfg, convergence=None, res=pd.DataFrame({"rebuilt_from": [rebuilt]}))
        return " ".join(sections.convergence(g))

    assert "Not yet measured: each net trains its first seed at 80 epochs as well" in said(80)
    assert "the study has no longer-budget cells" in said(None) and "Not yet" not in said(None)
    assert "rebuilt from a runs CSV" in said(80, rebuilt="runs.csv")


def test_the_time_an_epoch_takes_ignores_pauses_and_resumes():
    """s / epoch: the median of consecutive epochs' record gaps, so a run paused for an hour, or
    one resumed from a checkpoint (its next epoch re-logged much later), keeps its net's figure."""
    rows = []
    for seed, start in ((0, 0.0), (1, 5000.0)):
        t = start
        for epoch in range(8):
            t += 10.0 if (seed, epoch) != (0, 4) else 3600.0  # seed 0 paused for an hour before epoch 4
            rows.append({"net": "A", "seed": seed, "epoch": epoch, "val/err1": 0.5, "logged_at": t})
    rows += [{"net": "B", "seed": 0, "epoch": e, "val/err1": 0.5, "logged_at": 20.0 * e} for e in (0, 1, 2)]
    rows += [
        {"net": "B", "seed": 0, "epoch": e, "val/err1": 0.5, "logged_at": 9e5 + 20.0 * e} for e in (5, 6)
    ]
    per_epoch = sections.epoch_seconds(pd.DataFrame(rows))
    assert per_epoch.to_dict() == {"A": 10.0, "B": 20.0}  # B's epochs 3-4 missing: no gap across them
    assert sections.epoch_seconds(pd.DataFrame()).empty  # a study rebuilt from a CSV has no curves


def test_the_rule_in_words_keeps_its_names_as_written_at_a_sentence_start():
    from vgg_ablation.report import sections
    from vgg_ablation.study.analysis import make_design

    words = sections.rule_words(make_design([0, 1, 2, 3, 4, 5], 18, 2, 0.05, 6), 0.05)
    assert "Pocock-type" in words and sections.sentence(words).startswith("The chance that any verdict")
    assert "Pocock-type" in sections.sentence(words)

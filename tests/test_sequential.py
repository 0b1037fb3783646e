"""The stopping rule, checked by simulation: its boundaries against the published z tables, and the
whole decision procedure (claims, Bonferroni, looks, verdicts: `analysis.replay` itself) on
thousands of simulated studies whose truth is known."""

import math

import numpy as np
import pandas as pd
import pytest

from vgg_ablation.study import analysis, sequential
from vgg_ablation.study.sequential import CONTRADICTED, NO_RELEVANT_DIFFERENCE, OPEN, SUPPORTED, Rule
from vgg_ablation.tracking import runtable

# Jennison & Turnbull (2000), Tables 2.1 and 2.3: two-sided alpha 0.05, K equally spaced looks.
POCOCK = {2: 2.178, 3: 2.289, 4: 2.361, 5: 2.413, 10: 2.555}
OBRIEN_FLEMING = {2: 1.977, 3: 2.004, 4: 2.024, 5: 2.040, 10: 2.087}


@pytest.mark.parametrize("looks", sorted(POCOCK))
def test_the_engine_reproduces_the_published_z_boundaries(looks):
    grid = list(range(1, looks + 1))
    # Monte Carlo on 400,000 studies: the quantile is good to about +-0.005
    assert sequential.constant_boundary(grid, 0.05, "pocock") == pytest.approx(POCOCK[looks], abs=0.012)
    assert sequential.constant_boundary(grid, 0.05, "obf") == pytest.approx(OBRIEN_FLEMING[looks], abs=0.012)


def test_at_small_n_the_z_constants_would_not_hold_for_t():
    # 5 looks at 3..11 seeds with an estimated spread: Pocock's z constant applied to the t
    # statistics rejects a true null far more often than 5%.
    looks = (3, 5, 7, 9, 11)
    p = np.array(list(sequential._increments(looks, 100_000, np.random.default_rng(3))))
    from scipy import stats

    t = np.array([stats.t.isf(pk / 2, n - 1) for pk, n in zip(p, looks, strict=True)])
    assert np.mean((t > POCOCK[5]).any(0)) > 0.12
    # calibrated on the t scale, the same design holds its 5%
    level = 2 * stats.norm.sf(sequential.constant_boundary(list(looks), 0.05, "pocock", known_sd=False))
    assert np.mean((p <= level).any(0)) == pytest.approx(0.05, abs=0.004)


def test_each_look_spends_what_the_spending_function_allows():
    rule = Rule(0.05, 2, 6, 3, 18)
    looks = tuple(rule.looks(18))
    levels = rule.levels(looks)
    assert looks == (6, 9, 12, 15, 18) and levels[0] == pytest.approx(rule.spent(6))
    # Fresh random numbers (not the calibration's): first crossings per look, t statistic.
    p = np.array(list(sequential._increments(looks, 200_000, np.random.default_rng(7))))
    crossed = p <= np.array(levels)[:, None]
    first = np.where(crossed.any(0), crossed.argmax(0), -1)
    spent = [np.mean(first == k) for k in range(len(looks))]
    allowed = np.diff([0.0, *[rule.spent(n) for n in looks]])
    assert np.allclose(spent, allowed, atol=4 * math.sqrt(0.025 / 200_000))
    assert sum(spent) == pytest.approx(0.9 * 0.025, abs=0.0015)  # a tenth kept for a continuation
    # past the horizon, the reserve: by 2x the horizon, half of it
    assert rule.spent(36) == pytest.approx(0.025 * (0.9 + 0.1 * 0.5))


def test_a_fixed_study_is_one_plain_t_interval():
    rule = Rule.fixed(0.05, 3, 5)
    assert rule.levels((5,)) == (pytest.approx(0.05 / 3),) and rule.levels((4,)) == (pytest.approx(0.05 / 3),)
    d = np.array([-0.3, -0.5, -0.1, -0.4, -0.2])
    look = sequential.look_at(d, 0.05 / 3, "better", 1.0)
    from scipy import stats

    half = stats.t.isf(0.05 / 6, 4) * d.std(ddof=1) / math.sqrt(5)
    assert look.low == pytest.approx(d.mean() - half) and look.code == SUPPORTED


def test_verdicts_partition_the_interval_space():
    m = 1.0
    assert sequential.verdict("better", -2.0, -0.1, m) == SUPPORTED
    assert sequential.verdict("better", 0.1, 2.0, m) == CONTRADICTED
    assert sequential.verdict("better", -0.5, 0.5, m) == NO_RELEVANT_DIFFERENCE
    assert sequential.verdict("better", -1.5, 0.5, m) == OPEN
    assert sequential.verdict("better", -0.9, -0.1, m) == SUPPORTED  # a real gain under the margin
    assert sequential.verdict("no better", -0.9, 3.0, m) == SUPPORTED
    assert sequential.verdict("no better", -3.0, -1.1, m) == CONTRADICTED
    assert sequential.verdict("no better", -1.5, 0.5, m) == OPEN
    # three-way ("no help"): helps (contradicted), hurts (supported), or inside +/-margin; an
    # interval narrower than the margin always lands in one of them
    assert sequential.verdict("no help", -2.0, -0.1, m) == CONTRADICTED
    assert sequential.verdict("no help", 0.1, 2.0, m) == SUPPORTED
    assert sequential.verdict("no help", -0.5, 0.5, m) == NO_RELEVANT_DIFFERENCE
    assert sequential.verdict("no help", -0.9, -0.1, m) == CONTRADICTED  # a real gain under the margin
    assert sequential.verdict("no help", 0.1, 0.9, m) == SUPPORTED  # a real loss under it
    assert sequential.verdict("no help", -1.5, 0.5, m) == OPEN
    assert all(sequential.verdict("no help", c - 0.45, c + 0.45, m) != OPEN for c in np.linspace(-3, 3, 61))


# -- the whole procedure, simulated -------------------------------------------------------------------
DEPTH = [c for c in analysis.CLAIMS if c.key == "depth"]  # B vs A, D vs B: share the net B
MARGINS = {"depth": 0.01, "lrn": 0.005}


def simulate_studies(means, sds, design, comparisons, studies, seed, corr=None, futility=0.0, margins=None):
    """Run `analysis.replay` on simulated studies: per-seed errors N(mean, sd) per net (optionally
    correlated across nets), every seed present, the procedure stopping where it stops. Returns
    each study's outcomes and the seeds each net trained."""
    rng = np.random.default_rng(seed)
    nets = list(means)
    chol = np.linalg.cholesky(corr) if corr is not None else np.eye(len(nets))
    results = []
    for _ in range(studies):
        z = chol @ rng.standard_normal((len(nets), len(design.order)))
        errors = {
            n: dict(zip(design.order, means[n] + sds[n] * z[i], strict=True)) for i, n in enumerate(nets)
        }
        seen = runtable.Observed(pd.DataFrame(), errors, {}, {n: set(design.order) for n in nets})
        outcomes = analysis.replay(comparisons, seen, design.order, design.stages, design.rule,
                                   margins or MARGINS, futility=futility)  # fmt: skip
        results.append(outcomes)
    return results


def wrong(outcome, truth, margin):
    """Is this verdict wrong, for a true difference `truth`?"""
    kind, code = outcome.comparison.claim.kind, outcome.code
    if kind == "no help":  # three-way: the first net hurts (supported), helps (contradicted), or neither
        return (
            (code == SUPPORTED and truth <= 0)
            or (code == CONTRADICTED and truth >= 0)
            or (code == NO_RELEVANT_DIFFERENCE and abs(truth) >= margin)
        )
    if kind == "better":
        return (
            (code == SUPPORTED and truth >= 0)
            or (code == CONTRADICTED and truth <= 0)
            or (code == NO_RELEVANT_DIFFERENCE and abs(truth) >= margin)
        )
    return (code == SUPPORTED and truth <= -margin) or (code == CONTRADICTED and truth >= -margin)


def depth_design(max_seeds=18):
    tested, _ = analysis.testable(["A", "B", "D"], False, DEPTH)
    return tested, analysis.make_design(list(range(6)), max_seeds, 3, 0.05, len(tested))


def test_family_wise_error_under_the_global_null_is_at_most_alpha():
    tested, design = depth_design()
    means = {"A": 0.27, "B": 0.27, "D": 0.27}
    sds = dict.fromkeys(means, 0.009)
    studies = simulate_studies(means, sds, design, tested, 3000, seed=1)
    errors = np.mean([any(wrong(o, 0.0, 0.01) for o in s) for s in studies])
    # 2 comparisons x 0.025 x 0.9 (a tenth kept) = 0.045 at most; 3,000 studies: +-0.0038 (1 sd)
    assert errors <= 0.045 + 3 * math.sqrt(0.045 * 0.955 / 3000)
    assert errors > 0.015  # the error is spent, not wasted: the rule is not needlessly strict


def test_worst_cases_at_the_margins_hold_the_error():
    # A difference of exactly the margin: calling it "no relevant difference" is wrong.
    tested, design = depth_design()
    at_edge = simulate_studies(
        {"A": 0.27, "B": 0.28, "D": 0.29}, dict.fromkeys("ABD", 0.009), design, tested, 2000, 2
    )
    rate = np.mean([any(wrong(o, 0.01, 0.01) for o in s) for s in at_edge])
    assert rate <= 0.045 + 3 * math.sqrt(0.045 / 2000)
    # LRN better by exactly the margin: "supported" (not better by the margin) is wrong, and so is
    # "contradicted" (better by more than the margin): both tails can err, at most alpha in all.
    lrn = [c for c in analysis.CLAIMS if c.key == "lrn"]
    tested, _ = analysis.testable(["A", "A-LRN"], False, lrn)
    design = analysis.make_design(list(range(6)), 30, 4, 0.05, 1)
    studies = simulate_studies(
        {"A": 0.30, "A-LRN": 0.295}, {"A": 0.007, "A-LRN": 0.007}, design, tested, 2000, 3
    )
    rate = np.mean([wrong(s[0], -0.005, 0.005) for s in studies])
    assert rate <= 0.05 * 0.9 + 3 * math.sqrt(0.045 / 2000)


def test_at_the_pilot_spreads_the_depth_study_decides_as_the_docs_say():
    # the pilot (reports/cifar10-cpu-pilot.md: full CIFAR-10, width 1/8, BN, 12 epochs): B-A -1.47, D-B
    # +1.13 points, sd of differences 1.37 and 0.87: nets' own sd 0.877, B and A correlated -0.22, D
    # and B +0.51 (docs/statistics.md's cost table: B vs A decided in 91%, D vs B in 98%).
    tested, design = depth_design()
    means = {"A": 0.2780, "B": 0.2633, "D": 0.2746}
    sds = dict.fromkeys(means, 0.00877)
    r_ab, r_bd = 1 - 0.0137**2 / (2 * 0.00877**2), 1 - 0.0087**2 / (2 * 0.00877**2)
    corr = np.array([[1, r_ab, 0], [r_ab, 1, r_bd], [0, r_bd, 1.0]])
    studies = simulate_studies(means, sds, design, tested, 2000, seed=4, corr=corr)
    decided = np.array([[o.state == "decided" for o in s] for s in studies])
    right = np.array([[s[0].code == SUPPORTED, s[1].code == CONTRADICTED] for s in studies])
    assert decided.mean(0)[0] >= 0.88 and decided.mean(0)[1] >= 0.95  # docs: 91% and 98%
    assert right.mean(0)[0] >= 0.86 and right.mean(0)[1] >= 0.94
    seeds_used = np.mean([max(o.last.n for o in s) for s in studies])
    assert seeds_used < 13  # stops early on average: the fixed plan would use 18


def test_a_true_null_ends_no_relevant_difference_with_enough_seeds():
    tested, design = depth_design(max_seeds=60)
    studies = simulate_studies(
        {"A": 0.27, "B": 0.27, "D": 0.27}, dict.fromkeys("ABD", 0.009), design, tested, 1000, 5
    )
    codes = np.array([[o.code for o in s] for s in studies])
    assert np.mean(codes == NO_RELEVANT_DIFFERENCE) >= 0.9
    assert np.mean(codes == OPEN) <= 0.02  # the maximum is rarely reached


def test_simulate_and_plan_agree_with_the_replay():
    # The vectorised simulation that plans use is the same rule as the replay.
    rule = Rule(0.05, 1, 4, 2, 12)
    codes, used = sequential.simulate("better", -0.01, 0.01, 0.01, rule, 12, studies=4000, seed=0)
    tested, _ = analysis.testable(["A", "B"], False, [DEPTH[0]])
    design = analysis.make_design(list(range(4)), 12, 2, 0.05, 1)
    studies = simulate_studies({"A": 0.30, "B": 0.29}, {"A": 0.01 / math.sqrt(2), "B": 0.01 / math.sqrt(2)}, design,
                               tested, 2000, 6)  # fmt: skip
    replayed = np.mean([s[0].code != OPEN for s in studies])
    assert np.mean(codes != OPEN) == pytest.approx(replayed, abs=0.04)
    n, mean_used = sequential.plan("better", -0.01, 0.01, 0.01, rule)
    assert 4 <= n <= 40 and mean_used <= n


def test_the_paper_study_decides_as_its_file_says():
    """experiments/cifar10-cpu-paper.yaml's design (its seeds, looks, maximum and futility, read
    from the file) at the spreads and differences its comment assumes: the convergence probe's
    20-epoch test means, each net's per-seed sd 0.7 points. Its comment: B vs A decided in 97% of
    studies, D vs B 85%, E vs D 99%, C vs B and B vs B-5x5 100%, D vs C 23% (70% futile); 26
    core-hours of 40-epoch cells on average (A 15.5, B 23.3, C 25.3, D 27.2, E 31.6, B-5x5 16.8
    minutes each, one core each)."""
    from vgg_ablation.config import compose, study_overrides

    cfg = compose(study_overrides(["experiment=cifar10-cpu-paper"]))
    nets = list(cfg.study.archs)
    tested, _ = analysis.testable(nets, False, analysis.claims_for())
    assert [f"{c.first} vs {c.second}" for c in tested] == [
        "B vs A", "D vs B", "E vs D", "C vs B", "D vs C", "B vs B-5x5"]  # fmt: skip
    design = analysis.make_design(list(cfg.study.seeds), cfg.study.max_seeds, cfg.study.seeds_per_look,
                                  cfg.study.alpha, len(tested), futility=cfg.study.futility)  # fmt: skip
    means = {"A": 0.23885, "B": 0.22415, "C": 0.24075, "D": 0.23605, "E": 0.24765, "B-5x5": 0.25495}
    margins = {k: v / 100 for k, v in cfg.study.margins.items()}
    rng = np.random.default_rng(31)
    states, hours = [], []
    minutes = {"A": 15.5, "B": 23.3, "C": 25.3, "D": 27.2, "E": 31.6, "B-5x5": 16.8}
    for _ in range(300):
        z = rng.standard_normal((len(nets), len(design.order)))
        errors = {
            n: dict(zip(design.order, means[n] + 0.007 * z[i], strict=True)) for i, n in enumerate(nets)
        }
        seen = runtable.Observed(pd.DataFrame(), errors, {}, {n: set(design.order) for n in nets})
        outcomes = analysis.replay(tested, seen, design.order, design.stages, design.rule, margins,
                                   futility=design.futility)  # fmt: skip
        states.append([o.state for o in outcomes])
        seeds = dict.fromkeys(nets, design.stages[0])  # a net trains the seeds its open comparisons need
        for o in outcomes:
            for n in (o.comparison.first, o.comparison.second):
                seeds[n] = max(seeds[n], design.stages[len(o.looks) - 1])
        hours.append(sum(seeds[n] * minutes[n] for n in nets) / 60)
    decided = np.mean(np.array(states) == "decided", axis=0)
    futile = np.mean(np.array(states) == "futile", axis=0)
    assert decided[0] >= 0.9 and decided[1] >= 0.75 and min(decided[2], decided[3], decided[5]) >= 0.95
    assert decided[4] <= 0.4 and futile[4] >= 0.5
    assert 22 <= np.mean(hours) <= 30


# -- futility stops ---------------------------------------------------------------------------------------
def test_futility_stops_keep_the_family_wise_error_and_save_seeds():
    """A comparison stops as futile once its chance of a verdict by the maximum is under 10%. The
    stop is non-binding (the efficacy boundaries are not relaxed for it), so it can only take
    verdicts away: the error stays within alpha, under the global null and at the margins."""
    tested, design = depth_design()
    null = simulate_studies({"A": 0.27, "B": 0.27, "D": 0.27}, dict.fromkeys("ABD", 0.009), design, tested, 1500,
                            seed=11, futility=0.1)  # fmt: skip
    assert np.mean([any(wrong(o, 0.0, 0.01) for o in s) for s in null]) <= 0.045 + 3 * math.sqrt(0.045 / 1500)
    edge = simulate_studies({"A": 0.27, "B": 0.28, "D": 0.29}, dict.fromkeys("ABD", 0.009), design, tested, 1500,
                            seed=12, futility=0.1)  # fmt: skip
    assert np.mean([any(wrong(o, 0.01, 0.01) for o in s) for s in edge]) <= 0.045 + 3 * math.sqrt(
        0.045 / 1500
    )


def test_the_three_way_lrn_rule_holds_its_error_at_no_difference_and_at_either_margin():
    """The three-way claim (A-LRN helps, hurts, or neither by the margin) with its control (A-LRN
    vs A-LRN0), two comparisons sharing 5%, at the LRN study's 1-point margin: the share of studies
    with any verdict the truth makes wrong stays within the 4.5% the rule spends by its maximum
    (plus 3 standard errors of the simulation), whether LRN does nothing, helps by exactly the
    margin (where 'no relevant difference' is wrong) or hurts by it; and the rule does decide
    there, so the bound is not met by saying nothing. Without futility stops: being non-binding,
    they can only take verdicts away."""
    three_way = analysis.claims_for(["lrn-three-way"])
    tested, _ = analysis.testable(["A", "A-LRN", "A-LRN0"], False, three_way)
    assert [c.claim.kind for c in tested] == ["no help", "no help"]
    design = analysis.make_design(list(range(8)), 40, 4, 0.05, len(tested))
    sds, margin = dict.fromkeys(["A", "A-LRN", "A-LRN0"], 0.0065), 0.01
    for lrn_minus_a, studies, seed in ((0.0, 2000, 41), (-margin, 1500, 42), (margin, 1500, 43)):
        # the control's own truth: LRN's effect all normalisation (A-LRN0 equal to A)
        means = {"A": 0.30, "A-LRN": 0.30 + lrn_minus_a, "A-LRN0": 0.30}
        runs = simulate_studies(means, sds, design, tested, studies, seed, margins={"lrn": margin})
        errs = np.mean([wrong(s[0], lrn_minus_a, margin) or wrong(s[1], lrn_minus_a, margin) for s in runs])
        assert errs <= 0.045 + 3 * math.sqrt(0.045 / studies), (lrn_minus_a, errs)
        decided = np.mean([s[0].state == "decided" for s in runs])
        assert decided > 0.9, (lrn_minus_a, decided)
        if lrn_minus_a == 0.0:
            assert errs > 0.01  # the error is spent, not wasted


def test_the_lrn_paper_study_decides_as_its_file_says():
    """experiments/lrn-cpu-paper.yaml's design (its seeds, looks, maximum, margin and futility, read
    from the file) at the spread its comment assumes, the first LRN study's at 8 epochs (per-seed
    sd 0.87 and 0.77 points, correlated 0.37: differences with sd 0.92), here 0.65 points per net,
    uncorrelated. Its comment: whether LRN does nothing, helps by the 0.56 points the first study
    saw (as normalisation or as rescaling) or hurts by half a point, at least 9 studies in 10 end
    both comparisons with a verdict, and a gain or a loss as large as those is named ("helps",
    "hurts") in about half to two thirds of them, the rest ending within the margin; 7 to 9 core-hours of test cells
    on average (16-epoch cells of 7.2, 8.3 and 8.3 minutes for A, A-LRN and A-LRN0, one core
    each)."""
    from vgg_ablation.config import compose, study_overrides

    cfg = compose(study_overrides(["experiment=lrn-cpu-paper"]))
    nets = list(cfg.study.archs)
    tested, _ = analysis.testable(nets, False, analysis.claims_for(list(cfg.study.claims)))
    assert [f"{c.first} vs {c.second}" for c in tested] == ["A-LRN vs A", "A-LRN vs A-LRN0"]
    design = analysis.make_design(list(cfg.study.seeds), cfg.study.max_seeds, cfg.study.seeds_per_look,
                                  cfg.study.alpha, len(tested), futility=cfg.study.futility)  # fmt: skip
    margins = {k: v / 100 for k, v in cfg.study.margins.items()}
    minutes = {"A": 7.2, "A-LRN": 8.3, "A-LRN0": 8.3}
    worlds = {
        "LRN does nothing": (0.0, 0.0),
        "LRN helps, by its rescaling": (-0.0056, -0.0056),
        "LRN helps, by normalising": (-0.0056, 0.0),
        "LRN hurts": (0.005, 0.0),
    }
    hours = []
    for i, (world, (lrn, rescaling)) in enumerate(worlds.items()):
        means = {"A": 0.30, "A-LRN": 0.30 + lrn, "A-LRN0": 0.30 + rescaling}
        runs = simulate_studies(means, dict.fromkeys(nets, 0.0065), design, tested, 100, seed=60 + i,
                                futility=design.futility, margins=margins)  # fmt: skip
        decided = np.mean([all(o.state == "decided" for o in s) for s in runs])
        assert decided >= 0.9, (world, decided)
        for k, truth in enumerate((lrn, lrn - rescaling)):  # A-LRN vs A, then vs A-LRN0
            named = np.mean([s[k].code == (CONTRADICTED if truth < 0 else SUPPORTED) for s in runs])
            assert truth == 0 or named > 0.35, (world, k, named)
        for s in runs:
            seeds = dict.fromkeys(nets, design.stages[0])
            for o in s:
                for n in (o.comparison.first, o.comparison.second):
                    seeds[n] = max(seeds[n], design.stages[len(o.looks) - 1])
            hours.append(sum(seeds[n] * minutes[n] for n in nets) / 60)
    assert 7 <= np.mean(hours) <= 9


def test_a_comparison_that_cannot_end_stops_as_futile_early():
    """LRN better by exactly its margin: a 'no better' comparison that no number of seeds decides.
    Without futility it runs to its maximum; with it, most studies stop after a few looks, and no
    more of them err."""
    lrn = [c for c in analysis.CLAIMS if c.key == "lrn"]
    tested, _ = analysis.testable(["A", "A-LRN"], False, lrn)
    design = analysis.make_design(list(range(8)), 40, 4, 0.05, 1)
    means, sds = {"A": 0.30, "A-LRN": 0.295}, {"A": 0.0065, "A-LRN": 0.0065}
    plain = simulate_studies(means, sds, design, tested, 800, seed=13)
    futile = simulate_studies(means, sds, design, tested, 800, seed=13, futility=0.1)
    used = lambda studies: np.mean([s[0].last.n for s in studies])  # noqa: E731
    stopped = np.mean([s[0].state == "futile" for s in futile])
    assert stopped > 0.5 and used(futile) < 0.6 * used(plain)
    assert np.mean([wrong(s[0], -0.005, 0.005) for s in futile]) <= np.mean(
        [wrong(s[0], -0.005, 0.005) for s in plain]
    )
    # ... and the chance it stopped on is what it says: those studies, continued, rarely decide
    futile_ids = [i for i, s in enumerate(futile) if s[0].state == "futile"]
    decided_later = np.mean([plain[i][0].state == "decided" for i in futile_ids])
    assert decided_later < 0.2


def test_the_chance_of_a_verdict_at_the_first_look_is_the_rule_s_own_decision_rate():
    """Conditional power given nothing seen but the first look's data agrees with simulating the
    whole rule: averaged over first looks, the chance equals the share of studies that decide."""
    rule = Rule(0.05, 1, 4, 2, 10)
    rng = np.random.default_rng(21)
    chances = []
    for _ in range(300):
        d = -0.01 + 0.01 * rng.standard_normal(4)
        look = sequential.look_at(d, rule.levels((4,))[0], "better", 0.01)
        chances.append(1.0 if look.code != OPEN else sequential.chance_of_verdict(
            "better", d, (4,), rule, 0.01, 10, -0.01, 0.01, studies=2000, seed=len(chances)))  # fmt: skip
    codes, _ = sequential.simulate("better", -0.01, 0.01, 0.01, rule, 10, studies=4000, seed=3)
    assert np.mean(chances) == pytest.approx(np.mean(codes != OPEN), abs=0.05)


@pytest.mark.parametrize(
    "kind,low,high,words",
    [
        ("better", -0.0233, -0.0049, "B better by 0.49 to 2.33 points"),
        ("better", 0.0014, 0.019, "B worse by 0.14 to 1.90 points; whether by more than the 1-point margin is open"),
        ("better", 0.012, 0.019, "B worse by 1.20 to 1.90 points"),
        ("better", -0.004, 0.003, "no difference of 1 point or more: from B better by 0.40 to B worse by 0.30 points"),
        ("better", -0.02, 0.015, "not yet known which is better: from B better by 2.00 to B worse by 1.50 points"),
        ("no better", -0.0126, -0.0009,
         "B better by 0.09 to 1.26 points; whether by more than the 0.5-point margin is open"),
        ("no better", -0.004, -0.001, "B better by 0.10 to 0.40 points, less than the 0.5-point margin"),
        ("no better", -0.02, -0.006, "B better by 0.60 to 2.00 points, more than the 0.5-point margin"),
    ],
)  # fmt: skip
def test_every_interval_reads_in_plain_words(kind, low, high, words):
    margin = 0.01 if kind == "better" else 0.005
    assert sequential.reading(kind, low, high, margin, "B") == words

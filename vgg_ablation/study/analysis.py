"""From MLflow runs to verdicts on the paper's conclusions.

The runs arrive as a table (runtable.py); `per_arch` aggregates over seeds; `conclusions` decides
each claim, replaying a study's looks (`replay`) under its rule (sequential.py).

How a claim is decided (on test top-1 error, in points):
- **Paired on the seeds both nets have.** A seed fixes a run's data order, augmentation draws
  and initial weights (and, with init=from_A, the trained A it starts from); the validation split
  is the same for every run. Two nets are compared through their differences on the seeds both
  FINISHED; a seed on which either net FAILED is left out of the pairs and counted in the
  outcome ("D failed on 2 of 9 seeds"). A run that FINISHED but learned nothing is a result (that
  net's error at that seed) and stays in, named in the outcome.
- **Which claims are tested is fixed by the study's nets**, before any run (`testable`): the
  family's error is split over them (Bonferroni).
- **Verdicts from repeated confidence intervals** (`sequential`): "better" claims end supported,
  contradicted or no relevant difference (inside +/-margin); "no better" claims (LRN, saturation)
  are non-superiority claims, supported when the first net is not better by the margin or more.
  Margins are per claim, in the study's config, fixed before the runs. A study that runs until
  decided looks after each stage of seeds; `replay` walks its stages in order on the recorded
  runs, so a report regenerated later reaches the verdicts the study itself reached.
- **Plans, not post-hoc power**: for a claim left undecided, the seeds a new study needs under the
  same rule for an 80% chance of a verdict, from the 80% upper confidence limit of the spread of
  its differences, at the design's effect and at the observed one.
- Identical results on every paired seed (an LRN that did nothing, say) give no interval and no
  verdict: they are named as such.

About 460 lines, one concern: from the runs to the verdict table, in the order a report reads it
(the claims, which a study tests, its looks replayed, the table); the plans are plans.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from vgg_ablation.study import plans, sequential
from vgg_ablation.study.sequential import OPEN, Rule
from vgg_ablation.tracking.runtable import SCRATCH, Observed, observe, run_learned

LRN_INACTIVE = 1.01  # mean LRN denominator / k below this: the layer changed activations by < ~1%


@dataclass(frozen=True)
class Claim:
    """`first` should have lower test top-1 error than `second` (kind='better'), or `first` should
    be no better than `second` (kind='no better': the paper's LRN and saturation findings).
    `key` names its margin in `study.margins`."""

    number: int
    key: str
    text: str
    first: str
    second: str
    kind: str  # "better" | "no better" | "no help" (three-way: helps, no relevant difference, hurts)
    needs: str = ""  # what a study must include to test it, when it cannot
    # A claim tested only by a study that names it in study.claims; it then replaces a default
    # claim on the same two nets. Opt-in, so that adding one never changes the comparisons (and the
    # error split) of a study registered before it.
    opt_in: str = ""
    paper: bool = True  # one of the paper's conclusions (a control is named only where tested)
    # The two nets must start alike: in a study whose deeper nets start from A's weights, the first
    # net's from-scratch twin stands in for it (B-5x5 has nothing of A to start from).
    same_start: bool = False

    @property
    def id(self) -> str:
        """What a study registers it by (rule.claim_ids): the two nets and the kind of claim."""
        return f"{self.first} vs {self.second}: {self.kind}"


# The paper's conclusions (Simonyan & Zisserman, arXiv 1409.1556, section 4.1), as the lecture states them.
CLAIMS = (
    Claim(1, "lrn", "LRN does not help: A-LRN is no better than A", "A-LRN", "A", "no better"),
    Claim(2, "depth", "Depth helps: B (13 layers) beats A (11)", "B", "A", "better"),
    Claim(2, "depth", "Depth helps: D (16) beats B (13)", "D", "B", "better"),
    Claim(2, "saturation", "Depth saturates: E (19) is no better than D (16)", "E", "D", "no better"),
    Claim(3, "nonlinearity", "Extra non-linearity helps: C (1x1) beats B", "C", "B", "better"),
    Claim(3, "context", "Spatial context matters more: D (3x3) beats C (1x1)", "D", "C", "better"),
    Claim(
        4,
        "filters",
        "Small filters win: B beats B-5x5 (one 5x5 per pair of 3x3)",
        "B",
        "B-5x5",
        "better",
        needs="B and B-5x5 from the same start (in a from-A study the study adds a from-scratch B)",
        same_start=True,
    ),
    # LRN in a design that ends whichever way the data point: A-LRN helps (contradicted), no
    # relevant difference or hurts (supported); and a control that tells LRN's normalisation from
    # its constant rescaling (alpha = 0: every activation divided by k^beta = 1.68).
    Claim(
        1,
        "lrn",
        "LRN does not help: A-LRN neither beats A nor matters (three-way)",
        "A-LRN",
        "A",
        "no help",
        opt_in="lrn-three-way",
    ),
    Claim(
        1,
        "lrn",
        "LRN's effect is its normalisation: A-LRN vs A-LRN0 (alpha 0, its rescaling only)",
        "A-LRN",
        "A-LRN0",
        "no help",
        needs="A-LRN and A-LRN0 in the study",
        paper=False,
    ),
)
OPT_IN = {c.opt_in for c in CLAIMS if c.opt_in}


def claims_for(opted=()) -> tuple[Claim, ...]:
    """The claims a study tests: the default ones, with those it opts into (study.claims) in place
    of the default claims on the same two nets."""
    unknown = sorted(set(opted) - OPT_IN)
    if unknown:
        raise ValueError(f"unknown study.claims {unknown[0]!r}; choose from: {', '.join(sorted(OPT_IN))}")
    taken = {(c.first, c.second) for c in CLAIMS if c.opt_in in opted}
    return tuple(c for c in CLAIMS if (c.opt_in in opted if c.opt_in else (c.first, c.second) not in taken))


def claims_by_id(ids: list[str]) -> tuple[Claim, ...]:
    """The claims a study registered, in the project's order; one this version lacks is refused
    (the study was registered by a newer vgg-ablation)."""
    known = {c.id: c for c in CLAIMS}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ValueError(f"the study was registered with claim {unknown[0]!r}, which this vgg-ablation "
                         "does not know: continue it with the version that registered it")  # fmt: skip
    return tuple(c for c in CLAIMS if c.id in ids)


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


# -- which claims a study tests, decided before any run ------------------------------------------
@dataclass(frozen=True)
class Comparison:
    """A claim as one study tests it: the two nets (labels as in `tidy`) it compares."""

    claim: Claim
    first: str
    second: str


def testable(nets: list[str], from_a: bool, claims=None) -> tuple[list[Comparison], list[tuple[Claim, str]]]:
    """The comparisons a study with these nets tests, and the claims it cannot with what they
    need. Fixed by the study's design, not by which runs finished: the family's error is split
    over exactly these (`claims`: the study's, analysis.claims_for; the defaults when None). A
    control that is not one of the paper's conclusions is listed only where tested."""
    tested, untested = [], []
    for claim in claims_for() if claims is None else claims:
        first = f"{claim.first}{SCRATCH}" if claim.same_start and from_a else claim.first
        if first in nets and claim.second in nets:
            tested.append(Comparison(claim, first, claim.second))
        elif claim.paper:
            untested.append((claim, claim.needs or f"{claim.first} and {claim.second} in the study"))
    return tested, untested


# -- a study's looks, replayed from its runs ---------------------------------------------------------
@dataclass
class Outcome:
    """Where one comparison stands after the looks the data allow."""

    comparison: Comparison
    looks: list[sequential.Look] = field(default_factory=list)
    code: int = OPEN
    # decided | open (seeds still to come) | futile (stopped: a verdict by the maximum was too
    # unlikely) | maximum | identical | no data
    state: str = "no data"
    pairs: list[int] = field(default_factory=list)  # the seeds of the last look
    chance: float | None = None  # after an open look: the chance of a verdict by the maximum, as seen

    @property
    def last(self) -> sequential.Look | None:
        return self.looks[-1] if self.looks else None


def replay(
    comparisons: list[Comparison],
    seen: Observed,
    order: list[int],
    stages: list[int],
    rule: Rule,
    margins: dict[str, float],
    stages_done: int | None = None,
    futility: float = 0.0,
) -> list[Outcome]:
    """Walk the study's first `stages_done` stages (all by default) in order: at stage k the first
    `stages[k]` seeds of `order`, once every one of them is settled (FINISHED or FAILED) for both
    nets of a comparison, are a look at it, paired on the seeds both FINISHED; a comparison stops
    at its first verdict, or, with `futility`, at a look after which its chance of a verdict by
    the maximum (`sequential.chance_of_verdict`, at the difference and spread seen) is below it.

    A KILLED, running or missing cell holds its stage open: no look until it is settled."""
    out = []
    for comp in comparisons:
        first, second = seen.errors.get(comp.first, {}), seen.errors.get(comp.second, {})
        done = seen.settled.get(comp.first, set()) & seen.settled.get(comp.second, set())
        sizes, samples, look_stages, reached = [], [], [], 0
        for size in stages[:stages_done]:
            seeds = order[:size]
            if not set(seeds) <= done:
                break  # this stage is still being trained
            reached = size
            pairs = [s for s in seeds if s in first and s in second]
            if len(pairs) >= 2 and (not sizes or len(pairs) > sizes[-1]):
                sizes.append(len(pairs))
                samples.append(pairs)
                look_stages.append(size)
        outcome = Outcome(comp)
        margin = margins[comp.claim.key]
        levels = rule.levels(tuple(sizes)) if sizes else ()
        for k, (pairs, level) in enumerate(zip(samples, levels, strict=True)):
            diffs = np.array([first[s] - second[s] for s in pairs])
            look = sequential.look_at(diffs, level, comp.claim.kind, margin)
            outcome.looks.append(look)
            outcome.pairs = pairs
            if not look.sd > 0:  # the same difference on every seed: no interval, ever
                outcome.state = "identical"
                break
            if look.code != OPEN:
                outcome.code, outcome.state = look.code, "decided"
                break
            if futility and look_stages[k] < stages[-1]:  # looks to come: is a verdict still likely?
                outcome.chance = plans.chance_seen(
                    comp, diffs, tuple(sizes[: k + 1]), rule, margin, stages[-1]
                )
                if outcome.chance < futility:
                    outcome.state = "futile"
                    break
        else:
            if outcome.looks:
                outcome.state = "maximum" if reached >= stages[-1] else "open"
        out.append(outcome)
    return out


def nets_to_grow(outcomes: list[Outcome]) -> set[str]:
    """Nets that need the next stage's seeds: those of a comparison still open (not decided, not
    stopped as futile, not at the maximum)."""
    return {
        n
        for o in outcomes
        if o.state in ("open", "no data")
        for n in (o.comparison.first, o.comparison.second)
    }


# -- the verdict table --------------------------------------------------------------------------------
def conclusions(
    runs: pd.DataFrame,
    nets: list[str],
    from_a: bool,
    rule: Rule,
    margins: dict[str, float],
    order: list[int],
    stages: list[int],
    min_effect: float = 0.01,
    claims=None,
    futility: float = 0.0,
) -> pd.DataFrame:
    """One row per claim: the comparison, its looks, the interval the verdict used, the verdict,
    its reading in plain words, what it assumed, and for an undecided one, its chances and plans.
    Errors, margins and effects are fractions of top-1 error (0.005 = 0.5 points)."""
    seen = observe(runs)
    tested, untested = testable(nets, from_a, claims)
    outcomes = replay(tested, seen, order, stages, rule, margins, futility=futility)
    learned = {(r["net"], int(r["seed"])): bool(r["learned"]) for _, r in seen.res.iterrows()}
    rows = []
    for o in outcomes:
        c, last = o.comparison, o.last
        pairs_in = sum((c.first, s) in learned and (c.second, s) in learned for s in order)
        margin = margins[c.claim.key]
        notes = _notes(o, seen.failed, learned, order)
        if o.state == "identical":
            outcome = "no verdict: identical results on every paired seed (the two nets did not differ)"
            if last is not None and last.mean != 0:
                outcome = "no verdict: the same difference on every paired seed (no spread to test against)"
        elif o.state == "decided":
            outcome = sequential.VERDICTS[o.code]
        elif o.state == "no data":
            outcome = _no_verdict_yet(c, learned, seen.failed, order, stages, pairs_in)
        elif o.state == "futile":
            outcome = "undecided: futile at this budget"
        else:
            outcome = "undecided"
        row = {
            "claim": c.claim.number,
            "statement": c.claim.text,
            "kind": c.claim.kind,
            "key": c.claim.key,
            "first": c.first,
            "second": c.second,
            "margin": margin,
            "outcome": outcome,
            "detail": _reading(o, margin),
            "state": o.state,
            "looks": len(o.looks),
            "n": last.n if last else 0,
            "pairs_in": pairs_in,  # seeds both nets FINISHED so far, looked at or not
            "diff": last.mean if last else math.nan,
            "sd": last.sd if last else math.nan,
            "level": last.level if last else math.nan,
            "ci_low": last.low if last else math.nan,
            "ci_high": last.high if last else math.nan,
            "notes": notes,
            "history": [
                (lk.n, lk.level, lk.mean, lk.low, lk.high, sequential.VERDICTS[lk.code]) for lk in o.looks
            ],
        }
        if o.state in ("maximum", "open", "futile"):
            row.update(plans.new_study(c, last, margin, min_effect, rule))
            row.update(plans.chances(o, seen, rule, margin, min_effect, stages, futility))
        rows.append(row)
    for claim, needs in untested:
        rows.append({"claim": claim.number, "statement": claim.text, "kind": claim.kind, "key": claim.key,
                     "first": claim.first, "second": claim.second, "margin": margins.get(claim.key, math.nan),
                     "outcome": f"not tested here (needs {needs})", "state": "not tested", "notes": ""})  # fmt: skip
    table = pd.DataFrame(rows)
    table.attrs["comparisons"] = len(tested)
    table.attrs["rule"] = rule
    return table.sort_values("claim", kind="stable").reset_index(drop=True) if not table.empty else table


def _reading(o: Outcome, margin: float) -> str:
    """The comparison's interval in plain words. Repeated confidence intervals cover the truth
    together (that is their error rate), so where a comparison had several looks their common part
    is read, a narrower interval of the same confidence (Jennison & Turnbull 2000, ch. 9); the
    verdict itself is the rule's, made look by look."""
    looks = [lk for lk in o.looks if not math.isnan(lk.low)]
    if not looks:
        return ""
    c = o.comparison
    low, high = max(lk.low for lk in looks), min(lk.high for lk in looks)
    if len(looks) == 1 or low > high:
        return sequential.reading(c.claim.kind, looks[-1].low, looks[-1].high, margin, c.first)
    words = sequential.reading(c.claim.kind, low, high, margin, c.first)
    return (
        f"{words} (where its {len(looks)} looks' intervals meet, from {100 * low:+.2f} to {100 * high:+.2f})"
    )


def _no_verdict_yet(
    c, learned: dict, failed: dict[str, dict[int, str]], order: list[int], stages: list[int], paired: int
) -> str:
    """Before the first look (an interim report), when it comes; after it, that too few pairs
    finished. A seed has come in once both nets ended it, FINISHED or FAILED."""

    def ended(net: str, seed: int) -> bool:
        return (net, seed) in learned or seed in failed.get(net, {})

    came_in = sum(ended(c.first, s) and ended(c.second, s) for s in order)
    first_look = stages[0] if stages else 0
    if first_look >= 2 and came_in < first_look:
        return f"no verdict yet: the first look is at {first_look} paired seeds ({paired} so far)"
    return "no verdict yet: fewer than 2 paired seeds"


def _notes(o: Outcome, failed: dict[str, dict[int, str]], learned: dict, order: list[int]) -> str:
    """What the verdict assumed beyond the pairs: seeds left out, results at chance."""
    c, parts = o.comparison, []
    for net in (c.first, c.second):
        lost = sorted(s for s in failed.get(net, {}) if s in order)
        if lost:
            how = "diverged" if all("non-finite" in failed[net][s] for s in lost) else "failed"
            parts.append(f"{net} {how} on {len(lost)} seed{'s' if len(lost) > 1 else ''} "
                         f"({', '.join(map(str, lost))}): left out of the pairs")  # fmt: skip
    for net in (c.first, c.second):
        flat = [s for s in o.pairs if not learned.get((net, s), True)]
        if flat:
            parts.append(f"{net} learned nothing on seed{'s' if len(flat) > 1 else ''} "
                         f"{', '.join(map(str, flat))} (kept: that is its error there)")  # fmt: skip
    return "; ".join(parts)


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


# -- a study's design: its seeds, stages and rule -------------------------------------------------------
@dataclass(frozen=True)
class Design:
    """The seeds a study may train (in the order it takes them), the seeds per net at each of
    its looks, and its stopping rule."""

    order: list[int]
    stages: list[int]
    rule: Rule
    futility: float = 0.0  # a comparison stops when its chance of a verdict by the maximum falls below it
    # The claims the study considers (`testable` picks those its nets can test): the ones it was
    # registered with, so that a claim added to the project later changes no study under way.
    claims: tuple[Claim, ...] = ()

    @property
    def sequential(self) -> bool:
        return self.rule.sequential


def make_design(seeds: list[int], max_seeds: int | None, seeds_per_look: int, alpha: float,
                comparisons: int, horizon: int | None = None, futility: float = 0.0) -> Design:  # fmt: skip
    """The first look has `seeds`; with `max_seeds`, every later look adds `seeds_per_look`
    seeds (the next ones after the largest) up to `max_seeds`. `horizon` is the maximum the study
    was registered with (its rule spends (1 - reserve) of the error by then); a larger
    `max_seeds` continues it past that."""
    first = len(seeds)
    if not max_seeds or max_seeds <= first:
        return Design(list(seeds), [first], Rule.fixed(alpha, comparisons, first))
    rule = Rule(alpha, comparisons, first, seeds_per_look, horizon or max_seeds)
    top = max(seeds)
    order = list(seeds) + list(range(top + 1, top + 1 + max_seeds - first))
    return Design(order, rule.looks(max_seeds), rule, futility)

"""What it would take: for a comparison left undecided, its chance of a verdict by the study's
maximum (conditional power, at the difference seen and at the claim's design effect), the seeds
this study would need for an 80% chance, and a new study's maximum (analysis.py asks; the
simulations are sequential.py's)."""

from __future__ import annotations

import numpy as np

from vgg_ablation.study import sequential
from vgg_ablation.study.sequential import Rule
from vgg_ablation.tracking.runtable import Observed

POWER = 0.8  # the chance of a verdict a plan is sized for


def chance_seen(comp, diffs: np.ndarray, looked: tuple[int, ...], rule: Rule, margin: float,
                upto: int, effect: float | None = None) -> float:  # fmt: skip
    """A comparison's (analysis.Comparison) chance of a verdict by `upto` seeds, given its differences so far, at the
    difference seen (or `effect`) and the spread seen. The simulation's seed is fixed by the
    comparison and its looks: a report replays the study's own decisions to the digit."""
    import zlib

    seed = zlib.crc32(f"{comp.first}|{comp.second}|{looked}|{effect}".encode())
    mean = float(np.mean(diffs)) if effect is None else effect
    return sequential.chance_of_verdict(comp.claim.kind, diffs, looked, rule, margin, upto, mean,
                                        float(np.std(diffs, ddof=1)), seed=seed)  # fmt: skip


def chances(o, seen: Observed, rule: Rule, margin: float, min_effect: float, stages: list[int],
             futility: float) -> dict:  # fmt: skip
    """For a comparison left open (an analysis.Outcome): its chance of a verdict by the study's maximum, at the
    difference seen and at the claim's design effect (a `min_effect` gain for 'better', none for
    'no better'), and the seeds per net it would take for an 80% chance at the difference seen
    (the maximum raised, under the same rule)."""
    if not rule.sequential or o.last is None or not o.last.sd > 0:
        return {}
    c = o.comparison
    first, second = seen.errors[c.first], seen.errors[c.second]
    diffs = np.array([first[s] - second[s] for s in o.pairs])
    looked = tuple(lk.n for lk in o.looks)
    design = -min_effect if c.claim.kind == "better" else 0.0
    at_max = o.state == "maximum"
    return {
        "chance_seen": 0.0 if at_max else (o.chance if o.chance is not None else chance_seen(c, diffs, looked, rule, margin, stages[-1])),
        "chance_design": 0.0 if at_max else chance_seen(c, diffs, looked, rule, margin, stages[-1], design),
        "seeds_for_80": sequential.seeds_for_chance(c.claim.kind, diffs, looked, rule, margin, float(np.mean(diffs)),
                                                   float(np.std(diffs, ddof=1))),
        "futility": futility,
    }  # fmt: skip


def new_study(c, last: sequential.Look | None, margin: float, min_effect: float, rule: Rule) -> dict:
    """Seeds per net a new study under the same design needs for an 80% chance of a verdict,
    with the spread at its 80% upper confidence limit: at the design's effect (a `min_effect`
    gain for a 'better' claim, no difference for a 'no better' one) and at the observed one."""
    if last is None or not last.sd > 0:
        return {}
    sd = sequential.sd_upper(last.sd, last.n)
    design_effect = -min_effect if c.claim.kind == "better" else 0.0
    at_design, _ = sequential.plan(c.claim.kind, design_effect, sd, margin, rule, POWER)
    at_observed, _ = sequential.plan(c.claim.kind, last.mean, sd, margin, rule, POWER)
    return {
        "sd_upper": sd,
        "design_effect": design_effect,
        "plan_design": at_design,
        "plan_observed": at_observed,
    }

"""Run until decided: when a comparison of two nets over seeds may stop, and what it then says.

A study compares two nets through their paired per-seed differences d (the first net's test
top-1 error minus the second's, one value per seed both nets finished). It may look at them
several times, after each stage of seeds. At every look, each comparison still open gets a
**repeated confidence interval**, mean(d) +/- c * sd(d) / sqrt(n), and a verdict as soon as the
interval gives one (`verdict`). A comparison that has its verdict stops; one that has none at the
study's maximum is undecided.

Why the verdicts hold at the stated error rate: a verdict is wrong only when its interval misses
the true difference. The family's error `alpha` is split evenly over the K comparisons the study
can test (Bonferroni: K is fixed by the study's nets, before any run), and each comparison spends
its alpha/K over its looks (error spending, Lan & DeMets 1983) so that the chance that *any* of its
intervals misses is at most alpha/K. So the chance that any verdict of a report is wrong is at most
alpha, however many looks were taken, and whichever way the true differences lie.

The spending function, fixed before the first run (`Rule.spent`): by n paired seeds a comparison
has spent (1 - reserve) * ln(1 + (e - 1) n / N) of its alpha/K, where N is the study's maximum
(Lan-DeMets' Pocock-type shape: early looks get a fair share, so clear differences stop early).
A study that reaches N undecided may be continued with a larger maximum under the same rule: the
reserve (a tenth) is spent beyond N, r * (1 - N / n) of it by n seeds. A fixed-seed study has one
look and spends all of alpha/K there (a plain Bonferroni t interval).

The boundary c of each look is calibrated for the t statistic, whose spread is estimated from the
same n seeds (at small n its tails are far heavier than the normal's: Pocock's z constants would
not hold). The first look's level is exact; later looks are found by simulating 400,000 studies
with common random numbers (the sum and the sum of squared deviations of each stage's new seeds
drawn directly, so a look costs O(studies)), given the boundaries of the looks before. The same
engine with known variance reproduces Pocock's and O'Brien-Fleming's published constants for K
equally spaced looks (Jennison & Turnbull 2000, Tables 2.1 and 2.3; `tests/test_sequential.py`).
No maintained library does this for t at small n (spotify-confidence's solver is z-based;
confseq needs a known variance; gsDesign has no Python port), hence this small module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import stats

SIMULATED_STUDIES = 400_000  # per boundary calibration: the error it spends is exact to about 1%
PLANNING_STUDIES = 50_000  # plans are estimates anyway: coarser boundaries, 8x faster
CALIBRATION_SEED = 19_830_000  # fixed: the same looks always get the same boundaries

# Verdict codes, usable on numpy arrays (simulations) and on single looks alike.
OPEN, SUPPORTED, CONTRADICTED, NO_RELEVANT_DIFFERENCE = 0, 1, 2, 3
VERDICTS = {
    OPEN: "undecided",
    SUPPORTED: "supported",
    CONTRADICTED: "contradicted",
    NO_RELEVANT_DIFFERENCE: "no relevant difference",
}


@dataclass(frozen=True)
class Rule:
    """A study's stopping rule, fixed before its first run."""

    alpha: float  # family-wise error of the report's verdicts
    comparisons: int  # K: comparisons sharing alpha (Bonferroni)
    first_look: int  # paired seeds at the first look
    seeds_per_look: int  # seeds added at each later look; 0: one look (a fixed-seed study)
    horizon: int  # N: where (1 - reserve) of each comparison's error has been spent
    reserve: float = 0.1  # the share kept for a continuation past N (0 for one look)

    @classmethod
    def fixed(cls, alpha: float, comparisons: int, seeds: int) -> Rule:
        return cls(alpha, comparisons, seeds, 0, seeds, 0.0)

    @property
    def per_comparison(self) -> float:
        return self.alpha / max(1, self.comparisons)

    @property
    def sequential(self) -> bool:
        return self.seeds_per_look > 0

    def spent(self, n: int) -> float:
        """Error a comparison may have spent by n paired seeds."""
        if not self.sequential:
            return self.per_comparison  # one look: all of it, however many seeds finished
        share = 1.0 - self.reserve
        if n <= self.horizon:
            fraction = share * math.log1p((math.e - 1) * n / self.horizon)
        else:
            fraction = share + self.reserve * (1 - self.horizon / n)
        return self.per_comparison * min(1.0, fraction)

    def looks(self, upto: int) -> list[int]:
        """Seeds per net at each planned look, up to `upto` seeds."""
        if not self.sequential:
            return [self.first_look]
        sizes = list(range(self.first_look, upto + 1, self.seeds_per_look))
        if upto >= self.first_look and sizes[-1] != upto:
            sizes.append(upto)  # a maximum off the grid is its own last look
        return sizes

    def levels(self, looks: tuple[int, ...], studies: int = SIMULATED_STUDIES) -> tuple[float, ...]:
        """Two-sided nominal level of each look's t interval, for comparisons looked at with
        these numbers of paired seeds (strictly increasing)."""
        spent = tuple(self.spent(n) for n in looks)
        return _levels(tuple(looks), spent, studies)

    def critical(self, looks: tuple[int, ...]) -> list[float]:
        """c of each look: the interval is mean +/- c * sd / sqrt(n)."""
        return [t_quantile(level, n) for level, n in zip(self.levels(looks), looks, strict=True)]


@lru_cache(maxsize=4096)  # a study's looks repeat the same few (level, n): scipy's call costs ~1 ms
def t_quantile(level: float, n: int) -> float:
    return float(stats.t.isf(level / 2, n - 1)) if level > 0 else math.inf


def _statistics(looks: tuple[int, ...], studies: int, rng: np.random.Generator, known_sd: bool = False):
    """For each look, each simulated study's |statistic| (mean 0, sd 1 per seed): |t| with n-1
    degrees of freedom, or |z| when the spread is known. Compared with a look's boundary on this
    scale: the same order as p-values, without an sf call per study."""
    n, total, squares = 0, np.zeros(studies), np.zeros(studies)
    for size in looks:
        m = size - n
        block = rng.standard_normal(studies) * math.sqrt(m)  # sum of m new seeds
        if not known_sd:
            within = rng.chisquare(m - 1, studies) if m > 1 else np.zeros(studies)
            between = (n * m / size) * (total / max(n, 1) - block / m) ** 2 if n else 0.0
            squares = squares + within + between
        total, n = total + block, size
        if known_sd:
            yield np.abs(total) / math.sqrt(n)
        else:
            yield np.abs(total / n) / np.sqrt(squares / (n - 1) / n)


def _increments(looks: tuple[int, ...], studies: int, rng: np.random.Generator, known_sd: bool = False):
    """The same studies as two-sided p-values, look by look (what the tests reason in)."""
    for stat, n in zip(_statistics(looks, studies, rng, known_sd), looks, strict=True):
        yield 2 * (stats.norm.sf(stat) if known_sd else stats.t.sf(stat, n - 1))


@lru_cache(maxsize=256)
def _levels(looks: tuple[int, ...], spent: tuple[float, ...], studies: int) -> tuple[float, ...]:
    """Nominal levels such that a comparison's interval first misses at look k with probability
    spent[k] - spent[k-1]."""
    if any(b <= a for a, b in zip(looks, looks[1:], strict=False)) or looks[0] < 2:
        raise ValueError(f"looks must be increasing numbers of seeds >= 2, got {looks}")
    levels = [spent[0]]  # the first look alone: its level is what it may spend
    if len(looks) == 1:
        return tuple(levels)
    rng = np.random.default_rng(CALIBRATION_SEED)
    alive = np.ones(studies, dtype=bool)
    for k, (stat, n) in enumerate(zip(_statistics(looks, studies, rng), looks, strict=True)):
        if k == 0:
            boundary = t_quantile(levels[0], n)
        else:
            # the boundary that this many of the studies still open cross first here
            crossings = int(round((spent[k] - spent[k - 1]) * studies))
            candidates = stat[alive]
            if crossings >= 1:
                boundary = float(
                    np.partition(candidates, len(candidates) - crossings)[len(candidates) - crossings]
                )
                levels.append(float(2 * stats.t.sf(boundary, n - 1)))
            else:
                boundary = math.inf
                levels.append(0.0)
        alive &= stat < boundary
    return tuple(levels)


def constant_boundary(looks: list[int], alpha: float, shape: str = "pocock", known_sd: bool = True,
                      studies: int = SIMULATED_STUDIES, seed: int = CALIBRATION_SEED) -> float:  # fmt: skip
    """The classical designs, for checking the engine against published tables: the constant C
    with P(some look's |statistic| > C * w_k) = alpha, w_k = 1 (Pocock) or sqrt(n_K / n_k)
    (O'Brien-Fleming), statistics on the z scale (a t statistic is mapped there by its p)."""
    rng = np.random.default_rng(seed)
    weights = [1.0 if shape == "pocock" else math.sqrt(looks[-1] / n) for n in looks]
    largest = np.zeros(studies)
    for p, w in zip(_increments(tuple(looks), studies, rng, known_sd), weights, strict=True):
        largest = np.maximum(largest, stats.norm.isf(p / 2) / w)
    return float(np.quantile(largest, 1 - alpha))


# -- verdicts ---------------------------------------------------------------------------------------
def verdict(kind: str, low, high, margin: float):
    """The verdict an interval [low, high] gives (codes above; arrays work element-wise).

    'better' (the first net beats the second): supported below 0, contradicted above 0, no
    relevant difference inside +/-margin. Below 0 and inside the margin at once reads supported:
    a real gain, smaller than the margin (`reading` says so). These three always end: once the
    interval is narrower than the margin it either excludes 0 or lies inside +/-margin.
    'no better' (the first net is not better, a non-superiority claim): supported above -margin
    (worse, equivalent or not better by the margin: `reading` says which), contradicted below it.
    It ends for every true difference but -margin itself.
    'no help' (three-way: the first net, A-LRN, neither helps nor matters): contradicted below 0
    (it helps), supported above 0 (it hurts), no relevant difference inside +/-margin. As for
    'better', the sign wins: an interval below 0 and inside the margin reads "helps, by less than
    the margin", never "no relevant difference", so a gain the seeds establish is always named."""
    low, high = np.asarray(low, float), np.asarray(high, float)
    if kind in ("better", "no help"):  # three-way, and it always ends: once narrower than the
        # margin, an interval excludes 0 or lies inside +/-margin; 'no help' is 'better' with the
        # first net's gain as its contradiction
        gain, loss = (SUPPORTED, CONTRADICTED) if kind == "better" else (CONTRADICTED, SUPPORTED)
        out = np.where(high < 0, gain, np.where(low > 0, loss, OPEN))
        inside = (low > -margin) & (high < margin)
        out = np.where((out == OPEN) & inside, NO_RELEVANT_DIFFERENCE, out)
    elif kind == "no better":
        out = np.where(low > -margin, SUPPORTED, np.where(high < -margin, CONTRADICTED, OPEN))
    else:
        raise ValueError(f"unknown kind of claim {kind!r}")
    return out if out.ndim else int(out)


def reading(kind: str, low: float, high: float, margin: float, first: str) -> str:
    """An interval [low, high] of the first net's error minus the second's, in plain words: which
    net is better, by how much (points), and what the margin leaves open. For every state, not
    only a verdict: an open interval says what it already shows."""

    def pts(x: float) -> str:
        return f"{100 * abs(x):.2f}"

    m = f"{100 * margin:g}"
    points = f"{m} point{'' if m == '1' else 's'}"
    if high < 0:  # the first net better
        by = f"{first} better by {pts(high)} to {pts(low)} points"
        if kind in ("better", "no help"):
            return by + (f", less than the {m}-point margin" if low > -margin else "")
        if low > -margin:
            return by + f", less than the {m}-point margin"
        if high < -margin:
            return by + f", more than the {m}-point margin"
        return by + f"; whether by more than the {m}-point margin is open"
    if low > 0:
        by = f"{first} worse by {pts(low)} to {pts(high)} points"
        if kind in ("better", "no help") and low < margin and high > margin:
            return by + f"; whether by more than the {m}-point margin is open"
        return by
    span = f"from {first} better by {pts(low)} to {first} worse by {pts(high)} points"
    if low > -margin and high < margin:
        return f"no difference of {points} or more: {span}"
    return f"not yet known which is better: {span}"


@dataclass(frozen=True)
class Look:
    """One look at one comparison."""

    n: int
    mean: float
    sd: float
    level: float  # two-sided nominal level of this look's interval
    low: float
    high: float
    code: int


def look_at(diffs: np.ndarray, level: float, kind: str, margin: float) -> Look:
    """The interval and verdict of one look at these per-seed differences (degenerate
    differences, all equal, give no interval: `identical` is reported by the caller)."""
    n = len(diffs)
    mean = float(np.mean(diffs)) if n else math.nan
    sd = float(np.std(diffs, ddof=1)) if n > 1 else math.nan
    if n < 2 or not sd > 0:
        return Look(n, mean, sd, level, math.nan, math.nan, OPEN)
    half = t_quantile(level, n) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    return Look(n, mean, sd, level, low, high, verdict(kind, low, high, margin))


# -- simulation: error rates and plans -------------------------------------------------------------
def simulate(kind: str, diff: float, sd: float, margin: float, rule: Rule, upto: int,
             studies: int = 4000, seed: int = 0, calibration: int = SIMULATED_STUDIES,
             ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """One comparison under `rule` up to `upto` seeds, when the true per-seed differences are
    N(diff, sd^2): each simulated study's verdict code and the seeds it used."""
    rng = np.random.default_rng(seed)
    looks = tuple(rule.looks(upto))
    levels = rule.levels(looks, calibration)
    codes = np.full(studies, OPEN)
    used = np.full(studies, looks[-1])
    n, total, squares = 0, np.zeros(studies), np.zeros(studies)
    for size, level in zip(looks, levels, strict=True):
        m = size - n
        block = rng.standard_normal(studies) * math.sqrt(m)
        within = rng.chisquare(m - 1, studies) if m > 1 else np.zeros(studies)
        squares = squares + within + ((n * m / size) * (total / max(n, 1) - block / m) ** 2 if n else 0.0)
        total, n = total + block, size
        mean = diff + sd * total / n
        half = t_quantile(level, n) * sd * np.sqrt(squares / (n - 1)) / math.sqrt(n)
        now = verdict(kind, mean - half, mean + half, margin)
        fresh = (codes == OPEN) & (now != OPEN)
        codes = np.where(fresh, now, codes)
        used = np.where(fresh, size, used)
    return codes, used


def plan(kind: str, diff: float, sd: float, margin: float, rule: Rule, power: float = 0.8,
         cap: int = 400) -> tuple[int | float, float]:  # fmt: skip
    """Seeds per net a new study under this rule's design needs for `power` probability of a
    verdict (any verdict) when the truth is N(diff, sd^2), and the mean seeds it would use.
    The maximum found is the new study's `max_seeds` (its horizon); inf above `cap`."""

    def decides(upto: int) -> tuple[float, float]:
        design = (
            Rule(rule.alpha, rule.comparisons, min(rule.first_look, upto), rule.seeds_per_look, upto)
            if rule.sequential
            else Rule.fixed(rule.alpha, rule.comparisons, upto)
        )
        codes, used = simulate(kind, diff, sd, margin, design, upto, studies=2000, seed=upto,
                               calibration=PLANNING_STUDIES)  # fmt: skip
        return float(np.mean(codes != OPEN)), float(np.mean(used))

    low, high = 2, 4
    while decides(high)[0] < power:
        low, high = high, high * 2
        if high > cap:
            return math.inf, math.nan
    while high - low > 1:  # smallest maximum with the power (close enough to monotone)
        middle = (low + high) // 2
        low, high = (low, middle) if decides(middle)[0] >= power else (middle, high)
    return high, decides(high)[1]


def chance_of_verdict(kind: str, diffs: np.ndarray, looked: tuple[int, ...], rule: Rule, margin: float, upto: int,
                      effect: float, sd: float, studies: int = 4000, seed: int = 0,
                      calibration: int = SIMULATED_STUDIES) -> float:  # fmt: skip
    """The chance that a comparison still open reaches a verdict (any) by `upto` seeds, given the
    differences `diffs` seen so far (at looks of `looked` seeds), when every new seed's difference
    is N(effect, sd^2): the later looks simulated under the same rule (conditional power, Lan,
    Simon & Halperin 1982). 0 when no look is left."""
    n = len(diffs)
    future = [size for size in rule.looks(upto) if size > n]
    if not future or not sd > 0:
        return 0.0
    levels = rule.levels((*looked, *future), calibration)[len(looked) :]
    rng = np.random.default_rng(seed)
    mean = np.full(studies, float(np.mean(diffs)))
    squares = np.full(studies, float(np.sum((diffs - np.mean(diffs)) ** 2)))  # sum of squared deviations
    decided = np.zeros(studies, dtype=bool)
    for size, level in zip(future, levels, strict=True):
        m = size - n
        new = effect + sd * rng.standard_normal((studies, m))
        new_mean = new.mean(1)
        delta = new_mean - mean
        squares = squares + ((new - new_mean[:, None]) ** 2).sum(1) + delta**2 * n * m / size  # Chan et al.
        mean, n = mean + delta * m / size, size
        half = t_quantile(level, n) * np.sqrt(squares / (n - 1)) / math.sqrt(n)
        decided |= verdict(kind, mean - half, mean + half, margin) != OPEN
    return float(decided.mean())


def seeds_for_chance(kind: str, diffs: np.ndarray, looked: tuple[int, ...], rule: Rule, margin: float,
                     effect: float, sd: float, power: float = 0.8, cap: int = 400) -> int | float:  # fmt: skip
    """Seeds per net a comparison still open would need (its maximum raised, under the same rule)
    for a `power` chance of a verdict, given what it has seen; inf above `cap`."""
    n = max(len(diffs), rule.first_look)
    upto = n + max(rule.seeds_per_look, 1)
    while upto <= cap:
        extended = Rule(
            rule.alpha, rule.comparisons, rule.first_look, rule.seeds_per_look, rule.horizon, rule.reserve
        )
        if chance_of_verdict(kind, diffs, looked, extended, margin, upto, effect, sd, studies=1000, seed=upto,
                             calibration=PLANNING_STUDIES) >= power:  # fmt: skip
            return upto
        upto = n + 2 * (upto - n)
    return math.inf


def sd_upper(sd: float, n: int, confidence: float = 0.8) -> float:
    """One-sided upper confidence limit of a standard deviation estimated from n values."""
    if n < 2 or not sd > 0:
        return math.nan
    return sd * math.sqrt((n - 1) / stats.chi2.ppf(1 - confidence, n - 1))

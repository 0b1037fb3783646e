"""Where a study stands: its runs read from the store once (`StudyRuns.read`), and what the
orchestrator decides from that one reading: the cells FINISHED (skipped, and timed for the time
left) and the looks replayed (which comparisons are still open). The orchestrator reads it once a
look, after the look's cells, and hands it down; cells.py names, this reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from omegaconf import DictConfig

from vgg_ablation.study import analysis
from vgg_ablation.study.cells import cell_keys, fingerprint, margins_of, net_labels, study_fingerprints
from vgg_ablation.tracking import runtable, stores


@dataclass(frozen=True)
class Finished:
    """A cell's FINISHED run: what the study needs to skip the cell without launching it."""

    run_id: str
    seconds: float  # its recorded training time
    parent: str | None  # the study run it is nested under, if any


@dataclass(frozen=True)
class StudyRuns:
    """Every run of a study (its config's fingerprints) as one reading of the store found them;
    `away`: why the store could not be read then (the looks need it; skipping finished cells can
    go without: each cell looks itself up when it starts)."""

    cfg: DictConfig
    runs: pd.DataFrame | None
    away: Exception | None = None

    @classmethod
    def read(cls, cfg: DictConfig) -> StudyRuns:
        from mlflow.exceptions import MlflowException

        try:
            return cls(cfg, study_runs(cfg))
        except (MlflowException, OSError) as exc:  # the store away or refusing right now
            return cls(cfg, None, exc)

    def table(self) -> pd.DataFrame:
        if self.runs is None:
            raise self.away
        return self.runs

    def finished_cells(self) -> dict[tuple[str, int], Finished]:
        """The study's cells FINISHED, by (net, seed): runs of each cell's own key, as the cell
        itself looks it up (the scratch-B control's fingerprint is also that of a kaiming study of
        the same name, whose runs are not this study's), FINISHED with their test metrics. So a
        cell found here is one its own launch would skip. None found when the store was away."""
        runs = self.runs
        if runs is None or runs.empty:
            return {}
        keys = cell_keys(self.cfg, sorted({int(s) for s in runs["seed"].dropna()}))
        own = [
            pd.notna(seed) and isinstance(cell, str) and keys.get((net, int(seed))) == cell
            for net, seed, cell in zip(runs["net"], runs["seed"], runs["cell"], strict=True)
        ]
        done = runtable.results(runs[own])
        return {
            (r["net"], int(r["seed"])): Finished(
                r["run_id"],
                float(r["seconds"]),
                r["parent_run"] if isinstance(r["parent_run"], str) else None,
            )
            for _, r in done.iterrows()
        }

    def looks(self, design: analysis.Design, stages: int) -> list[analysis.Outcome]:
        """The study's first `stages` looks, replayed on these runs."""
        cfg = self.cfg
        seen = runtable.observe(self.table())
        tested, _ = analysis.testable(net_labels(cfg), cfg.model.init == "from_A", design.claims)
        return analysis.replay(tested, seen, design.order, design.stages, design.rule, margins_of(cfg), stages,
                               futility=design.futility)  # fmt: skip


def study_runs(cfg: DictConfig) -> pd.DataFrame:
    """Every run the study (this config) recorded, as a table."""
    uri = stores.tracking_uri(cfg.logger.tracking_uri)
    return runtable.load_runs(uri, stores.experiment_name(cfg), study_fingerprints(cfg))


def recorded_digest(cfg: DictConfig, configs: list[DictConfig]) -> str | None:
    """The study's data digest on a machine without its data (a study imported to be re-analysed):
    the digest its runs recorded whose fingerprints, for any of `configs` (the study's, its lr
    selection's), are those of runs; None when none is. Reading only: a study that trains reads its
    data, and with it the digest."""
    uri = stores.tracking_uri(cfg.logger.tracking_uri)
    runs = runtable.load_runs(uri, stores.experiment_name(cfg))
    for digest in runs["data_digest"].dropna().unique() if not runs.empty else []:
        fps = {fingerprint(c, str(digest)) for c in configs}
        if runs["fingerprint"].isin(fps).any():
            return str(digest)
    return None

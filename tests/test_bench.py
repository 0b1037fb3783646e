"""`vgg-ablation bench bench.mode=cells`, tiny-sized: real cells profiled, two ways of filling the
machine run as whole studies, and the report's ceiling of a cell per core computed from them. What
it measures is not checked (benchmarks are commands, not timed tests); that it measures it is."""

from __future__ import annotations

import json

import pytest

from .conftest import TINY, cli_in_process

pytestmark = pytest.mark.slow


def test_the_cells_bench_profiles_cells_runs_each_way_and_states_the_ceiling(workdir, monkeypatch):
    args = ["bench", "bench.mode=cells", "experiment=smoke", *TINY, "bench.epochs=1", "bench.seeds=1",
            "bench.archs=[A]", "bench.ways=[basic,per-core-channels_last]", "bench.rounds=1", "bench.steps=2",
            "bench.warmup=1", "bench.out=out"]  # fmt: skip
    done = cli_in_process(args, workdir, monkeypatch)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((workdir / "out" / "bench-cpu-cells.json").read_text())
    settings = [(p["threads"], p["compiled"], p["channels_last"]) for p in record["profiles"]]
    assert settings[1:] == [(1, False, False), (1, False, True)] and settings[0][1:] == (False, False)
    assert all(p["step bench img/s"] > 0 and p["seconds"] > 0 for p in record["profiles"])
    ways = {s["way"]: s for s in record["studies"]}
    assert ways["per-core-channels_last"]["threads"] == ["1"] and ways["basic"]["ratio to basic"] == 1.0
    assert "study.parallel=off" in ways["basic"]["overrides"]  # the old way, not today's default
    report = (workdir / "out" / "bench-cpu-cells.md").read_text()
    ceiling = report.split("## The ceiling of a cell per core")[1].split("##")[0]
    row = next(line for line in ceiling.splitlines() if line.startswith("| per-core-channels_last"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 6 and all(float(c) > 0 for c in cells[1:]), row

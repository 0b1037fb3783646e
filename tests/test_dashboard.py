"""The MLflow dashboard as a study's home: read back through MLflow's client, then in a real browser
(Debian's chromium driven by playwright, against `vgg-ablation ui` on 127.0.0.1)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from .conftest import TINY, all_runs, assert_children_of_one_study, cli_env, cli_in_process, store_uri

pytestmark = pytest.mark.slow

DESCRIPTION = "Two nets, two seeds: the dashboard test study"
STUDY = ["study", "experiment=smoke", *TINY, f"study.description='{DESCRIPTION}'",
         "logger.system_metrics_interval=0.2"]  # fmt: skip


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, str]:
    """A tiny real study, run once for this module's tests: its folder and its stdout."""
    workdir = tmp_path_factory.mktemp("dashboard")
    with pytest.MonkeyPatch.context() as monkeypatch:
        out = cli_in_process(STUDY, workdir, monkeypatch)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return workdir, out.stdout


def test_a_study_is_one_parent_run_with_its_report_tables_and_verdicts(study):
    import mlflow
    from mlflow.tracking import MlflowClient

    workdir, _ = study
    parent = assert_children_of_one_study(workdir)
    client = MlflowClient(store_uri(workdir))
    pid = parent.info.run_id
    assert len(all_runs(workdir)) == 4
    assert {a.path for a in client.list_artifacts(pid, "report")} == {
        "report/smoke.md", "report/smoke-error-vs-depth.png", "report/smoke-learning-curves.png",
        "report/smoke-params-vs-error.png", "report/smoke-runs.csv",
    }  # fmt: skip
    mlflow.set_tracking_uri(store_uri(workdir))  # load_table searches through the fluent API's store
    summary = client.load_table(parent.info.experiment_id, "summary.json", run_ids=[pid])
    assert sorted(summary["net"]) == ["A", "B"] and "top1_err_mean" in summary
    claims = client.load_table(parent.info.experiment_id, "claims.json", run_ids=[pid])
    assert len(claims) == 7  # the paper's conclusions, one row per comparison
    assert claims["reported_at"].nunique() == summary["reported_at"].nunique() == 1  # one report so far
    assert parent.data.tags["claim2/B_vs_A"].startswith(
        ("supported", "contradicted", "no relevant difference", "undecided", "no verdict")
    )
    assert parent.data.tags["claim2/E_vs_D"].startswith("not tested here")
    assert "claim2/B_vs_A/delta_err1_points" in parent.data.metrics
    mean_a = summary.set_index("net").loc["A", "top1_err_mean"]
    assert parent.data.metrics["test_err1/A"] == pytest.approx(100 * mean_a)
    assert parent.data.tags["archs"] == "A,B" and parent.data.tags["seeds"] == "0,1"
    assert parent.data.params["epochs"] == "2" and parent.data.params["fingerprint"]
    assert client.download_artifacts(pid, "config.yaml", str(workdir)).endswith("config.yaml")
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.note.content"] == DESCRIPTION
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the training view
    # the report links into the dashboard: its header to the study's run, each net to its runs
    report = (workdir / "reports" / "smoke.md").read_text()
    assert f"runs/{pid}?workflowType=machine_learning" in report
    assert re.search(r"\| \[A\]\(http://127\.0\.0\.1:5000/#/experiments/\d+/runs\?.*searchFilter=", report)


def test_each_cell_run_carries_what_the_dashboard_columns_expect(study):
    from mlflow.tracking import MlflowClient

    workdir, _ = study
    client = MlflowClient(store_uri(workdir))
    runs = all_runs(workdir)
    for run in runs:
        assert run.inputs.dataset_inputs[0].dataset.name == "cifar10-sample"  # the Dataset column
        tags = run.data.tags
        assert tags["mlflow.source.name"].endswith("train.py") and tags["mlflow.user"]
        assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])
        assert {"dropout", "warmup_epochs", "head"} <= set(run.data.params)
        assert run.data.params["head"] == "compact"  # the head built at 32 px, not "auto"
        val = [
            m.value
            for m in sorted(client.get_metric_history(run.info.run_id, "val/acc1"), key=lambda m: m.step)
        ]
        best = [
            m.value
            for m in sorted(client.get_metric_history(run.info.run_id, "val/acc1_best"), key=lambda m: m.step)
        ]
        assert best == [max(val[: i + 1]) for i in range(len(val))]
    sampled = [r for r in runs if any(k.startswith("system/cpu_utilization") for k in r.data.metrics)]
    assert len(sampled) == len(runs)  # a last sample as training ends: short runs get one too
    assert "system/system_memory_usage_megabytes" in sampled[0].data.metrics


def test_a_study_prints_a_few_lines_per_cell_with_k_of_n_and_time_left(study):
    _, stdout = study
    lines = stdout.splitlines()
    cells = [line for line in lines if re.match(r"\[\d/4 · \d+m\d\ds\] [AB] seed=\d: (?!epoch)", line)]
    assert len(cells) == 8  # started + ended, per cell
    epochs = [line for line in lines if re.match(r"\[\d/4 · \d+m\d\ds\] [AB] seed=\d: epoch \d/2, ", line)]
    assert len(epochs) == 8 and "about" in epochs[0] and "left in this cell" in epochs[0]  # a line per epoch
    assert all(
        ("FINISHED" in line) == ("left" in line or "last cell" in line)
        for line in cells
        if "started" not in line
    )
    ended = [line for line in cells if "FINISHED" in line]
    assert ended[0].endswith("left (3 cells to train)") and ended[-1].endswith("last cell"), ended
    assert len(lines) <= 16 + 20, stdout  # no progress bars, no per-job Hydra or Lightning banners
    assert "LOCAL_RANK" not in stdout and "GPU available" not in stdout


def test_the_dashboard_in_a_browser_shows_the_study_nested_its_report_and_charts(study, tmp_path):
    from vgg_ablation.commands.dashboard import CHROMIUM, Dashboard, walk

    if not Path(CHROMIUM).exists():
        if os.environ.get("VGG_ABLATION_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} missing: apt-get install chromium")
        pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium)")
    workdir, _ = study
    parent = assert_children_of_one_study(workdir)
    cells = {r.info.run_name: r for r in all_runs(workdir)}
    shots = Path(os.environ.get("VGG_ABLATION_SCREENSHOTS", tmp_path))
    with Dashboard(workdir, ["experiment=smoke"], env=cli_env()) as ui:
        print(f"dashboard answered in {ui.seconds_to_answer:.1f} s")
        cell = cells["A-seed0"]
        paths = walk(ui.base, parent.info.experiment_id, parent.info.run_id, "smoke", cell.info.run_id,
                     "A-seed0", list(cells), shots)  # fmt: skip
    assert all(p.stat().st_size > 10_000 for p in paths)  # each waited for what it shows, then saved

"""A tiny real study through the CLI: Hydra multirun -> MLflow -> report; a re-run adds nothing."""

import pytest

from .conftest import TINY, all_runs, run_cli

pytestmark = pytest.mark.slow

STUDY = ["experiment=smoke", *TINY]  # archs A, B x seeds 0, 1


def test_tiny_study_then_rerun_skips_finished_cells(workdir):
    first = run_cli(["study", *STUDY], workdir)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    runs = all_runs(workdir)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert {(r.data.params["arch"], r.data.params["seed"]) for r in runs} == {
        ("A", "0"),
        ("A", "1"),
        ("B", "0"),
        ("B", "1"),
    }
    assert {r.info.experiment_id for r in runs} == {runs[0].info.experiment_id}  # one per study
    assert "summary: 4 FINISHED" in first.stdout

    report = (workdir / "reports" / "smoke.md").read_text()
    assert "## Results per network" in report and "## The paper's conclusions, tested" in report
    assert "Depth helps: B (13 layers) beats A (11)" in report and "paired t, 2 paired seeds" in report
    assert "p (Holm)" in report and "not tested here (needs D and B in the study)" in report
    assert "digest `" in report and "### Planning the next study" in report
    assert "| A " in report and "| B " in report
    for plot in ("error-vs-depth", "learning-curves", "params-vs-error"):
        assert (workdir / "reports" / f"smoke-{plot}.png").stat().st_size > 1000

    again = run_cli(["study", *STUDY], workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already FINISHED") == 4
    assert len(all_runs(workdir)) == 4
    sweeps = list((workdir / "multirun" / "smoke").iterdir())
    assert len(sweeps) == 2  # a fresh sweep folder per launch


def test_report_for_a_study_with_no_runs_is_refused(workdir):
    out = run_cli(["report", "experiment=smoke"], workdir)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: no runs recorded for study 'smoke'")
    assert not (workdir / "reports").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["experiment=nope"],
            "unknown study 'nope'; choose one of: cifar10, cifar10-cpu, imagenet, sample, smoke",
        ),
        (["experiment=smoke", "study.seeds=[]"], "study.seeds is empty"),
        (["experiment=smoke", "study.archs=[A,Z]"], "unknown arch 'Z'"),
    ],
)
def test_bad_study_refused_before_any_job(workdir, args, message):
    out = run_cli(["study", *args], workdir, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and message in out.stderr
    assert all_runs(workdir) == [] and not (workdir / "multirun").exists()


def test_deeper_nets_start_from_the_trained_a_of_their_seed(workdir):
    out = run_cli(
        ["study", *STUDY, "model.init=from_A", "study.seeds=[0]", "study.archs=[A,A-LRN,B,B-5x5]"], workdir
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    all_b = [r for r in all_runs(workdir) if r.data.params["arch"] == "B"]
    runs = {
        r.data.params["arch"]: r
        for r in all_runs(workdir)
        if r.data.params["init"] != "kaiming" or r.data.params["arch"] != "B"
    }
    assert runs["B"].data.params["init"] == "from_A"  # deeper than A: warm-started
    # B-5x5 trains from scratch, so the study adds a B from scratch for claim 4 (like with like)
    assert sorted(r.data.params["init"] for r in all_b) == ["from_A", "kaiming"]
    assert "| B (scratch) " in out.stdout
    report = (workdir / "reports" / "smoke.md").read_text()
    claim4 = next(line for line in report.splitlines() if line.startswith("| 4 "))
    assert "not tested" not in claim4 and ("paired" in claim4 or "Welch" in claim4), claim4
    assert runs["A-LRN"].data.params["init"] == "kaiming"  # as deep as A: from scratch, a fair test
    assert runs["A"].info.end_time <= runs["B"].info.start_time  # A trained first
    # A's first four convs land on B's block-1 conv 1, block-2 conv 1, block-3 convs 1 and 2, and the FCs
    assert (
        "init from A: copied features.0, features.5, features.10, features.12, classifier.0"
        in out.stdout + out.stderr
    )


def test_a_compiled_from_a_study_loads_its_checkpoints_and_never_recompiles_for_shapes(workdir):
    # aot_eager: Dynamo and AOTAutograd for real, without inductor's C++ build (slow on 2 cores)
    out = run_cli(
        ["study", *STUDY, "model.init=from_A", "study.seeds=[0]", "study.archs=[A,A-LRN,B]",
         "trainer.compile=true", "trainer.compile_backend=aot_eager",
         "trainer.limit_test_batches=1.0"],  # all 1,000 test images: a short last batch, padded
        workdir,
        env={"TORCH_LOGS": "recompiles"},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = {r.data.params["arch"]: r for r in all_runs(workdir)}
    assert all(r.info.status == "FINISHED" for r in runs.values()) and len(runs) == 3
    assert runs["B"].data.params["init"] == "from_A"  # A's compiled checkpoint loaded into B
    assert "init from A: copied features.0" in out.stdout + out.stderr
    # Guards fail on train/eval and grad mode switches (a graph each), never on a batch's size,
    # and each cell starts from a reset Dynamo (its first recompile is numbered 0/1 again).
    reasons = [line for line in out.stderr.splitlines() if "__recompiles" in line and " - " in line]
    assert reasons and not [r for r in reasons if "size" in r or "stride" in r], reasons
    assert "recompile_limit" not in out.stderr and "cache_size_limit" not in out.stderr
    assert sum("[0/1] [__recompiles] Recompiling" in line for line in out.stderr.splitlines()) == 3

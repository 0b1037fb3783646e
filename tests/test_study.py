"""A tiny real study through the CLI: Hydra multirun -> MLflow -> report; a re-run adds nothing."""

import json
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vgg_ablation.tracking import archive

from .conftest import (
    TINY,
    all_runs,
    assert_children_of_one_study,
    cli_in_process,
    store_uri,
    study_runs,
)
from .test_archive import contents

pytestmark = pytest.mark.slow

STUDY = ["experiment=smoke", *TINY]  # archs A, B x seeds 0, 1


def test_tiny_study_then_rerun_skips_finished_cells(workdir, monkeypatch):
    first = cli_in_process(["study", *STUDY], workdir, monkeypatch)
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
    assert "Depth helps: B (13 layers) beats A (11)" in report and "interval the verdict used" in report
    assert "at most 5% (family-wise" in report and "not tested here (needs D and B in the study)" in report
    assert "digest `" in report and "(nan)" not in report
    assert "| A " in report and "| B " in report
    for plot in ("error-vs-depth", "learning-curves", "params-vs-error"):
        assert (workdir / "reports" / f"smoke-{plot}.png").stat().st_size > 1000

    # one cell's run as if recorded outside the study (a `train` of the same config): adopted
    client = MlflowClient(store_uri(workdir))
    client.delete_tag(runs[0].info.run_id, "mlflow.parentRunId")
    again = cli_in_process(["study", *STUDY], workdir, monkeypatch)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already FINISHED") == 4
    assert re.search(
        r"^\[4/4 · \d+m\d\ds\] B seed=1: already FINISHED \(run \w+\), skipped$", again.stdout, re.M
    )
    assert ": started" not in again.stdout and len(all_runs(workdir)) == 4
    # every cell FINISHED: nothing launched (no sweep folder), all four nested in the study again
    assert len(list((workdir / "multirun" / "smoke").iterdir())) == 1
    assert_children_of_one_study(workdir)


def test_report_for_a_study_with_no_runs_is_refused(workdir, monkeypatch):
    out = cli_in_process(["report", "experiment=smoke"], workdir, monkeypatch)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: no runs recorded for study 'smoke'")
    assert not (workdir / "reports").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["experiment=nope"],
            "unknown study 'nope'; choose one of: cifar10, cifar10-cpu, cifar10-cpu-paper, cifar10-cpu-probe, cifar10-gpu, imagenet, lrn-cpu, lrn-cpu-paper, sample, smoke",
        ),
        (["experiment=smoke", "study.seeds=[]"], "study.seeds is empty"),
        (["experiment=smoke", "study.archs=[A,Z]"], "unknown arch 'Z'"),
        # a newcomer pointing the sample study at their own images: said, not silently ignored
        (
            ["experiment=sample", "data.root=~/data/cifar10"],
            "data.root is not read by data=sample (the images in ",
        ),
    ],
)
def test_bad_study_refused_before_any_job(workdir, args, message, monkeypatch):
    out = cli_in_process(["study", *args], workdir, monkeypatch)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and message in out.stderr
    assert all_runs(workdir) == [] and not (workdir / "multirun").exists()


def test_deeper_nets_start_from_the_trained_a_of_their_seed(workdir, monkeypatch):
    out = cli_in_process(
        ["study", *STUDY, "model.init=from_A", "study.seeds=[0]", "study.archs=[A,A-LRN,B,B-5x5]"],
        workdir,
        monkeypatch,
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
    assert "not tested" not in claim4 and "fewer than 2 paired seeds" in claim4, claim4  # one seed
    assert runs["A-LRN"].data.params["init"] == "kaiming"  # as deep as A: from scratch, a fair test
    assert runs["A"].info.end_time <= runs["B"].info.start_time  # A trained first
    # A's first four convs land on B's block-1 conv 1, block-2 conv 1, block-3 convs 1 and 2, and the FCs
    assert (
        "init from A: copied features.0, features.5, features.10, features.12, classifier.0"
        in out.stdout + out.stderr
    )
    # in the study's own voice, like its other lines: k of N and the elapsed time first
    assert re.search(r"^\[\d+/\d+ · \d+m\d\ds\] B seed=0: init from A: copied", out.stdout, re.M), out.stdout


def test_a_compiled_from_a_study_loads_its_checkpoints_and_never_recompiles_for_shapes(workdir, monkeypatch):
    # aot_eager: Dynamo and AOTAutograd for real, without inductor's C++ build (slow on 2 cores)
    out = cli_in_process(
        ["study", *STUDY, "model.init=from_A", "study.seeds=[0]", "study.archs=[A,A-LRN,B]",
         "trainer.compile=true", "trainer.compile_backend=aot_eager",
         "trainer.limit_test_batches=1.0"],  # all 1,000 test images: a short last batch, padded
        workdir,
        monkeypatch,
        env={"TORCH_LOGS": "recompiles"},  # read by the sweep's process
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


@pytest.mark.long
def test_a_study_runs_until_decided_and_stops_the_decided_nets(workdir, monkeypatch):
    # Constructed through the margins, fixed before the runs: A-LRN vs A with a 50-point margin is
    # decided at the first look (its interval lies inside it), and A-LRN gets no more seeds; B vs A
    # with a 0.1-point margin cannot be decided on this budget, so A and B get the second look's
    # seeds and the study stops at its maximum.
    study = ["study", "experiment=smoke", "study.name=sequential", *TINY, "study.archs=[A,A-LRN,B]",
             "study.seeds=[0,1,2]", "study.max_seeds=5", "study.margins.lrn=50", "study.margins.depth=0.1",
             "study.futility=0"]  # fmt: skip  # no futility stop: B vs A goes on to the maximum
    out = cli_in_process([*study, "study.seeds_per_look=2"], workdir, monkeypatch)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    cells = sorted((r.data.params["arch"], int(r.data.params["seed"])) for r in all_runs(workdir))
    assert [s for a, s in cells if a == "A-LRN"] == [0, 1, 2]  # stopped after its first look
    assert [s for a, s in cells if a == "B"] == [0, 1, 2, 3, 4]
    assert "look 1 of at most 2: A, A-LRN, B get seeds 0-2 (3 per net)" in out.stdout
    assert "look 2 of at most 2: A, B get seeds 3-4 (5 per net)" in out.stdout
    assert "A-LRN vs A: 3 paired seeds" in out.stdout and "]: supported" in out.stdout
    assert "B vs A: 5 paired seeds" in out.stdout and "undecided at the maximum" in out.stdout
    report = (workdir / "reports" / "sequential.md").read_text()
    assert "### The looks" in report and "looks at 3, 5 seeds per net" in report
    claim1 = next(line for line in report.splitlines() if line.startswith("| 1 "))
    assert "**supported** (" in claim1 and (
        "50-point margin" in claim1 or "no difference of 50 points" in claim1
    ), claim1
    assert "A-LRN vs A: decided: stops" in report and "B vs A: undecided at the maximum" in report
    assert "Stopped: maximum reached." in report and "### Undecided comparisons" in report
    parent = study_runs(workdir)[0]
    assert parent.data.params["rule.horizon"] == "5" and parent.data.params["rule.comparisons"] == "2"
    looks = MlflowClient(store_uri(workdir)).download_artifacts(
        parent.info.run_id, "looks.json", str(workdir)
    )
    assert json.loads(Path(looks).read_text())["stages_done"] == 2
    # The same command again: nothing to train, the same verdicts; another rule is refused.
    again = cli_in_process([*study, "study.seeds_per_look=2"], workdir, monkeypatch)
    assert again.returncode == 0 and again.stdout.count("already FINISHED") == len(cells)
    assert len(all_runs(workdir)) == len(cells)
    report = (workdir / "reports" / "sequential.md").read_text()
    assert next(line for line in report.splitlines() if line.startswith("| 1 ")) == claim1
    other = cli_in_process([*study, "study.max_seeds=6", "study.seeds_per_look=3"], workdir, monkeypatch)
    assert (
        other.returncode == 2 and "was registered with another rule (seeds_per_look 2 -> 3)" in other.stderr
    )


def test_a_study_counts_as_finished_only_its_own_cells_runs(workdir):
    """What lets a study skip a launch (StudyRuns.finished_cells) is a FINISHED run of each cell's own
    key. A kaiming study of the same name shares its fingerprint with a from-A study's scratch-B
    control: its runs of A, B and B-5x5 must not pass for the from-A study's cells, or that study
    would launch nothing and never train."""
    from vgg_ablation.config import compose, study_overrides
    from vgg_ablation.study.cells import cell_cfg, cell_key, fingerprint, scratch_config
    from vgg_ablation.study.snapshot import StudyRuns
    from vgg_ablation.tracking import stores
    from vgg_ablation.training.build import arch_of

    uri = store_uri(workdir)
    base = ["experiment=smoke", "study.archs=[A,B,B-5x5]", f"logger.tracking_uri={uri}"]
    from_a = compose(study_overrides([*base, "model.init=from_A"]))
    kaiming = compose(study_overrides([*base, "model.init=kaiming"]))
    client = MlflowClient(uri)
    experiment = client.create_experiment(stores.experiment_name(from_a))

    def finished_run(cfg, arch: str, seed: int) -> None:
        cell = cell_cfg(cfg, arch, seed)
        tags = {"cell": cell_key(cell), "fingerprint": fingerprint(cell), "arch": arch, "seed": str(seed)}
        run_id = client.create_run(experiment, tags=tags).info.run_id
        params = {"arch": arch, "seed": seed, "depth": arch_of(arch).depth, "init": cfg.model.init}
        for key, value in params.items():
            client.log_param(run_id, key, value)
        client.log_metric(run_id, "test/err1", 0.5)
        client.log_metric(run_id, "time/seconds", 3.0)
        client.set_terminated(run_id, "FINISHED")

    def finished_cells(cfg):
        return StudyRuns.read(cfg).finished_cells()

    for arch in ("A", "B", "B-5x5"):
        for seed in (0, 1):
            finished_run(kaiming, arch, seed)
    assert finished_cells(kaiming).keys() == {(a, s) for a in ("A", "B", "B-5x5") for s in (0, 1)}
    assert finished_cells(from_a) == {}  # none of them is a cell of the from-A study
    finished_run(from_a, "B", 0)
    # The kaiming study's B runs are the from-A study's scratch-B control by key (a cell of
    # that control would find them too); its A and B-5x5 runs are still no cell of this study.
    assert finished_cells(from_a).keys() == {("B", 0), ("B (scratch)", 0), ("B (scratch)", 1)}
    finished_run(scratch_config(from_a), "B", 2)
    assert ("B (scratch)", 2) in finished_cells(from_a)


@pytest.mark.long
def test_with_init_from_a_the_selection_and_convergence_cells_train_a_first(workdir, monkeypatch):
    """Plain nets that start from the trained A (the sample's recipe): side by side, as a CPU study
    runs its cells, a deeper net's lr-selection or convergence cell once looked for its A before
    that A had finished, and failed ("init=from_A needs a FINISHED A run")."""
    study = ["study", "experiment=smoke", "study.name=froma", *TINY, "model.init=from_A", "study.parallel=auto",
             "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "study.seeds=[0,1]", "study.lr_grid=[0.002,0.05]",
             "study.lr_seeds=[1000]", "study.convergence_epochs=3", "study.convergence_seeds=1"]  # fmt: skip
    out = cli_in_process(study, workdir, monkeypatch)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "needs a FINISHED A run" not in out.stdout + out.stderr
    cells = [r for r in all_runs(workdir) if "cell" in r.data.tags]
    assert len(cells) == 4 + 4 + 2 and {r.info.status for r in cells} == {"FINISHED"}


def test_a_study_chooses_each_net_s_lr_checks_convergence_and_stops_a_futile_comparison(workdir, monkeypatch):
    # At a family-wise error of 1e-6, B vs A has no chance of a verdict by 3 seeds: after the
    # first look it stops as futile (the default threshold, 10%), and no second look is trained.
    study = ["study", "experiment=smoke", "study.name=fair", *TINY, "study.seeds=[0,1]", "study.max_seeds=3",
             "study.seeds_per_look=1", "study.alpha=0.000001", "study.lr_grid=[0.002,0.05]", "study.lr_seeds=[1000]",
             "study.convergence_epochs=3", "study.convergence_seeds=1", "trainer.limit_test_batches=1.0"]  # fmt: skip
    out = cli_in_process(study, workdir, monkeypatch)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "lr selection: A, B x lr 0.002,0.05 x seeds 1000 (4 cells to train, validation only)" in out.stdout
    chosen = dict(x.split() for x in out.stdout.split("lr per net (lowest mean validation error): ")[1]
                  .splitlines()[0].split(", "))  # fmt: skip
    assert set(chosen) == {"A", "B"} and set(chosen.values()) <= {"0.002", "0.05"}
    assert "convergence: A, B x seeds 0 at 3 epochs (validation only): 2 cells to train" in out.stdout
    assert "undecided: futile at this budget (chance of a verdict by 3 seeds: 0%)" in out.stdout
    cells = [r for r in all_runs(workdir) if "cell" in r.data.tags]
    tested = [r for r in cells if "test/err1" in r.data.metrics]
    others = [r for r in cells if r not in tested]
    assert sorted((r.data.params["arch"], r.data.params["seed"]) for r in tested) == [
        ("A", "0"), ("A", "1"), ("B", "0"), ("B", "1")]  # fmt: skip  # futile: no look 2
    assert all(r.data.params["lr"] == chosen[r.data.params["arch"]] for r in tested)  # each net at its own lr
    assert len(others) == 6 and not any(
        k.startswith("test/") for r in others for k in r.data.metrics
    )  # test set untouched
    assert sorted(r.data.params["epochs"] for r in others) == ["2", "2", "2", "2", "3", "3"]

    report = (workdir / "reports" / "fair.md").read_text()
    assert (
        "## Learning rate per net" in report
        and "**" in report.split("## Learning rate per net")[1].split("##")[0]
    )
    assert "## Did the nets converge?" in report and "converged at 2 epochs?" in report
    results = report.split("## Results per network")[1].split("##")[0].splitlines()
    header = [c.strip() for c in next(x for x in results if x.startswith("| net")).strip("|").split("|")]
    row_a = next(x for x in results if x.startswith("| [A]") or x.startswith("| A "))
    assert float(row_a.strip("|").split("|")[header.index("s / epoch")]) > 0  # from the epochs' records
    assert "### Undecided comparisons" in report and "chance of a verdict by 3 seeds" in report
    assert "lr per net A " in report and not re.search(r"\bnan\b", report, re.I)
    assert "Stopped: every comparison decided or stopped as futile." in report
    header = (workdir / "reports" / "fair-runs.csv").read_text().splitlines()[0]
    assert "attempts" in header and "origin_run" in header and "train_err1" in header

    # Its archive holds every run as it ended, and travels whole: the lr selection's and the
    # convergence check's runs parent their cells in the store it goes to as they did here
    made = workdir / "reports" / "fair-archive.tar.gz"
    with archive.opened(made) as opened:
        assert {r["status"] for r in opened.runs} == {"FINISHED"}, [
            (r["run_name"], r["status"]) for r in opened.runs
        ]
    moved = workdir / "moved"
    moved.mkdir()
    assert cli_in_process(["import", str(made)], moved, monkeypatch).returncode == 0
    back = cli_in_process(["export", *study[1:], "archive.out=back.tar.gz"], moved, monkeypatch)
    assert back.returncode == 0, back.stdout[-3000:] + back.stderr[-3000:]
    assert contents(moved / "back.tar.gz") == contents(made)

    again = cli_in_process(study, workdir, monkeypatch)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "lr selection:" not in again.stdout and ": started" not in again.stdout
    assert "0 cells to train" in again.stdout and again.stdout.count("already FINISHED") == 4
    assert len([r for r in all_runs(workdir) if "cell" in r.data.tags]) == 10


def test_a_cpu_study_fills_the_machine_a_cell_per_core_on_one_thread_each(workdir, monkeypatch):
    import os

    study = ["study", "experiment=smoke", *[a for a in TINY if a != "study.parallel=off"]]
    out = cli_in_process(study, workdir, monkeypatch)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (parent,) = study_runs(workdir)
    jobs = os.cpu_count() if (os.cpu_count() or 1) > 1 else 1
    assert parent.data.params["cells.threads"] == "1" and parent.data.params["cells.side_by_side"] == str(
        jobs
    )
    assert {r.data.tags["cpu_threads"] for r in all_runs(workdir)} == {"1"} and len(all_runs(workdir)) == 4
    # another thread count would sum in another order: the study keeps the one it has
    other = cli_in_process([*study, "trainer.threads=2"], workdir, monkeypatch)
    assert (
        other.returncode == 2 and "trained its cells with another setting (threads 1 -> 2; " in other.stderr
    )
    assert parent.data.params["cells.device"] == "cpu" and parent.data.params["cells.precision"] == "32-true"


def test_a_study_registered_on_a_gpu_is_not_continued_on_a_cpu_nor_the_other_way(monkeypatch):
    # The same config (accelerator and precision "auto": the same cell keys) computes in bf16 on
    # a GPU and in fp32 on a CPU: the study keeps the device and precision it registered
    import torch

    from vgg_ablation.config import compose
    from vgg_ablation.errors import UserError
    from vgg_ablation.runner.study import cells_setting, check_cells_setting

    cfg = compose(["experiment=smoke", "trainer.threads=1"])
    here = cells_setting(cfg)
    assert (here["cells.device"], here["cells.precision"]) == ("cpu", "32-true")  # this machine: no GPU
    check_cells_setting(cfg, here)  # its own setting: continued
    check_cells_setting(cfg, {"cells.threads": "1"})  # registered before device and precision were kept
    on_a_gpu = {**here, "cells.device": "gpu", "cells.precision": "bf16-mixed"}
    with pytest.raises(UserError, match=r"\(device gpu -> cpu; precision bf16-mixed -> 32-true\): .* "
                                        r"trainer.threads=1 .*, on a machine with a GPU$"):  # fmt: skip
        check_cells_setting(cfg, on_a_gpu)
    # and this CPU study continued where a GPU is seen (the only thing pretended here)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UserError, match=r"\(device cpu -> gpu; precision 32-true -> bf16-mixed\): .*, on a "
                                        r"CPU \(CUDA_VISIBLE_DEVICES= hides this machine's GPUs\)$"):  # fmt: skip
        check_cells_setting(cfg, here)


def test_the_lrn_study_opts_into_its_three_way_claim_and_its_rescaling_control(workdir, monkeypatch):
    study = ["study", "experiment=smoke", "study.name=lrn3", *TINY, "study.archs=[A,A-LRN,A-LRN0]",
             "study.claims=[lrn-three-way]", "model.lrn_scale=paper"]  # fmt: skip
    out = cli_in_process(study, workdir, monkeypatch)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = (workdir / "reports" / "lrn3.md").read_text()
    assert "split evenly over the 2 comparisons" in report  # A-LRN vs A (three-way) and vs A-LRN0
    assert "LRN does not help: A-LRN neither beats A nor matters (three-way)" in report
    assert "A-LRN vs A-LRN0 (alpha 0, its rescaling only)" in report
    assert "A-LRN is no better than A" not in report  # the claim it replaces is not tested twice
    assert "| A-LRN0 |" in report and "rescaling only (alpha = 0: the control, by design)" in report
    bad = cli_in_process([*study[:-2], "study.claims=[lrn-sideways]"], workdir, monkeypatch)
    assert (
        bad.returncode == 2
        and "unknown study.claims 'lrn-sideways'; choose from: lrn-three-way" in bad.stderr
    )

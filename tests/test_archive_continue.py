"""Studies that travel, mid-way: a cell killed mid-training carried with its checkpoint, and a
run-until-decided study stopped after its first look, each continued in another folder and store."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vgg_ablation.tracking import archive

from .conftest import TINY, all_runs, cli_in_process, store_uri
from .test_reliability import LONGER, popen_cli, sigkill_mid_cell

pytestmark = pytest.mark.slow

STUDY = ["experiment=smoke", *TINY]


@pytest.mark.long
def test_a_cell_killed_mid_training_travels_with_its_checkpoint_and_resumes_elsewhere_as_if_never_stopped(
    workdir, tmp_path, monkeypatch
):
    study = ["study", "experiment=smoke", *LONGER]
    victim = sigkill_mid_cell(study, workdir)
    out = cli_in_process(["export", *study[1:], "archive.checkpoints=true", "archive.out=moving.tar.gz"],
                         workdir, monkeypatch)  # fmt: skip
    assert out.returncode == 0, out.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # imported with checkpoints kept apart from where the study's cells write theirs
    done = cli_in_process(["import", str(workdir / "moving.tar.gz"), f"checkpoint_root={tmp_path / 'imported'}"],
                          elsewhere, monkeypatch)  # fmt: skip
    assert done.returncode == 0 and "1 cell RUNNING when exported arriving KILLED" in done.stdout, done.stdout
    (moved,) = [r for r in all_runs(elsewhere) if r.data.tags.get(archive.ORIGIN_TAG) == victim.info.run_id]
    assert moved.info.status == "KILLED" and "arrived KILLED" in moved.data.tags[archive.IMPORT_NOTE_TAG]
    assert (tmp_path / "imported" / moved.info.run_id / "last.ckpt").is_file()

    again = cli_in_process(study, elsewhere, monkeypatch)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    here = elsewhere / "checkpoints" / moved.info.run_id  # brought to where the study writes, and read there
    assert f"resume {victim.data.tags['cell']}: run {moved.info.run_id} from {here}/last.ckpt" in again.stdout
    # its best epoch, from before the kill, still counts: the checkpoints' old folder mapped onto the new
    assert "dirpath has changed" not in again.stdout + again.stderr
    runs = all_runs(elsewhere)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)  # none doubled
    assert {r.data.tags["checkpoint_dir"] for r in runs if r.info.run_id == moved.info.run_id} == {str(here)}

    # The same study, never stopped: the resumed cell recorded exactly what it records (the same
    # batches, augmentations and dropout draws after the resume as before)
    never_stopped = tmp_path / "never-stopped"
    never_stopped.mkdir()
    whole = cli_in_process(study, never_stopped, monkeypatch)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]

    def curves(folder: Path, cell: str) -> dict:
        # Each (epoch, value) once: a kill between an epoch's records and its checkpoint (a few ms)
        # has the resumed cell train that epoch again and record it again, with the same values
        client = MlflowClient(store_uri(folder))
        (run,) = [r for r in all_runs(folder) if r.data.tags["cell"] == cell]
        return {k: sorted({(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)})
                for k in run.data.metrics if not k.startswith(("time/", "system/"))}  # fmt: skip

    resumed, uninterrupted = (
        curves(elsewhere, victim.data.tags["cell"]),
        curves(never_stopped, victim.data.tags["cell"]),
    )
    assert "test/acc1" in resumed and len(resumed["val/acc1"]) == 6
    assert resumed == uninterrupted


@pytest.mark.long
def test_a_study_stopped_after_its_first_look_continues_elsewhere_to_the_uninterrupted_verdict(
    tmp_path, monkeypatch
):
    # B vs A at a family-wise error of 1e-6 cannot be decided on 2 or 3 seeds (its interval spans
    # tens of points): every look is taken
    study = ["study", *STUDY, "study.name=travels", "study.seeds=[0,1]", "study.max_seeds=3",
             "study.seeds_per_look=1", "study.alpha=0.000001", "study.futility=0",
             "trainer.limit_test_batches=1.0"]  # fmt: skip  # all 1,000 test images: no two differences alike
    first = tmp_path / "first"
    first.mkdir()
    proc = popen_cli(study, first)
    for line in proc.stdout:  # the archive written after look 1, then a Ctrl-C
        if line.startswith("archive: reports/travels-archive.tar.gz"):
            proc.send_signal(signal.SIGINT)
            break
    proc.stdout.read()
    assert proc.wait(120) == 130
    elsewhere, uninterrupted = tmp_path / "elsewhere", tmp_path / "uninterrupted"
    elsewhere.mkdir()
    uninterrupted.mkdir()
    moved = cli_in_process(["import", str(first / "reports/travels-archive.tar.gz")], elsewhere, monkeypatch)
    assert moved.returncode == 0 and "add 5 runs (1 study run, 4 other)" in moved.stdout, moved.stdout
    go_on = cli_in_process(study, elsewhere, monkeypatch)
    assert go_on.returncode == 0, go_on.stdout[-3000:] + go_on.stderr[-3000:]
    assert go_on.stdout.count("already FINISHED") == 4 and go_on.stdout.count(": started") == 2, go_on.stdout
    whole = cli_in_process(study, uninterrupted, monkeypatch)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]

    def verdicts(folder: Path) -> list[str]:
        report = (folder / "reports/travels.md").read_text().splitlines()
        return [x for x in report if re.match(r"\| (\d|B vs A|\d{1,3} )", x)]  # claims, looks, seeds

    assert verdicts(elsewhere) == verdicts(uninterrupted) and len(verdicts(elsewhere)) >= 7 + 2 + 3

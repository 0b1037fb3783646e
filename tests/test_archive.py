"""Studies that travel: export, import, merge, continue, on real stores (SQLite here; the lab
server's round trip is in test_lab.py). Every refusal is one line, and leaves the store as it was."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vgg_ablation.errors import UserError
from vgg_ablation.tracking import archive

from .conftest import TINY, all_runs, cli_in_process, store_uri, study_runs

pytestmark = pytest.mark.slow

STUDY = ["experiment=smoke", *TINY]  # archs A, B; the seeds are each test's


def snapshot(folder: Path) -> list[tuple]:
    """Every run of the folder's default store as data: what an export must leave as it was."""
    client = MlflowClient(store_uri(folder))
    out = []
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            histories = {k: [(m.step, m.timestamp, m.value) for m in client.get_metric_history(run.info.run_id, k)]
                         for k in sorted(run.data.metrics)}  # fmt: skip
            out.append((run.info.run_id, run.info.status, run.info.start_time, run.info.end_time,
                        sorted(run.data.params.items()), sorted(run.data.tags.items()), histories))  # fmt: skip
    return sorted(out)


def contents(path: Path) -> dict:
    """An archive's runs keyed by origin, run ids replaced by origins: what must survive a trip
    (the origin tag and the ids themselves are what a trip changes)."""
    with archive.opened(path) as opened:
        by_id = {r["run_id"]: archive.origin(r["run_id"], r["tags"]) for r in opened.runs}
        out = {}
        for r in opened.runs:
            tags = {
                k: v for k, v in r["tags"].items() if k not in (archive.ORIGIN_TAG, archive.CHECKPOINT_TAG)
            }
            if "mlflow.parentRunId" in tags:
                tags["mlflow.parentRunId"] = by_id[tags["mlflow.parentRunId"]]
            folder = opened.folder / "runs" / r["run_id"]
            files = {
                p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in folder.rglob("*") if p.is_file() and p.name != "run.json"
            }  # fmt: skip
            rest = {k: v for k, v in r.items() if k not in ("run_id", "tags")}
            out[by_id[r["run_id"]]] = {**rest, "tags": tags, "files": files}
        return out


@pytest.fixture(scope="module")
def machines(tmp_path_factory):
    """A smoke study's cells trained on two machines: seed 0 on one, seed 1 on the other, each in
    its own folder and store, each study writing its archive beside its report."""
    made = {}
    with pytest.MonkeyPatch.context() as mp:
        for name, seed in (("one", 0), ("two", 1)):
            folder = tmp_path_factory.mktemp(name)
            out = cli_in_process(["study", *STUDY, f"study.seeds=[{seed}]"], folder, mp)
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
            assert "archive: reports/smoke-archive.tar.gz (3 runs; `vgg-ablation import" in out.stdout
            made[name] = folder
    return made


def test_round_trip_keeps_everything_but_run_ids_and_a_second_import_adds_nothing(
    machines, tmp_path, monkeypatch
):
    one = machines["one"]
    before = snapshot(one)
    exported = cli_in_process(["export", *STUDY, "archive.out=whole.tar.gz", "archive.system_metrics=true"],
                              one, monkeypatch)  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert re.search(r"exported study smoke \(from sqlite:///.*\): 3 runs, [\d.]+ kB, in [\d.]+ s: whole.tar.gz",
                     exported.stdout), exported.stdout  # fmt: skip
    assert snapshot(one) == before  # the store read, never changed
    first = contents(one / "whole.tar.gz")
    assert any(k.startswith("system/") for r in first.values() for k in r["metrics"])  # asked for: there
    assert all(len(h) == 2 for r in first.values() for k, h in r["metrics"].items() if k == "val/acc1")
    assert not any(k.startswith("system/") for r in contents(one / "reports/smoke-archive.tar.gz").values()
                   for k in r["metrics"])  # fmt: skip  # not by default

    dry = cli_in_process(["import", str(one / "whole.tar.gz"), "--dry-run"], tmp_path, monkeypatch)
    assert dry.returncode == 0 and "would add 3 runs (1 study run, 2 other); skip 0" in dry.stdout, dry.stdout
    assert not (tmp_path / "mlflow.db").exists() or all_runs(tmp_path) == []
    done = cli_in_process(["import", str(one / "whole.tar.gz")], tmp_path, monkeypatch)
    assert done.returncode == 0 and "add 3 runs (1 study run, 2 other); skip 0" in done.stdout, done.stderr
    again = cli_in_process(["import", str(one / "whole.tar.gz")], tmp_path, monkeypatch)
    assert again.returncode == 0 and "add 0 runs" in again.stdout and "skip 3" in again.stdout
    assert len(all_runs(tmp_path)) == 2 and len(study_runs(tmp_path)) == 1  # nothing twice

    back = cli_in_process(
        ["export", *STUDY, "archive.out=back", "archive.system_metrics=true"], tmp_path, monkeypatch
    )
    assert back.returncode == 0, back.stderr
    assert (tmp_path / "back" / "manifest.json").is_file()  # a folder, for a name without .tar.gz
    assert contents(tmp_path / "back") == first  # times, histories, inputs, artifacts: all there

    # The same report from the imported store: its verdicts, seeds and times (links and the date aside)
    args = ["report", *STUDY, "study.seeds=[0]"]
    assert cli_in_process(args, tmp_path, monkeypatch).returncode == 0
    assert cli_in_process(args, one, monkeypatch).returncode == 0

    def text(folder: Path) -> list[str]:
        lines = (folder / "reports" / "smoke.md").read_text().splitlines()
        return [re.sub(r"runs/\w+\?|run \w+|`\w{8}`|\d{4}-\d\d-\d\d \d\d:\d\d \w+", "", x) for x in lines]

    assert text(tmp_path) == text(one)
    assert (tmp_path / "reports/smoke-runs.csv").read_text().count("\n") == 3


def test_two_machines_cells_merge_into_one_study_and_a_conflict_is_refused(machines, tmp_path, monkeypatch):
    archives = [str(machines[m] / "reports/smoke-archive.tar.gz") for m in ("one", "two")]
    done = cli_in_process(["import", *archives], tmp_path, monkeypatch)
    assert done.returncode == 0, done.stderr
    assert "skip study run" in done.stdout and "merged into this store's run of the same study" in done.stdout
    (parent,) = study_runs(tmp_path)
    cells = all_runs(tmp_path)
    assert sorted((r.data.tags["arch"], r.data.tags["seed"]) for r in cells) == [
        ("A", "0"), ("A", "1"), ("B", "0"), ("B", "1")]  # fmt: skip
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in cells)
    report = cli_in_process(["report", *STUDY], tmp_path, monkeypatch)  # the smoke study's seeds 0, 1
    assert report.returncode == 0, report.stderr
    assert "| seeds per net | A 2, B 2 " in (tmp_path / "reports/smoke.md").read_text()

    # One machine's A seed=0 now says something else: the same cell FINISHED twice, differently
    one = machines["one"]
    client = MlflowClient(store_uri(one))
    (a0,) = [r for r in all_runs(one) if r.data.tags["arch"] == "A"]
    altered = tmp_path / "altered"
    shutil.copytree(one, altered)
    client = MlflowClient(store_uri(altered))
    client.log_metric(a0.info.run_id, "test/err1", 0.123, step=99)  # its latest value
    client.set_tag(a0.info.run_id, archive.ORIGIN_TAG, "another-machine")  # not the run merged above
    assert (
        cli_in_process(["export", *STUDY, "archive.out=altered.tar.gz"], altered, monkeypatch).returncode == 0
    )
    before = snapshot(tmp_path)
    refused = cli_in_process(["import", str(altered / "altered.tar.gz")], tmp_path, monkeypatch)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert re.match(r"error: cell smoke/sample/A/seed=0/\w+ FINISHED with different results here \(run \w+, "
                    r"test error [\d.]+%\) and in archive .*altered.tar.gz \(run \w+, 12.30%\): keep one", refused.stderr)  # fmt: skip
    assert snapshot(tmp_path) == before


def damaged_copies(source: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """An archive spoilt in each way an import must refuse, and the refusal's words."""
    folder = tmp / "folder"
    with tarfile.open(source) as tar:
        tar.extractall(folder, filter="data")
    made = {}
    changed = shutil.copytree(folder, tmp / "changed")
    # one byte changed in a run that finished (the listing's order is the filesystem's, and a
    # run with no "FINISHED" in it would stay unchanged)
    run_json = next(p for p in sorted(changed.glob("runs/*/run.json")) if '"FINISHED"' in p.read_text())
    run_json.write_text(run_json.read_text().replace('"FINISHED"', '"FAILED"', 1))
    made["checksum"] = (changed, "does not match its checksum (damaged); nothing imported")
    short = shutil.copytree(folder, tmp / "short")
    next(short.glob("runs/*/run.json")).unlink()
    made["missing file"] = (short, "is cut short: runs/")
    cut = tmp / "cut.tar.gz"
    cut.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    made["cut short"] = (cut, "is damaged or cut short")
    newer = shutil.copytree(folder, tmp / "newer")
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "format_version": 9}))
    made["newer format"] = (newer, "is format version 9; this vgg-ablation (0.1.0) reads version 1")
    foreign = tmp / "foreign.tar.gz"
    with tarfile.open(foreign, "w:gz") as tar:
        tar.add(folder / "manifest.json", arcname="notes.json")
    made["foreign"] = (foreign, "is not a vgg-ablation study archive (no manifest.json)")
    for name, member in (("climbs out", "../escaped.txt"), ("link", "runs/x")):
        path = tmp / f"{name}.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            tar.add(folder / "manifest.json", arcname="manifest.json")
            info = tarfile.TarInfo(member)
            if name == "link":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = 3
                tar.addfile(info, io.BytesIO(b"bad"))
        made[name] = (path, "a path that climbs out of it" if name == "climbs out" else "a link or device")
    return made


def test_a_damaged_or_foreign_archive_is_refused_in_one_line_and_imports_nothing(
    machines, tmp_path, monkeypatch
):
    dest = tmp_path / "dest"
    dest.mkdir()
    for why, (path, words) in damaged_copies(
        machines["one"] / "reports/smoke-archive.tar.gz", tmp_path
    ).items():
        out = cli_in_process(["import", str(path)], dest, monkeypatch)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, (why, out.stderr)
        assert out.stderr.startswith("error: ") and words in out.stderr, (why, out.stderr)
        assert all_runs(dest) == [] and study_runs(dest) == [], why
    assert not (tmp_path / "escaped.txt").exists()


def test_a_destination_registered_with_another_rule_or_config_is_refused(machines, tmp_path, monkeypatch):
    source = str(machines["one"] / "reports/smoke-archive.tar.gz")
    with archive.opened(Path(source)) as opened:
        (entry,) = opened.manifest["studies"]
    for change, words in (
        (
            {"rule.alpha": "0.01"},
            "is registered here with another rule (alpha 0.01 here, None in the archive)",
        ),
        ({}, "is registered here with another config (fingerprint 000000000000, the archive's"),
    ):
        dest = tmp_path / str(len(change))
        dest.mkdir()
        client = MlflowClient(store_uri(dest))
        experiment = client.create_experiment("vgg-ablation/smoke")
        key = entry["key"] if change else "smoke/000000000000"
        run = client.create_run(experiment, tags={"study_run": key}).info.run_id
        for k, v in change.items():
            client.log_param(run, k, v)
        before = snapshot(dest)
        out = cli_in_process(["import", source], dest, monkeypatch)
        assert out.returncode == 2 and words in out.stderr and out.stderr.count("\n") == 1, out.stderr
        assert snapshot(dest) == before


def test_an_import_stopped_midway_leaves_nothing_and_the_next_one_is_whole(machines, tmp_path, monkeypatch):
    source = machines["one"] / "reports/smoke-archive.tar.gz"
    client = MlflowClient(store_uri(tmp_path))
    calls = []
    real = MlflowClient.log_batch

    def failing(self, run_id, *args, **kwargs):  # the store goes away after a few writes
        calls.append(run_id)
        if len(calls) > 6:
            raise KeyboardInterrupt
        return real(self, run_id, *args, **kwargs)

    with archive.opened(source) as opened, monkeypatch.context() as mp:
        plan = archive.plan_import(client, opened)
        mp.setattr(MlflowClient, "log_batch", failing)
        with pytest.raises(KeyboardInterrupt):
            archive.write_plan(client, plan, tmp_path / "checkpoints")
    assert len(set(calls)) >= 2  # it was midway: a run written whole, another begun
    assert all_runs(tmp_path) == [] and study_runs(tmp_path) == []
    # A run a killed import left behind (no rollback ran): invisible to a study, removed next time
    experiment = client.get_experiment_by_name("vgg-ablation/smoke").experiment_id
    left = client.create_run(experiment, tags={archive.PENDING_TAG: "1", "arch": "A"}).info.run_id
    out = cli_in_process(["import", str(source)], tmp_path, monkeypatch)
    assert out.returncode == 0 and "remove 1 run(s) an interrupted import left unfinished" in out.stdout
    assert client.get_run(left).info.lifecycle_stage == "deleted"
    assert len(all_runs(tmp_path)) == 2 and len(study_runs(tmp_path)) == 1


def test_a_cell_that_finished_elsewhere_comes_back_beside_the_attempt_that_stopped_here(
    machines, tmp_path, monkeypatch
):
    # This store saw A seed=0 stop (KILLED); its archive went to another machine, where the cell
    # finished under the same origin: importing that machine's archive brings the result back.
    stopped_here = shutil.copytree(machines["one"], tmp_path / "here")
    client = MlflowClient(store_uri(stopped_here))
    (a0,) = [r for r in all_runs(stopped_here) if r.data.tags["arch"] == "A"]
    client.set_terminated(a0.info.run_id, "KILLED")
    finished_there = machines["one"] / "reports/smoke-archive.tar.gz"
    done = cli_in_process(["import", str(finished_there)], stopped_here, monkeypatch)
    assert done.returncode == 0 and "add 1 run (0 study runs, 1 other)" in done.stdout, done.stdout
    runs = [r for r in all_runs(stopped_here) if r.data.tags["arch"] == "A"]
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]
    again = cli_in_process(["import", str(finished_there)], stopped_here, monkeypatch)
    assert again.returncode == 0 and "add 0 runs" in again.stdout, again.stdout  # nothing twice


def test_a_store_rebuilt_from_a_runs_csv_written_after_an_import_keeps_the_first_ids(
    machines, tmp_path, monkeypatch
):
    # machine one's study imported into a second store, whose report's CSV is all that survives
    # it: the archive rebuilt from that CSV names the runs by the ids machine one gave them
    firsts = {r.data.tags["cell"]: r.info.run_id for r in all_runs(machines["one"])}
    second, third = tmp_path / "second", tmp_path / "third"
    second.mkdir(), third.mkdir()
    assert cli_in_process(["import", str(machines["one"] / "reports/smoke-archive.tar.gz")], second,
                          monkeypatch).returncode == 0  # fmt: skip
    assert cli_in_process(["report", *STUDY, "study.seeds=[0]"], second, monkeypatch).returncode == 0
    rebuilt = cli_in_process(["export", *STUDY, "study.seeds=[0]", "archive.from_csv=reports/smoke-runs.csv",
                              f"archive.out={tmp_path / 'rebuilt.tar.gz'}"], second, monkeypatch)  # fmt: skip
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert cli_in_process(["import", str(tmp_path / "rebuilt.tar.gz")], third, monkeypatch).returncode == 0
    assert {r.data.tags["cell"]: r.data.tags[archive.ORIGIN_TAG] for r in all_runs(third)} == firsts
    back = cli_in_process(["import", str(tmp_path / "rebuilt.tar.gz")], machines["one"], monkeypatch)
    assert back.returncode == 0 and "add 0 runs" in back.stdout, back.stdout  # the same runs: nothing twice


def test_two_finished_copies_of_a_cell_without_a_test_merge_when_they_agree(tmp_path):
    # The lr selection's and the convergence check's cells train without a test: their copies
    # from two machines are compared on their best validation accuracy
    client = MlflowClient(store_uri(tmp_path))
    experiment = client.create_experiment("vgg-ablation/x")
    run = client.create_run(experiment, tags={"cell": "x/A/seed=0"})
    client.log_metric(run.info.run_id, "val/acc1_best", 0.5)
    client.set_terminated(run.info.run_id, "FINISHED")
    ours = [client.get_run(run.info.run_id)]

    def record(value: float) -> dict:
        return {"run_id": "elsewhere", "status": "FINISHED", "tags": {"cell": "x/A/seed=0"},
                "metrics": {"val/acc1_best": [[0, 0, value]]}}  # fmt: skip

    assert "the same result is already here" in archive._cell_here(record(0.5), ours, tmp_path)
    with pytest.raises(UserError, match="FINISHED with different results here"):
        archive._cell_here(record(0.6), ours, tmp_path)


@pytest.mark.parametrize(
    "study", ["cifar10-cpu", "lrn-cpu", "sample", "cifar10-cpu-probe", "cifar10-cpu-paper"]
)
def test_a_committed_study_s_archive_reproduces_its_committed_report(study, tmp_path, monkeypatch):
    """Anyone can re-analyse a committed study: its archive into an empty store, then `report`
    (without its data: the digest its runs recorded names it) gives the committed tables."""
    reports = Path(__file__).resolve().parent.parent / "reports"
    assert (
        cli_in_process(["import", str(reports / f"{study}-archive.tar.gz")], tmp_path, monkeypatch).returncode
        == 0
    )
    out = cli_in_process(["report", f"experiment={study}"], tmp_path, monkeypatch)
    assert out.returncode == 0, out.stderr

    def tables(path: Path) -> list[str]:  # the claims, the looks, the seeds (numbers and verdicts)
        return [x for x in path.read_text().splitlines() if re.match(r"\| (\d |[A-Z][\w-]* vs |\d{3} )", x)]

    assert tables(tmp_path / "reports" / f"{study}.md") == tables(reports / f"{study}.md") != []

"""Studies that travel: a study's runs out of one MLflow store into one self-describing archive
(`vgg-ablation export`), and from there into any other store (`vgg-ablation import`).

MLflow has no way to copy a run between stores, so this is written on `MlflowClient` alone (no
new dependency; the databricks export-import package cannot write to SQLite, resets every run's
times and duplicates runs imported twice). What the project adds is that it knows what a run is:
a study run by its key (`study_run` tag: name and config fingerprint), a cell by its `cell` tag,
and every run by its origin (the id it was first recorded under, kept in the `origin_run` tag).

The archive, a folder or the same folder as one .tar.gz:

    manifest.json                      format and versions, the study (its config, fingerprint and
                                       registered rule), what it holds and lacks, a sha256 per file
    runs/<run id>/run.json             name, status, start and end times, params, tags, dataset
                                       inputs, and every metric's full history (step, time, value)
    runs/<run id>/artifacts/...        its artifacts (the study's report, a trained A's weights)
    runs/<run id>/checkpoints/...      an unfinished cell's checkpoints, when asked for

Importing keeps each run's times and adds nothing twice: a run whose origin is already in the
store is skipped, a study run joins the destination's run of the same key (two archives of one
study merge), a cell FINISHED on both sides must agree. Everything is checked before anything is
written (the archive's checksums and paths, the destination's registered rule), and the runs an
import writes carry none of the tags a study finds them by until each is whole: an import cut
short leaves nothing a study or a report would read, and the next import removes it.

About 550 lines, one concern: the archive's format, both directions, in the order a run travels
(read from a store, written to disk; read from disk, checked, written to a store).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import math
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from vgg_ablation import __version__
from vgg_ablation.errors import UserError
from vgg_ablation.files import atomic_write, replace_folder
from vgg_ablation.tracking import stores

FORMAT = "vgg-ablation study archive"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ORIGIN_TAG = "origin_run"  # the run id a run was first recorded under, in whichever store
PENDING_TAG = "import_pending"  # on a run an import is still writing: removed last, with the rest
IMPORT_NOTE_TAG = "import_note"  # what an import changed about a run (a RUNNING one arrives KILLED)
REBUILT_TAG = "rebuilt_from"  # a run rebuilt from a report's runs CSV (its store was lost)
# The tags a study, a report or the dashboard find a run by: set last, once the run is whole.
FINDING_TAGS = ("cell", "fingerprint", stores.STUDY_RUN_TAG, stores.PARENT_TAG)
CHECKPOINT_TAG = "checkpoint_dir"
SYSTEM_PREFIX = "system/"
# MLflow's limits on one log_batch call
PARAMS_PER_BATCH, METRICS_PER_BATCH = 100, 1000


def origin(run_id: str, tags: dict) -> str:
    return tags.get(ORIGIN_TAG) or run_id


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def all_runs(client, experiment_id: str) -> list:
    """Every live run of an experiment (MLflow pages them 1,000 at a time)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])  # fmt: skip
        runs += list(page)
        token = page.token
        if not token:
            return runs


# -- export: a store's study onto disk -------------------------------------------------------------------
@dataclass
class Exported:
    path: Path
    runs: int
    size: int  # bytes on disk
    seconds: float
    unsent: list[Path] = field(default_factory=list)  # outboxes of dead runs holding what the store lacks


def export_study(client, study: str, out: Path, checkpoints: bool = False, system_metrics: bool = False,
                 source: str = "") -> Exported:  # fmt: skip
    """Every run of study `study` (MLflow experiment vgg-ablation/<study>) into an archive at `out`
    (a .tar.gz, or a folder for any other name). Reads the store; never changes it."""
    started = time.time()
    experiment = client.get_experiment_by_name(stores.EXPERIMENT_PREFIX + study)
    if experiment is None:
        raise UserError(f"no study {study!r} in {source or client.tracking_uri}: nothing to export "
                        f"(its runs would be in MLflow experiment {stores.EXPERIMENT_PREFIX}{study})")  # fmt: skip
    runs = all_runs(client, experiment.experiment_id)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        folder = Path(tmp) / "archive"
        for run in runs:
            _export_run(client, run, folder / "runs" / run.info.run_id, checkpoints, system_metrics)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "study": study,
            "experiment": experiment.name,
            "experiment_tags": {k: v for k, v in experiment.tags.items() if not k.startswith("mlflow.sharedViewState")},
            "studies": [_study_entry(client, r) for r in runs if stores.STUDY_RUN_TAG in r.data.tags],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": {"vgg-ablation": __version__, "mlflow": _mlflow_version()},
            "source": source,
            "holds": {"runs": len(runs), "metric_histories": True, "artifacts": True,
                      "system_metrics": system_metrics, "checkpoints": checkpoints},
            "rebuilt": sorted({r.data.tags[REBUILT_TAG] for r in runs if REBUILT_TAG in r.data.tags}),
        }  # fmt: skip
        if manifest["rebuilt"]:
            manifest["lacks"] = REBUILT_LACKS
        manifest["files"] = {
            p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if out.name.endswith((".tar.gz", ".tgz")):
            atomic_write(out, lambda p: _write_tar(folder, p))
        else:
            replace_folder(folder, out)
    size = (
        out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    )
    return Exported(out, len(runs), size, time.time() - started, _unsent(runs))


def _unsent(runs) -> list[Path]:
    """The outboxes of dead runs that hold records their store never received (it was away when
    they ended): an archive carries the store's runs, not these; the study's command, or
    `vgg-ablation sync`, sends them first."""
    from vgg_ablation.tracking.outbox import leftover_journal

    return [j.path for j in map(leftover_journal, runs) if j is not None and j.unsent()]


def _export_run(client, run, folder: Path, checkpoints: bool, system_metrics: bool) -> None:
    info, data = run.info, run.data
    metrics = {}
    for key in sorted(data.metrics):
        if key.startswith(SYSTEM_PREFIX) and not system_metrics:
            continue
        history = client.get_metric_history(info.run_id, key)
        metrics[key] = sorted([m.step, m.timestamp, m.value] for m in history)
    record = {
        "run_id": info.run_id,
        "run_name": info.run_name,
        "status": info.status,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "user_id": info.user_id,
        "params": dict(data.params),
        "tags": dict(data.tags),
        "inputs": [_input_record(i) for i in (run.inputs.dataset_inputs if run.inputs else [])],
        "metrics": {k: [[s, t, _number(v)] for s, t, v in h] for k, h in metrics.items()},
    }
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(record, sort_keys=True) + "\n")
    if client.list_artifacts(info.run_id):
        (folder / "artifacts").mkdir()
        client.download_artifacts(info.run_id, "", str(folder / "artifacts"))
    kept = Path(data.tags.get(CHECKPOINT_TAG, "/nonexistent"))
    if checkpoints and info.status != "FINISHED" and kept.is_dir():
        for ckpt in sorted(kept.glob("*.ckpt")):
            (folder / "checkpoints").mkdir(exist_ok=True)
            shutil.copy2(ckpt, folder / "checkpoints" / ckpt.name)


def _number(value: float):
    """JSON has no NaN or infinity: they travel as strings (a diverged run's loss is one)."""
    return value if math.isfinite(value) else str(value)


def _input_record(dataset_input) -> dict:
    ds = dataset_input.dataset
    return {
        "name": ds.name, "digest": ds.digest, "source_type": ds.source_type, "source": ds.source,
        "schema": ds.schema, "profile": ds.profile, "tags": {t.key: t.value for t in dataset_input.tags},
    }  # fmt: skip


def _study_entry(client, run) -> dict:
    """A study run, as the manifest names it: its key, fingerprint, registered rule and config."""
    params = run.data.params
    config = ""
    with contextlib.suppress(Exception):  # a study run made before configs were attached has none
        config = client.download_artifacts(run.info.run_id, "config.yaml", tempfile.mkdtemp())
        config = Path(config).read_text()
    return {
        "run": run.info.run_id,
        "key": run.data.tags[stores.STUDY_RUN_TAG],
        "fingerprint": params.get("fingerprint", ""),
        "rule": {k: v for k, v in sorted(params.items()) if k.startswith("rule.")},
        "config": config,
    }


def _write_tar(folder: Path, path: Path) -> None:
    """The folder as a .tar.gz whose bytes depend only on its files (sorted, no owners, no
    times): the same study exported twice is the same archive."""

    def plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        return info

    with (
        path.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as zipped,
        tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for p in sorted(folder.rglob("*")):
            tar.add(p, arcname=p.relative_to(folder).as_posix(), recursive=False, filter=plain)


def _mlflow_version() -> str:
    import mlflow

    return mlflow.__version__


# -- reading an archive: everything checked before anything is written -----------------------------------
@dataclass
class Archive:
    path: Path
    folder: Path
    manifest: dict
    runs: list[dict]  # run.json of each, in the archive's order (study runs are found by tag)

    @property
    def study(self) -> str:
        return self.manifest["study"]


@contextlib.contextmanager
def opened(path: Path) -> Iterator[Archive]:
    """The archive at `path`, unpacked (a .tar.gz) into a temporary folder and checked: its format,
    every file against the manifest's checksum, nothing missing, nothing added, no path that
    leaves the archive. Refused in one line otherwise."""
    path = Path(path).expanduser()
    if path.is_dir():
        yield _checked(path, path)
        return
    if not path.is_file():
        raise UserError(f"no archive at {path}")
    with tempfile.TemporaryDirectory(prefix="vgg-ablation-import-") as tmp:
        _unpack(path, Path(tmp))
        yield _checked(path, Path(tmp))


def _unpack(path: Path, into: Path) -> None:
    try:
        with tarfile.open(path, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                parts = PurePosixPath(m.name).parts
                if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
                    what = (
                        "a link or device"
                        if not (m.isfile() or m.isdir())
                        else "a path that climbs out of it"
                    )
                    raise UserError(f"archive {path} holds {what} ({m.name!r}): refused, nothing imported")
            tar.extractall(
                into, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {})
            )
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as exc:
        raise UserError(f"archive {path} is damaged or cut short ({type(exc).__name__}: "
                        f"{str(exc) or 'unexpected end'}): nothing imported") from None  # fmt: skip


def _checked(path: Path, folder: Path) -> Archive:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is not a vgg-ablation study archive (no {MANIFEST})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"archive {path}: its {MANIFEST} is damaged ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a vgg-ablation study archive (format {manifest.get('format')!r})"
                        if isinstance(manifest, dict) else f"{path}: {MANIFEST} is not an object")  # fmt: skip
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"archive {path} is format version {manifest.get('format_version')}; this vgg-ablation "
                        f"({__version__}) reads version {FORMAT_VERSION}")  # fmt: skip
    listed = manifest.get("files") or {}
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    for name in sorted(set(listed) | present):
        if name not in present:
            raise UserError(f"archive {path} is cut short: {name} is missing; nothing imported")
        if name not in listed:
            raise UserError(
                f"archive {path} holds a file its manifest does not list ({name}); nothing imported"
            )
        if sha256(folder / name) != listed[name]:
            raise UserError(f"archive {path}: {name} does not match its checksum (damaged); nothing imported")
    runs = []
    for name in sorted(n for n in listed if n.endswith("/run.json")):
        record = json.loads((folder / name).read_text())
        missing = {"run_id", "status", "start_time", "params", "tags", "metrics"} - set(record)
        if missing or PurePosixPath(name).parent.name != record.get("run_id"):
            raise UserError(
                f"archive {path}: {name} is not a run record ({', '.join(sorted(missing)) or 'wrong id'})"
            )
        runs.append(record)
    return Archive(path, folder, manifest, runs)


# -- import: the plan, then the writes -------------------------------------------------------------------
@dataclass
class Plan:
    """What an import does, decided before anything is written."""

    archive: Archive
    experiment_id: str | None  # the destination's experiment, None when the import creates it
    add: list[dict] = field(default_factory=list)  # run records to write, study runs first
    skip: list[tuple[dict, str]] = field(default_factory=list)  # (record, why)
    parents: dict[str, str] = field(default_factory=dict)  # archive run id -> destination run id
    stale: list[str] = field(default_factory=list)  # runs an earlier import left unfinished

    def lines(self) -> list[str]:
        studies = sum(stores.STUDY_RUN_TAG in r["tags"] for r in self.add)
        killed = sum(r["status"] == "RUNNING" and "cell" in r["tags"] for r in self.add)
        out = [f"add {len(self.add)} run{'s' if len(self.add) != 1 else ''} ({studies} study run"
               f"{'s' if studies != 1 else ''}, {len(self.add) - studies} other)"
               + (f", {killed} cell{'s' if killed != 1 else ''} RUNNING when exported arriving KILLED (trained again "
           "by the study's command)" if killed else "")
               + f"; skip {len(self.skip)}"]  # fmt: skip
        out += [f"  skip {_label(r)}: {why}" for r, why in self.skip]
        if self.stale:
            out.append(f"  remove {len(self.stale)} run(s) an interrupted import left unfinished")
        return out


def _label(record: dict) -> str:
    tags = record["tags"]
    if stores.STUDY_RUN_TAG in tags:
        return f"study run {record['run_id']}"
    if "arch" in tags or "arch" in record["params"]:
        arch = tags.get("arch") or record["params"].get("arch")
        return f"{arch} seed={tags.get('seed') or record['params'].get('seed')} (run {record['run_id']})"
    return f"run {record['run_id']}"


def plan_import(client, archive: Archive) -> Plan:
    """Decide every run's fate against the destination store, or refuse the whole archive."""
    experiment = client.get_experiment_by_name(archive.manifest["experiment"])
    plan = Plan(archive, experiment.experiment_id if experiment else None)
    here = all_runs(client, experiment.experiment_id) if experiment else []
    plan.stale = [r.info.run_id for r in here if PENDING_TAG in r.data.tags]
    here = [r for r in here if PENDING_TAG not in r.data.tags]
    # a run's origin, and which of its runs here speaks for it (a FINISHED one over a dead attempt)
    origins = {
        origin(r.info.run_id, r.data.tags): r for r in sorted(here, key=lambda r: r.info.status == "FINISHED")
    }
    studies = {r.data.tags[stores.STUDY_RUN_TAG]: r for r in here if stores.STUDY_RUN_TAG in r.data.tags}
    cells: dict[str, list] = {}
    for r in here:
        if "cell" in r.data.tags:
            cells.setdefault(r.data.tags["cell"], []).append(r)
    for record in _parents_first(archive.runs):
        tags, mine = record["tags"], origin(record["run_id"], record["tags"])
        if mine in origins and record["status"] == "FINISHED" and origins[mine].info.status != "FINISHED":
            # This store's copy is an attempt that stopped; the cell went on elsewhere and finished
            # (an archive imported there, then continued): its result comes in, beside the attempt.
            plan.add.append(record)
        elif mine in origins:
            plan.skip.append((record, f"already in this store (run {origins[mine].info.run_id})"))
            plan.parents[record["run_id"]] = origins[mine].info.run_id
        elif stores.STUDY_RUN_TAG in tags:
            _plan_study_run(plan, record, studies, archive.path)
        elif (
            "cell" in tags
            and cells.get(tags["cell"])
            and (why := _cell_here(record, cells[tags["cell"]], archive.path))
        ):
            plan.skip.append((record, why))
        else:
            plan.add.append(record)
    return plan


def _parents_first(runs: list[dict]) -> list[dict]:
    """Study runs first (a merge decides where their cells go), then every run after the run it
    nests under (a phase's run, such as the lr selection, parents cells too): a run is written
    knowing its parent's id in the destination. An archive lists runs newest first."""
    parent_of = {r["run_id"]: r["tags"].get(stores.PARENT_TAG) for r in runs}

    def depth(run_id: str | None, seen: int = 0) -> int:
        parent = parent_of.get(run_id)
        return 0 if parent not in parent_of or seen > len(runs) else 1 + depth(parent, seen + 1)

    return sorted(runs, key=lambda r: (stores.STUDY_RUN_TAG not in r["tags"], depth(r["run_id"])))


def _plan_study_run(plan: Plan, record: dict, studies: dict, path: Path) -> None:
    key = record["tags"][stores.STUDY_RUN_TAG]
    same = studies.get(key)
    if same is None:
        others = [k for k in studies if k.split("/")[0] == key.split("/")[0]]
        if others:
            raise UserError(f"archive {path}: study {key.split('/')[0]!r} is registered here with another config "
                            f"(fingerprint {others[0].split('/')[-1]}, the archive's {key.split('/')[-1]}): a different "
                            "config is a different study; import it into another store, or give it another name")  # fmt: skip
        plan.add.append(record)
        return
    theirs = {k: v for k, v in record["params"].items() if k.startswith("rule.")}
    ours = {k: v for k, v in same.data.params.items() if k.startswith("rule.")}
    if theirs != ours:
        changed = "; ".join(f"{k.removeprefix('rule.')} {ours.get(k)} here, {theirs.get(k)} in the archive"
                            for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k))  # fmt: skip
        raise UserError(f"archive {path}: study {key.split('/')[0]!r} is registered here with another rule ({changed}): "
                        "its looks were planned under that one; nothing imported")  # fmt: skip
    plan.parents[record["run_id"]] = same.info.run_id
    plan.skip.append((record, f"merged into this store's run of the same study ({same.info.run_id})"))


def _cell_here(record: dict, runs: list, path: Path) -> str | None:
    """Why an archive's run of a cell the destination already has is not added; None when it is
    (a FINISHED run, where the destination has only dead attempts); a refusal when both sides
    FINISHED it with different results."""
    done = [r for r in runs if r.info.status == "FINISHED"]
    if record["status"] == "FINISHED" and done:
        ours, theirs = done[0], _latest(record)
        keys = ("test/err1", "test/err5", "test/acc1")
        if "test/acc1" not in ours.data.metrics and "test/acc1" not in theirs:  # trained without a test
            keys = ("val/acc1_best",)
        if any(not _same(ours.data.metrics.get(k), theirs.get(k)) for k in keys):
            raise UserError(
                f"cell {record['tags']['cell']} FINISHED with different results here (run {ours.info.run_id}, test "
                f"error {_pct(ours.data.metrics.get('test/err1'))}) and in archive {path} (run {record['run_id']}, "
                f"{_pct(theirs.get('test/err1'))}): keep one; nothing imported"
            )
        return f"the same result is already here (run {ours.info.run_id})"
    if record["status"] == "FINISHED":
        return None
    best = (done or runs)[0]
    return f"this store has its own run of this cell ({best.info.run_id}, {best.info.status})"


def _latest(record: dict) -> dict:
    return {k: float(h[-1][2]) for k, h in record["metrics"].items() if h}


def _same(a, b) -> bool:
    """Both absent (a cell trained without a test), or both there and equal."""
    if a is None or b is None:
        return a is None and b is None
    return abs(float(a) - float(b)) < 1e-9


def _pct(x) -> str:
    return "none" if x is None else f"{100 * float(x):.2f}%"


@dataclass
class Imported:
    experiment_id: str
    added: list[str]  # the destination's new run ids
    seconds: float


def write_plan(client, plan: Plan, checkpoint_root: Path) -> Imported:
    """Carry out a plan: the experiment (made if missing), then each run whole, study runs first.
    Anything that stops it (an error, Ctrl-C) removes the runs it wrote: nothing half-imported."""
    started, archive = time.time(), plan.archive
    experiment_id = plan.experiment_id or stores.ensure_experiment(client, archive.manifest["experiment"])
    have = client.get_experiment(experiment_id).tags
    for key, value in archive.manifest.get("experiment_tags", {}).items():
        if key not in have:
            client.set_experiment_tag(experiment_id, key, value)
    for run_id in plan.stale:  # an import cut short before: never visible to a study, now gone
        client.delete_run(run_id)
        shutil.rmtree(Path(checkpoint_root).resolve() / run_id, ignore_errors=True)
    created: list[str] = []
    try:
        for record in plan.add:
            _write_run(client, experiment_id, record, plan, Path(checkpoint_root).resolve(), created)
    except BaseException:
        for run_id in created:
            with contextlib.suppress(Exception):
                client.delete_run(run_id)
            shutil.rmtree(Path(checkpoint_root).resolve() / run_id, ignore_errors=True)
        raise
    return Imported(experiment_id, created, time.time() - started)


def _write_run(
    client, experiment_id: str, record: dict, plan: Plan, checkpoint_root: Path, created: list
) -> None:
    from mlflow.entities import Metric, Param, RunTag

    tags = {k: v for k, v in record["tags"].items() if k not in FINDING_TAGS}
    run = client.create_run(experiment_id, start_time=record["start_time"], tags={**tags, PENDING_TAG: "1"},
                            run_name=record.get("run_name"))  # fmt: skip
    run_id = run.info.run_id
    created.append(run_id)
    plan.parents[record["run_id"]] = run_id
    params = [Param(k, v) for k, v in record["params"].items()]
    for i in range(0, len(params), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[i : i + PARAMS_PER_BATCH])
    metrics = [Metric(k, float(v), int(t), int(s)) for k, h in record["metrics"].items() for s, t, v in h]
    for i in range(0, len(metrics), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + METRICS_PER_BATCH])
    if record.get("inputs"):
        client.log_inputs(run_id, [_dataset_input(i) for i in record["inputs"]])
    folder = plan.archive.folder / "runs" / record["run_id"]
    if (folder / "artifacts").is_dir():
        client.log_artifacts(run_id, str(folder / "artifacts"))
    status, last = record["status"], dict(_finding_tags(record, plan))
    if status != "FINISHED":  # its checkpoints, if it brought any, where this machine keeps them
        ckpt_dir = checkpoint_root / run_id
        if (folder / "checkpoints").is_dir():
            shutil.copytree(folder / "checkpoints", ckpt_dir)
        last[CHECKPOINT_TAG] = str(ckpt_dir)
    if status in ("RUNNING", "SCHEDULED"):  # its process is on another machine, or gone
        what = (
            "the study's command runs it again"
            if "cell" not in record["tags"]
            else "its cell trains again here"
        )
        last[IMPORT_NOTE_TAG] = (f"{status} on {record['tags'].get('host', 'another machine')} when exported: "
                                 f"arrived KILLED ({what})")  # fmt: skip
        status = "KILLED"
    last[ORIGIN_TAG] = origin(record["run_id"], record["tags"])
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in last.items()])
    client.delete_tag(run_id, PENDING_TAG)
    client.set_terminated(run_id, status, end_time=record.get("end_time") or _last_seen(record))


def _finding_tags(record: dict, plan: Plan):
    for key in FINDING_TAGS:
        value = record["tags"].get(key)
        if value is None:
            continue
        if key == stores.PARENT_TAG:
            value = plan.parents.get(value)  # the study run as the destination has it (or none)
            if value is None:
                continue
        yield key, value


def _last_seen(record: dict) -> int:
    """When a run that never ended was last heard of (its heartbeat), for its end time."""
    beat = record["tags"].get("heartbeat")
    with contextlib.suppress(TypeError, ValueError):
        return int(float(beat) * 1000)
    return int(record["start_time"])


def _dataset_input(entry: dict):
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(name=entry["name"], digest=entry["digest"], source_type=entry["source_type"],
                      source=entry["source"], schema=entry.get("schema"), profile=entry.get("profile"))  # fmt: skip
    return DatasetInput(dataset, [InputTag(k, v) for k, v in entry.get("tags", {}).items()])


# What an archive rebuilt from a report's runs CSV cannot hold (its store was lost).
REBUILT_LACKS = [
    "metric histories (learning curves): each run has its last values only",
    "start and end times (each run starts when it was rebuilt and lasts its recorded seconds)",
    "environment tags (host, versions, git commit), system metrics, dataset profile",
    "trained weights and checkpoints",
    "LRN activity (the runs CSV has no denominators)",
]

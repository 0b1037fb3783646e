"""A training run's writes, kept on disk before they are sent: a tracking outage costs no training.

Every metric, tag and the final status that a run produces while it trains goes first into the
run's journal (`<checkpoint dir>/outbox.jsonl`: one JSON line per record, flushed and synced), and
from there to the tracking store, in order, by one background thread. While the store does not
answer (a server restarted, a network cut, a locked database) records wait in the journal and
training goes on; when it answers again they are sent in the order they were made, each with the
timestamp it was made at. So a record sent twice (a request that reached the server whose answer
was lost, a journal replayed by two processes) is the same row to MLflow, which drops exact
duplicates: nothing is lost and nothing is doubled.

The last record sent is acknowledged in `outbox.sent` beside the journal; once everything is sent
both files go. A run whose store never came back keeps them: `vgg-ablation sync <journal>` sends
them later, and a re-run of the cell does so itself before it decides anything about the cell.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path

from vgg_ablation.tracking import stores

JOURNAL = "outbox.jsonl"
ACKED = "outbox.sent"
# MLflow's limits on one log_batch call
MAX_METRICS_PER_BATCH = 1000
MAX_TAGS_PER_BATCH = 100
# What a rejected record says about the store, by MLflow error code: these will never be accepted
# (the run was deleted, a value is invalid), so sending stops and the journal stays for a person.
# Refusals, not outages: waiting does not help (a login revoked or a password changed mid-run is
# one; the records stay in the journal for `vgg-ablation sync` once the login is right).
PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "PERMISSION_DENIED",
             "UNAUTHENTICATED"}  # fmt: skip


RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"


def now_ms() -> int:
    return int(time.time() * 1000)


def metric_key(name: str) -> str:
    """MLflow's accepted characters (what Lightning's MLflow logger also keeps)."""
    return re.sub(r"[^a-zA-Z0-9_/. -]+", "", name)


class Journal:
    """The files of one run's outbox: the records in order (a header line first) and the number of
    the last one the store accepted."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / JOURNAL
        self.acked_path = Path(folder) / ACKED

    def exists(self) -> bool:
        return self.path.is_file()

    def header(self) -> dict:
        with self.path.open() as f:
            return json.loads(f.readline())

    def records(self) -> list[dict]:
        """Every whole record; a last line cut short by a kill mid-write was never sent, and is
        dropped with the attempt that was writing it."""
        records = []
        with self.path.open() as f:
            f.readline()  # the header
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break
        return records

    def acked(self) -> int:
        try:
            return int(self.acked_path.read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def unsent(self) -> list[dict]:
        acked = self.acked()
        return [r for r in self.records() if r["seq"] > acked]

    def ack(self, seq: int) -> None:
        """Best effort: on a full disk the mark stays behind, and a replay sends a few records
        again, which the store takes as the same rows (each keeps the time it was made)."""
        tmp = self.acked_path.with_suffix(".tmp")
        try:
            tmp.write_text(str(seq))
            os.replace(tmp, self.acked_path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def remove(self) -> None:
        for path in (self.path, self.acked_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def leftover_journal(run) -> Journal | None:
    """The outbox a dead attempt of `run` left (its tracking store was away when it ended), or None:
    none for a FINISHED run, nor for a RUNNING one whose process lives (that outbox is its own)."""
    if run.info.status == "FINISHED" or (run.info.status == "RUNNING" and not stores.is_orphaned(run)):
        return None
    journal = Journal(Path(run.data.tags.get("checkpoint_dir", "/nonexistent")))
    if not journal.exists() or journal.header().get("run_id") != run.info.run_id:
        return None
    return journal


def send(mlflow_client, run_id: str, records: list[dict], journal: Journal | None = None) -> int:
    """Send `records` in order, as few calls as MLflow's limits allow; acknowledge each call's last
    record in `journal`. Returns how many were sent; raises on the first call the store refuses."""
    from mlflow.entities import Metric, RunTag

    sent = 0
    for group in batches(records):
        last = group[-1]
        if last["kind"] == "status":
            mlflow_client.set_terminated(run_id, last["status"], end_time=last["time"])
        elif last["kind"] == "artifact":
            mlflow_client.log_artifact(run_id, last["path"], artifact_path=last["folder"])
        else:
            metrics = [Metric(k, v, r["time"], r["step"]) for r in group if r["kind"] == "metrics"
                       for k, v in r["values"].items()]  # fmt: skip
            tags = [RunTag(k, v) for r in group if r["kind"] == "tags" for k, v in r["values"].items()]
            mlflow_client.log_batch(run_id, metrics=metrics, tags=tags)
        sent += len(group)
        if journal is not None:
            journal.ack(last["seq"])
    return sent


def batches(records: list[dict]) -> Iterable[list[dict]]:
    """Consecutive records merged into one log_batch while MLflow's limits allow (a tag key that
    is already in the batch starts a new one, so a later value is never overtaken by an earlier);
    a status or artifact record goes alone."""
    group: list[dict] = []
    n_metrics = 0
    tag_keys: set[str] = set()
    for record in records:
        if record["kind"] in ("status", "artifact"):
            if group:
                yield group
            yield [record]
            group, n_metrics, tag_keys = [], 0, set()
            continue
        values = record["values"]
        metrics = len(values) if record["kind"] == "metrics" else 0
        keys = set(values) if record["kind"] == "tags" else set()
        full = n_metrics + metrics > MAX_METRICS_PER_BATCH or len(tag_keys | keys) > MAX_TAGS_PER_BATCH
        if group and (full or keys & tag_keys):
            yield group
            group, n_metrics, tag_keys = [], 0, set()
        group.append(record)
        n_metrics += metrics
        tag_keys |= keys
    if group:
        yield group


def root_cause(exc: BaseException) -> str:
    """The innermost error under `exc`, in one line: `OperationalError: database or disk is full`,
    not the ORM's "raised as a result of Query-invoked autoflush" wrapped around it."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def is_permanent(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) in PERMANENT


class _OwnFailures(logging.Filter):
    """MLflow's SQL store logs every failed write with its traceback (a full disk: one per retry,
    every 2 s); a failure of the outbox's thread is the outbox's to report, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != THREAD_NAME


THREAD_NAME = "vgg-ablation-outbox"
logging.getLogger("mlflow.store.db.utils").addFilter(_OwnFailures())


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Outbox:
    """One run's outbox while it trains: `log_metrics`, `set_tags` and `set_terminated` return at
    once (the record is on disk); a background thread sends. `close(wait)` waits up to `wait`
    seconds for everything to be sent; it returns whether it was."""

    def __init__(self, mlflow_client, run_id: str, folder: Path, label: str, retry_every: float = 2.0):
        # While the run trains, the outbox is the retry: MLflow's own (7 tries, minutes of backoff)
        # would hold a record in flight through a whole outage, hiding it, and fail it late. Every
        # write of the process goes through the outbox meanwhile; `close` restores the setting.
        self._retries = os.environ.get(RETRIES_ENV)
        if self._retries is None:
            os.environ[RETRIES_ENV] = "0"
        self.client, self.run_id, self.label = mlflow_client, run_id, label
        self.uri = mlflow_client.tracking_uri
        self.retry_every = retry_every
        folder.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(folder)
        leftover = self.journal.unsent() if self.journal.exists() else []
        self._seq = max((r["seq"] for r in leftover), default=self.journal.acked())
        if not self.journal.exists():
            header = {"run_id": run_id, "tracking_uri": self.uri, "cell": label}
            self.journal.path.write_text(json.dumps(header) + "\n")
        self._file = self.journal.path.open("a")
        self._pending: deque[dict] = deque(leftover)
        self._cond = threading.Condition()
        self._closing = False
        self._give_up_at = float("inf")  # when closing: the moment the sender stops retrying
        self.stuck: str | None = None  # why the store refuses (for good): sending stopped
        self.last_error = ""  # the store's last answer while it did not take records
        self.journal_error: str | None = None  # why the journal could not be written (a full disk)
        self.outage_since: float | None = None
        self.outage_seconds = 0.0  # time the store did not answer, summed over outages
        self.write_seconds = 0.0  # time the training thread spent writing records
        self._thread = threading.Thread(target=self._send_forever, name=THREAD_NAME, daemon=True)
        self._thread.start()

    # -- what training calls: a local append, never a network call ---------------------------------
    def log_metrics(self, values: dict[str, float], step: int, timestamp: int | None = None) -> None:
        clean = {metric_key(k): float(v) for k, v in values.items()}
        self._put({"kind": "metrics", "values": clean, "step": int(step), "time": timestamp or now_ms()})

    def set_tags(self, values: dict[str, str]) -> None:
        self._put({"kind": "tags", "values": {k: str(v) for k, v in values.items()}, "time": now_ms()})

    def log_artifact(self, path: Path, folder: str) -> None:
        """A file (it must stay where it is until sent) into the run's artifacts under `folder`."""
        self._put({"kind": "artifact", "path": str(Path(path).resolve()), "folder": folder, "time": now_ms()})

    def set_terminated(self, status: str) -> None:
        self._put({"kind": "status", "status": status, "time": now_ms()})

    def _put(self, record: dict) -> None:
        start = time.perf_counter()
        with self._cond:
            self._seq += 1
            record = {"seq": self._seq, **record}
            if self.journal_error is None:
                try:
                    self._file.write(json.dumps(record) + "\n")
                    self._file.flush()
                    os.fsync(self._file.fileno())  # on disk before anyone may count on it
                except OSError as exc:  # a full disk: the record is still sent from memory, and
                    # the journal, now incomplete, is never replayed past this point
                    self.journal_error = f"{type(exc).__name__}: {exc.strerror or exc}"
                    _say(f"warning: {self.label}: the outbox journal {self.journal.path} cannot be written "
                         f"({self.journal_error}); records are kept in memory only")  # fmt: skip
            self._pending.append(record)
            self._cond.notify()
        self.write_seconds += time.perf_counter() - start

    # -- the sender ----------------------------------------------------------------------------------
    def _send_forever(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                records = list(self._pending)
            try:
                # A server that went away would hold this thread in MLflow's own retries (minutes of
                # backoff) and notice its return late; its health check answers in milliseconds,
                # or fails in 2 s at most.
                if not stores.answers(self.uri):
                    raise ConnectionError(f"{self.uri} does not answer")
                sent = send(self.client, self.run_id, records, self.journal)
            except Exception as exc:  # noqa: BLE001 - every failure is either an outage or refusal
                self._forget_acked()
                if is_permanent(exc):
                    self.stuck = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
                    _say(f"warning: {self.label}: the tracking store refuses run {self.run_id}'s records "
                         f"({self.stuck}); they stay in {self.journal.path}")  # fmt: skip
                    return
                self.last_error = root_cause(exc)
                if self.outage_since is None:
                    self.outage_since = time.time()
                    _say(f"warning: {self.label}: tracking store {self.uri} not answering "
                         f"({type(exc).__name__}); training goes on, its records wait in {self.journal.path}")  # fmt: skip
                with self._cond:
                    if self._closing and self._give_up_at <= time.time():
                        return
                    self._cond.wait(self.retry_every)
                continue
            with self._cond:
                for _ in range(sent):
                    self._pending.popleft()
                self._cond.notify_all()
            if self.outage_since is not None:
                lasted = time.time() - self.outage_since
                self.outage_seconds += lasted
                self.outage_since = None
                _say(f"{self.label}: tracking store answering again after {lasted:.0f} s; "
                     f"{sent} waiting records sent")  # fmt: skip

    def _forget_acked(self) -> None:
        """After a call failed part-way: the records the store did accept are not sent again."""
        acked = self.journal.acked()
        with self._cond:
            while self._pending and self._pending[0]["seq"] <= acked:
                self._pending.popleft()

    def drain(self, wait: float) -> bool:
        """Wait up to `wait` seconds for every record so far to be sent; True if they were."""
        deadline = time.time() + wait
        with self._cond:
            while self._pending and self.stuck is None and time.time() < deadline and self._thread.is_alive():
                self._cond.wait(min(1.0, max(0.0, deadline - time.time())))
            return not self._pending

    def close(self, wait: float) -> bool:
        """Wait up to `wait` seconds for every record to be sent (the status last). True: all sent,
        the journal removed. False: the records stay in the journal for `vgg-ablation sync`."""
        with self._cond:
            self._closing = True
            self._give_up_at = time.time() + wait
            self._cond.notify_all()
        done = self.drain(wait)
        if self._retries is None:
            os.environ.pop(RETRIES_ENV, None)
        with contextlib.suppress(OSError):
            self._file.close()
        if done:
            self._thread.join(5)
            self.journal.remove()
        return done

    @property
    def unsent(self) -> int:
        return len(self._pending)

    def sync_command(self) -> str:
        return f"vgg-ablation sync {self.journal.path}"


def send_journal(mlflow_client, journal: Journal) -> int:
    """Send what a journal has not yet sent to its run, then remove it; how many records went."""
    sent = send(mlflow_client, journal.header()["run_id"], journal.unsent(), journal)
    journal.remove()
    return sent


def sync(journal: Journal, tracking_uri: str | None = None) -> tuple[str, int]:
    """`vgg-ablation sync`: a journal to the run it belongs to (at `tracking_uri`, else where it
    was headed). Returns (run id, records sent). Raises when the store refuses."""
    header = journal.header()
    uri = tracking_uri or header["tracking_uri"]
    stores.check_reachable(uri)
    return header["run_id"], send_journal(stores.client(uri), journal)


def run_sync(args: list[str]) -> int:
    """`vgg-ablation sync`: send what runs kept in their outboxes while their tracking store was
    away: the journals named, else every one under ./checkpoints (the default checkpoint root)."""
    from mlflow.exceptions import MlflowException

    from vgg_ablation.config import one_line
    from vgg_ablation.errors import UserError

    uri, paths = None, []
    for arg in args:
        if arg.startswith("tracking_uri="):
            uri = arg.partition("=")[2]
        elif "=" in arg:
            raise UserError(f"sync takes journal paths and tracking_uri=; got {arg!r}")
        else:
            paths.append(Path(arg))
    journals = [Journal(p.parent if p.name == JOURNAL else p) for p in paths]
    journals = journals or [Journal(p.parent) for p in sorted(Path("checkpoints").glob(f"*/{JOURNAL}"))]
    missing = [str(j.path) for j in journals if not j.exists()]
    if missing:
        raise UserError(f"no outbox journal at {missing[0]}")
    if not journals:
        print("nothing to send: no outbox journal under checkpoints/")
        return 0
    for journal in journals:
        try:
            run_id, sent = sync(journal, uri)
        except MlflowException as exc:
            raise UserError(f"{journal.path}: the tracking store refused: {one_line(exc)}") from None
        print(f"sent {sent} records to run {run_id}; {journal.path} removed")
    return 0

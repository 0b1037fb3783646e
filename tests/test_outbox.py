"""The outbox a training run writes through: its journal, its batching, and its sending into a
real (SQLite) store. The outage itself, with a real server killed mid-run, is in test_reliability."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from vgg_ablation.tracking.outbox import MAX_METRICS_PER_BATCH, Journal, Outbox, batches, sync

from .conftest import cli_in_process


def record(seq: int, kind: str, **body) -> dict:
    return {"seq": seq, "kind": kind, "time": 1000 + seq, **body}


def test_batches_keep_order_limits_and_a_later_tag_value_after_an_earlier_one():
    records = [
        record(1, "metrics", values={"a": 1.0}, step=0),
        record(2, "tags", values={"heartbeat": "1"}),
        record(3, "metrics", values={"a": 2.0}, step=1),
        record(4, "tags", values={"heartbeat": "2"}),  # same key: a new batch
        record(5, "metrics", values={f"m{i}": 0.0 for i in range(MAX_METRICS_PER_BATCH)}, step=0),
        record(6, "metrics", values={"a": 3.0}, step=2),  # one metric over MLflow's limit
        record(7, "status", status="FINISHED"),  # always alone, always last
    ]
    groups = [[r["seq"] for r in g] for g in batches(records)]
    assert groups == [[1, 2, 3], [4, 5], [6], [7]]


def test_a_journal_cut_mid_line_keeps_its_whole_records(tmp_path):
    journal = Journal(tmp_path)
    lines = [
        {"run_id": "r", "tracking_uri": "x"},
        record(1, "tags", values={"a": "1"}),
        record(2, "tags", values={}),
    ]
    text = "\n".join(json.dumps(line) for line in lines)
    journal.path.write_text(text[:-5])  # the last record cut short by a kill
    assert [r["seq"] for r in journal.records()] == [1]
    journal.ack(1)
    assert journal.unsent() == []


@pytest.fixture
def store(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("outbox")
    return client, client.create_run(experiment).info.run_id


def test_records_reach_the_store_in_order_with_the_time_they_were_made(tmp_path, store):
    client, run_id = store
    outbox = Outbox(client, run_id, tmp_path / "ckpt", "A seed=0")
    for epoch in range(5):
        outbox.log_metrics({"val/acc1": epoch / 10, "bad key!": 1.0}, step=epoch, timestamp=10_000 + epoch)
        outbox.set_tags({"heartbeat": str(epoch)})
    outbox.set_terminated("FINISHED")
    assert outbox.close(wait=30)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["heartbeat"] == "4"
    curve = client.get_metric_history(run_id, "val/acc1")
    assert [(m.step, m.timestamp) for m in curve] == [(e, 10_000 + e) for e in range(5)]
    assert "bad key" in run.data.metrics  # MLflow's accepted characters only
    assert not (tmp_path / "ckpt" / "outbox.jsonl").exists()


def test_a_store_that_refuses_keeps_the_journal_and_sync_sends_it_later(tmp_path, store):
    client, run_id = store
    client.delete_run(run_id)  # the store will refuse every record for this run
    outbox = Outbox(client, run_id, tmp_path / "ckpt", "A seed=0")
    outbox.log_metrics({"val/acc1": 0.5}, step=0)
    outbox.set_terminated("FINISHED")
    assert not outbox.close(wait=30)
    journal = Journal(tmp_path / "ckpt")
    assert [r["kind"] for r in journal.unsent()] == ["metrics", "status"]
    client.restore_run(run_id)
    assert sync(journal) == (run_id, 2)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run_id, "val/acc1")] == [0.5]
    assert not journal.exists()


def test_sending_a_journal_twice_records_each_value_once(tmp_path, store):
    """A request whose answer was lost is sent again: MLflow drops the exact duplicate."""
    client, run_id = store
    outbox = Outbox(client, run_id, tmp_path / "ckpt", "A seed=0")
    outbox.log_metrics({"val/acc1": 0.5}, step=0)
    assert outbox.drain(30)
    journal = Journal(tmp_path / "ckpt")
    kept = journal.path.read_text()
    assert outbox.close(wait=0)
    journal.path.write_text(kept)  # as if the process died before it knew the record arrived
    assert sync(journal) == (run_id, 1)
    assert len(client.get_metric_history(run_id, "val/acc1")) == 1


def test_sync_refuses_what_is_not_a_journal_in_one_line(tmp_path, monkeypatch):
    result = cli_in_process(["sync", str(tmp_path / "nothing-here")], tmp_path, monkeypatch)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: no outbox journal at {tmp_path / 'nothing-here' / 'outbox.jsonl'}"
    ]
    nothing = cli_in_process(["sync"], tmp_path, monkeypatch)
    assert nothing.returncode == 0 and "nothing to send" in nothing.stdout

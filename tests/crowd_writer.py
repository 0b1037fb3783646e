"""The crowd test's writers: `writers` processes at once, each a run with `batches` x 10 metrics
through the project's own store opening (stores.client, ensure_experiment), then FINISHED.

One process imports MLflow (seconds each: 32 imports were most of the test's CPU time), then forks
the writers before anything has touched the store: each child opens its own store, connection and
HTTP session, so the race (a fresh SQLite file created by all of them, or one server's pool) is the
same as with 32 separate launches, and starts closer together. Prints `ok <k>` per writer; exits 1
if any writer failed (its traceback on stderr)."""

import os
import sys
import time
import traceback

import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (imported once, here, not by each writer)
from mlflow.entities import Metric

from vgg_ablation.tracking import stores


def write(uri: str, name: str, k: int, batches: int) -> None:
    client = stores.client(uri)
    experiment = stores.ensure_experiment(client, name)
    run = client.create_run(experiment, run_name=f"writer{k}", tags={"writer": str(k)}).info.run_id
    for step in range(batches):
        now = int(time.time() * 1000)
        client.log_batch(run, metrics=[Metric(f"m{j}", float(step * 10 + j), now, step) for j in range(10)])
    client.set_terminated(run, "FINISHED")
    # One write(2) of the whole line: under PYTHONUNBUFFERED (as the tests run it) print() writes
    # "ok", " ", k and "\n" apart, and 32 writers on one pipe interleaved them ("okok 9", " 21");
    # a single write under PIPE_BUF bytes to a pipe is atomic.
    os.write(sys.stdout.fileno(), f"ok {k}\n".encode())


def main() -> int:
    uri, name, writers, batches = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    children = {}
    for k in range(writers):
        pid = os.fork()
        if pid == 0:  # a writer: never returns into the parent's loop
            code = 0
            try:
                write(uri, name, k, batches)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
        children[pid] = k
    failed = []
    for pid, k in children.items():
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            failed.append(k)
    if failed:
        print(f"writers failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""One writer of the crowd test: a run with `batches` x 10 metrics, through the project's own
store opening (tracking.client, ensure_experiment), then FINISHED. Prints `ok <k>` at the end."""

import sys
import time

from mlflow.entities import Metric

from vgg_ablation import tracking

uri, name, k, batches = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
client = tracking.client(uri)
experiment = tracking.ensure_experiment(client, name)
run = client.create_run(experiment, run_name=f"writer{k}", tags={"writer": str(k)}).info.run_id
for step in range(batches):
    now = int(time.time() * 1000)
    client.log_batch(run, metrics=[Metric(f"m{j}", float(step * 10 + j), now, step) for j in range(10)])
client.set_terminated(run, "FINISHED")
print("ok", k)

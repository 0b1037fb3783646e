"""`vgg-ablation ui`: MLflow's dashboard on this folder's store, and where a study lives in it.

The server starts first (one worker, without MLflow's job runner: it answers in a few seconds),
in its own process group so that stopping it stops the uvicorn worker it starts; meanwhile the
study's addresses are printed. Ctrl-C or a SIGTERM to this process stops both.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from vgg_ablation.config import UiOptions, compose, options, study_overrides
from vgg_ablation.errors import UserError
from vgg_ablation.study.cells import study_run_key
from vgg_ablation.tracking import stores
from vgg_ablation.tracking.labserver import server_env, stop_group

STUDY_KEYS = ("experiment", "study.", "data", "model", "optim", "trainer")  # what finds a study
# Seconds the dashboard's server gets to stop on its own before it is killed: it only reads the
# store, so nothing is lost, and a Ctrl-C should not wait on uvicorn's graceful shutdown (over
# 10 s on a loaded machine).
STOP_WAIT = 5.0


def run_ui(args: list[str]) -> int:
    study = [a for a in args if a.startswith(STUDY_KEYS)]
    opts = options(UiOptions, [a for a in args if a not in study], "ui")
    uri = stores.tracking_uri(None)
    if uri.startswith(("http://", "https://")):
        raise UserError(f"the tracking store is a server ({uri}): it serves the dashboard itself, open it in a "
                        "browser; `ui` serves a store on this machine (unset MLFLOW_TRACKING_URI)")  # fmt: skip
    base = f"http://{opts.host}:{opts.port}"
    if uri.startswith("sqlite:///") and not os.path.exists(uri.removeprefix("sqlite:///")):
        stores.client(uri)  # a new store is created under our lock, not raced by the server
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", opts.host,
         "--port", str(opts.port), "--workers", "1"],
        start_new_session=True,  # its own group: stopping it stops the uvicorn worker it starts
        env=server_env(),
    )  # fmt: skip

    def stop(signum, frame):  # a SIGTERM to this process stops the server too (below)
        # Not here: this runs inside `server.wait()`, which holds the lock a second wait needs
        # to reap the server, so a wait in the handler could only time out.
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        print(f"MLflow dashboard for {uri} on {base} (Ctrl-C stops it)", flush=True)
        if study:
            print_study_addresses(study, uri, base)
        return server.wait()
    except KeyboardInterrupt:
        stop_group(server, STOP_WAIT)
        return 130
    except BaseException:
        stop_group(server, STOP_WAIT)
        raise


def print_study_addresses(study: list[str], uri: str, base: str) -> None:
    cfg = compose(study_overrides(study))
    client = stores.client(uri)
    experiment = client.get_experiment_by_name(stores.experiment_name(cfg))
    if experiment is None:
        print(f"  no runs of study {cfg.study.name!r} in {uri} yet: `vgg-ablation study {' '.join(study)}`",
              flush=True)  # fmt: skip
        return
    print(f"  study {cfg.study.name}, every run: {stores.runs_url(base, experiment.experiment_id)}")
    parent = stores.find_study_run(client, experiment.experiment_id, study_run_key(cfg))
    # this config's study run, else every study run of the experiment (other overrides)
    parents = [parent] if parent is not None else client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.{stores.STUDY_RUN_TAG} LIKE '{cfg.study.name}/%'")  # fmt: skip
    for run in parents:
        url = stores.run_url(base, experiment.experiment_id, run.info.run_id)
        print(f"  the study's run {run.data.tags[stores.STUDY_RUN_TAG]} (report, verdicts): {url}")
    sys.stdout.flush()

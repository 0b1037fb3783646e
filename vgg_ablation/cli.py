"""`vgg-ablation <command> [key=value ...]`: summary, train, study, report, bench, ui.

Overrides are Hydra's (`arch=C seed=1 data=cifar10 trainer.max_epochs=30`). Before handing
over to Hydra, the config is composed once here so that a misspelt key, an unknown choice or an
impossible value is refused with one line and exit code 2, not a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from vgg_ablation.config import compose, one_line
from vgg_ablation.errors import UserError

COMMANDS = {
    "summary": "per-layer table of a network: summary arch=D [input_size=224 num_classes=1000 width=1]",
    "train": "one training run (one cell): train arch=C seed=1 data=sample [overrides]",
    "study": "the six-step study as a Hydra multirun: study [experiment=sample] [overrides]",
    "report": "write reports/<study>.md from MLflow: report [experiment=sample]",
    "bench": "images/s of the training path against plain PyTorch: bench [arch=A data=sample ...]",
    "ui": "open the MLflow dashboard on this folder's runs (127.0.0.1): ui [port=5000 host=127.0.0.1]",
    "sync": "send records kept while a tracking store was away: sync [JOURNAL ...] [tracking_uri=URI]",
    "server": "a lab's shared tracking server, PostgreSQL + MLflow: server [root=lab-server port=5000 host=...]",
}


def usage() -> str:
    lines = ["usage: vgg-ablation <command> [key=value ...]", "", "commands:"]
    lines += [f"  {name:8s} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def _require_key_value(overrides: list[str]) -> None:
    for o in overrides:
        if "=" not in o and not o.startswith("-"):
            raise UserError(f"expected key=value, got {o!r}")


def cmd_summary(args: list[str]) -> int:
    import torch

    from vgg_ablation.design import layer_table
    from vgg_ablation.models import build_model, get_arch

    known = {
        "arch": str,
        "input_size": int,
        "num_classes": int,
        "width": float,
        "batch_norm": None,
        "head": str,
    }
    options: dict = {}
    for arg in args:
        key, _, value = arg.partition("=")
        if key not in known or not value:
            raise UserError(f"summary takes {', '.join(k + '=' for k in known)}; got {arg!r}")
        try:
            options[key] = value.lower() in ("1", "true", "yes") if known[key] is None else known[key](value)
        except ValueError:
            raise UserError(f"{key} must be a number, got {value!r}") from None
    try:
        arch = get_arch(options.pop("arch", "D"))
        size = options.setdefault("input_size", arch.input_size)
        with torch.device("meta"):
            model = build_model(arch, **options)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    table = layer_table(model, (arch.in_channels, size, size))
    table["output shape"] = table["output shape"].map(lambda s: "(None, " + ", ".join(map(str, s)) + ")")
    shown = table.assign(params=table["params"].map("{:,}".format), total=table["total"].map("{:,}".format))
    print(f"{arch.name}: {arch.reference}; {arch.depth} weight layers")
    print(shown.to_markdown(index=False, colalign=("left", "left", "right", "right")))
    print(f"Total params: {int(table['params'].sum()):,}")
    return 0


def cmd_train(args: list[str]) -> int:
    from vgg_ablation import tracking
    from vgg_ablation.build import prepare

    _require_key_value(args)
    cfg = compose(args)
    prepare(cfg)  # bad data, shapes, numbers: refused here, before Hydra opens an output folder
    if cfg.logger.enabled:
        tracking.check_reachable(tracking.tracking_uri(cfg.logger.tracking_uri))
    from vgg_ablation import train

    sys.argv = [sys.argv[0], *args]
    train.main()
    return 0


def cmd_study(args: list[str]) -> int:
    from vgg_ablation.study import run_study

    _require_key_value(args)
    return run_study(args)


def cmd_report(args: list[str]) -> int:
    from vgg_ablation.report import write_report

    _require_key_value(args)
    path = write_report(compose(args))
    print(f"wrote {path}")
    return 0


def cmd_bench(args: list[str]) -> int:
    from vgg_ablation.bench import run_bench

    _require_key_value(args)
    return run_bench(args)


def cmd_ui(args: list[str]) -> int:
    """The MLflow dashboard on this folder's store; with experiment=..., where that study lives."""
    from vgg_ablation import labserver, tracking

    options = dict(a.partition("=")[::2] for a in args)
    host, port = options.pop("host", "127.0.0.1"), options.pop("port", "5000")
    study = [
        f"{k}={v}"
        for k, v in options.items()
        if k == "experiment" or k.startswith(("study.", "data", "model", "optim", "trainer"))
    ]
    unknown = [k for k in options if f"{k}={options[k]}" not in study]
    if unknown:
        raise UserError(
            f"ui takes host=, port= and a study's overrides (experiment=...); got {', '.join(unknown)}"
        )
    uri = tracking.tracking_uri(None)
    base = f"http://{host}:{port}"
    if uri.startswith("sqlite:///") and not os.path.exists(uri.removeprefix("sqlite:///")):
        tracking.client(uri)  # a new store is created under our lock, not raced by the server
    # The server starts first (one worker: it answers in a few seconds); the study's addresses are
    # looked up while it does.
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", port,
         "--workers", "1"],
        start_new_session=True,  # its own group: stopping it stops the uvicorn worker it starts
        env=labserver.server_env(),
    )  # fmt: skip

    def shutdown() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)

    def stop(signum, frame):  # a SIGTERM to this process stops the server too
        shutdown()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        print(f"MLflow dashboard for {uri} on {base} (Ctrl-C stops it)", flush=True)
        if study:
            _print_study_addresses(study, uri, base)
        return server.wait()
    except KeyboardInterrupt:
        shutdown()
        return 130
    except BaseException:
        shutdown()
        raise


def _print_study_addresses(study: list[str], uri: str, base: str) -> None:
    from vgg_ablation import tracking
    from vgg_ablation.cells import study_run_key
    from vgg_ablation.config import study_overrides

    cfg = compose(study_overrides(study))
    client = tracking.client(uri)
    experiment = client.get_experiment_by_name(tracking.experiment_name(cfg))
    if experiment is None:
        print(
            f"  no runs of study {cfg.study.name!r} in {uri} yet: `vgg-ablation study {' '.join(study)}`",
            flush=True,
        )
        return
    print(f"  study {cfg.study.name}, every run: {tracking.runs_url(base, experiment.experiment_id)}")
    parent = tracking.find_study_run(client, experiment.experiment_id, study_run_key(cfg))
    # this config's study run, else every study run of the experiment (other overrides)
    parents = [parent] if parent is not None else client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.{tracking.STUDY_RUN_TAG} LIKE '{cfg.study.name}/%'")  # fmt: skip
    for run in parents:
        url = tracking.run_url(base, experiment.experiment_id, run.info.run_id)
        print(f"  the study's run {run.data.tags[tracking.STUDY_RUN_TAG]} (report, verdicts): {url}")
    sys.stdout.flush()


def cmd_server(args: list[str]) -> int:
    from vgg_ablation.labserver import run_server

    return run_server(args)


def cmd_sync(args: list[str]) -> int:
    """Send what runs kept in their outboxes while their tracking store was away: the journals
    named, else every one under ./checkpoints (the default checkpoint root)."""
    from vgg_ablation.outbox import JOURNAL, Journal, sync

    uri = None
    paths = []
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
    from mlflow.exceptions import MlflowException

    for journal in journals:
        try:
            run_id, sent = sync(journal, uri)
        except MlflowException as exc:
            raise UserError(f"{journal.path}: the tracking store refused: {one_line(exc)}") from None
        print(f"sent {sent} records to run {run_id}; {journal.path} removed")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # MLflow announces each schema migration of a new store at INFO: not news for our users.
    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return globals()[f"cmd_{command}"](args) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

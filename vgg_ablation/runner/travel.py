"""`vgg-ablation export` and `vgg-ablation import`: a study carried between stores and machines
(the archive's format and both directions are archive.py's), a study's own archive written beside
its report, and an archive rebuilt from a report's runs CSV when the study's store was lost.
"""

from __future__ import annotations

import math
import re
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from vgg_ablation.errors import UserError
from vgg_ablation.tracking import archive, stores


def archive_path(cfg: DictConfig) -> Path:
    """Where a study's archive goes: `archive.out`, else beside its report (study.reports_dir)."""
    if cfg.archive.out:
        return Path(cfg.archive.out).expanduser()
    return Path(cfg.study.reports_dir).expanduser() / f"{cfg.study.name}-archive.tar.gz"


def export_for(cfg: DictConfig, out: Path | None = None) -> archive.Exported:
    """The study `cfg` names, from its store into its archive."""
    uri = stores.tracking_uri(cfg.logger.tracking_uri)
    stores.check_reachable(uri)
    client = stores.client(uri)
    return archive.export_study(client, cfg.study.name, out or archive_path(cfg), cfg.archive.checkpoints,
                                cfg.archive.system_metrics, source=_shown(uri))  # fmt: skip


def run_export(args: list[str]) -> int:
    """`vgg-ablation export [experiment=NAME] [key=value ...]`."""
    from vgg_ablation.config import compose, study_overrides

    cfg = compose(study_overrides(args))
    if cfg.archive.from_csv:
        done = rebuild(cfg, Path(cfg.archive.from_csv).expanduser())
        how = f"rebuilt from {cfg.archive.from_csv}"
    else:
        done = export_for(cfg)
        how = f"from {_shown(stores.tracking_uri(cfg.logger.tracking_uri))}"
    print(f"exported study {cfg.study.name} ({how}): {done.runs} runs, {_size(done.size)}, "
          f"in {done.seconds:.1f} s: {done.path}")  # fmt: skip
    if done.unsent:
        print(f"warning: {len(done.unsent)} run(s) kept records while their tracking store was away, which "
              "it never received and this archive lacks: send them with `vgg-ablation sync "
              f"{' '.join(map(str, done.unsent))}` (or run the study's command once), then export again",
              file=sys.stderr)  # fmt: skip
    return 0


def run_import(args: list[str]) -> int:
    """`vgg-ablation import ARCHIVE [ARCHIVE ...] [key=value ...]`: each archive in turn, each
    whole or not at all."""
    from vgg_ablation.config import ImportOptions, options

    paths = [a for a in args if "=" not in a]
    if not paths:
        raise UserError("import: name an archive (a .tar.gz or a folder written by `vgg-ablation export`)")
    opts = options(ImportOptions, [a for a in args if "=" in a], "import")
    uri = stores.tracking_uri(opts.tracking_uri or None)
    stores.check_reachable(uri)
    client = stores.client(uri)
    for path in paths:
        with archive.opened(Path(path)) as opened:
            plan = archive.plan_import(client, opened)
            where = f"study {opened.study} into {_shown(uri)}"
            if opts.dry_run:
                print(f"dry run: {path}: {where}: would " + "\n".join(plan.lines()) + "\nnothing written")
                continue
            done = archive.write_plan(client, plan, Path(opts.checkpoint_root))
            print(f"imported {path}: {where} (experiment {done.experiment_id}) in {done.seconds:.1f} s: "
                  + "\n".join(plan.lines()))  # fmt: skip
            if opened.manifest.get("rebuilt"):
                print(
                    "  rebuilt from a runs CSV, so it lacks: " + "; ".join(opened.manifest.get("lacks", []))
                )
    return 0


def _shown(uri: str) -> str:
    """A store's address as printed and recorded: never a password."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.password:
        return uri.replace(f":{parts.password}@", ":***@")
    return uri


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


# -- a lost store's study, rebuilt from its report's runs CSV ---------------------------------------------
CSV_COLUMNS = {
    "net",
    "arch",
    "seed",
    "status",
    "test_err1",
    "test_err5",
    "val_err1_best",
    "seconds",
    "run_id",
}


def rebuild(cfg: DictConfig, csv: Path) -> archive.Exported:
    """The archive of a study whose store is gone, from the runs CSV its report wrote and its
    config: each run's net, seed, status, errors and time from the CSV (its run id kept as its
    origin), and what follows from the config and the data alone (the cell keys and fingerprints,
    the registered rule, each net's size and FLOPs, the data's digest and counts), so that its
    verdicts can be re-analysed and the study continued. Marked as rebuilt; what it lacks is in
    its manifest (`archive.REBUILT_LACKS`). Needs the study's data, for its digest."""
    if not csv.is_file():
        raise UserError(f"archive.from_csv: no such file: {csv}")
    table = pd.read_csv(csv)
    missing = CSV_COLUMNS - set(table.columns)
    if missing:
        raise UserError(f"{csv} is not a report's runs CSV (no {', '.join(sorted(missing))} column)")
    with tempfile.TemporaryDirectory(prefix="vgg-ablation-rebuild-") as tmp:
        client = stores.client(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        report = csv.with_name(f"{cfg.study.name}.md")
        _rebuild_into(client, cfg, table, csv.name, report if report.is_file() else None)
        return archive.export_study(
            client, cfg.study.name, archive_path(cfg), source=f"rebuilt from {csv.name}"
        )


def _rebuild_into(client, cfg: DictConfig, table: pd.DataFrame, source: str, report: Path | None) -> None:
    from mlflow.entities import Metric, Param

    from vgg_ablation.nets.models import forward_flops
    from vgg_ablation.study.cells import (
        SCRATCH_LABEL,
        cell_cfg,
        cell_configs,
        cell_key,
        fingerprint,
        rule_params,
        study_params,
    )
    from vgg_ablation.training.build import data_for, model_for
    from vgg_ablation.training.cell_run import curated_params, log_dataset

    experiment_id = stores.ensure_experiment(client, stores.experiment_name(cfg))
    stores.describe_experiment(client, experiment_id, cfg.study.description)
    now = int(time.time() * 1000)
    key = f"{cfg.study.name}/{fingerprint(cfg)}"
    parent = client.create_run(experiment_id, start_time=now, run_name=f"study {cfg.study.name}", tags={
        stores.STUDY_RUN_TAG: key, "study": cfg.study.name, archive.REBUILT_TAG: source,
        "mlflow.note.content": cfg.study.description or f"study {cfg.study.name}",
        "archs": ",".join(cfg.study.archs), "seeds": ",".join(map(str, cfg.study.seeds)),
    }).info.run_id  # fmt: skip
    params = {**study_params(cfg), **rule_params(cfg)}
    client.log_batch(parent, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_text(parent, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    if report is not None:  # the report that was written from the lost store, as it was, with its plots
        images = re.findall(r"!\[[^\]]*\]\(([^)/]+)\)", report.read_text())
        for original in [report, *[report.parent / i for i in images if (report.parent / i).is_file()]]:
            client.log_artifact(parent, str(original), "original-report")
    datamodule = data_for(cfg)
    configs = dict(cell_configs(cfg))
    steps = len(datamodule.train_dataloader()) * cfg.trainer.max_epochs
    for net, rows in table.groupby("net", sort=False):
        net_cfg = configs.get(net)
        if net_cfg is None:
            raise UserError(f"{source}: net {net!r} is not one of this study's ({', '.join(configs)})")
        arch = "B" if net == SCRATCH_LABEL else net
        model = model_for(net_cfg, arch, datamodule)
        flops = forward_flops(model, datamodule.input_size)
        for _, row in rows.iterrows():
            cell = cell_cfg(net_cfg, arch, int(row["seed"]))
            tags = {
                "cell": cell_key(cell), "study": cfg.study.name, "arch": arch, "seed": str(int(row["seed"])),
                "fingerprint": fingerprint(cell), "data_digest": datamodule.dataset.digest,
                stores.PARENT_TAG: parent, archive.REBUILT_TAG: source, archive.ORIGIN_TAG: origin_of(row),
                **({"learned": str(row["learned"]).lower()} if "learned" in row and pd.notna(row["learned"]) else {}),
                **({"failure_reason": row["failure_reason"]} if isinstance(row.get("failure_reason"), str) else {}),
            }  # fmt: skip
            run_id = client.create_run(experiment_id, start_time=now, tags=tags,
                                       run_name=f"{arch}-seed{int(row['seed'])}").info.run_id  # fmt: skip
            cell_params = curated_params(cell, model, datamodule, "32-true")
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in cell_params.items()])
            log_dataset(client, run_id, datamodule)
            values = {
                "test/err1": row["test_err1"], "test/err5": row["test_err5"], "test/acc1": 1 - row["test_err1"],
                "val/acc1_best": 1 - row["val_err1_best"], "time/seconds": row["seconds"],
                "test/images": datamodule.split_counts()["test"], "flops_per_image": flops,
                "images_seen": steps * cfg.data.batch_size,
            }  # fmt: skip
            metrics = [Metric(k, float(v), now, 0) for k, v in values.items() if not _missing(v)]
            client.log_batch(run_id, metrics=metrics)
            seconds = 0.0 if _missing(row["seconds"]) else float(row["seconds"])
            client.set_terminated(run_id, row["status"], end_time=now + int(1000 * seconds))
    client.set_terminated(parent, "FINISHED", end_time=now)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def origin_of(row) -> str:
    """The id a CSV row's run was first recorded under: its own, unless it came by an import."""
    first = row.get("origin_run")
    return first if isinstance(first, str) and first else row["run_id"]

"""`vgg-ablation <command> [key=value ...]`: dispatch, `--help` and `--version`, and the one place
where a refused input becomes `error: ...` on stderr with exit code 2.

Every command's keys come from a typed schema (config.py): training ones are Hydra overrides
(`arch=C seed=1 data=cifar10 trainer.max_epochs=30`), the others typed options. `--help` on any
command prints what it does, its keys with their defaults and an example, and touches nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import logging
import os
import re
import sys
from dataclasses import dataclass

from vgg_ablation.errors import UserError


@dataclass(frozen=True)
class Command:
    what: str  # one line: what it does
    usage: str  # the arguments it takes
    example: str
    # which keys --help lists: a section of the training config ("train", "study", "report", "export",
    # "bench": SECTIONS below), an options schema's name in config.py, or "" for none
    keys: str
    notes: str = ""
    # "module:function" that runs it, imported only when the command is chosen: a new command is
    # one entry here plus its module
    runs: str = dataclasses.field(kw_only=True)


COMMANDS = {
    "summary": Command("the per-layer table of one network (the paper's geometry by default)",
                       "summary [key=value ...]", "vgg-ablation summary arch=C input_size=32 num_classes=10 width=0.25",
                       "SummaryOptions", runs="vgg_ablation.nets.design:run_summary"),
    "train": Command("one training run (one cell of a study), recorded in MLflow",
                     "train [key=value ...]", "vgg-ablation train arch=C seed=1 trainer.max_epochs=30 optim=cosine",
                     "train", runs="vgg_ablation.training.train:run_train"),
    "study": Command("a study: every net x seed as a Hydra multirun into one MLflow experiment, then its report",
                     "study [experiment=NAME] [key=value ...]",
                     "vgg-ablation study experiment=cifar10-cpu data.root=~/data/cifar10", "study",
                     "A study with study.max_seeds runs until decided: seeds are added, a look at a time, only "
                     "to the nets of a comparison still open. Running the same command again continues it.", runs="vgg_ablation.runner.study:run_study"),
    "report": Command("write reports/<study>.md (with plots and a runs CSV) from the study's MLflow runs",
                      "report [experiment=NAME] [key=value ...]", "vgg-ablation report experiment=sample", "report", runs="vgg_ablation.report.document:run_report"),
    "export": Command("write a study's runs (histories, artifacts) into one archive that any store can import",
                      "export [experiment=NAME] [key=value ...]",
                      "vgg-ablation export experiment=cifar10-cpu archive.out=cifar10-cpu.tar.gz", "export",
                      "Reads the store, never changes it. With archive.from_csv=<a report's runs CSV>, rebuilds the "
                      "archive of a study whose store was lost (it needs the study's data, for its digest).", runs="vgg_ablation.runner.travel:run_export"),
    "import": Command("import study archives into a store: nothing twice, two machines' cells merged",
                      "import ARCHIVE [ARCHIVE ...] [key=value ...]",
                      "vgg-ablation import reports/cifar10-cpu-archive.tar.gz", "ImportOptions",
                      "Then the study's own command continues it (finished cells are skipped), and "
                      "`vgg-ablation report` re-analyses it.", runs="vgg_ablation.runner.travel:run_import"),
    "bench": Command("training images/s: plain PyTorch against this project's Lightning path, and per net",
                     "bench [key=value ...]", "vgg-ablation bench arch=A bench.rounds=5 bench.folders=true", "bench", runs="vgg_ablation.commands.bench_cells:run_bench"),
    "ui": Command("MLflow's dashboard on this folder's store; with a study's overrides, where that study is",
                  "ui [host=... port=...] [experiment=NAME ...]", "vgg-ablation ui experiment=sample", "UiOptions", runs="vgg_ablation.commands.ui:run_ui"),
    "sync": Command("send the records runs kept on disk while their tracking store was away",
                    "sync [JOURNAL ...] [tracking_uri=URI]",
                    "vgg-ablation sync checkpoints/<run>/outbox.jsonl", "",
                    "With no journal named, every outbox.jsonl under ./checkpoints is sent.\n\n"
                    "keys:\n  tracking_uri=URI    the store to send to (default: the one each journal names)",
                    runs="vgg_ablation.tracking.outbox:run_sync"),
    "server": Command("a lab's shared tracking server: PostgreSQL + MLflow with logins, under one folder",
                      "server [key=value ...]", "vgg-ablation server root=/srv/vgg-ablation host=0.0.0.0",
                      "ServerOptions", runs="vgg_ablation.tracking.labserver:run_server"),
    "server-user": Command("add a lab member's login to a running lab server, and grant them a study",
                           "server-user name=USER [study=NAME permission=EDIT] [root=... port=...]",
                           "vgg-ablation server-user root=/srv/vgg-ablation name=alice study=cifar10-cpu",
                           "ServerUserOptions", runs="vgg_ablation.tracking.labserver:run_server_user"),
}  # fmt: skip
# The sections of the training config each command's --help lists.
SECTIONS = {
    "train": ("arch", "seed", "model", "optim", "data", "trainer", "logger"),
    "study": ("study",),
    "report": ("study", "logger.tracking_uri", "logger.ui_url"),
    "export": ("archive", "logger.tracking_uri"),
    "bench": ("bench", "arch", "data.batch_size", "model.width", "trainer.precision"),
}


def usage() -> str:
    lines = ["usage: vgg-ablation <command> [key=value ...]   (vgg-ablation <command> --help for its keys)",
             "", "commands:"]  # fmt: skip
    lines += [f"  {name:8s} {c.what}" for name, c in COMMANDS.items()]
    return "\n".join(lines)


def help_text(name: str) -> str:
    """What a command does, its keys with their defaults (from the schema), an example."""
    from vgg_ablation import config

    command = COMMANDS[name]
    lines = [f"usage: vgg-ablation {command.usage}", "", command.what[0].upper() + command.what[1:] + "."]
    if command.notes:
        lines += ["", command.notes]
    if command.keys in SECTIONS:
        cfg = config.compose(
            config.study_overrides([]) if command.keys in ("study", "report", "export") else []
        )
        if command.keys in ("study", "report", "export"):
            lines += ["", f"experiment=NAME: the study, one of: {', '.join(config.studies())} "
                          f"(files in {config.CONF_DIR / 'experiment'}); default {config.DEFAULT_STUDY}",
                      "study_dir=DIR: also look in your own folder of studies, DIR/NAME.yaml "
                      f"(or set ${config.STUDY_DIR_ENV}); a study file there is a delta like the package's"]  # fmt: skip
        lines += ["", "keys (default):"] + _config_keys(cfg, SECTIONS[command.keys])
        if command.keys == "study":
            lines += ["  ... and every key of `vgg-ablation train --help`"]
    elif command.keys:
        schema = getattr(config, command.keys)
        lines += ["", "keys (default):"] + _schema_keys(schema, dataclasses.asdict(schema()))
    lines += ["", f"example: {command.example}"]
    return "\n".join(lines)


def _config_keys(cfg, sections: tuple[str, ...]) -> list[str]:
    from omegaconf import OmegaConf

    from vgg_ablation import config

    flat = _flatten(OmegaConf.to_container(cfg, resolve=False))
    comments = {}
    for schema, prefix in _schemas(config.Config):
        comments.update({f"{prefix}{k}": v for k, v in _field_comments(schema).items()})
    chosen = [k for k in flat if any(k == s or k.startswith(s + ".") for s in sections)]
    return [_key_line(k, flat[k], comments.get(k, "")) for k in chosen]


def _schema_keys(schema, defaults: dict) -> list[str]:
    comments = _field_comments(schema)
    return [_key_line(k, v, comments.get(k, "")) for k, v in defaults.items()]


def _key_line(key: str, value, comment: str) -> str:
    shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    comment = re.split(r"\.\s+(?=[A-Z])|; ", comment)[0]  # its first clause: --help is a list, not the docs
    comment = comment if len(comment) <= 80 else comment[:77] + "..."
    text = f"  {key}={shown}"
    return f"{text:40s} {comment}".rstrip() if comment else text


def _flatten(node, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(
            _flatten(value, f"{prefix}{key}." if isinstance(value, dict) and value else f"{prefix}{key}")
        )
    return {k.rstrip("."): v for k, v in out.items()}


def _schemas(schema, prefix: str = ""):
    yield schema, prefix
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _schemas(type(default), f"{prefix}{f.name}.")


def _field_comments(schema) -> dict[str, str]:
    """Each field's comment in the schema's source: the one on its line, else the block above."""
    comments, above = {}, []
    for line in inspect.getsource(schema).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        match = re.match(r"(\w+): [^=]+=.*?(?:  # (.*))?$", stripped)
        if match:
            comments[match.group(1)] = match.group(2) or " ".join(above)
        above = []
    return comments


def _expand_home(arg: str) -> str:
    """key=~/path as users type it: the shell leaves a ~ after = alone, and Hydra cannot parse it."""
    key, sep, value = arg.partition("=")
    if sep and value.startswith("~"):
        return f"{key}={os.path.expanduser(value)}"
    return os.path.expanduser(arg) if arg.startswith("~") else arg


def check_launcher_installed(args: list[str]) -> None:
    """A SLURM preset without the [cluster] extra: one line that says what to install (Hydra
    would say it cannot load 'hydra/launcher/submitit_slurm', in a dozen lines)."""
    import importlib.util

    chosen = [a.split("=", 1)[1] for a in args if a.startswith("hydra/launcher=")]
    if chosen and chosen[-1].startswith("slurm") and importlib.util.find_spec("submitit") is None:
        raise UserError(
            f"hydra/launcher={chosen[-1]} needs the cluster extra: pip install 'vgg-ablation[cluster]'"
        )


def version() -> str:
    from vgg_ablation import __version__
    from vgg_ablation.tracking.stores import git_commit

    commit = git_commit()
    return f"vgg-ablation {__version__}" + (f" (git {commit})" if commit != "unknown" else "")


def dispatch(name: str, args: list[str]) -> int:
    """Run a command: its module is imported only now (a command's --help imports none of them)."""
    module, function = COMMANDS[name].runs.split(":")
    return getattr(importlib.import_module(module), function)(args) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # MLflow announces each schema migration of a new store at INFO: not news for our users.
    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(version())
        return 0
    command, args = argv[0], [_expand_home(a) for a in argv[1:]]
    try:
        if command not in COMMANDS:
            raise UserError(f"unknown command {command!r}; choose one of: {', '.join(COMMANDS)}")
        flags = [a for a in args if a.startswith("-")]
        if any(f in ("-h", "--help") for f in flags):
            with contextlib.suppress(BrokenPipeError):  # `... --help | head` is fine
                print(help_text(command))
            return 0
        if command == "import" and "--dry-run" in flags:  # the spelling users know from other tools
            args = ["dry_run=true" if a == "--dry-run" else a for a in args]
            flags.remove("--dry-run")
        if flags:
            raise UserError(f"unknown option {flags[0]!r} for {command}: it takes key=value (see --help)")
        check_launcher_installed(args)
        return dispatch(command, args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a tracking server's 401/403 anywhere: one line, not a traceback
        from vgg_ablation.tracking.stores import refusal

        why = refusal(exc)
        if why is None:
            raise
        print(f"error: {why}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

"""Every command the README and docs show, as typed: each `vgg-ablation ...` line's keys and values
are read the way the command reads them (a training config through Hydra, options through their
typed schema) without training anything, and each `make ...` target exists. The ones that train
run tiny-sized elsewhere in the suite (the smoke and sample studies, export and import, reports)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from vgg_ablation import config
from vgg_ablation.commands import cli

from .conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shown_commands() -> list[tuple[str, str]]:
    """(file, command line) for every command in a fenced code block of the README and docs."""
    found = []
    for path in DOCS:
        inside = False
        for line in path.read_text().splitlines():
            if line.startswith("```"):
                inside = not inside
                continue
            text = line.split("  #")[0].strip()
            if (
                inside
                and text.startswith(("vgg-ablation ", "make "))
                and "<" not in text
                and "..." not in text
            ):
                found.append((path.name, text))
    return found


COMMANDS = shown_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) > 25


@pytest.mark.parametrize("where,line", COMMANDS, ids=[f"{w}:{c[:60]}" for w, c in COMMANDS])
def test_a_command_in_the_docs_is_read_as_typed(where, line, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a study_dir= link, if any, lands here
    words = shlex.split(line)
    if words[0] == "make":
        targets = re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M)
        assert all(w in targets for w in words[1:] if "=" not in w), f"{where}: no make target in {line!r}"
        return
    name, args = words[1], [cli._expand_home(a) for a in words[2:]]
    assert name in cli.COMMANDS, f"{where}: {line!r}"
    (tmp_path / "my-studies").mkdir()
    args = [a.replace(str(Path.home() / "my-studies"), str(tmp_path / "my-studies")) for a in args]
    if any(a in ("-h", "--help") for a in args):
        return
    keys = cli.COMMANDS[name].keys
    if keys in cli.SECTIONS:  # a training config: composed as the command composes it
        overrides = [a for a in args if "=" in a and not a.startswith("experiment=mine")]
        overrides = config.study_overrides(overrides) if keys in ("study", "report", "export") else overrides
        for each in _one_per_study(overrides):
            config.compose(config.with_study_dir(each))
    elif keys:  # typed options
        schema = getattr(config, keys)
        config.options(schema, [a for a in args if "=" in a and not a.startswith("experiment=")], name)


def _one_per_study(overrides: list[str]) -> list[list[str]]:
    """`experiment=a,b` (a report over several studies) is one config per study."""
    named = [o for o in overrides if o.startswith("experiment=")]
    if not named or "," not in named[-1]:
        return [overrides]
    rest = [o for o in overrides if not o.startswith("experiment=")]
    return [[f"experiment={n}", *rest] for n in named[-1].split("=", 1)[1].split(",")]


@pytest.mark.slow
def test_make_study_in_a_fresh_clone_says_where_its_report_is_and_leaves_the_checkout_clean(tmp_path):
    """The README's first command, as a newcomer types it in a fresh clone (sized down: two nets,
    two seeds, a few batches): it prints where its report went, the report has no `nan` and says
    what to do next, and `git status` shows nothing new (stores, checkpoints, outputs are ignored)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    venv = Path(sys.executable).parent.parent
    # this environment as the clone's (-o: never reinstall it from the clone's newer pyproject.toml)
    make = ["make", "-C", str(clone), "study", f"VENV={venv}", "-o", f"{venv}/.installed-stamp",
            "ARGS=" + " ".join(["study.archs=[A,B]", "study.seeds=[0,1]", *TINY])]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH")}
    done = subprocess.run(make, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "report: outputs/reports/sample.md" in done.stdout, done.stdout[-3000:]
    report = (clone / "outputs" / "reports" / "sample.md").read_text()
    assert not re.search(r"\bnan\b", report, re.I) and "## What next" in report
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True)
    assert status.stdout == "", status.stdout

"""The contributor's guide (docs/layout.md, "Adding a net, a claim, a dataset, a command"), each
path walked: a dummy entry added to a temporary copy of the package, in the files the guide names
and nowhere else, and the copy then trains, tests, reads or runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vgg_ablation import config
from vgg_ablation.data.datasets import NAMED
from vgg_ablation.study.cells import rule_params, study_params

from .conftest import TINY

PACKAGE = Path(__file__).resolve().parent.parent / "vgg_ablation"
SMOKE_UNTIL_DECIDED = ["experiment=smoke", "study.max_seeds=6"]


@pytest.fixture
def copy(tmp_path):
    """A copy of the package to change, and a way to run Python on it from its own folder."""
    root = tmp_path / "copy"
    shutil.copytree(PACKAGE, root / "vgg_ablation", ignore=shutil.ignore_patterns("__pycache__"))

    def edit(relative: str, old: str, new: str) -> None:
        path = root / "vgg_ablation" / relative
        text = path.read_text()
        assert text.count(old) == 1, (relative, old)
        path.write_text(text.replace(old, new))

    def run(code: str, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}
        done = subprocess.run([sys.executable, "-c", code, *args], cwd=root, env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert f"{root}/vgg_ablation/__init__.py" in done.stdout  # the copy ran, not this checkout
        return done

    copied = type("Copy", (), {})()
    copied.root, copied.edit, copied.run = root, edit, run
    return copied


PREAMBLE = "import vgg_ablation, json, sys; print(vgg_ablation.__file__)\n"


@pytest.mark.slow
def test_a_new_net_is_one_entry_in_the_zoo(copy):
    copy.edit("nets/models.py", '        _vgg("A", [64], [128], [256, 256], [512, 512], [512, 512]),\n',
              '        _vgg("A", [64], [128], [256, 256], [512, 512], [512, 512]),\n'
              '        _vgg("A-half", [32], [64], [128, 128], [256, 256], [256, 256]),\n')  # fmt: skip
    done = copy.run(
        PREAMBLE + "from vgg_ablation.config import compose\n"
        "from vgg_ablation.runner.study import check_study\n"
        "from vgg_ablation.commands.cli import main\n"
        "check_study(compose(['experiment=smoke', 'study.archs=[A,A-half]']))\n"
        "assert main(['summary', 'arch=A-half', 'input_size=32', 'num_classes=10']) == 0\n"
        "assert main(['train', 'arch=A-half', *sys.argv[1:]]) == 0\n",
        *TINY[:-1],
    )
    assert "A-half" in done.stdout and "FINISHED" in done.stdout + done.stderr


def test_a_new_claim_is_one_entry_and_a_registered_study_keeps_its_own(copy):
    """A claim the project gains is tested by new studies of those nets; a study registered before
    it keeps the claims (and the error split) it was registered with, and continues."""
    cfg = config.compose(SMOKE_UNTIL_DECIDED)
    registered = {**study_params(cfg), **rule_params(cfg)}  # as this checkout registers it
    assert registered["rule.comparisons"] == "1"  # the smoke study's A and B: depth, B beats A
    copy.edit("study/analysis.py", "    # LRN in a design that ends whichever way the data point:",
              '    Claim(2, "depth", "A dummy: A no better than B", "A", "B", "no better"),\n'
              "    # LRN in a design that ends whichever way the data point:")  # fmt: skip
    done = copy.run(
        PREAMBLE + "from vgg_ablation.config import compose\n"
        "from vgg_ablation.study.cells import check_registered, design_of, rule_params\n"
        f"cfg = compose({SMOKE_UNTIL_DECIDED!r})\n"
        "registered = json.loads(sys.argv[1])\n"
        "check_registered(cfg, registered)  # the registered study continues\n"
        "print('new study', design_of(cfg).rule.comparisons, [c.text for c in design_of(cfg).claims if c.first == 'A'])\n"
        "print('registered study', design_of(cfg, registered).rule.comparisons)\n"
        "print('registers', rule_params(cfg)['rule.comparisons'])\n",
        json.dumps(registered),
    )
    assert "new study 2 ['A dummy: A no better than B']" in done.stdout, done.stdout
    assert "registered study 1" in done.stdout and "registers 2" in done.stdout, done.stdout


def test_a_new_named_dataset_is_one_entry_and_its_config_file(copy):
    copy.edit("data/datasets.py", '        Named("imagefolder", "folder"),\n',
              '        Named("imagefolder", "folder"),\n'
              '        Named("sample-again", "folder", root=SAMPLE_ROOT, recorded_as="sample-again"),\n')  # fmt: skip
    (copy.root / "vgg_ablation/conf/data/sample-again.yaml").write_text(
        "name: sample-again\nbatch_size: 128\n"
    )
    done = copy.run(
        PREAMBLE + "from vgg_ablation.config import compose\n"
        "from vgg_ablation.data.datasets import identify\n"
        "from vgg_ablation.runner.study import check_study\n"
        "check_study(compose(['experiment=smoke', 'data=sample-again']))\n"
        "again, sample = (identify(compose([f'data={n}']).data) for n in ('sample-again', 'sample'))\n"
        "print(again.name, again.digest == sample.digest, again.counts == sample.counts)\n"
    )
    assert "sample-again True True" in done.stdout, done.stdout


def test_every_named_dataset_has_its_config_file_and_every_file_its_entry():
    files = {p.stem for p in (config.CONF_DIR / "data").glob("*.yaml")}
    assert files == set(NAMED), files ^ set(NAMED)


def test_a_new_command_is_its_module_and_one_entry_in_the_table(copy):
    (copy.root / "vgg_ablation/commands/hello.py").write_text(
        '"""`vgg-ablation hello`: a dummy command."""\n\n\ndef run_hello(args: list[str]) -> int:\n'
        '    print("hello", *args)\n    return 0\n'
    )
    copy.edit("commands/cli.py", "COMMANDS = {\n",
              'COMMANDS = {\n    "hello": Command("say hello", "hello [word ...]", "vgg-ablation hello world", "",\n'
              '                     runs="vgg_ablation.commands.hello:run_hello"),\n')  # fmt: skip
    done = copy.run(
        PREAMBLE + "from vgg_ablation.commands.cli import main\n"
        "assert main(['hello', 'world']) == 0\n"
        "assert main(['--help']) == 0\n"
        "assert main(['hello', '--help']) == 0\n"
    )
    assert "hello world" in done.stdout
    assert "  hello    say hello" in done.stdout
    assert (
        "usage: vgg-ablation hello [word ...]" in done.stdout
        and "example: vgg-ablation hello world" in done.stdout
    )

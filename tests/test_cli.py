"""The command line's conventions: --help on every command (touching nothing), --version, one
`error:` line and exit code 2 for what it refuses."""

import time

import pytest

from vgg_ablation import __version__
from vgg_ablation.commands import cli


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_help_says_what_a_command_does_its_keys_and_an_example_and_writes_nothing(
    command, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert cli.main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: vgg-ablation {command}") and cli.COMMANDS[command].what[1:] in text
    assert "example: vgg-ablation " + command in text
    assert list(tmp_path.iterdir()) == []  # no store, no sweep folder, no report
    if command in ("train", "bench", "summary", "server", "ui"):
        assert "keys (default):" in text and "=" in text.split("keys (default):")[1]


def test_help_lists_the_schema_defaults_with_their_comments(capsys):
    cli.main(["study", "--help"])
    text = capsys.readouterr().out
    assert "study.max_seeds=null" in text and "study.alpha=0.05" in text
    assert "experiment=NAME: the study, one of: cifar10, cifar10-cpu" in text
    cli.main(["train", "-h"])
    text = capsys.readouterr().out
    assert "model.width=0.25" in text and "trainer.max_epochs=10" in text
    line = next(x for x in text.splitlines() if x.strip().startswith("model.batch_norm="))
    assert "the paper has none" in line


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--foo"], "error: unknown option '--foo' for train: it takes key=value (see --help)"),
        (["nope"], "error: unknown command 'nope'; choose one of: summary, train, study"),
        (["summary", "width=x"], "error: width must be a number, got 'x'"),
        (["summary", "colour=red"], "error: summary takes arch=, input_size="),
        (["ui", "port=web"], "error: port must be a positive whole number, got 'web'"),
    ],
)
def test_refused_input_is_one_error_line_and_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"vgg-ablation {__version__}")


def test_a_studys_time_left_counts_the_cells_still_to_train_at_the_time_a_trained_cell_takes(monkeypatch):
    """A resumed look: 6 cells, the first FINISHED before (it skips). Skipped cells neither
    shorten the estimate (they are not quick trained cells) nor lengthen it (not cells to train)."""
    from vgg_ablation.training import progress as train
    from vgg_ablation.training.cell_run import CellResult

    monkeypatch.setattr(train, "_THIS_PROCESS", {"trained": []})
    monkeypatch.setenv(train.PROGRESS_ENV, f"18:24:{time.time()}:{19 * 1000.0}:19:f100000")

    def ended(job: int, status: str, seconds: float = 0.0) -> str:
        progress = train.Progress.from_env(job)
        train.Progress.count(CellResult(cell="c", arch="B", seed=106, status=status, seconds=seconds))
        return progress.left()

    assert ended(0, "SKIPPED") == "about 1h23m left (5 cells to train)"  # 5 x the store's 1,000 s
    assert ended(1, "FINISHED", 1200.0) == "about 1h07m left (4 cells to train)"  # mean 1,010 s
    monkeypatch.setattr(train, "_THIS_PROCESS", {"trained": []})
    monkeypatch.setenv(train.PROGRESS_ENV, f"0:4:{time.time()}:0:0:f1100")  # a new study's launch, 2 done
    assert ended(0, "SKIPPED") == "2 cells to train (time left known after the first)"  # 1 more skips
    assert ended(1, "SKIPPED") == "2 cells to train (time left known after the first)"
    assert ended(2, "FINISHED", 60.0) == "about 1m00s left (1 cell to train)"
    assert ended(3, "FINISHED", 60.0) == "last cell"


def test_cells_side_by_side_share_the_time_left(monkeypatch):
    """Two cells trained at once (a CPU study's default): the cells still to train take half the time."""
    from vgg_ablation.training import progress

    monkeypatch.setattr(progress, "_THIS_PROCESS", {"trained": []})
    monkeypatch.setenv(progress.PROGRESS_ENV, f"0:10:{time.time()}:{4 * 600.0}:4:f0000000000:2")
    assert progress.Progress.from_env(3).left() == "about 30m00s left (6 cells to train)"  # 6 x 600 s / 2


def test_a_resumed_study_s_time_left_is_right_in_every_side_by_side_process(monkeypatch):
    # 36 cells, the first 26 FINISHED when the look was resumed: each of the two processes training
    # cells side by side skipped about half of them, and once said "nothing more to train" with 9 left
    from vgg_ablation.training import progress

    monkeypatch.setattr(progress, "_THIS_PROCESS", {"trained": [2000.0]})
    monkeypatch.setenv(progress.PROGRESS_ENV, f"0:36:{time.time()}:{26 * 1000.0}:26:f{'1' * 26}{'0' * 10}:2")
    assert progress.Progress.from_env(26).left() == "about 1h17m left (9 cells to train)"  # 9 x 1,037 s / 2
    assert progress.Progress.from_env(35).left() == "last cell"
    assert progress.Progress.from_env(30).left() == "about 43m12s left (5 cells to train)"


def test_every_command_names_a_function_that_runs_it():
    """The table of commands is the one place a command lives: each entry's `runs` resolves to a
    function of one argument (the command's arguments), in a module of the package."""
    import importlib
    import inspect

    for name, command in cli.COMMANDS.items():
        module, function = command.runs.split(":")
        assert module.startswith("vgg_ablation."), name
        run = getattr(importlib.import_module(module), function)
        assert callable(run) and len(inspect.signature(run).parameters) == 1, name

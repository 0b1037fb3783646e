"""The fast path (bf16 autocast + channels_last, as on a GPU) learns what the plain fp32 path
learns: same seed, same data, test accuracy within noise. On CPU, where both options exist."""

import pytest

from .conftest import all_runs, cli_in_process

pytestmark = pytest.mark.slow

BUDGET = [
    "arch=A",
    "seed=0",
    "model.width=0.125",
    "model.dropout=0.2",
    "optim=cosine",
    "optim.lr=0.02",
    "trainer.max_epochs=3",
    "trainer.progress_bar=false",
]


@pytest.mark.long
def test_fast_path_reaches_the_plain_paths_accuracy(workdir, monkeypatch):
    accuracy = {}
    for name, extra in {
        "plain": ["trainer.precision=32-true", "trainer.channels_last=off"],
        "fast": ["trainer.precision=bf16-mixed", "trainer.channels_last=on"],
    }.items():
        folder = workdir / name
        folder.mkdir()
        out = cli_in_process(["train", *BUDGET, *extra], folder, monkeypatch)
        assert out.returncode == 0, out.stderr[-3000:]
        (run,) = all_runs(folder)
        assert run.data.params["precision"] == extra[0].split("=")[1]
        accuracy[name] = run.data.metrics["test/acc1"]
    assert accuracy["plain"] > 0.2 and accuracy["fast"] > 0.2  # both learned (chance: 0.1)
    # 1,000 test images: a binomial sd of ~1.5 points; seed-to-seed spread is ~1.5 points too.
    assert abs(accuracy["fast"] - accuracy["plain"]) < 0.05, accuracy

"""One real training run through the CLI into a temporary MLflow store, read back with MLflow."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from .conftest import TINY, all_runs, make_imagefolder, run_cli, store_uri

pytestmark = pytest.mark.slow


def test_tiny_run_is_fully_recorded(workdir):
    out = run_cli(["train", "arch=C", "seed=1", "data=sample", *TINY], workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "C seed=1: FINISHED" in out.stdout
    client = MlflowClient(store_uri(workdir))  # MLflow's default store in the working folder
    (run,) = all_runs(workdir)
    assert run.info.status == "FINISHED"
    params = run.data.params
    for key, value in {
        "arch": "C",
        "depth": "16",
        "seed": "1",
        "data": "sample",
        "epochs": "2",
        "width": "0.0625",
        "batch_size": "32",
        "lr": "0.01",
        "schedule": "plateau",
        "init": "kaiming",
        "precision": "32-true",
    }.items():
        assert params[key] == value, key
    assert int(params["params"]) > 0
    tags = run.data.tags
    assert tags["device"] == "cpu" and tags["torch_version"] and tags["lightning_version"]
    assert tags["git_commit"]
    history = client.get_metric_history(run.info.run_id, "val/acc1")
    assert sorted(m.step for m in history) == [0, 1]  # one point per epoch
    for key in ("test/acc1", "test/acc5", "test/err1", "test/loss", "train/loss"):
        assert key in run.data.metrics
    assert run.data.metrics["test/images"] == 64
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(workdir))
    assert "arch: C" in Path(config).read_text()


def test_same_seed_same_metrics_on_cpu(workdir):
    metrics = []
    for attempt in range(2):
        folder = workdir / str(attempt)
        folder.mkdir()
        out = run_cli(["train", "arch=A", "seed=3", *TINY], folder)
        assert out.returncode == 0, out.stderr[-3000:]
        (run,) = all_runs(folder)
        metrics.append({k: v for k, v in run.data.metrics.items() if not k.startswith("time/")})
    assert metrics[0] == metrics[1]


def test_imagefolder_run(workdir):
    root = make_imagefolder(workdir / "imgs")
    out = run_cli(
        [
            "train",
            "arch=A",
            "data=imagefolder",
            f"data.root={root}",
            "data.input_size=32",
            "data.train_scale=36",
            "data.test_scale=36",
            "data.num_workers=0",
            "data.val_fraction=0.25",
            *TINY,
        ],
        workdir,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = all_runs(workdir)
    assert run.info.status == "FINISHED" and run.data.params["num_classes"] == "2"


def _broken_folder(workdir, kind):
    root = workdir / "imgs"
    if kind == "empty":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
        return root
    make_imagefolder(root)
    if kind == "corrupt":
        (root / "train" / "dog" / "0000-bad.jpg").write_bytes(b"garbage")
    if kind == "classes":
        (root / "val" / "cat").rename(root / "val" / "bird")
    return root


@pytest.mark.parametrize(
    "args,message",
    [
        (["arch=F"], "unknown arch 'F'; choose one of: A, A-LRN, B, C, D, E, B-5x5, lenet, alexnet"),
        (
            ["data=mnist"],
            "unknown data 'mnist'; choose one of: cifar10, cifar100, imagefolder, sample, synthetic",
        ),
        (["data=imagefolder", "data.root={tmp}/nowhere"], "dataset folder not found"),
        (["data=imagefolder", "data.root={empty}"], "dataset folder is empty"),
        (["data=imagefolder", "data.root={corrupt}", "data.input_size=32"], "corrupt image: "),
        (["data=imagefolder", "data.root={classes}", "data.input_size=32"], "have different classes"),
        (["data.batch_size=0"], "data.batch_size must be positive, got 0"),
        (["optim.lr=-0.1"], "optim.lr must be positive, got -0.1"),
        (["trainer.max_epochs=0"], "trainer.max_epochs must be positive, got 0"),
        (["data.input_size=16"], "A needs inputs of at least 32x32"),
        (["trainer.max_epoch=3"], "Key 'max_epoch' not in 'TrainerConfig'"),
        (["logger.tracking_uri=http://127.0.0.1:9"], "MLflow tracking server unreachable"),
        (["data=cifar10", "data.root={tmp}/cifar"], "could not get cifar10 into"),
    ],
)
def test_bad_input_one_line_nonzero_exit_nothing_recorded(workdir, args, message):
    paths = {"tmp": workdir}
    for kind in ("empty", "corrupt", "classes"):
        if any("{" + kind + "}" in a for a in args):
            paths[kind] = _broken_folder(workdir / kind, kind)
    args = [a.format(**paths) for a in args]
    out = run_cli(["train", *TINY, *args], workdir, timeout=120)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert message in lines[0]
    assert "Traceback" not in out.stderr
    assert all_runs(workdir) == []
    assert not (workdir / "outputs").exists()

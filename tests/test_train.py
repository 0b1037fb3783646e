"""One real training run through the CLI into a temporary MLflow store, read back with MLflow."""

import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from .conftest import TINY, all_runs, cli_in_process, make_imagefolder, run_cli, store_uri

pytestmark = pytest.mark.slow


def test_tiny_run_is_fully_recorded(workdir, monkeypatch):
    out = cli_in_process(["train", "arch=C", "seed=1", "data=sample", *TINY], workdir, monkeypatch)
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
    assert int(tags["cpu_threads"]) >= 1  # CPU numbers depend on it
    # ... and on the memory layout: on by default for a CPU cell on one thread
    assert tags["channels_last"] == ("true" if tags["cpu_threads"] == "1" else "false")
    assert tags["git_commit"]
    history = client.get_metric_history(run.info.run_id, "val/acc1")
    assert sorted(m.step for m in history) == [0, 1]  # one point per epoch
    for key in ("test/acc1", "test/acc5", "test/err1", "test/loss", "train/loss"):
        assert key in run.data.metrics
    assert run.data.metrics["test/images"] == 64
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(workdir))
    assert "arch: C" in Path(config).read_text()


def test_same_seed_same_metrics_on_cpu(workdir, monkeypatch):
    # once in a fresh process, once in this one after whatever this worker ran before: the seed
    # alone decides, not the process's history
    metrics = []
    for attempt in range(2):
        folder = workdir / str(attempt)
        folder.mkdir()
        args = ["train", "arch=A", "seed=3", *TINY]
        out = run_cli(args, folder) if attempt == 0 else cli_in_process(args, folder, monkeypatch)
        assert out.returncode == 0, out.stderr[-3000:]
        (run,) = all_runs(folder)
        metrics.append({k: v for k, v in run.data.metrics.items() if not k.startswith(("time/", "system/"))})
    assert metrics[0] == metrics[1]


def test_imagefolder_run(workdir, monkeypatch):
    root = make_imagefolder(workdir / "imgs")
    out = cli_in_process(
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
        monkeypatch,
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
    if kind == "valonly":  # a class in val/ that train/ lacks
        (root / "val" / "bird").mkdir()
        next((root / "val" / "cat").iterdir()).rename(root / "val" / "bird" / "x.jpg")
    if kind == "zerobyte":
        (root / "train" / "cat" / "empty.jpg").write_bytes(b"")
    if kind == "textonly":
        for split in ("train", "val"):
            for cls in ("cat", "dog"):
                for image in (root / split / cls).iterdir():
                    image.unlink()
                (root / split / cls / "labels.csv").write_text("file,label\n")
    return root


@pytest.mark.parametrize(
    "args,message",
    [
        (["arch=F"], "unknown arch 'F'; choose one of: A, A-LRN, A-LRN0, B, C, D, E, B-5x5, lenet, alexnet"),
        (
            ["data=mnist"],
            "unknown data 'mnist'; choose one of: cifar10, cifar100, imagefolder, sample, synthetic",
        ),
        (["data=imagefolder", "data.root={tmp}/nowhere"], "dataset folder not found"),
        (["data=imagefolder", "data.root={empty}"], "dataset folder is empty"),
        (["data=imagefolder", "data.root={corrupt}", "data.input_size=32"], "corrupt image: "),
        (["data=imagefolder", "data.root={classes}", "data.input_size=32"], "have different classes"),
        (["data=imagefolder", "data.root={valonly}"], "only in val: ['bird']"),
        (["data=imagefolder", "data.root={zerobyte}"], "empty image file (0 bytes): "),
        (["data=imagefolder", "data.root={textonly}"], "dataset folder has no images: "),
        (["data.batch_size=0"], "data.batch_size must be positive, got 0"),
        (["optim.lr=-0.1"], "optim.lr must be positive, got -0.1"),
        (["trainer.max_epochs=0"], "trainer.max_epochs must be positive, got 0"),
        (["data.input_size=16"], "A needs inputs of at least 32x32"),
        (["trainer.max_epoch=3"], "Key 'max_epoch' not in 'TrainerConfig'"),
        (["logger.tracking_uri=http://127.0.0.1:9"], "MLflow tracking server unreachable"),
        (["data=cifar10", "data.root={tmp}/cifar"], "cifar10 not found in"),
    ],
)
def test_bad_input_one_line_nonzero_exit_nothing_recorded(workdir, args, message, monkeypatch):
    paths = {"tmp": workdir}
    for kind in ("empty", "corrupt", "classes", "valonly", "zerobyte", "textonly"):
        if any("{" + kind + "}" in a for a in args):
            paths[kind] = _broken_folder(workdir / kind, kind)
    args = [a.format(**paths) for a in args]
    out = cli_in_process(["train", *TINY, *args], workdir, monkeypatch)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert message in lines[0]
    assert "Traceback" not in out.stderr
    assert all_runs(workdir) == []
    assert not (workdir / "outputs").exists()


def test_bad_input_in_a_real_process_is_one_line_and_exit_2(workdir):
    out = run_cli(["train", *TINY, "arch=F"], workdir, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: unknown arch 'F'; choose one of: A, A-LRN, A-LRN0, B, C, D, E, B-5x5, lenet, alexnet"
    ], out.stderr[-2000:]
    assert all_runs(workdir) == [] and not (workdir / "outputs").exists()


def _sample_as_folder(
    root: Path, classes=None, per_class=None, mode="RGB", size=None, val_per_class=None
) -> Path:
    """The embedded sample laid out as a user's folder: train/ = its train, val/ = its test."""
    from PIL import Image

    from vgg_ablation.data.datasets import SAMPLE_ROOT

    for split, target, limit in (("train", "train", per_class), ("test", "val", val_per_class)):
        for cls_dir in sorted((SAMPLE_ROOT / split).iterdir()):
            if classes and cls_dir.name not in classes:
                continue
            out = root / target / cls_dir.name
            out.mkdir(parents=True)
            for src in sorted(cls_dir.glob("*.jpg"))[:limit]:
                if mode == "RGB" and size is None:
                    shutil.copy(src, out / src.name)
                elif mode == "I;16":  # a scientific camera's 16-bit grayscale, the full range used
                    import numpy as np

                    with Image.open(src) as im:
                        gray = np.asarray(im.convert("L").resize(size, Image.BICUBIC), dtype=np.uint16)
                    Image.fromarray(gray * 257).save(out / (src.stem + ".png"))
                else:
                    with Image.open(src) as im:
                        im.convert(mode).resize(size, Image.BICUBIC).save(out / (src.stem + ".png"))
    return root


def _test_acc(folder: Path) -> float:
    (run,) = all_runs(folder)
    assert run.info.status == "FINISHED"
    return run.data.metrics["test/acc1"]


def test_the_sample_as_a_folder_learns_as_well_as_data_sample(workdir, monkeypatch):
    budget = ["trainer.max_epochs=2", "model.width=0.125", "trainer.progress_bar=false"]  # the default recipe
    root = _sample_as_folder(workdir / "sample-folder")
    (workdir / "a").mkdir()
    (workdir / "b").mkdir()
    folder = cli_in_process(
        ["train", "data=imagefolder", f"data.root={root}", *budget], workdir / "a", monkeypatch
    )
    assert folder.returncode == 0, folder.stderr[-3000:]
    assert "S=32, Q=32, crop 32" in folder.stdout and "in memory" in folder.stdout
    sample = cli_in_process(["train", "data=sample", *budget], workdir / "b", monkeypatch)
    assert sample.returncode == 0, sample.stderr[-3000:]
    acc_folder, acc_sample = _test_acc(workdir / "a"), _test_acc(workdir / "b")
    assert abs(acc_folder - acc_sample) <= 0.03, (acc_folder, acc_sample)
    assert all(r.data.tags["learned"] == "true" for f in ("a", "b") for r in all_runs(workdir / f))


def test_a_grayscale_40px_folder_trains_at_sizes_taken_from_the_folder(workdir, monkeypatch):
    classes = ("airplane", "automobile", "frog", "horse")
    root = _sample_as_folder(
        workdir / "gray", classes, per_class=450, mode="L", size=(40, 40), val_per_class=100
    )
    # the sizes come from the folder alone; the net is narrower than the default, for the suite's time
    out = cli_in_process(["train", "data=imagefolder", f"data.root={root}", "model.width=0.125",
                          "trainer.progress_bar=false"], workdir, monkeypatch)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1,800 train" not in out.stdout  # validation carved from train/, val/ is the test set
    assert (
        "1,620 train / 180 val / 400 test images, 4 classes; median shorter side 40 px -> S=40, Q=40, crop 40"
        in out.stdout
    )
    assert "learned nothing" not in out.stderr
    (run,) = all_runs(workdir)
    assert run.data.tags["learned"] == "true" and run.data.metrics["test/acc1"] > 0.35
    assert run.data.params["input_size"] == "40" and run.data.params["train_scale"] == "40"
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "gray" and dataset.dataset.digest == run.data.params["data_digest"]


def test_a_16_bit_grayscale_folder_trains_above_chance(workdir, monkeypatch):
    # 48x48 16-bit PNGs (mode I;16), 3 classes: read as white before, at chance, FINISHED
    root = _sample_as_folder(workdir / "g16", ("airplane", "frog", "truck"), per_class=450, mode="I;16",
                             size=(48, 48), val_per_class=100)  # fmt: skip
    out = cli_in_process(["train", "data=imagefolder", f"data.root={root}", "model.width=0.125",
                          "trainer.progress_bar=false"], workdir, monkeypatch)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = all_runs(workdir)
    assert run.data.tags["learned"] == "true" and run.data.metrics["test/acc1"] > 0.45, run.data.metrics


def test_a_moved_folder_keeps_its_cells_and_other_data_gets_new_ones(workdir):
    # three launches, as a user makes them: each process lists the folder once (datasets.identify)
    root = make_imagefolder(workdir / "imgs", per_class=8)
    args = ["train", "data=imagefolder", "study.name=mine", *TINY]
    first = run_cli([*args, f"data.root={root}"], workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    moved = root.rename(workdir / "moved")
    again = run_cli([*args, f"data.root={moved}"], workdir)
    assert again.returncode == 0 and "already FINISHED" in again.stdout, again.stdout[-2000:]
    assert len(all_runs(workdir)) == 1
    next((moved / "train" / "cat").iterdir()).unlink()  # different data, same study name
    other = run_cli([*args, f"data.root={moved}"], workdir)
    assert other.returncode == 0 and "FINISHED in" in other.stdout, other.stdout[-2000:]
    runs = all_runs(workdir)
    assert len(runs) == 2 and len({r.data.tags["data_digest"] for r in runs}) == 2


def test_the_task_returns_validation_accuracy_never_test(workdir, monkeypatch):
    """What a sweeper (Optuna, Ax) optimises is the task's return value."""
    from vgg_ablation.config import compose
    from vgg_ablation.training.train import task

    monkeypatch.chdir(workdir)
    cfg = compose(
        ["arch=A", *TINY, "trainer.limit_val_batches=4", f"logger.tracking_uri={store_uri(workdir)}"]
    )
    value = task(cfg, multirun=True)
    (run,) = all_runs(workdir)
    best_val = max(
        m.value for m in MlflowClient(store_uri(workdir)).get_metric_history(run.info.run_id, "val/acc1")
    )
    assert value == pytest.approx(best_val)
    assert task(cfg, multirun=True) == pytest.approx(best_val)  # a skipped (finished) cell too

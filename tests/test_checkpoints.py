"""Checkpoints written atomically, and a resume that survives a damaged one."""

from __future__ import annotations

import errno
import shutil
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from vgg_ablation.training.checkpoints import (
    AtomicCheckpointIO,
    MovableCheckpoint,
    Resume,
    choose_resume,
    loads,
)


class FullDisk:
    """Pickling it fails the way a full disk fails a write: after the bytes before it went out."""

    def __reduce__(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def checkpoint(value: float) -> dict:
    return {"state_dict": {"w": torch.full((1000,), value)}, "epoch": int(value)}


def test_an_interrupted_save_leaves_the_previous_checkpoint_whole(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint(checkpoint(1.0), path)
    with pytest.raises(OSError, match="No space left"):  # the write fails part-way, as on a full disk
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3000)}, "then": FullDisk()}, path)
    assert loads(path) is None and torch.load(path, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left
    io.save_checkpoint(checkpoint(2.0), path)
    assert torch.load(path, weights_only=True)["epoch"] == 2


def cut(path, size=1000):
    path.write_bytes(path.read_bytes()[:size])


def test_resume_falls_back_from_a_cut_last_to_best_then_to_a_fresh_start(tmp_path):
    io = AtomicCheckpointIO()
    assert choose_resume(tmp_path) == choose_resume(tmp_path / "none") == Resume(None, None)  # fresh, silent
    io.save_checkpoint(checkpoint(3.0), tmp_path / "last.ckpt")
    io.save_checkpoint(checkpoint(2.0), tmp_path / "best.ckpt")
    ok = choose_resume(tmp_path)
    assert ok.path == str(tmp_path / "last.ckpt") and ok.note is None

    cut(tmp_path / "last.ckpt")  # what a kill mid-write leaves with a non-atomic writer
    fallback = choose_resume(tmp_path)
    assert fallback.path == str(tmp_path / "best.ckpt")
    assert "last.ckpt does not load" in fallback.note and "resumed from best.ckpt" in fallback.note
    assert (tmp_path / "last.ckpt.damaged").is_file() and not (tmp_path / "last.ckpt").exists()

    io.save_checkpoint(checkpoint(4.0), tmp_path / "last.ckpt")
    cut(tmp_path / "last.ckpt")
    cut(tmp_path / "best.ckpt", 10)
    fresh = choose_resume(tmp_path)
    assert fresh.path is None and "restarts from epoch 0 in the same run" in fresh.note


class PeaksFirst(pl.LightningModule):
    """A real LightningModule whose validation accuracy is best in its first epoch, then falls."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, _):
        return (self.w - batch[0]).pow(2).mean()

    def validation_step(self, batch, _):
        self.log("val/acc1", 0.9 - 0.1 * self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 1)), batch_size=2)

    val_dataloader = train_dataloader


def fit(folder, epochs: int, kind, resume=None) -> ModelCheckpoint:
    best = kind(dirpath=folder, filename="best", monitor="val/acc1", mode="max", save_top_k=1,
                enable_version_counter=False)  # fmt: skip
    last = kind(dirpath=folder, filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
                enable_version_counter=False)  # fmt: skip
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[best, last], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")  # fmt: skip
    trainer.fit(PeaksFirst(), ckpt_path=resume, weights_only=True)
    return best


@pytest.mark.parametrize(
    "written_by, kind",
    [
        (MovableCheckpoint, MovableCheckpoint),
        (ModelCheckpoint, MovableCheckpoint),
        (ModelCheckpoint, ModelCheckpoint),
    ],
)
def test_a_run_resumed_from_a_moved_folder_keeps_its_best_epoch(tmp_path, written_by, kind):
    # An imported archive puts a cell's checkpoints under its new run id: the test must still
    # run on the run's best epoch (epoch 0 here), not on the best since the resume; also from a
    # checkpoint Lightning's own class wrote (every archive made before this class)
    fit(tmp_path / "old-run-id", 2, written_by)
    shutil.copytree(tmp_path / "old-run-id", tmp_path / "new-run-id")
    shutil.rmtree(tmp_path / "old-run-id")  # another machine: the old folder is not there
    assert MovableCheckpoint(monitor="val/acc1").state_key == ModelCheckpoint(monitor="val/acc1").state_key
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        best = fit(tmp_path / "new-run-id", 4, kind, resume=str(tmp_path / "new-run-id" / "last.ckpt"))
    kept = torch.load(tmp_path / "new-run-id" / "best.ckpt", weights_only=True)["epoch"]
    moved_warning = any("dirpath has changed" in str(w.message) for w in caught)
    if kind is MovableCheckpoint:
        assert kept == 0 and best.best_model_score == pytest.approx(0.9) and not moved_warning
        assert best.best_model_path == str(tmp_path / "new-run-id" / "best.ckpt")
    else:  # what Lightning alone does: the first epoch after the resume becomes the best
        assert kept == 2 and best.best_model_score == pytest.approx(0.7) and moved_warning


class Recorder(pl.loggers.Logger):
    """A real Lightning logger that keeps what it was handed: metric names per epoch."""

    def __init__(self):
        super().__init__()
        self.logged: dict[int, set[str]] = {}

    name, version = "recorder", "0"

    def log_metrics(self, metrics, step=None):
        self.logged.setdefault(int(metrics["epoch"]), set()).update(metrics)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class SeenAtSave(pl.Callback):
    """What the logger held for an epoch at the moment that epoch's checkpoint was written."""

    def __init__(self, recorder: Recorder):
        self.recorder, self.seen = recorder, {}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.seen[checkpoint["epoch"]] = set(self.recorder.logged.get(checkpoint["epoch"], ()))


def test_an_epochs_checkpoint_is_written_after_all_its_figures_are_logged(tmp_path):
    # A process killed just after an epoch's checkpoint resumes at the next epoch: whatever the
    # epoch had not yet handed to the logger would be lost from its run (the training figures were,
    # once: Lightning logs them after the checkpoint callbacks run). Without validation (no
    # checkpoints then: make_trainer) they are logged at the epoch's end.
    from vgg_ablation.config import OptimConfig
    from vgg_ablation.training.module import Classifier

    for validate in (True, False):
        torch.manual_seed(0)
        images = torch.utils.data.TensorDataset(torch.randn(32, 3, 4, 4), torch.randint(0, 10, (32,)))
        loader = torch.utils.data.DataLoader(images, batch_size=8)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 10))
        recorder = Recorder()
        seen = SeenAtSave(recorder)
        last = ModelCheckpoint(dirpath=tmp_path / str(validate), filename="last", monitor=None, save_top_k=1,
                               every_n_epochs=1, enable_version_counter=False)  # fmt: skip
        trainer = pl.Trainer(max_epochs=3, callbacks=[last, seen] if validate else [], logger=recorder,
                             enable_checkpointing=validate, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, accelerator="cpu", log_every_n_steps=1)  # fmt: skip
        optim = OptimConfig() if validate else OptimConfig(schedule="cosine")  # plateau needs val/acc1
        trainer.fit(Classifier(model, optim), train_dataloaders=loader,
                    val_dataloaders=loader if validate else None)  # fmt: skip
        wanted = {"train/loss", "train/acc1", "train/err1", "lr"} | (
            {"val/acc1", "val/acc1_best"} if validate else set()
        )
        assert all(wanted <= recorder.logged[e] for e in (0, 1, 2)), validate
        if validate:
            assert sorted(seen.seen) == [0, 1, 2]
            for epoch, names in seen.seen.items():
                assert wanted <= names, (epoch, wanted - names)

"""Checkpoints written atomically, and a resume that survives a damaged one."""

from __future__ import annotations

import errno

import pytest
import torch

from vgg_ablation.training.checkpoints import AtomicCheckpointIO, Resume, choose_resume, loads


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

"""Checkpoints that survive their own interruption.

Written atomically: the bytes go to a temporary file in the same folder, are flushed to disk, and
the file is renamed over the old one, so a kill or a full disk mid-write leaves the previous
checkpoint whole. Movable: a cell's checkpoint folder may move (an imported archive puts an
unfinished cell's under its new run id), and its best checkpoint moves with it. Read defensively:
a cell resuming from a checkpoint that does not load (cut short by an older writer, a copy, a disk
error) falls back to its best checkpoint, else to a fresh start of the same MLflow run, and says
so; a damaged file is set aside, never loaded twice.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, written through a flushed temporary file and a rename."""

    seconds = 0.0  # spent writing checkpoints, summed (a cell's profile reports it)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        started = time.perf_counter()
        try:
            self._save(checkpoint, path, storage_options)
        finally:
            self.seconds += time.perf_counter() - started

    def _save(self, checkpoint: dict[str, Any], path, storage_options: Any | None) -> None:
        if storage_options is not None:
            raise TypeError("storage_options are not supported by AtomicCheckpointIO")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)  # atomic on one filesystem: the old file or the new, never half
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # the rename itself, durable
            dir_fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


class MovableCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, resumable from a folder that has moved.

    Lightning restores the best score and paths only when the checkpoint was written in the same
    folder; otherwise it forgets the best score, so the first epoch after the resume becomes "best"
    and overwrites best.ckpt: the test would then run on the best epoch since the resume, not of
    the run. The files came along (an import copies every *.ckpt of the folder), so their paths are
    mapped onto the new folder; where one did not, Lightning's own behaviour (and warning) stands.
    """

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's own key (Lightning keys a callback's saved state by its class name):
        # checkpoints written before this class, every archive's among them, load into it
        key = super().state_key
        return "ModelCheckpoint" + key.removeprefix(type(self).__qualname__)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and os.path.normpath(old) != os.path.normpath(self.dirpath):
            moved = moved_state(state_dict, old, self.dirpath)
            kept = [moved["best_model_path"], *moved.get("best_k_models", {})]
            if all(os.path.isfile(p) for p in kept if p):
                state_dict = moved
        super().load_state_dict(state_dict)


def moved_state(state: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """A ModelCheckpoint's state with every path in folder `old` put in folder `new`."""
    old = os.path.normpath(old)

    def move(path):
        inside = isinstance(path, str) and path and os.path.dirname(os.path.normpath(path)) == old
        return os.path.join(new, os.path.basename(path)) if inside else path

    out = {**state, "dirpath": new}
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if key in state:
            out[key] = move(state[key])
    if "best_k_models" in state:
        out["best_k_models"] = {move(k): v for k, v in state["best_k_models"].items()}
    return out


@dataclass
class Resume:
    path: str | None  # the checkpoint to resume from; None: a fresh start of the same run
    note: str | None  # what went wrong and what was done, when something did


def loads(path: Path) -> str | None:
    """None when `path` loads as a checkpoint, else why not (one line)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a cut zip, a bad pickle, an I/O error: all mean "not usable"
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if not isinstance(state, dict) or "state_dict" not in state:
        return "not a Lightning checkpoint (no state_dict)"
    return None


def bring_checkpoints(kept: Path, here: Path) -> None:
    """A run's checkpoints copied from the folder an earlier attempt left them in to the one this
    attempt writes to, so that it resumes from, and goes on writing, one folder. Copies, so a kill
    mid-way leaves the originals; nothing where the folder is gone (a fresh start, as before)."""
    if kept.is_dir():
        here.mkdir(parents=True, exist_ok=True)
        for ckpt in sorted(kept.glob("*.ckpt")):
            shutil.copy2(ckpt, here / ckpt.name)


def choose_resume(ckpt_dir: Path) -> Resume:
    """The checkpoint a resumed cell continues from: last.ckpt if it loads, else best.ckpt (an
    earlier epoch: the epochs after it are trained again and their metrics overwritten), else
    nothing. A file that does not load is renamed *.damaged."""
    last, best = ckpt_dir / "last.ckpt", ckpt_dir / "best.ckpt"
    if not last.is_file():
        return Resume(None, None)
    problem = loads(last)
    if problem is None:
        return Resume(str(last), None)
    last.replace(last.with_suffix(".ckpt.damaged"))
    note = f"last.ckpt does not load ({problem[:200]}), set aside as last.ckpt.damaged"
    if best.is_file():
        best_problem = loads(best)
        if best_problem is None:
            return Resume(str(best), note + "; resumed from best.ckpt")
        best.replace(best.with_suffix(".ckpt.damaged"))
        note += f"; best.ckpt does not load either ({best_problem[:200]})"
    return Resume(None, note + "; training restarts from epoch 0 in the same run")

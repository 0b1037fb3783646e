"""Files written whole or not at all: the one write-to-a-temporary-name-then-rename helper."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which is then renamed over it (atomic on
    one filesystem): a kill or a full disk mid-write leaves the old file, or none, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def replace_folder(tmp: Path, path: Path) -> None:
    """A folder filled under a temporary name, put in place of `path` (an old one is moved aside
    first and removed after: at every moment there is a whole folder, the old or the new)."""
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)

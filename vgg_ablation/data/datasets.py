"""What is on disk: which dataset a config names, its identity, and its images read safely.

- `identify`: the dataset a config names (the embedded sample, a user's folder, CIFAR's python
  batches, synthetic images), listed once per process without decoding: its classes, its files
  per split, and a digest of its file list and sizes. The digest, not the path, is part of a
  study's cell key: a moved folder keeps its cells, other data gets new ones.
- Reading: every image as 8-bit RGB, whatever its mode (`load_rgb`): palette and transparency
  composited on white, 16-bit images scaled by their bit depth, 32-bit integer and float images by
  their own range, never clipped; CIFAR batches through an unpickler that builds only what the
  format holds (`load_batch`): a data file never runs code.
- Decoding once per machine: a folder's images, decoded at a size, are kept as one .npy file in
  the user's cache (`decoded`), keyed by every file's path, size, inode and mtime, so that each
  process of a study (a sweep, a cell, the study itself) reads the pixels instead of decoding them
  again; a changed, added or moved file misses. Loaded without pickle; an unreadable entry is
  decoded again and replaced.
- Refusals, each one line: a missing, empty or corrupt folder, classes that differ between splits,
  fewer than two classes.

About 480 lines, one concern: what is on disk, from the table of named datasets (`NAMED`) to
pixels, read so that no data file runs code.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vgg_ablation.config import DataConfig, user_cache
from vgg_ablation.errors import UserError

SAMPLE_ROOT = Path(__file__).resolve().parent.parent / "sample_data" / "cifar10"

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

CIFAR10_BATCHES = {
    "folder": "cifar-10-batches-py",
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
    "meta": ("batches.meta", b"label_names"),
    "labels": b"labels",
    "archive": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
}
CIFAR100_BATCHES = {
    "folder": "cifar-100-python",
    "train": ["train"],
    "test": ["test"],
    "meta": ("meta", b"fine_label_names"),
    "labels": b"fine_labels",
    "archive": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}


@dataclass(frozen=True)
class Named:
    """A dataset `data=<name>` names: how it is read (its kind) and where it is. A new one in a
    format the project reads is one entry in NAMED below, plus its conf/data/<name>.yaml."""

    name: str
    kind: str  # "folder": ImageFolder's layout | "cifar": CIFAR's python batches | "synthetic": random images
    root: Path | None = None  # a folder that comes with the package (the sample); None: data.root
    recorded_as: str = ""  # the name its runs record; "": its name (a folder kind: the folder's own)
    batches: dict | None = None  # kind "cifar": its files and keys (CIFAR10_BATCHES)
    torchvision: str = ""  # kind "cifar": the torchvision.datasets class that downloads it

    @property
    def reads_root(self) -> bool:
        """Whether data.root says where it is (the embedded sample and random images have none)."""
        return self.kind != "synthetic" and self.root is None


NAMED = {
    d.name: d
    for d in (
        Named("sample", "folder", root=SAMPLE_ROOT, recorded_as="cifar10-sample"),
        Named("cifar10", "cifar", batches=CIFAR10_BATCHES, torchvision="CIFAR10"),
        Named("cifar100", "cifar", batches=CIFAR100_BATCHES, torchvision="CIFAR100"),
        Named("imagefolder", "folder"),
        Named("synthetic", "synthetic"),
    )
}
DATASETS = tuple(NAMED)


def named(name: str) -> Named:
    if name not in NAMED:
        raise UserError(f"unknown data {name!r}; choose one of: {', '.join(NAMED)}")
    return NAMED[name]


@dataclass
class Dataset:
    """What a run trained on: name, digest, where it came from, and how many images per split
    and class. Built from a listing alone (no decoding), so a study can key its cells on it."""

    name: str
    digest: str
    source: str
    classes: list[str]
    files: dict[str, list[tuple[Path, int]]] = field(default_factory=dict)  # split -> (path, label)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> images
    ignored: int = 0  # non-image files found and skipped
    layout: str = ""  # how the splits were formed, in words

    def profile(self) -> dict:
        return {
            "splits": self.counts,
            "classes": len(self.classes),
            "layout": self.layout,
            "ignored_files": self.ignored,
        }


def _digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _list_split(split_dir: Path) -> tuple[dict[str, list[Path]], int]:
    """Class folder -> image files, and the count of other files (ignored)."""
    if not split_dir.is_dir():
        raise UserError(f"dataset folder not found: {split_dir}")
    by_class: dict[str, list[Path]] = {}
    ignored = 0
    for entry in sorted(split_dir.iterdir()):
        if not entry.is_dir():
            ignored += 1
            continue
        images = []
        for path in sorted(entry.rglob("*")):
            if path.is_dir():
                continue
            if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                images.append(path)
            else:
                ignored += 1
        by_class[entry.name] = images
    if not by_class:
        raise UserError(f"dataset folder is empty (no class folders): {split_dir}")
    if not any(by_class.values()):
        raise UserError(
            f"dataset folder has no images: {split_dir} ({ignored} non-image files ignored; images end in .jpg, .png, ...)"
        )
    return by_class, ignored


def _check_same_classes(train: dict, other: dict, train_dir: Path, other_dir: Path) -> None:
    if sorted(train) != sorted(other):
        only_train = sorted(set(train) - set(other))
        only_other = sorted(set(other) - set(train))
        raise UserError(
            f"{train_dir.name} and {other_dir.name} have different classes "
            f"(only in {train_dir.name}: {only_train or '-'}; "
            f"only in {other_dir.name}: {only_other or '-'})"
        )


def identify_folder(root: Path, name: str) -> Dataset:
    """List a folder dataset: its splits, classes, files, digest. Raises UserError on a layout it
    cannot use (missing folder, no classes, classes that differ between splits, no images)."""
    root = root.expanduser()
    if not root.is_dir():
        raise UserError(f"dataset folder not found: {root}")
    if not (root / "train").is_dir():
        raise UserError(
            f"dataset folder has no train/ folder: {root} (expected train/<class>/..., and val/ or test/)"
        )
    train, ignored = _list_split(root / "train")
    empty = [c for c, files in train.items() if not files]
    if empty:
        raise UserError(f"class folder with no images: {root / 'train' / empty[0]}")
    splits = {"train": train}
    for held_out in ("val", "test"):
        if (root / held_out).is_dir():
            listed, more = _list_split(root / held_out)
            _check_same_classes(train, listed, root / "train", root / held_out)
            splits[held_out] = listed
            ignored += more
    classes = sorted(train)
    if len(classes) < 2:
        raise UserError(
            f"dataset folder has 1 class ({classes[0]}): a classifier needs at least 2: {root / 'train'}"
        )
    label = {c: i for i, c in enumerate(classes)}
    files = {s: [(p, label[c]) for c in classes for p in by_class[c]] for s, by_class in splits.items()}
    lines = []
    for split, listed in files.items():
        for path, _ in listed:
            size = path.stat().st_size
            if size == 0:
                raise UserError(f"empty image file (0 bytes): {path}")
            lines.append(f"{split}/{path.relative_to(root / split).as_posix()}\t{size}")
    counts = {s: {c: len(by_class[c]) for c in classes} for s, by_class in splits.items()}
    have = [s for s in ("val", "test") if s in splits]
    layout = {
        (): "train/ only: validation and test carved from it",
        ("val",): "train/ + val/: val/ is the test set (as ImageNet's), validation carved from train/",
        ("test",): "train/ + test/: validation carved from train/",
        ("val", "test"): "train/ + val/ + test/",
    }[tuple(have)]
    return Dataset(name, _digest(lines), str(root.resolve()), classes, files, counts, ignored, layout)


def identify_cifar(name: str, root: Path) -> Dataset:
    spec = NAMED[name].batches
    folder = root / spec["folder"]
    parts = [*spec["train"], *spec["test"], spec["meta"][0]]
    if not all((folder / p).is_file() for p in parts):
        _download_cifar(name, root)
    lines = [f"{p}\t{(folder / p).stat().st_size}" for p in parts]
    meta = load_batch(folder / spec["meta"][0])
    classes = [c.decode() for c in meta[spec["meta"][1]]]
    return Dataset(
        name,
        _digest(lines),
        str(folder.resolve()),
        classes,
        layout="train + test batches; validation carved from train",
    )


def _download_cifar(name: str, root: Path) -> None:
    from torchvision import datasets

    cls = getattr(datasets, NAMED[name].torchvision)
    try:
        cls(str(root), train=True, download=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        spec = NAMED[name].batches
        raise UserError(
            f"{name} not found in {root} and not downloadable ({type(exc).__name__}): put the folder "
            f"{spec['folder']}/ (from {spec['archive']}) in {root}, or set data.root to the folder holding it"
        ) from None


# -- CIFAR batches: only what the format holds --------------------------------------------------------
# A CIFAR batch is a pickled dict of bytes keys: labels (a list of ints), data (a uint8 numpy
# array), filenames and batch_label (bytes). Unpickling it may construct numpy arrays and dtypes,
# nothing else: pickle.load would run whatever callable a file names.
ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how protocol 2 from Python 3 writes bytes: str -> bytes, nothing more
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks to load {module}.{name}")


def load_batch(path: Path) -> dict:
    """One CIFAR batch file, or a one-line refusal when it holds anything but the format's data."""
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(io.BufferedReader(f), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise UserError(f"{path} is not a CIFAR batch ({exc}; data files never run code here)") from None
    if not isinstance(batch, dict) or not all(_plain(v) for v in batch.values()):
        raise UserError(f"{path} is not a CIFAR batch (expected a dict of arrays, lists, bytes and numbers)")
    return batch


def _plain(value) -> bool:
    """Only what a CIFAR batch holds: numbers, bytes, str, lists of them, numeric arrays."""
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "biuf"
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return isinstance(value, bytes | str | int | float | np.integer | np.floating)


def data_root(cfg: DataConfig) -> Path:
    return Path(cfg.root or os.environ.get("VGG_ABLATION_DATA", "data")).expanduser()


@cache
def _identify_cached(name: str, root: str, synthetic: tuple) -> Dataset:
    source = NAMED[name]
    if source.kind == "folder":
        folder = source.root or Path(root)
        return identify_folder(folder, source.recorded_as or folder.resolve().name)
    if source.kind == "cifar":
        return identify_cifar(name, Path(root))
    n, k, size = synthetic
    return Dataset(
        "synthetic", _digest([f"synthetic {n} {k} {size}"]), "generated", [str(i) for i in range(k)]
    )


def identify(cfg: DataConfig) -> Dataset:
    """The dataset `cfg` names, listed once per process."""
    source = named(cfg.name)
    if source.kind == "folder" and source.reads_root and not cfg.root:
        raise UserError(f"data={cfg.name} needs data.root=<folder with train/ and val/ or test/>")
    root = str(Path(cfg.root).expanduser()) if source.kind == "folder" and cfg.root else str(data_root(cfg))
    return _identify_cached(cfg.name, root, (cfg.synthetic_size, cfg.num_classes, cfg.input_size or 32))


def median_side(files: list[tuple[Path, int]], probes: int = 300) -> int:
    step = max(1, len(files) // probes)
    sides = []
    for path, _ in files[::step]:
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise UserError(f"corrupt image: {path} ({type(exc).__name__})") from None
    return int(statistics.median(sides))


# -- images as 8-bit RGB ---------------------------------------------------------------------------
def load_rgb(path: Path) -> Image.Image:
    """Any image as 8-bit RGB (grayscale, palette and RGBA converted, transparency on white;
    16- and 32-bit images scaled, `to_8bit`); a clear error when unreadable."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))  # transparent -> white
                return Image.alpha_composite(background, im).convert("RGB")
            if im.mode.startswith("I") or im.mode == "F":
                return Image.fromarray(to_8bit(im)).convert("RGB")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"corrupt image: {path} ({type(exc).__name__})") from None


def to_8bit(im: Image.Image) -> np.ndarray:
    """A single-channel image of more than 8 bits as uint8, never clipped (Pillow's convert()
    clips at 255: a 16-bit image would turn white). 16-bit images (mode I;16*, or I with values
    in 0..65535) by their bit depth, 65535 -> 255, so that images keep their brightness relative
    to each other; 32-bit integers beyond that and floats by their own range, min..max -> 0..255
    (floats already in 0..1 by x 255). 48- and 64-bit colour PNGs reach here as 8-bit RGB(A):
    Pillow keeps each channel's high byte, which is the same bit-depth scaling."""
    values = np.asarray(im, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if im.mode.startswith("I;16") or (im.mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0
    elif im.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _square(im: Image.Image, side: int) -> np.ndarray:
    """Shorter side rescaled to `side`, then the centre side x side square."""
    w, h = im.size
    if (w, h) != (side, side):
        scale = side / min(w, h)
        im = im.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.BILINEAR)
        w, h = im.size
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
    return np.asarray(im)


# PIL releases the GIL while it decodes, but the Python work around each image holds it: threads
# pay only when decoding outweighs that work. Measured on 2 cores, one thread then two, sample
# JPEGs resized to each side: 3,000 at 32 px (the sample's, CIFAR's) 0.41 s vs 0.71 s wall, 0.41 vs
# 0.87 CPU-s; 1,500 at 64 px 0.25 vs 0.36 s; at 128 px 0.43 vs 0.34-0.40 s wall for 0.43 vs 0.54-0.59
# CPU-s; 600 at 500x375 (ImageNet's size) brought to 224 px 1.62 vs 0.68 s.
THREADS_FROM_SIDE = 160  # px: the median shorter side from which a file list decodes in threads


def decode_threads(files: list[tuple[Path, int]]) -> int:
    """A thread per core (at most 8) for large images, one for small ones (THREADS_FROM_SIDE)."""
    if not files or median_side(files, probes=16) < THREADS_FROM_SIDE:
        return 1
    return max(1, min(8, os.cpu_count() or 1))


def decode(files: list[tuple[Path, int]], side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a file list as uint8 NCHW (side x side RGB), and the labels."""
    images = np.empty((len(files), side, side, 3), dtype=np.uint8)

    def one(i: int) -> None:
        images[i] = _square(load_rgb(files[i][0]), side)

    threads = decode_threads(files)
    if threads == 1:
        for i in range(len(files)):
            one(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(len(files)), chunksize=64))
    labels = torch.tensor([label for _, label in files], dtype=torch.long)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


# -- decoded once per machine ---------------------------------------------------------------------
# Each process of a study decodes its data afresh (the study, each sweep, each single cell): the
# sample's 6,000 JPEGs cost 0.88 CPU-s to decode and 0.06 to read back from one .npy (measured here
# on one core). A file of the cache holds one split at one side as uint8 NCHW.
DECODE_CACHE_ENV = "VGG_ABLATION_DECODE_CACHE"  # "0": decode every time, keep nothing on disk
DECODE_VERSION = 1  # bump whenever decoding changes the pixels it gives (resize, crop, conversion)
CACHE_FREE_BYTES = 1 << 30  # never fill a disk: a file is written only if this much stays free


def decode_cache_file(split: str, side: int, files: tuple) -> Path | None:
    """Where `files` decoded at `side` are kept, or None when the cache is off. The name hashes
    every file's path, size, inode and mtime (a replaced or touched image misses) with the
    decoding's version and Pillow's."""
    if os.environ.get(DECODE_CACHE_ENV, "1") == "0":
        return None
    h = hashlib.sha256(f"{DECODE_VERSION} {Image.__version__} {side} {split}".encode())
    for path, label in files:
        st = os.stat(path)
        h.update(f"\n{path}\t{label}\t{st.st_size}\t{st.st_ino}\t{st.st_mtime_ns}".encode())
    return user_cache() / "decoded" / f"{split}-{side}px-{len(files)}-{h.hexdigest()[:24]}.npy"


def _read_decoded(path: Path, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The cached pixels, or None when missing, cut short, or of another shape (never pickle)."""
    try:
        images = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if images.shape != shape or images.dtype != np.uint8:
        return None
    return torch.from_numpy(images)


def _write_decoded(path: Path, images: torch.Tensor) -> None:
    """Written whole or not at all (a temporary file renamed into place: two processes that decode
    at once both write, the last rename wins, either copy is whole). A cache that cannot be
    written (read-only, full) is skipped: decoding again is only slower."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(path.parent).free < images.numel() + CACHE_FREE_BYTES:
            return
        with open(tmp, "wb") as f:
            np.save(f, images.numpy(), allow_pickle=False)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


@cache
def decoded(digest: str, split: str, side: int, files: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """`files` as uint8 NCHW at `side`, and their labels: decoded once per machine (the decode
    cache) and once per process (a sweep runs its jobs in one process). Callers index, never write.
    `digest` names the dataset for the in-process cache; the file cache keys on the files."""
    path = decode_cache_file(split, side, files)
    images = _read_decoded(path, (len(files), 3, side, side)) if path else None
    if images is None:
        images, _ = decode(list(files), side)
        if path:
            _write_decoded(path, images)
    return images, torch.tensor([label for _, label in files], dtype=torch.long)


def load_cifar(name: str, folder: Path) -> tuple[torch.Tensor, ...]:
    spec = NAMED[name].batches
    out = []
    for part in ("train", "test"):
        batches = [load_batch(folder / p) for p in spec[part]]
        x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(b[spec["labels"]]) for b in batches])
        out += [torch.from_numpy(x).contiguous(), torch.from_numpy(y).long()]
    return tuple(out)

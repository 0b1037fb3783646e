"""Data: where images come from, what the net sees, and which dataset a run used.

Sources (`data.name`):
- sample: the embedded CIFAR-10 sample (a folder inside the package, read like any folder);
- imagefolder: the user's folder: `train/<class>/...` plus `val/` and/or `test/`, or `train/` alone;
- cifar10, cifar100: torchvision's extracted python batches in `data.root` (downloaded there when
  missing and the network allows);
- synthetic: random images, for throughput checks.

Two input paths, chosen by size:
- In memory: a split decoded once into a uint8 tensor (sample, CIFAR, and any folder whose decoded
  images fit in a fraction of the machine's memory), batches cut and augmented as whole-batch
  tensor ops (pad-and-crop or random crop, flip, normalise), on the GPU when one is used
  (airbench's recipe: no worker processes, no per-image Python).
- From files: a folder too large for memory (ImageNet) is decoded per image by DataLoader workers
  with the paper's preprocessing (rescale to S, random crop, flip; at test, rescale to Q, centre
  crop).

Normalisation (`data.normalize`): `standard` standardises each channel with the training split's
mean and std (what Kaiming-initialised nets expect); `paper` subtracts the mean RGB and keeps the
0-255 scale, as the paper did (section 3.1): the scale AlexNet's LRN constants assume.

Sizes: what the user leaves unset follows from the data (the median shorter side of the training
images): small images are kept at their own size (a 40 px dataset is not blown up to 256 px),
large ones get the paper's S=256, 224 crops, Q=256. Every choice is printed and recorded.

Validation is carved from the training images with a fixed seed (the same for every run of a
study), never from test; a folder with no test split has its test images carved the same way.

Identity: each dataset has a digest of its file list and sizes (`identify`). The digest, not the
path, is part of a study's cell key: a moved folder keeps its cells, other data gets new ones.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import statistics
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, UnidentifiedImageError

from vgg_ablation.config import DataConfig
from vgg_ablation.errors import UserError

SAMPLE_ROOT = Path(__file__).resolve().parent / "sample_data" / "cifar10"
DATASETS = ("sample", "cifar10", "cifar100", "imagefolder", "synthetic")
NORMALIZATIONS = ("standard", "paper")
SPLIT_SEED = 1409  # fixed: every run of every study validates on the same held-out images
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
PAPER_SCALE, PAPER_CROP = 256, 224  # section 3.1: S = Q = 256, 224 x 224 crops
MIN_SIDE = 32  # VGG's five 2x2 max-pools need at least 32 px
# A folder is held in memory when its decoded images take less than this share of RAM.
IN_MEMORY_SHARE = 0.25
CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": ("batches.meta", b"label_names"),
        "labels": b"labels",
        "archive": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": ("meta", b"fine_label_names"),
        "labels": b"fine_labels",
        "archive": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    },
}


# -- dataset identity ---------------------------------------------------------------------------
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
    spec = CIFAR[name]
    folder = root / spec["folder"]
    parts = [*spec["train"], *spec["test"], spec["meta"][0]]
    if not all((folder / p).is_file() for p in parts):
        _download_cifar(name, root)
    lines = [f"{p}\t{(folder / p).stat().st_size}" for p in parts]
    meta = _unpickle(folder / spec["meta"][0])
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

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        cls(str(root), train=True, download=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        spec = CIFAR[name]
        raise UserError(
            f"{name} not found in {root} and not downloadable ({type(exc).__name__}): put the folder "
            f"{spec['folder']}/ (from {spec['archive']}) in {root}, or set data.root to the folder holding it"
        ) from None


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def data_root(cfg: DataConfig) -> Path:
    return Path(cfg.root or os.environ.get("VGG_ABLATION_DATA", "data")).expanduser()


@cache
def _identify_cached(name: str, root: str, synthetic: tuple) -> Dataset:
    if name == "sample":
        return identify_folder(SAMPLE_ROOT, "cifar10-sample")
    if name == "imagefolder":
        return identify_folder(Path(root), Path(root).resolve().name)
    if name in CIFAR:
        return identify_cifar(name, Path(root))
    n, k, size = synthetic
    return Dataset(
        "synthetic", _digest([f"synthetic {n} {k} {size}"]), "generated", [str(i) for i in range(k)]
    )


def identify(cfg: DataConfig) -> Dataset:
    """The dataset `cfg` names, listed once per process."""
    if cfg.name not in DATASETS:
        raise UserError(f"unknown data {cfg.name!r}; choose one of: {', '.join(DATASETS)}")
    if cfg.name == "imagefolder" and not cfg.root:
        raise UserError("data=imagefolder needs data.root=<folder with train/ and val/ or test/>")
    root = str(Path(cfg.root).expanduser()) if cfg.name == "imagefolder" else str(data_root(cfg))
    return _identify_cached(cfg.name, root, (cfg.synthetic_size, cfg.num_classes, cfg.input_size or 32))


# -- sizes --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    train_scale: int  # S: training images are rescaled so their shorter side is S
    test_scale: int  # Q: the same at test
    crop: int  # what the net sees (input_size)
    train_scale_max: int | None = None  # scale jitter [S, S_max]
    native: int | None = None  # median shorter side of the training images, when measured

    @property
    def pad(self) -> int:
        """Random translation when the crop is the whole image (CIFAR's 4 px at 32)."""
        return max(1, self.crop // 8) if self.crop == self.train_scale else 0


def _median_side(files: list[tuple[Path, int]], probes: int = 300) -> int:
    step = max(1, len(files) // probes)
    sides = []
    for path, _ in files[::step]:
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise UserError(f"corrupt image: {path} ({type(exc).__name__})") from None
    return int(statistics.median(sides))


def choose_sizes(cfg: DataConfig, native: int | None) -> Sizes:
    """Fill in what the user left unset from the data's own size."""
    crop, s, q = cfg.input_size, cfg.train_scale, cfg.test_scale
    if s is None:
        if crop is not None:
            s = crop if crop < PAPER_CROP else PAPER_SCALE
        elif native is not None and native >= PAPER_SCALE:
            s = PAPER_SCALE
        else:
            s = max(native or MIN_SIDE, MIN_SIDE)
    if crop is None:
        crop = PAPER_CROP if s >= PAPER_SCALE else s
    q = q if q is not None else s
    if s < crop or q < crop:
        raise UserError(f"train_scale ({s}) and test_scale ({q}) must be at least input_size ({crop})")
    s_max = cfg.train_scale_max
    if s_max is not None and s_max < s:
        raise UserError(f"data.train_scale_max ({s_max}) must be at least train_scale ({s})")
    return Sizes(s, q, crop, s_max, native)


# -- decoding -----------------------------------------------------------------------------------
def load_rgb(path: Path) -> Image.Image:
    """Any image as RGB (grayscale, palette and RGBA converted); a clear error when unreadable."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))  # transparent -> white
                return Image.alpha_composite(background, im).convert("RGB")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"corrupt image: {path} ({type(exc).__name__})") from None


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


def decode(files: list[tuple[Path, int]], side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a file list as uint8 NCHW (side x side RGB), and the labels. PIL releases
    the GIL while decoding, so a thread per core decodes in parallel."""
    images = np.empty((len(files), side, side, 3), dtype=np.uint8)

    def one(i: int) -> None:
        images[i] = _square(load_rgb(files[i][0]), side)

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        list(pool.map(one, range(len(files)), chunksize=256))
    labels = torch.tensor([label for _, label in files], dtype=torch.long)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


@cache
def _decoded(digest: str, split: str, side: int, files: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded once per process: a sweep runs its jobs in one process. Callers index, never write."""
    return decode(list(files), side)


def _load_cifar(name: str, folder: Path) -> tuple[torch.Tensor, ...]:
    spec = CIFAR[name]
    out = []
    for part in ("train", "test"):
        batches = [_unpickle(folder / p) for p in spec[part]]
        x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(b[spec["labels"]]) for b in batches])
        out += [torch.from_numpy(x).contiguous(), torch.from_numpy(y).long()]
    return tuple(out)


def carve(n: int, fraction: float, salt: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the kept part and the carved-off part, the same for every run."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED + salt))
    n_out = max(1, round(n * fraction)) if fraction > 0 else 0
    return perm[n_out:], perm[:n_out]


def carve_validation(n: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    return carve(n, fraction)


# -- batches ------------------------------------------------------------------------------------
IGNORE = -100  # label of the padding that fills a short last evaluation batch (cross-entropy's default)


class TensorBatches:
    """Batches of an in-memory uint8 dataset, augmented as whole-batch tensor ops.

    Training: random crop of `crop` px (after zero-padding by `pad`: CIFAR's translation when the
    crop is the whole image), random horizontal flip. Evaluation: the centre crop. Then the
    normalisation, as one multiply-add.

    Random draws are made for the whole epoch at its start, on a CPU generator seeded by
    (seed, epoch), and reach the images' device in one copy: the same draws on CPU and GPU (a run
    is repeatable, and resuming at epoch k draws what the uninterrupted run drew), and no step
    waits on a host-to-device copy. Evaluation batches all have `batch_size` images: the short
    last one is padded with blank images labelled IGNORE (the module counts only real labels),
    so a compiled model sees one shape.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        batch_size: int,
        train: bool,
        augment: bool,
        seed: int,
        crop: int | None = None,
        pad: int = 4,
        shard: tuple[int, int] = (0, 1),
    ):
        self.images, self.labels = images, labels
        # (rank, world size): under DDP each process takes its own share of every epoch's draws,
        # as a DistributedSampler would (the same draws on every rank, so the shares are disjoint)
        self.rank, self.world = shard
        # uint8 -> normalised float in one multiply-add: (x / 255 - mean) / std
        self.scale = (1 / (255 * std)).view(1, -1, 1, 1).to(images.device)
        self.shift = (-mean / std).view(1, -1, 1, 1).to(images.device)
        self.batch_size, self.train, self.augment, self.seed = batch_size, train, augment, seed
        self.crop = crop or images.shape[-1]
        self.pad = pad if self.crop == images.shape[-1] else 0
        self.epoch = 0

    def _share(self) -> int:
        """Images per rank: training drops the remainder (equal steps on every rank, or DDP's
        gradient sync would wait forever); evaluation pads up to it with IGNORE images."""
        n = len(self.labels)
        return n // self.world if self.train else math.ceil(n / self.world)

    def __len__(self) -> int:
        n = self._share()
        return n // self.batch_size if self.train and n >= self.batch_size else math.ceil(n / self.batch_size)

    def epoch_draws(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """One epoch's random draws as one int64 tensor on the CPU, a row each: the image order,
        then (augmenting) each position's crop offsets dy, dx and flip (0/1)."""
        if not self.train:
            return torch.arange(n)[None]
        order = torch.randperm(n, generator=gen)
        if not self.augment:
            return order[None]
        side = self.images.shape[-1] + 2 * self.pad
        reach = side - self.crop + 1
        dy = torch.randint(0, reach, (n,), generator=gen)
        dx = torch.randint(0, reach, (n,), generator=gen)
        flip = (torch.rand(n, generator=gen) < 0.5).long()
        return torch.stack([order, dy, dx, flip])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        device = self.images.device
        draws = self.epoch_draws(n, gen)
        if self.world > 1:
            draws = draws[:, self.rank :: self.world][:, : self._share()]
        if device.type == "cuda":
            draws = draws.pin_memory()
        draws = draws.to(device, non_blocking=True)  # the epoch's one host-to-device copy
        side = self.images.shape[-1]
        for b in range(len(self)):
            rows = draws[:, b * self.batch_size : (b + 1) * self.batch_size]
            idx = rows[0]
            x, y = self.images[idx], self.labels[idx]
            if self.train and self.augment:
                x = self._augment(x, rows[1], rows[2], rows[3].bool(), self.pad, self.crop)
            elif self.crop != side:
                top = (side - self.crop) // 2
                x = x[..., top : top + self.crop, top : top + self.crop]
            if len(y) < self.batch_size:  # only the last evaluation batch: pad to the static shape
                short = self.batch_size - len(y)
                x = torch.cat([x, x.new_zeros(short, *x.shape[1:])])
                y = torch.cat([y, y.new_full((short,), IGNORE)])
            yield torch.addcmul(self.shift, x.float(), self.scale), y

    @staticmethod
    def _augment(
        x: torch.Tensor,
        dy: torch.Tensor,
        dx: torch.Tensor,
        flip: torch.Tensor,
        pad: int = 4,
        crop: int | None = None,
    ) -> torch.Tensor:
        """Crop at offsets (dy, dx) of the image zero-padded by `pad`, then flip where `flip`.

        The crops are picked out of an unfold view of every possible window, indexed by one
        (image, dy, dx) triple per image: 3x faster on CPU than gathering with per-pixel indices
        (1.1 vs 3.1 ms per 128 CIFAR images, measured), and the same code runs on the GPU.
        """
        b, _, h, w = x.shape
        crop = crop or h
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad else x
        windows = padded.unfold(2, crop, 1).unfold(3, crop, 1)  # B x C x ry x rx x crop x crop, a view
        out = windows[torch.arange(b, device=x.device), :, dy, dx]
        return torch.where(flip[:, None, None, None], out.flip(3), out)


def normalisation(kind: str, fit_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mean, std, pixel std) in [0, 1] units. standard: per channel over the training part
    (CIFAR conventions). paper: the mean RGB only, pixels kept on the 0-255 scale (std = 1/255).
    The pixel std (mean over channels) is returned either way: LRN's scale depends on it."""
    if kind not in NORMALIZATIONS:
        raise UserError(f"unknown data.normalize {kind!r}; choose one of: {', '.join(NORMALIZATIONS)}")
    step = max(1, len(fit_images) // 10_000)  # 10k images pin the statistics to 3 decimals
    as_float = fit_images[::step].float().div_(255)
    mean, std = as_float.mean((0, 2, 3)), as_float.std((0, 2, 3)).clamp_min(1e-3)
    if kind == "paper":
        return mean, torch.full((3,), 1 / 255), float(std.mean())
    return mean, std, float(std.mean())


# -- data modules -------------------------------------------------------------------------------
class _Common(pl.LightningDataModule):
    def __init__(self, cfg: DataConfig, seed: int):
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.device = torch.device("cpu")
        self.dataset: Dataset | None = None
        self.sizes: Sizes | None = None
        self.notes: list[str] = []  # how the splits were formed, for the run's record

    @property
    def num_classes(self) -> int:
        return len(self.dataset.classes)

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes

    @property
    def input_size(self) -> int:
        return self.sizes.crop

    def split_counts(self) -> dict[str, int]:
        raise NotImplementedError

    def describe(self) -> str:
        """One line: what was loaded and which sizes were chosen."""
        s, counts = self.sizes, self.split_counts()
        native = f"median shorter side {s.native} px -> " if s.native else ""
        scale = f"S={s.train_scale}" + (f"..{s.train_scale_max}" if s.train_scale_max else "")
        return (
            f"data: {self.dataset.name} (digest {self.dataset.digest}), "
            f"{counts['train']:,} train / {counts['val']:,} val / {counts['test']:,} test images, "
            f"{self.num_classes} classes; {native}{scale}, Q={s.test_scale}, crop {s.crop}; "
            f"normalize={self.cfg.normalize}; {self.mode}"
            + (f"; {self.dataset.ignored} non-image files ignored" if self.dataset.ignored else "")
            + "".join(f"; {n}" for n in self.notes)
        )


class InMemoryData(_Common):
    """Whole splits held as uint8 tensors: sample, CIFAR, synthetic, and folders that fit."""

    mode = "in memory"

    def __init__(self, cfg: DataConfig, seed: int, dataset: Dataset | None = None):
        super().__init__(cfg, seed)
        self.dataset = dataset or identify(cfg)
        self._loaded = False

    def _load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Raw splits: {'train': ..., 'test': ..., optionally 'val': ...}."""
        cfg, ds = self.cfg, self.dataset
        if cfg.name == "synthetic":
            size = cfg.input_size or 32
            self.sizes = choose_sizes(cfg, size)
            gen = torch.Generator().manual_seed(self.seed)
            n, k = cfg.synthetic_size, cfg.num_classes
            x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
            y = torch.randint(0, k, (n,), generator=gen)
            return {"train": (x, y), "test": (x[: max(1, n // 8)], y[: max(1, n // 8)])}
        if cfg.name in CIFAR:
            self.sizes = choose_sizes(cfg, 32)
            if (self.sizes.train_scale, self.sizes.test_scale) != (32, 32):
                raise UserError(
                    f"{cfg.name} images are 32x32: leave data.input_size/train_scale/test_scale unset or 32"
                )
            train_x, train_y, test_x, test_y = _load_cifar(cfg.name, Path(ds.source))
            return {"train": (train_x, train_y), "test": (test_x, test_y)}
        self.sizes = choose_sizes(cfg, _median_side(ds.files["train"]))
        out = {}
        for split, files in ds.files.items():
            side = self.sizes.train_scale if split == "train" else self.sizes.test_scale
            out[split] = _decoded(ds.digest, split, side, tuple(files))
        return out

    def setup(self, stage: str | None = None) -> None:
        if self._loaded:
            return
        raw = self._load()
        train_x, train_y = raw["train"]
        if "test" not in raw and "val" in raw:  # train/ + val/: val/ is the test set
            raw["test"] = raw.pop("val")
        if "test" not in raw:  # train/ only: carve the test set first, then validation
            keep, held = carve(len(train_y), self.cfg.test_fraction, salt=1)
            raw["test"] = self._at_test_scale(train_x[held]), train_y[held]
            train_x, train_y = train_x[keep], train_y[keep]
            self.notes.append(f"test = {len(held):,} images carved from train/ (seed {SPLIT_SEED + 1})")
        if self.cfg.train_subset is not None:
            keep = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(SPLIT_SEED))
            train_x, train_y = train_x[keep[: self.cfg.train_subset]], train_y[keep[: self.cfg.train_subset]]
        if "val" in raw:
            fit_x, fit_y, val = train_x, train_y, raw["val"]
        else:
            fit_idx, val_idx = carve(len(train_y), self.cfg.val_fraction)
            fit_x, fit_y = train_x[fit_idx], train_y[fit_idx]
            val = self._at_test_scale(train_x[val_idx]), train_y[val_idx]
        # Test in a fixed shuffled order, so a limited evaluation still sees every class.
        test_x, test_y = raw["test"]
        order = torch.randperm(len(test_y), generator=torch.Generator().manual_seed(SPLIT_SEED))
        self.mean, self.std, self.pixel_std = normalisation(self.cfg.normalize, fit_x)
        self.splits = {"train": (fit_x, fit_y), "val": val, "test": (test_x[order], test_y[order])}
        self._loaded = True

    def _at_test_scale(self, x: torch.Tensor) -> torch.Tensor:
        """Images carved from train, brought to the test scale Q (they were decoded at S)."""
        q = self.sizes.test_scale
        if x.shape[-1] == q or len(x) == 0:
            return x
        return (
            torch.nn.functional.interpolate(x.float(), size=(q, q), mode="bilinear", antialias=True)
            .round()
            .clamp(0, 255)
            .to(torch.uint8)
        )

    def split_counts(self) -> dict[str, int]:
        return {k: len(y) for k, (_, y) in self.splits.items()}

    @property
    def num_classes(self) -> int:
        return len(self.dataset.classes)

    @property
    def num_train(self) -> int:
        return len(self.splits["train"][1])

    def move_to(self, device: torch.device) -> None:
        """Hold the whole dataset on `device` (the GPU fast path)."""
        self.device = device
        self.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in self.splits.items()}

    def nbytes(self) -> int:
        return sum(x.numel() + y.numel() * 8 for x, y in self.splits.values())

    def _batches(self, split: str, train: bool) -> TensorBatches:
        x, y = self.splits[split]
        if len(y) == 0:
            raise UserError(f"the {split} split is empty")
        trainer = getattr(self, "trainer", None)
        shard = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return TensorBatches(
            x, y, self.mean, self.std, self.cfg.batch_size, train, self.cfg.augment, self.seed,
            crop=self.sizes.crop, pad=self.sizes.pad, shard=shard,
        )  # fmt: skip

    def train_dataloader(self):
        if not hasattr(self, "_train"):
            self._train = self._batches("train", train=True)
        return self._train

    def val_dataloader(self):
        return self._batches("val", train=False)

    def test_dataloader(self):
        return self._batches("test", train=False)


class _Files(torch.utils.data.Dataset):
    def __init__(self, files: list[tuple[Path, int]], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path, label = self.files[i]
        return self.transform(load_rgb(path)), label


class FileData(_Common):
    """A folder too large to hold decoded (ImageNet): decoded per image by DataLoader workers,
    with the paper's preprocessing: rescale the shorter side to S (or jitter it in [S, S_max]),
    random crop, flip; at test, rescale to Q and take the centre crop."""

    mode = "decoded from files by DataLoader workers"

    def __init__(self, cfg: DataConfig, seed: int, dataset: Dataset):
        super().__init__(cfg, seed)
        self.dataset = dataset

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        from torchvision import transforms

        cfg, ds = self.cfg, self.dataset
        self.sizes = s = choose_sizes(cfg, _median_side(ds.files["train"]))
        train_files = ds.files["train"]
        if "val" not in ds.files and "test" not in ds.files:
            keep, held = carve(len(train_files), cfg.test_fraction, salt=1)
            test_files = [train_files[i] for i in held.tolist()]
            train_files = [train_files[i] for i in keep.tolist()]
            self.notes.append(f"test = {len(test_files):,} images carved from train/")
        else:
            test_files = ds.files.get("test", ds.files.get("val"))
        if cfg.train_subset is not None:
            perm = torch.randperm(len(train_files), generator=torch.Generator().manual_seed(SPLIT_SEED))
            train_files = [train_files[i] for i in perm[: cfg.train_subset].tolist()]
        if "val" in ds.files and "test" in ds.files:
            fit_files, val_files = train_files, ds.files["val"]
        else:
            fit_idx, val_idx = carve(len(train_files), cfg.val_fraction)
            fit_files = [train_files[i] for i in fit_idx.tolist()]
            val_files = [train_files[i] for i in val_idx.tolist()]
        probe = decode(fit_files[:: max(1, len(fit_files) // 2000)], min(s.crop, 64))
        self.mean, self.std, self.pixel_std = normalisation(cfg.normalize, probe[0])
        normalise = transforms.Normalize(self.mean.tolist(), self.std.tolist())
        scales = range(s.train_scale, (s.train_scale_max or s.train_scale) + 1)
        train_tf = transforms.Compose(
            [
                transforms.RandomChoice([transforms.Resize(v) for v in scales])
                if len(scales) > 1
                else transforms.Resize(s.train_scale),
                transforms.RandomCrop(s.crop, padding=s.pad or None),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                normalise,
            ]
        )
        test_tf = transforms.Compose(
            [transforms.Resize(s.test_scale), transforms.CenterCrop(s.crop), transforms.ToTensor(), normalise]
        )
        self.train_set = _Files(fit_files, train_tf)
        self.val_set = _Files(val_files, test_tf)
        self.test_set = _Files(test_files, test_tf)

    def split_counts(self) -> dict[str, int]:
        return {"train": len(self.train_set), "val": len(self.val_set), "test": len(self.test_set)}

    @property
    def num_train(self) -> int:
        return len(self.train_set)

    def _loader(self, dataset, shuffle: bool) -> torch.utils.data.DataLoader:
        workers = self.cfg.num_workers
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(dataset) >= self.cfg.batch_size,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self):
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self):
        return self._loader(self.test_set, shuffle=False)


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def fits_in_memory(cfg: DataConfig, ds: Dataset) -> bool:
    """Would the decoded folder take less than IN_MEMORY_SHARE of RAM? Estimated from its file
    count and the sizes it would be stored at (the headers of a few hundred files)."""
    if cfg.in_memory in ("on", "off"):
        return cfg.in_memory == "on"
    sizes = choose_sizes(cfg, _median_side(ds.files["train"], probes=50))
    n = sum(len(f) for f in ds.files.values())
    return n * 3 * max(sizes.train_scale, sizes.test_scale) ** 2 < IN_MEMORY_SHARE * _memory_bytes()


def make_datamodule(cfg: DataConfig, seed: int) -> InMemoryData | FileData:
    if cfg.normalize not in NORMALIZATIONS:
        raise UserError(
            f"unknown data.normalize {cfg.normalize!r}; choose one of: {', '.join(NORMALIZATIONS)}"
        )
    if cfg.in_memory not in ("auto", "on", "off"):
        raise UserError(f"data.in_memory must be auto, on or off, got {cfg.in_memory!r}")
    if not 0 < cfg.test_fraction < 1:
        raise UserError(f"data.test_fraction must be in (0, 1), got {cfg.test_fraction}")
    ds = identify(cfg)
    if ds.files and not fits_in_memory(cfg, ds):
        return FileData(cfg, seed, ds)
    return InMemoryData(cfg, seed, ds)

"""Data: one LightningDataModule per `data=` choice.

Two input paths, chosen by what fits:
- In memory (sample, cifar10, cifar100, synthetic): the whole split decoded once into a uint8
  tensor, batches cut and augmented as tensors (pad-and-crop, flip, per-channel normalise, CIFAR
  conventions), on the GPU when one is used (airbench's recipe: no worker processes, no per-image
  Python). On CPU the same code runs, so both paths share one definition.
- From files (imagefolder): torchvision ImageFolder + the paper's preprocessing in a DataLoader
  tuned for throughput (workers, pinned memory, persistent workers).

The validation split used for learning-rate decisions is carved from the training data with a
fixed seed (the same for every run of a study), never from test.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
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
SPLIT_SEED = 1409  # fixed: every run of every study validates on the same held-out images
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _class_folders(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise UserError(f"dataset folder not found: {split_dir}")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"dataset folder is empty (no class folders): {split_dir}")
    return classes


def _image_files(split_dir: Path, classes: list[str]) -> list[tuple[Path, int]]:
    files = []
    for label, cls in enumerate(classes):
        for path in sorted((split_dir / cls).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append((path, label))
    if not files:
        raise UserError(f"dataset folder has no images: {split_dir}")
    return files


def _check_same_classes(train_dir: Path, other_dir: Path) -> list[str]:
    train, other = _class_folders(train_dir), _class_folders(other_dir)
    if train != other:
        only_train = sorted(set(train) - set(other))
        only_other = sorted(set(other) - set(train))
        raise UserError(
            f"{train_dir.name} and {other_dir.name} have different classes "
            f"(only in {train_dir.name}: {only_train or '-'}; "
            f"only in {other_dir.name}: {only_other or '-'})"
        )
    return train


def decode_folder(split_dir: Path, classes: list[str], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image of an ImageFolder split into uint8 NCHW (size x size RGB) and labels."""
    files = _image_files(split_dir, classes)
    images = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                images[i] = np.asarray(im)
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise UserError(f"corrupt image: {path} ({type(exc).__name__})") from None
    labels = torch.tensor([label for _, label in files], dtype=torch.long)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


@cache
def _decoded_sample(size: int) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    """The embedded sample, decoded once per process: a sweep runs its jobs in one process, and
    decoding 6,000 JPEGs costs about a second each time. Callers index (copy), never write."""
    classes = _check_same_classes(SAMPLE_ROOT / "train", SAMPLE_ROOT / "test")
    train = decode_folder(SAMPLE_ROOT / "train", classes, size)
    test = decode_folder(SAMPLE_ROOT / "test", classes, size)
    return classes, (*train, *test)


def carve_validation(n: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training and validation parts, the same for every run."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = max(1, round(n * fraction)) if fraction > 0 else 0
    return perm[n_val:], perm[:n_val]


class TensorBatches:
    """Batches of an in-memory uint8 dataset, augmented as whole-batch tensor ops.

    Augmentation (training only): pad 4 and random-crop back, random horizontal flip; then
    per-channel normalisation. Random draws come from a generator seeded by (seed, epoch), so a
    run is repeatable and resuming at epoch k draws what the uninterrupted run drew.
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
    ):
        self.images, self.labels = images, labels
        # uint8 -> normalised float in one multiply-add: (x / 255 - mean) / std
        self.scale = (1 / (255 * std)).view(1, -1, 1, 1).to(images.device)
        self.shift = (-mean / std).view(1, -1, 1, 1).to(images.device)
        self.batch_size, self.train, self.augment, self.seed = batch_size, train, augment, seed
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.train and n >= self.batch_size else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(n, generator=gen) if self.train else torch.arange(n)
        order = order.to(self.images.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.images[idx]
            if self.train and self.augment:
                x = self._augment(x, gen)
            x = torch.addcmul(self.shift, x.float(), self.scale)
            yield x, self.labels[idx]

    @staticmethod
    def _augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
        """Random translation by up to `pad` pixels (= zero-pad, random crop) and horizontal flip.

        The crops are picked out of an unfold view of every possible window, indexed by one
        (image, dy, dx) triple per image: 3x faster on CPU than gathering with per-pixel indices
        (1.1 vs 3.1 ms per 128 CIFAR images, measured), and the same code runs on the GPU.
        """
        b, _, h, w = x.shape
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # B x C x (2p+1) x (2p+1) x h x w, a view
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
        out = windows[torch.arange(b, device=x.device), :, dy, dx]
        flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
        return torch.where(flip[:, None, None, None], out.flip(3), out)


class InMemoryData(pl.LightningDataModule):
    """sample, cifar10, cifar100 and synthetic: whole splits held as uint8 tensors."""

    def __init__(self, cfg: DataConfig, seed: int):
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.device = torch.device("cpu")
        self.classes: list[str] = []
        self._loaded = False

    # -- loading -----------------------------------------------------------------------------
    def _load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        name, size = self.cfg.name, self.cfg.input_size
        if name == "sample":
            self.classes, tensors = _decoded_sample(size)
            return tensors
        if name == "synthetic":
            gen = torch.Generator().manual_seed(self.seed)
            n, k = self.cfg.synthetic_size, self.cfg.num_classes
            self.classes = [str(i) for i in range(k)]
            x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
            y = torch.randint(0, k, (n,), generator=gen)
            return x, y, x[: max(1, n // 8)], y[: max(1, n // 8)]
        return self._load_torchvision(name)

    def _load_torchvision(self, name: str):
        from torchvision import datasets

        root = Path(self.cfg.root or os.environ.get("VGG_ABLATION_DATA", "data")).expanduser()
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        try:
            train = cls(str(root), train=True, download=True)
            test = cls(str(root), train=False, download=True)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError
            raise UserError(
                f"could not get {name} into {root} ({type(exc).__name__}); offline, download "
                f"{cls.url} and unpack it there, or set data.root to a folder holding "
                f"{cls.base_folder}/"
            ) from None
        self.classes = list(train.classes)
        if self.cfg.input_size != 32:
            raise UserError(f"{name} images are 32x32; set data.input_size=32")

        def tensors(ds):
            x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            return x, torch.tensor(ds.targets, dtype=torch.long)

        return (*tensors(train), *tensors(test))

    def setup(self, stage: str | None = None) -> None:
        if self._loaded:
            return
        train_x, train_y, test_x, test_y = self._load()
        if self.cfg.train_subset is not None:
            keep = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(SPLIT_SEED))
            train_x, train_y = train_x[keep[: self.cfg.train_subset]], train_y[keep[: self.cfg.train_subset]]
        fit_idx, val_idx = carve_validation(len(train_y), self.cfg.val_fraction)
        # Test in a fixed shuffled order, so a limited evaluation still sees every class.
        test_order = torch.randperm(len(test_y), generator=torch.Generator().manual_seed(SPLIT_SEED))
        test_x, test_y = test_x[test_order], test_y[test_order]
        fit_x = train_x[fit_idx]
        # Per-channel statistics of the training part only (CIFAR conventions).
        as_float = fit_x.float().div_(255)
        self.mean, self.std = as_float.mean((0, 2, 3)), as_float.std((0, 2, 3)).clamp_min(1e-3)
        self.splits = {
            "train": (fit_x, train_y[fit_idx]),
            "val": (train_x[val_idx], train_y[val_idx]),
            "test": (test_x, test_y),
        }
        self._loaded = True

    @property
    def num_classes(self) -> int:
        return len(self.classes)

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
        return TensorBatches(
            x, y, self.mean, self.std, self.cfg.batch_size, train, self.cfg.augment, self.seed
        )

    def train_dataloader(self):
        if not hasattr(self, "_train"):
            self._train = self._batches("train", train=True)
        return self._train

    def val_dataloader(self):
        return self._batches("val", train=False)

    def test_dataloader(self):
        return self._batches("test", train=False)


class ImageFolderData(pl.LightningDataModule):
    """Any folder in ImageNet layout (train/<class>/..., val/<class>/...), paper preprocessing:
    rescale the smallest side to S (fixed, or jittered in [S_min, S_max]), random crop, flip,
    subtract the mean RGB; at test, rescale to Q and take the centre crop."""

    def __init__(self, cfg: DataConfig, seed: int):
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.device = torch.device("cpu")

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        from torchvision import datasets, transforms

        if not self.cfg.root:
            raise UserError("data=imagefolder needs data.root=<folder with train/ and val/>")
        root = Path(self.cfg.root).expanduser()
        if not root.is_dir():
            raise UserError(f"dataset folder not found: {root}")
        val_name = "val" if (root / "val").is_dir() else "test"
        self.classes = _check_same_classes(root / "train", root / val_name)
        train_files = _image_files(root / "train", self.classes)
        test_files = _image_files(root / val_name, self.classes)
        self._verify([p for p, _ in train_files + test_files])
        size, s_min = self.cfg.input_size, self.cfg.train_scale
        s_max = self.cfg.train_scale_max or s_min
        if s_min < size or self.cfg.test_scale < size:
            raise UserError(f"train_scale and test_scale must be at least input_size ({size})")
        self.mean = self._mean_rgb(train_files)
        normalise = transforms.Normalize(self.mean.tolist(), [1 / 255] * 3)  # mean only
        train_tf = transforms.Compose(
            [
                transforms.RandomChoice([transforms.Resize(s) for s in range(s_min, s_max + 1)])
                if s_max > s_min
                else transforms.Resize(s_min),
                transforms.RandomCrop(size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                normalise,
            ]
        )
        test_tf = transforms.Compose(
            [
                transforms.Resize(self.cfg.test_scale),
                transforms.CenterCrop(size),
                transforms.ToTensor(),
                normalise,
            ]
        )
        loader = _checked_loader
        full_train = datasets.ImageFolder(str(root / "train"), train_tf, loader=loader)
        full_val = datasets.ImageFolder(str(root / "train"), test_tf, loader=loader)
        fit_idx, val_idx = carve_validation(len(full_train), self.cfg.val_fraction)
        if self.cfg.train_subset is not None:
            fit_idx = fit_idx[: self.cfg.train_subset]
        self.train_set = torch.utils.data.Subset(full_train, fit_idx.tolist())
        self.val_set = torch.utils.data.Subset(full_val, val_idx.tolist())
        self.test_set = datasets.ImageFolder(str(root / val_name), test_tf, loader=loader)

    @staticmethod
    def _verify(paths: list[Path], full_decode_limit: int = 20_000) -> None:
        """Fail before training on an unreadable image: decode all of a small folder, read the
        headers of a large one (a corrupt body there still fails with the file named)."""
        for path in paths:
            try:
                with Image.open(path) as im:
                    if len(paths) <= full_decode_limit:
                        im.load()
            except (UnidentifiedImageError, OSError, SyntaxError) as exc:
                raise UserError(f"corrupt image: {path} ({type(exc).__name__})") from None

    def _mean_rgb(self, files: list[tuple[Path, int]], limit: int = 2000) -> torch.Tensor:
        step = max(1, len(files) // limit)
        total = torch.zeros(3)
        for path, _ in files[::step]:
            with Image.open(path) as im:
                total += torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).mean((0, 1))
        return total / len(files[::step]) / 255

    @property
    def num_classes(self) -> int:
        return len(self.classes)

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


def _checked_loader(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise UserError(f"corrupt image: {path} ({type(exc).__name__})") from None


def make_datamodule(cfg: DataConfig, seed: int) -> InMemoryData | ImageFolderData:
    if cfg.name not in DATASETS:
        raise UserError(f"unknown data {cfg.name!r}; choose one of: {', '.join(DATASETS)}")
    if cfg.name == "imagefolder":
        return ImageFolderData(cfg, seed)
    return InMemoryData(cfg, seed)

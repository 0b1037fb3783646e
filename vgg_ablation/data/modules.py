"""Data: what the net sees. The splits, the sizes, the batches, the data modules (plain classes
with Lightning's hooks; `fitting.LightningData` hands one to a Trainer, so that checking a study's
data needs no Lightning).

What is on disk and how it is read lives in datasets.py; here:

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

Splits (`split_plan`, one policy for both paths): a folder with train/ only has its test images
carved from train/ first; then the training subset, if asked; then validation is carved from what
is left, unless the folder has both val/ and test/. Every carve uses a fixed seed: the validation
split is the same for every run of every study, never taken from test. Splits too small to
measure anything are refused.

About 490 lines, one concern: from a dataset on disk to the batches a Trainer takes, both paths
with the split and size policies they share, in the order a run uses them.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from vgg_ablation.config import DataConfig
from vgg_ablation.data.batches import NORMALIZATIONS, TensorBatches, normalisation
from vgg_ablation.data.datasets import (
    NAMED,
    Dataset,
    decode,
    decoded,
    identify,
    load_cifar,
    load_rgb,
    median_side,
)
from vgg_ablation.errors import UserError

SPLIT_SEED = 1409  # fixed: every run of every study validates on the same held-out images
PAPER_SCALE, PAPER_CROP = 256, 224  # section 3.1: S = Q = 256, 224 x 224 crops
MIN_SIDE = 32  # VGG's five 2x2 max-pools need at least 32 px
# A folder is held in memory when its decoded images take less than this share of RAM.
IN_MEMORY_SHARE = 0.25


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


def carve(n: int, fraction: float, salt: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the kept part and the carved-off part, the same for every run."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED + salt))
    n_out = max(1, round(n * fraction)) if fraction > 0 else 0
    return perm[n_out:], perm[:n_out]


def carve_validation(n: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    return carve(n, fraction)


@dataclass(frozen=True)
class SplitPlan:
    """Indices into a dataset's training images: what trains, what validates (None: its own
    val/ folder), what tests (None: its own test/ or val/ folder)."""

    fit: torch.Tensor
    val: torch.Tensor | None
    test: torch.Tensor | None
    notes: tuple[str, ...] = ()


def split_plan(n_train: int, has_val: bool, has_test: bool, cfg: DataConfig) -> SplitPlan:
    """The one split policy. train/ only: test carved from it first (its own seed); then the
    training subset, if asked; then validation carved from what is left, unless the folder has
    both val/ and test/ (with val/ alone, val/ is the test set, as ImageNet's)."""
    kept, test, notes = torch.arange(n_train), None, ()
    if not has_val and not has_test:
        keep, held = carve(n_train, cfg.test_fraction, salt=1)
        kept, test = kept[keep], held
        notes = (f"test = {len(held):,} images carved from train/ (seed {SPLIT_SEED + 1})",)
    if cfg.train_subset is not None:
        order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(SPLIT_SEED))
        kept = kept[order[: cfg.train_subset]]
    if has_val and has_test:
        return SplitPlan(kept, None, test, notes)
    fit, val = carve(len(kept), cfg.val_fraction)
    return SplitPlan(kept[fit], kept[val], test, notes)


MIN_TEST_PER_CLASS = 5  # below this a test error says nothing (see check_split_sizes)


def check_split_sizes(counts: dict[str, int], classes: int) -> None:
    """Refuse splits too small to mean anything, in one line. The test split needs 5 images per
    class on average: at fewer, one image moves a class's accuracy by over 20 points, and on 2
    classes a perfect net cannot even be told from chance (the run's `learned` test, a binomial at
    1%, needs 7 correct answers out of 7). Validation only picks the best epoch: one image will
    do; training needs one per class."""
    need = {"test": MIN_TEST_PER_CLASS * classes, "val": 1, "train": classes}
    for split in ("train", "val", "test"):
        if counts[split] < need[split]:
            raise UserError(
                f"the {split} split has {counts[split]:,} image{'s' if counts[split] != 1 else ''} for {classes} "
                f"classes: too few to measure anything (at least {need[split]} here); add images"
                + (" or a test/ folder" if split == "test" else "")
            )


# -- data modules -------------------------------------------------------------------------------
class _Common:
    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self.shard = (0, 1)  # (rank, ranks): set by fitting.LightningData under DDP
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
        kind = NAMED[cfg.name].kind
        if kind == "synthetic":
            size = cfg.input_size or 32
            self.sizes = choose_sizes(cfg, size)
            gen = torch.Generator().manual_seed(self.seed)
            n, k = cfg.synthetic_size, cfg.num_classes
            x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
            y = torch.randint(0, k, (n,), generator=gen)
            return {"train": (x, y), "test": (x[: max(1, n // 8)], y[: max(1, n // 8)])}
        if kind == "cifar":
            self.sizes = choose_sizes(cfg, 32)
            if (self.sizes.train_scale, self.sizes.test_scale) != (32, 32):
                raise UserError(
                    f"{cfg.name} images are 32x32: leave data.input_size/train_scale/test_scale unset or 32"
                )
            train_x, train_y, test_x, test_y = load_cifar(cfg.name, Path(ds.source))
            return {"train": (train_x, train_y), "test": (test_x, test_y)}
        self.sizes = choose_sizes(cfg, median_side(ds.files["train"]))
        out = {}
        for split, files in ds.files.items():
            side = self.sizes.train_scale if split == "train" else self.sizes.test_scale
            out[split] = decoded(ds.digest, split, side, tuple(files))
        return out

    def setup(self, stage: str | None = None) -> None:
        if self._loaded:
            return
        raw = self._load()
        train_x, train_y = raw["train"]
        plan = split_plan(len(train_y), "val" in raw, "test" in raw, self.cfg)
        self.notes += plan.notes
        if plan.test is not None:
            test_x, test_y = self._at_test_scale(train_x[plan.test]), train_y[plan.test]
        else:
            test_x, test_y = raw.get("test", raw.get("val"))
        if plan.val is not None:
            val = self._at_test_scale(train_x[plan.val]), train_y[plan.val]
        else:
            val = raw["val"]
        fit_x, fit_y = train_x[plan.fit], train_y[plan.fit]
        # Test in a fixed shuffled order, so a limited evaluation still sees every class.
        order = torch.randperm(len(test_y), generator=torch.Generator().manual_seed(SPLIT_SEED))
        self.splits = {"train": (fit_x, fit_y), "val": val, "test": (test_x[order], test_y[order])}
        if NAMED[self.cfg.name].kind != "synthetic":  # random images for throughput: no result to measure
            check_split_sizes(self.split_counts(), self.num_classes)
        self.mean, self.std, self.pixel_std = normalisation(self.cfg.normalize, fit_x)
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
        return TensorBatches(
            x, y, self.mean, self.std, self.cfg.batch_size, train, self.cfg.augment, self.seed,
            crop=self.sizes.crop, pad=self.sizes.pad, shard=self.shard,
        )  # fmt: skip

    def train_dataloader(self):
        if not hasattr(self, "_train"):
            self._train = self._batches("train", train=True)
        return self._train

    def val_dataloader(self):
        return self._batches("val", train=False)

    def test_dataloader(self):
        return self._batches("test", train=False)


ORDER_DRAW, IMAGE_DRAW = 1, 2  # what a seed is drawn for: an epoch's order, an image's transforms


def _draw_seed(kind: int, seed: int, epoch: int, image: int = 0) -> int:
    """A 63-bit seed for one draw, the same anywhere. Always five 32-bit words (the kind first,
    the run's seed in two): SeedSequence pads shorter input with zeros, which would make (seed,
    epoch) and (seed, epoch, 0) one seed."""
    import numpy as np

    words = [kind, seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, epoch, image]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)


class EpochOrder(torch.utils.data.Sampler):
    """A training epoch's image order as a function of (seed, epoch) alone, yielding (epoch,
    index) pairs: the images' random crops and flips are drawn from the same two numbers and the
    image's index (`_Files`). So a run resumed at epoch k sees epoch k's order and augmentations,
    as the uninterrupted run did, whichever DataLoader workers decode them and however many there
    are. (torch's shuffling DataLoader draws both from one generator that restarts with the
    process, and persistent workers keep their own.) Lightning calls `set_epoch` as each epoch
    starts, a resumed one included; a loader's first iterator, made before that (its workers
    fetch ahead), is set by `fitting.LightningData` from the epoch the fit resumes at."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        draw = torch.Generator().manual_seed(_draw_seed(ORDER_DRAW, self.seed, self.epoch))
        order = torch.randperm(self.n, generator=draw)
        return iter([(self.epoch, i) for i in order.tolist()])


class _Files(torch.utils.data.Dataset):
    """Images decoded from their files. Indexed by (epoch, index) (EpochOrder), an image's random
    transforms draw from a generator seeded by (seed, epoch, index), leaving the process's own
    untouched (with no workers, dropout draws from it in the same process)."""

    def __init__(self, files: list[tuple[Path, int]], transform, seed: int = 0):
        self.files, self.transform, self.seed = files, transform, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int | tuple[int, int]):
        if isinstance(key, int):
            path, label = self.files[key]
            return self.transform(load_rgb(path)), label
        epoch, i = key
        path, label = self.files[i]
        image = load_rgb(path)
        seed = _draw_seed(IMAGE_DRAW, self.seed, epoch, i)
        # torchvision's random transforms draw from torch's CPU generator (RandomChoice from
        # Python's): seeded here for this image, then given back as they were. Not
        # torch.manual_seed, which reseeds the GPUs' generators too (dropout's, with no workers).
        kept = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            try:
                return self.transform(image), label
            finally:
                random.setstate(kept)


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
        self.sizes = s = choose_sizes(cfg, median_side(ds.files["train"]))
        train_files = ds.files["train"]
        plan = split_plan(len(train_files), "val" in ds.files, "test" in ds.files, cfg)
        self.notes += plan.notes

        def pick(indices: torch.Tensor) -> list:
            return [train_files[i] for i in indices.tolist()]

        test_files = pick(plan.test) if plan.test is not None else ds.files.get("test", ds.files.get("val"))
        val_files = pick(plan.val) if plan.val is not None else ds.files["val"]
        fit_files = pick(plan.fit)
        counts = {"train": len(fit_files), "val": len(val_files), "test": len(test_files)}
        check_split_sizes(counts, len(ds.classes))
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
        self.train_set = _Files(fit_files, train_tf, self.seed)
        self.val_set = _Files(val_files, test_tf)
        self.test_set = _Files(test_files, test_tf)

    def split_counts(self) -> dict[str, int]:
        return {"train": len(self.train_set), "val": len(self.val_set), "test": len(self.test_set)}

    @property
    def num_train(self) -> int:
        return len(self.train_set)

    def _loader(self, dataset, shuffle: bool) -> torch.utils.data.DataLoader:
        workers = self.cfg.num_workers
        # One process: the order and augmentations drawn per (seed, epoch) (EpochOrder). Under DDP
        # Lightning puts its DistributedSampler in place of a shuffling loader's, each rank a share.
        order = EpochOrder(len(dataset), self.seed) if shuffle and self.shard[1] == 1 else None
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            shuffle=shuffle if order is None else None,
            sampler=order,
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
    sizes = choose_sizes(cfg, median_side(ds.files["train"], probes=50))
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

"""Data modules on real images: the embedded sample, ImageNet-layout folders, bad folders."""

import os

import numpy as np
import pytest
import torch

from vgg_ablation.config import DataConfig
from vgg_ablation.data.batches import IGNORE, TensorBatches
from vgg_ablation.data.modules import InMemoryData, carve_validation, make_datamodule
from vgg_ablation.errors import UserError

from .conftest import make_imagefolder


def test_sample_is_real_cifar10_split_without_touching_test():
    dm = InMemoryData(DataConfig(name="sample"), seed=0)
    dm.setup()
    assert dm.classes[:3] == ["airplane", "automobile", "bird"] and dm.num_classes == 10
    assert [len(dm.splits[s][1]) for s in ("train", "val", "test")] == [4500, 500, 1000]
    x, _ = dm.splits["train"]
    assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32)
    # validation is carved from training data, the same for every run seed
    other = InMemoryData(DataConfig(name="sample"), seed=7)
    other.setup()
    assert torch.equal(dm.splits["val"][0], other.splits["val"][0])


def test_validation_carve_is_deterministic_and_disjoint():
    fit, val = carve_validation(1000, 0.1)
    fit2, val2 = carve_validation(1000, 0.1)
    assert torch.equal(val, val2) and len(val) == 100
    assert set(fit.tolist()).isdisjoint(val.tolist()) and len(fit) + len(val) == 1000


def test_tensor_batches_augment_repeatably_and_normalise():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(64) % 10
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)

    def first_epoch():
        return next(iter(TensorBatches(images, labels, mean, std, 16, True, True, seed=3)))

    (x1, y1), (x2, y2) = first_epoch(), first_epoch()
    assert x1.shape == (16, 3, 32, 32) and torch.equal(x1, x2) and torch.equal(y1, y2)
    plain = TensorBatches(images, labels, mean, std, 16, train=False, augment=True, seed=3)
    x, y = next(iter(plain))
    torch.testing.assert_close(x, (images[:16].float() / 255 - 0.5) / 0.25)
    assert len(plain) == 4


def test_ddp_ranks_take_disjoint_equal_shares_of_each_epoch():
    """Under DDP each rank's batches hold its own share: training, equal and disjoint (the remainder
    dropped, so every rank makes the same number of steps); evaluation, every image exactly once,
    the short rank padded with IGNORE labels."""
    images = torch.arange(45, dtype=torch.uint8).view(45, 1, 1, 1).expand(45, 3, 8, 8).contiguous()
    labels = torch.arange(45) % 10
    mean, std = torch.zeros(3), torch.ones(3)

    def seen(train: bool, rank: int) -> tuple[list[int], int]:
        batches = TensorBatches(images, labels, mean, std, 8, train, augment=False, seed=1, shard=(rank, 2))
        ids, steps = [], 0
        for x, y in batches:
            steps += 1
            ids += [
                round(float(v) * 255) for v, label in zip(x[:, 0, 0, 0], y, strict=True) if label != IGNORE
            ]
        return ids, steps

    (a, steps_a), (b, steps_b) = seen(True, 0), seen(True, 1)
    assert steps_a == steps_b == 2 and len(a) == len(b) == 16 and not set(a) & set(b)
    (a, steps_a), (b, steps_b) = seen(False, 0), seen(False, 1)
    assert steps_a == steps_b == 3 and sorted(a + b) == list(range(45))


def test_crop_is_a_shifted_window_of_the_padded_image():
    img = torch.arange(3 * 8 * 8, dtype=torch.uint8).view(1, 3, 8, 8)
    dy, dx, flip = torch.tensor([3]), torch.tensor([1]), torch.tensor([True])
    out = TensorBatches._augment(img, dy, dx, flip, pad=2)
    padded = torch.nn.functional.pad(img, (2, 2, 2, 2))
    assert torch.equal(out, padded[..., 3:11, 1:9].flip(3))


def test_imagefolder_with_paper_preprocessing(tmp_path):
    root = make_imagefolder(tmp_path / "imgs")
    cfg = DataConfig(
        name="imagefolder",
        root=str(root),
        input_size=32,
        train_scale=36,
        train_scale_max=40,
        test_scale=36,
        batch_size=4,
        val_fraction=0.25,
    )
    dm = make_datamodule(cfg, seed=0)
    dm.setup()
    assert dm.classes == ["cat", "dog"] and dm.num_train == 9
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.long
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape[1:] == (3, 32, 32)


@pytest.mark.parametrize(
    "breakage,message",
    [
        ("missing", "dataset folder not found"),
        ("empty", "dataset folder is empty"),
        ("corrupt", "corrupt image:"),
        ("classes", "have different classes"),
        ("no_images", "dataset folder has no images"),
        ("only_text", "dataset folder has no images"),
        ("zero_bytes", "empty image file (0 bytes)"),
        ("val_class_not_in_train", "only in val: ['horse']"),
    ],
)
def test_bad_folders_fail_with_one_clear_line(tmp_path, breakage, message):
    root = tmp_path / "imgs"
    if breakage == "empty":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
    elif breakage == "no_images":
        for split in ("train", "val"):
            (root / split / "cat").mkdir(parents=True)
    elif breakage not in ("missing", "only_text"):
        make_imagefolder(root)
    if breakage == "corrupt":
        (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    if breakage == "classes":
        (root / "val" / "dog").rename(root / "val" / "horse")
    if breakage == "only_text":
        for split in ("train", "val"):
            (root / split / "cat").mkdir(parents=True)
            (root / split / "cat" / "notes.txt").write_text("not an image")
    if breakage == "zero_bytes":
        (root / "train" / "cat" / "empty.png").write_bytes(b"")
    if breakage == "val_class_not_in_train":
        (root / "val" / "horse").mkdir()
        (root / "val" / "dog" / next(iter(sorted((root / "val" / "dog").iterdir()))).name).rename(
            root / "val" / "horse" / "x.jpg"
        )
    cfg = DataConfig(name="imagefolder", root=str(root), input_size=32, train_scale=36, test_scale=36)
    with pytest.raises(UserError) as err:
        make_datamodule(cfg, seed=0).setup()
    assert message in str(err.value) and "\n" not in str(err.value)
    if breakage == "corrupt":
        assert "broken.jpg" in str(err.value)


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(UserError, match="choose one of: sample, cifar10, cifar100, imagefolder, synthetic"):
        make_datamodule(DataConfig(name="mnist"), seed=0)


def _folder(root, splits, classes=("airplane", "frog"), per_class=10, mode="RGB", size=(32, 32)):
    """A folder of real sample images, converted to `mode` and resized to `size`."""
    from PIL import Image

    from vgg_ablation.data.datasets import SAMPLE_ROOT

    for split in splits:
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for src in sorted((SAMPLE_ROOT / "train" / cls).glob("*.jpg"))[:per_class]:
                with Image.open(src) as im:
                    im.convert(mode).resize(size).save(root / split / cls / (src.stem + ".png"))
    return root


def test_sizes_follow_the_data_when_unset(tmp_path):
    root = _folder(tmp_path / "gray40", ("train", "val"), mode="L", size=(40, 40))
    dm = make_datamodule(DataConfig(name="imagefolder", root=str(root)), seed=0)
    dm.setup()
    assert (dm.sizes.train_scale, dm.sizes.test_scale, dm.sizes.crop, dm.sizes.pad) == (40, 40, 40, 5)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (3, 40, 40)  # grayscale converted to RGB, not blown up to 224
    assert "median shorter side 40 px -> S=40, Q=40, crop 40" in dm.describe() and dm.mode == "in memory"


def test_non_square_large_images_get_the_paper_sizes_and_file_decoding(tmp_path):
    root = _folder(tmp_path / "big", ("train", "val"), per_class=5, size=(300, 260))
    cfg = DataConfig(name="imagefolder", root=str(root), in_memory="off", batch_size=2)
    dm = make_datamodule(cfg, seed=0)
    dm.setup()
    assert (dm.sizes.train_scale, dm.sizes.test_scale, dm.sizes.crop) == (256, 256, 224)
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (2, 3, 224, 224)


def test_files_draw_each_epoch_from_the_seed_and_epoch_alone(tmp_path):
    # What a run resumed at epoch k needs to train as the uninterrupted run did: epoch k's order
    # and crops and flips, drawn from (seed, epoch) whatever came before in the process, and the
    # same with or without DataLoader workers; the process's own generator left as it was
    import dataclasses

    root = _folder(tmp_path / "f", ("train", "val"), per_class=8, size=(40, 40))
    cfg = DataConfig(name="imagefolder", root=str(root), in_memory="off", batch_size=4, num_workers=0)

    def epochs(which: list[int], workers: int = 0, seed: int = 0) -> list[torch.Tensor]:
        dm = make_datamodule(dataclasses.replace(cfg, num_workers=workers), seed=seed)
        dm.setup()
        assert dm.mode == "decoded from files by DataLoader workers"
        loader, seen = dm.train_dataloader(), []
        for epoch in which:
            loader.sampler.set_epoch(epoch)  # as Lightning does at each epoch's start
            seen.append(torch.cat([x for x, _ in loader]))
        return seen

    before = torch.get_rng_state()
    straight = epochs([0, 1, 2])
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(epochs([2])[0], straight[2])  # a process that starts at epoch 2
    assert torch.equal(epochs([1, 2], workers=2)[1], straight[2])  # decoded by two workers
    assert not torch.equal(straight[0], straight[1]) and not torch.equal(epochs([0], seed=1)[0], straight[0])

    # A fit resumed at epoch 2 with two workers: Lightning makes the loader's first iterator (its
    # workers fetching ahead) before it calls set_epoch; the data module sets the epoch first
    import pytorch_lightning as pl

    from vgg_ablation.training.fitting import LightningData

    resumed = LightningData(make_datamodule(dataclasses.replace(cfg, num_workers=2), seed=0))
    resumed.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    resumed.data.setup()
    resumed.trainer.fit_loop.epoch_progress.current.processed = 2  # as restored from a checkpoint
    loader = resumed.train_dataloader()
    fetching = iter(loader)  # the iterator Lightning makes at setup, before set_epoch
    assert torch.equal(torch.cat([x for x, _ in fetching]), straight[2])


def test_palette_and_rgba_images_become_rgb(tmp_path):
    from vgg_ablation.data.datasets import load_rgb

    root = _folder(tmp_path / "p", ("train",), per_class=1, mode="P")
    rgba = _folder(tmp_path / "a", ("train",), per_class=1, mode="RGBA")
    for folder in (root, rgba):
        path = next((folder / "train" / "frog").iterdir())
        assert load_rgb(path).mode == "RGB"


def test_test_folder_naming_and_ignored_files(tmp_path):
    root = _folder(tmp_path / "t", ("train", "test"))
    (root / "train" / "frog" / "README.txt").write_text("notes")
    (root / "train" / "frog" / ".DS_Store").write_bytes(b"x")
    dm = make_datamodule(DataConfig(name="imagefolder", root=str(root)), seed=0)
    dm.setup()
    assert dm.split_counts() == {"train": 18, "val": 2, "test": 20}
    assert dm.dataset.ignored == 2 and "2 non-image files ignored" in dm.describe()


def test_train_only_folder_carves_validation_and_test(tmp_path):
    root = _folder(tmp_path / "only", ("train",), per_class=50)
    cfg = DataConfig(name="imagefolder", root=str(root))
    dm = make_datamodule(cfg, seed=0)
    dm.setup()
    counts = dm.split_counts()
    assert counts == {"train": 81, "val": 9, "test": 10}
    assert "carved from train/" in dm.describe() and "train/ only" in dm.dataset.layout
    again = make_datamodule(cfg, seed=5)  # the carve does not depend on the run's seed
    again.setup()
    assert torch.equal(dm.splits["test"][0], again.splits["test"][0])


def test_digest_follows_the_files_not_the_path(tmp_path):
    from vgg_ablation.data.datasets import identify_folder

    root = _folder(tmp_path / "a", ("train", "val"))
    digest = identify_folder(root, "x").digest
    moved = root.rename(tmp_path / "elsewhere")
    assert identify_folder(moved, "x").digest == digest
    next((moved / "train" / "frog").iterdir()).unlink()
    assert identify_folder(moved, "x").digest != digest


def test_paper_normalisation_keeps_the_0_255_scale():
    dm = make_datamodule(DataConfig(name="sample", normalize="paper", augment=False), seed=0)
    dm.setup()
    x, _ = next(iter(dm.test_dataloader()))
    assert 50 < float(x.std()) < 80 and abs(float(x.mean())) < 10  # mean subtracted, 0-255 units
    std = make_datamodule(DataConfig(name="sample"), seed=0)
    std.setup()
    x, _ = next(iter(std.test_dataloader()))
    assert 0.8 < float(x.std()) < 1.2
    assert dm.pixel_std == pytest.approx(std.pixel_std)


def test_cifar_batches_from_a_local_folder(tmp_path):
    """torchvision's extracted cifar-10-batches-py/ read offline (a small one, built here in the
    documented pickle format from the sample's images)."""
    import pickle

    from vgg_ablation.data.datasets import SAMPLE_ROOT

    sample = make_datamodule(DataConfig(name="sample", augment=False), seed=0)
    sample.setup()
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    x, y = sample.splits["train"]
    for i in range(1, 6):
        part = slice((i - 1) * 100, i * 100)
        batch = {b"data": x[part].reshape(100, -1).numpy(), b"labels": y[part].tolist()}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    tx, ty = sample.splits["test"]
    (folder / "test_batch").write_bytes(
        pickle.dumps({b"data": tx[:200].reshape(200, -1).numpy(), b"labels": ty[:200].tolist()})
    )
    names = sorted(p.name for p in (SAMPLE_ROOT / "train").iterdir())
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in names]}))
    dm = make_datamodule(DataConfig(name="cifar10", root=str(tmp_path)), seed=0)
    dm.setup()
    assert dm.split_counts() == {"train": 450, "val": 50, "test": 200} and dm.classes == names
    assert torch.equal(dm.splits["train"][0][0], x[carve_validation(500, 0.1)[0][0]])


def test_cifar_missing_offline_says_what_to_put_where(tmp_path, monkeypatch):
    import socket

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setattr(socket.socket, "connect", offline)
    with pytest.raises(UserError) as err:
        make_datamodule(DataConfig(name="cifar10", root=str(tmp_path / "nothing")), seed=0)
    text = str(err.value)
    assert "put the folder cifar-10-batches-py/" in text and str(tmp_path / "nothing") in text
    assert "cifar-10-python.tar.gz" in text and "\n" not in text


# -- what users' folders hold: safe batches, deep images, folders too small --------------------------
def test_a_cifar_batch_that_asks_to_run_code_is_refused_in_one_line(tmp_path):
    import pickle

    from vgg_ablation.data.datasets import load_batch
    from vgg_ablation.errors import UserError

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Payload()}, protocol=2))
    with pytest.raises(
        UserError, match=r"is not a CIFAR batch \(it asks to load (posix|os)\.system"
    ) as caught:
        load_batch(path)
    assert "\n" not in str(caught.value) and not marker.exists()
    # what the format holds loads (numpy arrays of numbers, lists, bytes)
    good = {b"data": np.arange(12, dtype=np.uint8).reshape(1, 12), b"labels": [3], b"batch_label": b"x"}
    path.write_bytes(pickle.dumps(good, protocol=2))
    loaded = load_batch(path)
    assert loaded[b"labels"] == [3] and loaded[b"data"].dtype == np.uint8
    # an array of objects is not a CIFAR batch, even when nothing in it runs
    path.write_bytes(pickle.dumps({b"data": np.array([{"a": 1}], dtype=object)}, protocol=2))
    with pytest.raises(UserError, match="not a CIFAR batch"):
        load_batch(path)


def _png48(path, rgb16: np.ndarray) -> None:
    """A 48-bit RGB PNG (16 bits per channel), written by hand: Pillow does not write them."""
    import struct
    import zlib

    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_deep_images_are_scaled_to_8_bits_never_clipped(tmp_path):
    from PIL import Image

    from vgg_ablation.data.datasets import load_rgb

    ramp = (np.arange(48 * 48).reshape(48, 48) * 28).astype(np.uint16)  # 0 .. 64,484
    Image.fromarray(ramp).save(tmp_path / "g16.png")  # mode I;16: by bit depth, 65535 -> 255
    gray = np.asarray(load_rgb(tmp_path / "g16.png"))
    assert gray.shape == (48, 48, 3) and (gray[..., 0] == gray[..., 1]).all()
    assert np.array_equal(gray[..., 0], np.rint(ramp / 257).astype(np.uint8))
    assert len(np.unique(gray)) > 200  # a ramp stays a ramp: not white above 255
    _png48(tmp_path / "c48.png", np.stack([ramp, ramp // 2, ramp // 4], -1))  # 48-bit colour
    colour = np.asarray(load_rgb(tmp_path / "c48.png"))
    assert (
        np.array_equal(colour[..., 1], (ramp // 2 >> 8).astype(np.uint8)) and colour.max() == ramp.max() >> 8
    )
    floats = (np.arange(64, dtype=np.float32).reshape(8, 8) - 10) * 1.5  # mode F: by its own range
    Image.fromarray(floats, mode="F").save(tmp_path / "f.tiff")
    scaled = np.asarray(load_rgb(tmp_path / "f.tiff"))[..., 0]
    assert scaled.min() == 0 and scaled.max() == 255


def test_a_one_class_folder_and_a_too_small_test_split_are_refused(tmp_path):
    from vgg_ablation.errors import UserError

    one = _folder(tmp_path / "one", ("train", "val"), classes=("frog",))
    with pytest.raises(
        UserError, match=r"dataset folder has 1 class \(frog\): a classifier needs at least 2"
    ):
        make_datamodule(DataConfig(name="imagefolder", root=str(one)), 0).setup()
    tiny = _folder(tmp_path / "tiny", ("train",), per_class=4)  # 2 x 4 images: a test set of 1
    with pytest.raises(
        UserError, match="the test split has 1 image for 2 classes: too few to measure anything"
    ):
        make_datamodule(DataConfig(name="imagefolder", root=str(tiny)), 0).setup()
    enough = _folder(tmp_path / "enough", ("train", "val"), per_class=5)  # 5 test images per class
    make_datamodule(DataConfig(name="imagefolder", root=str(enough)), 0).setup()


def test_small_images_decode_in_one_thread_large_ones_in_several_to_the_same_pixels(tmp_path):
    """Threads cost small images time and CPU (the GIL around each image outweighs its decoding:
    datasets.THREADS_FROM_SIDE); large ones gain from them. Either way, the same pixels."""
    from PIL import Image

    from vgg_ablation.data.datasets import (
        SAMPLE_ROOT,
        THREADS_FROM_SIDE,
        _square,
        decode,
        decode_threads,
        load_rgb,
    )

    small = [(p, 0) for p in sorted((SAMPLE_ROOT / "train" / "cat").glob("*.jpg"))[:40]]
    large = []
    for i, (path, label) in enumerate(small):
        target = tmp_path / f"{i}.png"
        Image.open(path).resize((THREADS_FROM_SIDE * 2, THREADS_FROM_SIDE)).save(target)
        large.append((target, label))
    assert decode_threads(small) == 1 and decode_threads([]) == 1
    assert decode_threads(large) == max(1, min(8, os.cpu_count() or 1))
    threaded, labels = decode(large, 64)
    one_by_one = torch.from_numpy(np.stack([_square(load_rgb(path), 64) for path, _ in large]))
    assert torch.equal(threaded, one_by_one.permute(0, 3, 1, 2)) and labels.tolist() == [0] * len(large)


class _RunsCode:
    """A pickle that would create a file when loaded: a cache file must never be unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_decoded_images_are_kept_once_per_machine_and_a_changed_file_or_a_bad_entry_decodes_again(
    tmp_path, monkeypatch
):
    """A folder is decoded once and read back by the next process (the cache file, whole, no
    pickle); a touched image misses; a cut-short or foreign entry is decoded again and replaced;
    VGG_ABLATION_DECODE_CACHE=0 keeps nothing."""
    import pickle

    from vgg_ablation.data import datasets

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = make_imagefolder(tmp_path / "folder", per_class=5)
    files = tuple(datasets.identify_folder(root, "f").files["train"])
    fresh, labels = datasets.decode(list(files), 32)

    def again():  # what a new process sees: the in-process cache empty
        datasets.decoded.cache_clear()
        return datasets.decoded("digest", "train", 32, files)

    images, got = again()
    (entry,) = (tmp_path / "cache" / "vgg-ablation" / "decoded").iterdir()
    assert torch.equal(images, fresh) and torch.equal(got, labels)
    with monkeypatch.context() as m:  # read back: nothing decoded
        m.setattr(datasets, "decode", lambda *a: pytest.fail("decoded again despite the cache"))
        images, got = again()
    assert torch.equal(images, fresh) and torch.equal(got, labels)

    os.utime(files[0][0], ns=(1, 1))  # the same bytes, touched: another entry
    assert datasets.decode_cache_file("train", 32, files) != entry
    assert torch.equal(again()[0], fresh) and len(list(entry.parent.iterdir())) == 2
    entry = datasets.decode_cache_file("train", 32, files)

    whole = entry.read_bytes()
    entry.write_bytes(whole[: len(whole) // 2])  # cut short (a crash between write and disk)
    assert torch.equal(again()[0], fresh) and entry.read_bytes() == whole
    marker = tmp_path / "ran"
    entry.write_bytes(pickle.dumps(_RunsCode(marker)))  # a data file never runs code
    assert torch.equal(again()[0], fresh) and not marker.exists() and entry.read_bytes() == whole
    np.save(entry, np.zeros((len(files), 3, 16, 16), np.uint8))  # another shape
    assert torch.equal(again()[0], fresh) and entry.read_bytes() == whole
    assert not list(entry.parent.glob(".*.tmp"))  # no temporary file left behind

    monkeypatch.setenv("VGG_ABLATION_DECODE_CACHE", "0")
    assert datasets.decode_cache_file("train", 64, files) is None
    assert torch.equal(again()[0], fresh) and len(list(entry.parent.iterdir())) == 2

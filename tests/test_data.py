"""Data modules on real images: the embedded sample, ImageNet-layout folders, bad folders."""

import pytest
import torch

from vgg_ablation.config import DataConfig
from vgg_ablation.data import InMemoryData, TensorBatches, carve_validation, make_datamodule
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


def test_crop_is_a_shifted_window_of_the_padded_image():
    img = torch.arange(3 * 8 * 8, dtype=torch.uint8).view(1, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    out = TensorBatches._augment(img, gen, pad=2)
    padded = torch.nn.functional.pad(img, (2, 2, 2, 2))
    windows = [padded[..., i : i + 8, j : j + 8] for i in range(5) for j in range(5)]
    assert any(torch.equal(out, w) or torch.equal(out, w.flip(3)) for w in windows)


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
    elif breakage != "missing":
        make_imagefolder(root)
    if breakage == "corrupt":
        (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    if breakage == "classes":
        (root / "val" / "dog").rename(root / "val" / "horse")
    cfg = DataConfig(name="imagefolder", root=str(root), input_size=32, train_scale=36, test_scale=36)
    with pytest.raises(UserError) as err:
        make_datamodule(cfg, seed=0).setup()
    assert message in str(err.value) and "\n" not in str(err.value)
    if breakage == "corrupt":
        assert "broken.jpg" in str(err.value)


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(UserError, match="choose one of: sample, cifar10, cifar100, imagefolder, synthetic"):
        make_datamodule(DataConfig(name="mnist"), seed=0)

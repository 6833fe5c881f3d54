"""The IDX file format of the MNIST-style data sets: encoding, decoding and the error that
names a damaged file.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension and the data, big-endian, row-major.
Files may be gzipped; :func:`read_idx` tells from the first bytes.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["GZIP_ERRORS", "DataError", "encode_idx", "read_idx"]

_GZIP_MAGIC = b"\x1f\x8b"
GZIP_ERRORS = (OSError, EOFError, zlib.error)
"""Every failure of gzip on in-memory bytes: BadGzipFile is an OSError."""

# IDX type codes (third magic byte) and their big-endian NumPy dtypes.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataError(ValueError):
    """A data file is missing, damaged, truncated or not the expected data."""


def encode_idx(array: np.ndarray) -> bytes:
    """Serialise ``array`` in the IDX format (big-endian header and data).

    Args:
        array: An array with 1 to 255 dimensions and a dtype IDX can hold
            (uint8, int8, int16, int32, float32, float64).

    Returns:
        The bytes of an uncompressed IDX file.
    """
    array = np.asarray(array)
    codes = {dtype.newbyteorder("="): code for code, dtype in _IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot hold dtype {array.dtype}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX needs 1 to 255 dimensions, got {array.ndim}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(_IDX_DTYPES[code], copy=False).tobytes()


def _parse_idx(raw: bytes, source: Path) -> np.ndarray:
    """Decode uncompressed IDX bytes read from ``source`` into a native-endian array."""
    if len(raw) < 4:
        raise DataError(f"{source}: truncated IDX file ({len(raw)} bytes, no complete header)")
    zero_a, zero_b, code, ndim = raw[:4]
    if zero_a or zero_b or code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{source}: not an IDX file (bad magic number 0x{raw[:4].hex()})")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(
            f"{source}: truncated IDX header ({len(raw)} bytes, {header_size} needed for {ndim} dimensions)"
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header_size
    if found < expected:
        raise DataError(f"{source}: truncated IDX data: shape {shape} needs {expected} bytes, found {found}")
    if found > expected:
        raise DataError(f"{source}: IDX data too long: shape {shape} needs {expected} bytes, found {found}")
    array = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, gzipped or not (detected from its first bytes).

    Args:
        path: The IDX file, e.g. ``train-images-idx3-ubyte`` or its ``.gz``.

    Returns:
        A writable, native-endian array with the shape given in the header.

    Raises:
        DataError: The file is truncated, not IDX, or a corrupt gzip stream.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except GZIP_ERRORS as exc:
            raise DataError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc
    return _parse_idx(raw, path)

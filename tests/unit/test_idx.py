"""The IDX parser on small files the tests write themselves."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from mechscope.cnn.data.mnist import IdxFile, parse_idx, read_idx_gz
from mechscope.core.errors import DataError


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    ndim = array.ndim
    header = struct.pack(">I", magic if magic is not None else 0x800 + ndim)
    header += struct.pack(f">{ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_gz(path, data: bytes):
    with gzip.open(path, "wb") as f:
        f.write(data)
    return path


def test_parse_images_and_labels():
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    np.testing.assert_array_equal(parse_idx(idx_bytes(images)), images)
    labels = np.array([7, 2, 1], dtype=np.uint8)
    np.testing.assert_array_equal(parse_idx(idx_bytes(labels)), labels)


def test_read_gz_checks_expected_shape(tmp_path):
    labels = np.array([1, 2, 3, 4], dtype=np.uint8)
    path = write_gz(tmp_path / "l.gz", idx_bytes(labels))
    np.testing.assert_array_equal(read_idx_gz(path, IdxFile("l.gz", "", 0x801, (4,))), labels)
    with pytest.raises(DataError, match="holds 4 items; expected 5"):
        read_idx_gz(path, IdxFile("l.gz", "", 0x801, (5,)))


def test_wrong_magic(tmp_path):
    labels = np.array([1, 2, 3], dtype=np.uint8)
    with pytest.raises(DataError, match="wrong magic number 0x00000d01"):
        parse_idx(idx_bytes(labels, magic=0x0D01))
    # a valid IDX file of the wrong kind: labels where images are expected
    path = write_gz(tmp_path / "x.gz", idx_bytes(labels))
    with pytest.raises(DataError, match="expected 0x00000803 .images."):
        read_idx_gz(path, IdxFile("x.gz", "", 0x803, (3, 28, 28)))


def test_header_data_mismatch():
    data = idx_bytes(np.zeros((2, 3, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="holds 17"):
        parse_idx(data[:-1])
    with pytest.raises(DataError, match="too short"):
        parse_idx(b"\x00\x00")


def test_truncated_gzip(tmp_path):
    full = gzip.compress(idx_bytes(np.zeros((100, 28, 28), dtype=np.uint8)))
    path = tmp_path / "t.gz"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match="truncated or corrupt gzip"):
        read_idx_gz(path)


def test_not_gzip(tmp_path):
    path = tmp_path / "n.gz"
    path.write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match="truncated or corrupt gzip"):
        read_idx_gz(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_idx_gz(tmp_path / "absent.gz")

"""IDX files (LeCun et al.), gzip-compressed or not: parsing, checksums, and why a file is wrong.

IDX format: a big-endian magic number ``0x0000TTDD`` (TT the type, 0x08 for unsigned bytes; DD
the number of dimensions: 0x03 for images [n, rows, cols], 0x01 for labels [n]), one
big-endian uint32 per dimension, then the data in C order. Every problem raises
:class:`~mechscope.core.errors.DataError` with one line that says what was expected.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mechscope.core.errors import DataError

IMAGES, LABELS = 0x803, 0x801


@dataclass(frozen=True)
class IdxFile:
    """One published file: its name, MD5, magic number and shape."""

    name: str
    md5: str
    magic: int
    shape: tuple[int, ...]


def md5sum(path: Path) -> str:
    return _digest(path, hashlib.md5())


def sha256sum(path: Path) -> str:
    return _digest(path, hashlib.sha256())


def _digest(path: Path, h) -> str:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_idx(data: bytes | bytearray, *, source: str = "<bytes>") -> np.ndarray:
    """Parse decompressed IDX bytes into a numpy array (unsigned-byte data only), sharing their memory: writable
    when ``data`` is a bytearray."""
    if len(data) < 4:
        raise DataError(f"{source}: too short to be an IDX file ({len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim < 1:
        magic = struct.unpack(">I", data[:4])[0]
        raise DataError(
            f"{source}: wrong magic number 0x{magic:08x}; expected an unsigned-byte IDX file "
            "(0x00000801 for labels, 0x00000803 for images)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: IDX header cut short ({len(data)} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(shape)  # Python integers: four uint32 sizes overflow numpy's int64
    if len(data) - header != expected:
        raise DataError(
            f"{source}: IDX header says shape {tuple(shape)} ({expected} bytes of data) "
            f"but the file holds {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_bytes(path: Path) -> bytearray:
    """The file's bytes, gunzipped when its name ends in .gz: writable, so arrays parsed from them need no copy (on
    this kind of machine first touching fresh memory is what a copy of MNIST's 47 MB costs, about 0.3 s)."""
    try:
        with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as f:
            out = bytearray()
            while chunk := f.read(1 << 22):
                out += chunk
            return out
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a file") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        raise DataError(f"{path}: truncated or corrupt gzip ({e})") from None


def read_idx(path: Path, expected: IdxFile | None = None) -> np.ndarray:
    """Read one IDX file (gzip or plain), checking magic number and shape against ``expected``."""
    data = read_bytes(path)
    if expected is not None and len(data) >= 4:
        magic = struct.unpack(">I", data[:4])[0]
        if magic != expected.magic:
            kind = "images" if expected.magic == IMAGES else "labels"
            raise DataError(f"{path}: wrong magic number 0x{magic:08x}; expected 0x{expected.magic:08x} ({kind})")
    array = parse_idx(data, source=str(path))
    if expected is not None:
        if array.shape[0] != expected.shape[0]:
            raise DataError(f"{path}: holds {array.shape[0]} items; expected {expected.shape[0]}")
        if array.shape != expected.shape:
            raise DataError(f"{path}: shape {array.shape}; expected {expected.shape}")
    return array


read_idx_gz = read_idx  # the name from when only gzip files were read


def verify(path: Path, spec: IdxFile) -> None:
    """Raise :class:`DataError` unless ``path`` has the published MD5 (saying why it differs)."""
    got = md5sum(path)
    if got == spec.md5:
        return
    try:
        read_idx(path, spec)
        why = "the file parses but is not the published original"
    except DataError as e:
        why = str(e).removeprefix(f"{path}: ")
    raise DataError(
        f"{path}: MD5 {got} does not match the published {spec.md5} ({why}); "
        "delete the file to download it again, or replace it with the original"
    )

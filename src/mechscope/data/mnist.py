"""MNIST from the four original IDX gzip files, verified against their published MD5s.

Where the files live (first match wins): the ``data_dir`` argument (the CLI's ``--data-dir``),
the ``MECHSCOPE_DATA`` environment variable, ``~/.cache/mechscope/data``. Inside that directory
the files are looked for in ``mnist/`` (the layout of ../shared/data), or in the directory itself.

Missing files are downloaded from a public mirror (``MECHSCOPE_MNIST_MIRROR`` or the ``mirror``
argument overrides it), each verified against its MD5 before it is moved into place. Every
problem (missing, truncated, wrong magic number, wrong MD5, wrong item count, unreadable
directory) raises :class:`~mechscope.errors.DataError` with one line that says what was expected.

IDX format (LeCun et al.): a big-endian magic number ``0x00000803`` for images (type ``0x08``,
unsigned byte, 3 dimensions) or ``0x00000801`` for labels, one big-endian uint32 per dimension,
then the data in C order.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mechscope.errors import DataError

log = logging.getLogger(__name__)

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)


@dataclass(frozen=True)
class IdxFile:
    name: str
    md5: str
    magic: int
    shape: tuple[int, ...]


FILES: dict[str, IdxFile] = {
    "train_images": IdxFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", 0x803, (60000, 28, 28)),
    "train_labels": IdxFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", 0x801, (60000,)),
    "test_images": IdxFile("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", 0x803, (10000, 28, 28)),
    "test_labels": IdxFile("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", 0x801, (10000,)),
}
FILE_NAMES = tuple(f.name for f in FILES.values())


@dataclass(frozen=True)
class MNIST:
    """The MNIST splits as uint8 images [n, 28, 28] and int64 labels [n]."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    directory: Path
    md5: dict[str, str]

    @staticmethod
    def to_float(images: torch.Tensor) -> torch.Tensor:
        """uint8 [n, 28, 28] -> float32 [n, 1, 28, 28] in [0, 1], the CNN's input."""
        return images.unsqueeze(1).float().div_(255.0)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data root: ``data_dir`` > ``$MECHSCOPE_DATA`` > ``~/.cache/mechscope/data``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("MECHSCOPE_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mechscope" / "data"


def mnist_dir(root: Path) -> Path:
    """Where the MNIST files are (or will be downloaded to) under the data root."""
    if root.is_dir() and any((root / n).exists() for n in FILE_NAMES) and not (root / "mnist").is_dir():
        return root
    return root / "mnist"


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_idx(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Parse decompressed IDX bytes into a numpy array (unsigned-byte data only)."""
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
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DataError(
            f"{source}: IDX header says shape {tuple(shape)} ({expected} bytes of data) "
            f"but the file holds {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_gz(path: Path, expected: IdxFile | None = None) -> np.ndarray:
    """Read one gzip-compressed IDX file, checking magic number and shape against ``expected``."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a gzip file") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        raise DataError(f"{path}: truncated or corrupt gzip ({e})") from None
    if expected is not None and len(data) >= 4:
        magic = struct.unpack(">I", data[:4])[0]
        if magic != expected.magic:
            kind = "images" if expected.magic == 0x803 else "labels"
            raise DataError(f"{path}: wrong magic number 0x{magic:08x}; expected 0x{expected.magic:08x} ({kind})")
    array = parse_idx(data, source=str(path))
    if expected is not None:
        if array.shape[0] != expected.shape[0]:
            raise DataError(f"{path}: holds {array.shape[0]} items; expected {expected.shape[0]}")
        if array.shape != expected.shape:
            raise DataError(f"{path}: shape {array.shape}; expected {expected.shape}")
    return array


def _check_dir(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise DataError(f"{directory}: not a directory; expected the MNIST data directory")
    if directory.is_dir():
        try:
            os.listdir(directory)
        except PermissionError:
            raise DataError(f"{directory}: directory is not readable") from None


def download(
    directory: Path,
    names: tuple[str, ...] = FILE_NAMES,
    mirror: str | None = None,
    timeout: float = 30.0,
) -> None:
    """Download MNIST files into ``directory``, each verified against its MD5 first."""
    chosen = mirror or os.environ.get("MECHSCOPE_MNIST_MIRROR")
    mirrors = [chosen] if chosen else list(MIRRORS)
    mirrors = [m if m.endswith("/") else m + "/" for m in mirrors]
    by_name = {f.name: f for f in FILES.values()}
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create MNIST directory {directory}: {e.strerror or e}") from None
    for name in names:
        want = by_name[name].md5
        errors = []
        for base in mirrors:
            url = base + name
            log.info("downloading %s", url)
            fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".part")
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                    shutil.copyfileobj(resp, out)
                got = md5sum(tmp)
                if got != want:
                    errors.append(f"{url}: MD5 {got}, expected {want}")
                    continue
                tmp.replace(directory / name)
                break
            except (urllib.error.URLError, OSError, ValueError) as e:
                errors.append(f"{url}: {getattr(e, 'reason', None) or e}")
            finally:
                tmp.unlink(missing_ok=True)
        else:
            raise DataError(
                f"MNIST files missing from {directory} (expected {', '.join(FILE_NAMES)}) "
                f"and the download failed ({'; '.join(errors)}); put the four files there, "
                "or point --data-dir / MECHSCOPE_DATA at a directory that has them"
            )


def verify(path: Path, spec: IdxFile) -> None:
    """Raise :class:`DataError` unless ``path`` has the published MD5 (saying why it differs)."""
    got = md5sum(path)
    if got == spec.md5:
        return
    try:
        read_idx_gz(path, spec)
        why = "the file parses but is not the published original"
    except DataError as e:
        why = str(e).removeprefix(f"{path}: ")
    raise DataError(
        f"{path}: MD5 {got} does not match the published {spec.md5} ({why}); "
        "delete the file to download it again, or replace it with the original"
    )


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    download_missing: bool = True,
    mirror: str | None = None,
) -> MNIST:
    """Load and verify MNIST (see the module docstring for where files are looked for)."""
    root = resolve_data_dir(data_dir)
    _check_dir(root)
    directory = mnist_dir(root)
    _check_dir(directory)
    missing = tuple(f.name for f in FILES.values() if not (directory / f.name).exists())
    if missing:
        if not download_missing:
            raise DataError(
                f"MNIST files missing from {directory}: {', '.join(missing)} (expected {', '.join(FILE_NAMES)})"
            )
        download(directory, missing, mirror=mirror)
    arrays, sums = {}, {}
    for key, spec in FILES.items():
        path = directory / spec.name
        verify(path, spec)
        sums[spec.name] = spec.md5
        arrays[key] = read_idx_gz(path, spec)
    labels = {k: torch.from_numpy(arrays[k].astype(np.int64)) for k in ("train_labels", "test_labels")}
    for k, v in labels.items():
        if int(v.max()) > 9:
            raise DataError(f"{directory / FILES[k].name}: label {int(v.max())} outside 0-9")
    log.info("MNIST loaded from %s", directory)
    return MNIST(
        train_images=torch.from_numpy(arrays["train_images"].copy()),
        train_labels=labels["train_labels"],
        test_images=torch.from_numpy(arrays["test_images"].copy()),
        test_labels=labels["test_labels"],
        directory=directory,
        md5=sums,
    )

"""Image-classification datasets for the CNN half: built-in IDX datasets, a folder of IDX files, a .npz.

:func:`load_dataset` takes ``--dataset``'s value:

* a built-in name (:data:`~mechscope.cnn.data.builtin.BUILTINS`: ``mnist``, ``fashion-mnist``,
  ``kmnist``, ``emnist-digits``, ``emnist-letters``, ``emnist-balanced``), checked against the
  published checksums and downloaded when missing;
* ``idx`` with ``data_dir``: any folder holding the four IDX files (gzip or not; names containing
  ``train``/``test`` or ``t10k`` and ``images``/``labels``); format checks only;
* a ``.npz`` file with ``x_train``, ``y_train``, ``x_test``, ``y_test``: images uint8 (0-255) or
  float, [N, H, W], [N, H, W, C] or [N, C, H, W] with 1 or 3 channels, square, at least 8×8.

Every source becomes an :class:`ImageDataset` (images [N, C, H, W]); the number of classes comes
from the training labels (or the class-names file), and every label must be one of them.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mechscope.cnn.data import builtin as B
from mechscope.cnn.data.idx import md5sum, read_idx, sha256sum, verify
from mechscope.core.errors import DataError
from mechscope.core.validate import repeated

log = logging.getLogger(__name__)

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True)
class ImageDataset:
    """Train and test splits: images [N, C, H, W] (uint8 0-255 or float), labels int64 [N]."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: tuple[str, ...]
    source: dict = field(default_factory=dict)  # kind, directory or file, checksums

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @staticmethod
    def to_float(images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float32 in [0, 1]; float images as they are ([N, 28, 28] gains a channel)."""
        if images.dim() == 3:
            images = images.unsqueeze(1)
        return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()

    def train_float(self, limit: int | None = None) -> torch.Tensor:
        return self.to_float(self.train_images[:limit])

    def test_float(self, limit: int | None = None) -> torch.Tensor:
        return self.to_float(self.test_images[:limit])

    def describe(self) -> dict:
        """What a run's config.json records about its data."""
        return {
            "name": self.name,
            **self.source,
            "shape": list(self.shape),
            "n_train": len(self.train_labels),
            "n_test": len(self.test_labels),
            "class_names": list(self.class_names),
        }


# ---- checks shared by every source ---------------------------------------------------------


def _numeric(a, source: str, what: str) -> np.ndarray:
    """A numpy array torch can hold: integers other than uint8 as int64 (range-checked), floats as they are."""
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise DataError(f"{source}: {what} of type {a.dtype}; expected numbers")
    if a.dtype.kind in "iu" and a.dtype != np.uint8:
        if a.size and (int(a.min()) < -(2**63) or int(a.max()) >= 2**63):
            raise DataError(f"{source}: {what} hold values beyond 64-bit integers")
        a = a.astype(np.int64)
    return a


def as_nchw(x: np.ndarray | torch.Tensor, source: str) -> torch.Tensor:
    """Images [N, H, W], [N, H, W, C] or [N, C, H, W] (C 1 or 3, square) -> [N, C, H, W] uint8 or float32."""
    x = torch.as_tensor(_numeric(x, source, "images")) if not isinstance(x, torch.Tensor) else x
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise DataError(f"{source}: images shaped {list(x.shape)}; expected [N, H, W], [N, H, W, C] or [N, C, H, W]")
    if x.shape[1] in (1, 3) and x.shape[2] == x.shape[3]:
        pass
    elif x.shape[3] in (1, 3) and x.shape[1] == x.shape[2]:
        x = x.permute(0, 3, 1, 2)
    else:
        raise DataError(f"{source}: images shaped {list(x.shape)}; expected square images with 1 or 3 channels")
    if x.is_floating_point() or x.is_complex():
        if x.is_complex():
            raise DataError(f"{source}: complex images ({x.dtype}); expected real pixel values")
        x = x.float()
        finite = torch.isfinite(x)
        if not finite.all():
            bad = (~finite).nonzero()[0].tolist()
            value = float(x[tuple(bad)])
            raise DataError(
                f"{source}: {int((~finite).sum())} pixel(s) not finite ({value} in image {bad[0]}); "
                "expected finite pixel values"
            )
        return x.contiguous()
    if x.dtype == torch.uint8 or x.numel() == 0:  # no pixels: the split and size checks say what is wrong
        return x.to(torch.uint8).contiguous()
    if x.dtype in (torch.bool,) or x.min() < 0 or x.max() > 255:
        raise DataError(f"{source}: integer images must hold values 0-255, got {x.dtype}")
    return x.to(torch.uint8).contiguous()


def as_labels(y, source: str) -> torch.Tensor:
    y = torch.as_tensor(_numeric(y, source, "labels")) if not isinstance(y, torch.Tensor) else y
    if y.dim() != 1:
        raise DataError(f"{source}: labels shaped {list(y.shape)}; expected one integer label per image")
    if y.is_floating_point():
        if not torch.isfinite(y).all() or not torch.equal(y, y.round()):
            raise DataError(f"{source}: labels must be whole numbers (class indices)")
        big = y.abs() > 2**62  # past int64 once converted: said as given, not as the number it would wrap to
        if big.any():
            raise DataError(f"{source}: label {y[big][0].item():g} is not a class index")
    elif y.dtype == torch.bool or y.is_complex():
        raise DataError(f"{source}: labels must be integer class indices, got {y.dtype}")
    return y.long()


def check_dataset(data) -> None:
    """``data`` is an :class:`ImageDataset` (a pipeline's argument; the tuples a notebook passes to ``explain``
    gave an AttributeError here)."""
    if not isinstance(data, ImageDataset):
        raise DataError(f"data must be an ImageDataset (mechscope.load_dataset(NAME), or mechscope.cnn.as_dataset("
                        f"(train_images, train_labels), (test_images, test_labels))), got {type(data).__name__}")


def make_dataset(
    name: str, x_train, y_train, x_test, y_test, class_names=None, source: dict | None = None, where: str = ""
) -> ImageDataset:
    """Check and assemble an :class:`ImageDataset` (see the module docstring for what is accepted)."""
    where = where or name
    xs = {"x_train": as_nchw(x_train, f"{where} x_train"), "x_test": as_nchw(x_test, f"{where} x_test")}
    ys = {"y_train": as_labels(y_train, f"{where} y_train"), "y_test": as_labels(y_test, f"{where} y_test")}
    for split in ("train", "test"):
        if len(xs[f"x_{split}"]) != len(ys[f"y_{split}"]):
            raise DataError(
                f"{where}: {len(xs[f'x_{split}'])} images but {len(ys[f'y_{split}'])} labels in the {split} split"
            )
        if len(ys[f"y_{split}"]) == 0:
            raise DataError(f"{where}: the {split} split is empty")
    if xs["x_train"].shape[1:] != xs["x_test"].shape[1:]:
        raise DataError(
            f"{where}: train images are {list(xs['x_train'].shape[1:])}, test images {list(xs['x_test'].shape[1:])}"
        )
    size = xs["x_train"].shape[-1]
    if size < 8:
        raise DataError(f"{where}: images are {size}×{size}; at least 8×8 is needed")
    names = _class_names(ys, class_names, where)
    return ImageDataset(name, xs["x_train"], ys["y_train"], xs["x_test"], ys["y_test"], names, dict(source or {}))


def _class_names(ys: dict, class_names, where: str) -> tuple[str, ...]:
    for key, y in ys.items():
        if (y < 0).any():
            raise DataError(f"{where}: label {int(y.min())} in {key} out of range; labels are class indices 0, 1, ...")
    if class_names is not None:
        names = tuple(str(c) for c in class_names)
        k = len(names)
        twice = repeated(names)
        if twice:  # a class asked for by name would silently be the first of them
            raise DataError(f"{where}: class name(s) {', '.join(map(repr, twice))} given more than once")
        for key, y in ys.items():
            if int(y.max()) >= k:
                raise DataError(f"{where}: label {int(y.max())} in {key} out of range for {k} class names (0..{k - 1})")
    else:
        k = int(ys["y_train"].max()) + 1
        if int(ys["y_test"].max()) >= k:
            raise DataError(
                f"{where}: test label {int(ys['y_test'].max())} out of range; the training labels are 0..{k - 1}"
            )
        names = None  # made below, once every class is known to have training images
    present = set(ys["y_train"].unique().tolist())
    if k < 2 or len(present) < 2:
        raise DataError(f"{where}: fewer than two classes in the training labels; a classifier needs two or more")
    # the first classes without training images (at most len(present) + 5 indices looked at, whatever k is)
    absent = list(itertools.islice((i for i in range(k) if i not in present), 5))
    if absent:
        raise DataError(f"{where}: class(es) {absent[:5]} of 0..{k - 1} have no training images")
    return names if names is not None else tuple(str(i) for i in range(k))


def read_class_names(path: str | os.PathLike) -> tuple[str, ...]:
    """One class name per line (blank lines at the end ignored; a byte-order mark, as Windows editors write, too)."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read the class names ({getattr(e, 'strerror', None) or e})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or any(not line.strip() for line in lines):
        raise DataError(f"{p}: expected one non-empty class name per line")
    return tuple(line.strip() for line in lines)


# ---- sources ----------------------------------------------------------------------------------


def load_builtin(
    name: str, data_dir=None, *, download_missing: bool = True, mirror: str | None = None, class_names=None
) -> ImageDataset:
    """A built-in dataset, every file checked against its published MD5 (downloaded when missing)."""
    ds = B.BUILTINS[name]
    root = B.resolve_data_dir(data_dir)
    B.check_dir(root, ds.title)
    directory = B.dataset_dir(root, ds)
    B.check_dir(directory, ds.title)
    missing = tuple(f.name for f in ds.files.values() if not (directory / f.name).exists())
    if missing:
        if not download_missing:
            raise DataError(
                f"{ds.title} files missing from {directory}: {', '.join(missing)} (expected {', '.join(ds.file_names)})"
            )
        B.download(ds, directory, missing, mirror=mirror)
    arrays = {}
    for key, spec in ds.files.items():
        verify(directory / spec.name, spec)
        arrays[key] = read_idx(directory / spec.name, spec)
    images = {k: torch.from_numpy(_writable(arrays[k])) for k in ("train_images", "test_images")}
    if ds.transposed:
        images = {k: v.transpose(1, 2).contiguous() for k, v in images.items()}
    keys = ("train_labels", "test_labels")
    labels = {k: torch.from_numpy(arrays[k].astype(np.int64)) - ds.label_offset for k in keys}
    source = {"kind": "builtin", "directory": str(directory), "md5": {f.name: f.md5 for f in ds.files.values()}}
    log.info("%s loaded from %s", ds.title, directory)
    return make_dataset(
        name, images["train_images"], labels["train_labels"], images["test_images"], labels["test_labels"],
        class_names or ds.class_names, source, where=str(directory),
    )  # fmt: skip


def _find_idx(directory: Path) -> dict[str, Path]:
    found: dict[str, list[Path]] = {k: [] for k in ("train_images", "train_labels", "test_images", "test_labels")}
    for p in sorted(directory.iterdir()):
        n = p.name.lower()
        if not p.is_file() or n.startswith("."):
            continue
        split = "train" if "train" in n else "test" if ("test" in n or "t10k" in n) else None
        part = "images" if "images" in n else "labels" if "labels" in n else None
        if split and part:
            found[f"{split}_{part}"].append(p)
    out = {}
    for key, paths in found.items():
        if len(paths) != 1:
            split, part = key.split("_")
            what = "no file" if not paths else f"{len(paths)} files ({', '.join(p.name for p in paths)})"
            raise DataError(
                f"{directory}: {what} for the {split} {part}; expected one IDX file (gzip or not) whose name holds "
                f"'{split if split == 'train' else 'test or t10k'}' and '{part}'"
            )
        out[key] = paths[0]
    return out


def load_idx_folder(directory, class_names=None) -> ImageDataset:
    """Any folder of the four IDX files (no published checksum: format checks only)."""
    if directory is None:
        raise DataError("--dataset idx needs --data-dir DIR, the folder holding the four IDX files")
    directory = Path(directory).expanduser()
    B.check_dir(directory, "IDX")
    if not directory.is_dir():
        raise DataError(f"{directory}: directory not found")
    paths = _find_idx(directory)
    arrays = {k: read_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        img, lab = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if img.ndim not in (3, 4):
            raise DataError(f"{paths[f'{split}_images']}: {img.ndim}-dimensional; expected images [N, H, W]")
        if lab.ndim != 1:
            raise DataError(f"{paths[f'{split}_labels']}: {lab.ndim}-dimensional; expected labels [N]")
    source = {"kind": "idx", "directory": str(directory.resolve()), "md5": {p.name: md5sum(p) for p in paths.values()}}
    return make_dataset(
        "idx", _writable(arrays["train_images"]), arrays["train_labels"].astype(np.int64),
        _writable(arrays["test_images"]), arrays["test_labels"].astype(np.int64), class_names, source,
        where=str(directory),
    )  # fmt: skip


def _writable(a: np.ndarray) -> np.ndarray:
    """``a`` itself when it may be written (parsed from a bytearray), else a copy (torch needs writable memory)."""
    return a if a.flags.writeable else a.copy()


def _check_npz_headers(p: Path) -> None:
    """Each array's header against the bytes the archive holds for it, before numpy allocates what the header
    says (a corrupt shape would otherwise ask for gigabytes)."""
    import math
    import zipfile

    from numpy.lib import format as npf

    if not zipfile.is_zipfile(p):  # np.savez always writes a zip; numpy's own errors name pickles or a context manager
        with open(p, "rb") as f:
            npy = f.read(6) == b"\x93NUMPY"
        raise DataError(f"{p}: {'a single .npy array' if npy else 'not a zip archive'}; a .npz dataset is the zip "
                        "np.savez writes, of x_train, y_train, x_test and y_test")  # fmt: skip
    with zipfile.ZipFile(p) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename.removesuffix(".npy")
            deflated = info.compress_type != zipfile.ZIP_STORED
            if info.file_size > (info.compress_size * 1100 if deflated else info.compress_size):
                raise DataError(f"{p}: {name}: the archive's sizes do not agree (corrupt file?)")
            with zf.open(info) as f:
                version = npf.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise DataError(f"{p}: {name}: .npy format version {version}; expected 1.0 or 2.0")
                read = npf.read_array_header_1_0 if version == (1, 0) else npf.read_array_header_2_0
                shape, _, dtype = read(f, max_header_size=10_000)
                header = f.tell()
            if dtype.hasobject:
                raise DataError(f"{p}: {name} holds Python objects; expected numbers")
            need = math.prod(shape) * dtype.itemsize
            if need != info.file_size - header:
                raise DataError(
                    f"{p}: {name}: header says shape {list(shape)} of {dtype} ({need:,} bytes) but the archive "
                    f"holds {info.file_size - header:,}"
                )


def load_npz(path, class_names=None) -> ImageDataset:
    """A .npz with x_train, y_train, x_test, y_test (see the module docstring)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: {'is a directory, not a .npz file' if p.is_dir() else 'file not found'}")
    try:
        _check_npz_headers(p)
        with np.load(p, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise DataError(f"{p}: a single .npy array, not a .npz archive of {', '.join(NPZ_KEYS)}")
            missing = [k for k in NPZ_KEYS if k not in z.files]
            if missing:
                raise DataError(f"{p}: missing {', '.join(missing)}; a .npz dataset holds {', '.join(NPZ_KEYS)}")
            arrays = {k: z[k] for k in NPZ_KEYS}
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"{p}: an array's header asks for more memory than there is (corrupt file?)") from None
    except Exception as e:  # numpy and zipfile raise many types for a corrupt archive (BadZipFile, EOFError, ...)
        detail = " ".join(str(e).split())[:200]
        raise DataError(f"{p}: not a readable .npz file ({type(e).__name__}: {detail})") from None
    for k, a in arrays.items():
        if a.dtype.kind not in "biuf":
            raise DataError(f"{p}: {k} holds {a.dtype} values; expected numbers (images uint8 or float)")
    source = {"kind": "npz", "file": str(p.resolve()), "sha256": sha256sum(p)}  # found again from any folder
    return make_dataset(p.stem, *(arrays[k] for k in NPZ_KEYS), class_names, source, where=str(p))


def load_dataset(dataset: str = "mnist", data_dir=None, class_names=None, download_missing: bool = True):
    """``--dataset``: a built-in name, ``idx`` (with ``data_dir``) or a path to a ``.npz`` file."""
    names = read_class_names(class_names) if isinstance(class_names, (str, os.PathLike)) else class_names
    key = str(dataset)
    if key in B.BUILTINS:
        return load_builtin(key, data_dir, download_missing=download_missing, class_names=names)
    if key == "idx":
        return load_idx_folder(data_dir, names)
    if key.endswith(".npz") or Path(key).is_file():
        return load_npz(key, names)
    raise DataError(
        f"unknown dataset {key!r}; expected one of {', '.join(B.BUILTINS)}, idx (with --data-dir DIR) "
        "or the path of a .npz file"
    )


def check_recorded(data: ImageDataset, recorded: dict) -> None:
    """Warn when the data differ from what a run recorded (another file, other checksums)."""
    for key in ("md5", "sha256"):
        if key in recorded and key in data.source and recorded[key] != data.source[key]:
            log.warning("the data's checksums differ from those the run recorded (%s); numbers may not match", key)


"""MNIST from the four original IDX gzip files, verified against their published MD5s.

The MNIST entry of the built-in datasets (:mod:`mechscope.cnn.data.builtin`, where the files are
looked for and downloaded from), in the shape the CNN half first used: :class:`MNIST` holds
uint8 images [n, 28, 28]. New code uses :func:`mechscope.cnn.data.images.load_dataset`, which
returns [n, C, H, W] for every dataset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mechscope.cnn.data.builtin import BUILTINS, dataset_dir, resolve_data_dir
from mechscope.cnn.data.builtin import download as _download
from mechscope.cnn.data.idx import IdxFile, md5sum, parse_idx, read_idx, read_idx_gz, verify

__all__ = [
    "FILES", "FILE_NAMES", "MIRRORS", "MNIST", "IdxFile", "download", "load_mnist", "md5sum", "mnist_dir",
    "parse_idx", "read_idx", "read_idx_gz", "resolve_data_dir", "verify",
]  # fmt: skip

SPEC = BUILTINS["mnist"]
MIRRORS = SPEC.mirrors
FILES: dict[str, IdxFile] = SPEC.files
FILE_NAMES = SPEC.file_names


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


def mnist_dir(root: Path) -> Path:
    """Where the MNIST files are (or will be downloaded to) under the data root."""
    return dataset_dir(root, SPEC)


def download(directory: Path, names: tuple[str, ...] = FILE_NAMES, mirror: str | None = None, timeout=30.0) -> None:
    """Download MNIST files into ``directory``, each verified against its MD5 first."""
    _download(SPEC, directory, names, mirror=mirror, timeout=timeout)


def load_mnist(data_dir: str | os.PathLike | None = None, *, download_missing: bool = True, mirror=None) -> MNIST:
    """Load and verify MNIST (see :mod:`mechscope.cnn.data.builtin` for where files are looked for)."""
    from mechscope.cnn.data.images import load_builtin

    data = load_builtin("mnist", data_dir, download_missing=download_missing, mirror=mirror)
    return MNIST(
        train_images=data.train_images[:, 0],
        train_labels=data.train_labels,
        test_images=data.test_images[:, 0],
        test_labels=data.test_labels,
        directory=Path(data.source["directory"]),
        md5=dict(data.source["md5"]),
    )


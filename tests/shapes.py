"""Small generated image datasets for tests: bars, diagonals and boxes at random places, as IDX or .npz."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

CLASS_NAMES = ("horizontal", "vertical", "diagonal", "box")


def make_shapes(n: int, size: int = 16, n_classes: int = 4, rgb: bool = False, seed: int = 0):
    """uint8 images [n, size, size] (or [n, size, size, 3] with random colours) and labels [n], classes in turn."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size, 3), dtype=np.float32)
    labels = np.arange(n) % n_classes
    length = max(4, int(size * 0.55))
    for i, k in enumerate(labels):
        y, x = rng.integers(1, size - length, 2)
        mask = np.zeros((size, size), dtype=bool)
        if k == 0:
            mask[y + length // 2 : y + length // 2 + 2, x : x + length] = True
        elif k == 1:
            mask[y : y + length, x + length // 2 : x + length // 2 + 2] = True
        elif k == 2:
            for t in range(length):
                mask[y + t, x + t : x + t + 2] = True
        else:
            mask[y : y + length, x : x + length] = True
            mask[y + 2 : y + length - 2, x + 2 : x + length - 2] = False
        colour = rng.uniform(0.5, 1.0, 3) if rgb else np.ones(3)
        images[i][mask] = colour
    images += rng.uniform(0, 0.15, images.shape)
    out = (np.clip(images, 0, 1) * 255).astype(np.uint8)
    return (out if rgb else out[..., 0]), labels.astype(np.uint8)


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(directory: Path, splits: dict, gz: bool = True, prefix: str = "", test: str = "t10k") -> Path:
    """The four IDX files of ``splits`` (x_train, y_train, x_test, y_test) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    names = {
        "x_train": f"{prefix}train-images-idx3-ubyte", "y_train": f"{prefix}train-labels-idx1-ubyte",
        "x_test": f"{prefix}{test}-images-idx3-ubyte", "y_test": f"{prefix}{test}-labels-idx1-ubyte",
    }  # fmt: skip
    for key, name in names.items():
        data = idx_bytes(splits[key])
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
        else:
            (directory / name).write_bytes(data)
    return directory


def splits(n_train: int = 320, n_test: int = 160, **kw) -> dict:
    x, y = make_shapes(n_train + n_test, **kw)
    return {"x_train": x[:n_train], "y_train": y[:n_train], "x_test": x[n_train:], "y_test": y[n_train:]}

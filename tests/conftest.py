"""Shared fixtures. Real data comes from $MECHSCOPE_DATA or ../shared/data beside the checkout."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path | None:
    for candidate in (os.environ.get("MECHSCOPE_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "mnist" / "t10k-labels-idx1-ubyte.gz").exists():
            return Path(candidate)
    return None


# the data root `make test` sets, so that running pytest directly (module-scoped fixtures included) is the same
if shared_data_root() is not None and not os.environ.get("MECHSCOPE_DATA"):
    os.environ["MECHSCOPE_DATA"] = str(shared_data_root())
# never the internet, for module- and session-scoped fixtures too (the autouse fixture below is per test)
os.environ.setdefault("MECHSCOPE_MNIST_MIRROR", "http://127.0.0.1:9/")
os.environ.setdefault("MECHSCOPE_MIRROR", "http://127.0.0.1:9/")


@pytest.fixture(autouse=True)
def _offline_mirror(monkeypatch):
    # Tests never reach the internet: a missing file "downloads" from a closed local port,
    # which fails at once. Tests of the download path set their own mirror.
    monkeypatch.setenv("MECHSCOPE_MNIST_MIRROR", "http://127.0.0.1:9/")
    monkeypatch.setenv("MECHSCOPE_MIRROR", "http://127.0.0.1:9/")  # every other built-in dataset



@pytest.fixture()
def one_thread():
    """One torch thread for a test (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a busy 2-core machine
    more threads make small models many times slower (see :func:`mechscope.core.torch_utils.torch_threads`)."""
    from mechscope.core.torch_utils import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    root = shared_data_root()
    if root is None:
        pytest.skip("MNIST files not found in $MECHSCOPE_DATA or ../shared/data")
    return root


@pytest.fixture(scope="session")
def mnist(mnist_root):
    from mechscope.cnn.data.mnist import load_mnist

    return load_mnist(mnist_root, download_missing=False)


@pytest.fixture()
def mnist_copy(mnist_root, tmp_path) -> Path:
    """A private data root with copies of the four MNIST files, safe to damage."""
    dest = tmp_path / "data" / "mnist"
    dest.mkdir(parents=True)
    for f in (mnist_root / "mnist").iterdir():
        if f.name.endswith(".gz"):
            shutil.copy(f, dest / f.name)
    return dest.parent


@pytest.fixture(scope="session")
def quick_run(mnist_root, tmp_path_factory) -> Path:
    """A run directory from a short training on a subset (a few seconds)."""
    from mechscope.cnn.config import TrainConfig
    from mechscope.cnn.pipelines.train import train

    out = tmp_path_factory.mktemp("runs") / "quick"
    train(
        out, TrainConfig(epochs=1, train_limit=4096, batch_size=64, lr=3e-3), data_dir=mnist_root, progress=False
    )
    return out


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random CLIP checkpoint written with transformers (its users skip without it); read, never written."""
    from tests.unit.test_clip_models import tiny_checkpoint

    d = tmp_path_factory.mktemp("clip") / "tiny-clip"
    tiny_checkpoint(d, "clip")
    return d


@pytest.fixture(scope="session")
def clip_pictures(tmp_path_factory) -> Path:
    """A folder of small random pictures for the CLIP commands; read, never written."""
    from tests.unit.test_clip_models import random_pictures

    return random_pictures(tmp_path_factory.mktemp("pictures"))


@pytest.fixture()
def seeded():
    torch.manual_seed(0)

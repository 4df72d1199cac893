"""Loading real MNIST: checksums, resolution of the data directory, every bad input, download."""

from __future__ import annotations

import functools
import gzip
import http.server
import shutil
import threading

import pytest
import torch

from mechscope.cnn.data import mnist as M
from mechscope.core.errors import DataError


def test_real_mnist(mnist):
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.train_images.dtype == torch.uint8
    assert mnist.test_images.shape == (10000, 28, 28)
    assert mnist.train_labels.shape == (60000,) and mnist.test_labels.shape == (10000,)
    assert set(mnist.test_labels.unique().tolist()) == set(range(10))
    # published facts about MNIST: the first training label is 5, the first test label is 7
    assert mnist.train_labels[0] == 5 and mnist.test_labels[0] == 7
    assert mnist.test_labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    x = M.MNIST.to_float(mnist.test_images[:2])
    assert x.shape == (2, 1, 28, 28) and x.min() >= 0.0 and x.max() <= 1.0


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MECHSCOPE_DATA", str(tmp_path / "env"))
    assert M.resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert M.resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("MECHSCOPE_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert M.resolve_data_dir() == tmp_path / "home" / ".cache" / "mechscope" / "data"


def test_files_directly_in_root(mnist_copy):
    flat = mnist_copy / "flat"
    shutil.move(mnist_copy / "mnist", flat)
    data = M.load_mnist(flat, download_missing=False)
    assert data.directory == flat and len(data.test_labels) == 10000


def test_wrong_md5(mnist_copy):
    path = mnist_copy / "mnist" / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # one label changed: still valid IDX, not the original
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match=r"MD5 .* does not match the published ec29112d.*parses but is not"):
        M.load_mnist(mnist_copy)
    # the user's file is left alone: never overwritten by a download
    assert gzip.decompress(path.read_bytes()) == bytes(raw)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:2000]), "truncated or corrupt gzip"),
        (
            lambda p: p.write_bytes(gzip.compress(b"\x00\x00\x08\x02" + gzip.decompress(p.read_bytes())[4:])),
            "wrong magic number 0x00000802",
        ),
        (lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[: 8 + 9999])), "holds 9999"),
    ],
    ids=["truncated", "magic", "count"],
)
def test_damaged_file_explained(mnist_copy, damage, message):
    damage(mnist_copy / "mnist" / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match=message):
        M.load_mnist(mnist_copy)


def test_wrong_item_count_with_matching_header(tmp_path):
    # a self-consistent labels file with 9,999 items is still the wrong file
    data = b"\x00\x00\x08\x01" + (9999).to_bytes(4, "big") + bytes(9999)
    path = tmp_path / "l.gz"
    path.write_bytes(gzip.compress(data))
    with pytest.raises(DataError, match="holds 9999 items; expected 10000"):
        M.read_idx_gz(path, M.FILES["test_labels"])


def test_missing_without_download(tmp_path):
    with pytest.raises(DataError) as err:
        M.load_mnist(tmp_path, download_missing=False)
    for name in M.FILE_NAMES:
        assert name in str(err.value)


def test_offline_message_names_dir_and_files(tmp_path):
    # the autouse fixture points the mirror at a closed port: this is what offline looks like
    with pytest.raises(DataError) as err:
        M.load_mnist(tmp_path)
    text = str(err.value)
    assert str(tmp_path / "mnist") in text and "download failed" in text
    assert all(name in text for name in M.FILE_NAMES)
    assert "\n" not in text
    assert not list((tmp_path / "mnist").glob("*.part"))


def test_a_failed_download_takes_back_the_folders_it_made_and_names_each_cause_once(tmp_path):
    """Truth: the folder tree before and after. A --data-dir that did not exist was left behind as DIR/mnist/ (empty)
    after the error; and an offline machine's one cause was repeated for each of the addresses tried (a line of about
    1,000 characters): now each cause once, with how many addresses gave it. A folder that was there stays."""
    with pytest.raises(DataError) as err:
        M.load_mnist(tmp_path / "new" / "root")
    assert list(tmp_path.iterdir()) == []
    text = str(err.value)
    assert text.count("Connection refused") == 1 and "at all 4 addresses, e.g. http://127.0.0.1:9/" in text
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError):
        M.load_mnist(tmp_path / "mine")
    assert [p.name for p in tmp_path.rglob("*")] == ["mine"]


def test_unreadable_directory(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        M.load_mnist(not_a_dir)


@pytest.fixture()
def http_mirror(mnist_root, tmp_path):
    """A real HTTP server on 127.0.0.1 serving a copy of the MNIST directory."""
    served = tmp_path / "served"
    shutil.copytree(mnist_root / "mnist", served)
    handler = functools.partial(QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", served
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_from_local_mirror(http_mirror, tmp_path):
    url, _ = http_mirror
    root = tmp_path / "fresh"
    data = M.load_mnist(root, mirror=url)
    assert len(data.train_labels) == 60000 and len(data.test_labels) == 10000
    assert sorted(p.name for p in (root / "mnist").iterdir()) == sorted(M.FILE_NAMES)


def test_download_fetches_only_missing(http_mirror, mnist_copy):
    url, _ = http_mirror
    (mnist_copy / "mnist" / "train-labels-idx1-ubyte.gz").unlink()
    data = M.load_mnist(mnist_copy, mirror=url)
    assert len(data.train_labels) == 60000


def test_download_rejects_bad_md5(http_mirror, tmp_path):
    url, served = http_mirror
    bad = served / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-10])
    root = tmp_path / "fresh"
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: MD5 \w+, expected ec29112d"):
        M.load_mnist(root, mirror=url)
    directory = root / "mnist"
    assert not (directory / "t10k-labels-idx1-ubyte.gz").exists()
    assert not [p for p in directory.iterdir() if p.name.endswith(".part")]


def test_the_download_causes_are_counted_as_they_were_met():
    """Truth: the tries listed by hand. One cause met at every address says "all"; two causes each say their own count
    (4 404s and 5 timeouts read "at all 4 addresses ...; at all 5 addresses" of the 9 tried); a cause met once names
    its address."""
    from mechscope.cnn.data.builtin import _failures

    assert _failures([("a", "refused"), ("b", "refused")]) == "refused at all 2 addresses, e.g. a"
    assert _failures([("a", "404"), ("b", "404"), ("c", "timed out")]) == "404 at 2 addresses, e.g. a; c: timed out"
    assert _failures([]) == "no mirror"

"""Datasets beyond MNIST: the published checksums, wrong files refused with the reason, EMNIST's
transposed images, a folder of IDX files, .npz files, class names, and every bad input."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import re
import threading
import zipfile

import numpy as np
import pytest
import torch

from mechscope.cnn.data import builtin as B
from mechscope.cnn.data.images import load_dataset, load_npz, read_class_names
from mechscope.core.errors import DataError
from tests.shapes import CLASS_NAMES, idx_bytes, splits, write_idx

# Copied by hand from the sources (torchvision datasets/mnist.py; deeplearning4j EmnistFetcher.java and
# pczarnik/mnists _emnist.py agree on EMNIST): train images, train labels, test images, test labels.
PUBLISHED = {
    "mnist": ["f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
              "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"],
    "fashion-mnist": ["8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                      "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"],
    "kmnist": ["bdb82020997e1d708af4cf47b453dcf7", "e144d726b3acfaa3e44228e80efcd344",
               "5c965bf0a639b31b8f53240b1b52f4d7", "7320c461ea6c1c855c0b718fb2a4b134"],
    "emnist-digits": ["d2662ecdc47895a6bbfce25de9e9a677", "2223fcfee618ac9c89ef20b6e48bcf9e",
                      "a159b8b3bd6ab4ed4793c1cb71a2f5cc", "8afde66ea51d865689083ba6bb779fac"],
    "emnist-letters": ["8795078f199c478165fe18db82625747", "c16de4f1848ddcdddd39ab65d2a7be52",
                       "382093a19703f68edac6d01b8dfdfcad", "d4108920cd86601ec7689a97f2de7f59"],
    "emnist-balanced": ["4041b0d6f15785d3fa35263901b5496b", "7a35cc7b2b7ee7671eddf028570fbd20",
                        "6818d20fe2ce1880476f747bbc80b22b", "acd3694070dcbf620e36670519d4b32f"],
}  # fmt: skip


def test_builtin_checksums_are_the_published_ones():
    assert set(B.BUILTINS) == set(PUBLISHED)
    for name, md5s in PUBLISHED.items():
        assert [f.md5 for f in B.BUILTINS[name].files.values()] == md5s, name
    assert B.EMNIST_ZIP.md5 == "58c8d27c78d21e728a6bc7b3cc06412e"  # torchvision EMNIST.md5 for NIST's gzip.zip


def test_builtin_shapes_and_class_names():
    sizes = {"mnist": (60000, 10000), "fashion-mnist": (60000, 10000), "kmnist": (60000, 10000),
             "emnist-digits": (240000, 40000), "emnist-letters": (124800, 20800),
             "emnist-balanced": (112800, 18800)}  # fmt: skip
    for name, (n_train, n_test) in sizes.items():
        files = B.BUILTINS[name].files
        assert files["train_images"].shape == (n_train, 28, 28) and files["test_labels"].shape == (n_test,)
    assert B.BUILTINS["fashion-mnist"].class_names[0] == "T-shirt/top" and len(B.BUILTINS["kmnist"].class_names) == 10
    assert B.BUILTINS["emnist-letters"].class_names == tuple("abcdefghijklmnopqrstuvwxyz")
    balanced = B.BUILTINS["emnist-balanced"].class_names
    assert len(balanced) == 47 and balanced[10] == "A" and balanced[36:] == tuple("abdefghnqrt")


def test_mnist_files_match_the_table(mnist_root):
    for f in B.BUILTINS["mnist"].files.values():
        assert hashlib.md5((mnist_root / "mnist" / f.name).read_bytes()).hexdigest() == f.md5


def test_a_wrong_fashion_file_is_refused_with_the_reason(tmp_path):
    """Valid IDX files of the right names that are not Fashion-MNIST's: refused, saying why, left in place."""
    ds = B.BUILTINS["fashion-mnist"]
    folder = tmp_path / "fashion-mnist"
    write_idx(folder, splits(), gz=True)
    why = r"MD5 \w+ does not match the published 8d4fb7e6.*holds 320 items; expected 60000"
    with pytest.raises(DataError, match=why):
        load_dataset("fashion-mnist", tmp_path)
    assert (folder / ds.files["train_images"].name).exists()


def test_offline_error_names_folder_and_files(tmp_path):
    for name in ("fashion-mnist", "emnist-letters"):  # the autouse fixture closes every mirror
        with pytest.raises(DataError) as err:
            load_dataset(name, tmp_path)
        text = str(err.value)
        assert str(tmp_path / B.BUILTINS[name].folder) in text and "download failed" in text and "\n" not in text
        assert all(f in text for f in B.BUILTINS[name].file_names)


def _fake_builtin(monkeypatch, folder, name: str):
    """Make the registry accept test files under ``name`` (their own MD5s, small counts)."""
    ds = B.BUILTINS[name]
    files = {}
    for key, f in ds.files.items():
        data = (folder / f.name).read_bytes()
        n = int.from_bytes(gzip.decompress(data)[4:8], "big")
        files[key] = dataclasses.replace(f, md5=hashlib.md5(data).hexdigest(), shape=(n, *f.shape[1:]))
    monkeypatch.setitem(B.BUILTINS, name, dataclasses.replace(ds, files=files))


def test_emnist_images_are_transposed_back_and_letters_shifted(tmp_path, monkeypatch):
    s = splits(n_train=52, n_test=26, size=28, n_classes=26)
    stored = {k: (np.ascontiguousarray(v.transpose(0, 2, 1)) if k.startswith("x") else v + 1) for k, v in s.items()}
    write_idx(tmp_path / "emnist", stored, prefix="emnist-letters-", test="test")
    _fake_builtin(monkeypatch, tmp_path / "emnist", "emnist-letters")
    data = load_dataset("emnist-letters", tmp_path)
    assert torch.equal(data.train_images[:, 0], torch.from_numpy(s["x_train"]))  # upright again
    assert torch.equal(data.test_labels, torch.from_numpy(s["y_test"]).long())  # labels 1-26 -> 0-25
    assert data.class_names[:4] == ("a", "b", "c", "d") and data.n_classes == 26


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_emnist_downloads_from_the_zip_each_file_verified(tmp_path, monkeypatch):
    s = splits(n_train=40, n_test=20, size=28, n_classes=10)
    src = write_idx(tmp_path / "src", s, prefix="emnist-digits-", test="test")
    _fake_builtin(monkeypatch, src, "emnist-digits")
    served = tmp_path / "served"
    served.mkdir()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in src.iterdir():
            z.writestr(f"gzip/{p.name}", p.read_bytes())
    (served / "gzip.zip").write_bytes(buf.getvalue())
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/gzip.zip"
        archive = B.Archive(url, hashlib.md5(buf.getvalue()).hexdigest(), "gzip/")
        ds = B.BUILTINS["emnist-digits"]
        monkeypatch.setitem(B.BUILTINS, "emnist-digits", dataclasses.replace(ds, archive=archive))
        monkeypatch.delenv("MECHSCOPE_MIRROR")
        data = load_dataset("emnist-digits", tmp_path / "root")
        assert len(data.train_labels) == 40
        assert sorted(p.name for p in (tmp_path / "root" / "emnist").iterdir()) == sorted(ds.file_names)
        bad = dataclasses.replace(archive, md5="0" * 32)  # a zip that is not the published one: nothing moved in
        monkeypatch.setitem(B.BUILTINS, "emnist-digits", dataclasses.replace(B.BUILTINS["emnist-digits"], archive=bad))
        with pytest.raises(DataError, match="gzip.zip: MD5 .* expected 00000000"):
            load_dataset("emnist-digits", tmp_path / "other")
        assert not (tmp_path / "other").exists()  # nothing half-downloaded, and no folder made for it
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder(tmp_path, gz):
    s = splits()
    write_idx(tmp_path / "d", s, gz=gz)
    data = load_dataset("idx", tmp_path / "d")
    assert data.shape == (1, 16, 16) and data.n_classes == 4 and data.class_names == ("0", "1", "2", "3")
    assert torch.equal(data.test_images[:, 0], torch.from_numpy(s["x_test"]))
    assert data.source["kind"] == "idx" and len(data.source["md5"]) == 4


def test_idx_folder_problems(tmp_path):
    with pytest.raises(DataError, match="--dataset idx needs --data-dir"):
        load_dataset("idx", None)
    write_idx(tmp_path / "d", splits())
    (tmp_path / "d" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="no file for the test labels"):
        load_dataset("idx", tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(5, np.uint8))))
    with pytest.raises(DataError, match="160 images but 5 labels in the test split"):
        load_dataset("idx", tmp_path / "d")


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw", "float"])
def test_npz_layouts(tmp_path, layout):
    s = splits(rgb=layout != "nhw")
    x = {k: v for k, v in s.items()}
    if layout == "nchw":
        x = {k: (v.transpose(0, 3, 1, 2) if k.startswith("x") else v) for k, v in s.items()}
    if layout == "float":
        x = {k: (v.astype(np.float32) / 255 if k.startswith("x") else v.astype(np.int64)) for k, v in s.items()}
    data = load_dataset(str(_npz(tmp_path / "d.npz", **x)))
    assert data.shape == ((1, 16, 16) if layout == "nhw" else (3, 16, 16))
    expected = torch.from_numpy(s["x_train"].astype(np.float32) / 255)
    expected = expected[:, None] if layout == "nhw" else expected.permute(0, 3, 1, 2)
    torch.testing.assert_close(data.train_float(), expected, rtol=0, atol=1e-6)
    assert data.source["kind"] == "npz" and len(data.source["sha256"]) == 64


def test_class_names_file(tmp_path):
    (tmp_path / "names.txt").write_text("\n".join(CLASS_NAMES) + "\n\n")
    assert read_class_names(tmp_path / "names.txt") == CLASS_NAMES
    data = load_dataset(str(_npz(tmp_path / "d.npz", **splits())), class_names=tmp_path / "names.txt")
    assert data.class_names == CLASS_NAMES
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    with pytest.raises(DataError, match="label 3 in y_train out of range for 3 class names"):
        load_dataset(str(tmp_path / "d.npz"), class_names=tmp_path / "three.txt")


def _bad(s, **changes):
    return {**s, **changes}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: {k: v for k, v in s.items() if k != "y_test"}, "missing y_test"),
        (lambda s: _bad(s, y_train=s["y_train"][:-3]), "320 images but 317 labels in the train split"),
        (lambda s: _bad(s, y_test=np.where(np.arange(160) == 7, 9, s["y_test"])), "test label 9 out of range"),
        (lambda s: _bad(s, y_train=s["y_train"].astype(np.int64) - 1), "label -1 in y_train out of range"),
        (lambda s: _bad(s, y_train=np.zeros(320, np.uint8), y_test=np.zeros(160, np.uint8)), "fewer than two classes"),
        (lambda s: _bad(s, x_train=s["x_train"][:, :6, :6], x_test=s["x_test"][:, :6, :6]), "6×6; at least 8×8"),
        (lambda s: _bad(s, x_train=s["x_train"][:, :, :12]), "expected square images"),
        (lambda s: _bad(s, y_train=s["y_train"] * 2), "class(es) [1, 3, 5] of 0..6 have no training images"),
    ],
    ids=["missing-key", "lengths", "test-label", "negative", "one-class", "too-small", "not-square", "gaps"],
)
def test_npz_bad_input(tmp_path, change, message):
    with pytest.raises(DataError, match=re.escape(message)):
        load_npz(_npz(tmp_path / "d.npz", **change(splits())))


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'cifar'; expected one of mnist, fashion-mnist"):
        load_dataset("cifar")

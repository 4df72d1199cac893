"""Outside truths for the vision and image-text wings' plumbing: IDX files, built-in datasets, image folders, the
hook points put on a user's own torch model, and the Building Blocks' channel images and their weights-hash link.

Each test names its outside truth: bytes parsed by hand, published tables, PIL's own pixels, torch's own forward
hooks on the plain module, hashlib over the state dict, or hand arithmetic on tiny known tensors.
"""

from __future__ import annotations

import gzip
import hashlib
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mechscope.cnn.data.idx import IdxFile, parse_idx, read_idx
from mechscope.cnn.data.images import load_dataset, load_npz
from mechscope.cnn.methods import blocks_vis as V
from mechscope.cnn.models.spec import walk
from mechscope.core.errors import DataError
from mechscope.core.hooks import run_with_cache
from tests.shapes import idx_bytes, splits, write_idx
from tests.unit.test_blocks import tiny_spec
from tests.unit.test_data_truths import _raw_idx

MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
               "t10k-labels-idx1-ubyte.gz")  # fmt: skip


# ---- IDX and the datasets ------------------------------------------------------------------------


def test_idx_shape_is_checked_in_every_dimension(tmp_path):
    """Outside truth: the IdxFile table's shape (n, 28, 28), against a file whose header says (3, 28, 27)."""
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((3, 28, 27), np.uint8)))
    with pytest.raises(DataError, match=r"shape \(3, 28, 27\); expected \(3, 28, 28\)"):
        read_idx(path, IdxFile(path.name, "0" * 32, 0x803, (3, 28, 28)))


def test_idx_with_no_dimensions_is_refused():
    """Outside truth: the IDX format (LeCun et al.) stores data in one or more dimensions; magic 0x00000800 has none."""
    with pytest.raises(DataError, match="wrong magic number 0x00000800"):
        parse_idx(b"\x00\x00\x08\x00\x07")


def test_integer_images_may_hold_255(tmp_path):
    """Outside truth: 8-bit pixels run 0..255 inclusive: int64 images holding 255 load as white (1.0), 256 is not."""
    s = splits()
    x = {k: (v.astype(np.int64) if k.startswith("x") else v) for k, v in s.items()}
    x["x_train"][0, 0, 0] = 255
    np.savez(tmp_path / "d.npz", **x)
    data = load_npz(tmp_path / "d.npz")
    assert data.train_images.dtype == torch.uint8 and data.train_float()[0, 0, 0, 0].item() == 1.0
    x["x_train"][0, 0, 0] = 256
    np.savez(tmp_path / "e.npz", **x)
    with pytest.raises(DataError, match="0-255"):
        load_npz(tmp_path / "e.npz")


def test_a_test_label_one_past_the_training_classes_is_refused(tmp_path):
    """Outside truth: hand arithmetic on the labels written here: training labels 0..3 make four classes, so a test
    label 4 names no class (and 3 does)."""
    s = splits()
    assert int(s["y_train"].max()) == 3
    y_test = s["y_test"].copy()
    y_test[5] = 4
    np.savez(tmp_path / "d.npz", **{**s, "y_test": y_test})
    with pytest.raises(DataError, match="test label 4 out of range; the training labels are 0..3"):
        load_npz(tmp_path / "d.npz")


def test_labels_that_are_not_whole_numbers_are_refused(tmp_path):
    """Outside truth: a label is a class index, a whole number; 1.0 is class 1 and 1.5 names no class."""
    s = splits()
    y = s["y_train"].astype(np.float64)
    np.savez(tmp_path / "d.npz", **{**s, "y_train": y})
    assert torch.equal(load_npz(tmp_path / "d.npz").train_labels, torch.from_numpy(s["y_train"]).long())
    y[3] = 1.5
    np.savez(tmp_path / "e.npz", **{**s, "y_train": y})
    with pytest.raises(DataError, match="whole numbers"):
        load_npz(tmp_path / "e.npz")


def test_an_idx_folder_ignores_hidden_files_and_class_names_are_stripped(tmp_path):
    """Outside truth: the folder written here: the four IDX files and a macOS '._' companion (junk bytes) beside
    the training images; the images are the bytes written; the class-names file's lines without their spaces."""
    s = splits()
    write_idx(tmp_path / "d", s)
    (tmp_path / "d" / "._train-images-idx3-ubyte.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "names.txt").write_text("  horizontal\nvertical  \n\tdiagonal\nbox\n")
    data = load_dataset("idx", tmp_path / "d", class_names=tmp_path / "names.txt")
    assert torch.equal(data.train_images[:, 0], torch.from_numpy(s["x_train"]))
    assert data.class_names == ("horizontal", "vertical", "diagonal", "box")


def _mnist_root_of_links(mnist_root, tmp_path):
    """A data root holding links to the four real MNIST files directly (no mnist/ folder under it)."""
    for name in MNIST_FILES:
        (tmp_path / name).symlink_to(mnist_root / "mnist" / name)
    return tmp_path


def test_mnist_from_a_root_holding_the_files_with_the_users_class_names(mnist_root, tmp_path):
    """Outside truth: the real MNIST IDX bytes parsed by hand (labels, the first training images), their counts
    (60,000 and 10,000, LeCun's page), and the class names the user passed."""
    root = _mnist_root_of_links(mnist_root, tmp_path)
    names = [f"digit {i}" for i in range(10)]
    data = load_dataset("mnist", root, class_names=names)
    assert data.class_names == tuple(names)
    raw_labels = gzip.decompress((root / MNIST_FILES[1]).read_bytes())[8:]
    assert data.train_labels.tolist()[:50] == list(raw_labels[:50])
    raw = _raw_idx(root / MNIST_FILES[0])[:3].astype(np.float32) / 255
    torch.testing.assert_close(data.train_float(3), torch.from_numpy(raw)[:, None], rtol=0, atol=1e-7)
    d = data.describe()
    assert (d["n_train"], d["n_test"], d["shape"]) == (60000, 10000, [1, 28, 28])


def test_class_names_are_the_published_tables():
    """Outside truth: Zalando's Fashion-MNIST README label table and torchvision's KMNIST.classes, copied by hand."""
    from mechscope.cnn.data.builtin import BUILTINS

    assert BUILTINS["fashion-mnist"].class_names == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                                     "Shirt", "Sneaker", "Bag", "Ankle boot")  # fmt: skip
    assert BUILTINS["kmnist"].class_names == ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")


# ---- a folder of the user's images --------------------------------------------------------------


def _write_pngs(folder, names, seed):
    """RGB 8×8 PNGs of seeded random pixels, written in a shuffled order; returns {name: pixels PIL reads back}."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    order = list(names)
    random.Random(seed).shuffle(order)
    pixels = {}
    for name in order:
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB").save(folder / name)
        with Image.open(folder / name) as im:
            pixels[name] = np.asarray(im.convert("RGB"))
    return pixels


def _preprocess():
    from mechscope.clip.models.preprocess import Preprocessor

    return Preprocessor(image_size=8, channels=3)  # no resize, no crop: unit pixels are PIL's values / 255


def test_a_folder_is_read_in_name_order_hidden_files_and_subfolders_left_out(tmp_path):
    """Outside truth: PIL's own pixels of PNGs written here, / 255, in the folder's sorted file names."""
    from mechscope.clip.data.folder import read_folder

    names = [f"{c}{i}.png" for i in range(4) for c in "qbmxa"]
    pixels = _write_pngs(tmp_path / "f", names, 0)
    (tmp_path / "f" / ".hidden").write_bytes(b"not an image")
    (tmp_path / "f" / "sub").mkdir()
    unit, got = read_folder(tmp_path / "f", _preprocess())
    assert got == sorted(names)
    expected = np.stack([pixels[n].transpose(2, 0, 1) for n in sorted(names)]).astype(np.float32) / 255
    np.testing.assert_allclose(unit.numpy(), expected, rtol=0, atol=1e-6)


def test_a_folder_of_exactly_the_most_images_is_read(tmp_path, monkeypatch):
    """Outside truth: the documented limit, "at most MAX_IMAGES images are read" (here 3): 3 files read, 4 refused."""
    from mechscope.clip.data import folder as F

    monkeypatch.setattr(F, "MAX_IMAGES", 3)
    _write_pngs(tmp_path / "f", ["a.png", "b.png", "c.png"], 1)
    assert [p.name for p in F.image_files(tmp_path / "f")] == ["a.png", "b.png", "c.png"]
    (tmp_path / "f" / "d.png").write_bytes((tmp_path / "f" / "a.png").read_bytes())
    with pytest.raises(DataError, match="4 files; at most 3 images"):
        F.image_files(tmp_path / "f")


def test_concept_folders_are_the_sorted_folder_names(tmp_path):
    """Outside truth: the concept folders written here (sorted names; a hidden folder skipped) and PIL's pixels."""
    from mechscope.clip.data.folder import read_concepts

    written = {c: _write_pngs(tmp_path / "c" / c, [f"{c}{i}.png" for i in range(2)], k)
               for k, c in enumerate(["zebra", "cat", "moth"])}  # fmt: skip
    _write_pngs(tmp_path / "c" / ".cache", ["x.png"], 9)
    found = read_concepts(tmp_path / "c", _preprocess())
    assert list(found) == ["cat", "moth", "zebra"]
    for c, (unit, files) in found.items():
        assert files == sorted(written[c])
        np.testing.assert_allclose(unit[0].numpy(), written[c][files[0]].transpose(2, 0, 1) / 255, atol=1e-6)
    _write_pngs(tmp_path / "one" / "cat", ["a.png"], 3)
    with pytest.raises(DataError, match="at least two concept folders"):
        read_concepts(tmp_path / "one", _preprocess())


# ---- hook points on a user's own model ----------------------------------------------------------


class FlatNet(nn.Module):
    """A user's model with named children and a functional flatten in forward: conv, norm, act, pool twice."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.act1, self.pool1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), \
            nn.MaxPool2d(2)  # fmt: skip
        self.conv2, self.act2, self.pool2 = nn.Conv2d(4, 6, 3), nn.GELU(), nn.AvgPool2d(2)
        self.fc = nn.Linear(6 * 2 * 2, 5)

    def forward(self, x):
        x = self.pool1(self.act1(self.bn(self.conv1(x))))
        return self.fc(torch.flatten(self.pool2(self.act2(self.conv2(x))), 1))


def _flatnet():
    torch.manual_seed(0)
    net = FlatNet()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_hook_points_cache_what_torchs_own_forward_hooks_see():
    """Outside truth: torch's register_forward_hook on the plain module's children, during the module's own forward."""
    net = _flatnet()
    seen = {}
    handles = [getattr(net, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.detach().clone()))
               for n in ("bn", "act1", "pool1", "conv2", "act2", "pool2", "fc")]  # fmt: skip
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    s = walk(net, (3, 12, 12))
    want = {"conv1.hook_pre": "bn", "conv1.hook_post": "act1", "conv1.hook_out": "pool1", "conv2.hook_pre": "conv2",
            "conv2.hook_post": "act2", "conv2.hook_out": "pool2", "hook_logits": "fc"}  # fmt: skip
    with torch.no_grad():
        logits, cache = run_with_cache(s.model, x, names=[*want, "hook_input"])
    assert torch.equal(cache["hook_input"], x) and torch.equal(logits, seen["fc"])
    for hook, child in want.items():
        torch.testing.assert_close(cache[hook], seen[child], rtol=0, atol=1e-6, msg=hook)


def test_the_hooked_view_starts_in_the_models_mode():
    """Outside truth: torch's module convention, a view of a model in training mode reports training mode."""
    net = _flatnet().train()
    s = walk(net, (3, 12, 12))
    assert net.training and s.model.training and s.model.hook_input.training
    assert not walk(_flatnet(), (3, 12, 12)).model.training


# ---- Building Blocks: objectives, channel images and their weights-hash link -----------------------


def test_the_centre_cell_is_lucids_height_and_width_halved():
    """Outside truth: Lucid's direction_neuron reads the activation at (H // 2, W // 2): (3, 2) of a 6×4 map; the
    value is hand arithmetic, dot · max(cos, 0.1)²."""
    v = torch.tensor([1.0, 2.0, -1.0])
    act = torch.zeros(1, 3, 6, 4)
    act[0, :, 3, 2] = torch.tensor([2.0, 1.0, 0.0])
    got = V.blocks_objective([("centre", "h", v)])({"h": act})
    dot, cos = 4.0, 4.0 / (5**0.5 * 6**0.5)
    assert got.item() == pytest.approx(dot * cos**2, rel=1e-5)


def _stripes(n):
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 16, 16).clone()


def test_channel_images_follow_the_channel_not_the_row_they_were_rendered_in(tmp_path):
    """Outside truth: a hand-made assignment of rows to channels, out of order; image k is filled with the value k."""
    spec = tiny_spec()
    assign = [("conv1.hook_post", 3), ("conv2.hook_post", 0), ("conv1.hook_post", 1), ("conv1.hook_post", 0),
              ("conv1.hook_post", 2)]  # fmt: skip
    V.save_for_blocks(tmp_path, spec.model, spec, assign, _stripes(5))
    sha = hashlib.sha256()
    for name, t in sorted(spec.model.state_dict().items()):
        sha.update(name.encode() + t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    got = V.load_channel_images(tmp_path / V.CHANNEL_IMAGES, sha.hexdigest(), {"conv1.hook_post": 4})
    assert [got["conv1.hook_post"][c, 0, 0, 0].item() for c in range(4)] == [3.0, 2.0, 4.0, 0.0]
    assert V.load_channel_images(tmp_path / V.CHANNEL_IMAGES, sha.hexdigest(), {"conv1.hook_post": 3}) is None


def test_a_users_model_links_its_channel_images_by_its_own_weights(tmp_path):
    """Outside truth: SHA-256 over the user's own module's state dict (name then raw bytes, in name order) by
    hashlib here: the images `cnn visualize` saves for a user's model are found under that hash."""
    net = _flatnet()
    spec = walk(net, (3, 12, 12))
    sha = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        sha.update(name.encode() + t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    V.save_for_blocks(tmp_path, net, spec, [("conv1.hook_post", c) for c in range(4)], _stripes(4))
    got = V.load_channel_images(tmp_path / V.CHANNEL_IMAGES, sha.hexdigest(), {"conv1.hook_post": 4})
    assert got is not None and got["conv1.hook_post"][:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


def _fake_render(net, entries, steps, seed, vrange, param="fourier"):
    """Each image filled with 1 + the sum of its entry's vector (centre/mean) or 100 + its channel."""
    fill = [1.0 + float(torch.as_tensor(e[2]).sum()) if e[0] != "channel" else 100.0 + e[2] for e in entries]
    return torch.tensor(fill).view(-1, 1, 1, 1).expand(len(entries), *net.input_shape).clone()


def test_each_cell_shows_its_own_vectors_image_and_weak_cells_none(monkeypatch):
    """Outside truth: hand-made cell vectors (a repeat, a lexicographically smaller one, one below 1e-3 of the
    largest norm); an image per vector made here, so cell j must show the image of its own vector or zeros."""
    monkeypatch.setattr(V, "render_entries", _fake_render)
    spec = tiny_spec()
    cells = torch.tensor([[[3.0, 0, 0, 0], [1.0, 0, 0, 0]], [[3.0, 0, 0, 0], [1e-5, 0, 0, 0]]])
    groups = SimpleNamespace(directions=[np.array([0.0, 2.0, 0, 0])], k=1)
    lb = SimpleNamespace(stage="conv1", hook="conv1.hook_out", cells=cells, groups=groups, shape=(4, 7, 7),
                         crop=(0, 4, 0, 4))  # fmt: skip
    out = V.visualise_blocks(spec, [lb], steps=1, seed=0, vrange=(0.0, 1.0))
    shown = out["cells"]["conv1"][..., 0, 0, 0]
    assert shown.tolist() == [[4.0, 2.0], [4.0, 0.0]] and out["cells"]["conv1"].shape == (2, 2, 1, 4, 4)
    assert out["groups"]["conv1"][:, 0, 0, 0].tolist() == [3.0]
    assert out["channels"]["conv1"][:, 0, 0, 0].tolist() == [100.0, 101.0, 102.0, 103.0]

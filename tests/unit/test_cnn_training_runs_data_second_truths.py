"""CNN training, run directories and IDX data, second pass, against outside truths: torch's AdamW, OneCycleLR and
``cross_entropy(label_smoothing=...)`` stepped by hand beside the training loop on a tiny model; sklearn's confusion
matrix and numpy's log-softmax on the model's own predictions; parameter counts from the layer shapes; a zero-filled
translation written as a plain loop; IDX files written by hand with ``struct`` by the format's spec; the documented
defaults and ranges."""

from __future__ import annotations

import dataclasses
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, confusion_matrix

from mechscope.cnn.config import TrainConfig
from mechscope.cnn.data.builtin import BUILTINS
from mechscope.cnn.data.idx import IdxFile, parse_idx, read_idx, verify
from mechscope.cnn.data.images import ImageDataset
from mechscope.cnn.models.cnn import CNN, CNNConfig
from mechscope.cnn.runs import check_run_config, load_run, load_run_data, prepare_out_dir, save_run
from mechscope.cnn.training import Evaluation, RunMetrics, evaluate, model_config_for, random_shift, train_cnn
from mechscope.core.errors import DataError, MechscopeError, RunError
from mechscope.core.torch_utils import torch_threads
from tests.unit.test_data_truths import _one_cycle
from tests.unit.test_text_training_truths import _hand_loop

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ("ant", "bee", "cat")
TINY = CNNConfig(in_channels=1, image_size=8, channels=(3,), kernel_size=3, padding=1, n_classes=3, mean=0.4, std=0.3)


def toy_data(n_train: int = 50, n_test: int = 30, seed: int = 0) -> ImageDataset:
    """Seeded 8×8 uint8 images whose class is where a bright bar lies (learnable), labels 0..2 unbalanced."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        y = torch.randint(0, 3, (n,), generator=g)
        y[: n // 3] = 0  # more of class 0: accuracy and the mean of per-class accuracy differ
        x = torch.randint(0, 60, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
        for i, c in enumerate(y.tolist()):
            x[i, 0, 2 * c + 1] = 250
        return x, y

    (xa, ya), (xb, yb) = split(n_train), split(n_test)
    return ImageDataset("toy", xa, ya, xb, yb, NAMES, {"kind": "npz", "file": "toy.npz"})


def hand_training(data: ImageDataset, cfg: TrainConfig, total: int):
    """The documented loop, written out (test_text_training_truths' hand loop: same seeded initial weights,
    ``torch.randperm`` batches of a generator seeded with the seed, ragged batch dropped, each batch shifted at
    random, torch's AdamW and OneCycleLR with their defaults, cross-entropy with label smoothing); returns the model
    and the per-epoch (epoch, step, mean loss) of the epochs that ran a step."""
    model, losses = _hand_loop(data, cfg, TINY, total)
    steps = np.cumsum([len(epoch) for epoch in losses])
    history = [(e + 1, int(steps[e]), sum(epoch) / len(epoch)) for e, epoch in enumerate(losses) if epoch]
    return model, history


# 50 images in batches of 16: 3 steps an epoch (2 images dropped); 3 epochs would be 9 steps, --max-steps stops at 7
CFG = TrainConfig(epochs=3, batch_size=16, lr=0.02, weight_decay=0.05, warmup_fraction=0.25, seed=5, shift=1,
                  label_smoothing=0.2, train_limit=50, max_steps=7)  # fmt: skip


@pytest.fixture(scope="module")
def trained():
    data = toy_data(n_train=64)  # train_limit 50 keeps the first 50
    with torch_threads(1):
        return data, train_cnn(data, CFG, TINY, progress=False)


def test_weights_are_adamw_and_one_cycle_stepped_by_hand(trained):
    """Outside truth: torch.optim.AdamW + OneCycleLR + cross_entropy(label_smoothing) stepped by hand on the first
    50 images, 7 steps (max_steps), shifts from the same seeded generator."""
    data, result = trained
    model, _ = hand_training(data, CFG, total=7)
    got, want = result.model.state_dict(), model.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)


def test_steps_and_history_are_counted_by_hand(trained):
    """Outside truth: by hand, 3 + 3 + 1 steps (max_steps 7 cuts the third epoch), epochs numbered from 1, each
    epoch's loss the mean of its own steps' losses."""
    data, result = trained
    _, history = hand_training(data, CFG, total=7)
    assert result.steps == 7
    assert [(h["epoch"], h["step"]) for h in result.history] == [(e, s) for e, s, _ in history] == [(1, 3), (2, 6),
                                                                                                    (3, 7)]  # fmt: skip
    for h, (_, _, loss) in zip(result.history, history, strict=True):
        assert h["train_loss"] == pytest.approx(loss, rel=1e-4)


def test_evaluation_is_sklearn_on_the_models_own_predictions(trained):
    """Outside truth: sklearn's confusion_matrix and accuracy_score on argmax of the trained model's logits; numpy's
    log-softmax for the loss; per-class accuracy = diagonal / row sum (rows = true classes)."""
    data, result = trained
    x = data.test_images.float() / 255.0
    with torch.no_grad():
        logits = result.model(x).double().numpy()
    y = data.test_labels.numpy()
    pred = logits.argmax(1)
    cm = confusion_matrix(y, pred, labels=[0, 1, 2])
    e = result.evaluation
    assert e.confusion_matrix == cm.tolist()
    assert e.accuracy == pytest.approx(accuracy_score(y, pred))
    assert e.per_class_accuracy == pytest.approx([cm[i, i] / cm[i].sum() for i in range(3)])
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    assert e.loss == pytest.approx(-logp[np.arange(len(y)), y].mean(), rel=1e-5)


def test_run_metrics_fields_and_parameter_count_by_hand(trained):
    """Outside truth: the tiny model's parameters summed from its layer shapes (conv 1→3 3×3 with bias: 30; read-out
    3·4·4 → 3 with bias: 147); the metrics' fields are the evaluation's, by name."""
    _, result = trained
    m = RunMetrics.of(result, NAMES)
    assert m.n_parameters == (1 * 3 * 3 * 3 + 3) + (3 * 4 * 4 * 3 + 3) == 177
    e = result.evaluation
    assert (m.test_accuracy, m.test_loss, m.steps) == (e.accuracy, e.loss, 7)
    assert m.class_names == list(NAMES) and m.confusion_matrix == e.confusion_matrix


def test_evaluation_to_dict_names_each_field():
    """Outside truth: distinct hand-made values; each key holds its own field."""
    e = Evaluation(0.5, 1.25, [0.25, 0.75], [[1, 2], [3, 4]])
    assert e.to_dict() == {"test_accuracy": 0.5, "test_loss": 1.25, "per_class_accuracy": [0.25, 0.75],
                           "confusion_matrix": [[1, 2], [3, 4]]}  # fmt: skip


def test_unbalanced_per_class_accuracy_divides_by_the_true_class_count():
    """Outside truth: a fixed model whose predictions are known; class 0 has 3 true images, 1 predicted; a plain loop
    over the pairs builds the matrix."""

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return F.one_hot(x[:, 0, 0, 0].long(), 3).float() * 2.0

    pred = [0, 1, 1, 2, 2, 0]
    labels = [0, 0, 0, 1, 2, 2]
    cm = [[0] * 3 for _ in range(3)]
    for t, p in zip(labels, pred, strict=True):
        cm[t][p] += 1
    images = torch.tensor(pred, dtype=torch.float).view(6, 1, 1, 1).expand(6, 1, 2, 2).clone()
    e = evaluate(Fixed(), images, torch.tensor(labels), 3)
    assert e.confusion_matrix == cm
    assert e.per_class_accuracy == pytest.approx([1 / 3, 0.0, 1 / 2])
    assert e.accuracy == pytest.approx(2 / 6)
    logit_true = np.array([2.0 if t == p else 0.0 for t, p in zip(labels, pred, strict=True)])
    assert e.loss == pytest.approx(float(np.mean(np.log(np.exp(2.0) + 2) - logit_true)), rel=1e-6)


def test_a_warm_up_of_exactly_one_step_becomes_two():
    """Outside truth: the one-cycle formula by hand (tests/unit/test_data_truths.py) with a two-step warm-up: 5 steps
    at warm-up fraction 0.2 would be one step, where torch's schedule divides by zero."""
    lrs = []
    real = torch.optim.AdamW.step

    def step(self, *a, **kw):
        lrs.append(self.param_groups[0]["lr"])
        return real(self, *a, **kw)

    cfg = TrainConfig(epochs=1, batch_size=10, lr=0.01, warmup_fraction=0.2, seed=1, shift=0, max_steps=5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", step)
        train_cnn(toy_data(n_train=60), cfg, TINY, progress=False)
    assert lrs == pytest.approx([_one_cycle(i, 5, 0.01, 0.4) for i in range(5)], rel=1e-6)
    assert lrs[1] == pytest.approx(0.01)


def test_random_shift_is_a_zero_filled_translation_by_hand():
    """Outside truth: a plain loop translating each image by (dy, dx), zero where it leaves the frame; each output is
    exactly one of the (2s + 1)^2 translations (images full to the border, so wrapping around would match none)."""
    g = torch.Generator().manual_seed(3)
    s, images = 2, torch.rand(12, 2, 6, 7, generator=g) + 1.0
    out = random_shift(images, s, torch.Generator().manual_seed(4))

    def translated(img, dy, dx):
        res = torch.zeros_like(img)
        for r in range(img.shape[1]):
            for c in range(img.shape[2]):
                if 0 <= r + dy < img.shape[1] and 0 <= c + dx < img.shape[2]:
                    res[:, r, c] = img[:, r + dy, c + dx]
        return res

    offsets = [(dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1)]
    for b in range(len(images)):
        matches = [o for o in offsets if torch.equal(out[b], translated(images[b], *o))]
        assert len(matches) == 1, (b, matches)


def test_mean_and_std_are_per_channel_for_rgb_training_images():
    """Outside truth: numpy's per-channel mean and std (ddof 1) of the training pixels / 255, channels distinct."""
    rng = np.random.default_rng(2)
    x = np.stack([rng.integers(0, hi, (30, 6, 6)) for hi in (40, 140, 256)], 1).astype(np.uint8)  # [N, 3, 6, 6]
    data = ImageDataset("rgb", torch.from_numpy(x), torch.arange(30) % 2, torch.from_numpy(x[:4]),
                        torch.zeros(4, dtype=torch.long), ("a", "b"))  # fmt: skip
    cfg = model_config_for(data)
    px = x.astype(np.float64) / 255
    assert cfg.mean == tuple(round(float(px[:, k].mean()), 4) for k in range(3))
    assert cfg.std == tuple(round(float(px[:, k].std(ddof=1)), 4) for k in range(3))
    assert (cfg.in_channels, cfg.image_size, cfg.n_classes) == (3, 6, 2)


def test_defaults_are_the_documented_recipe():
    """Outside truth: TrainConfig's docstring: 5 epochs, peak 5e-3, batch 128, shifts of up to 2 pixels; warm-up 0.2
    (ExplainSettings' and the schedule test's), no label smoothing, no limits."""
    c = TrainConfig()
    assert (c.epochs, c.lr, c.batch_size, c.shift, c.warmup_fraction) == (5, 5e-3, 128, 2, 0.2)
    assert (c.label_smoothing, c.train_limit, c.max_steps, c.seed) == (0.0, None, None, 0)
    assert 0 < c.weight_decay < 1e-3


# ---- run directories --------------------------------------------------------------------------------------------


def _saved(tmp_path, data=None, name="run"):
    torch.manual_seed(0)
    model = CNN(TINY)
    out = prepare_out_dir(tmp_path / name)
    save_run(out, model, {"seed": 0, "data": data or {"name": "toy", "kind": "npz"}}, {})
    return out


def _edit(path: Path, change) -> None:
    cfg = json.loads((path / "config.json").read_text())
    change(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_class_names_default_to_the_models_class_indices(tmp_path):
    """Outside truth: a 3-class model without recorded names has classes "0", "1", "2" (not MNIST's ten)."""
    assert load_run(_saved(tmp_path)).class_names == ("0", "1", "2")


def test_a_run_from_before_other_data_reads_as_builtin_mnist(tmp_path):
    """Outside truth: the module docstring: runs of kind mnist-cnn, without a data record, are MNIST (built in)."""
    path = _saved(tmp_path)
    _edit(path, lambda c: (c.pop("data"), c.update(kind="mnist-cnn")))
    assert load_run(path).data == {"name": "mnist", "kind": "builtin"}


MODEL = {"image_size": 8, "channels": [3], "kernel_size": 3, "padding": 1, "n_classes": 3}


@pytest.mark.parametrize("model, data, fragment", [
    ({"std": 0}, {"name": "x"}, "model.std' is 0"),
    ({"mean": 1000.5}, {"name": "x"}, "model.mean"),
    ({"std": 1000.5}, {"name": "x"}, "model.std"),
    ({"channels": [1, 1, 1, 1, 1]}, {"name": "x"}, "holds 5 widths"),
    ({}, None, "field 'data' is missing"),
    ({}, {"name": "x", "class_names": ["a", 2]}, "not a list of strings"),
], ids=["std0", "mean", "std", "widths", "nodata", "names"])  # fmt: skip
def test_run_config_limits_are_refused_just_past_them(model, data, fragment):
    """Outside truth: the documented limits (|mean| and std at most 1,000, std nonzero, 1 to 4 widths, a cnn run
    records its data with string class names); the value at each limit is allowed."""
    at_limit = {"model": {**MODEL, "mean": -1000, "std": 1000, "channels": [1, 1, 1, 1]}, "kind": "cnn", "data": {}}
    at_limit["data"] = {"name": "x", "class_names": ["a", "b"]}
    assert check_run_config(at_limit, Path("cfg"))["mean"] == -1000
    bad = {"model": {**MODEL, **model}, "kind": "cnn", **({"data": data} if data is not None else {})}
    with pytest.raises(RunError, match=fragment):
        check_run_config(bad, Path("cfg"))


def _npz(path: Path, data: ImageDataset) -> Path:
    np.savez(path, x_train=data.train_images[:, 0].numpy(), y_train=data.train_labels.numpy(),
             x_test=data.test_images[:, 0].numpy(), y_test=data.test_labels.numpy())  # fmt: skip
    return path


def test_a_run_of_other_class_count_than_its_data_is_refused(tmp_path):
    """Outside truth: a hand-made .npz with 2 classes beside a 3-class model: the class counts differ."""
    data = toy_data()
    two = dataclasses.replace(data, train_labels=data.train_labels % 2, test_labels=data.test_labels % 2)
    npz = _npz(tmp_path / "two.npz", two)
    run = load_run(_saved(tmp_path, {"name": "two", "kind": "npz", "file": str(npz)}))
    with pytest.raises(RunError, match="the model has 3 classes; .* has 2"):
        load_run_data(run)


# ---- the training pipeline ---------------------------------------------------------------------------------------


def test_train_pipeline_records_its_seed_names_and_settings(tmp_path):
    """Outside truth: the values given (seed 9, class names from the user's file, the training settings by name)."""
    from mechscope.cnn.pipelines.train import train

    npz = _npz(tmp_path / "toy.npz", toy_data())
    (tmp_path / "names.txt").write_text("ant\nbee\ncat\n")
    cfg = TrainConfig(epochs=1, batch_size=16, seed=9, shift=0, train_limit=32)
    out, metrics = train(tmp_path / "run", cfg, dataclasses.replace(TINY, mean=0.1307, std=0.3081), str(npz),
                         class_names=str(tmp_path / "names.txt"), progress=False)  # fmt: skip
    record = json.loads((out / "config.json").read_text())
    assert record["seed"] == 9 and record["training"]["seed"] == 9 and record["training"]["train_limit"] == 32
    assert metrics.class_names == list(NAMES) == record["data"]["class_names"]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2


def test_padding_may_reach_one_less_than_the_kernel(tmp_path):
    """Outside truth: a 'full' convolution pads k - 1; padding k is refused before anything is read."""
    from mechscope.cnn.pipelines.train import train

    with pytest.raises(MechscopeError, match="--padding 3 must be less than the kernel size 3"):
        train(tmp_path / "x", TrainConfig(), dataclasses.replace(TINY, padding=3), "no-such.npz", progress=False)
    with pytest.raises(DataError):  # padding 2 passes the check and goes on to the (missing) data
        train(tmp_path / "y", TrainConfig(), dataclasses.replace(TINY, padding=2), "no-such.npz", progress=False)


# ---- IDX files by the format's spec -----------------------------------------------------------------------------


def _idx(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """The IDX spec by hand: two zero bytes, the type, the number of dimensions, big-endian uint32 sizes, C order."""
    return struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + (
        array.astype(np.uint8).tobytes())  # fmt: skip


def test_idx_of_another_type_code_is_refused():
    """Outside truth: the spec's type byte: 0x08 is unsigned byte, 0x0D float; only unsigned bytes are read."""
    labels = np.array([3, 1, 4, 1], dtype=np.uint8)
    assert parse_idx(_idx(labels)).tolist() == [3, 1, 4, 1]
    with pytest.raises(DataError, match="wrong magic number 0x00000d01"):
        parse_idx(_idx(labels, type_code=0x0D))


def test_wrong_magic_names_what_was_expected(tmp_path):
    """Outside truth: 0x00000801 is labels, 0x00000803 images: an image file where labels belong says '(labels)'."""
    p = tmp_path / "f"
    p.write_bytes(_idx(np.zeros((2, 3, 3), np.uint8)))
    with pytest.raises(DataError, match=r"0x00000803; expected 0x00000801 \(labels\)"):
        read_idx(p, IdxFile("f", "", 0x801, (2,)))
    p.write_bytes(_idx(np.zeros(5, np.uint8)))
    with pytest.raises(DataError, match=r"expected 0x00000803 \(images\)"):
        read_idx(p, IdxFile("f", "", 0x803, (5, 3, 3)))
    with pytest.raises(DataError, match="holds 5 items; expected 6"):
        read_idx(p, IdxFile("f", "", 0x801, (6,)))


def test_verify_says_a_valid_file_is_not_the_original(tmp_path):
    """Outside truth: hashlib's MD5 of bytes written here differs from MNIST's published test-labels MD5, and the
    file parses, so the reason is that it is not the original."""
    spec = BUILTINS["mnist"].files["test_labels"]
    p = tmp_path / spec.name
    p.write_bytes(gzip.compress(_idx(np.zeros(10000, np.uint8))))  # the published files are gzipped
    with pytest.raises(DataError, match="the file parses but is not the published original"):
        verify(p, dataclasses.replace(spec, name="f"))


def test_builtin_files_follow_the_published_names_and_magic_numbers():
    """Outside truth: the published file names (LeCun's t10k-*, NIST's emnist-{split}-test-*) and the IDX magic of
    images (0x803) and labels (0x801); EMNIST digits are 0-9 in order."""
    for name, ds in BUILTINS.items():
        test = "test" if name.startswith("emnist") else "t10k"
        prefix = f"{name}-" if name.startswith("emnist") else ""
        f = ds.files
        assert f["test_images"].name == f"{prefix}{test}-images-idx3-ubyte.gz", name
        keys = ("train_images", "train_labels", "test_images", "test_labels")
        assert [f[k].magic for k in keys] == [0x803, 0x801, 0x803, 0x801], name
        assert ds.transposed == name.startswith("emnist"), name
    assert BUILTINS["emnist-digits"].class_names == tuple("0123456789")


def test_the_datasets_folder_wins_over_stray_files_in_the_root(tmp_path):
    """Outside truth: the module docstring's order: inside the data root, the dataset's own folder (mnist/) first,
    the root itself only when it holds the files and has no such folder."""
    from mechscope.cnn.data.builtin import dataset_dir

    ds = BUILTINS["mnist"]
    (tmp_path / ds.file_names[0]).write_bytes(b"stray")
    assert dataset_dir(tmp_path, ds) == tmp_path
    (tmp_path / "mnist").mkdir()
    assert dataset_dir(tmp_path, ds) == tmp_path / "mnist"
    assert dataset_dir(tmp_path / "empty", ds) == tmp_path / "empty" / "mnist"


def test_one_class_given_by_name_and_by_index_is_refused_once_resolved():
    """Outside truth: by hand, "bee" is index 1 of ("ant", "bee", "cat"): the two spellings name one class."""
    from mechscope.cnn.config import ExplainSettings

    assert ExplainSettings(classes=("cat", 1)).resolve(NAMES).classes == (2, 1)
    with pytest.raises(MechscopeError, match="--class bee given more than once"):
        ExplainSettings(classes=("bee", 1)).resolve(NAMES)


def test_another_runs_weights_under_this_runs_record_are_refused(tmp_path):
    """Outside truth: two models of different seeds have different weights; swapping the weights files between two
    saved runs leaves each config.json recording the other weights."""
    a = _saved(tmp_path, name="a")
    torch.manual_seed(1)
    save_run(prepare_out_dir(tmp_path / "b"), CNN(TINY), {"seed": 1, "data": {"name": "toy", "kind": "npz"}}, {})
    (a / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(RunError, match="the run's files come from different trainings"):
        load_run(a)


def test_a_data_dir_given_overrides_the_recorded_idx_folder(tmp_path):
    """Outside truth: IDX files written here (tests/shapes.py) in folder B; the run records folder A, now gone."""
    from tests.shapes import splits, write_idx

    b = write_idx(tmp_path / "B", splits(n_train=12, n_test=6, size=8, n_classes=3))
    run = load_run(_saved(tmp_path, {"name": "idx", "kind": "idx", "directory": str(tmp_path / "A")}))
    data = load_run_data(run, data_dir=b)
    assert data.source["directory"] == str(b.resolve()) and len(data.train_labels) == 12


def test_mnist_downloads_from_its_own_mirror_variable(tmp_path, monkeypatch):
    """Outside truth: the module docstring: $MECHSCOPE_MNIST_MIRROR replaces the mirrors for MNIST, before
    $MECHSCOPE_MIRROR (which the other datasets use)."""
    import urllib.error

    from mechscope.cnn.data import builtin

    urls = []

    def fetch(url, dest, timeout):
        urls.append(url)
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(builtin, "_fetch", fetch)
    monkeypatch.setenv("MECHSCOPE_MNIST_MIRROR", "http://mnist.invalid/m")
    monkeypatch.setenv("MECHSCOPE_MIRROR", "http://all.invalid/")
    for name in ("mnist", "kmnist"):
        ds = BUILTINS[name]
        with pytest.raises(DataError):
            builtin.download(ds, tmp_path / name, ds.file_names[:1])
    assert urls == [
        "http://mnist.invalid/m/train-images-idx3-ubyte.gz",
        "http://all.invalid/train-images-idx3-ubyte.gz",
    ]
